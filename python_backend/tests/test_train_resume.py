"""Nothing lost: interrupt-and-resume ends with the plugin of an uninterrupted run; a SIGKILL while a
checkpoint is written leaves the previous one readable; DDP with 2 gloo processes == 1 process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from anymc3d.backbone import save_backbone
from anymc3d.plugin import load_plugin, read_training_summary
from anymc3d.training.checkpoints import checkpoint_path, read_checkpoint
from anymc3d.training.config import TrainConfig
from anymc3d.training.trainer import Trainer, train
from conftest import interrupt_at_validation, small_backbone
from train_tasks import split_list, write_task

#: tiny runs: 12 cases, 6 slices each, 3 epochs (each run takes seconds)
TINY = dict(epochs=3, num_slices=6, batch_size=1, accumulation=2, patience=10)


from train_tasks import one_thread  # noqa: E402,F401 (autouse: one torch thread per test)


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("tiny"), 12, seed=5, splits=split_list(8, 4, 0))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    p = load_plugin(path)
    out = {f"head.{k}": v for k, v in p.head.state_dict().items()}
    for view, state in enumerate(p.lora):
        out.update({f"lora{view}.{k}": v for k, v in state.items()})
    return out


def test_interrupt_and_resume_gives_the_uninterrupted_plugin(tiny_task, tmp_path, monkeypatch):
    config = TrainConfig(**TINY)
    full = train(tiny_task, small_backbone(), tmp_path / "full.anymc3d", config, progress=False)[0]
    assert full.summary["epochs_run"] == 3
    # Ctrl-C during the third epoch's validation: epochs 0 and 1 are checkpointed, epoch 2's work is lost
    original = interrupt_at_validation(monkeypatch, 3)
    out = tmp_path / "resumed.anymc3d"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_task, small_backbone(), out, config, progress=False)
    assert not out.exists()
    _, state = read_checkpoint(checkpoint_path(out))
    assert state["next_epoch"] == 2
    monkeypatch.setattr(Trainer, "_validate", original)
    with pytest.raises(Exception, match="--resume"):
        train(tiny_task, small_backbone(), out, config, progress=False)
    resumed = train(tiny_task, small_backbone(), out, config, progress=False, resume=True)[0]
    a, b = _tensors(tmp_path / "full.anymc3d"), _tensors(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ca, cb = load_plugin(tmp_path / "full.anymc3d").config, load_plugin(out).config
    assert (ca.calibration_a, ca.calibration_b, ca.thresholds) == (cb.calibration_a, cb.calibration_b, cb.thresholds)
    assert [h["val_auroc"] for h in full.history] == [h["val_auroc"] for h in resumed.history]
    summary = read_training_summary(out)
    assert summary["splits"]["train"]["cases"] == 8 and summary["epochs_run"] == 3
    assert (out.parent / "resumed.anymc3d.train.jsonl").read_text(encoding="utf-8").count("\n") == 3


_WRITER = r"""
import sys, torch
from pathlib import Path
from anymc3d.training.checkpoints import write_checkpoint
path = Path(sys.argv[1])
i = 0
while True:
    write_checkpoint(path, {"w": torch.full((3_000_000,), float(i))}, {"version": 1, "i": i})
    print(i, flush=True)
    i += 1
"""


def test_sigkill_while_writing_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "run.checkpoint.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for delay in (0.3, 0.55, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True, encoding="utf-8", env=env)
        first = proc.stdout.readline()  # one complete checkpoint exists
        assert first.strip().isdigit()
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        tensors, state = read_checkpoint(path)
        assert torch.equal(tensors["w"], torch.full((3_000_000,), float(state["i"])))
    leftovers = [p.name for p in tmp_path.iterdir() if p != path]
    assert all(".partial" in name for name in leftovers), leftovers  # a killed writer leaves only its temp files


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(tiny_task, tmp_path):
    """Same effective batch (2 cases per step): 1 process accumulates 2 micro-batches, 2 processes take one
    each and all-reduce. Tolerance: 1e-5 absolute on every plugin tensor (summation order may differ)."""
    backbone = save_backbone(small_backbone().model, small_backbone().spec, tmp_path / "bb.safetensors")
    common = [str(tiny_task), "--backbone", str(backbone), "--epochs", "2", "--num-slices", "6", "--batch-size", "1",
              "--accumulation", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "ANYMC3D_DIST_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "anymc3d", "train", *common, "--out", str(tmp_path / "one.anymc3d")],
                         env=env, capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "29517", "-m", "anymc3d", "train", *common, "--out", str(tmp_path / "two.anymc3d")],
                         env=env, capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _tensors(tmp_path / "one.anymc3d"), _tensors(tmp_path / "two.anymc3d")
    assert a.keys() == b.keys()
    moved = max(float((a[k] - small).abs().max()) for k, small in [("head.head.weight", torch.zeros(1))])
    assert moved > 1e-3  # training changed the head, so agreement is not trivial
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), (key, float((a[key] - b[key]).abs().max()))
    assert read_training_summary(tmp_path / "two.anymc3d")["processes"] == 2
