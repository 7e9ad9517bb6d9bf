"""Export to DICOM from the Slicer Logic: a result whose input came from the DICOM database gets its SR and Parametric
Map written by the backend's exporter and added to the database (Slicer's DICOMLib stand-in, slicer_standins/dicomlib.py),
where they sit under the source's patient and study; the objects pass dciodvfy and say what the result says."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from .slicer_standins import dicomlib

ROOT = Path(__file__).resolve().parents[1]


def _series_writer():
    spec = importlib.util.spec_from_file_location("dicom_series", ROOT / "python_backend" / "tests" / "dicom_series.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _loadFromDatabase(sceneContext, db, files, tmp_path):
    """What DICOMScalarVolumePlugin does: read the series with ITK, and set DICOM.instanceUIDs in slice order."""
    folder = str(Path(files[0]).parent)
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    ordered = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid)
    image = sitk.ReadImage(list(ordered))
    path = tmp_path / "loaded.nrrd"
    sitk.WriteImage(image, str(path))
    node = sceneContext.volumesLogic.AddArchetypeVolume(str(path), "CT 1 Müller", 0)
    node.SetAttribute("DICOM.instanceUIDs", " ".join(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
                                                      for f in ordered))
    return node, image


def _heatmapNode(sceneContext, image, tmp_path):
    values = np.random.default_rng(3).random(sitk.GetArrayFromImage(image).shape).astype(np.float32)
    heat = sitk.GetImageFromArray(values / values.max())
    heat.CopyInformation(image)
    sitk.WriteImage(heat, str(tmp_path / "heat.nrrd"))
    return sceneContext.volumesLogic.AddArchetypeVolume(str(tmp_path / "heat.nrrd"), "heatmap", 0), values / values.max()


def _record(demo, heatmapPath):
    labels = ["lesion", "effusion", "fracture"]
    probs = {"lesion": 0.7, "effusion": 0.3, "fracture": 0.51}
    return {"image": "/gone/run/input.nrrd", "status": "ok", "error": None, "slicing_axis": 2, "num_slices": 5, "results": [{
        "plugin": "demo_findings", "plugin_path": demo["plugin"], "task": "multilabel", "labels": labels,
        "probabilities": probs, "probabilities_raw": {"lesion": 0.6, "effusion": 0.35, "fracture": 0.5},
        "thresholds": {k: 0.5 for k in labels}, "decisions": {k: probs[k] >= 0.5 for k in labels}, "slicing_axis": 2,
        "slice_importance": [0.2] * 5, "heatmap_method": "attention", "heatmap": heatmapPath, "finding_heatmaps": {}}]}


@pytest.fixture
def exported(sceneContext, demo, tmp_path):
    from AnyMC3DSlicerLogic import AnyMC3DSlicerLogic
    from AnyMC3DSlicerLogic.logic import PredictionOutputs

    writer = _series_writer()
    writer.write_series(tmp_path / "pacs", np.random.default_rng(0).normal(0, 100, (5, 14, 16)).astype(np.int16),
                                patient_name="Müller^Jürgen", charset="ISO_IR 100")
    db = dicomlib.DICOMDatabase(tmp_path / "db")
    assert dicomlib.importDicom(str(tmp_path / "pacs"), db, copyFiles=True)
    shutil.rmtree(tmp_path / "pacs")  # the database's copies are the only source
    node, image = _loadFromDatabase(sceneContext, db, [db.fileForInstance(u) for u in db._images], tmp_path)
    heatNode, values = _heatmapNode(sceneContext, image, tmp_path)
    logic = AnyMC3DSlicerLogic(sceneContext.scene, backendCommand=[sys.executable, "-m", "anymc3d"],
                               volumesLogic=sceneContext.volumesLogic, tempRoot=str(tmp_path))
    outputs = PredictionOutputs(node, None, [heatNode], None, None, 0, _record(demo, "/gone/run/x__demo_findings.nrrd"))
    return {"logic": logic, "outputs": outputs, "db": db, "image": image, "values": values, "tmp": tmp_path}


@pytest.mark.slow
def test_export_adds_the_sr_and_map_under_the_sources_patient(exported):
    from anymc3d.dicom_out import read_report
    from AnyMC3DSlicerLogic.dicomexport import exportToDicom

    db, outputs = exported["db"], exported["outputs"]
    written = exportToDicom(exported["logic"], outputs, db, importer=dicomlib.importDicom)
    assert [w["sop_class_uid"] for w in written] == ["1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.30"]
    (patient,) = db.patients()  # the same patient: the objects copied the source's patient module
    (study,) = db.studiesForPatient(patient)
    assert len(db.seriesForStudy(study)) == 3  # source, SR, Parametric Map
    stored = [db.fileForInstance(w["sop_instance_uid"]) for w in written]
    assert all(stored) and all(s.startswith(db.databaseDirectory) for s in stored)
    for path in stored:
        run = __import__("subprocess").run([shutil.which("dciodvfy") or pytest.skip("no dciodvfy"), path],
                                           capture_output=True, text=True, encoding="utf-8", timeout=60)
        assert not [line for line in run.stderr.splitlines() if line.startswith("Error")], run.stderr
    report = read_report(stored[0])
    result = outputs.record["results"][0]
    assert report["patient"] == "Müller^Jürgen"
    assert [(f["finding"], f["probability"], f["decision"]) for f in report["findings"]] == [
        (k, pytest.approx(result["probabilities"][k], abs=1e-6), result["decisions"][k]) for k in result["labels"]]
    pm = pydicom.dcmread(stored[1])
    image = exported["image"]
    for frame in range(pm.NumberOfFrames):
        position = pm.PerFrameFunctionalGroupsSequence[frame].PlanePositionSequence[0].ImagePositionPatient
        k = round(image.TransformPhysicalPointToContinuousIndex([float(v) for v in position])[2])
        np.testing.assert_allclose(position, image.TransformIndexToPhysicalPoint((0, 0, k)), atol=1e-4)
        np.testing.assert_allclose(pm.pixel_array[frame], exported["values"][k], atol=1e-6)
    assert not list(Path(exported["tmp"]).glob("anymc3d-dicom-*"))  # the temporary folder is gone


@pytest.mark.slow
def test_an_input_not_from_the_database_or_a_failed_import_is_a_one_line_error(exported):
    from AnyMC3DSlicerLogic.dicomexport import DicomExportError, exportToDicom

    db, outputs = exported["db"], exported["outputs"]
    before = json.dumps([db.patients(), sorted(db._images)])
    outputs.inputNode.RemoveAttribute("DICOM.instanceUIDs")
    with pytest.raises(DicomExportError, match="not loaded from the DICOM database"):
        exportToDicom(exported["logic"], outputs, db, importer=dicomlib.importDicom)
    outputs.inputNode.SetAttribute("DICOM.instanceUIDs", " ".join(sorted(db._images)[:1]))
    with pytest.raises(DicomExportError, match="has 1 slices of 14x16, the predicted volume 5"):
        exportToDicom(exported["logic"], outputs, db, importer=dicomlib.importDicom)
    assert json.dumps([db.patients(), sorted(db._images)]) == before
    db.isOpen = False  # the indexer fails: importDicom logs and answers False
    outputs.inputNode.SetAttribute("DICOM.instanceUIDs", " ".join(db._images))
    with pytest.raises(DicomExportError, match="did not import the exported files"):
        exportToDicom(exported["logic"], outputs, db, importer=dicomlib.importDicom)
    assert not list(Path(exported["tmp"]).glob("anymc3d-dicom-*"))
