"""The one manifest reader (anymc3d.data.load_manifest): every command that takes a manifest (predict, its Ray path,
train, eval, fit-lifted) names a bad row with the same words and the same number, the row's line in the file (the
header is line 1)."""
from __future__ import annotations

import json
import logging

import pytest
import SimpleITK as sitk

from anymc3d.cli import main
from anymc3d.data import ManifestError, load_manifest
from anymc3d.synthetic import make_ct_volume


def _bad_manifest(folder):
    """A manifest with the demo plugin's labels: a good row on line 2, a row naming a missing image on line 3."""
    folder.mkdir(exist_ok=True)
    sitk.WriteImage(make_ct_volume(size=(24, 24, 5), seed=1), str(folder / "good.nii.gz"))
    path = folder / "cases.csv"
    path.write_text("image,lesion,effusion,fracture,split\ngood.nii.gz,1,0,0,train\nmissing.nii.gz,0,1,0,val\n")
    return path, f"line 3: image {folder / 'missing.nii.gz'}: file or folder not found"


def _logged(caplog, argv) -> str:
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    return caplog.text


def _predicted(demo_dir, manifest, out, *extra) -> list[dict]:
    assert main(["predict", str(manifest), "--backbone", str(demo_dir / "backbone.safetensors"), "--plugin",
                 str(demo_dir / "plugin.anymc3d"), "--device", "cpu", "--progress", "none", "--json", str(out),
                 *extra]) == 1
    return json.loads(out.read_text(encoding="utf-8"))


def test_every_command_names_the_same_bad_row_the_same_way(demo_dir, tmp_path, caplog):
    manifest, problem = _bad_manifest(tmp_path / "data")
    backbone, plugin = demo_dir / "backbone.safetensors", demo_dir / "plugin.anymc3d"
    messages = {
        "train": _logged(caplog, ["train", str(manifest), "--backbone", str(backbone),
                                  "--out", str(tmp_path / "t.anymc3d"), "--no-progress"]),
        "eval": _logged(caplog, ["eval", str(manifest), "--backbone", str(backbone), "--plugin", str(plugin),
                                 "--out", str(tmp_path / "ev")]),
        "fit-lifted": _logged(caplog, ["fit-lifted", str(manifest), "--backbone", str(backbone),
                                       "--out", str(tmp_path / "f.anymc3d")]),
    }
    good, bad = _predicted(demo_dir, manifest, tmp_path / "records.json")
    messages["predict"] = bad["error"]
    for command, text in messages.items():
        assert f"{manifest}:" in text and problem in text, (command, text)
    assert bad["error"] == f"{manifest}: {problem}"  # the bad row's record; the good row went on
    assert good["status"] == "ok" and good["image"] == str(tmp_path / "data" / "good.nii.gz")
    assert not any((tmp_path / name).exists() for name in ("t.anymc3d", "ev", "f.anymc3d"))


def test_lines_are_lines_of_the_file(tmp_path):
    """A blank line and a quoted cell spanning two lines do not shift the number a message gives."""
    sitk.WriteImage(make_ct_volume(size=(24, 24, 5), seed=1), str(tmp_path / "a.nii.gz"))
    (tmp_path / "m.csv").write_text('image,lesion,note\na.nii.gz,1,"two\nlines"\n\na.nii.gz,yes,x\n')
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path / "m.csv", labels=["lesion"])
    assert info.value.problems == ["line 5: label lesion must be 0 or 1, got 'yes'"]


def test_multi_view_columns_are_the_views_of_a_predict_case(tmp_path):
    """predict reads the manifest's image columns only: `image_<view>` columns are a case's views, in order."""
    from anymc3d.cases import expand_inputs

    for name in ("a.nii.gz", "b.nii.gz"):
        sitk.WriteImage(make_ct_volume(size=(24, 24, 5), seed=1), str(tmp_path / name))
    (tmp_path / "m.csv").write_text("image_ax,image_cor,anything\na.nii.gz,b.nii.gz,not a label\n")
    (case,) = expand_inputs([str(tmp_path / "m.csv")])
    assert case.error is None and case.views == [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]
    assert case.image == f"{tmp_path / 'a.nii.gz'}+{tmp_path / 'b.nii.gz'}"


@pytest.mark.slow
def test_the_ray_path_names_the_bad_row_as_the_local_run(demo_dir, tmp_path):
    ray = pytest.importorskip("ray")
    manifest, problem = _bad_manifest(tmp_path / "data")
    local = _predicted(demo_dir, manifest, tmp_path / "local.json")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = _predicted(demo_dir, manifest, tmp_path / "ray.json", "--ray", "--workers", "1",
                            "--cpus-per-worker", "0.5")
    finally:
        ray.shutdown()
    assert [r["error"] for r in remote] == [r["error"] for r in local] == [None, f"{manifest}: {problem}"]
