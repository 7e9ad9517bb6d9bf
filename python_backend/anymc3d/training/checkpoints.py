"""Checkpoints: one safetensors file (tensors + JSON in its metadata), written atomically each epoch; every
random draw derives from (seed, epoch, case), so ``--resume`` ends with the plugin of an uninterrupted run."""
from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from anymc3d.fileio import atomic_path
from anymc3d.training.config import TrainingError

CHECKPOINT_VERSION = 1


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], state: dict) -> Path:
    """One safetensors file with the JSON ``state`` in its metadata; temp name then rename (never torn)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    data = safetensors.torch.save(tensors, metadata={"anymc3d.checkpoint": json.dumps(state)})
    with atomic_path(path, ".safetensors") as tmp:
        with open(tmp, "wb") as f:  # written here (save_file would add a temp file of its own)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            state = json.loads((f.metadata() or {})["anymc3d.checkpoint"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise TrainingError(f"{path}: not a readable training checkpoint ({type(exc).__name__}: {exc})") from None
    if state.get("version") != CHECKPOINT_VERSION:
        raise TrainingError(f"{path}: checkpoint version {state.get('version')} (this anymc3d writes {CHECKPOINT_VERSION})")
    return tensors, state


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoint.safetensors")


def log_path(out: Path) -> Path:
    return out.with_name(out.name + ".train.jsonl")
