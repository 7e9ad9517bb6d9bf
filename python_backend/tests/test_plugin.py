"""Plugin files: bit-exact round trip, schema and semantic validation, tamper detection, backbone
matching, and never unpickling."""
from __future__ import annotations

import json
import zipfile

import pytest
import torch

from anymc3d.backbone import BackboneSpec
from anymc3d.demo import random_plugin
from anymc3d.engine import Engine
from anymc3d.errors import PluginError
from anymc3d.plugin import (JSON_NAME, WEIGHTS_NAME, PluginConfig, find_plugins, load_plugin, read_plugin_metadata,
                            save_plugin)
from anymc3d.preprocess_config import PreprocessConfig
from conftest import small_backbone


@pytest.fixture
def made(tmp_path):
    bb = small_backbone()
    config, head, lora = random_plugin(bb.model, bb.spec, views=("sag", "cor"))
    return bb, config, head, lora


@pytest.mark.parametrize("target", ["p.anymc3d", "folder_plugin"])
def test_round_trip_is_bit_exact(tmp_path, made, target):
    bb, config, head, lora = made
    path = save_plugin(tmp_path / target, config, head, lora)
    loaded = load_plugin(path)
    assert loaded.config.to_dict() == config.to_dict()
    for k, v in head.state_dict().items():
        assert torch.equal(loaded.head.state_dict()[k], v), k
    for view, state in enumerate(lora):
        assert set(loaded.lora[view]) == set(state)
        assert all(torch.equal(loaded.lora[view][k], v) for k, v in state.items())


def test_saving_twice_gives_identical_bytes(tmp_path, made):
    _, config, head, lora = made
    a = save_plugin(tmp_path / "a.anymc3d", config, head, lora).read_bytes()
    b = save_plugin(tmp_path / "b.anymc3d", config, head, lora).read_bytes()
    assert a == b


def test_loading_never_calls_torch_load(tmp_path, made, monkeypatch):
    _, config, head, lora = made
    path = save_plugin(tmp_path / "p.anymc3d", config, head, lora)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    load_plugin(path)


def _rewrite(path, meta=None, weights=None, extra=None):
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    if meta is not None:
        members[JSON_NAME] = json.dumps(meta).encode() if isinstance(meta, dict) else meta
    if weights is not None:
        members[WEIGHTS_NAME] = weights
    members.update(extra or {})
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _meta(path):
    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read(JSON_NAME))


@pytest.mark.parametrize("tamper,message", [
    (lambda m: m.update(labels=m["labels"] + ["extra"], calibration_a=m["calibration_a"] + [1.0],
                        calibration_b=m["calibration_b"] + [0.0], thresholds=m["thresholds"] + [0.5]),
     "lists 4 labels but the head has 3 outputs"),
    (lambda m: m.update(labels=m["labels"][:2]), "calibration_a: 3 values for 2 labels"),
    (lambda m: m.update(task="regression"), "invalid plugin metadata at task"),
    (lambda m: m.pop("weights_sha256"), "'weights_sha256' is a required property"),
    (lambda m: m.update(thresholds=[0.5, 1.5, 0.5]), "invalid plugin metadata at thresholds/1"),
    (lambda m: m.update(calibration_a=[1.0, -1.0, 1.0]), "Platt slopes must be positive"),
    (lambda m: m.update(labels=["a", "a", "b"]), "distinct"),
    (lambda m: m.update(format_version=99), "this anymc3d reads version 1"),
    (lambda m: m.update(views=["sag"]), "one recipe per view"),
    (lambda m: m["preprocessing"][0].update(window_width=-5), "window_width"),
    (lambda m: m.update(unknown_field=1), "Additional properties are not allowed"),
])
def test_tampered_metadata_is_refused_with_the_problem_named(tmp_path, made, tamper, message):
    _, config, head, lora = made
    path = save_plugin(tmp_path / "p.anymc3d", config, head, lora)
    meta = _meta(path)
    tamper(meta)
    _rewrite(path, meta=meta)
    with pytest.raises(PluginError, match=r"p\.anymc3d") as err:
        load_plugin(path)
    assert message in str(err.value)


def test_altered_weights_and_damaged_files_are_refused(tmp_path, made):
    _, config, head, lora = made
    path = save_plugin(tmp_path / "p.anymc3d", config, head, lora)
    with zipfile.ZipFile(path) as zf:
        weights = bytearray(zf.read(WEIGHTS_NAME))
    weights[-1] ^= 0xFF
    _rewrite(path, weights=bytes(weights))
    with pytest.raises(PluginError, match="does not match the hash"):
        load_plugin(path)
    path = save_plugin(tmp_path / "q.anymc3d", config, head, lora)
    _rewrite(path, extra={"evil.pkl": b"x"})
    with pytest.raises(PluginError, match="exactly plugin.json and plugin.safetensors"):
        load_plugin(path)
    path = save_plugin(tmp_path / "r.anymc3d", config, head, lora)
    _rewrite(path, meta=b"{not json")
    with pytest.raises(PluginError, match="is not valid JSON"):
        load_plugin(path)
    truncated = tmp_path / "t.anymc3d"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(PluginError, match=r"t\.anymc3d: not a readable plugin file"):
        load_plugin(truncated)
    with pytest.raises(PluginError, match="not found"):
        load_plugin(tmp_path / "absent.anymc3d")


def test_plugin_for_another_backbone_is_refused(tmp_path):
    bb = small_backbone(seed=0)
    config, head, lora = random_plugin(bb.model, bb.spec)
    path = save_plugin(tmp_path / "p.anymc3d", config, head, lora)
    other = Engine(small_backbone(seed=1), device="cpu")  # same architecture, other weights
    with pytest.raises(PluginError, match=r"p\.anymc3d: plugin was made for backbone DINOv2-architecture demo, 3 blocks, width 96, random weights \(weights"):
        other.add_plugin(path)
    assert not other.plugins
    v3 = Engine(small_backbone("dinov3"), device="cpu")
    with pytest.raises(PluginError, match="made for backbone DINOv2-architecture demo.*loaded backbone is DINOv3-architecture demo"):
        v3.add_plugin(path)


def test_slice_size_must_fit_the_patch_grid(tmp_path):
    bb = small_backbone()
    config, head, lora = random_plugin(bb.model, bb.spec, preprocessing=PreprocessConfig(input_size=50))
    path = save_plugin(tmp_path / "p.anymc3d", config, head, lora)
    with pytest.raises(PluginError, match=r"slice size \[50\] is not a multiple of the backbone's patch size 14"):
        Engine(small_backbone(), device="cpu").add_plugin(path)


def test_config_validation_names_the_field():
    spec = BackboneSpec("dinov2_vits14_reg", img_size=56, depth=3, embed_dim=96, num_heads=3)
    ok = dict(name="t", labels=["a", "b"], task="multiclass", backbone=spec, backbone_fingerprint="0" * 64)
    PluginConfig(**ok)
    with pytest.raises(ValueError, match="labels: a multiclass task needs at least two classes"):
        PluginConfig(**{**ok, "labels": ["a"]})
    with pytest.raises(ValueError, match="backbone_fingerprint"):
        PluginConfig(**{**ok, "backbone_fingerprint": "abc"})
    with pytest.raises(ValueError, match="backbone.name: unknown backbone 'vit_huge'"):
        BackboneSpec("vit_huge")


def test_metadata_listing_and_discovery(tmp_path, made):
    _, config, head, lora = made
    save_plugin(tmp_path / "one.anymc3d", config, head, lora)
    save_plugin(tmp_path / "two", config, head, lora)
    (tmp_path / "notes.txt").write_text("not a plugin")
    assert [p.name for p in find_plugins(tmp_path)] == ["one.anymc3d", "two"]
    meta = read_plugin_metadata(tmp_path / "two")
    assert meta["views"] == ["sag", "cor"] and meta["backbone"]["name"] == "dinov2_vits14_reg"


# ------------------------------------------------------------------ torch-free reading (anymc3d.plugin_file)
BLOCKER = '''
import importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, Blocker())
'''


@pytest.mark.parametrize("blocked", [("torch", "timm", "peft", "safetensors"),
                                     ("torch", "timm", "peft", "safetensors", "jsonschema")])
def test_plugins_are_listed_and_checked_without_torch(tmp_path, made, blocked):
    """The Slicer module lists plugins before torch is installed: plugin_file reads and checks plugin.json with
    the standard library (and the hand schema checker when jsonschema is missing too)."""
    import os
    import subprocess
    import sys

    import anymc3d

    _, config, head, lora = made
    save_plugin(tmp_path / "one.anymc3d", config, head, lora, training={"epochs_run": 3, "best_val_auroc": 0.75})
    save_plugin(tmp_path / "two", config, head, lora)
    bad = tmp_path / "bad.anymc3d"
    save_plugin(bad, config, head, lora)
    _rewrite(bad, meta={**_meta(bad), "task": "regression"})
    code = f"BLOCKED = {blocked!r}\n" + BLOCKER + '''
import json, sys
from anymc3d.plugin_file import find_plugins, read_plugin_json, read_training_summary
from anymc3d.errors import PluginError
out, training = {}, {}
for path in find_plugins(sys.argv[1]):
    try:
        out[path.name] = read_plugin_json(path)
        training[path.name] = read_training_summary(path)
    except PluginError as exc:
        out[path.name] = str(exc)
assert not {"torch", "timm", "peft"} & set(sys.modules), sorted(sys.modules)
print(json.dumps([out, training]))
'''
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(anymc3d.__file__)))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, encoding="utf-8", env=env, check=False)
    assert done.returncode == 0, done.stderr
    listed, training = json.loads(done.stdout)
    assert sorted(listed) == ["bad.anymc3d", "one.anymc3d", "two"]
    # the training summary (the review page's model information) is read without torch too
    assert training == {"one.anymc3d": {"epochs_run": 3, "best_val_auroc": 0.75}, "two": None}
    assert listed["one.anymc3d"] == read_plugin_metadata(tmp_path / "one.anymc3d")  # same dict as the torch side
    assert listed["two"] == read_plugin_metadata(tmp_path / "two")
    assert "invalid plugin metadata at task" in listed["bad.anymc3d"] and "bad.anymc3d" in listed["bad.anymc3d"]


def test_intended_modality_and_body_part_are_optional_and_checked(tmp_path, made):
    """Stated: written and read back; not stated: absent from plugin.json (older readers still read the file);
    a code that is not a DICOM Modality code is refused with the field named."""
    _, config, head, lora = made
    plain = _meta(save_plugin(tmp_path / "plain.anymc3d", config, head, lora))
    assert "modality" not in plain and "body_part" not in plain
    config.modality, config.body_part = "MR", "brain"
    path = save_plugin(tmp_path / "mr.anymc3d", config, head, lora)
    assert (_meta(path)["modality"], _meta(path)["body_part"]) == ("MR", "brain")
    assert load_plugin(path).config.modality == "MR" and read_plugin_metadata(path)["body_part"] == "brain"
    _rewrite(path, meta={**_meta(path), "modality": "brain MRI"})
    with pytest.raises(PluginError, match="modality"):
        load_plugin(path)
    with pytest.raises(ValueError, match="modality"):
        PluginConfig(**{**{k: getattr(config, k) for k in ("name", "labels", "task", "backbone",
                                                          "backbone_fingerprint")}, "modality": "mri"})


@pytest.mark.parametrize("tamper", [
    lambda m: m.update(task="regression"), lambda m: m.pop("weights_sha256"), lambda m: m.update(name=""),
    lambda m: m.update(thresholds=[0.5, 1.0, 0.5]), lambda m: m.update(labels=[]), lambda m: m.update(extra=1),
    lambda m: m["lora"].update(rank=0), lambda m: m["lora"].update(alpha=0), lambda m: m["lora"].update(dropout=1.0),
    lambda m: m.update(backbone_fingerprint="ABC"), lambda m: m["backbone"].update(depth=None),
    lambda m: m.update(format_version=True), lambda m: m.update(calibration_a=["1"]), lambda m: None,
    lambda m: m.update(modality="CT", body_part="chest"), lambda m: m.update(modality="ct"),
    lambda m: m.update(body_part="x" * 201),
])
def test_hand_schema_checker_agrees_with_jsonschema(tmp_path, made, tamper):
    """Without jsonschema (a fresh Slicer) the contract's checker accepts and refuses exactly what jsonschema does."""
    import jsonschema

    from anymc3d.contract import RecordError, check_schema
    from anymc3d.plugin_file import plugin_schema

    _, config, head, lora = made
    meta = _meta(save_plugin(tmp_path / "p.anymc3d", config, head, lora))
    tamper(meta)
    try:
        jsonschema.validate(meta, plugin_schema())
        by_jsonschema = True
    except jsonschema.ValidationError:
        by_jsonschema = False
    try:
        check_schema(meta, plugin_schema(), "plugin.json")
        by_hand = True
    except RecordError:
        by_hand = False
    assert by_hand == by_jsonschema


def test_partial_and_hidden_plugins_are_not_listed(tmp_path, made):
    """A plugin being written (save_plugin's hidden ``.partial`` folder) is never offered as a plugin."""
    _, config, head, lora = made
    save_plugin(tmp_path / "one.anymc3d", config, head, lora)
    save_plugin(tmp_path / "two", config, head, lora)
    (tmp_path / "two").rename(tmp_path / ".two.x1y2.partial")
    (tmp_path / "one.anymc3d").rename(tmp_path / "three.partial.anymc3d")
    save_plugin(tmp_path / "four", config, head, lora)
    assert [p.name for p in find_plugins(tmp_path)] == ["four"]


@pytest.mark.parametrize("tamper,message", [
    (lambda m: m["lora"].update(rank=10 ** 6), "lora.rank is 1000000, lora."),
    (lambda m: m["lora"].update(rank=4), "lora.rank is 4, lora."),
    (lambda m: m["backbone"].update(embed_dim=10 ** 6), "backbone.embed_dim is 1000000, the head takes 96 features"),
    (lambda m: m["backbone"].update(depth=1), "backbone.depth is 1"),
    (lambda m: m["backbone"].update(name="dinov3_vits16"), "has 16-pixel patches"),
    (lambda m: m.update(views=["sag", "cor", "ax"], preprocessing=m["preprocessing"] + m["preprocessing"][:1]),
     "3 view(s) ['sag', 'cor', 'ax'], LoRA weights for view(s) ['0', '1']"),
])
def test_sizes_in_the_metadata_are_checked_against_the_tensors_before_anything_is_built(tmp_path, made, tamper,
                                                                                        message, monkeypatch):
    """An absurd or wrong size in plugin.json is a PluginError naming the file, raised before any module is built
    from the claim (peft would otherwise allocate a rank-10^6 adapter)."""
    import anymc3d.plugin as plugin_module

    _, config, head, lora = made
    path = save_plugin(tmp_path / "p.anymc3d", config, head, lora)
    meta = _meta(path)
    tamper(meta)
    _rewrite(path, meta=meta)
    built = []
    monkeypatch.setattr(plugin_module.TaskHead, "__init__", lambda *a, **k: built.append(a) or pytest.fail("built"))
    with pytest.raises(PluginError, match=r"p\.anymc3d: plugin.json does not match plugin.safetensors") as err:
        load_plugin(path)
    assert message in str(err.value) and "\n" not in str(err.value) and built == []
