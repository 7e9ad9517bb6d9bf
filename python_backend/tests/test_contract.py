"""The shared contract: records the CLI writes pass the schema, broken ones are refused with the field named,
the hand checker used without jsonschema (a fresh Slicer) agrees with jsonschema, the module needs nothing
beyond the standard library, and the fallback dependency list equals pyproject.toml's."""
from __future__ import annotations

import ast
import builtins
import copy
import json
import math
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from anymc3d import contract
from anymc3d.cli import main

BACKEND = Path(contract.__file__).parents[1]


@pytest.fixture(scope="module")
def record(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rec") / "r.json"
    assert main(["predict", str(demo_dir / "volume.nii.gz"), "--backbone", str(demo_dir / "backbone.safetensors"),
                 "--plugin", str(demo_dir / "plugin.anymc3d"), "--device", "cpu", "--progress", "none",
                 "--json", str(out)]) == 0
    return json.loads(out.read_text(encoding="utf-8"))[0]


def _broken(record):
    """(what is wrong, the broken record) pairs: each must be refused."""
    label = record["results"][0]["labels"][0]
    cases = []

    def case(why, edit):
        r = copy.deepcopy(record)
        edit(r)
        cases.append((why, r))

    res = lambda r: r["results"][0]  # noqa: E731
    case("missing field", lambda r: r.pop("num_slices"))
    case("probability above 1", lambda r: res(r)["probabilities"].__setitem__(label, 1.5))
    case("negative probability", lambda r: res(r)["probabilities_raw"].__setitem__(label, -0.1))
    case("string probability", lambda r: res(r)["probabilities"].__setitem__(label, "0.3"))
    case("bad status", lambda r: r.__setitem__("status", "fine"))
    case("decision not following", lambda r: res(r)["decisions"].__setitem__(label, not res(r)["decisions"][label]))
    case("label keys differ", lambda r: res(r)["thresholds"].pop(label))
    case("error record with results", lambda r: r.update(status="error", error="x", slicing_axis=None, num_slices=None))
    case("axis out of range", lambda r: r.__setitem__("slicing_axis", 3))
    return cases


def test_the_cli_record_passes(record):
    assert contract.validate_record(record) is record
    assert contract.validate_records([record, record]) == [record, record]


def test_broken_records_are_refused_naming_the_field(record):
    for why, broken in _broken(record):
        with pytest.raises(contract.RecordError):
            contract.validate_record(broken)
    nan = copy.deepcopy(record)
    nan["results"][0]["probabilities"][nan["results"][0]["labels"][0]] = math.nan
    with pytest.raises(contract.RecordError, match="probabilit"):
        contract.validate_record(nan)


def test_without_jsonschema_the_hand_checker_refuses_the_same(record, monkeypatch):
    real_import = builtins.__import__

    def no_jsonschema(name, *args, **kwargs):
        if name == "jsonschema":
            raise ImportError("not installed (simulated fresh Slicer)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setitem(sys.modules, "jsonschema", None)
    monkeypatch.setattr(builtins, "__import__", no_jsonschema)
    contract.validate_record(record)
    for why, broken in _broken(record):
        with pytest.raises(contract.RecordError):
            contract.validate_record(broken)


def test_contract_needs_only_the_standard_library():
    tree = ast.parse(Path(contract.__file__).read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    third_party = imported - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party == {"jsonschema"}  # optional, imported inside a try


def test_fallback_requirements_equal_pyproject():
    declared = tomllib.loads((BACKEND / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    assert list(contract._FALLBACK_REQUIREMENTS) == [d.split("#")[0].strip() for d in declared]
    names = {r.split(">")[0].split("<")[0].split("=")[0].strip().lower() for r in contract.requirements()}
    assert {"torch", "timm", "peft", "simpleitk", "jsonschema", "tqdm"} <= names


def test_names_round_trip():
    assert contract.image_stem("/a/case.1.nii.gz") == "case.1" and contract.image_stem("x.txt") == "x.txt"
    assert contract.heatmap_name("c", "p q", "lé", "nrrd") == "c__p_q__l_.nrrd"
    assert contract.is_temporary(".c.nii.gz.abc.partial.nii.gz") and not contract.is_image_name(".x.nii.gz")
    assert contract.is_image_name("x.NRRD") and not contract.is_image_name("x.nii.gz.partial")



def test_task_names_and_the_decision_rule():
    """TASKS is what both schemas allow; decide() against numpy: p >= t per finding, or the argmax class."""
    from anymc3d.plugin_file import plugin_schema

    assert contract.record_schema()["properties"]["results"]["items"]["properties"]["task"]["enum"] == list(contract.TASKS)
    assert plugin_schema()["properties"]["task"]["enum"] == list(contract.TASKS)
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c", "d"]
    for _ in range(50):
        p, t = rng.random(4), rng.uniform(0.05, 0.95, 4)
        probs, thresholds = dict(zip(labels, p.tolist())), dict(zip(labels, t.tolist()))
        assert contract.decide("multilabel", labels, probs, thresholds) == dict(zip(labels, (p >= t).tolist()))
        top = labels[int(np.argmax(p))]
        assert contract.decide("multiclass", labels, probs, thresholds) == {k: k == top for k in labels}
    tie = {"a": 0.4, "b": 0.4, "c": 0.2, "d": 0.0}
    assert contract.decide("multiclass", labels, tie, thresholds)["a"]  # the first of equals, as np.argmax
