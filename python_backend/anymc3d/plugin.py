"""Task plugins: the ~1 M parameters that turn the frozen backbone into a classifier for one task.

A plugin is ``plugin.json`` (task, labels, preprocessing, LoRA settings, backbone name and fingerprint,
Platt calibration, thresholds, format version) plus ``plugin.safetensors`` (per-view LoRA, queries,
head). On disk it is a folder holding those two files, or a ``.anymc3d`` file: an uncompressed zip of
the same two files. Loading never unpickles; the JSON is validated against a schema and against the
tensors, and the tensors against a hash recorded in the JSON.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import safetensors.torch
import torch
from torch import nn

from anymc3d import __version__
from anymc3d.backbone import BackboneSpec
from anymc3d.contract import HEATMAP_METHODS, TASKS, safe_name  # noqa: F401 (safe_name re-exported)
from anymc3d.encoders import ENCODERS
from anymc3d.errors import PluginError
from anymc3d.fileio import atomic_path, write_text_atomic
from anymc3d.lora import LoraSettings
import anymc3d.planecycle.encoder  # noqa: F401 (registers the lifted encoder kinds)
from anymc3d.plugin_file import (  # noqa: F401 (re-exported: the torch-free reading of a plugin)
    JSON_NAME,
    MAX_MEMBER_BYTES,
    PLUGIN_SUFFIX,
    TRAINING_KEY,
    WEIGHTS_NAME,
    check_card,
    check_plugin_schema,
    find_plugins,
    parse_json,
    read_members,
    read_training_summary,
)
from anymc3d.pooling import TaskQueryPool
from anymc3d.preprocess_config import PreprocessConfig
from anymc3d.safeio import read_json

FORMAT_VERSION = 1


@dataclass
class PluginConfig:
    """The metadata of a plugin, as stored in ``plugin.json``."""

    name: str = field(metadata={"help": "Task name, shown to the user and used in output file names."})
    labels: list[str] = field(metadata={"help": "Finding names, in head output order."})
    task: str = field(metadata={"help": "'multilabel' (sigmoid per finding) or 'multiclass' (softmax)."})
    backbone: BackboneSpec = field(metadata={"help": "The backbone architecture the plugin was made for."})
    backbone_fingerprint: str = field(metadata={"help": "SHA-256 of that backbone's weights."})
    views: list[str] = field(default_factory=lambda: ["image"], metadata={"help": "View names, in input order."})
    preprocessing: list[PreprocessConfig] = field(default_factory=lambda: [PreprocessConfig()],
                                                  metadata={"help": "Preprocessing recipe per view."})
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA settings (same for every view)."})
    calibration_a: Optional[list[float]] = field(default=None, metadata={"help": "Platt slope per finding (default 1)."})
    calibration_b: Optional[list[float]] = field(default=None, metadata={"help": "Platt offset per finding (default 0)."})
    thresholds: Optional[list[float]] = field(default=None, metadata={"help": "Decision threshold per finding on the calibrated probability (default 0.5)."})
    description: str = field(default="", metadata={"help": "Free text: data, intended use, limits."})
    modality: str = field(default="", metadata={
        "help": "Intended imaging modality as a DICOM Modality code (CT, MR, PT, ...); '' = not stated "
                "(readers then go by the preprocessing: intensity 'ct' means CT, 'mri_*' MR). Written only when set."})
    body_part: str = field(default="", metadata={
        "help": "Intended body part, free text (e.g. 'chest', 'brain'); '' = not stated. Written only when set."})
    kind: str = field(default="slice_lora", metadata={"help": "Plugin kind: the encoder kind it runs on (anymc3d.encoders)."})
    encoder: dict = field(default_factory=dict, metadata={
        "help": "Options of the encoder kind (lifted kinds: variant, cycle); written only when not empty."})
    localisation: dict = field(default_factory=dict, metadata={
        "help": "Model card of the heatmaps: {'task': what they were measured on, 'measured': {method: {'cases', "
                "'hit_rate', 'mass_over_volume_share', ...}}, 'best': method}; {} = never measured. `--heatmap-method "
                "auto` opens the best method. Written only when measured."})
    evaluation: dict = field(default_factory=dict, metadata={
        "help": "Model card of the held-out evaluation (anymc3d.evaluation.evaluation_card): the split, the "
                "manifest's sha256, the cases and per finding AUROC with its 95 % CI and sensitivity / specificity at "
                "the plugin's threshold and the validation's Youden threshold; {} = never recorded. Written only when "
                "recorded."})
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "Plugin file format version."})
    anymc3d_version: str = field(default=__version__, metadata={"help": "Version of anymc3d that wrote it."})
    weights_sha256: str = field(default="", metadata={"help": "SHA-256 of plugin.safetensors (set on save)."})

    def __post_init__(self):
        n = len(self.labels)
        self.calibration_a = [1.0] * n if self.calibration_a is None else [float(x) for x in self.calibration_a]
        self.calibration_b = [0.0] * n if self.calibration_b is None else [float(x) for x in self.calibration_b]
        self.thresholds = [0.5] * n if self.thresholds is None else [float(x) for x in self.thresholds]
        self._validate()

    def _validate(self):
        self._check_kind()
        self._check_description()
        self._check_findings()
        self._check_calibration()
        self._validate_localisation()
        if not re.fullmatch(r"[0-9a-f]{64}", self.backbone_fingerprint):
            raise ValueError("backbone_fingerprint: must be a SHA-256 hex digest")

    def _check_kind(self):
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"format_version: this anymc3d reads version {FORMAT_VERSION}, the plugin is {self.format_version}")
        if self.kind not in ENCODERS:
            raise ValueError(f"kind: must be one of the registered encoder kinds {sorted(ENCODERS)}, got {self.kind!r}")
        if not isinstance(self.encoder, dict):
            raise ValueError(f"encoder: must be an object of the kind's options, got {type(self.encoder).__name__}")
        try:
            self.encoder = ENCODERS[self.kind].validate_options(self.encoder)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"encoder: {exc}") from None

    def _check_description(self):
        if not self.name.strip():
            raise ValueError("name: must not be empty")
        check_card(name=self.name, description=self.description, modality=self.modality, body_part=self.body_part)

    def _check_findings(self):
        if not self.labels or len(set(self.labels)) != len(self.labels) or not all(str(x).strip() for x in self.labels):
            raise ValueError(f"labels: need one or more distinct, non-empty names, got {self.labels!r}")
        if self.task not in TASKS:
            raise ValueError(f"task: must be one of {TASKS}, got {self.task!r}")
        if self.task == "multiclass" and len(self.labels) < 2:
            raise ValueError("labels: a multiclass task needs at least two classes")
        if not self.views or len(set(self.views)) != len(self.views):
            raise ValueError(f"views: need one or more distinct names, got {self.views!r}")
        if len(self.preprocessing) != len(self.views):
            raise ValueError(f"preprocessing: one recipe per view expected ({len(self.views)}), got {len(self.preprocessing)}")

    def _check_calibration(self):
        for key in ("calibration_a", "calibration_b", "thresholds"):
            values = getattr(self, key)
            if len(values) != len(self.labels):
                raise ValueError(f"{key}: {len(values)} values for {len(self.labels)} labels")
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{key}: values must be finite")
        if not all(a > 0 for a in self.calibration_a):
            raise ValueError("calibration_a: Platt slopes must be positive (a negative slope would invert the ranking)")
        if not all(0.0 < t < 1.0 for t in self.thresholds):
            raise ValueError("thresholds: must lie strictly between 0 and 1")

    def _validate_localisation(self) -> None:
        loc = self.localisation
        if not isinstance(loc, dict):
            raise ValueError(f"localisation: must be an object, got {type(loc).__name__}")
        if not loc:
            return
        measured = loc.get("measured")
        if not isinstance(measured, dict) or not measured or not set(measured) <= set(HEATMAP_METHODS):
            raise ValueError(f"localisation.measured: an object of heatmap methods {HEATMAP_METHODS}, got {measured!r}")
        for method, entry in measured.items():
            if not isinstance(entry, dict) or not all(isinstance(v, (int, float)) and math.isfinite(v)
                                                      for v in entry.values()):
                raise ValueError(f"localisation.measured.{method}: an object of finite numbers")
        if loc.get("best") not in measured:
            raise ValueError(f"localisation.best: one of the measured methods {sorted(measured)}, got {loc.get('best')!r}")

    def heatmap_localisation(self, method: Optional[str]) -> Optional[dict]:
        """What the model card measured for ``method`` (with the task it was measured on), or None: never measured."""
        entry = self.localisation.get("measured", {}).get(method) if method else None
        return None if entry is None else {**entry, "task": self.localisation.get("task", "")}

    def to_dict(self) -> dict:
        """plugin.json contents; ``encoder`` only when the kind has options, ``modality`` / ``body_part`` only when
        stated (so readers of older files still read plugins written now)."""
        options = {"encoder": dict(self.encoder)} if self.encoder else {}
        options.update({key: getattr(self, key) for key in ("modality", "body_part", "localisation", "evaluation") if getattr(self, key)})
        return {
            **options,
            "format_version": self.format_version, "kind": self.kind, "name": self.name, "labels": list(self.labels),
            "task": self.task, "views": list(self.views), "preprocessing": [p.to_dict() for p in self.preprocessing],
            "lora": self.lora.to_dict(), "backbone": self.backbone.to_dict(),
            "backbone_fingerprint": self.backbone_fingerprint, "calibration_a": self.calibration_a,
            "calibration_b": self.calibration_b, "thresholds": self.thresholds, "description": self.description,
            "anymc3d_version": self.anymc3d_version, "weights_sha256": self.weights_sha256,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "PluginConfig":
        d = dict(d)
        d["backbone"] = BackboneSpec.from_dict(d["backbone"])
        d["lora"] = LoraSettings.from_dict(d["lora"])
        d["preprocessing"] = [PreprocessConfig.from_dict(p) for p in d["preprocessing"]]
        return cls(**d)


def validate_metadata(d: dict, source: str | os.PathLike = "plugin") -> PluginConfig:
    """Check ``plugin.json`` contents against the schema and the semantic rules; name the problem."""
    check_plugin_schema(d, source)
    try:
        return PluginConfig.from_dict(d)
    except (ValueError, TypeError, KeyError) as exc:
        raise PluginError(f"{source}: invalid plugin metadata: {exc}") from None


class TaskHead(nn.Module):
    """Query pooling and linear head of a plugin (its LoRA lives on the shared backbone).

    Single view: the task query pools the slices. Several views: a query per view pools that view's
    slices, then the task query pools the view embeddings (late fusion).
    """

    def __init__(self, embed_dim: int, num_classes: int, num_views: int = 1, *, device=None, dtype=None):
        """
        Args:
            embed_dim: backbone width C.
            num_classes: number of findings (head outputs).
            num_views: number of views (one LoRA adapter and one view query each when > 1).
            device, dtype: where the parameters are created.
        """
        super().__init__()
        self.embed_dim, self.num_classes, self.num_views = embed_dim, num_classes, num_views
        self.view_pools = nn.ModuleList(
            [TaskQueryPool(embed_dim, device=device, dtype=dtype) for _ in range(num_views)]) if num_views > 1 else None
        self.task_pool = TaskQueryPool(embed_dim, device=device, dtype=dtype)
        self.head = nn.Linear(embed_dim, num_classes, device=device, dtype=dtype)

    def pool(self, views: Sequence[torch.Tensor], masks: Optional[Sequence[Optional[torch.Tensor]]] = None
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Pool slice embeddings of each view into one case embedding.

        Args:
            views: one (B, S_v, C) tensor of slice embeddings per view.
            masks: one (B, S_v) bool tensor per view (True = real slice; padding gets weight 0), or None.

        Returns:
            v: (B, C) case embedding; slice_importance: one (B, S_v) tensor per view.
        """
        masks = list(masks) if masks is not None else [None] * len(views)
        if self.view_pools is None:
            v, a = self.task_pool(views[0], masks[0])
            return v, [a]
        pooled = [pool(h, m) for pool, h, m in zip(self.view_pools, views, masks)]
        view_embeddings = torch.stack([v for v, _ in pooled], dim=1)  # (B, V, C)
        v, _ = self.task_pool(view_embeddings)
        return v, [a for _, a in pooled]

    def forward_head(self, v: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C) -> (B, num_classes) logits (or the embedding itself when ``pre_logits``)."""
        return v if pre_logits else self.head(v)

    def forward(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        v, _ = self.pool(views)
        return self.forward_head(v)


def calibrated_logits(logits: torch.Tensor, config: PluginConfig) -> torch.Tensor:
    """Platt scaling per finding: a_c * z + b_c."""
    a = torch.tensor(config.calibration_a, dtype=logits.dtype, device=logits.device)
    b = torch.tensor(config.calibration_b, dtype=logits.dtype, device=logits.device)
    return logits * a + b


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Sigmoid per finding (multilabel) or softmax over findings (multiclass)."""
    return logits.sigmoid() if task == "multilabel" else logits.softmax(dim=-1)


@dataclass
class LoadedPlugin:
    """A plugin read from disk: metadata, head module and per-view LoRA tensors."""

    config: PluginConfig
    head: TaskHead
    lora: list[dict[str, torch.Tensor]]
    path: Optional[Path] = None


_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def check_sizes(tensors: dict[str, torch.Tensor], config: PluginConfig, source) -> None:
    """Every size plugin.json claims, checked against the tensors before anything is built from them.

    A metadata file claiming LoRA rank 10^6 (or a width, depth, patch size, label or view count its weights
    do not have) would otherwise make peft or torch allocate from the claim: a crash or a traceback instead of
    an error naming the file.
    """
    def fail(problem: str):
        raise PluginError(f"{source}: plugin.json does not match {WEIGHTS_NAME}: {problem}")

    head_w = tensors.get("head.weight")
    if head_w is None or head_w.ndim != 2:
        raise PluginError(f"{source}: the weights have no head")
    num_classes, width = head_w.shape
    if num_classes != len(config.labels):
        fail(f"plugin.json lists {len(config.labels)} labels but the head has {num_classes} outputs")
    spec = config.backbone
    if spec.embed_dim is not None and spec.embed_dim != width:
        fail(f"backbone.embed_dim is {spec.embed_dim}, the head takes {width} features")
    views = {key.split(".")[1] for key in tensors if key.startswith("lora.")}
    if views != {str(i) for i in range(len(config.views))}:
        fail(f"{len(config.views)} view(s) {config.views}, LoRA weights for view(s) {sorted(views)}")
    for key, value in tensors.items():
        problem = _lora_size_problem(key, value, config, width) if key.startswith("lora.") else None
        if problem:
            fail(problem)


def _lora_size_problem(key: str, value: torch.Tensor, config: PluginConfig, width: int) -> Optional[str]:
    """What LoRA tensor ``key`` contradicts in plugin.json (rank, depth, patch size, width), or None."""
    rank, spec = config.lora.rank, config.backbone
    if key.endswith("lora_A.weight") and value.shape[0] != rank:
        return f"lora.rank is {rank}, {key} has rank {value.shape[0]}"
    if key.endswith("lora_B.weight") and (value.ndim < 2 or value.shape[1] != rank):
        return f"lora.rank is {rank}, {key} has shape {tuple(value.shape)}"
    block = _BLOCK.search(key)
    if block and spec.depth is not None and int(block.group(1)) >= spec.depth:
        return f"backbone.depth is {spec.depth}, {key} adapts block {block.group(1)}"
    if "patch_embed.proj.lora_A" in key and tuple(value.shape[2:]) != (spec.patch_size, spec.patch_size):
        return f"{spec.name} has {spec.patch_size}-pixel patches, {key} has shape {tuple(value.shape)}"
    if key.endswith("lora_A.weight") and "patch_embed" not in key and value.shape[-1] != width:
        return f"the head takes {width} features, {key} reads {value.shape[-1]}"
    return None


def _split_tensors(tensors: dict[str, torch.Tensor], config: PluginConfig, source) -> tuple[TaskHead, list[dict]]:
    check_sizes(tensors, config, source)
    num_classes, embed_dim = tensors["head.weight"].shape
    head = TaskHead(embed_dim, num_classes, len(config.views))
    head_state = {k: v for k, v in tensors.items() if not k.startswith("lora.")}
    try:
        head.load_state_dict(head_state, strict=True)
    except RuntimeError as exc:
        raise PluginError(f"{source}: head weights do not fit {len(config.views)} view(s): {str(exc).splitlines()[0]}") from None
    lora = [{} for _ in config.views]
    for key, value in tensors.items():
        if key.startswith("lora."):
            _, view, rest = key.split(".", 2)
            if not view.isdigit() or int(view) >= len(lora):
                raise PluginError(f"{source}: LoRA tensor {key} names view {view}, the plugin has {len(lora)}")
            lora[int(view)][rest] = value
    if not all(lora):
        raise PluginError(f"{source}: some views have no LoRA weights")
    return head, lora


def _join_tensors(head: TaskHead, lora: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    for view, state in enumerate(lora):
        tensors.update({f"lora.{view}.{k}": v.detach().cpu().contiguous() for k, v in state.items()})
    return tensors


def plugin_bytes(config: PluginConfig, head: TaskHead, lora: Sequence[dict[str, torch.Tensor]],
                 training: Optional[dict] = None) -> tuple[bytes, bytes]:
    """The two members of a plugin: (plugin.json bytes, plugin.safetensors bytes); sets the weights hash.

    ``training`` (optional, JSON-serialisable): the training summary, kept in the safetensors header's
    metadata (covered by the weights hash; readers that do not know it ignore it, so the format stays v1)."""
    if len(lora) != len(config.views):
        raise PluginError(f"plugin {config.name}: {len(lora)} LoRA states for {len(config.views)} views")
    if head.num_classes != len(config.labels):
        raise PluginError(f"plugin {config.name}: head has {head.num_classes} outputs for {len(config.labels)} labels")
    metadata = None if training is None else {TRAINING_KEY: json.dumps(training, sort_keys=True)}
    weights = safetensors.torch.save(_join_tensors(head, lora), metadata=metadata)
    config.weights_sha256 = hashlib.sha256(weights).hexdigest()
    meta = json.dumps(config.to_dict(), indent=2, sort_keys=True).encode()
    return meta, weights


def save_plugin(path: os.PathLike | str, config: PluginConfig, head: TaskHead,
                lora: Sequence[dict[str, torch.Tensor]], training: Optional[dict] = None) -> Path:
    """Write a plugin: a ``.anymc3d`` file, or a folder for any other path. Atomic: temp name, then rename."""
    path = Path(path)
    meta, weights = plugin_bytes(config, head, lora, training)
    if path.suffix == PLUGIN_SUFFIX:
        with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            for name, data in ((JSON_NAME, meta), (WEIGHTS_NAME, weights)):
                zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
        return path
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        (tmp_dir / JSON_NAME).write_bytes(meta)
        (tmp_dir / WEIGHTS_NAME).write_bytes(weights)
        if path.exists():
            raise PluginError(f"{path}: exists already; remove it first")
        os.replace(tmp_dir, path)
    finally:
        if tmp_dir.exists():
            for child in tmp_dir.iterdir():
                child.unlink()
            tmp_dir.rmdir()
    return path


def record_localisation(path: os.PathLike | str, localisation: dict) -> PluginConfig:
    """Write the heatmaps' measured localisation into a plugin's model card (``plugin.json``), weights untouched.

    ``localisation``: ``{"task": ..., "measured": {method: {...numbers}}, "best": method}`` (checked as any
    plugin.json is). The file (or the folder's plugin.json) is replaced atomically."""
    return record_card(path, localisation=localisation)


def record_card(path: os.PathLike | str, **entries: dict) -> PluginConfig:
    """Write model-card entries (``localisation``, ``evaluation``) into a plugin's ``plugin.json``, weights
    untouched, in one atomic replacement of the file (or of the folder's plugin.json); checked as any plugin.json
    is before anything is written."""
    path = Path(path)
    raw, weights = read_members(path, weights=not path.is_dir())
    d = parse_json(raw, path)
    d.update(json.loads(json.dumps(entries)))
    config = validate_metadata(d, path)
    meta = json.dumps(config.to_dict(), indent=2, sort_keys=True).encode()
    if path.is_dir():
        write_text_atomic(path / JSON_NAME, meta.decode())
        return config
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name, data in ((JSON_NAME, meta), (WEIGHTS_NAME, weights)):
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return config


def read_plugin_metadata(path: os.PathLike | str) -> dict:
    """The validated ``plugin.json`` of a plugin file or folder, as a dict (for listings and ``info``)."""
    path = Path(path)
    raw, _ = read_members(path, weights=False)
    return validate_metadata(parse_json(raw, path), path).to_dict()


def load_plugin(path: os.PathLike | str) -> LoadedPlugin:
    """Read and check a plugin: schema, weights hash, label count against the head, views against LoRA."""
    path = Path(path)
    raw, weights = read_members(path)
    config = validate_metadata(parse_json(raw, path), path)
    if hashlib.sha256(weights).hexdigest() != config.weights_sha256:
        raise PluginError(f"{path}: {WEIGHTS_NAME} does not match the hash in {JSON_NAME} (file altered or damaged)")
    try:
        tensors = safetensors.torch.load(weights)
    except Exception as exc:
        raise PluginError(f"{path}: cannot read {WEIGHTS_NAME} ({exc})") from None
    head, lora = _split_tensors(tensors, config, path)
    return LoadedPlugin(config=config, head=head, lora=lora, path=path)


ENSEMBLE_INDEX = "ensemble.json"  # written by ``anymc3d train --folds K`` beside its K plugins


def read_ensemble_index(path: os.PathLike | str) -> dict:
    """The checked ``ensemble.json`` of a ``--folds`` folder: ``{"plugins": [...], "folds": K, ...}``."""
    index = Path(path) / ENSEMBLE_INDEX
    try:
        data = read_json(index, max_bytes=1024 ** 2)
    except ValueError as exc:
        raise PluginError(f"unreadable ensemble index: {exc}") from None
    plugins = data.get("plugins") if isinstance(data, dict) else None
    if not isinstance(plugins, list) or not plugins or not all(
            isinstance(p, str) and p and Path(p).name == p for p in plugins):
        raise PluginError(f"{index}: 'plugins' must be a non-empty list of plugin names in this folder")
    return data


def is_ensemble_path(path: os.PathLike | str) -> bool:
    """A ``--folds`` ensemble folder (it holds ``ensemble.json``)."""
    return (Path(path) / ENSEMBLE_INDEX).is_file()


def ensemble_members(path: os.PathLike | str) -> list[Path]:
    """The plugins of an ensemble folder written by ``--folds`` (``ensemble.json``), else ``[path]``."""
    path = Path(path)
    if is_ensemble_path(path):
        return [path / p for p in read_ensemble_index(path)["plugins"]]
    return [path]
