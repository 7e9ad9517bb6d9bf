"""Cases from a manifest (Logic/manifestcases.py) on a real slicer-core scene: the table against the CSV, and the
independent check: the table written back by ``trainingtable.writeManifest`` and read by the backend's own
``anymc3d.data.load_manifest`` gives the labels, splits and mask voxels that ``load_manifest`` reads from the original
CSV. Hostile rows are each named and the good rows kept; the cases are added one per poll, off the event loop."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from AnyMC3DSlicerLogic import (
    AnyMC3DSlicerLogic,
    SubprocessRunner,
    manifestcases,
    outputs,
    trainingtable,
)
from AnyMC3DSlicerLogic.trainingtable import (
    LABELLED_COLUMN,
    TrainingInputError,
    TrainingSettings,
)

data = pytest.importorskip("anymc3d.data")
synthetic = pytest.importorskip("anymc3d.synthetic")


def caseImage(index, size=(20, 18, 8)):
    """A small synthetic CT (LPS origin and spacing not trivial) and its lesion mask on the same grid."""
    image = synthetic.make_ct_volume(size=size, spacing=(0.9, 0.8, 2.5), origin=(4.0 + index, -3.0, 10.0),
                                     lesion=index % 2 == 1, seed=index)
    mask = sitk.GetImageFromArray((sitk.GetArrayFromImage(image) > 20).astype(np.uint8))
    mask.CopyInformation(image)
    return image, mask


def writeCsv(path, header, rows):
    with open(path, "w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


#: (id, finding A, finding B, split, has a mask); ids "" are named after the image file
MULTILABEL = [("alpha", 1, 0, "train", True), ("", 0, 1, "Training", False), ("gamma", 1, 1, "train", True),
              ("delta", 0, 0, "train", False), ("", 1, 0, "validation", True), ("zeta", 0, 1, "val", False),
              ("eta", 1, 0, "test", False), ("theta", 0, 1, "TEST", True), ("iota", 1, 1, "", False)]


@pytest.fixture
def multilabelCsv(tmp_path):
    """9 cases in a subfolder of the CSV's (paths relative to it), masks for 4, splits for 8 (aliases included)."""
    (tmp_path / "cases").mkdir()
    rows = []
    for index, (name, a, b, split, hasMask) in enumerate(MULTILABEL):
        image, mask = caseImage(index)
        sitk.WriteImage(image, str(tmp_path / "cases" / f"img{index}.nii.gz"))
        if hasMask:
            sitk.WriteImage(mask, str(tmp_path / "cases" / f"img{index}_mask.nrrd"))
        rows.append([name, f"cases/img{index}.nii.gz", a, b, f"cases/img{index}_mask.nrrd" if hasMask else "", split])
    return writeCsv(tmp_path / "manifest.csv", ["id", "image", "effusion", "nodule", "mask", "split"], rows)


def makeLogic(sceneContext, tmp_path):
    return AnyMC3DSlicerLogic(sceneContext.scene, runner=SubprocessRunner(), volumesLogic=sceneContext.volumesLogic,
                              volumeRenderingLogic=sceneContext.volumeRenderingLogic, tempRoot=str(tmp_path))


def importManifest(logic, table, path):
    job = manifestcases.ManifestImport(logic, table, path).start()
    assert job.wait(60)
    return job


def writeBack(sceneContext, tmp_path, table, drawn="train"):
    """The table written by the Logic's writeManifest (its 'auto' rows put in ``drawn``), read by load_manifest."""
    cases = trainingtable.readCases(table)
    splits = {case.row: drawn if case.split == "auto" else case.split for case in cases}
    logic = makeLogic(sceneContext, tmp_path)
    path = trainingtable.writeManifest(table, str(tmp_path / "written"), logic.writeInputVolume, cases, splits)
    return data.load_manifest(path)


def sameVoxels(a, b):
    left, right = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(left), sitk.GetArrayFromImage(right))
    np.testing.assert_allclose(left.GetOrigin(), right.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(left.GetSpacing(), right.GetSpacing(), atol=1e-6)


def test_multilabel_manifest_fills_the_table_and_writes_back_as_the_backend_reads_it(sceneContext, tmp_path, multilabelCsv):
    table = trainingtable.createTrainingTable(sceneContext.scene)  # default settings: one finding "finding"
    job = importManifest(makeLogic(sceneContext, tmp_path), table, multilabelCsv)
    assert job.problems == [] and job.added == list(range(9))
    settings = trainingtable.trainingSettings(table)
    assert settings.task == "multilabel" and settings.labels == ("effusion", "nodule")  # taken from the CSV
    cases = trainingtable.readCases(table)
    assert [case.name for case in cases] == [name or f"img{index}" for index, (name, *_) in enumerate(MULTILABEL)]
    assert [(case.labels["effusion"], case.labels["nodule"]) for case in cases] == [(str(a), str(b)) for _, a, b, *_ in MULTILABEL]
    labelled = table.GetTable().GetColumnByName(LABELLED_COLUMN)
    assert labelled.IsA("vtkBitArray") and [labelled.GetValue(row) for row in range(9)] == [1] * 9
    assert [case.split for case in cases] == ["train", "train", "train", "train", "val", "val", "test", "test", "auto"]
    assert [case.maskNode is not None for case in cases] == [has for *_, has in MULTILABEL]
    assert all(case.maskNode.IsA("vtkMRMLLabelMapVolumeNode") for case in cases if case.maskNode is not None)
    # the independent check: the backend's reader over the original CSV and over the table written back
    original = data.load_manifest(multilabelCsv, strict=False)  # strict=False: an empty split cell is a problem there
    written = writeBack(sceneContext, tmp_path, table)
    assert written.labels == original.labels == ["effusion", "nodule"]
    for before, after in zip(original.cases, written.cases):
        np.testing.assert_array_equal(before.target, after.target)
        assert before.split in (after.split, None) and (before.mask is None) == (after.mask is None)
        sameVoxels(before.images[0], after.images[0])
        if before.mask is not None:
            sameVoxels(before.mask, after.mask)
    assert [c.split for c in original.cases][:8] == [c.split for c in written.cases][:8]


def test_multiclass_manifest_gives_class_names_and_writes_back_the_same_classes(sceneContext, tmp_path):
    (tmp_path / "cases").mkdir()
    grades = [0, 2, 1, 1, 0, 2, 2, 1, 0]
    rows = []
    for index, grade in enumerate(grades):
        sitk.WriteImage(caseImage(index)[0], str(tmp_path / "cases" / f"c{index}.nrrd"))
        rows.append([f"cases/c{index}.nrrd", grade, ("train", "val", "test")[index // 3]])
    path = writeCsv(tmp_path / "grades.csv", ["image", "grade", "split"], rows)
    empty = trainingtable.createTrainingTable(sceneContext.scene)
    importManifest(makeLogic(sceneContext, tmp_path), empty, path)
    settings = trainingtable.trainingSettings(empty)
    assert settings.task == "multiclass" and settings.labels == ("grade_0", "grade_1", "grade_2")  # the backend's names
    assert [case.labels[trainingtable.CLASS_COLUMN] for case in trainingtable.readCases(empty)] == [f"grade_{g}" for g in grades]
    original, written = data.load_manifest(path), writeBack(sceneContext, tmp_path, empty)
    assert [int(c.target) for c in written.cases] == [int(c.target) for c in original.cases] == grades
    assert [c.split for c in written.cases] == [c.split for c in original.cases]
    # a table that already names its classes keeps the names: class k is the k-th name
    named = trainingtable.createTrainingTable(sceneContext.scene, TrainingSettings(name="g", task="multiclass",
                                                                                   labels=("none", "low", "high")))
    job = importManifest(makeLogic(sceneContext, tmp_path), named, path)
    assert job.problems == []
    assert [case.labels[trainingtable.CLASS_COLUMN] for case in trainingtable.readCases(named)] == [
        ("none", "low", "high")[g] for g in grades]
    # a class that is not a number, or has no name in the table: named, nothing added
    bad = writeCsv(tmp_path / "badgrades.csv", ["id", "image", "grade"],
                   [["x1", "cases/c0.nrrd", "two"], ["x2", "cases/c0.nrrd", "3"], ["x3", "cases/c0.nrrd", "1.0"]])
    job = importManifest(makeLogic(sceneContext, tmp_path), named, bad)
    assert job.problems == [f"{bad} line 2: label grade must be a class number 0, 1, 2, ..., got 'two'",
                            f"{bad} line 3: class grade 3 has no name in the table (its classes are 0..2: none, low, high)"]
    assert trainingtable.readCases(named)[-1].name == "x3" and len(job.added) == 1


def test_hostile_rows_are_each_named_and_the_good_rows_kept(sceneContext, tmp_path):
    (tmp_path / "cases").mkdir()
    good, other = caseImage(0), caseImage(1, size=(12, 12, 6))
    sitk.WriteImage(good[0], str(tmp_path / "cases" / "good.nii.gz"))
    sitk.WriteImage(good[1], str(tmp_path / "cases" / "good_mask.nii.gz"))
    sitk.WriteImage(other[1], str(tmp_path / "cases" / "small_mask.nii.gz"))
    (tmp_path / "cases" / "broken.nii.gz").write_bytes(b"not an image at all")
    os.symlink(str(tmp_path / "cases" / "gone.nii.gz"), str(tmp_path / "cases" / "dangling.nii.gz"))
    (tmp_path / "cases" / "folder").mkdir()
    rows = [["ok1", "cases/good.nii.gz", "1", "cases/good_mask.nii.gz", "train"],     # line 2: good
            ["missing", "cases/nothere.nii.gz", "0", "", ""],                         # 3: no such file
            ["link", "cases/dangling.nii.gz", "0", "", ""],                           # 4: dangling link
            ["two", "cases/good.nii.gz", "2", "", ""],                                # 5: label not 0/1
            ["word", "cases/good.nii.gz", "yes", "", ""],                             # 6: label not 0/1
            ["offgrid", "cases/good.nii.gz", "1", "cases/small_mask.nii.gz", ""],    # 7: mask on another grid
            ["ok1", "cases/good.nii.gz", "0", "", ""],                                # 8: duplicate case
            ["badsplit", "cases/good.nii.gz", "0", "", "sometimes"],                  # 9: split
            ["broken", "cases/broken.nii.gz", "1", "", ""],                           # 10: unreadable image
            ["dir", "cases/folder", "1", "", ""],                                     # 11: a folder
            ["ok2", "cases/good.nii.gz", "0", "", "val"]]                             # 12: good
    path = writeCsv(tmp_path / "hostile.csv", ["case", "image", "lesion", "mask", "split"], rows)
    table = trainingtable.createTrainingTable(sceneContext.scene, TrainingSettings(labels=("lesion",)))
    volumesBefore = len(outputs.nodesByClass(sceneContext.scene, "vtkMRMLScalarVolumeNode"))
    job = importManifest(makeLogic(sceneContext, tmp_path), table, path)
    assert [case.name for case in trainingtable.readCases(table)] == ["ok1", "ok2"]
    lines = sorted(int(problem.split(" line ")[1].split(":")[0]) for problem in job.problems)
    assert lines == list(range(3, 12)), job.problems
    assert all(problem.startswith(f"{path} line ") for problem in job.problems)
    text = "\n".join(job.problems)
    for expected in ("file or folder not found", "dangling symbolic link", "label lesion must be 0 or 1, got '2'",
                     "got 'yes'", "does not lie on the image's grid", "'ok1' is already in line 2", "'sometimes'",
                     "Cannot read", "is a folder"):
        assert expected in text, expected
    # nothing of a failed row stays in the scene: two volumes and one mask (the good rows') were added
    assert len(outputs.nodesByClass(sceneContext.scene, "vtkMRMLScalarVolumeNode")) == volumesBefore + 3


def test_a_csv_that_does_not_fit_the_table_changes_nothing(sceneContext, tmp_path, multilabelCsv):
    table = trainingtable.createTrainingTable(sceneContext.scene, TrainingSettings(labels=("lesion",)))
    volume = sceneContext.loadVolume(next(iter((tmp_path / "cases").glob("img0.nii.gz"))), "existing")
    trainingtable.addCase(table, volume)
    with pytest.raises(TrainingInputError) as error:
        manifestcases.ManifestImport(makeLogic(sceneContext, tmp_path), table, multilabelCsv).start()
    assert error.value.problems == [(f"{multilabelCsv}: label columns ['effusion', 'nodule'] are not the table's "
                                     "findings ['lesion']")]
    assert table.GetNumberOfRows() == 1 and trainingtable.trainingSettings(table).labels == ("lesion",)
    for header, message in ((["image_ct", "image_pet", "x"], "one 'image' column"), (["image", "id"], "no label column")):
        bad = writeCsv(tmp_path / "bad.csv", header, [["a"] * len(header)])
        with pytest.raises(TrainingInputError, match=message):
            manifestcases.readManifest(table, bad)


def test_the_csv_is_read_with_limits(tmp_path):
    from anymc3d import manifest_rules

    path = writeCsv(tmp_path / "many.csv", ["image", "x"], [[f"i{k}.nrrd", 0] for k in range(5)])
    assert len(manifest_rules.read_rows(path)[2]) == 5
    with pytest.raises(ValueError, match="more than 4 rows"):
        manifest_rules.read_rows(path, max_rows=4)
    with pytest.raises(ValueError, match="larger than 10 bytes"):
        manifest_rules.read_rows(path, max_bytes=10)


def test_cases_are_added_one_per_event_loop_turn_and_cancel_stops(sceneContext, tmp_path, multilabelCsv):
    """With the module's ``schedule`` the import returns at once; each scheduled turn adds at most one case."""
    logic = makeLogic(sceneContext, tmp_path)
    turns = []
    logic.schedule = lambda milliseconds, callback: turns.append(callback)
    table = trainingtable.createTrainingTable(sceneContext.scene)
    progress = []
    job = manifestcases.ManifestImport(logic, table, multilabelCsv, lambda *args: progress.append(args)).start()
    assert table.GetNumberOfRows() == 0 and len(turns) == 1  # nothing read on the caller's thread yet
    while table.GetNumberOfRows() < 3:
        rows = table.GetNumberOfRows()
        turns.pop(0)()
        assert table.GetNumberOfRows() - rows <= 1 and len(turns) == 1
    assert progress[-1] == (3, 9, "gamma")
    job.cancel()
    assert job.done and job.cancelled and table.GetNumberOfRows() == 3
    turns.pop(0)()  # a turn scheduled before the cancel does nothing
    assert table.GetNumberOfRows() == 3
    # the scene closed (the table removed) while cases are read: the import ends, nothing is added
    other = trainingtable.createTrainingTable(sceneContext.scene, TrainingSettings(labels=("effusion", "nodule")))
    job = manifestcases.ManifestImport(logic, other, multilabelCsv).start()
    sceneContext.scene.RemoveNode(other)
    turns.pop(0)()
    assert job.done and job.cancelled and job.added == [] and turns == []


def test_the_logic_reads_manifests_without_torch():
    code = ("import sys, AnyMC3DSlicerLogic.manifestcases; "
            "assert not {'torch', 'nibabel'} & set(sys.modules), sorted({'torch', 'nibabel'} & set(sys.modules))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr


@pytest.mark.slow
def test_the_train_sections_button_adds_a_manifests_cases_as_the_module(tmp_path, multilabelCsv):
    """In the stand-in module (child process): cancelling the file dialog does nothing; a CSV's cases are read one
    per event-loop turn after the click returns, its bad row named in one warning; Cancel stops a second CSV."""
    from .test_module_in_slicer_standin import runScenario

    with open(multilabelCsv, "a", encoding="utf-8", newline="") as file:
        file.write("bad,cases/none.nii.gz,1,0,,train\n")  # line 11
    second = writeCsv(tmp_path / "second.csv", ["id", "image", "effusion", "nodule"],
                      [[f"more{k}", f"cases/img{k}.nii.gz", k % 2, 1 - k % 2] for k in range(4)])
    seen = runScenario("manifestCases", {"pluginFolder": str(tmp_path / "plugins"), "manifest": multilabelCsv,
                                         "second": second})
    assert seen["afterCancelledDialog"] == {"table": False, "dialogs": []}
    assert seen["rightAfterClick"] == {"rows": 0, "status": f"Reading 9 case(s) from {multilabelCsv}",
                                       "buttonsEnabled": [False, False], "cancelEnabled": True}
    assert seen["statuses"][0] == "Case 1/9 read: alpha" and len(seen["statuses"]) == 9
    assert seen["rows"][:3] == ["alpha", "img1", "gamma"] and len(seen["rows"]) == 9
    assert seen["columns"] == ["Case", "Labelled", "effusion", "nodule", "Segmentation", "Split"]
    assert seen["findingsEdit"] == "effusion, nodule" and seen["buttonsEnabled"] == [True, True]
    assert seen["status"] == f"9 case(s) added from {multilabelCsv}"
    ((kind, text),) = seen["dialogs"]
    assert kind == "warningDisplay" and text.splitlines()[1].startswith(f"{multilabelCsv} line 11: image ")
    assert seen["asked"][0][1] == "Manifest (*.csv)"
    assert seen["afterCancel"] == {"rows": 10, "status": f"1 case(s) added from {second} (cancelled)", "addEnabled": True}
