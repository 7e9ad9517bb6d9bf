"""The Train section's name, description, intended modality and body part reach ``anymc3d train``: the command line
TrainingJob starts on a real slicer-core scene, read back by the backend's own parser and training settings."""

import sys

import pytest
import SimpleITK as sitk
from AnyMC3DSlicerLogic import AnyMC3DSlicerLogic, PluginLibrary, trainingtable
from AnyMC3DSlicerLogic.training import TrainingJob, cardArguments
from AnyMC3DSlicerLogic.trainingtable import SPLIT_COLUMN, TrainingSettings

from .slicer_testing import FakeRunner

synthetic = pytest.importorskip("anymc3d.synthetic")
cli = pytest.importorskip("anymc3d.cli")
config = pytest.importorskip("anymc3d.training.config")

CARD = {"name": "Lung nodule", "description": "Research use only; trained on 8 phantoms.", "modality": "CT",
        "bodyPart": "chest"}


def test_card_arguments_leave_out_what_the_table_does_not_state():
    assert cardArguments(TrainingSettings(**CARD)) == ["--name", "Lung nodule", "--description", CARD["description"],
                                                       "--modality", "CT", "--body-part", "chest"]
    assert cardArguments(TrainingSettings(name="lesion", description=" ", modality="")) == ["--name", "lesion"]


def test_the_training_command_carries_the_tables_card(sceneContext, tmp_path):
    for index in range(8):
        path = tmp_path / f"case{index}.nii.gz"
        sitk.WriteImage(synthetic.make_ct_volume(size=(16, 16, 4), lesion=index % 2 == 1, seed=index), str(path))
        sceneContext.loadVolume(path, f"case{index}")
    backbone = tmp_path / "bb.safetensors"
    backbone.write_bytes(b"not read: the runner is a stand-in")
    settings = TrainingSettings(labels=("lesion",), backbone=str(backbone), device="cpu", **CARD)
    table = trainingtable.createTrainingTable(sceneContext.scene, settings)
    trainingtable.fillFromScene(table, sceneContext.scene)
    for row in range(8):
        trainingtable.setCell(table, row, "lesion", row % 2)
        trainingtable.setCell(table, row, trainingtable.LABELLED_COLUMN, True)
        trainingtable.setCell(table, row, SPLIT_COLUMN, ["train", "train", "train", "train", "val", "val", "test",
                                                         "test"][row])
    runner = FakeRunner(lambda command: ([], 1))  # records the command line; the "run" then fails at once
    prefix = [sys.executable, "-m", "anymc3d"]
    logic = AnyMC3DSlicerLogic(sceneContext.scene, runner=runner, backendCommand=prefix,
                               volumesLogic=sceneContext.volumesLogic, tempRoot=str(tmp_path / "runs"))
    logic.trainingRoot = str(tmp_path / "training")
    TrainingJob(logic, table, PluginLibrary(str(tmp_path / "plugins"))).start()
    command = runner.commands[0]
    assert command[:4] == [*prefix, "train"]
    args = cli._parser().parse_args(command[3:])  # the backend's own parser and settings read them
    assert (args.name, args.description, args.modality, args.body_part) == tuple(CARD.values())
    made = config.TrainConfig(name=args.name, description=args.description, modality=args.modality,
                              body_part=args.body_part)
    assert (made.name, made.description, made.modality, made.body_part) == tuple(CARD.values())


@pytest.mark.parametrize("field, value", [("modality", "Computed tomography"), ("description", "two\nlines"),
                                          ("bodyPart", "x" * 201)])
def test_a_bad_card_text_is_refused_before_anything_runs(sceneContext, tmp_path, field, value):
    settings = TrainingSettings(labels=("lesion",), backbone=str(tmp_path / "bb.safetensors"), **{**CARD, field: value})
    table = trainingtable.createTrainingTable(sceneContext.scene, settings)
    runner = FakeRunner(lambda command: ([], 1))
    logic = AnyMC3DSlicerLogic(sceneContext.scene, runner=runner, backendCommand=[sys.executable, "-m", "anymc3d"],
                               volumesLogic=sceneContext.volumesLogic, tempRoot=str(tmp_path / "runs"))
    logic.trainingRoot = str(tmp_path / "training")
    with pytest.raises(trainingtable.TrainingInputError) as info:
        TrainingJob(logic, table, PluginLibrary(str(tmp_path / "plugins"))).start()
    backendName = {"bodyPart": "body_part"}.get(field, field)
    assert info.value.problems[0].startswith(f"plugin {backendName}: ") and len(info.value.problems) == 1
    assert runner.commands == [] and not (tmp_path / "training").exists()
