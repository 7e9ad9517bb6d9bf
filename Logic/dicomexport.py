"""Export to DICOM: the SR and Parametric Maps of a prediction whose input came from Slicer's DICOM database,
written by the backend's exporter and added to the database, so they show in the DICOM browser under the patient.

The input volume's ``DICOM.instanceUIDs`` attribute (set by Slicer's DICOMScalarVolumePlugin when it loads a series)
names the source instances; the database gives their files. The source files are linked (or copied) into a fresh
temporary folder, the heatmap nodes written beside them, and ``python -m anymc3d.dicom_out`` (the same exporter as
``anymc3d predict --dicom``, in its own process: it imports SimpleITK and highdicom, never into Slicer's) writes the
objects; ``DICOMUtils.importDicom(folder, db, copyFiles=True)`` then adds them, and each written instance is looked
up in the database before the export counts as done. The temporary folder is removed whatever the outcome.
"""

import json
import os
import shutil
import subprocess
import tempfile

from anymc3d.contract import heatmap_name, safe_name

#: set by Slicer's DICOMScalarVolumePlugin on a volume loaded from the database: its instance UIDs, space-separated
INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"
EXPORTER_MODULE = "anymc3d.dicom_out"


class DicomExportError(Exception):
    """An export that cannot be done or did not complete; the message is one line for the status bar."""


def sourceFiles(volumeNode, dicomDatabase):
    """The database files of the volume's DICOM instances; raises DicomExportError when it has none."""
    uids = (volumeNode.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or "").split()
    if not uids:
        raise DicomExportError(f"{volumeNode.GetName()}: not loaded from the DICOM database (no {INSTANCE_UIDS_ATTRIBUTE}); "
                               "only such inputs can be exported to DICOM")
    files = [dicomDatabase.fileForInstance(uid) for uid in uids]
    missing = [uid for uid, path in zip(uids, files) if not path or not os.path.isfile(path)]
    if missing:
        raise DicomExportError(f"{volumeNode.GetName()}: {len(missing)} of its DICOM instances are not in the database "
                               f"(first: {missing[0]})")
    return files


def recordHeatmaps(record):
    """The record's heatmap files in the order the Logic imported them as nodes (``PredictionOutputs.heatmapNodes``):
    per result, its per-finding maps, else its one map."""
    paths = []
    for result in record["results"]:
        paths += list(result["finding_heatmaps"].values()) or ([result["heatmap"]] if result.get("heatmap") else [])
    return paths


def _linkOrCopy(source, target):
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def prepareExport(logic, outputs, dicomDatabase, folder):
    """Write what the exporter reads into ``folder``: ``source/`` (the series), the heatmaps, ``record.json``."""
    stem = safe_name(outputs.inputNode.GetName()) or "volume"
    sourceDir = os.path.join(folder, "source")
    os.mkdir(sourceDir)
    for index, path in enumerate(sourceFiles(outputs.inputNode, dicomDatabase)):
        _linkOrCopy(path, os.path.join(sourceDir, f"{index:05d}.dcm"))
    record = json.loads(json.dumps(outputs.record))
    record["image"] = sourceDir
    record.pop("series", None)
    old = recordHeatmaps(record)
    if len(old) != len(outputs.heatmapNodes):
        raise DicomExportError(f"{outputs.inputNode.GetName()}: {len(outputs.heatmapNodes)} heatmap nodes for "
                               f"{len(old)} heatmaps of the result")
    renamed = {}
    for result in record["results"]:
        for label, path in [*result["finding_heatmaps"].items(), *([(None, result["heatmap"])]
                                                                  if not result["finding_heatmaps"] else [])]:
            if path:
                renamed[path] = os.path.join(folder, heatmap_name(stem, result["plugin"], label, "nrrd"))
    for path, node in zip(old, outputs.heatmapNodes):
        if node.GetImageData() is None:
            raise DicomExportError(f"{node.GetName()}: the heatmap is not loaded yet; show it once, then export")
        logic.writeInputVolume(node, renamed[path])
    for result in record["results"]:
        result["heatmap"] = renamed.get(result["heatmap"]) if result.get("heatmap") else None
        result["finding_heatmaps"] = {k: renamed[v] for k, v in result["finding_heatmaps"].items()}
    recordPath = os.path.join(folder, "record.json")
    with open(recordPath, "w", encoding="utf-8") as f:
        json.dump(record, f)
    return recordPath, stem


def runExporter(python, recordPath, outDir, stem, timeout=600):
    """``python -m anymc3d.dicom_out``: the written objects as its JSON list; DicomExportError with its message."""
    command = [python, "-m", EXPORTER_MODULE, recordPath, "--out", outDir, "--stem", stem]
    try:
        run = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace",
                             timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise DicomExportError(f"the DICOM exporter could not run ({error})") from None
    if run.returncode != 0:
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        raise DicomExportError(lines[-1] if lines else f"the DICOM exporter failed (exit code {run.returncode})")
    return json.loads(run.stdout.strip().splitlines()[-1])


def defaultImporter(folder, dicomDatabase, copyFiles):
    """Slicer's own import: DICOMLib.DICOMUtils.importDicom (a ctkDICOMIndexer over the folder)."""
    from DICOMLib import DICOMUtils

    return DICOMUtils.importDicom(folder, dicomDatabase, copyFiles=copyFiles)


def exportToDicom(logic, outputs, dicomDatabase, python=None, importer=None, keepFolder=None):
    """Write the SR and Parametric Maps of ``outputs`` (a ``PredictionOutputs``) and add them to ``dicomDatabase``.

    Args:
        logic: the AnyMC3DSlicerLogic (its ``writeInputVolume`` writes the heatmap nodes, its ``tempRoot`` holds
            the temporary folder).
        python: the interpreter that runs the exporter (default: the backend's, PythonSlicer in Slicer).
        importer: ``importer(folder, db, copyFiles) -> bool`` (default: DICOMUtils.importDicom); called with
            ``copyFiles=True``: the database keeps its own copies, the temporary folder goes.
        keepFolder: also keep the written files in this folder (``<folder>/<case>/``); default: only in the database.

    Returns the exporter's list of written objects (path, SOP instance / class UID, series UID).
    Raises DicomExportError (one line); the database is then unchanged unless the import itself half-failed.
    """
    python = python or logic.backendCommand[0]
    importer = importer or defaultImporter
    folder = tempfile.mkdtemp(prefix="anymc3d-dicom-", dir=getattr(logic, "tempRoot", None))
    try:
        recordPath, stem = prepareExport(logic, outputs, dicomDatabase, folder)
        outDir = keepFolder or os.path.join(folder, "out")
        written = runExporter(python, recordPath, outDir, stem)
        caseFolder = os.path.dirname(written[0]["path"])
        if not importer(caseFolder, dicomDatabase, copyFiles=True):
            raise DicomExportError(f"{caseFolder}: the DICOM database did not import the exported files")
        absent = [w["sop_instance_uid"] for w in written if not dicomDatabase.fileForInstance(w["sop_instance_uid"])]
        if absent:
            raise DicomExportError(f"{len(absent)} exported objects are not in the DICOM database after the import")
        return written
    finally:
        shutil.rmtree(folder, ignore_errors=True)
