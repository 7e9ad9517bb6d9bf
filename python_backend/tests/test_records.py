"""records.py: the records and heatmap files every runner writes, checked against the contract and against the
engine's own numbers; off-contract records are refused before anything is written."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from anymc3d.cases import InputCase, expand_inputs
from anymc3d.contract import RecordError, heatmap_name, validate_record
from anymc3d.engine import Engine
from anymc3d.records import error_record, read_records, write_heatmaps, write_record, write_records
from anymc3d.runner import predict_case


@pytest.fixture(scope="module")
def engine(demo_dir):
    engine = Engine(demo_dir / "backbone.safetensors", device="cpu")
    engine.add_plugin(demo_dir / "plugin.anymc3d")
    return engine


@pytest.fixture(scope="module")
def good(engine, demo_dir, tmp_path_factory):
    """A real record with a heatmap, and the engine's prediction it was built from."""
    heat = tmp_path_factory.mktemp("heat")
    (case,) = expand_inputs([str(demo_dir / "volume.nii.gz")])
    record = predict_case(engine, case, ["demo_findings"], heatmap_method="attention", heatmap_dir=heat)
    result = engine.predict_file(demo_dir / "volume.nii.gz", heatmap="attention")
    return record, result.predictions[0], heat


def test_a_result_record_is_valid_and_carries_the_engines_numbers(good, demo_dir):
    record, pred, heat = good
    assert validate_record(record) is record and record["status"] == "ok"
    assert record["image"] == str((demo_dir / "volume.nii.gz").resolve())
    (result,) = record["results"]
    np.testing.assert_array_equal([result["probabilities"][k] for k in pred.labels], pred.probabilities.astype(float))
    np.testing.assert_array_equal([result["probabilities_raw"][k] for k in pred.labels], pred.probabilities_raw.astype(float))
    assert result["decisions"] == {k: bool(p >= t) for (k, p), t in zip(result["probabilities"].items(), pred.thresholds)}
    np.testing.assert_allclose(result["slice_importance"], pred.importance_per_input_slice(), rtol=0, atol=0)
    assert result["heatmap"] == str(heat / heatmap_name("volume", "demo_findings", None, "nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(result["heatmap"])),
                                  sitk.GetArrayFromImage(pred.heatmap_image()))


def test_heatmap_file_names_come_from_the_contract(engine, demo_dir, tmp_path):
    result = engine.predict_file(demo_dir / "volume.nii.gz", heatmap="grad_last")
    files = write_heatmaps(result, tmp_path, "case 1", "nrrd")
    labels = result.predictions[0].labels
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(heatmap_name("case 1", "demo_findings", k, "nrrd")
                                                                for k in labels)
    top = labels[int(np.argmax(result.predictions[0].probabilities))]
    assert files["demo_findings"][None] == files["demo_findings"][top] == str(tmp_path / f"case 1__demo_findings__{top}.nrrd")


def test_records_round_trip_as_json_and_json_lines(good, tmp_path):
    record = good[0]
    records = [record, error_record("/data/bad.nii.gz", "/data/bad.nii.gz: is not\n a readable image file")]
    assert records[1]["error"] == "/data/bad.nii.gz: is not a readable image file"
    for name in ("r.json", "r.jsonl"):
        write_records(tmp_path / name, records)
        assert read_records(tmp_path / name) == records
    assert len((tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8")) == records
    write_record(tmp_path / "one.json", record)
    assert read_records(tmp_path / "one.json") == [record]


def _nan(r):
    r["results"][0]["probabilities"]["lesion"] = math.nan


def _above_one(r):
    r["results"][0]["probabilities"]["lesion"] = 1.5


def _decision_flipped(r):
    res = r["results"][0]
    res["decisions"]["lesion"] = not res["decisions"]["lesion"]


def _missing(r):
    del r["results"][0]["thresholds"]


def _missing_top(r):
    del r["num_slices"]


def _error_with_results(r):
    r["status"], r["error"], r["slicing_axis"], r["num_slices"] = "error", "x: failed", None, None


@pytest.mark.parametrize("spoil,words", [(_nan, "probabilit"), (_above_one, "1.5"), (_decision_flipped, "decisions"),
                                         (_missing, "thresholds"), (_missing_top, "num_slices"),
                                         (_error_with_results, "results")])
def test_an_off_contract_record_is_refused_and_nothing_is_written(good, tmp_path, spoil, words):
    record = copy.deepcopy(good[0])
    spoil(record)
    with pytest.raises(RecordError, match=words):
        validate_record(record)
    for name in ("r.json", "r.jsonl"):
        with pytest.raises(RecordError):
            write_records(tmp_path / name, [good[0], record])
    with pytest.raises(RecordError):
        write_record(tmp_path / "one.json", record)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a partial one


def test_a_case_that_fails_anywhere_becomes_its_error_record(engine, demo_dir, tmp_path, monkeypatch):
    """predict_case never raises for a bad case: reading, predicting and writing errors all give a one-line record."""
    (case,) = expand_inputs([str(demo_dir / "volume.nii.gz")])
    bad = InputCase(image="/x/y.nii.gz", views=[tmp_path / "y.nii.gz"], stem="y")
    record = predict_case(engine, bad, ["demo_findings"])
    assert record["status"] == "error" and "y.nii.gz: file or folder not found" in record["error"]
    import anymc3d.records as records_module

    def broken(*args, **kwargs):
        raise RuntimeError("disk\nfull")

    monkeypatch.setattr(records_module, "write_image_atomic", broken)
    record = predict_case(engine, case, ["demo_findings"], heatmap_method="attention", heatmap_dir=tmp_path)
    assert record["error"] == f"{case.image}: RuntimeError: disk full" and list(tmp_path.iterdir()) == []
