"""Training from the case table (Logic/trainingtable.py, Logic/training.py) on a real slicer-core scene.

The manifest the Logic writes is read by the backend's own reader (``anymc3d.data.load_manifest``) and compared with
the table; bad tables are refused before anything runs. The slow tests train a plugin with the REAL backend
(``python -m anymc3d train``, ``eval``, ``predict``) on small synthetic CT volumes with a lesion or not
(``anymc3d.synthetic.make_ct_volume``) and a tiny load-bearing DINOv2 (3 blocks, 56 px).
"""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from AnyMC3DSlicerLogic import (
    AnyMC3DSlicerLogic,
    PluginLibrary,
    SubprocessRunner,
    outputs,
    trainingtable,
)
from AnyMC3DSlicerLogic.process import descendantPids
from AnyMC3DSlicerLogic.training import TrainingJob, parseTrainLine
from AnyMC3DSlicerLogic.trainingtable import (
    LABELLED_COLUMN,
    MASK_COLUMN,
    SPLIT_COLUMN,
    TrainingInputError,
    TrainingSettings,
)

from .slicer_testing import BACKEND_PATH

data = pytest.importorskip("anymc3d.data")
synthetic = pytest.importorskip("anymc3d.synthetic")
pytest.importorskip("sklearn")

#: the tiny run: 6 slices a volume, one volume a step, two steps a gradient update
TINY_TRAIN = ["--num-slices", "6", "--batch-size", "1", "--accumulation", "2", "--patience", "20"]


def lesionImage(index, lesion, size=(36, 36, 12)):
    rng = np.random.default_rng(index)
    center = (size[0] * rng.uniform(0.4, 0.6), size[1] * rng.uniform(0.3, 0.45), size[2] * rng.uniform(0.35, 0.65))
    image = synthetic.make_ct_volume(size=size, spacing=(0.9, 0.85, 2.5), origin=(5.0, -3.0, 12.0), lesion=lesion,
                                     lesion_center=center, lesion_radius_mm=6.0, seed=index)
    mask = sitk.GetImageFromArray((sitk.GetArrayFromImage(image) > 20).astype(np.uint8) if lesion else
                                  np.zeros(sitk.GetArrayFromImage(image).shape, np.uint8))
    mask.CopyInformation(image)
    return image, mask


@pytest.fixture
def lesionScene(sceneContext, tmp_path):
    """16 volumes (8 with a lesion) and their lesion masks in the scene: ``(volumes, masks, labels)``."""
    volumes, masks, labels = [], [], []
    for index in range(16):
        lesion = index % 2 == 1
        image, mask = lesionImage(index, lesion)
        imagePath, maskPath = tmp_path / f"case{index:02d}.nii.gz", tmp_path / f"case{index:02d}_mask.nii.gz"
        sitk.WriteImage(image, str(imagePath))
        sitk.WriteImage(mask, str(maskPath))
        volumes.append(sceneContext.loadVolume(imagePath, f"case{index:02d}"))
        masks.append(sceneContext.volumesLogic.AddArchetypeVolume(str(maskPath), f"case{index:02d} mask", 1))
        labels.append(int(lesion))
    return volumes, masks, labels


def labelledTable(scene, volumes, labels, settings=None, splits=None, masks=None):
    table = trainingtable.createTrainingTable(scene, settings or TrainingSettings(name="lesion", labels=("lesion",)))
    trainingtable.fillFromScene(table, scene)
    for row, (label, split) in enumerate(zip(labels, splits or ["auto"] * len(labels))):
        trainingtable.setCell(table, row, "lesion", label)
        trainingtable.setCell(table, row, LABELLED_COLUMN, True)
        trainingtable.setCell(table, row, SPLIT_COLUMN, split)
        if masks is not None:
            trainingtable.setCell(table, row, MASK_COLUMN, masks[row])
    return table


def makeLogic(sceneContext, tmp_path):
    logic = AnyMC3DSlicerLogic(sceneContext.scene, runner=SubprocessRunner(), backendCommand=[sys.executable, "-m", "anymc3d"],
                               backendPath=BACKEND_PATH, volumesLogic=sceneContext.volumesLogic,
                               volumeRenderingLogic=sceneContext.volumeRenderingLogic, tempRoot=str(tmp_path / "runs"))
    logic.trainingRoot = str(tmp_path / "training")
    return logic


# ---------------------------------------------------------------------------------------------------------------
# The table, its checks and the manifest (quick)


def test_table_fills_from_the_scene_and_saves_with_it(sceneContext, lesionScene, tmp_path):
    volumes, masks, labels = lesionScene
    table = labelledTable(sceneContext.scene, volumes, labels, masks=masks)
    cases = trainingtable.readCases(table)
    assert [case.volumeNode for case in cases] == volumes  # label maps are not cases
    assert [case.maskNode for case in cases] == masks and [case.labels["lesion"] for case in cases] == [str(v) for v in labels]
    assert trainingtable.fillFromScene(table, sceneContext.scene) == []  # nothing listed twice
    # saved with the scene: write it, read it into a new scene, the table and its references come back
    sceneContext.scene.SetRootDirectory(str(tmp_path))
    sceneContext.scene.SetURL(str(tmp_path / "scene.mrml"))
    for node in [*volumes, *masks]:
        node.GetStorageNode().SetFileName(node.GetStorageNode().GetFileName())
    table.AddDefaultStorageNode()
    table.GetStorageNode().SetFileName(str(tmp_path / "table.tsv"))
    assert table.GetStorageNode().WriteData(table)
    assert sceneContext.scene.Commit()
    import slicer

    again = slicer.vtkMRMLScene()
    again.SetURL(str(tmp_path / "scene.mrml"))
    assert again.Connect()
    (restored,) = [node for node in outputs.nodesByClass(again, "vtkMRMLTableNode") if trainingtable.isTrainingTable(node)]
    assert trainingtable.trainingSettings(restored) == trainingtable.trainingSettings(table)
    restoredCases = trainingtable.readCases(restored)
    assert [case.volumeNode.GetName() for case in restoredCases] == [v.GetName() for v in volumes]
    assert [case.maskNode.GetName() for case in restoredCases] == [m.GetName() for m in masks]
    assert [case.labels for case in restoredCases] == [case.labels for case in cases]


def test_written_manifest_reads_back_unchanged_with_the_backends_reader(sceneContext, lesionScene, tmp_path):
    volumes, masks, labels = lesionScene
    table = labelledTable(sceneContext.scene, volumes, labels, masks=masks)
    logic = makeLogic(sceneContext, tmp_path)
    cases, splits = trainingtable.checkedCases(table)
    path = trainingtable.writeManifest(table, str(tmp_path / "work"), logic.writeInputVolume, cases, splits)
    manifest = data.load_manifest(path)  # the backend's one reader, every image read and checked
    assert manifest.labels == ["lesion"] and manifest.task == "multilabel" and manifest.views == ["image"]
    assert [float(c.target[0]) for c in manifest.cases] == labels
    assert [c.split for c in manifest.cases] == [splits[row] for row in range(16)]
    for case, volume, mask in zip(manifest.cases, volumes, masks):
        image = sitk.ReadImage(str(case.images[0]))  # same voxels and geometry as the scene's volume (RAS -> LPS)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), outputs.arrayFromVolumeNode(volume))
        ijkToRas = outputs.matrixToArray(outputs.ijkToRasMatrix(volume))
        lps = np.diag([-1.0, -1.0, 1.0])
        np.testing.assert_allclose(image.GetOrigin(), lps @ ijkToRas[:3, 3], atol=1e-9)
        np.testing.assert_allclose(np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing()),
                                   lps @ ijkToRas[:3, :3], atol=1e-9)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(case.mask))),
                                      outputs.arrayFromVolumeNode(mask))
    # the auto splits: stratified, seeded (the same draw again), every split with both classes
    assert trainingtable.resolveSplits(trainingtable.readCases(table), trainingtable.trainingSettings(table)) == splits
    for split in ("train", "val", "test"):
        assert {labels[row] for row in range(16) if splits[row] == split} == {0, 1}
    assert sorted(splits.values()).count("test") == 4  # 25 % of 16


def test_multiclass_manifest_reads_back_as_one_class_column(sceneContext, lesionScene, tmp_path):
    settings = TrainingSettings(name="size", task="multiclass", labels=("none", "small", "large"))
    table = trainingtable.createTrainingTable(sceneContext.scene, settings)
    trainingtable.fillFromScene(table, sceneContext.scene)
    classes = [("none", "small", "large")[i % 3] for i in range(16)]
    for row, name in enumerate(classes):
        trainingtable.setCell(table, row, trainingtable.CLASS_COLUMN, name)
        trainingtable.setCell(table, row, SPLIT_COLUMN, ("train", "val", "test")[(row // 3) % 3] if row < 9 else "train")
    path = trainingtable.writeManifest(table, str(tmp_path / "work"), makeLogic(sceneContext, tmp_path).writeInputVolume)
    manifest = data.load_manifest(path, check_images=False)
    assert manifest.task == "multiclass" and manifest.labels == ["size_0", "size_1", "size_2"]
    assert [int(c.target) for c in manifest.cases] == [("none", "small", "large").index(name) for name in classes]


def test_multilabel_findings_are_checkbox_columns_exported_as_1_and_0(sceneContext, lesionScene, tmp_path):
    """Each finding and Labelled are bit columns (qMRMLTableModel shows a vtkBitArray column as checkboxes); the
    ticked boxes reach the manifest as 1/0; a row whose Labelled box is unticked is refused, its boxes ignored."""
    import vtk

    volumes, _, labels = lesionScene
    settings = TrainingSettings(name="two", labels=("lesion", "odd"))
    table = trainingtable.createTrainingTable(sceneContext.scene, settings)
    trainingtable.fillFromScene(table, sceneContext.scene)
    columns = [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())]
    assert columns == ["Case", LABELLED_COLUMN, "lesion", "odd", MASK_COLUMN, SPLIT_COLUMN]
    assert [table.GetColumnType(name) == vtk.VTK_BIT for name in columns] == [False, True, True, True, False, False]
    assert [table.GetTable().GetColumn(i).IsA("vtkBitArray") for i in range(6)] == [0, 1, 1, 1, 0, 0]
    odd = [(row // 2) % 2 for row in range(16)]  # independent of lesion: every split gets both values of both
    for row in range(16):  # what clicking the checkboxes does: the bit columns' values change
        table.SetCellText(row, columns.index("lesion"), str(labels[row]))
        table.SetCellText(row, columns.index("odd"), str(odd[row]))
    (first, *_) = problemsOf(table)  # boxes set but no row ticked Labelled: every case is refused by name
    assert first == "case 'case00' (row 1): no label for lesion, odd (tick its Labelled box once its findings are set)"
    assert len(problemsOf(table)) == 16
    for row in range(16):
        trainingtable.setCell(table, row, LABELLED_COLUMN, True)
        trainingtable.setCell(table, row, SPLIT_COLUMN, "train" if row < 8 else ("val" if row < 12 else "test"))
    with pytest.raises(ValueError, match="a checkbox holds 1 or 0"):
        trainingtable.setCell(table, 0, "odd", "yes")
    path = trainingtable.writeManifest(table, str(tmp_path / "work"), makeLogic(sceneContext, tmp_path).writeInputVolume)
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["lesion"], row["odd"]) for row in rows] == [(str(a), str(b)) for a, b in zip(labels, odd)]
    manifest = data.load_manifest(path, check_images=False)
    assert manifest.labels == ["lesion", "odd"] and manifest.task == "multilabel"
    assert [tuple(float(v) for v in c.target) for c in manifest.cases] == [(float(a), float(b)) for a, b in zip(labels, odd)]
    # an unticked Labelled box: the case is refused by name, whatever its finding boxes say
    trainingtable.setCell(table, 6, LABELLED_COLUMN, False)
    assert problemsOf(table) == [first.replace("'case00' (row 1)", "'case06' (row 7)")]
    # a table saved before the checkboxes (text label columns) becomes bit columns, labels kept, "" unlabelled
    old = trainingtable.createTrainingTable(sceneContext.scene, TrainingSettings(name="old", labels=("lesion",)))
    old.RemoveAllColumns()
    for name in ("Case", "lesion", MASK_COLUMN, SPLIT_COLUMN):
        old.AddColumn().SetName(name)
    for row, value in enumerate(("1", "0", "")):
        trainingtable.addCase(old, volumes[row])
        old.SetCellText(row, 1, value)
    trainingtable.setTrainingSettings(old, trainingtable.trainingSettings(old))
    assert old.GetColumnType("lesion") == vtk.VTK_BIT and old.GetColumnType(LABELLED_COLUMN) == vtk.VTK_BIT
    assert [case.labels["lesion"] for case in trainingtable.readCases(old)] == ["1", "0", ""]


def problemsOf(table):
    with pytest.raises(TrainingInputError) as raised:
        trainingtable.checkedCases(table)
    return raised.value.problems


def test_bad_tables_are_refused_before_anything_runs_naming_the_case(sceneContext, lesionScene, tmp_path):
    volumes, masks, labels = lesionScene
    table = labelledTable(sceneContext.scene, volumes, labels)
    unlabelled = "case 'case03' (row 4): no label for lesion (tick its Labelled box once its findings are set)"
    trainingtable.setCell(table, 3, "lesion", "")  # an empty label: the row is not labelled any more
    assert problemsOf(table) == [unlabelled]
    trainingtable.setCell(table, 3, "lesion", 1)  # a ticked finding alone does not make the row labelled
    assert problemsOf(table) == [unlabelled]
    trainingtable.setCell(table, 3, LABELLED_COLUMN, True)
    # a mask on another grid (shifted by one voxel's spacing in x)
    shifted = sceneContext.volumesLogic.CloneVolume(sceneContext.scene, masks[5], "shifted mask")
    origin = list(shifted.GetOrigin())
    shifted.SetOrigin(origin[0] + 0.9, origin[1], origin[2])
    trainingtable.setCell(table, 5, MASK_COLUMN, shifted)
    (problem,) = problemsOf(table)
    assert problem.startswith("case 'case05' (row 6): segmentation 'shifted mask' does not lie on the volume's grid: origin")
    trainingtable.setCell(table, 5, MASK_COLUMN, masks[5])
    # one class only in a split: the validation cases all negative
    for row in range(16):
        trainingtable.setCell(table, row, SPLIT_COLUMN, "val" if row in (0, 2) else ("test" if row in (4, 5, 6, 7) else "train"))
    (problem,) = problemsOf(table)
    assert problem == "split 'val' ('case00', 'case02'): lesion is 0 in every case; it needs both classes"
    # too few cases for a split
    for row in range(16):
        trainingtable.setCell(table, row, SPLIT_COLUMN, "train")
    assert problemsOf(table) == ["split 'val' has no cases (too few cases for a split)",
                                 "split 'test' has no cases (too few cases for a split)"]
    small = labelledTable(sceneContext.scene, volumes[:3], labels[:3])
    trainingtable.removeCase(small, 1)  # the later rows' volumes move up with them
    assert [case.volumeNode for case in trainingtable.readCases(small)[:3]] == [volumes[0], volumes[2], volumes[3]]
    assert [case.name for case in trainingtable.readCases(small)[:3]] == ["case00", "case02", "case03"]
    while small.GetNumberOfRows() > 3:
        trainingtable.removeCase(small, 3)
    assert trainingtable.readCases(small)[-1].volumeNode is volumes[3]
    trainingtable.setCell(small, 2, "lesion", 1)
    trainingtable.setCell(small, 2, LABELLED_COLUMN, True)
    (problem,) = problemsOf(small)
    assert problem.startswith("too few cases to draw the 'auto' splits (cases per label combination {'0': 2, '1': 1}")


def test_train_log_lines_parse():
    assert parseTrainLine("INFO anymc3d.training.trainer: plan: 9 train + 3 val cases, 6 slices of 56 px (LoRA), no cache; "
                          "measured 0.012 s a slice -> about 0.4 min for at most 3 epochs") == ("plan", 0.4, 3)
    assert parseTrainLine("train:  33%|###3      | 1/3 [00:02<00:05]INFO anymc3d.training.trainer: epoch 1/3: training "
                          "loss 0.1734, validation AUROC 0.750 (3 s)") == ("epoch", 1, 3, 0.1734, 0.75)
    assert parseTrainLine("INFO x: resuming /w/lesion.anymc3d.checkpoint.safetensors at epoch 2") == ("resume", 2)
    assert parseTrainLine("epoch 1/3: training loss nan, validation AUROC nan (3 s)")[0] == "epoch"
    assert parseTrainLine("INFO anymc3d: reading manifest") is None


# ---------------------------------------------------------------------------------------------------------------
# Training with the real backend (slow)


@pytest.fixture
def tinyBackbone(tmp_path):
    """A small DINOv2 with load-bearing random weights (a random timm ViT is near-identity: LayerScale 1e-5)."""
    from anymc3d.backbone import (
        BackboneSpec,
        create_backbone,
        make_load_bearing,
        save_backbone,
    )

    spec = BackboneSpec("dinov2_vits14_reg", img_size=56, depth=3, embed_dim=96, num_heads=3)
    return str(save_backbone(make_load_bearing(create_backbone(spec), 0), spec, tmp_path / "tiny.safetensors"))


def startTraining(logic, table, library, onProgress=None, resume=False):
    return TrainingJob(logic, table, library, onProgress=onProgress, resume=resume, trainArguments=TINY_TRAIN).start()


# radon cc 28: one training run (minutes) checked end to end: its assertions are the branches
@pytest.mark.slow
def test_training_through_the_logic_matches_anymc3d_eval(sceneContext, lesionScene, tinyBackbone, tmp_path):
    volumes, masks, labels = lesionScene
    settings = TrainingSettings(name="lesion", labels=("lesion",), backbone=tinyBackbone, epochs=3, device="cpu",
                                description="synthetic lesion", modality="CT", bodyPart="phantom")
    table = labelledTable(sceneContext.scene, volumes, labels, settings, masks=masks)  # mask supervision too
    logic = makeLogic(sceneContext, tmp_path)
    library = PluginLibrary(str(tmp_path / "plugins"))
    reports = []
    job = startTraining(logic, table, library, reports.append)
    assert job.wait(900)
    result = job.result
    assert result.status == "ok", result.message + "\n" + "\n".join(job.stderrLog[-20:])
    # the expected time came first, then one report per epoch with loss and validation AUROC
    training = [r for r in reports if r.stage == "training" and r.expectedMinutes is not None]
    plan = re.search(r"Expected time: about ([0-9.]+) min", training[0].message)  # the trainer's own plan line
    assert training[0].epoch == 0 and plan and training[0].expectedMinutes == float(plan.group(1)) >= 0
    assert reports.index(training[0]) < min(reports.index(r) for r in reports if r.epoch > 0)
    epochs = [r for r in reports if r.epoch > 0]
    assert [r.epoch for r in epochs] == [1, 2, 3] and all(np.isfinite(r.loss) for r in epochs)
    history = job.historyTableNode.GetTable()
    assert history.GetNumberOfRows() == 3 and job.historyChartNode.GetNumberOfPlotSeriesNodes() == 2
    # the plugin is in the plugins folder, with its model card; nothing half-written beside it
    (info,) = library.plugins()[0]
    assert info.path == result.pluginPath and os.listdir(library.folder) == ["lesion.anymc3d"]
    assert info.metadata["labels"] == ["lesion"]
    assert [info.metadata.get(k) for k in ("name", "description", "modality", "body_part")] == [
        "lesion", "synthetic lesion", "CT", "phantom"]  # the table's card
    assert info.metadata["localisation"]["task"] == "synthetic lesion"  # measured on the test cases' masks by eval
    assert job.result.metrics["localisation"]["cases"] == 2  # the test split's two lesion cases
    (recorded,) = info.metadata["evaluation"]["findings"]  # the held-out evaluation travels with the plugin
    assert info.metadata["evaluation"]["cases"] == 4 and info.metadata["evaluation"]["split"] == "test"
    assert recorded["auroc"] == result.metrics["per_label"]["lesion"]["auroc"]
    # the held-out AUROC is what `anymc3d eval` reports on the same manifest, run separately
    manifestPath = os.path.join(result.workFolder, "manifest.csv")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([BACKEND_PATH, os.environ.get("PYTHONPATH", "")]))
    completed = subprocess.run([sys.executable, "-m", "anymc3d", "eval", manifestPath, "--backbone", tinyBackbone,
                                "--plugin", result.pluginPath, "--out", str(tmp_path / "eval"), "--device", "cpu",
                                "--no-localisation"], capture_output=True, text=True, env=env, check=True)
    separate = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result.metrics["macro_auroc"] == pytest.approx(separate["macro_auroc"], abs=1e-9)
    assert result.metrics["cases"] == 4
    # the ROC curve's area (the test cases' probabilities from predict) is that AUROC too
    rocTable = result.rocTableNode.GetTable()
    fpr = [rocTable.GetValue(i, 0).ToDouble() for i in range(rocTable.GetNumberOfRows())]
    tpr = [rocTable.GetValue(i, 1).ToDouble() for i in range(rocTable.GetNumberOfRows())]
    assert np.trapezoid(tpr, fpr) == pytest.approx(result.metrics["macro_auroc"], abs=1e-6)
    assert result.rocChartNode.GetNumberOfPlotSeriesNodes() == 1
    metricsTable = result.metricsTableNode
    assert metricsTable.GetCellText(0, 0) == "lesion" and float(metricsTable.GetCellText(0, 1)) == pytest.approx(
        result.metrics["per_label"]["lesion"]["auroc"])
    with open(manifestPath, encoding="utf-8", newline="") as file:
        testNames = {row["id"] for row in csv.DictReader(file) if row["split"] == "test"}
    assert {v.GetName() for v in result.testVolumeNodes} == testNames


@pytest.mark.slow
def test_cancel_leaves_no_process_and_no_plugin_and_resume_continues(sceneContext, lesionScene, tinyBackbone, tmp_path):
    volumes, _, labels = lesionScene
    settings = TrainingSettings(name="lesion", labels=("lesion",), backbone=tinyBackbone, epochs=4, device="cpu")
    table = labelledTable(sceneContext.scene, volumes, labels, settings)
    logic = makeLogic(sceneContext, tmp_path)
    library = PluginLibrary(str(tmp_path / "plugins"))
    job, seen = None, {}

    def onProgress(progress):
        if progress.epoch == 1 and "pids" not in seen:
            seen["pids"] = [logic.runner.pid, *descendantPids(logic.runner.pid)]
            job.cancel()

    job = TrainingJob(logic, table, library, onProgress=onProgress, trainArguments=TINY_TRAIN)
    job.start()
    assert job.wait(900)
    assert job.result.status == "cancelled"
    for pid in seen["pids"]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    work = job.result.workFolder
    assert not os.path.exists(library.folder) or os.listdir(library.folder) == []
    assert not [name for name in os.listdir(work) if name.endswith(".anymc3d") or ".partial" in name]
    assert os.path.isfile(os.path.join(work, "lesion.anymc3d.checkpoint.safetensors"))
    # a new Logic (as after a restart) resumes from the table's recorded work folder
    assert trainingtable.trainingSettings(table).workFolder == work
    again = makeLogic(sceneContext, tmp_path)
    reports = []
    resumed = TrainingJob(again, table, library, onProgress=reports.append, resume=True, trainArguments=TINY_TRAIN).start()
    assert resumed.wait(900)
    assert resumed.result.status == "ok", resumed.result.message + "\n".join(resumed.stderrLog[-20:])
    epochs = [r.epoch for r in reports if r.epoch > 0]
    assert epochs and epochs[0] >= 2 and epochs[-1] == 4  # continued after the checkpointed epoch(s), not from 1
    with open(os.path.join(work, "lesion.anymc3d.train.jsonl"), encoding="utf-8") as file:
        log = [json.loads(line) for line in file]
    assert [entry["epoch"] for entry in log] == [0, 1, 2, 3]
    assert os.listdir(library.folder) == ["lesion.anymc3d"]
