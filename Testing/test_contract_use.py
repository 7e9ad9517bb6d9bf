"""The Slicer side uses the one contract (anymc3d.contract): its constants, names and record checks, no copies."""

import copy
import json
import os
import re

import AnyMC3DSlicerLogic
import pytest
from anymc3d import contract
from AnyMC3DSlicerLogic import PredictionOptions, logic, parameters

from .slicer_testing import REPO_ROOT

SLICER_SIDE = [os.path.join(REPO_ROOT, "AnyMC3DSlicer", "AnyMC3DSlicer.py"), os.path.join(REPO_ROOT, "Testing", "fake_anymc3d.py")] + \
    [os.path.join(REPO_ROOT, "Logic", name) for name in sorted(os.listdir(os.path.join(REPO_ROOT, "Logic"))) if name.endswith(".py")]


def test_logic_constants_are_the_contracts():
    assert parameters.DEVICES is contract.DEVICES
    assert parameters.HEATMAP_METHODS is contract.HEATMAP_METHODS
    assert parameters.GRADIENT_METHODS is contract.GRADIENT_METHODS
    assert logic.validate_record is contract.validate_record and logic.heatmap_name is contract.heatmap_name


@pytest.mark.parametrize("constant", ["HEATMAP_METHODS", "GRADIENT_METHODS", "DEVICES", "IMAGE_SUFFIXES"])
def test_no_copy_of_a_contract_constant_in_the_slicer_side(constant):
    """No literal tuple/list holding the contract's values (in any order) in the module, the Logic or the fake."""
    values = set(getattr(contract, constant))
    for path in SLICER_SIDE:
        with open(path, encoding="utf-8") as file:
            source = file.read()
        for literal in re.findall(r"[(\[]((?:\s*\"[^\"]*\"\s*,)+\s*\"[^\"]*\"\s*,?\s*)[)\]]", source):
            found = set(re.findall(r"\"([^\"]*)\"", literal))
            assert not (len(found) > 1 and found <= values | {""} and found & values == found), (path, literal)
        assert "[^A-Za-z0-9_.-]" not in source, path  # safe_name's rule


def test_cases_in_a_folder_follow_is_image_name(tmp_path):
    """The backend writes partial outputs as hidden ``.partial`` files: never cases (the old list took them)."""
    names = ["a.nii.gz", "b.NRRD", ".c.nii.gz", ".a.nii.gz.partial.nii.gz", "d.partial.nrrd", "notes.txt", "e.mha"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.nrrd").mkdir()
    listed = [os.path.basename(p) for p in logic.imageFilesInFolder(str(tmp_path))]
    assert listed == sorted(n for n in names if contract.is_image_name(n))
    assert listed == ["a.nii.gz", "b.NRRD", "e.mha"]
    assert logic.imageStem("dir/x.y.nii.gz") == contract.image_stem("dir/x.y.nii.gz") == "x.y"


def goodRecord(tmp_path, stem="case"):
    heatmap = tmp_path / contract.heatmap_name(stem, "chest plugin", None, "nrrd")
    heatmap.write_bytes(b"x")
    return {"image": str(tmp_path / f"{stem}.nrrd"), "status": "ok", "error": None, "slicing_axis": 2, "num_slices": 3,
            "results": [{"plugin": "chest plugin", "plugin_path": "p.anymc3d", "task": "multilabel", "labels": ["a", "b"],
                         "probabilities": {"a": 0.2, "b": 0.7}, "probabilities_raw": {"a": 0.3, "b": 0.6},
                         "thresholds": {"a": 0.5, "b": 0.5}, "decisions": {"a": False, "b": True}, "slicing_axis": 2,
                         "slice_importance": [0.2, 0.3, 0.5], "heatmap_method": "attention", "heatmap": str(heatmap),
                         "finding_heatmaps": {}}]}


@pytest.mark.parametrize("breach,message", [
    (lambda r: r["results"][0]["decisions"].update(a=True), "decisions"),
    (lambda r: r["results"][0]["probabilities"].update(a=1.5), "probabilities"),
    (lambda r: r["results"][0].pop("slicing_axis"), "slicing_axis"),
    (lambda r: r["results"][0].update(slice_importance=[0.5, 0.6, 0.1]), "slice_importance"),
    (lambda r: r.update(status="maybe"), "status"),
])
def test_records_are_checked_by_the_contract(tmp_path, breach, message):
    """checkRecord refuses exactly what the contract refuses (same exception, same message)."""
    checker = AnyMC3DSlicerLogic.AnyMC3DSlicerLogic.checkRecord
    record = goodRecord(tmp_path)
    assert checker(None, copy.deepcopy(record), 1, str(tmp_path), PredictionOptions(), heatmapStem="case") == record
    breach(record)
    with pytest.raises(contract.RecordError) as fromContract:
        contract.validate_record(copy.deepcopy(record))
    with pytest.raises(contract.RecordError, match=message) as fromLogic:
        checker(None, record, 1, str(tmp_path), PredictionOptions())
    assert str(fromLogic.value) == str(fromContract.value)


def test_heatmaps_must_carry_the_contracts_name(tmp_path):
    record = goodRecord(tmp_path, stem="other")
    with pytest.raises(ValueError, match="not named by the contract"):
        AnyMC3DSlicerLogic.AnyMC3DSlicerLogic.checkRecord(None, record, 1, str(tmp_path), PredictionOptions(), heatmapStem="case")


def test_read_record_refuses_a_non_list(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(goodRecord(tmp_path)))
    with pytest.raises(contract.RecordError, match="list"):
        AnyMC3DSlicerLogic.AnyMC3DSlicerLogic.readRecord(None, str(path), 1, str(tmp_path), PredictionOptions())


@pytest.mark.parametrize("breach", [
    lambda r: None, lambda r: r.update(status="error"), lambda r: r.update(error="x"), lambda r: r.update(num_slices=None),
    lambda r: r.update(status="error", error="bad", slicing_axis=None, num_slices=None),
    lambda r: r.update(status="error", error="bad", slicing_axis=None, num_slices=None, results=[]),
    lambda r: r.update(series=""), lambda r: r["results"][0].update(heatmap_method="nope"),
    lambda r: r["results"][0]["thresholds"].update(a=2), lambda r: r.update(extra=1),
])
def test_without_jsonschema_records_are_checked_as_with_it(tmp_path, breach):
    """A fresh Slicer has no jsonschema: the contract's hand checker accepts and refuses what jsonschema does."""
    jsonschema = pytest.importorskip("jsonschema")
    record = goodRecord(tmp_path)
    breach(record)
    try:
        jsonschema.validate(record, contract.record_schema())
        byJsonschema = True
    except jsonschema.ValidationError:
        byJsonschema = False
    try:
        contract.check_schema(record, contract.record_schema(), "record")
        byHand = True
    except contract.RecordError:
        byHand = False
    assert byHand == byJsonschema
