"""Case listing, the results convention and its confinement to FOLDER; the command line; the session's nodes are
the Logic's (no browser)."""

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from anymc3d_review.cases import CaseFolder, RecordError
from anymc3d_review.cli import DEFAULT_HOST, is_loopback, register


def copy_case(review_folder, tmp_path, with_results=True):
    folder = tmp_path / "f"
    folder.mkdir()
    shutil.copy(review_folder / "volume.nii.gz", folder / "volume.nii.gz")
    if with_results:
        records = json.loads((review_folder / "results" / "predictions.json").read_text(encoding="utf-8"))
        record = next(r for r in records if r["image"].endswith("/volume.nii.gz"))
        (folder / "results" / "heatmaps").mkdir(parents=True)
        for result in record["results"]:
            for label, path in result["finding_heatmaps"].items():
                target = folder / "results" / "heatmaps" / os.path.basename(path)
                shutil.copy(path, target)
                result["finding_heatmaps"][label] = str(target)
            result["heatmap"] = result["finding_heatmaps"][result["labels"][0]]
        record["image"] = str(folder / "volume.nii.gz")
        (folder / "results" / "volume.json").write_text(json.dumps([record]))
    return folder


def test_listing_and_results(review_folder):
    folder = CaseFolder(review_folder)
    assert [c.name for c in folder.cases] == ["control.nii.gz", "second.nii.gz", "volume.nii.gz"]
    assert [c.status for c in folder.cases] == ["none", "results", "results"]
    assert folder.case(2).record["image"] == str(review_folder / "volume.nii.gz")


def test_cases_only_by_index_or_listed_name(review_folder):
    folder = CaseFolder(review_folder)
    for bad in ("volume.nii.gz", "../etc/passwd", 3, -1, True, 1.0, None):
        with pytest.raises(RecordError):
            folder.case(bad)
    assert folder.index_of("volume.nii.gz") == 2
    for bad in ("../volume.nii.gz", str(review_folder / "volume.nii.gz"), "backbone.safetensors"):
        with pytest.raises(RecordError):
            folder.index_of(bad)


def test_symlink_out_of_the_folder_is_not_a_case(review_folder, tmp_path):
    folder = copy_case(review_folder, tmp_path, with_results=False)
    outside = tmp_path / "outside.nii.gz"
    shutil.copy(review_folder / "control.nii.gz", outside)
    os.symlink(outside, folder / "link.nii.gz")
    assert [c.name for c in CaseFolder(folder).cases] == ["volume.nii.gz"]


def test_results_naming_files_outside_the_folder_are_refused(review_folder, tmp_path):
    folder = copy_case(review_folder, tmp_path)
    assert CaseFolder(folder).case(0).status == "results"
    path = folder / "results" / "volume.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    outside = tmp_path / "outside.nii.gz"
    shutil.copy(record[0]["results"][0]["heatmap"], outside)
    record[0]["results"][0]["finding_heatmaps"]["lesion"] = str(outside)
    path.write_text(json.dumps(record))
    case = CaseFolder(folder).case(0)
    assert case.status == "error" and "outside the review folder" in case.error
    record[0]["results"][0]["finding_heatmaps"]["lesion"] = "results/heatmaps/x.nii.gz"
    path.write_text(json.dumps(record))
    assert "relative" in CaseFolder(folder).case(0).error


def test_newest_results_file_wins_and_failed_records_show_their_error(review_folder, tmp_path):
    folder = copy_case(review_folder, tmp_path)
    failed = [{"image": str(folder / "volume.nii.gz"), "status": "error", "error": "Cannot read the image",
               "slicing_axis": None, "num_slices": None, "results": []}]  # the contract's error record
    newer = folder / "results" / "zz_later.json"
    newer.write_text(json.dumps(failed))
    os.utime(newer, (os.path.getmtime(folder / "results" / "volume.json") + 10,) * 2)
    case = CaseFolder(folder).case(0)
    assert case.status == "error" and case.error == "Cannot read the image"


def test_session_nodes_are_the_logics(review_folder, tmp_path):
    """On a bare slicer-core scene: the table, heatmaps and references are those the Logic's importResults makes."""
    from anymc3d_review.session import ReviewSession, record_options
    from AnyMC3DSlicerLogic import outputs
    from trame_slicer.core import SlicerApp

    app = SlicerApp()
    folder = CaseFolder(review_folder)
    session = ReviewSession(app.scene, app.volumes_logic, app.app_logic.GetModuleLogic("VolumeRendering"), folder)
    loaded = session.show_case(2)
    table = loaded.table_node
    assert table.GetAttribute(outputs.ROLE_ATTRIBUTE) == "findings"
    record = folder.case(2).record
    labels = record["results"][0]["labels"]
    assert [row["finding"] for row in session.table_rows()] == labels
    assert [row["probability"] for row in session.table_rows()] == pytest.approx(
        [record["results"][0]["probabilities"][label] for label in labels])
    assert table.GetNumberOfNodeReferences(outputs.HEATMAP_REFERENCE) == len(labels)
    shown = session.select_finding(1)
    assert shown.GetID() == table.GetNthNodeReference(outputs.HEATMAP_REFERENCE, 1).GetID()
    with pytest.raises(RecordError):
        session.select_finding(7)
    # the Logic's own check refuses heatmaps outside the folder
    with pytest.raises(ValueError, match="outside"):
        session.logic.checkRecord(record, len(record["results"]), str(tmp_path), record_options(record))
    # switching away and back reuses the loaded nodes; the control case has no heatmap in the slice views
    session.show_case(0)
    composite = app.scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    assert all(not composite.GetItemAsObject(i).GetForegroundVolumeID() for i in range(composite.GetNumberOfItems()))
    assert session.show_case(2) is loaded


def test_command_line_defaults_to_loopback(caplog, monkeypatch, tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["review", str(tmp_path)])
    assert args.host == DEFAULT_HOST == "127.0.0.1" and args.plugin == [] and args.backbone is None
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")

    started = {}

    class FakeApp:
        def __init__(self, *a, **k):
            self.server = self
            self.controller = self
            self.on_server_ready = self
            self.closed = False
            from anymc3d_review.guard import AccessGuard

            self.guard = AccessGuard()

        def add(self, callback):
            self.ready = callback

        def start(self, **kwargs):
            started.update(kwargs)

        def close(self):
            started["closed"] = True

    import anymc3d_review.app as app_module

    monkeypatch.setattr(app_module, "ReviewApp", FakeApp)
    with caplog.at_level(logging.WARNING, logger="anymc3d.review"):
        assert args.handler(parser.parse_args(["review", str(tmp_path), "--host", "0.0.0.0"])) == 0
    assert started["host"] == "0.0.0.0" and "other machines" in caplog.text and started["closed"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anymc3d.review"):
        assert args.handler(args) == 0
    assert started["host"] == "127.0.0.1" and caplog.text == ""
    assert args.handler(parser.parse_args(["review", str(tmp_path), "--heatmap-method", "grad_last"])) == 0
    with pytest.raises(SystemExit):  # the contract's choices, not a copy
        parser.parse_args(["review", str(tmp_path), "--device", "tpu"])
    assert args.handler(parser.parse_args(["review", str(tmp_path), "--plugin", "p.anymc3d"])) == 2  # no backbone


def test_anymc3d_cli_has_the_review_command():
    from anymc3d.cli import _parser

    args = _parser().parse_args(["review", "somewhere", "--port", "9000"])
    assert args.port == 9000 and args.host == "127.0.0.1" and callable(args.handler)


def test_port_in_use_is_one_line_not_a_traceback(caplog, tmp_path):
    import socket

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="anymc3d.review"):
            code = parser.parse_args(["review", str(tmp_path), "--port", str(port)]).handler(
                parser.parse_args(["review", str(tmp_path), "--port", str(port)]))
    assert code == 2 and f"port {port}" in caplog.text and "in use" in caplog.text


def test_impossible_records_are_refused_with_the_field_named(review_folder, tmp_path):
    """NaN or out-of-range probabilities, a missing threshold, a decision that does not follow: the case shows
    an error from anymc3d.contract.validate_record instead of a table."""
    cases = {
        "nan": lambda r: r["results"][0]["probabilities"].__setitem__(r["results"][0]["labels"][0], float("nan")),
        "above one": lambda r: r["results"][0]["probabilities_raw"].__setitem__(r["results"][0]["labels"][0], 1.5),
        "no threshold": lambda r: r["results"][0]["thresholds"].pop(r["results"][0]["labels"][0]),
        "decision": lambda r: r["results"][0]["decisions"].__setitem__(
            r["results"][0]["labels"][0], not r["results"][0]["decisions"][r["results"][0]["labels"][0]]),
    }
    folder = copy_case(review_folder, tmp_path)
    path = folder / "results" / "volume.json"
    good = path.read_text(encoding="utf-8")
    assert CaseFolder(folder).case(0).status == "results"
    for name, spoil in cases.items():
        record = json.loads(good)
        spoil(record[0])
        path.write_text(json.dumps(record))
        case = CaseFolder(folder).case(0)
        assert case.status == "error" and "not a valid result record" in case.error, name
        assert "volume.json" in case.error and "results/0/" in case.error, (name, case.error)


def test_listing_truth_symlink_once_and_broken_results_files_named(review_folder, tmp_path):
    folder = copy_case(review_folder, tmp_path)
    os.symlink(folder / "volume.nii.gz", folder / "alias.nii.gz")
    (folder / "results" / "broken.json").write_text("{not json")
    (folder / "results" / ".partial-thing.json").write_text("[]")
    listing = CaseFolder(folder)
    assert [c.path.name for c in listing.cases] == ["volume.nii.gz"]
    assert len(listing.problems) == 1 and "broken.json" in listing.problems[0]


def test_run_outputs_never_overwrite(tmp_path):
    """The copy of a finished run into the results folder refuses to replace an existing file."""
    from types import SimpleNamespace

    from anymc3d_review.session import save_job_outputs

    job_dir = tmp_path / "job"
    (job_dir / "heatmaps").mkdir(parents=True)
    heatmap = job_dir / "heatmaps" / "case__p.nrrd"
    heatmap.write_bytes(b"new")
    (job_dir / "out.json").write_text(json.dumps([{"image": "x", "results": [{"heatmap": str(heatmap)}]}]))
    job = SimpleNamespace(jsonPath=str(job_dir / "out.json"), heatmapDir=str(job_dir / "heatmaps"))
    results = tmp_path / "results"
    (results / "heatmaps").mkdir(parents=True)
    (results / "case.json").write_text("old results")
    with pytest.raises(ValueError, match="never overwritten"):
        save_job_outputs(job, tmp_path, results / "case.json", results / "heatmaps")
    assert (results / "case.json").read_text(encoding="utf-8") == "old results"
    assert not (results / "heatmaps" / "case__p.nrrd").exists()  # all or nothing: no orphan heatmap
    (results / "heatmaps" / "case__p.nrrd").write_bytes(b"old map")
    with pytest.raises(ValueError, match="never overwritten"):
        save_job_outputs(job, tmp_path, results / "other.json", results / "heatmaps")
    assert (results / "heatmaps" / "case__p.nrrd").read_bytes() == b"old map"
    assert not (results / "other.json").exists()
    assert not [p for p in results.rglob("*") if ".partial" in p.name]


def test_review_modules_import_in_one_direction():
    """The command imports the app (lazily); the app and its modules never import the command (no import circle)."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "anymc3d_review"
    for name in ("app", "layout", "loader", "similarity", "quiet", "session"):
        tree = ast.parse((package / f"{name}.py").read_text(encoding="utf-8"))
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
        assert "cli" not in imported, f"{name}.py imports the command module"
    assert (package / "app.py").read_text(encoding="utf-8").count("\n") < 700  # was 1081 before the split


def test_heatmaps_and_masks_in_the_folder_are_not_cases(review_folder, tmp_path):
    """A folder holding images, their masks and heatmaps (as the demo's trained/ folder does) lists the images only:
    heatmaps named by a record, files named like the backend's heatmaps, and masks / heatmaps by name."""
    folder = copy_case(review_folder, tmp_path)
    record = json.loads((folder / "results" / "volume.json").read_text(encoding="utf-8"))[0]
    named = Path(record["results"][0]["heatmap"])
    moved = folder / "volume_probability.nii.gz"  # an unremarkable name: recognised only because a record names it
    shutil.copy(named, moved)
    record["results"][0]["heatmap"] = str(moved)
    (folder / "results" / "volume.json").write_text(json.dumps([record]))
    for name in ("volume_lesion.nii.gz", "volume_mask.nrrd", "volume_heatmap.nii.gz", "volume__demo__lesion.nrrd"):
        shutil.copy(review_folder / "control.nii.gz", folder / name)
    shutil.copy(review_folder / "control.nii.gz", folder / "case_two.nii.gz")  # a case, though it has a "_"
    listing = CaseFolder(folder)
    assert [c.name for c in listing.cases] == ["case_two.nii.gz", "volume.nii.gz"]
    assert any("5 heatmap or mask files" in p and "not cases" in p for p in listing.problems), listing.problems
    assert listing.cases[1].status == "results"


def test_missing_logic_is_one_line_with_the_install_command(tmp_path, caplog, monkeypatch):
    """Without the Logic package the command says which package and the command that installs it (no traceback)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "AnyMC3DSlicerLogic" else real(name, *a))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    with caplog.at_level(logging.ERROR, logger="anymc3d.review"):
        assert parser.parse_args(["review", str(tmp_path), "--port", "0"]).handler(
            parser.parse_args(["review", str(tmp_path), "--port", "0"])) == 2
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "AnyMC3DSlicerLogic" in line and "pip install -e Logic" in line and "\n" not in line


def test_missing_review_hint_names_the_working_command():
    from anymc3d.cli import EXTENSION_HINTS

    assert "pip install -e Logic -e WebReview" in EXTENSION_HINTS["review"]
