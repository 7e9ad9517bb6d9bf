"""The CLI contract (docs/cli-contract.md): the golden demo run, batches that go on past bad cases,
exit codes, JSON progress lines, and no half-written outputs."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from anymc3d.cli import main
from anymc3d.engine import Engine
from anymc3d.plugin import read_plugin_metadata
from anymc3d.synthetic import make_ct_volume, random_oblique_direction


def _predict(demo_dir, *extra):
    return ["predict", "--backbone", str(demo_dir / "backbone.safetensors"), "--plugin", str(demo_dir / "plugin.anymc3d"),
            "--device", "cpu", "--progress", "none", *map(str, extra)]


def _no_partial_files(folder):
    return not [p for p in folder.rglob("*") if ".partial" in p.name]


def test_golden_demo_run_as_a_user_would(demo_dir, tmp_path):
    """`python -m anymc3d predict` on the demo: JSON record, heatmap file in the input geometry, and
    probabilities equal to the engine's own."""
    out, heat = tmp_path / "results.json", tmp_path / "heatmaps"
    run = subprocess.run([sys.executable, "-m", "anymc3d", *_predict(demo_dir, demo_dir / "volume.nii.gz", "--heatmap",
                                                                      heat, "--json", out)],
                         capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert run.returncode == 0, run.stderr
    (record,) = json.loads(out.read_text(encoding="utf-8"))
    (result,) = record["results"]
    assert record["status"] == "ok" and record["slicing_axis"] == 2 and record["num_slices"] == 40
    assert result["labels"] == ["lesion", "effusion", "fracture"] and result["heatmap_method"] == "attention"
    assert np.isclose(sum(result["slice_importance"]), 1.0) and len(result["slice_importance"]) == 40
    volume = sitk.ReadImage(str(demo_dir / "volume.nii.gz"))
    heatmap = sitk.ReadImage(result["heatmap"])
    assert heatmap.GetSize() == volume.GetSize() and heatmap.GetSpacing() == volume.GetSpacing()
    assert heatmap.GetOrigin() == volume.GetOrigin() and heatmap.GetDirection() == volume.GetDirection()
    values = sitk.GetArrayFromImage(heatmap)
    assert values.dtype == np.float32 and values.min() >= 0
    assert values.max() == pytest.approx(1.0, abs=1e-6)  # max-normalised on the input grid
    engine = Engine(demo_dir / "backbone.safetensors", device="cpu")
    engine.add_plugin(demo_dir / "plugin.anymc3d")
    case = engine.predict_file(demo_dir / "volume.nii.gz", heatmap="attention")
    pred = case.predictions[0]
    assert np.allclose([result["probabilities"][k] for k in result["labels"]], pred.probabilities, atol=1e-6)
    assert result["decisions"] == {k: bool(p >= 0.5) for k, p in result["probabilities"].items()}
    expected = sitk.GetArrayFromImage(pred.heatmap_image())
    np.testing.assert_allclose(sitk.GetArrayFromImage(heatmap), expected, atol=1e-6)
    assert _no_partial_files(tmp_path)


def _write_bad_inputs(folder):
    """A corrupt file, a truncated gzip, 2D, 4D, NaN, zero spacing and a single slice, with the expected words."""
    good = make_ct_volume(size=(30, 30, 8), seed=1)
    arr = sitk.GetArrayFromImage(good)
    (folder / "corrupt.nii.gz").write_bytes(os.urandom(3000))
    sitk.WriteImage(good, str(folder / "full.nii.gz"))
    data = (folder / "full.nii.gz").read_bytes()
    (folder / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    (folder / "full.nii.gz").unlink()
    sitk.WriteImage(sitk.Image(30, 30, sitk.sitkFloat32), str(folder / "flat2d.nrrd"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 8, 30, 30), np.float32), isVector=False), str(folder / "time4d.nii.gz"))
    nan = arr.copy()
    nan[2, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(np.transpose(nan, (2, 1, 0)), np.eye(4)), str(folder / "nan.nii.gz"))
    (folder / "zero_spacing.mha").write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementSpacing = 0 1 1\n"
                                             "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n")
    with open(folder / "zero_spacing.mha", "ab") as f:
        f.write(np.zeros(64, np.float32).tobytes())
    single = sitk.GetImageFromArray(arr[:1])
    sitk.WriteImage(single, str(folder / "single.nii.gz"))
    return {"corrupt": "", "truncated": "truncated", "flat2d": "2D", "time4d": "4D", "nan": "NaN",
            "zero_spacing": "spacing", "single": "single slice"}


def test_a_batch_goes_on_past_bad_cases_and_names_each_problem(demo_dir, tmp_path, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    expected = _write_bad_inputs(cases)
    sitk.WriteImage(make_ct_volume(size=(48, 40, 10), spacing=(0.7, 0.9, 3.0), direction=random_oblique_direction(2),
                                   origin=(5.0, -3.0, 11.0), lesion=True, seed=3), str(cases / "good.nii.gz"))
    out, heat = tmp_path / "r.json", tmp_path / "heat"
    code = main(_predict(demo_dir, cases, "--heatmap", heat, "--json", out))
    assert code == 1
    records = {os.path.basename(r["image"]).split(".")[0]: r for r in json.loads(out.read_text(encoding="utf-8"))}
    assert set(records) == set(expected) | {"good"}
    assert records["good"]["status"] == "ok"
    for name, words in expected.items():
        record = records[name]
        assert record["status"] == "error" and record["results"] == []
        assert record["slicing_axis"] is None and record["num_slices"] is None and "\n" not in record["error"]
        assert name in record["error"] and words in record["error"], record["error"]
        assert "Traceback" not in record["error"]
    assert [p.name for p in heat.iterdir()] == ["good__demo_findings.nii.gz"]
    written = sitk.ReadImage(str(heat / "good__demo_findings.nii.gz"))
    good = sitk.ReadImage(str(cases / "good.nii.gz"))
    _assert_geometry(written, good, atol=1e-6)  # NIfTI stores the geometry in float32
    assert _no_partial_files(tmp_path)


def _assert_geometry(a, b, atol):
    assert a.GetSize() == b.GetSize()
    for get in ("GetOrigin", "GetSpacing", "GetDirection"):
        np.testing.assert_allclose(getattr(a, get)(), getattr(b, get)(), rtol=0, atol=atol, err_msg=get)


def test_nrrd_heatmap_of_an_oblique_anisotropic_input_keeps_its_geometry(demo_dir, tmp_path):
    image = make_ct_volume(size=(44, 38, 9), spacing=(0.7, 0.9, 3.0), direction=random_oblique_direction(7),
                           origin=(-20.5, 3.25, 41.0), seed=8)
    sitk.WriteImage(image, str(tmp_path / "oblique.nrrd"))
    assert main(_predict(demo_dir, tmp_path / "oblique.nrrd", "--heatmap", tmp_path / "h", "--heatmap-format", "nrrd",
                         "--json", tmp_path / "r.json")) == 0
    written = sitk.ReadImage(str(tmp_path / "h" / "oblique__demo_findings.nrrd"))
    _assert_geometry(written, sitk.ReadImage(str(tmp_path / "oblique.nrrd")), atol=1e-12)  # NRRD keeps doubles


def test_backbone_plugin_mismatch_is_a_usage_error(demo_dir, tmp_path, caplog):
    from anymc3d.demo import DEMO_SPEC, demo_backbone
    from anymc3d.backbone import save_backbone

    save_backbone(demo_backbone(seed=5), DEMO_SPEC, tmp_path / "other.safetensors")
    args = _predict(demo_dir, demo_dir / "volume.nii.gz", "--json", tmp_path / "r.json")
    args[args.index("--backbone") + 1] = str(tmp_path / "other.safetensors")
    assert main(args) == 2
    assert "plugin was made for backbone DINOv2-architecture demo, 6 blocks, width 192, random weights (weights" in caplog.text
    assert not (tmp_path / "r.json").exists()


def test_json_progress_lines_for_a_process_runner(demo_dir, tmp_path, capsys):
    args = _predict(demo_dir, demo_dir / "volume.nii.gz", tmp_path / "missing.nii.gz", "--json", tmp_path / "r.json",
                    "--chunk-size", "16", "--heatmap", tmp_path / "h")
    args[args.index("--progress") + 1] = "json"
    code = main(args)
    assert code == 1
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[0] == {"event": "start", "cases": 2}
    stages = [e["stage"] for e in events if e["event"] == "progress" and e["case"] == 0]
    assert stages == ["reading", "encoding", "encoding", "encoding", "encoding", "heatmap", "writing"]
    # done=0 when encoding starts (reading and preprocessing are over), then after each chunk of 16 slices
    assert [e["done"] for e in events if e["event"] == "progress" and e["stage"] == "encoding"] == [0, 16, 32, 40]
    done = [e for e in events if e["event"] == "case_done"]
    assert [d["status"] for d in done] == ["ok", "error"] and "missing.nii.gz" in done[1]["error"]
    assert events[-1] == {"event": "done", "ok": 1, "failed": 1, "json": str(tmp_path / "r.json")}


@pytest.mark.slow
def test_standby_runs_the_command_line_it_reads_on_stdin_as_if_given_directly(demo_dir, tmp_path):
    """``anymc3d standby`` (what the Slicer module keeps ready): the JSON line on stdin is run as ``main(argv)``
    would run it, in a new process: same exit code, same record and heatmap as a direct run; end of input is a
    quiet exit 0; anything but a JSON list of strings is a one-line usage error."""
    direct = _predict(demo_dir, demo_dir / "volume.nii.gz", "--json", tmp_path / "direct.json", "--heatmap", tmp_path / "hd")
    assert main(direct) == 0
    line = json.dumps(_predict(demo_dir, demo_dir / "volume.nii.gz", "--json", tmp_path / "standby.json",
                               "--heatmap", tmp_path / "hs")) + "\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(p) for p in sys.path if p]))

    def standby(text):
        return subprocess.run([sys.executable, "-m", "anymc3d", "standby"], input=text, capture_output=True, text=True, encoding="utf-8",
                              env=env, timeout=300)

    ran = standby(line)
    assert ran.returncode == 0, ran.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text(encoding="utf-8"))[0] for n in ("direct", "standby"))
    assert [r["probabilities"] for r in a["results"]] == [r["probabilities"] for r in b["results"]]
    maps = [sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("hd", "hs")]
    assert maps[0] == maps[1] and maps[0]
    assert np.array_equal(nib.load(tmp_path / "hd" / maps[0][0]).get_fdata(), nib.load(tmp_path / "hs" / maps[0][0]).get_fdata())
    quiet = standby("")
    assert quiet.returncode == 0 and quiet.stdout == ""
    for bad in ("not json\n", '["standby"]\n'):
        refused = standby(bad)
        assert refused.returncode == 2 and "standby: expected one JSON list" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr


def test_gradient_heatmaps_are_written_per_finding_and_an_ensemble_is_one_result(demo_dir, tmp_path):
    heat = tmp_path / "heat"
    args = _predict(demo_dir, demo_dir / "volume.nii.gz", "--heatmap", heat, "--heatmap-method", "grad_last",
                    "--heatmap-format", "nrrd", "--json", tmp_path / "r.json", "--ensemble", "--plugin",
                    demo_dir / "plugin.anymc3d")
    assert main(args) == 0
    (result,) = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))[0]["results"]
    assert result["plugin"] == "ensemble" and len(result["plugin_path"]) == 2
    assert sorted(p.name for p in heat.iterdir()) == [f"volume__ensemble__{k}.nrrd" for k in sorted(result["labels"])]
    top = max(result["probabilities"], key=result["probabilities"].get)
    assert result["heatmap"] == result["finding_heatmaps"][top]


def test_log_level_works_before_and_after_the_subcommand(tmp_path, caplog):
    """The level given (before or after the subcommand) is the one in force: `demo` logs each file it writes at
    INFO, so WARNING hides those lines and INFO shows them."""
    import logging

    logger = logging.getLogger("anymc3d")
    saved = logger.level
    try:
        for i, (args, level) in enumerate([(["--log-level", "WARNING", "demo"], logging.WARNING),
                                           (["demo", "--log-level", "INFO"], logging.INFO),
                                           (["--log-level", "INFO", "demo", "--log-level", "ERROR"], logging.ERROR)]):
            caplog.clear()
            folder = tmp_path / str(i)
            assert main([*args[:args.index("demo") + 1], str(folder), "--no-train", *args[args.index("demo") + 1:]]) == 0
            assert logger.getEffectiveLevel() == level
            wrote = [r for r in caplog.records if r.name == "anymc3d" and r.getMessage().startswith("wrote")]
            assert len(wrote) == (3 if level <= logging.INFO else 0), [r.getMessage() for r in wrote]
    finally:
        logger.setLevel(saved)


def test_info_prints_the_plugin_metadata(demo_dir, capsys):
    assert main(["info", str(demo_dir / "plugin.anymc3d"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == read_plugin_metadata(demo_dir / "plugin.anymc3d")
    assert main(["info", str(demo_dir / "plugin.anymc3d")]) == 0
    text = capsys.readouterr().out
    assert "lesion, effusion, fracture" in text
    lora = 3 * 14 * 14 * 8 + 8 * 192 + 6 * (192 * 8 + 8 * 576 + 192 * 8 + 8 * 192)  # demo: width 192, 6 blocks
    assert f"parameters   {lora + 192 + 192 * 3 + 3:,} ({lora:,} LoRA" in text
    assert "training     untrained (no training summary): its probabilities mean nothing" in text
    assert main(["info", str(demo_dir / "volume.nii.gz")]) == 2


def test_demo_files_are_complete_and_loadable(demo_dir):
    """Each demo file loads with the reader a user's run uses, and the plugin fits the backbone."""
    from anymc3d.backbone import load_backbone
    from anymc3d.plugin import load_plugin
    from anymc3d.image_reading import read_image

    assert {p.name for p in demo_dir.iterdir()} >= {"backbone.safetensors", "plugin.anymc3d", "volume.nii.gz"}
    with gzip.open(demo_dir / "volume.nii.gz") as f:
        assert f.read(4)  # a real gzip
    backbone = load_backbone(demo_dir / "backbone.safetensors")
    plugin = load_plugin(demo_dir / "plugin.anymc3d")
    assert plugin.config.backbone_fingerprint == backbone.fingerprint
    assert plugin.config.labels == ["lesion", "effusion", "fracture"]
    volume = read_image(demo_dir / "volume.nii.gz")
    assert volume.GetSize()[2] == 40 and sitk.GetArrayViewFromImage(volume).std() > 0
    engine = Engine(backbone, device="cpu")
    assert engine.add_plugin(plugin) == "demo_findings"


def test_a_command_from_another_package_is_found_by_entry_point(monkeypatch, caplog):
    """The web review registers `anymc3d review` from its own package, so the backend never imports Slicer."""
    import importlib.metadata as md

    calls = []

    def register(sub):
        p = sub.add_parser("review")
        p.add_argument("folder")
        p.set_defaults(handler=lambda args: calls.append(args.folder) or 0)

    class EP:
        name, value = "review", "tests:register"

        def load(self):
            return register

    monkeypatch.setattr(md, "entry_points", lambda group=None: [EP()] if group == "anymc3d.commands" else [])
    assert main(["review", "cases"]) == 0 and calls == ["cases"]
    monkeypatch.setattr(md, "entry_points", lambda group=None: [])
    assert main(["review", "cases"]) == 2
    assert "web review app is not installed" in caplog.text


def test_multi_view_case_joined_with_plus(demo_dir, tmp_path):
    from anymc3d.backbone import load_backbone
    from anymc3d.demo import random_plugin
    from anymc3d.plugin import save_plugin

    bb = load_backbone(demo_dir / "backbone.safetensors")
    config, head, lora = random_plugin(bb.model, bb.spec, name="two_views", views=("sag", "cor"))
    plugin = save_plugin(tmp_path / "mv.anymc3d", config, head, lora)
    sag, cor = tmp_path / "sag.nii.gz", tmp_path / "cor.nii.gz"
    sitk.WriteImage(make_ct_volume(size=(10, 40, 36), spacing=(3.0, 0.9, 0.9), seed=1), str(sag))
    sitk.WriteImage(make_ct_volume(size=(40, 10, 36), spacing=(0.9, 3.0, 0.9), seed=2), str(cor))
    args = _predict(demo_dir, f"{sag}+{cor}", "--json", tmp_path / "r.json", "--heatmap", tmp_path / "h", "--embedding")
    args[args.index("--plugin") + 1] = str(plugin)
    assert main(args) == 0
    (record,) = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    (result,) = record["results"]
    assert record["image"] == f"{sag}+{cor}" and record["slicing_axis"] == 0 and record["num_slices"] == 10
    assert len(result["embedding"]) == 192 and sitk.ReadImage(result["heatmap"]).GetSize() == (10, 40, 36)
    args[args.index("--embedding")] = "--ensemble"  # one view given to a two-view plugin: a clear case error
    args[args.index(f"{sag}+{cor}")] = str(sag)
    assert main(args) == 1
    assert "takes 2 view(s) ['sag', 'cor'], got 1" in json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))[0]["error"]


# ------------------------------------------------------------------------------------------ bad input (issue 11, part 3)
def _records(path):
    from anymc3d.contract import validate_records

    return validate_records(json.loads(path.read_text(encoding="utf-8")))


@pytest.mark.parametrize("make", ["empty", "no_images"])
def test_an_empty_folder_or_one_without_images_is_an_error_record(demo_dir, tmp_path, make):
    folder = tmp_path / make
    folder.mkdir()
    if make == "no_images":
        (folder / "notes.txt").write_text("x")
        (folder / "sub").mkdir()
    assert main(_predict(demo_dir, folder, "--json", tmp_path / "r.json")) == 1
    (record,) = _records(tmp_path / "r.json")
    assert record["status"] == "error" and record["image"] == str(folder)
    assert record["error"].startswith(f"{folder}: folder holds no images")


def test_a_symlink_loop_as_input_is_an_error_record_and_the_batch_goes_on(demo_dir, tmp_path):
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    args = _predict(demo_dir, tmp_path / "loop_a", demo_dir / "volume.nii.gz", "--json", tmp_path / "r.json")
    assert main(args) == 1
    loop, good = _records(tmp_path / "r.json")
    assert loop["error"] == f"{tmp_path / 'loop_a'}: is a symbolic link loop" and good["status"] == "ok"


def test_a_folder_holding_two_dicom_series_gives_one_case_per_series(demo_dir, tmp_path):
    from test_preprocessing import _write_dicom_series

    large = sitk.Cast(make_ct_volume(size=(20, 20, 5), spacing=(1.0, 1.0, 2.0), seed=1), sitk.sitkInt16)
    small = sitk.Cast(make_ct_volume(size=(16, 16, 3), spacing=(1.0, 1.0, 3.0), seed=2), sitk.sitkInt16)
    _write_dicom_series(small, tmp_path / "mixed", series_number=1, prefix="a")
    _write_dicom_series(large, tmp_path / "mixed", series_number=2, prefix="b")
    heat = tmp_path / "heat"
    assert main(_predict(demo_dir, tmp_path / "mixed", "--json", tmp_path / "r.json", "--heatmap", heat)) == 0
    first, second = _records(tmp_path / "r.json")
    assert first["image"] == second["image"] == str(tmp_path / "mixed")
    assert first["series"] != second["series"]
    assert (first["num_slices"], second["num_slices"]) == (5, 3)  # largest series first, neither merged nor dropped
    assert sitk.ReadImage(first["results"][0]["heatmap"]).GetSize() == (20, 20, 5)
    assert sitk.ReadImage(second["results"][0]["heatmap"]).GetSize() == (16, 16, 3)
    assert sorted(p.name for p in heat.iterdir()) == ["mixed_s1__demo_findings.nii.gz", "mixed_s2__demo_findings.nii.gz"]


def test_a_large_mixed_batch_keeps_every_good_result_and_names_every_bad_path(demo_dir, tmp_path):
    """Tens of paths on the command line: good images, corrupt, truncated, dangling links, a loop, a missing file and a
    folder with broken links inside. Every good image gets its record and heatmap; every bad path an error record."""
    good, bad = [], {}
    for i in range(8):
        path = tmp_path / f"good{i}.nii.gz"
        sitk.WriteImage(make_ct_volume(size=(24, 24, 4 + i % 3), seed=i), str(path))
        good.append(path)
    data = good[0].read_bytes()
    for i in range(6):
        (tmp_path / f"corrupt{i}.nii.gz").write_bytes(os.urandom(500 + i))
        bad[tmp_path / f"corrupt{i}.nii.gz"] = "not a readable image file"
        (tmp_path / f"truncated{i}.nii.gz").write_bytes(data[: len(data) // (2 + i)])
        bad[tmp_path / f"truncated{i}.nii.gz"] = "truncated"
        (tmp_path / f"dangling{i}.nii.gz").symlink_to(tmp_path / f"gone{i}.nii.gz")
        bad[tmp_path / f"dangling{i}.nii.gz"] = "is a dangling symbolic link"
    (tmp_path / "loop.nii.gz").symlink_to(tmp_path / "loop.nii.gz")
    bad[tmp_path / "loop.nii.gz"] = "is a symbolic link loop"
    bad[tmp_path / "missing.nii.gz"] = "file or folder not found"
    inner = tmp_path / "folder"
    inner.mkdir()
    sitk.WriteImage(make_ct_volume(size=(24, 24, 5), seed=20), str(inner / "inner_good.nii.gz"))
    (inner / "inner_dangling.nii.gz").symlink_to(inner / "nothing.nii.gz")
    (inner / "inner_loop").symlink_to(inner / "inner_loop")
    bad[inner / "inner_dangling.nii.gz"] = "is a dangling symbolic link"
    bad[inner / "inner_loop"] = "is a symbolic link loop"
    paths = [*good, *[p for p in bad if p.parent == tmp_path]]
    order = np.random.default_rng(0).permutation(len(paths))
    paths = [paths[i] for i in order] + [inner]
    assert len(paths) >= 25  # tens of paths
    heat = tmp_path / "heat"
    assert main(_predict(demo_dir, *paths, "--json", tmp_path / "r.json", "--heatmap", heat)) == 1
    records = _records(tmp_path / "r.json")
    by_image = {r["image"]: r for r in records}
    assert len(records) == len(by_image) == len(good) + len(bad) + 1
    for path in [*good, inner / "inner_good.nii.gz"]:
        record = by_image[str(path)]
        assert record["status"] == "ok"
        assert sitk.ReadImage(record["results"][0]["heatmap"]).GetSize() == sitk.ReadImage(str(path)).GetSize()
    for path, words in bad.items():
        record = by_image[str(path)]
        assert record["status"] == "error" and record["error"].startswith(f"{path}: "), record["error"]
        assert words in record["error"] and "Traceback" not in record["error"], record["error"]
    assert len(list(heat.iterdir())) == len(good) + 1 and _no_partial_files(tmp_path)


@pytest.mark.parametrize("flag,value", [("--chunk-size", "0"), ("--chunk-size", "-3"), ("--chunk-size", "many"),
                                        ("--workers", "0"), ("--num-gpus-per-worker", "-1"),
                                        ("--num-gpus-per-worker", "nan"), ("--heatmap-method", "magic"),
                                        ("--device", "tpu"), ("--heatmap-format", "png")])
def test_a_bad_flag_value_is_a_usage_error(demo_dir, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_:
        main(_predict(demo_dir, demo_dir / "volume.nii.gz", flag, value))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "Traceback" not in err


def test_an_output_path_that_cannot_be_used_is_a_usage_error(demo_dir, tmp_path, caplog):
    (tmp_path / "file").write_text("x")
    assert main(_predict(demo_dir, demo_dir / "volume.nii.gz", "--heatmap", tmp_path / "file")) == 2
    assert f"{tmp_path / 'file'}: cannot be used as the --heatmap folder" in caplog.text
    assert main(_predict(demo_dir, demo_dir / "volume.nii.gz", "--json", tmp_path)) == 2
    assert "--json names a folder" in caplog.text


def test_a_manifest_csv_lists_cases_relative_to_itself(demo_dir, tmp_path):
    """The training manifest's format as INPUTS: an `image` column, paths relative to the CSV; a bad row or a
    manifest without the column is an error record naming it."""
    archive = tmp_path / "archive"
    (archive / "ct").mkdir(parents=True)
    sitk.WriteImage(make_ct_volume(size=(24, 24, 5), seed=2), str(archive / "ct" / "p1.nii.gz"))
    (archive / "list.csv").write_text("image,label\nct/p1.nii.gz,1\nct/p2.nii.gz,0\n")
    (tmp_path / "wrong.csv").write_text("path\nct/p1.nii.gz\n")
    assert main(_predict(demo_dir, archive / "list.csv", tmp_path / "wrong.csv", "--json", tmp_path / "r.json")) == 1
    good, missing, wrong = _records(tmp_path / "r.json")
    assert good["status"] == "ok" and good["image"] == str(archive / "ct" / "p1.nii.gz")
    assert missing["error"] == f"{archive / 'list.csv'}: line 3: image {archive / 'ct' / 'p2.nii.gz'}: file or folder not found"
    assert wrong["image"] == str(tmp_path / "wrong.csv") and "no 'image' (or 'image_<view>') column" in wrong["error"]


def test_ray_options_without_ray_are_a_usage_error(demo_dir, tmp_path, caplog):
    assert main(_predict(demo_dir, demo_dir / "volume.nii.gz", "--resume", "--workers", "2")) == 2
    assert "--workers, --resume: only with --ray" in caplog.text


def test_a_plugin_claiming_an_absurd_lora_rank_is_a_one_line_usage_error(demo_dir, tmp_path, caplog, capsys):
    import zipfile

    from anymc3d.plugin_file import JSON_NAME, WEIGHTS_NAME

    with zipfile.ZipFile(demo_dir / "plugin.anymc3d") as zf:
        meta, weights = json.loads(zf.read(JSON_NAME)), zf.read(WEIGHTS_NAME)
    meta["lora"]["rank"] = 10 ** 6
    with zipfile.ZipFile(tmp_path / "huge.anymc3d", "w") as zf:
        zf.writestr(JSON_NAME, json.dumps(meta))
        zf.writestr(WEIGHTS_NAME, weights)
    args = _predict(demo_dir, demo_dir / "volume.nii.gz", "--json", tmp_path / "r.json")
    args[args.index("--plugin") + 1] = str(tmp_path / "huge.anymc3d")
    assert main(args) == 2
    (message,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert message.startswith(f"{tmp_path / 'huge.anymc3d'}: plugin.json does not match plugin.safetensors: "
                              "lora.rank is 1000000")
    assert "Traceback" not in capsys.readouterr().err and not (tmp_path / "r.json").exists()
