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
from anymc3d.training.config import CARD_FIELDS, TrainingError

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


def save_run(path: Path, trainable: dict[str, torch.Tensor], optimizer, identity: dict, run: dict) -> Path:
    """A training run's checkpoint: the trainable tensors, the best state, AdamW's moments and the RNG, with
    ``identity`` (what makes it this run) and ``run`` (next_epoch, step, best, history, stopped, and the model card
    texts ``card``) as JSON."""
    best = run["best"]
    tensors = {f"param.{k}": v for k, v in trainable.items()}
    tensors.update({f"best.{k}": v for k, v in best["state"].items()})
    index = {id(p): n for n, p in trainable.items()}
    for p, st in optimizer.state.items():
        for key, value in st.items():
            tensors[f"adam.{index[id(p)]}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    state = {"version": CHECKPOINT_VERSION, "identity": identity, "next_epoch": run["next_epoch"], "step": run["step"],
             "best_epoch": best["epoch"], "best_score": best["score"], "history": run["history"],
             "stopped": run["stopped"], "names": list(trainable), "card": run.get("card", {})}
    return write_checkpoint(path, tensors, json.loads(json.dumps(state)))


def load_run(path: Path, trainable: dict[str, torch.Tensor], optimizer, identity: dict) -> dict:
    """Restore :func:`save_run`'s checkpoint into ``trainable`` and ``optimizer`` (and the RNG); TrainingError
    naming the file when it is another run's. Returns next_epoch, step, best, history, stopped, card."""
    tensors, state = read_checkpoint(path)
    mine = json.loads(json.dumps(identity))
    for key in CARD_FIELDS:  # the model card does not make the run (and an earlier version kept the name here)
        state["identity"].get("config", {}).pop(key, None)
    if state["identity"] != mine:
        differs = [k for k in mine if state["identity"].get(k) != mine[k]]
        raise TrainingError(f"{path}: checkpoint of another run (different {', '.join(differs)}); "
                            "remove it or train into another --out")
    names = {id(p): n for n, p in trainable.items()}
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(tensors[f"param.{name}"])
    for p in trainable.values():
        st = {key.rsplit(".", 1)[1]: t for key, t in tensors.items()
              if key.startswith("adam.") and key.rsplit(".", 1)[0] == f"adam.{names[id(p)]}"}
        if st:
            optimizer.state[p] = {k: v.clone() for k, v in st.items()}
    torch.set_rng_state(tensors["rng.torch"])
    best = {"epoch": state["best_epoch"], "score": state["best_score"],
            "state": {k.removeprefix("best."): t for k, t in tensors.items() if k.startswith("best.")}}
    return {"next_epoch": state["next_epoch"], "step": state["step"], "best": best, "history": state["history"],
            "stopped": state["stopped"], "card": state.get("card", {})}
