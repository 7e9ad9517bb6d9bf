"""Stand-ins for Slicer's DICOM database and its import, which slicer-core does not have (no ctk, no DICOMLib).

Each mirrors the real code the Logic's DICOM export depends on, failure paths included:

- ``importDicom(folder, db, copyFiles)``: Slicer/Slicer 583e9b3 (583e9b37d50ead7daf7b783dce465ccaecec8809),
  Modules/Scripted/DICOMLib/DICOMUtils.py ``importDicom``: a ``ctkDICOMIndexer``'s ``addDirectory(db, folder,
  copyFiles)`` then ``waitForImportFinished()``; any exception is logged ("Failed to import DICOM folder ...") and
  the function returns False, else True.
- ``ctkDICOMIndexer.addDirectory`` (commontk/CTK 868d56c, Libs/DICOM/Core/ctkDICOMIndexer.cpp): every file under the
  folder, subfolders included (a QDirIterator with Subdirectories; symbolic links not followed by default); files
  that are not DICOM are skipped.
- ``ctkDICOMDatabase`` (same commit, Libs/DICOM/Core/ctkDICOMDatabase.h/.cpp): ``fileForInstance`` ("SELECT Filename
  FROM Images WHERE SOPInstanceUID=?", empty string when unknown), ``patients()`` (the Patients table's UIDs,
  one per ``compositePatientID`` = "ID~birth date~name"), ``studiesForPatient``, ``seriesForStudy``, ``filesForSeries``,
  ``instanceForFile``; a stored (copied) file goes to ``<databaseDirectory>/dicom/<study>/<series>/<instance>.dcm``;
  a closed database (``isOpen`` False) makes the indexer fail.
"""

import logging
import os
import shutil

import pydicom


class DICOMDatabase:
    def __init__(self, directory):
        self.databaseDirectory = str(directory)
        self.isOpen = True
        self._patients = {}   # composite patient ID -> patient UID
        self._studies = {}    # study UID -> patient UID
        self._series = {}     # series UID -> study UID
        self._images = {}     # SOP instance UID -> (file, series UID)

    @staticmethod
    def compositePatientID(patientID, patientsName, patientsBirthDate):
        return f"{patientID}~{patientsBirthDate}~{patientsName}"

    def insert(self, path, storeFile):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        key = self.compositePatientID(str(ds.get("PatientID", "")), str(ds.get("PatientName", "")),
                                      str(ds.get("PatientBirthDate", "")))
        patient = self._patients.setdefault(key, str(len(self._patients) + 1))
        self._studies.setdefault(ds.StudyInstanceUID, patient)
        self._series.setdefault(ds.SeriesInstanceUID, ds.StudyInstanceUID)
        if storeFile:
            stored = os.path.join(self.databaseDirectory, "dicom", ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                  ds.SOPInstanceUID + ".dcm")
            os.makedirs(os.path.dirname(stored), exist_ok=True)
            shutil.copyfile(path, stored)
            path = stored
        self._images[ds.SOPInstanceUID] = (os.path.abspath(path), ds.SeriesInstanceUID)

    def fileForInstance(self, sopInstanceUID):
        return self._images.get(sopInstanceUID, ("", None))[0]

    def instanceForFile(self, fileName):
        return next((uid for uid, (path, _) in self._images.items() if path == os.path.abspath(fileName)), "")

    def patients(self):
        return list(self._patients.values())

    def studiesForPatient(self, patientUID):
        return [study for study, patient in self._studies.items() if patient == patientUID]

    def seriesForStudy(self, studyUID):
        return [series for series, study in self._series.items() if study == studyUID]

    def filesForSeries(self, seriesUID):
        return [path for path, series in self._images.values() if series == seriesUID]


class ctkDICOMIndexer:
    def addDirectory(self, db, directoryName, copyFile=False):
        if not db.isOpen:
            raise RuntimeError("database is not open")
        for root, _dirs, files in os.walk(directoryName):  # os.walk does not follow links to folders either
            for name in sorted(files):
                path = os.path.join(root, name)
                try:
                    pydicom.dcmread(path, stop_before_pixels=True)
                except (pydicom.errors.InvalidDicomError, OSError):
                    continue
                db.insert(path, copyFile)

    def waitForImportFinished(self):
        return None


def importDicom(dicomDataDir, dicomDatabase=None, copyFiles=False):
    try:
        indexer = ctkDICOMIndexer()
        indexer.addDirectory(dicomDatabase, dicomDataDir, copyFiles)
        indexer.waitForImportFinished()
    except Exception:  # noqa: BLE001 - the real one catches everything too
        logging.error("Failed to import DICOM folder " + dicomDataDir)  # noqa: LOG015 - as the real one logs
        return False
    return True
