"""`anymc3d train --name --description --modality --body-part`: the model card of the trained plugin, read back by
the project's reader and by plain zipfile + json; `info` shows it; the intended modality is the one the CT/MR
warning reads; bad texts are refused in one line before anything is read; a resumed run keeps the card."""
from __future__ import annotations

import json
import logging
import zipfile

import pytest

from anymc3d.backbone import save_backbone
from anymc3d.cli import main
from anymc3d.contract import EXIT_USAGE
from anymc3d.modality import intended_modality, modality_mismatch
from anymc3d.plugin import read_plugin_metadata
from anymc3d.training.checkpoints import checkpoint_path, read_checkpoint
from anymc3d.training.config import TrainConfig
from anymc3d.training.trainer import Trainer, train
from conftest import interrupt_at_validation, small_backbone
from train_tasks import one_thread, split_list, write_task  # noqa: F401 (autouse: one torch thread per test)

CARD = {"name": "Lesion finder", "description": "Synthetic spheres; research use only, not for diagnosis.",
        "modality": "MR", "body_part": "brain (phantom)"}
#: a run of seconds: 12 cases of 6 slices, queries and head only
TINY = ["--epochs", "1", "--num-slices", "6", "--no-lora", "--no-augment", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("card")
    bb = small_backbone()
    return write_task(folder / "data", 12, seed=5, splits=split_list(8, 4, 0)), \
        save_backbone(bb.model, bb.spec, folder / "bb.safetensors")


def _card_options(card):
    return ["--name", card["name"], "--description", card["description"], "--modality", card["modality"],
            "--body-part", card["body_part"]]


def test_train_writes_the_card_that_info_shows_and_the_modality_warning_reads(task, tmp_path, capsys):
    manifest, backbone = task
    out = tmp_path / "lesion.anymc3d"
    assert main(["train", str(manifest), "--backbone", str(backbone), "--out", str(out), *TINY,
                 *_card_options(CARD)]) == 0
    with zipfile.ZipFile(out) as zf:  # independent of the project's reader
        raw = json.loads(zf.read("plugin.json").decode("utf-8"))
    assert {k: raw[k] for k in CARD} == CARD
    assert {k: read_plugin_metadata(out)[k] for k in CARD} == CARD
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    for line in (f"plugin       {CARD['name']}  ({out})", f"description  {CARD['description']}",
                 f"modality     {CARD['modality']}", f"body part    {CARD['body_part']}"):
        assert line in text.splitlines(), (line, text)
    # the intended modality is the one predict and the review page check images against
    assert intended_modality(raw) == ("MR", "stated in the plugin")
    warning = modality_mismatch(raw["name"], intended_modality(raw)[0], "CT", "DICOM tag (0008,0060)", -1000.0)
    assert warning.startswith("Lesion finder is meant for MRI images; this image is CT")


def test_without_the_options_the_card_is_as_before(task, tmp_path):
    manifest, backbone = task
    out = tmp_path / "plain.anymc3d"
    assert main(["train", str(manifest), "--backbone", str(backbone), "--out", str(out), *TINY]) == 0
    with zipfile.ZipFile(out) as zf:
        raw = json.loads(zf.read("plugin.json").decode("utf-8"))
    assert raw["name"] == "plain" and raw["description"].startswith("Trained by anymc3d train on manifest.csv")
    assert "modality" not in raw and "body_part" not in raw  # written only when stated


@pytest.mark.parametrize("option, value, field", [
    ("--modality", "ct", "modality"), ("--modality", "MRI scan", "modality"),
    ("--description", "two\nlines", "description"), ("--description", "x" * 2001, "description"),
    ("--body-part", "chest\x00", "body_part"), ("--body-part", "b" * 201, "body_part"),
    ("--name", "tab\there", "name"),
])
def test_bad_card_texts_are_refused_in_one_line_before_anything_runs(tmp_path, caplog, option, value, field):
    out = tmp_path / "p.anymc3d"
    with caplog.at_level(logging.ERROR, logger="anymc3d"):
        # neither the manifest nor the backbone exists: the option is refused before they are read
        code = main(["train", str(tmp_path / "none.csv"), "--backbone", str(tmp_path / "none.safetensors"),
                     "--out", str(out), option, value])
    assert code == EXIT_USAGE
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and errors[0].startswith(f"anymc3d train: {field}: "), errors
    assert not list(tmp_path.iterdir())


def test_a_resumed_run_keeps_the_card_of_its_checkpoint(task, tmp_path, monkeypatch):
    """Interrupted in epoch 2, resumed without the card options: the plugin has the first command's card; the card
    is not part of what makes the run (a new description on --resume is taken, the checkpoint not refused)."""
    manifest, _ = task
    config = TrainConfig(epochs=2, num_slices=6, lora=False, augment=False, **CARD)
    original = interrupt_at_validation(monkeypatch, 2)
    out = tmp_path / "run.anymc3d"
    with pytest.raises(KeyboardInterrupt):
        train(manifest, small_backbone(), out, config, progress=False)
    assert read_checkpoint(checkpoint_path(out))[1]["card"] == CARD
    monkeypatch.setattr(Trainer, "_validate", original)
    bare = TrainConfig(epochs=2, num_slices=6, lora=False, augment=False, description="Second thoughts.")
    train(manifest, small_backbone(), out, bare, progress=False, resume=True)
    meta = read_plugin_metadata(out)
    assert {k: meta[k] for k in CARD} == {**CARD, "description": "Second thoughts."}
