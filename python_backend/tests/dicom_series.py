"""DICOM test series written with pydicom: single-frame CT and MR series (axial or oblique, any character set,
with or without a Frame of Reference, uneven slice positions) and one multi-frame Enhanced MR object.

Every attribute the CT Image, MR Image and Enhanced MR Image IODs make type 1 or 2 is written, decimal strings
(DS) are at most 16 characters, so each object passes ``dciodvfy`` (tests check that before using them).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"


def ds(value: float) -> str:
    """A decimal string of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if len(text) <= 16 else f"{value:.8g}"


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    return meta


def _common(d: Dataset, *, patient_name: str, charset: str | None, study_uid: str, series_uid: str,
            frame_of_reference: str | None, modality: str, series_number: int) -> None:
    if charset is not None:
        d.SpecificCharacterSet = charset
    d.PatientName = patient_name
    d.PatientID = "ANON0001"
    d.PatientBirthDate = "19700101"
    d.PatientSex = "O"
    d.StudyInstanceUID = study_uid
    d.StudyDate, d.StudyTime = "20260101", "120000"
    d.ReferringPhysicianName = ""
    d.StudyID = "1"
    d.AccessionNumber = "ACC1"
    d.StudyDescription = "anymc3d test study"
    d.Modality = modality
    d.SeriesInstanceUID = series_uid
    d.SeriesNumber = series_number
    d.SeriesDescription = f"test {modality} series {series_number}"
    d.Manufacturer = "anymc3d tests"
    d.Laterality = ""
    d.PatientPosition = "HFS"
    if frame_of_reference is not None:
        d.FrameOfReferenceUID = frame_of_reference
        d.PositionReferenceIndicator = ""


def _item(**attributes) -> Dataset:
    item = Dataset()
    for name, value in attributes.items():
        setattr(item, name, value)
    return item


def _pixels(d: Dataset, frame: np.ndarray) -> None:
    d.SamplesPerPixel = 1
    d.PhotometricInterpretation = "MONOCHROME2"
    d.Rows, d.Columns = frame.shape[-2:]
    d.BitsAllocated, d.BitsStored, d.HighBit = 16, 16, 15
    d.PixelRepresentation = 1
    d.PixelData = np.ascontiguousarray(frame.astype("<i2")).tobytes()


def geometry(shape: Sequence[int], spacing: Sequence[float], origin: Sequence[float],
             direction: np.ndarray, z_positions: Sequence[float] | None = None) -> list[np.ndarray]:
    """Each slice's ImagePositionPatient: ``origin + z * normal`` (``z_positions`` in mm, default k * spacing)."""
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    zs = [k * spacing[2] for k in range(shape[0])] if z_positions is None else list(z_positions)
    return [np.asarray(origin, float) + z * direction[:, 2] for z in zs]


def write_series(folder: Path, volume: np.ndarray, *, spacing=(0.8, 0.8, 2.5), origin=(-50.0, -40.0, 10.0),
                 direction=np.eye(3), modality: str = "CT", patient_name: str = "Test^Patient",
                 charset: str | None = None, frame_of_reference: bool = True, z_positions=None,
                 series_number: int = 1, study_uid: str | None = None, prefix: str = "") -> list[Path]:
    """One file per slice of ``volume`` (S, R, C int16), sorted on disk in reverse so a reader must sort by position."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    study_uid = study_uid or generate_uid()
    series_uid, for_uid = generate_uid(), generate_uid() if frame_of_reference else None
    sop_class = CT_STORAGE if modality == "CT" else MR_STORAGE
    paths = []
    for k, (frame, position) in enumerate(zip(volume, geometry(volume.shape, spacing, origin, direction, z_positions))):
        d = Dataset()
        d.SOPClassUID, d.SOPInstanceUID = sop_class, generate_uid()
        _common(d, patient_name=patient_name, charset=charset, study_uid=study_uid, series_uid=series_uid,
                frame_of_reference=for_uid, modality=modality, series_number=series_number)
        d.InstanceNumber = k + 1
        d.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER"]
        d.ContentDate, d.ContentTime = "20260101", "120000"
        d.PixelSpacing = [ds(spacing[1]), ds(spacing[0])]
        d.ImageOrientationPatient = [ds(v) for v in (*direction[:, 0], *direction[:, 1])]
        d.ImagePositionPatient = [ds(v) for v in position]
        d.SliceThickness = ds(spacing[2])
        _pixels(d, frame)
        if modality == "CT":
            d.RescaleIntercept, d.RescaleSlope, d.RescaleType = "0", "1", "HU"
            d.KVP = "120"
            d.AcquisitionNumber = 1
        else:
            d.ScanningSequence, d.SequenceVariant, d.ScanOptions = "SE", "NONE", ""
            d.MRAcquisitionType = "2D"
            d.RepetitionTime, d.EchoTime, d.EchoTrainLength = "500", "15", 1
            d.MagneticFieldStrength = "3"
        d.file_meta = _file_meta(sop_class, d.SOPInstanceUID)
        path = folder / f"{prefix}{len(volume) - k:04d}.dcm"
        d.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_enhanced_mr(path: Path, volume: np.ndarray, *, spacing=(1.0, 1.0, 3.0), origin=(-30.0, -30.0, 0.0),
                      direction=np.eye(3), patient_name: str = "Test^Enhanced") -> Path:
    """A multi-frame Enhanced MR Image object (frames in slice order), per-frame plane positions."""
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    d = Dataset()
    d.SOPClassUID, d.SOPInstanceUID = ENHANCED_MR_STORAGE, generate_uid()
    _common(d, patient_name=patient_name, charset=None, study_uid=generate_uid(), series_uid=generate_uid(),
            frame_of_reference=generate_uid(), modality="MR", series_number=7)
    del d.Laterality  # Enhanced MR: frame laterality instead
    d.InstanceNumber = 1
    d.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    d.PixelPresentation, d.VolumetricProperties, d.VolumeBasedCalculationTechnique = "MONOCHROME", "VOLUME", "NONE"
    d.ComplexImageComponent, d.AcquisitionContrast = "MAGNITUDE", "T1"
    d.AcquisitionContextSequence = []
    d.ContentDate, d.ContentTime = "20260101", "120000"
    d.AcquisitionDateTime = "20260101120000"
    d.AcquisitionNumber = 1
    d.AcquisitionDuration = 60.0
    d.ContentQualification = "RESEARCH"
    d.ManufacturerModelName = "pydicom"
    d.DeviceSerialNumber = "1"
    d.SoftwareVersions = "1"
    d.ResonantNucleus = "1H"
    d.KSpaceFiltering = "NONE"
    d.MagneticFieldStrength = "3"
    d.ApplicableSafetyStandardAgency = "IEC"
    d.ImageComments = ""
    d.BurnedInAnnotation = "NO"
    d.LossyImageCompression = "00"
    d.PresentationLUTShape = "IDENTITY"
    d.PulseSequenceName = "SE"
    d.MRAcquisitionType = "2D"
    d.EchoPulseSequence = "SPIN"
    d.MultipleSpinEcho = "NO"
    d.MultiPlanarExcitation = "NO"
    d.PhaseContrast = "NO"
    d.TimeOfFlightContrast = "NO"
    d.SteadyStatePulseSequence = "NONE"
    d.EchoPlanarPulseSequence = "NO"
    d.SaturationRecovery = "NO"
    d.SpectrallySelectedSuppression = "NONE"
    d.OversamplingPhase = "NONE"
    d.GeometryOfKSpaceTraversal = "RECTILINEAR"
    d.RectilinearPhaseEncodeReordering = "LINEAR"
    d.SegmentedKSpaceTraversal = "SINGLE"
    d.NumberOfKSpaceTrajectories = 1
    d.NumberOfFrames = len(volume)
    d.FrameOfReferenceUID = d.FrameOfReferenceUID
    d.DimensionOrganizationType = "3D"
    organization = generate_uid()
    d.DimensionOrganizationSequence = [Dataset()]
    d.DimensionOrganizationSequence[0].DimensionOrganizationUID = organization
    index = Dataset()
    index.DimensionOrganizationUID = organization
    index.DimensionIndexPointer = 0x00200032
    index.FunctionalGroupPointer = 0x00209113
    index.DimensionDescriptionLabel = "Image Position"
    d.DimensionIndexSequence = [index]
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [ds(spacing[1]), ds(spacing[0])]
    measures.SliceThickness = ds(spacing[2])
    measures.SpacingBetweenSlices = ds(spacing[2])
    shared.PixelMeasuresSequence = [measures]
    orientation = Dataset()
    orientation.ImageOrientationPatient = [ds(v) for v in (*direction[:, 0], *direction[:, 1])]
    shared.PlaneOrientationSequence = [orientation]
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    frame_type.PixelPresentation = "MONOCHROME"
    frame_type.VolumetricProperties = "VOLUME"
    frame_type.VolumeBasedCalculationTechnique = "NONE"
    frame_type.ComplexImageComponent = "MAGNITUDE"
    frame_type.AcquisitionContrast = "T1"
    shared.MRImageFrameTypeSequence = [frame_type]
    timing = Dataset()
    timing.RepetitionTime, timing.FlipAngle = "500", "90"
    timing.EchoTrainLength, timing.RFEchoTrainLength, timing.GradientEchoTrainLength = 1, 1, 0
    timing.SpecificAbsorptionRateSequence = [_item(SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY",
                                                   SpecificAbsorptionRateValue=0.1)]
    timing.OperatingModeSequence = [_item(OperatingModeType="STATIC FIELD", OperatingMode="IEC_NORMAL")]
    shared.MRTimingAndRelatedParametersSequence = [timing]
    shared.MRModifierSequence = [_item(InversionRecovery="NO", FlowCompensation="NONE", T2Preparation="NO",
                                       SpectrallySelectedExcitation="NONE", SpatialPresaturation="NONE",
                                       PartialFourier="NO", ParallelAcquisition="NO")]
    shared.MRImagingModifierSequence = [_item(MagnetizationTransfer="NONE", BloodSignalNulling="NO", Tagging="NONE",
                                              TransmitterFrequency=127.0, PixelBandwidth="200")]
    shared.MRReceiveCoilSequence = [_item(ReceiveCoilName="head", ReceiveCoilType="VOLUME", QuadratureReceiveCoil="NO",
                                          ReceiveCoilManufacturerName="")]
    shared.MRTransmitCoilSequence = [_item(TransmitCoilName="body", TransmitCoilType="BODY",
                                           TransmitCoilManufacturerName="")]
    region = _item(CodeValue="12738006", CodingSchemeDesignator="SCT", CodeMeaning="Brain")
    shared.FrameAnatomySequence = [_item(AnatomicRegionSequence=[region], FrameLaterality="U")]
    echo = Dataset()
    echo.EffectiveEchoTime = 15.0
    shared.MREchoSequence = [echo]
    fov = Dataset()
    fov.InPlanePhaseEncodingDirection = "ROW"
    fov.MRAcquisitionFrequencyEncodingSteps = volume.shape[2]
    fov.MRAcquisitionPhaseEncodingStepsInPlane = volume.shape[1]
    fov.PercentSampling, fov.PercentPhaseFieldOfView = "100", "100"
    shared.MRFOVGeometrySequence = [fov]
    averages = Dataset()
    averages.NumberOfAverages = "1"
    shared.MRAveragesSequence = [averages]
    transform = Dataset()
    transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = "0", "1", "US"
    shared.PixelValueTransformationSequence = [transform]
    d.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k, position in enumerate(geometry(volume.shape, spacing, origin, direction)):
        item = Dataset()
        content = Dataset()
        content.FrameAcquisitionDateTime = "20260101120000"
        content.FrameReferenceDateTime = "20260101120000"
        content.FrameAcquisitionDuration = 100.0
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        content.DimensionIndexValues = [k + 1]
        item.FrameContentSequence = [content]
        plane = Dataset()
        plane.ImagePositionPatient = [ds(v) for v in position]
        item.PlanePositionSequence = [plane]
        frames.append(item)
    d.PerFrameFunctionalGroupsSequence = frames
    _pixels(d, volume)
    d.file_meta = _file_meta(ENHANCED_MR_STORAGE, d.SOPInstanceUID)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    d.save_as(path, enforce_file_format=True)
    return Path(path)
