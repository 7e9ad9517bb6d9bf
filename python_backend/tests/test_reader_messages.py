"""Messages a new user meets: a plugin given as the backbone, an image that does not fit the plugin's modality
(stderr and the record, the review page's rule), and a demo backbone named for what it is."""

import json
import logging

import pytest
import SimpleITK as sitk

from anymc3d.cli import main
from anymc3d.contract import backbone_description
from anymc3d.intensity import CT_MINIMUM_HU
from anymc3d.modality import modality_mismatch


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from anymc3d.demo import write_demo

    folder = tmp_path_factory.mktemp("demo")
    write_demo(folder)
    return folder


def predict(demo, image, tmp_path, caplog, *extra):
    out = tmp_path / f"{image.name}.json"
    with caplog.at_level(logging.WARNING):
        code = main(["predict", str(image), "--backbone", str(demo / "backbone.safetensors"), "--plugin",
                     str(demo / "plugin.anymc3d"), "--json", str(out), "--progress", "none", "--device", "cpu", *extra])
    return code, out


def test_plugin_given_as_backbone_says_use_plugin(demo, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        code = main(["predict", str(demo / "volume.nii.gz"), "--backbone", str(demo / "plugin.anymc3d"),
                     "--plugin", str(demo / "plugin.anymc3d"), "--json", str(tmp_path / "r.json"),
                     "--progress", "none", "--device", "cpu"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1, errors
    assert "this is a plugin file: use --plugin" in errors[0] and "inline_container" not in errors[0]


def test_mri_under_a_ct_plugin_warns_on_stderr_and_in_the_record(demo, tmp_path, caplog):
    ct = sitk.ReadImage(str(demo / "volume.nii.gz"))
    mri = sitk.Cast(sitk.RescaleIntensity(ct, 0, 800), sitk.sitkFloat32)  # a magnitude image: nothing below 0
    sitk.WriteImage(mri, str(tmp_path / "mri.nii.gz"))
    code, out = predict(demo, tmp_path / "mri.nii.gz", tmp_path, caplog)
    assert code == 0
    (record,) = json.loads(out.read_text(encoding="utf-8"))
    (warning,) = record["results"][0]["warnings"]
    assert "meant for CT" in warning and "lowest value is 0" in warning
    assert any(warning in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    # the page's rule, applied by hand to the same numbers, says the same
    assert modality_mismatch(record["results"][0]["plugin"], "CT", "", "", 0.0) == warning

    caplog.clear()
    code, out = predict(demo, demo / "volume.nii.gz", tmp_path, caplog)  # the demo CT (air at -1000 HU): no warning
    (record,) = json.loads(out.read_text(encoding="utf-8"))
    assert code == 0 and "warnings" not in record["results"][0]
    assert float(sitk.GetArrayViewFromImage(ct).min()) <= CT_MINIMUM_HU


def test_demo_backbone_is_named_for_what_it_is(demo, tmp_path, capsys, caplog):
    from anymc3d.demo import TRAIN_DEMO_SPEC

    assert backbone_description(TRAIN_DEMO_SPEC.to_dict()) == \
        "DINOv2-architecture demo, 3 blocks, width 96, random weights"
    assert backbone_description({"name": "dinov2_vits14_reg", "img_size": 224}) == "dinov2_vits14_reg"
    assert main(["info", str(demo / "plugin.anymc3d")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("backbone"))
    assert "DINOv2-architecture demo, 6 blocks, width 192, random weights" in line and "dinov2_vits14_reg" not in line

    from anymc3d.backbone import create_backbone, make_load_bearing, save_backbone
    from anymc3d.demo import DEMO_SPEC

    other = tmp_path / "other.safetensors"  # same architecture, other weights: the plugin does not fit
    save_backbone(make_load_bearing(create_backbone(DEMO_SPEC), seed=5), DEMO_SPEC, other)
    with caplog.at_level(logging.ERROR):
        code = main(["predict", str(demo / "volume.nii.gz"), "--backbone", str(other), "--plugin",
                     str(demo / "plugin.anymc3d"), "--json", str(tmp_path / "m.json"), "--progress", "none"])
    text = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    if code == 2:  # refused before any case ran
        assert "DINOv2-architecture demo, 6 blocks, width 192, random weights" in text, text
    else:  # or the case's error record carries it
        (record,) = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
        assert "DINOv2-architecture demo, 6 blocks, width 192, random weights" in record["error"]
