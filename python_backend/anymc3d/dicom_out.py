"""Results back into the hospital as DICOM: a TID 1500 Measurement Report and a Parametric Map per heatmap.

For a case whose input is a DICOM series, :func:`export_record` writes under ``DIR/<case>/``:

- ``sr.dcm``: a Comprehensive 3D SR (highdicom ``MeasurementReport``, TID 1500), one measurement group
  (TID 1501) per plugin and finding: the calibrated probability (DCM 122157 "Probability", unit UCUM ``1``),
  the raw probability and the threshold (project codes), the decision (SCT Present / Absent), the finding as a
  coded concept and the algorithm identification (TID 4019: plugin, backbone and its weights' SHA-256, anymc3d);
  the source images in the image library and the evidence; patient and study copied from the source.
- ``pm__<plugin>[__<finding>].dcm``: one Parametric Map per heatmap file of the record, float32 voxels equal to
  the file's, on the source's frame of reference and slice positions, with a Real World Value Mapping that says
  the values are relative attention (per-case maximum 1), referencing the source images and the SR.

Codes without a standard equivalent are in the project's private scheme :data:`SCHEME` (docs/dicom.md). Every
file is written under a temporary name and renamed when all of the case's objects are complete. A series that
cannot carry them (no Frame of Reference, geometry that does not match what was predicted on) is an
:class:`InputError` naming the series; nothing is written for it.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from anymc3d import __version__
from anymc3d.contract import STATUS_OK, image_stem, safe_name
from anymc3d.dicom_source import NO_FRAME_OF_REFERENCE, SourceSeries, check_geometry, read_source
from anymc3d.errors import InputError
from anymc3d.fileio import atomic_path

logger = logging.getLogger(__name__)

#: the project's private coding scheme designator (DICOM PS3.16 8.2: private schemes start with "99")
SCHEME = "99ANYMC3D"
RESEARCH_NOTE = "Research use only, not for diagnostic use."
SR_NAME = "sr.dcm"
PM_PREFIX = "pm__"
SR_SERIES_NUMBER, PM_SERIES_NUMBER = 9901, 9902
MANUFACTURER = "AnyMC3D project"


def _codes():
    """The coded concepts of the report (imported here: highdicom is an optional extra)."""
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    private = {key: CodedConcept(key, SCHEME, meaning) for key, meaning in (
        ("RAWPROB", "Uncalibrated probability"), ("THRESHOLD", "Decision threshold"),
        ("DECISION", "Decision at threshold"), ("ATTENTION", "Relative attention"))}
    return {"probability": codes.DCM.Probability, "unit": codes.UCUM.NoUnits, "present": codes.SCT.Present,
            "absent": codes.SCT.Absent, **{k.lower(): v for k, v in private.items()}}


def finding_code(label: str):
    """A finding's coded concept: the plugin's label in :data:`SCHEME` (value the label exactly, meaning the
    label shortened to the 64 characters a DICOM LO holds)."""
    from highdicom.sr import CodedConcept

    return CodedConcept(label, SCHEME, label[:64])


# ------------------------------------------------------------------------------------------ the report
def _algorithm(result: dict):
    """TID 4019 for one result: plugin name and version (its weights' SHA-256), backbone and its weights'
    SHA-256, anymc3d version, read from the plugin file(s) of the record."""
    from highdicom.sr import AlgorithmIdentification

    from anymc3d.plugin_file import read_plugin_json

    paths = result["plugin_path"] if isinstance(result["plugin_path"], list) else [result["plugin_path"]]
    metas = [read_plugin_json(p) for p in paths]
    version = ",".join(m["weights_sha256"] for m in metas)
    parameters = [f"plugin weights SHA-256: {version}", f"backbone: {metas[0]['backbone']['name']}",
                  f"backbone weights SHA-256: {metas[0]['backbone_fingerprint']}", f"anymc3d: {__version__}",
                  f"plugin format: {metas[0]['format_version']}", f"task: {result['task']}"]
    return AlgorithmIdentification(name=result["plugin"], version=version[:64], parameters=parameters)


def _groups(record: dict) -> list:
    from highdicom.sr import (
        Measurement,
        MeasurementsAndQualitativeEvaluations,
        QualitativeEvaluation,
        TrackingIdentifier,
    )
    from pydicom.uid import generate_uid

    c = _codes()
    groups = []
    for result in record["results"]:
        algorithm = _algorithm(result)
        for label in result["labels"]:
            values = ((c["probability"], result["probabilities"][label]), (c["rawprob"], result["probabilities_raw"][label]),
                      (c["threshold"], result["thresholds"][label]))
            decision = c["present"] if result["decisions"][label] else c["absent"]
            groups.append(MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=generate_uid(), identifier=f"{result['plugin']}/{label}"[:64]),
                finding_type=finding_code(label), algorithm_id=algorithm,
                measurements=[Measurement(name=n, value=float(v), unit=c["unit"]) for n, v in values],
                qualitative_evaluations=[QualitativeEvaluation(c["decision"], decision)]))
    return groups


def _research_note():
    """The report's statement that it is for research use (a TID 1500 Qualitative Evaluations container)."""
    from highdicom.sr import (
        CodedConcept,
        ContainerContentItem,
        RelationshipTypeValues,
        TextContentItem,
    )
    from pydicom.sr.codedict import codes

    container = ContainerContentItem(CodedConcept("C0034375", "UMLS", "Qualitative Evaluations"),
                                     relationship_type=RelationshipTypeValues.CONTAINS)
    container.ContentSequence = [TextContentItem(codes.DCM.Comment, RESEARCH_NOTE,
                                                 relationship_type=RelationshipTypeValues.CONTAINS)]
    return container


def _modality_procedure(modality: str):
    """CID 100's procedure of the source's modality (SCT codes), else "Imaging procedure"."""
    from pydicom.sr.coding import Code

    known = {"CT": ("77477000", "Computed tomography"), "MR": ("113091000", "Magnetic resonance imaging")}
    value, meaning = known.get(modality, ("363679005", "Imaging procedure"))
    return Code(value, "SCT", meaning)


def build_report(record: dict, source: SourceSeries):
    """The Comprehensive 3D SR of a record's results on its source series."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    logging.getLogger("highdicom").setLevel(max(logging.WARNING, logging.getLogger("highdicom").level))
    observer = hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=
                                     hd.sr.DeviceObserverIdentifyingAttributes(uid=generate_uid(), name="AnyMC3D",
                                                                               manufacturer_name=MANUFACTURER,
                                                                               model_name=f"anymc3d {__version__}"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_modality_procedure(str(source.datasets[0].get("Modality", ""))),
        imaging_measurements=_groups(record), title=codes.cid7021.ImagingMeasurementReport,
        # The image library stays empty: no content item points at an image (the findings are per case), the
        # evidence lists every source instance, and highdicom 0.28 spends 0.1 s per image on a library entry
        # (then deep-copies them all: 14 s of a 21 s export for 40 slices) and cannot describe enhanced multi-frame
        # images at all.
        referenced_images=None)
    report[0].ContentSequence.append(_research_note())
    sr = hd.sr.Comprehensive3DSR(
        evidence=source.datasets, content=report[0], series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, series_description="AnyMC3D findings: research use only",
        institution_name=source.datasets[0].get("InstitutionName"))
    return _utf8(sr)


def _utf8(dataset):
    """Names copied from the source are decoded text; the new object says (and is written in) UTF-8. The
    private coding scheme is declared in the SOP Common module's Coding Scheme Identification Sequence."""
    from pydicom.dataset import Dataset

    dataset.SpecificCharacterSet = "ISO_IR 192"
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "AnyMC3D findings and measurements (docs/dicom.md)"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    dataset.CodingSchemeIdentificationSequence = [scheme]
    return dataset


# ------------------------------------------------------------------------------------------ parametric maps
def build_parametric_map(heatmap, source: SourceSeries, sr, series_uid: str, number: int, plugin: str,
                         label: str | None):
    """A Parametric Map of one heatmap (a SimpleITK image on the source's grid) on the source's geometry, instance
    ``number`` of the maps' series ``series_uid``, referencing the report ``sr``."""
    import highdicom as hd
    import SimpleITK as sitk
    from pydicom.uid import generate_uid

    c = _codes()
    values = sitk.GetArrayFromImage(heatmap).astype(np.float32)
    spacing = source.even_spacing
    measures = hd.PixelMeasuresSequence(pixel_spacing=list(source.pixel_spacing),
                                        slice_thickness=source.slice_thickness or spacing or 1.0,
                                        spacing_between_slices=spacing)
    mapping = hd.pm.RealWorldValueMapping(lut_label="ATTENTION", lut_explanation="relative attention, per-case "
                                          "max = 1 (not a probability)", unit=c["unit"], value_range=(0.0, 1.0),
                                          slope=1.0, intercept=0.0, quantity_definition=c["attention"])
    what = plugin if label is None else f"{plugin} / {label}"
    pm = hd.pm.ParametricMap(
        source_images=source.datasets, pixel_array=values, series_instance_uid=series_uid,
        series_number=PM_SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=number,
        manufacturer=MANUFACTURER, manufacturer_model_name=plugin[:64], software_versions=f"anymc3d {__version__}",
        device_serial_number=__version__, contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_description=f"AnyMC3D heatmap, research use only: {what}"[:64], content_label="HEATMAP",
        pixel_measures=measures,
        plane_orientation=hd.PlaneOrientationSequence("PATIENT", list(source.orientation)),
        plane_positions=[hd.PlanePositionSequence("PATIENT", list(p)) for p in source.positions],
        series_description="AnyMC3D heatmaps: research use only")
    _reference(pm, sr)
    pm.Laterality = source.datasets[0].get("Laterality", "")  # General Series, type 2C
    return _utf8(pm)


def _reference(pm, sr) -> None:
    """The SR in the map's Common Instance Reference (same study: Referenced Series Sequence)."""
    from pydicom.dataset import Dataset

    instance = Dataset()
    instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID = sr.SOPClassUID, sr.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = sr.SeriesInstanceUID
    series.ReferencedInstanceSequence = [instance]
    pm.ReferencedSeriesSequence = [*getattr(pm, "ReferencedSeriesSequence", []), series]


# ------------------------------------------------------------------------------------------ writing
def heatmap_files(record: dict) -> list[tuple[str, str | None, str]]:
    """(plugin, finding or None, path) of every heatmap file a record names, each file once."""
    out, seen = [], set()
    for result in record["results"]:
        items = list(result["finding_heatmaps"].items()) or [(None, result["heatmap"])]
        for label, path in items:
            if path and path not in seen:
                seen.add(path)
                out.append((result["plugin"], label, path))
    return out


def case_stem(record: dict) -> str:
    """The case's folder name: the stem of its heatmap files (unique within a run), else the image's stem."""
    files = heatmap_files(record)
    return Path(files[0][2]).name.split("__")[0] if files else image_stem(record["image"].split("+")[0])


def case_folder(out_dir: os.PathLike | str, stem: str) -> Path:
    """``out_dir/stem``, created; refused when it is (or leads through) a link out of ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = out_dir / safe_name(stem)
    if folder.is_symlink():
        raise InputError(folder, "is a symbolic link; DICOM outputs are never written through a link")
    folder.mkdir(exist_ok=True)
    if folder.resolve().parent != out_dir.resolve():
        raise InputError(folder, f"is not inside {out_dir}")
    return folder


def export_record(record: dict, out_dir: os.PathLike | str, *, stem: str | None = None,
                  source: SourceSeries | None = None) -> list[str]:
    """Write a record's SR and one Parametric Map per heatmap file into ``out_dir/<case>/``; returns the paths.

    ``source`` (from :func:`read_source`, checked against the predicted volume) is read from the record's image
    folder and series when not given. All of the case's files are complete before any is renamed into place;
    earlier objects of the case that this export does not rewrite are removed. Raises InputError naming the series.
    """
    from pydicom.uid import generate_uid

    from anymc3d.image_reading import read_image

    if record["status"] != STATUS_OK:
        raise InputError(record["image"], "has no results to export")
    source = source or read_source(record["image"], record.get("series"))
    maps = heatmap_files(record)
    if maps and not source.frame_of_reference:
        raise InputError(source.name, NO_FRAME_OF_REFERENCE)
    heatmaps = []
    for plugin, label, path in maps:
        image = read_image(path)
        check_geometry(source, image)
        heatmaps.append((plugin, label, image))
    folder = case_folder(out_dir, stem or case_stem(record))
    sr, series_uid = build_report(record, source), generate_uid()
    objects = [(folder / SR_NAME, sr)]
    for number, (plugin, label, image) in enumerate(heatmaps, start=1):
        name = PM_PREFIX + "__".join(safe_name(p) for p in [plugin] + ([label] if label else [])) + ".dcm"
        objects.append((folder / name, build_parametric_map(image, source, sr, series_uid, number, plugin, label)))
    written = _write_all(objects)
    for stale in folder.glob(f"{PM_PREFIX}*.dcm"):
        if stale not in written:
            stale.unlink()
    return [str(p.resolve()) for p in written]


def _write_all(objects: Sequence[tuple[Path, object]]) -> list[Path]:
    """Save every dataset under a temporary name; rename them all only when every one is complete."""
    with contextlib.ExitStack() as stack:
        for path, dataset in objects:
            temporary = stack.enter_context(atomic_path(path, ".dcm"))
            dataset.save_as(temporary, enforce_file_format=True)
    return [path for path, _ in objects]


# ------------------------------------------------------------------------------------------ reading back
def read_report(path: os.PathLike | str) -> dict:
    """What an SR written by :func:`export_record` says, read with highdicom: patient, study, the referenced
    source series and instances, and per measurement group plugin, finding, calibrated and raw probability,
    threshold, decision and algorithm identification. Raises InputError naming the file for anything else."""
    import highdicom as hd

    try:
        sr = hd.sr.srread(path)
        groups = [_group_dict(g) for g in sr.content.get_image_measurement_groups()]
    except Exception as error:  # noqa: BLE001 - whatever the parser trips on, the answer is one line
        raise InputError(path, f"is not an SR that anymc3d wrote ({type(error).__name__}: {error})") from None
    evidence = [(s.SeriesInstanceUID, i.ReferencedSOPInstanceUID) for study in
                sr.get("CurrentRequestedProcedureEvidenceSequence", []) for s in study.ReferencedSeriesSequence
                for i in s.ReferencedSOPSequence]
    return {"patient": str(sr.get("PatientName", "")), "patient_id": str(sr.get("PatientID", "")),
            "study": sr.StudyInstanceUID, "series": sr.SeriesInstanceUID, "sop_instance": sr.SOPInstanceUID,
            "source_series": sorted({s for s, _ in evidence}), "source_instances": [i for _, i in evidence],
            "research_note": RESEARCH_NOTE in _texts(sr.ContentSequence), "findings": groups}


def _texts(items) -> list[str]:
    """Every TEXT value in a content tree."""
    out = []
    for item in items:
        if item.ValueType == "TEXT":
            out.append(item.TextValue)
        out += _texts(item.get("ContentSequence", []))
    return out


def _group_dict(group) -> dict:
    """One measurement group as the record's numbers (keyed by the codes :func:`_groups` writes)."""
    from pydicom.sr.codedict import codes

    c = _codes()
    by_name = {(m.name.value, m.name.scheme_designator): float(m.value) for m in group.get_measurements()}
    (decision,) = group.get_qualitative_evaluations(name=c["decision"])
    texts = [(item.ConceptNameCodeSequence[0].CodeValue, item.TextValue) for item in group[0].ContentSequence
             if item.ValueType == "TEXT"]
    algorithm = {code: text for code, text in texts if code in (codes.DCM.AlgorithmName.value,
                                                                codes.DCM.AlgorithmVersion.value)}
    parameters = [text for code, text in texts if code == codes.DCM.AlgorithmParameters.value]
    key = lambda code: (code.value, code.scheme_designator)
    return {"plugin": algorithm.get(codes.DCM.AlgorithmName.value), "finding": group.finding_type.value,
            "probability": by_name[key(c["probability"])], "probability_raw": by_name[key(c["rawprob"])],
            "threshold": by_name[key(c["threshold"])], "decision": decision.value.value == c["present"].value,
            "algorithm_version": algorithm.get(codes.DCM.AlgorithmVersion.value), "algorithm_parameters": parameters,
            "tracking_id": group.tracking_identifier}


def report_text(report: dict, path: os.PathLike | str) -> str:
    """``anymc3d info SR.dcm``: the report's findings, one line each."""
    lines = [f"report       {path}: AnyMC3D measurement report (TID 1500)" +
             ("; research use only, not for diagnostic use" if report["research_note"] else ""),
             f"patient      {report['patient']} ({report['patient_id']}), study {report['study']}",
             f"source       series {', '.join(report['source_series'])} ({len(report['source_instances'])} instances)"]
    for f in report["findings"]:
        lines.append(f"finding      {f['plugin']} / {f['finding']}: probability {f['probability']:.4f} (raw "
                     f"{f['probability_raw']:.4f}), threshold {f['threshold']:.4f}: "
                     f"{'present' if f['decision'] else 'absent'}")
    if report["findings"]:
        lines.append("algorithm    " + "; ".join(report["findings"][0]["algorithm_parameters"]))
    return "\n".join(lines)


def print_report(path: os.PathLike | str, as_json: bool = False) -> int:
    """Print an SR's findings (``--json``: :func:`read_report`'s dict); returns the CLI exit code."""
    import json

    report = read_report(path)
    print(json.dumps(report, indent=2, ensure_ascii=False) if as_json else report_text(report, path))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m anymc3d.dicom_out RECORD.json --out DIR [--stem NAME]``: export one record written by
    ``predict`` (a JSON list holding one record, or the record) as the Slicer module does; prints a JSON list of
    ``{"path", "sop_instance_uid", "series_instance_uid", "sop_class_uid"}``. Exit 2 with one line on stderr."""
    import argparse
    import json
    import sys

    import pydicom

    from anymc3d.contract import validate_record
    from anymc3d.errors import AnyMC3DError, one_line

    parser = argparse.ArgumentParser(prog="python -m anymc3d.dicom_out", description=main.__doc__)
    parser.add_argument("record", type=Path, help="JSON file holding the record (or a list of exactly one).")
    parser.add_argument("--out", type=Path, required=True, help="Folder of the case folders.")
    parser.add_argument("--stem", default=None, help="Case folder name (default: from the heatmap file names).")
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.record.read_text(encoding="utf-8"))
        records = data if isinstance(data, list) else [data]
        if len(records) != 1:
            raise AnyMC3DError(f"{args.record}: holds {len(records)} records; give one")
        written = export_record(validate_record(records[0]), args.out, stem=args.stem)
    except (AnyMC3DError, OSError, ValueError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    described = []
    for path in written:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        described.append({"path": path, "sop_instance_uid": ds.SOPInstanceUID, "sop_class_uid": ds.SOPClassUID,
                          "series_instance_uid": ds.SeriesInstanceUID})
    print(json.dumps(described))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
