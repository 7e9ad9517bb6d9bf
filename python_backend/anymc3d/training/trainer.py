"""The training loop: AdamW in two groups (LoRA; queries + head [+ decoder]), linear warm-up then cosine,
gradient accumulation, bf16 autocast on CUDA only, validation AUROC each epoch, best state kept, early stopping;
then Platt calibration on validation and the plugin saved with its training summary.

One forward: :class:`anymc3d.model.AnyMC3DModel`. The file is a little over 500 lines because what is left is one
loop over the run's shared state; its separable jobs (config, checkpoints, distributed, standardised head, batching,
evaluation) are modules of their own.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from anymc3d.augment import AugmentConfig, Augmenter
from anymc3d.backbone import LoadedBackbone, load_backbone, spec_from_file
from anymc3d.calibration import calibrate
from anymc3d.data import Manifest, PreparedCase, assign_split, fold_splits, load_manifest, prepare_case, with_splits
from anymc3d.decoder import SegDecoder
from anymc3d.device import autocast
from anymc3d.evaluation import auroc, one_hot, youden_threshold
from anymc3d.fileio import write_text_atomic
from anymc3d.lora import LoraSettings, adapter_state, add_adapter, remove_adapter
from anymc3d.losses import FocalLossConfig, dice_ce_loss, focal_loss
from anymc3d.model import AnyMC3DModel
from anymc3d.plugin import ENSEMBLE_INDEX, PluginConfig, TaskHead, probabilities, save_plugin
from anymc3d.preprocess_config import PreprocessConfig
from anymc3d.training.batching import case_seed, collate
from anymc3d.training.checkpoints import (CHECKPOINT_VERSION, checkpoint_path, load_run, log_path, save_run,
                                          write_checkpoint)
from anymc3d.training.config import CARD_FIELDS, CPU_INPUT_SIZE, CPU_NUM_SLICES, TrainConfig, TrainingError
from anymc3d.training.distributed import Dist, init_distributed
from anymc3d.training.standardize import plain_head, standardize_head

logger = logging.getLogger(__name__)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine to 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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
        self.recipe = self._recipe(config, backbone.spec, self.device)
        self.train_cases = manifest.subset("train")
        self.val_cases = manifest.subset("val")
        if not self.train_cases or not self.val_cases:
            raise TrainingError(f"{manifest.path}: training needs train and val cases")
        self.lora_settings = LoraSettings()
        self.augmenter = Augmenter(AugmentConfig() if config.augment else AugmentConfig.off())
        self.prepared: dict[int, PreparedCase] = {}
        has_masks = any(c.mask is not None for c in self.train_cases)
        self.aux_seg = has_masks if config.aux_seg is None else bool(config.aux_seg and has_masks)
        self.cache = self._caching(config, self.aux_seg)
        self.embedded: dict[int, list[torch.Tensor]] = {}

    @staticmethod
    def _recipe(config: TrainConfig, spec, device: torch.device) -> PreprocessConfig:
        """The slices to train on: the config's size and count, else the CPU plan's (``CPU_INPUT_SIZE``,
        ``CPU_NUM_SLICES``) for a full-size backbone on the CPU, else the backbone's own size."""
        cpu_plan = device.type == "cpu" and spec.img_size >= 224
        size = config.input_size or (CPU_INPUT_SIZE if cpu_plan else spec.img_size)
        if size % spec.patch_size:
            raise TrainingError(f"input_size {size} is not a multiple of the patch size {spec.patch_size}")
        num_slices = config.num_slices or (CPU_NUM_SLICES if cpu_plan else None)
        return PreprocessConfig(input_size=size, num_slices=num_slices, intensity=config.intensity,
                                window=config.window if config.intensity in ("ct", "auto") else None)

    @staticmethod
    def _caching(config: TrainConfig, aux_seg: bool) -> bool:
        """Whether slice embeddings are computed once and reused: by default when nothing changes them between
        epochs (no LoRA, augmentation or auxiliary segmentation); asking for it otherwise is an error."""
        frozen = not config.lora and not config.augment and not aux_seg
        if config.cache_embeddings and not frozen:
            raise TrainingError("cache_embeddings needs LoRA, augmentation and the auxiliary segmentation off "
                                "(the slice embeddings must not change between epochs)")
        return frozen if config.cache_embeddings is None else bool(config.cache_embeddings)

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
        self.head = TaskHead(c, len(self.manifest.labels), len(self.manifest.views))
        with torch.no_grad():
            self.head.head.weight.normal_(0, 0.01)
            self.head.head.bias.zero_()
        self.decoder = SegDecoder(c) if self.aux_seg else None
        self.model = AnyMC3DModel(model, self.head, self.adapters, kind="slice_lora", chunk_size=self.config.chunk_size)
        self.head.to(self.device)
        if self.decoder is not None:
            self.decoder.to(self.device)
        self.run_plan = self.plan()
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
        return autocast(self.device)

    def _bar(self, iterable, desc: str, total: Optional[int] = None):
        """A bar on stderr ticking per volume (the main process, when progress is on), so that every pass shows
        progress within seconds; a pass on a CPU can take minutes."""
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, unit="volume", file=sys.stderr, leave=False, mininterval=1.0,
                    disable=not self.progress)

    @torch.no_grad()
    def _embedding_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and std of the training slices' embeddings (bare backbone: LoRA B is 0)."""
        c = self.backbone.model.embed_dim
        total = torch.zeros(2 * c + 1, dtype=torch.float64)
        mine = self.train_cases[self.dist.rank::self.dist.world]
        for case in self._bar(mine, "statistics (embedding mean and std of the training volumes, once)"):
            for h in self._embeddings(case):  # per view (S_v, C)
                h = h.double().cpu()
                total += torch.cat([h.sum(0), (h ** 2).sum(0), torch.tensor([h.shape[0]], dtype=torch.float64)])
        total = self.dist.all_sum(total)
        n = total[-1]
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean ** 2).clamp_min(0)
        std = var.sqrt().clamp_min(1e-6 * float(var.sqrt().max()) + 1e-12)
        return mean.float().to(self.device), std.float().to(self.device)

    @torch.no_grad()
    def _embeddings(self, case) -> list[torch.Tensor]:
        """Per view, the case's (S_v, C) slice embeddings under the current weights; with the cache (frozen
        backbone, no augmentation: they never change) computed once per case and kept."""
        if case.row in self.embedded:
            return self.embedded[case.row]
        views, masks, _ = collate([self._prepared(case)], len(self.adapters))
        with self._autocast():
            features = self.model.forward_features([v.to(self.device) for v in views],
                                                   [m.to(self.device) for m in masks])
        out = [f.cls[0].float() for f in features]
        if self.cache:
            self.embedded[case.row] = out
        return out

    def _cached_logits(self, cases) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, K), targets) of ``cases`` from their cached slice embeddings: pooling and head only."""
        per_case = [self._embeddings(c) for c in cases]
        views, masks = [], []
        for v in range(len(self.adapters)):
            s_max = max(e[v].shape[0] for e in per_case)
            h = per_case[0][v].new_zeros(len(cases), s_max, per_case[0][v].shape[1])
            m = torch.zeros(len(cases), s_max, dtype=torch.bool, device=h.device)
            for b, e in enumerate(per_case):
                h[b, :e[v].shape[0]], m[b, :e[v].shape[0]] = e[v], True
            views.append(h), masks.append(m)
        v, _ = self.head.pool(views, masks)
        return self.model.forward_head(v), torch.from_numpy(np.stack([c.target for c in cases]))

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
        seed = case_seed(self.config.seed, epoch, case.row)
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
        bar = self._bar(None, f"epoch {epoch + 1}/{self.config.epochs}", total=len(self.train_cases))
        for micro_batches in self._steps(epoch):
            n_step = sum(len(mb) for mb in micro_batches)
            for g, base in zip(self.optimizer.param_groups, self.base_lrs):
                g["lr"] = base * _lr_factor(step, total_steps, warmup)
            self.optimizer.zero_grad(set_to_none=False)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            for mb in micro_batches[self.dist.rank::self.dist.world]:
                if self.cache:
                    logits, targets = self._cached_logits(mb)
                    loss = focal_loss(logits.float(), targets.to(self.device), self.manifest.task,
                                      FocalLossConfig(self.config.gamma, self.config.alpha))
                    value, seg = float(loss.detach()), None
                else:
                    items = [self._augmented(c, epoch) for c in mb]
                    loss, value, seg = self._loss(items)
                (loss * (len(mb) / n_step)).backward()
                loss_sum += torch.tensor([value * len(mb), len(mb), (seg or 0.0) * len(mb), len(mb) if seg is not None else 0],
                                         dtype=torch.float64)
                bar.update(len(mb) * self.dist.world)
                bar.set_postfix(loss=f"{float(loss_sum[0] / max(1.0, float(loss_sum[1]))):.4f}", refresh=False)
            self.dist.all_sum_grads(params)
            self.optimizer.step()
            step += 1
        bar.close()
        loss_sum = self.dist.all_sum(loss_sum)
        self.last_seg_loss = float(loss_sum[2] / loss_sum[3]) if loss_sum[3] > 0 else None
        return float(loss_sum[0] / max(1.0, float(loss_sum[1]))), step

    # -------------------------------------------------------------- validation
    @torch.no_grad()
    def logits(self, cases) -> np.ndarray:
        """Raw logits (N, K) of ``cases`` (no augmentation), in order; shared among processes."""
        self.head.eval()
        mine = {}
        for i in self._bar(range(self.dist.rank, len(cases), self.dist.world), "validation"):
            if self.cache:
                mine[i] = self._cached_logits([cases[i]])[0].float().cpu().numpy()[0]
                continue
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
        config = {k: v for k, v in asdict(self.config).items() if k not in CARD_FIELDS}
        return {"manifest_sha256": self.manifest.sha256, "backbone_fingerprint": self.backbone.fingerprint,
                "config": config, "world": self.dist.world,
                "splits": {c.row: c.split for c in self.manifest.cases}}

    def _save(self, next_epoch: int, step: int, best: dict, history: list, stopped: bool) -> None:
        if self.dist.main:
            save_run(checkpoint_path(self.out), self.trainable(), self.optimizer, self._identity(),
                     {"next_epoch": next_epoch, "step": step, "best": best, "history": history, "stopped": stopped,
                      "card": {k: getattr(self.config, k) for k in CARD_FIELDS}})

    def _load(self, path: Path) -> tuple[int, int, dict, list, bool]:
        """Restore the run; a model-card text this command line leaves unstated is the checkpoint's."""
        run = load_run(path, self.trainable(), self.optimizer, self._identity())
        self.config = dataclasses.replace(self.config, **{k: v for k, v in run["card"].items()
                                                          if k in CARD_FIELDS and not getattr(self.config, k)})
        return run["next_epoch"], run["step"], run["best"], run["history"], run["stopped"]

    # -------------------------------------------------------------- the run
    def plan(self) -> dict:
        """Say up front what the run costs: the recipe, whether embeddings are cached, and the expected minutes
        from the measured cost of the first training case (its slice embeddings, kept when cached)."""
        case = self.train_cases[0]
        slices = sum(v.shape[0] for v in self._prepared(case).views)
        started = time.perf_counter()
        if self.cache or not self.config.lora:
            self._embeddings(case)
            per_slice = (time.perf_counter() - started) / slices  # forward only
            per_train_slice = per_slice
        else:
            loss, _, _ = self._loss([self._prepared(case)])
            loss.backward()
            for p in [*self.backbone.model.parameters(), *self.head.parameters(),
                      *(self.decoder.parameters() if self.decoder is not None else [])]:
                p.grad = None
            per_train_slice = (time.perf_counter() - started) / slices  # forward + backward
            per_slice = per_train_slice / 3
        n_train, n_val = len(self.train_cases), len(self.val_cases)
        if self.cache:
            seconds = (n_train + n_val) * slices * per_slice
        else:
            seconds = (n_train * slices * (per_slice if self.config.standardize else 0)
                       + self.config.epochs * slices * (n_train * per_train_slice + n_val * per_slice))
        plan = {"input_size": self.recipe.input_size, "num_slices": self.recipe.num_slices, "lora": self.config.lora,
                "cached_embeddings": self.cache, "seconds_per_slice": round(per_train_slice, 4),
                "expected_minutes": round(seconds / 60 / max(1, self.dist.world), 1)}
        if self.dist.main:
            logger.info("plan: %d train + %d val cases, %s slices of %d px (%s), %s; measured %.3f s a slice -> about "
                        "%.1f min for at most %d epochs", n_train, n_val, self.recipe.num_slices or "all",
                        self.recipe.input_size, "LoRA" if self.config.lora else "frozen backbone",
                        "slice embeddings cached" if self.cache else "no cache", per_train_slice,
                        plan["expected_minutes"], self.config.epochs)
        return plan

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
            if self.progress:
                logger.info("epoch %d/%d: training loss %.4f, validation AUROC %.3f (%.0f s)", epoch, self.config.epochs,
                            loss, metrics["val_auroc"], time.time() - t0)
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
            "standardized_head": self.config.standardize, "aux_seg": self.aux_seg, "plan": self.run_plan,
            "val_auroc_per_label": {lab: auroc(yk[:, k], probs[:, k]) for k, lab in enumerate(self.manifest.labels)},
        }
        config = PluginConfig(name=name, labels=list(self.manifest.labels), task=task, backbone=self.backbone.spec,
                              backbone_fingerprint=self.backbone.fingerprint, views=list(self.manifest.views),
                              preprocessing=[self.recipe] * len(self.manifest.views), lora=self.lora_settings,
                              calibration_a=cal.a, calibration_b=cal.b, thresholds=cal.thresholds,
                              description=self.config.description or (
                                  f"Trained by anymc3d train on {self.manifest.path.name} ({summary['splits']}); best "
                                  f"validation AUROC {best['score'][0]:.3f}."),
                              modality=self.config.modality, body_part=self.config.body_part)
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
def save_trained_plugin(out: Path, config: PluginConfig, head: TaskHead, lora, summary: dict) -> Path:
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
