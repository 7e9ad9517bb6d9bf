"""Training task plugins (the paper's appendix A3, D, H): LoRA per view on the frozen backbone, task query
pooling and a linear head, trained with focal loss, calibrated on validation, saved as a plugin.

One forward: :class:`anymc3d.model.AnyMC3DModel`. What is added here:

* **Standardised head during training.** Slice embeddings of random (load-bearing) backbones, and to a lesser
  degree of pretrained ones, share a large common part (cosine 0.9994 to their mean on synthetic CT): the
  information is in a varying part ~1/400 of the norm, which AdamW's per-coordinate steps on a raw linear head
  cannot find (issue 12's "trap"). As MAE's linear probe puts a BatchNorm before the head, the head and task
  queries here train on embeddings standardised with the training set's per-dimension mean and std (measured
  once, with the bare backbone), and are folded back into the plain head and query of the plugin format when
  saved (exact, no format change): W = W'/sigma, b = b' - W mu, q = q'/sigma (softmax ignores the shift).
* AdamW in two groups (LoRA; queries + head [+ decoder]), linear warm-up then cosine, gradient accumulation,
  bf16 autocast on CUDA only, validation AUROC each epoch, best state kept, early stopping.
* Checkpoints: one safetensors file (tensors + JSON in its metadata), written atomically each epoch; every
  random draw derives from (seed, epoch, case), so ``--resume`` ends with the plugin of an uninterrupted run.
* Several processes (``torchrun``): each rank takes its share of each step's cases; gradients are summed with
  one ``all_reduce`` per optimizer step (what DDP's reducer does, written out because the optional decoder
  and accumulation would need DDP's unused-parameter and no_sync bookkeeping); rank 0 alone writes.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn
from torch.nn.utils import parametrize

from anymc3d.augment import AugmentConfig, Augmenter
from anymc3d.backbone import LoadedBackbone, load_backbone, spec_from_file
from anymc3d.calibration import calibrate
from anymc3d.data import (Manifest, PreparedCase, assign_split, fold_splits, load_manifest, prepare_case,
                          with_splits)
from anymc3d.decoder import SegDecoder
from anymc3d.errors import AnyMC3DError
from anymc3d.evaluation import auroc, one_hot, youden_threshold
from anymc3d.fileio import atomic_path, write_text_atomic
from anymc3d.lora import LoraSettings, adapter_state, add_adapter, remove_adapter
from anymc3d.losses import FocalLossConfig, dice_ce_loss, focal_loss
from anymc3d.model import AnyMC3DModel
from anymc3d.plugin import (ENSEMBLE_INDEX, PluginConfig, TaskPlugin, calibrated_logits, ensemble_members,  # noqa: F401
                            probabilities, save_plugin)
from anymc3d.preprocessing import PreprocessConfig

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


class TrainingError(AnyMC3DError):
    """A training run that cannot start or continue (bad options, checkpoint of another run)."""


@dataclass
class TrainConfig:
    """Training settings; the defaults learn on small data sets (see the tests)."""

    epochs: int = 30
    batch_size: int = 2                  # volumes per micro-batch
    accumulation: int = 1                # micro-batches per optimizer step (over all processes)
    lr_lora: float = 1e-4
    wd_lora: float = 1e-5
    lr_head: float = 1e-3
    wd_head: float = 1e-4
    warmup_fraction: float = 0.1         # of all optimizer steps
    patience: int = 10                   # epochs without a better validation AUROC before stopping
    gamma: float = 2.0
    alpha: float = 0.25
    seed: int = 0
    augment: bool = True
    standardize: bool = True
    lora: bool = True                    # False: train queries and head only (frozen features)
    lambda_seg: float = 1.0              # weight of the auxiliary Dice + CE (cases with masks only)
    aux_seg: Optional[bool] = None       # None: on when some training cases have masks
    input_size: Optional[int] = None     # None: the backbone's img_size
    num_slices: Optional[int] = None     # None: keep each volume's slice count
    intensity: str = "ct"
    window: Optional[str] = "soft_tissue"
    chunk_size: int = 32
    val_fraction: float = 0.25           # without a split column
    name: str = ""

    def __post_init__(self):
        for key in ("epochs", "batch_size", "accumulation", "chunk_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key}: must be a positive integer, got {getattr(self, key)!r}")
        if self.patience < 1:
            raise ValueError(f"patience: must be >= 1, got {self.patience!r}")
        for key in ("lr_lora", "lr_head"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}: must be positive, got {getattr(self, key)!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction: must be in [0, 1), got {self.warmup_fraction!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction: must be in (0, 1), got {self.val_fraction!r}")
        if self.lambda_seg < 0:
            raise ValueError(f"lambda_seg: must be >= 0, got {self.lambda_seg!r}")
        FocalLossConfig(self.gamma, self.alpha)


# ------------------------------------------------------------------------------------------ distributed
@dataclass
class Dist:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed() -> Dist:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("ANYMC3D_DIST_BACKEND") != "gloo" else "gloo"
        torch.distributed.init_process_group(backend)
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size())


# ------------------------------------------------------------------------------------------ standardised head
class _Scale(nn.Module):
    """Parametrisation q = q' * inv_std (the task queries see standardised embeddings)."""

    def __init__(self, inv_std: torch.Tensor):
        super().__init__()
        self.register_buffer("inv_std", inv_std)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return q * self.inv_std


class StandardizedLinear(nn.Module):
    """The head during training: ``W' ((v - mu) / sigma) + b'``; :meth:`fold` gives the equivalent nn.Linear."""

    def __init__(self, linear: nn.Linear, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        with torch.no_grad():
            self.weight = nn.Parameter(linear.weight * std)          # (K, C), same function as ``linear``
            self.bias = nn.Parameter(linear.bias + linear.weight @ mean)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear((v - self.mean.to(v.dtype)) / self.std.to(v.dtype), self.weight, self.bias)

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        out = nn.Linear(self.weight.shape[1], self.weight.shape[0])
        w = self.weight / self.std
        out.weight.copy_(w)
        out.bias.copy_(self.bias - w @ self.mean)
        return out


def standardize_head(head: TaskPlugin, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Reparametrise ``head`` in place to train on standardised embeddings (same function at the start)."""
    head.head = StandardizedLinear(head.head, mean, std)
    for pool in [head.task_pool, *(head.view_pools or [])]:
        with torch.no_grad():
            pool.query.mul_(std)  # q' = q * sigma, so q = q' / sigma is unchanged
        parametrize.register_parametrization(pool, "query", _Scale(1.0 / std))


def plain_head(head: TaskPlugin) -> TaskPlugin:
    """A plain :class:`TaskPlugin` computing exactly what the (possibly standardised) ``head`` computes."""
    out = TaskPlugin(head.embed_dim, head.num_classes, head.num_views)
    with torch.no_grad():
        pools = [(head.task_pool, out.task_pool)] + list(zip(head.view_pools or [], out.view_pools or []))
        for src, dst in pools:
            dst.query.copy_(src.query.detach())  # the parametrised value when standardised
        linear = head.head.fold() if isinstance(head.head, StandardizedLinear) else head.head
        out.head.load_state_dict(linear.state_dict())
    return out


# ------------------------------------------------------------------------------------------ batches
def _case_seed(seed: int, epoch: int, row: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + row * 101) % (2 ** 31)


def collate(items: Sequence[PreparedCase], num_views: int):
    """Pad cases to a batch: per view (B, S_max, M, M) slices and (B, S_max) masks; targets; seg masks."""
    views, masks = [], []
    for v in range(num_views):
        s_max = max(item.views[v].shape[0] for item in items)
        m = items[0].views[v].shape[-1]
        x = torch.zeros(len(items), s_max, m, m)
        real = torch.zeros(len(items), s_max, dtype=torch.bool)
        for b, item in enumerate(items):
            s = item.views[v].shape[0]
            x[b, :s], real[b, :s] = item.views[v], True
        views.append(x), masks.append(real)
    targets = torch.stack([item.target for item in items])
    return views, masks, targets


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine to 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------ checkpoints
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


# ------------------------------------------------------------------------------------------ trainer
@dataclass
class TrainResult:
    plugin: Optional[Path]
    summary: dict
    history: list[dict] = field(default_factory=list)


class Trainer:
    """Trains one plugin on a manifest whose cases all have a split."""

    def __init__(self, manifest: Manifest, backbone: LoadedBackbone, out: Path, config: TrainConfig,
                 device: str | torch.device = "cpu", dist: Optional[Dist] = None, progress: bool = True):
        self.manifest, self.backbone, self.out, self.config = manifest, backbone, Path(out), config
        self.device = torch.device(device)
        self.dist = dist or Dist()
        self.progress = progress and self.dist.main
        size = config.input_size or backbone.spec.img_size
        if size % backbone.spec.patch_size:
            raise TrainingError(f"input_size {size} is not a multiple of the patch size {backbone.spec.patch_size}")
        self.recipe = PreprocessConfig(input_size=size, num_slices=config.num_slices, intensity=config.intensity,
                                       window=config.window if config.intensity == "ct" else None)
        self.train_cases = manifest.subset("train")
        self.val_cases = manifest.subset("val")
        if not self.train_cases or not self.val_cases:
            raise TrainingError(f"{manifest.path}: training needs train and val cases")
        self.lora_settings = LoraSettings()
        self.augmenter = Augmenter(AugmentConfig() if config.augment else AugmentConfig.off())
        self.prepared: dict[int, PreparedCase] = {}
        has_masks = any(c.mask is not None for c in self.train_cases)
        self.aux_seg = has_masks if config.aux_seg is None else bool(config.aux_seg and has_masks)

    # -------------------------------------------------------------- setup
    def _prepared(self, case) -> PreparedCase:
        if case.row not in self.prepared:
            self.prepared[case.row] = prepare_case(self.manifest, case, [self.recipe] * len(self.manifest.views))
        return self.prepared[case.row]

    def _build(self) -> None:
        torch.manual_seed(self.config.seed)
        model = self.backbone.model.to(self.device)
        self.adapters = [f"_train{v}" for v in range(len(self.manifest.views))]
        for name in self.adapters:
            add_adapter(model, name, self.lora_settings)
        for pname, p in model.named_parameters():
            p.requires_grad_(self.config.lora and any(f".{a}." in pname for a in self.adapters))
        c = model.embed_dim
        self.head = TaskPlugin(c, len(self.manifest.labels), len(self.manifest.views))
        with torch.no_grad():
            self.head.head.weight.normal_(0, 0.01)
            self.head.head.bias.zero_()
        self.decoder = SegDecoder(c) if self.aux_seg else None
        self.model = AnyMC3DModel(model, self.head, self.adapters, kind="slice_lora", chunk_size=self.config.chunk_size)
        if self.config.standardize:
            mean, std = self._embedding_stats()
            standardize_head(self.head, mean, std)
        self.head.to(self.device)
        if self.decoder is not None:
            self.decoder.to(self.device)
        lora_params = [p for p in model.parameters() if p.requires_grad]
        head_params = list(self.head.parameters()) + (list(self.decoder.parameters()) if self.decoder else [])
        groups = [{"params": head_params, "lr": self.config.lr_head, "weight_decay": self.config.wd_head}]
        if lora_params:
            groups.append({"params": lora_params, "lr": self.config.lr_lora, "weight_decay": self.config.wd_lora})
        self.base_lrs = [g["lr"] for g in groups]
        self.optimizer = torch.optim.AdamW(groups)

    def trainable(self) -> dict[str, torch.Tensor]:
        """Every trained tensor by a stable name (LoRA, head, decoder)."""
        out = {f"lora.{n}": p for n, p in self.backbone.model.named_parameters() if p.requires_grad}
        out.update({f"head.{n}": p for n, p in self.head.named_parameters()})
        if self.decoder is not None:
            out.update({f"decoder.{n}": p for n, p in self.decoder.named_parameters()})
        return out

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    @torch.no_grad()
    def _embedding_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and std of the training slices' embeddings (bare backbone: LoRA B is 0)."""
        c = self.backbone.model.embed_dim
        total = torch.zeros(2 * c + 1, dtype=torch.float64)
        for case in self.train_cases[self.dist.rank::self.dist.world]:
            item = self._prepared(case)
            views, masks, _ = collate([item], len(self.adapters))
            with self._autocast():
                out = self.model([v.to(self.device) for v in views], masks=[m.to(self.device) for m in masks])
            for emb, m in zip(out.embeddings, masks):
                h = emb[m.to(emb.device)].double().cpu()  # (N, C)
                total += torch.cat([h.sum(0), (h ** 2).sum(0), torch.tensor([h.shape[0]], dtype=torch.float64)])
        total = self.dist.all_sum(total)
        n = total[-1]
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean ** 2).clamp_min(0)
        std = var.sqrt().clamp_min(1e-6 * float(var.sqrt().max()) + 1e-12)
        return mean.float().to(self.device), std.float().to(self.device)

    # -------------------------------------------------------------- one epoch
    def _steps(self, epoch: int) -> list[list[list]]:
        """The epoch's optimizer steps, each a list of micro-batches of cases (seeded shuffle)."""
        g = torch.Generator().manual_seed(self.config.seed * 7919 + epoch)
        order = torch.randperm(len(self.train_cases), generator=g).tolist()
        bs, acc = self.config.batch_size, self.config.accumulation
        micro = [[self.train_cases[i] for i in order[j:j + bs]] for j in range(0, len(order), bs)]
        return [micro[j:j + acc] for j in range(0, len(micro), acc)]

    def _augmented(self, case, epoch: int) -> PreparedCase:
        item = self._prepared(case)
        if not self.config.augment:
            return item
        seed = _case_seed(self.config.seed, epoch, case.row)
        views = []
        mask = item.mask
        for v, x in enumerate(item.views):
            x, m = self.augmenter(x, mask if v == 0 else None, seed + v)
            views.append(x)
            mask = m if v == 0 else mask
        return PreparedCase(views=views, mask=mask, target=item.target)

    def _loss(self, items: Sequence[PreparedCase]) -> tuple[torch.Tensor, float, Optional[float]]:
        views, masks, targets = collate(items, len(self.adapters))
        want_tokens = self.decoder is not None and any(it.mask is not None for it in items)
        with self._autocast():
            out = self.model([v.to(self.device) for v in views], masks=[m.to(self.device) for m in masks],
                             patch_tokens=want_tokens)
        task = self.manifest.task
        loss = focal_loss(out.logits.float(), targets.to(self.device), task, FocalLossConfig(self.config.gamma, self.config.alpha))
        if want_tokens:
            seg = []
            for b, it in enumerate(items):
                if it.mask is None:
                    continue
                s = it.views[0].shape[0]
                logits = self.decoder(out.patch_tokens[0][b:b + 1, :s], it.mask.shape[-2:])  # (1, S, M, M)
                seg.append(dice_ce_loss(logits, it.mask[None].to(self.device)))
            seg_loss = torch.stack(seg).mean()
            loss = loss + self.config.lambda_seg * seg_loss * (len(seg) / len(items))
            return loss, float(loss.detach()), float(seg_loss.detach())
        return loss, float(loss.detach()), None

    def _train_epoch(self, epoch: int, step0: int, total_steps: int) -> tuple[float, int]:
        self.head.train()
        params = list(self.trainable().values())
        warmup = int(self.config.warmup_fraction * total_steps)
        loss_sum = torch.zeros(4, dtype=torch.float64)  # loss sum, cases, seg-loss sum, cases with masks
        step = step0
        for micro_batches in self._steps(epoch):
            n_step = sum(len(mb) for mb in micro_batches)
            for g, base in zip(self.optimizer.param_groups, self.base_lrs):
                g["lr"] = base * _lr_factor(step, total_steps, warmup)
            self.optimizer.zero_grad(set_to_none=False)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            for mb in micro_batches[self.dist.rank::self.dist.world]:
                items = [self._augmented(c, epoch) for c in mb]
                loss, value, seg = self._loss(items)
                (loss * (len(mb) / n_step)).backward()
                loss_sum += torch.tensor([value * len(mb), len(mb), (seg or 0.0) * len(mb), len(mb) if seg is not None else 0],
                                         dtype=torch.float64)
            if self.dist.world > 1:
                flat = torch.cat([p.grad.reshape(-1) for p in params])
                self.dist.all_sum(flat)
                offset = 0
                for p in params:
                    p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
            self.optimizer.step()
            step += 1
        loss_sum = self.dist.all_sum(loss_sum)
        self.last_seg_loss = float(loss_sum[2] / loss_sum[3]) if loss_sum[3] > 0 else None
        return float(loss_sum[0] / max(1.0, float(loss_sum[1]))), step

    # -------------------------------------------------------------- validation
    @torch.no_grad()
    def logits(self, cases) -> np.ndarray:
        """Raw logits (N, K) of ``cases`` (no augmentation), in order; shared among processes."""
        self.head.eval()
        mine = {}
        for i in range(self.dist.rank, len(cases), self.dist.world):
            views, masks, _ = collate([self._prepared(cases[i])], len(self.adapters))
            with self._autocast():
                out = self.model([v.to(self.device) for v in views], masks=[m.to(self.device) for m in masks])
            mine[i] = out.logits.float().cpu().numpy()[0]
        merged = {}
        for part in self.dist.gather(mine):
            merged.update(part)
        return np.stack([merged[i] for i in range(len(cases))])

    def _validate(self) -> dict:
        z = self.logits(self.val_cases)
        y = self.manifest.targets(self.val_cases)
        task = self.manifest.task
        loss = float(focal_loss(torch.from_numpy(z), torch.from_numpy(y), task,
                                FocalLossConfig(self.config.gamma, self.config.alpha)))
        probs = probabilities(torch.from_numpy(z), task).numpy()
        yk = one_hot(y, z.shape[1])
        per = [auroc(yk[:, k], probs[:, k]) for k in range(z.shape[1])]
        per = [a for a in per if a is not None]
        return {"val_loss": loss, "val_auroc": float(np.mean(per)) if per else float("nan")}

    # -------------------------------------------------------------- checkpoints
    def _identity(self) -> dict:
        return {"manifest_sha256": self.manifest.sha256, "backbone_fingerprint": self.backbone.fingerprint,
                "config": asdict(self.config), "world": self.dist.world,
                "splits": {c.row: c.split for c in self.manifest.cases}}

    def _save(self, next_epoch: int, step: int, best: dict, history: list, stopped: bool) -> None:
        if not self.dist.main:
            return
        tensors = {f"param.{k}": v for k, v in self.trainable().items()}
        tensors.update({f"best.{k}": v for k, v in best["state"].items()})
        names = list(self.trainable())
        index = {id(p): n for n, p in self.trainable().items()}
        for p, st in self.optimizer.state.items():
            for key, value in st.items():
                tensors[f"adam.{index[id(p)]}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        tensors["rng.torch"] = torch.get_rng_state()
        state = {"version": CHECKPOINT_VERSION, "identity": self._identity(), "next_epoch": next_epoch, "step": step,
                 "best_epoch": best["epoch"], "best_score": best["score"], "history": history, "stopped": stopped,
                 "names": names}
        write_checkpoint(checkpoint_path(self.out), tensors, json.loads(json.dumps(state)))

    def _load(self, path: Path) -> tuple[int, int, dict, list, bool]:
        tensors, state = read_checkpoint(path)
        mine = json.loads(json.dumps(self._identity()))
        if state["identity"] != mine:
            differs = [k for k in mine if state["identity"].get(k) != mine[k]]
            raise TrainingError(f"{path}: checkpoint of another run (different {', '.join(differs)}); "
                                "remove it or train into another --out")
        trainable = self.trainable()
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(tensors[f"param.{name}"])
        for p in trainable.values():
            st = {key.rsplit(".", 1)[1]: t for key, t in tensors.items()
                  if key.startswith("adam.") and key.rsplit(".", 1)[0] == f"adam.{self._name_of(p, trainable)}"}
            if st:
                self.optimizer.state[p] = {k: v.clone() for k, v in st.items()}
        torch.set_rng_state(tensors["rng.torch"])
        best = {"epoch": state["best_epoch"], "score": state["best_score"],
                "state": {k.removeprefix("best."): t for k, t in tensors.items() if k.startswith("best.")}}
        return state["next_epoch"], state["step"], best, state["history"], state["stopped"]

    @staticmethod
    def _name_of(p, trainable) -> str:
        for n, q in trainable.items():
            if q is p:
                return n
        raise KeyError

    # -------------------------------------------------------------- the run
    def fit(self, resume: bool = False) -> TrainResult:
        t0 = time.time()
        self._build()
        steps_per_epoch = len(self._steps(0))
        total_steps = steps_per_epoch * self.config.epochs
        start, step, history, stopped = 0, 0, [], False
        best = {"epoch": -1, "score": [-1.0, -float("inf")], "state": self._snapshot()}
        ckpt = checkpoint_path(self.out)
        if resume and ckpt.exists():
            start, step, best, history, stopped = self._load(ckpt)
            logger.info("resuming %s at epoch %d", ckpt, start)
        elif resume:
            logger.info("no checkpoint at %s: starting from the beginning", ckpt)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.config.epochs, initial=start, unit="epoch", file=sys.stderr, desc="train")
        epoch = start
        while epoch < self.config.epochs and not stopped:
            loss, step = self._train_epoch(epoch, step, total_steps)
            metrics = self._validate()
            # ties go to the later epoch: a small validation set saturates at AUROC 1.0 early, and the tie-break
            # by validation loss then picked an early epoch (held-out AUROC 0.85 against 1.0 for the last one)
            score = [metrics["val_auroc"] if math.isfinite(metrics["val_auroc"]) else -1.0, float(epoch)]
            improved = score[0] >= best["score"][0]
            if improved:
                best = {"epoch": epoch, "score": score, "state": self._snapshot()}
            history.append({"epoch": epoch, "train_loss": loss, "train_seg_loss": self.last_seg_loss, **metrics, "best": improved,
                            "lr_head": self.optimizer.param_groups[0]["lr"], "time_s": round(time.time() - t0, 2)})
            stopped = epoch - best["epoch"] >= self.config.patience
            epoch += 1
            self._save(epoch, step, best, history, stopped)
            if self.dist.main:
                self._write_log(history)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", val_auroc=f"{metrics['val_auroc']:.3f}")
                bar.update(1)
            self.dist.barrier()
        if bar is not None:
            bar.close()
        if stopped:
            logger.info("early stop after epoch %d (best %d)", epoch - 1, best["epoch"])
        return self._finish(best, history, time.time() - t0)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.trainable().items()}

    def _write_log(self, history: list) -> None:
        write_text_atomic(log_path(self.out), "".join(json.dumps(h) + "\n" for h in history))

    def _finish(self, best: dict, history: list, seconds: float) -> TrainResult:
        with torch.no_grad():
            for name, p in self.trainable().items():
                p.copy_(best["state"][name])
        z = self.logits(self.val_cases)
        y = self.manifest.targets(self.val_cases)
        task = self.manifest.task
        cal = calibrate(z, y, task)
        head = plain_head(self.head.cpu())
        self.head.to(self.device)
        lora = [adapter_state(self.backbone.model, a) for a in self.adapters]
        lora = [{k: v.cpu() for k, v in s.items()} for s in lora]
        name = self.config.name or self.out.name.split(".")[0]
        probs = _calibrated_probs(z, cal.a, cal.b, task)
        yk = one_hot(y, z.shape[1])
        youden = [youden_threshold(yk[:, k], probs[:, k]) for k in range(z.shape[1])]
        summary = {
            **self.manifest.summary(), "epochs_run": len(history), "epochs_max": self.config.epochs,
            "best_epoch": best["epoch"], "best_val_auroc": best["score"][0], "seconds": round(seconds, 1),
            "processes": self.dist.world, "config": asdict(self.config),
            "raw_f1_thresholds": cal.raw_thresholds, "youden_thresholds_validation": youden,
            "standardized_head": self.config.standardize, "aux_seg": self.aux_seg,
            "val_auroc_per_label": {lab: auroc(yk[:, k], probs[:, k]) for k, lab in enumerate(self.manifest.labels)},
        }
        config = PluginConfig(name=name, labels=list(self.manifest.labels), task=task, backbone=self.backbone.spec,
                              backbone_fingerprint=self.backbone.fingerprint, views=list(self.manifest.views),
                              preprocessing=[self.recipe] * len(self.manifest.views), lora=self.lora_settings,
                              calibration_a=cal.a, calibration_b=cal.b, thresholds=cal.thresholds,
                              description=f"Trained by anymc3d train on {self.manifest.path.name} "
                                          f"({summary['splits']}); best validation AUROC {best['score'][0]:.3f}.")
        path = None
        if self.dist.main:
            path = save_trained_plugin(self.out, config, head, lora, summary)
            if self.decoder is not None and getattr(self, "save_decoder", False):
                write_checkpoint(self.out.with_name(self.out.name + ".decoder.safetensors"),
                                 dict(self.decoder.state_dict()), {"version": CHECKPOINT_VERSION})
        for a in self.adapters:
            remove_adapter(self.backbone.model, a)
        self.dist.barrier()
        return TrainResult(path, summary, history)


def _calibrated_probs(z: np.ndarray, a: Sequence[float], b: Sequence[float], task: str) -> np.ndarray:
    t = torch.from_numpy(np.asarray(z, dtype=np.float32))
    t = t * torch.tensor(a, dtype=torch.float32) + torch.tensor(b, dtype=torch.float32)
    return probabilities(t, task).numpy()


# ------------------------------------------------------------------------------------------ plugin + summary
def save_trained_plugin(out: Path, config: PluginConfig, head: TaskPlugin, lora, summary: dict) -> Path:
    """Save the plugin with its training summary in the plugin's weights metadata (``read_training_summary``)."""
    if out.is_dir() and (out / "plugin.json").is_file():
        import shutil

        shutil.rmtree(out)  # the plugin folder of an earlier run into this --out (save_plugin refuses to overwrite)
    return save_plugin(out, config, head, lora, training=json.loads(json.dumps(summary, default=float)))


# ------------------------------------------------------------------------------------------ entry points
def train(manifest_path: Path | str, backbone: LoadedBackbone | Path | str, out: Path | str,
          config: Optional[TrainConfig] = None, labels: Optional[Sequence[str]] = None, device: str = "cpu",
          resume: bool = False, folds: int = 1, progress: bool = True, task: Optional[str] = None,
          manifest: Optional[Manifest] = None) -> list[TrainResult]:
    """Check the manifest, then train one plugin (or ``folds`` plugins on stratified folds) into ``out``."""
    config = config or TrainConfig()
    dist = init_distributed()
    out = Path(out)
    if manifest is None:
        manifest = load_manifest(manifest_path, labels=labels, task=task)
    if not isinstance(backbone, LoadedBackbone):
        backbone = load_backbone(backbone, spec_from_file(backbone))
    if not resume and checkpoint_path(out).exists():
        raise TrainingError(f"{checkpoint_path(out)}: a checkpoint of an earlier run exists; add --resume to "
                            "continue it, or remove it to start again")
    out.parent.mkdir(parents=True, exist_ok=True)
    if folds <= 1:
        assign_split(manifest, config.val_fraction, 0.0, config.seed)
        return [Trainer(manifest, backbone, out, config, device, dist, progress).fit(resume)]
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for k, assignment in enumerate(fold_splits(manifest, folds, config.seed)):
        fold = with_splits(manifest, assignment)
        target = out / f"fold{k}.anymc3d"
        fold_config = dataclasses.replace(config, name=config.name or out.name.split(".")[0])
        results.append(Trainer(fold, backbone, target, fold_config, device, dist, progress).fit(resume))
    if dist.main:
        write_text_atomic(out / ENSEMBLE_INDEX, json.dumps(
            {"plugins": [f"fold{k}.anymc3d" for k in range(folds)], "folds": folds,
             "val_auroc": [r.summary["best_val_auroc"] for r in results]}, indent=2))
    return results


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def predict_manifest(manifest: Manifest, cases, backbone: LoadedBackbone, plugins, device: str = "cpu",
                     chunk_size: int = 32) -> np.ndarray:
    """Calibrated probabilities (N, K) of ``cases`` under one plugin, or the mean calibrated logit of an
    ensemble (as ``predict --ensemble``), through :class:`AnyMC3DModel`."""
    from anymc3d.lora import load_adapter_state

    dev = torch.device(device)
    model = backbone.model.to(dev)
    total = None
    for k, plugin in enumerate(plugins):
        config = plugin.config
        if config.backbone_fingerprint != backbone.fingerprint:
            raise TrainingError(f"{plugin.path}: plugin was trained on another backbone (weights "
                                f"{config.backbone_fingerprint[:12]} vs {backbone.fingerprint[:12]})")
        adapters = [f"_eval{k}_{v}" for v in range(len(config.views))]
        for name, state in zip(adapters, plugin.lora):
            add_adapter(model, name, config.lora)
            load_adapter_state(model, name, state)
        head = plugin.head.to(dev).eval()
        net = AnyMC3DModel(model, head, adapters, kind=config.kind, chunk_size=chunk_size)
        rows = []
        try:
            for case in cases:
                item = prepare_case(manifest, case, config.preprocessing)
                views, masks, _ = collate([item], len(adapters))
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    out = net([v.to(dev) for v in views], masks=[m.to(dev) for m in masks])
                rows.append(calibrated_logits(out.logits.float(), config).cpu())
        finally:
            for name in adapters:
                remove_adapter(model, name)
        z = torch.cat(rows)
        total = z if total is None else total + z
    # float64: a float32 sigmoid is exactly 1.0 above ~17, and tied scores would cost the metrics their ranking
    return probabilities(total.double() / len(plugins), plugins[0].config.task).numpy()


def evaluate_plugin(manifest_path: Path | str, backbone: Path | str | LoadedBackbone, plugin: Path | str,
                    out: Path | str, device: str = "cpu", bootstrap: int = 1000) -> dict:
    """``anymc3d eval``: metrics of a plugin (or ``--folds`` ensemble folder) on a manifest's test split
    (every case when the manifest has no test split); Youden thresholds from validation (the plugin's
    training summary, or the manifest's val split), never from the evaluated cases."""
    from anymc3d.evaluation import evaluate, write_report
    from anymc3d.plugin import load_plugin, read_training_summary

    members = ensemble_members(Path(plugin))
    plugins = [load_plugin(p) for p in members]
    config = plugins[0].config
    task = config.task
    labels = None if task == "multiclass" else list(config.labels)
    manifest = load_manifest(manifest_path, labels=labels, task=task)
    if manifest.labels != list(config.labels):
        raise TrainingError(f"{manifest_path}: labels {manifest.labels} differ from the plugin's {config.labels}")
    if not isinstance(backbone, LoadedBackbone):
        backbone = load_backbone(backbone, spec_from_file(backbone) or config.backbone)
    cases = manifest.subset("test") or ([] if any(c.split for c in manifest.cases) else manifest.cases)
    if not cases:
        raise TrainingError(f"{manifest_path}: the split column has no test cases to evaluate")
    probs = predict_manifest(manifest, cases, backbone, plugins, device)
    y = manifest.targets(cases)
    val_cases = manifest.subset("val")
    val_y = val_p = None
    if val_cases:
        val_y, val_p = manifest.targets(val_cases), predict_manifest(manifest, val_cases, backbone, plugins, device)
    metrics = evaluate(y, probs, config.labels, config.thresholds, val_y, val_p, bootstrap=bootstrap)
    summaries = [read_training_summary(p) for p in members]
    if val_cases is None or not val_cases:
        stored = [s.get("youden_thresholds_validation") if s else None for s in summaries]
        if len(plugins) == 1 and stored[0]:
            from anymc3d.evaluation import at_threshold

            yk = one_hot(y, probs.shape[1])
            for k, label in enumerate(config.labels):
                t = stored[0][k]
                metrics["per_label"][label]["youden_threshold_from_validation"] = t
                metrics["per_label"][label]["at_youden"] = None if t is None else at_threshold(yk[:, k], probs[:, k], t)
    metrics.update({"plugin": [str(p) for p in members], "manifest": str(manifest.path),
                    "manifest_sha256": manifest.sha256, "evaluated_split": "test" if manifest.subset("test") else "all"})
    write_report(metrics, y, probs, Path(out))
    return metrics


# ------------------------------------------------------------------------------------------ CLI
def register(sub) -> None:
    """Add ``train`` and ``eval`` to the ``anymc3d`` command line (called from ``cli._parser``)."""
    d = TrainConfig()
    p = sub.add_parser("train", help="Train a task plugin on a manifest (CSV of images and labels).")
    p.add_argument("manifest", type=Path, help="Manifest CSV: image (or image_<view>) columns, label columns, "
                   "optional split and mask columns; paths relative to the CSV.")
    p.add_argument("--backbone", type=Path, required=True, help="Backbone weights file (required; never rewritten).")
    p.add_argument("--out", type=Path, required=True, help="Plugin to write (.anymc3d file, or a folder); with "
                   "--folds K, a folder of K plugins and ensemble.json.")
    p.add_argument("--labels", default=None, help="Comma-separated label columns (default: every other column).")
    p.add_argument("--task", default=None, choices=["multilabel", "multiclass"],
                   help="Task (default: multiclass for one integer column with values above 1, else multilabel).")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"Maximum epochs (default: {d.epochs}).")
    p.add_argument("--patience", type=int, default=d.patience, help=f"Early-stopping patience in epochs (default: {d.patience}).")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"Volumes per micro-batch (default: {d.batch_size}).")
    p.add_argument("--accumulation", type=int, default=d.accumulation,
                   help=f"Micro-batches per optimizer step, over all processes (default: {d.accumulation}).")
    p.add_argument("--lr-lora", type=float, default=d.lr_lora, help=f"LoRA learning rate (default: {d.lr_lora}).")
    p.add_argument("--lr-head", type=float, default=d.lr_head, help=f"Query and head learning rate (default: {d.lr_head}).")
    p.add_argument("--gamma", type=float, default=d.gamma, help=f"Focal-loss gamma (default: {d.gamma}).")
    p.add_argument("--alpha", type=float, default=d.alpha, help=f"Focal-loss alpha (default: {d.alpha}).")
    p.add_argument("--input-size", type=int, default=None, help="Slice size in pixels (default: the backbone's img_size).")
    p.add_argument("--num-slices", type=int, default=None, help="Resample each volume to this many slices (default: keep).")
    p.add_argument("--intensity", default=d.intensity, choices=["ct", "mri_zscore", "mri_percentile", "none"],
                   help=f"Intensity mapping (default: {d.intensity}).")
    p.add_argument("--window", default=d.window, help=f"CT window preset (default: {d.window}).")
    p.add_argument("--no-augment", action="store_true", help="Turn the 3D augmentation off (default: on).")
    p.add_argument("--no-lora", action="store_true", help="Train queries and head only, no LoRA (default: LoRA on).")
    p.add_argument("--no-standardize", action="store_true",
                   help="Train the head on raw embeddings instead of standardised ones (default: standardised).")
    p.add_argument("--lambda-seg", type=float, default=d.lambda_seg,
                   help=f"Weight of the auxiliary segmentation loss on cases with masks (default: {d.lambda_seg}).")
    p.add_argument("--no-aux-seg", action="store_true", help="Ignore masks (default: use them when present).")
    p.add_argument("--folds", type=int, default=1, help="Train K plugins on K stratified folds (default: 1).")
    p.add_argument("--seed", type=int, default=d.seed, help=f"Random seed (default: {d.seed}).")
    p.add_argument("--resume", action="store_true", help="Continue from the checkpoint beside --out (default: off).")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="Compute device (default: auto = CUDA if available, else CPU).")
    p.add_argument("--no-progress", action="store_true", help="No progress bar (default: a bar on stderr).")
    p.set_defaults(handler=_cmd_train)

    e = sub.add_parser("eval", help="Evaluate a plugin on a manifest: metrics JSON + CSV, ROC curves (PNG).")
    e.add_argument("manifest", type=Path, help="Manifest CSV (its test split is evaluated; all cases without one).")
    e.add_argument("--backbone", type=Path, required=True, help="Backbone weights file (required).")
    e.add_argument("--plugin", type=Path, required=True, help="Plugin file or folder, or a --folds ensemble folder (required).")
    e.add_argument("--out", type=Path, required=True, help="Folder for metrics.json, metrics.csv, roc_*.png (required).")
    e.add_argument("--bootstrap", type=int, default=1000, help="Bootstrap resamples for the 95%% CIs (default: 1000).")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="Compute device (default: auto = CUDA if available, else CPU).")
    e.set_defaults(handler=_cmd_eval)


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda: no CUDA device is available")
    return name


def _cmd_train(args) -> int:
    config = TrainConfig(epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
                         accumulation=args.accumulation, lr_lora=args.lr_lora, lr_head=args.lr_head, gamma=args.gamma,
                         alpha=args.alpha, seed=args.seed, augment=not args.no_augment, standardize=not args.no_standardize,
                         lora=not args.no_lora, lambda_seg=args.lambda_seg, aux_seg=False if args.no_aux_seg else None,
                         input_size=args.input_size, num_slices=args.num_slices, intensity=args.intensity,
                         window=args.window)
    device = _device(args.device)
    if os.environ.get("LOCAL_RANK") is not None and device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    labels = args.labels.split(",") if args.labels else None
    results = train(args.manifest, args.backbone, args.out, config, labels=labels, device=device, resume=args.resume,
                    folds=args.folds, progress=not args.no_progress, task=args.task)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"plugin": str(args.out), "val_auroc": [r.summary["best_val_auroc"] for r in results],
                          "epochs_run": [r.summary["epochs_run"] for r in results]}))
    return 0


def _cmd_eval(args) -> int:
    metrics = evaluate_plugin(args.manifest, args.backbone, args.plugin, args.out, _device(args.device), args.bootstrap)
    print(json.dumps({"out": str(args.out), "macro_auroc": metrics["macro_auroc"],
                      "macro_auroc_ci95": metrics["macro_auroc_ci95"]}))
    return 0
