"""Inference engine: one resident backbone serving many plugins and volumes.

The engine owns the runtime options (device, autocast dtype, slice chunk), loads the backbone once,
attaches plugins as named LoRA adapters, and predicts at three levels: image files, SimpleITK images,
and tensors of preprocessed slices. Slices are encoded in chunks so memory does not grow with the
slice count; a CUDA out-of-memory error halves the chunk and retries.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from anymc3d import heatmap as hm
from anymc3d.backbone import BackboneSpec, LoadedBackbone, load_backbone, patch_grid
from anymc3d.errors import AnyMC3DError, InputError, PluginError
from anymc3d.lora import activate, add_adapter, load_adapter_state, remove_adapter
from anymc3d.plugin import LoadedPlugin, calibrated_logits, load_plugin, probabilities
from anymc3d.preprocessing import SliceGeometry, prepare, read_image, to_model_input, validate_image

logger = logging.getLogger(__name__)

#: progress(stage, done, total): stage is "reading", "encoding", "heatmap" (see docs/cli-contract.md).
Progress = Callable[[str, int, int], None]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; asking for CUDA without one is a clear error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AnyMC3DError("device 'cuda' was asked for, but no CUDA GPU is available (use --device cpu or auto)")
    return device


@dataclass
class Prediction:
    """One plugin's (or ensemble's) answer for one case; arrays are numpy, slice space of view 0."""

    plugin: str
    labels: list[str]
    task: str
    logits: np.ndarray                    # (K,) raw head output
    calibrated_logits: np.ndarray         # (K,) after Platt scaling
    probabilities_raw: np.ndarray         # (K,)
    probabilities: np.ndarray             # (K,) calibrated
    thresholds: np.ndarray                # (K,)
    slice_importance: list[np.ndarray]    # per view: (S_v,) a_s over the model's slices
    embedding: np.ndarray                 # (C,) case embedding v
    heatmap_method: Optional[str] = None
    heatmap: Optional[np.ndarray] = None  # (S, h, w) on the patch grid, weighted by a_s, max 1
    finding_heatmaps: dict[str, np.ndarray] = field(default_factory=dict)  # gradient methods: per label
    plugin_paths: list[str] = field(default_factory=list)
    geometry: Optional[SliceGeometry] = None  # how view 0 was sliced: maps heatmap and importance back

    @property
    def decisions(self) -> np.ndarray:
        """Multilabel: calibrated probability >= threshold; multiclass: the most probable class."""
        if self.task == "multiclass":
            return np.arange(len(self.labels)) == int(np.argmax(self.probabilities))
        return self.probabilities >= self.thresholds


    def heatmap_image(self, label: Optional[str] = None) -> sitk.Image:
        """The heatmap in the first view's input geometry (same size, origin, spacing, direction)."""
        volume = self.finding_heatmaps[label] if label is not None else self.heatmap
        if volume is None or self.geometry is None:
            raise AnyMC3DError(f"no heatmap was computed for {self.plugin}")
        image = self.geometry.to_input(volume)
        peak = float(sitk.GetArrayViewFromImage(image).max())
        # interpolation onto the input grid can lower the peak a little: keep the max at exactly 1
        return sitk.Cast(image / peak, sitk.sitkFloat32) if peak > 0 else image

    def importance_per_input_slice(self) -> np.ndarray:
        """a_s per input slice index along the slicing axis of view 0 (sums to 1)."""
        return self.geometry.importance_to_input(self.slice_importance[0])


@dataclass
class CaseResult:
    """Predictions of every plugin for one case."""

    sources: list[str]
    predictions: list[Prediction]


@dataclass
class _Attached:
    plugin: LoadedPlugin
    adapters: list[str]


class Engine:
    """A resident backbone with attached plugins.

    Args:
        backbone: a weights file (safetensors with our metadata, or an official ``.pth`` with ``spec``),
            or an already loaded backbone.
        spec: the architecture, needed when the file does not record it (taken from a plugin by the CLI).
        device: "auto", "cpu", "cuda" or a torch device.
        amp_dtype: autocast dtype on CUDA (default bfloat16); the CPU path runs in float32.
        chunk_size: slices per backbone forward.
    """

    def __init__(self, backbone: Union[str, os.PathLike, LoadedBackbone], *, spec: Optional[BackboneSpec] = None,
                 device: str | torch.device = "auto", amp_dtype: torch.dtype = torch.bfloat16, chunk_size: int = 32):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.device = resolve_device(device)
        self.amp_dtype = amp_dtype
        self.chunk_size = chunk_size
        self.backbone = backbone if isinstance(backbone, LoadedBackbone) else load_backbone(backbone, spec)
        self.model = self.backbone.model.to(self.device).eval()
        self.plugins: dict[str, _Attached] = {}
        self._adapter_count = 0

    # ----------------------------------------------------------------------------------- plugins
    def add_plugin(self, plugin: Union[str, os.PathLike, LoadedPlugin], name: Optional[str] = None) -> str:
        """Attach a plugin (file, folder or loaded) to the resident backbone; returns its name here."""
        plugin = plugin if isinstance(plugin, LoadedPlugin) else load_plugin(plugin)
        config = plugin.config
        source = plugin.path or config.name
        mine = self.backbone
        if not config.backbone.same_architecture(mine.spec) or config.backbone_fingerprint != mine.fingerprint:
            raise PluginError(
                f"{source}: plugin was made for backbone {config.backbone.name} with weights "
                f"{config.backbone_fingerprint[:12]}, but the loaded backbone is {mine.spec.name} with weights "
                f"{mine.fingerprint[:12]} ({mine.path}); use the backbone the plugin was trained on")
        if plugin.head.embed_dim != self.model.embed_dim:
            raise PluginError(f"{source}: head width {plugin.head.embed_dim} != backbone width {self.model.embed_dim}")
        patch = self.backbone.spec.patch_size
        sizes = [recipe.input_size for recipe in config.preprocessing]
        if any(size % patch for size in sizes):
            raise PluginError(f"{source}: slice size {sizes} is not a multiple of the backbone's patch size {patch}")
        name = name or config.name
        if name in self.plugins:
            raise PluginError(f"{source}: a plugin named {name!r} is attached already")
        adapters = []
        try:
            for view_state in plugin.lora:
                adapter = f"adapter{self._adapter_count}"
                self._adapter_count += 1
                add_adapter(self.model, adapter, config.lora)
                adapters.append(adapter)
                load_adapter_state(self.model, adapter, view_state)
        except PluginError as exc:
            for adapter in adapters:
                remove_adapter(self.model, adapter)
            raise PluginError(f"{source}: {exc}") from None
        self.model.to(self.device)
        plugin.head.to(self.device).eval()
        self.plugins[name] = _Attached(plugin, adapters)
        return name

    def remove_plugin(self, name: str) -> None:
        attached = self.plugins.pop(name)
        for adapter in attached.adapters:
            remove_adapter(self.model, adapter)

    # ----------------------------------------------------------------------------------- encoding
    def _autocast(self):
        # bf16 autocast on CUDA only: CPU autocast is slower than fp32 on most CPUs and not bit-stable.
        return torch.autocast("cuda", dtype=self.amp_dtype, enabled=self.device.type == "cuda")

    def _chunks(self, total: int, step: Callable[[int, int], None], progress: Optional[Progress], stage: str) -> None:
        """Run ``step(start, stop)`` over [0, total) in chunks, halving the chunk on CUDA out-of-memory."""
        start, size = 0, self.chunk_size
        while start < total:
            stop = min(total, start + size)
            try:
                step(start, stop)
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                size //= 2
                torch.cuda.empty_cache()
                logger.warning("CUDA out of memory: retrying with %d slices per chunk", size)
                continue
            start = stop
            if progress:
                progress(stage, start, total)

    def encode(self, slices: torch.Tensor, adapter: Optional[str], record: Optional[str] = None,
               progress: Optional[Progress] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Slice embeddings (last-block CLS) and optionally per-slice attention maps.

        Args:
            slices: (S, M, M) preprocessed slices in [0, 1] (any device).
            adapter: the LoRA adapter to run, or None for the bare backbone.
            record: None, "attention" (last-block CLS row) or "rollout".

        Returns:
            (S, C) float32 embeddings, and (S, P) float32 patch maps when ``record`` is set.
        """
        activate(self.model, adapter)
        npt = self.model.num_prefix_tokens
        blocks = self.model.blocks
        embeddings, maps = [], []

        def step(start: int, stop: int) -> None:
            x = to_model_input(slices[start:stop].to(self.device, torch.float32))  # (B, 3, M, M)
            with torch.inference_mode(), self._autocast():
                if record == "attention":
                    with hm.AttentionRecorder(blocks[-1:], reduce=hm.cls_row_mean) as rec:
                        tokens = self.model.forward_features(x)  # (B, N, C)
                    patch_map = hm.cls_attention(rec.maps[0], npt)
                elif record == "rollout":
                    with hm.AttentionRecorder(blocks, reduce=hm.head_mean) as rec:
                        tokens = self.model.forward_features(x)
                    patch_map = hm.attention_rollout(rec.maps, npt)
                else:
                    tokens = self.model.forward_features(x)
                    patch_map = None
            embeddings.append(tokens[:, 0].float())
            if patch_map is not None:
                maps.append(patch_map.float())

        self._chunks(slices.shape[0], step, progress, "encoding")
        return torch.cat(embeddings), (torch.cat(maps) if maps else None)

    def _gradient_maps(self, slices: torch.Tensor, adapter: str, cls_grads: torch.Tensor, last_only: bool,
                       progress: Optional[Progress]) -> torch.Tensor:
        """Gradient-weighted attention maps for K findings: (K, S, P).

        ``cls_grads`` (K, S, C) is d logit_k / d h_s from the pooling and head. Slices are independent in
        the backbone, so back-propagating <h_s, g_ks> chunk by chunk gives the exact gradient of logit_k
        with respect to each chunk's attention matrices, with memory bounded by the chunk.
        """
        activate(self.model, adapter)
        npt = self.model.num_prefix_tokens
        per_finding: list[list[torch.Tensor]] = [[] for _ in range(cls_grads.shape[0])]

        def step(start: int, stop: int) -> None:
            x = to_model_input(slices[start:stop].to(self.device, torch.float32)).requires_grad_(True)
            with torch.enable_grad(), self._autocast(), hm.AttentionRecorder(self.model.blocks, retain_grad=True) as rec:
                cls = self.model.forward_features(x)[:, 0].float()  # (B, C)
                for k in range(cls_grads.shape[0]):
                    for a in rec.maps:
                        a.grad = None
                    torch.autograd.backward((cls * cls_grads[k, start:stop]).sum(), retain_graph=True)
                    grads = [a.grad for a in rec.maps]
                    per_finding[k].append(hm.gradient_rollout(rec.maps, grads, npt, last_only).detach().float())

        self._chunks(slices.shape[0], step, progress, "heatmap")
        return torch.stack([torch.cat(chunks) for chunks in per_finding])

    # ----------------------------------------------------------------------------------- prediction
    def predict_slices(self, views: Sequence[torch.Tensor], plugin: str, heatmap: Optional[str] = None,
                       progress: Optional[Progress] = None) -> Prediction:
        """Predict one case from preprocessed slices.

        Args:
            views: one (S_v, M, M) tensor in [0, 1] per plugin view (the output of ``prepare``).
            plugin: name of an attached plugin.
            heatmap: None or one of ``heatmap.METHODS``; computed for the first view.
        """
        if heatmap is not None:
            hm.check_method(heatmap)
        attached = self.plugins[plugin]
        config, head = attached.plugin.config, attached.plugin.head
        if len(views) != len(attached.adapters):
            raise InputError(None, f"plugin {plugin} takes {len(config.views)} view(s) {config.views}, got {len(views)}")
        record = heatmap if heatmap in ("attention", "rollout") else None
        encoded = [self.encode(v, adapter, record if i == 0 else None, progress)
                   for i, (v, adapter) in enumerate(zip(views, attached.adapters))]
        embeddings = [h.clone().unsqueeze(0) for h, _ in encoded]  # (1, S_v, C), out of inference mode
        with torch.no_grad():
            v, importance = head.pool(embeddings)
            logits = head.forward_head(v)[0]
        grid = patch_grid(self.model, *views[0].shape[-2:])
        pred = self._prediction(plugin, config, logits, v[0], importance)
        pred.heatmap_method = heatmap
        pred.plugin_paths = [str(attached.plugin.path)] if attached.plugin.path else []
        if heatmap in ("attention", "rollout"):
            pred.heatmap = self._volume(encoded[0][1], grid, importance[0][0])
        elif heatmap in hm.GRADIENT_METHODS:
            cls_grads = self._cls_grads(head, embeddings)  # (K, S_0, C)
            maps = self._gradient_maps(views[0], attached.adapters[0], cls_grads, heatmap == "grad_last", progress)
            pred.finding_heatmaps = {label: self._volume(m, grid, importance[0][0]) for label, m in zip(config.labels, maps)}
            pred.heatmap = pred.finding_heatmaps[config.labels[int(np.argmax(pred.probabilities))]]
        return pred

    @staticmethod
    def _cls_grads(head, embeddings: list[torch.Tensor]) -> torch.Tensor:
        """d logit_k / d h_s for every finding k and slice s of the first view: (K, S, C)."""
        with torch.enable_grad():
            first = embeddings[0].detach().requires_grad_(True)
            logits = head([first, *embeddings[1:]])[0]  # (K,)
            grads = [torch.autograd.grad(logits[k], first, retain_graph=True)[0][0] for k in range(logits.shape[0])]
        return torch.stack(grads)

    @staticmethod
    def _volume(patch_maps: torch.Tensor, grid: tuple[int, int], importance: torch.Tensor) -> np.ndarray:
        return hm.weight_by_importance(hm.to_grid(patch_maps, grid), importance).cpu().numpy()

    @staticmethod
    def _prediction(name, config, logits, v, importance) -> Prediction:
        calibrated = calibrated_logits(logits.float(), config)
        return Prediction(
            plugin=name, labels=list(config.labels), task=config.task,
            logits=logits.float().cpu().numpy(), calibrated_logits=calibrated.cpu().numpy(),
            probabilities_raw=probabilities(logits.float(), config.task).cpu().numpy(),
            probabilities=probabilities(calibrated, config.task).cpu().numpy(),
            thresholds=np.asarray(config.thresholds, dtype=np.float32),
            slice_importance=[a[0].float().cpu().numpy() for a in importance],
            embedding=v.float().cpu().numpy(),
        )

    def predict_image(self, images: Union[sitk.Image, Sequence[sitk.Image]], plugins: Optional[Sequence[str]] = None,
                      heatmap: Optional[str] = None, sources: Optional[Sequence[str]] = None,
                      progress: Optional[Progress] = None) -> CaseResult:
        """Predict one case given as SimpleITK image(s), one per view, with every (or the named) plugin.

        Slices shared by plugins with the same preprocessing recipe are prepared once.
        """
        images = [images] if isinstance(images, sitk.Image) else list(images)
        sources = list(sources) if sources is not None else [None] * len(images)
        plugins = list(plugins or self.plugins)
        if not plugins:
            raise PluginError("no plugin is attached")
        if heatmap is not None:
            hm.check_method(heatmap)
        for image, source in zip(images, sources):
            validate_image(image, source)
        prepared: dict[tuple[int, str], tuple[torch.Tensor, SliceGeometry]] = {}
        predictions = []
        for name in plugins:
            config = self.plugins[name].plugin.config
            if len(images) != len(config.views):
                raise InputError(sources[0], f"plugin {name} takes {len(config.views)} view(s) {config.views}, "
                                             f"got {len(images)} image(s)")
            views = []
            for i, recipe in enumerate(config.preprocessing):
                key = (i, json.dumps(recipe.to_dict(), sort_keys=True))
                if key not in prepared:
                    prepared[key] = prepare(images[i], recipe, sources[i])
                views.append(prepared[key])
            prediction = self.predict_slices([s for s, _ in views], name, heatmap, progress)
            prediction.geometry = views[0][1]
            predictions.append(prediction)
        return CaseResult(sources=[str(s) for s in sources], predictions=predictions)

    def predict_file(self, paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
                     plugins: Optional[Sequence[str]] = None, heatmap: Optional[str] = None,
                     progress: Optional[Progress] = None) -> CaseResult:
        """Predict one case from image file(s) or DICOM folder(s), one per view."""
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if progress:
            progress("reading", 0, 1)
        images = [read_image(p) for p in paths]
        return self.predict_image(images, plugins, heatmap, sources=[str(Path(p)) for p in paths], progress=progress)


def ensemble(predictions: Sequence[Prediction], name: str = "ensemble") -> Prediction:
    """Average the members' calibrated logits (the members must share labels and task)."""
    first = predictions[0]
    for p in predictions[1:]:
        if p.labels != first.labels or p.task != first.task:
            raise PluginError(f"ensemble members must share labels and task: {first.plugin} has {first.labels} "
                              f"({first.task}), {p.plugin} has {p.labels} ({p.task})")
        if p.geometry != first.geometry or [len(a) for a in p.slice_importance] != [len(a) for a in first.slice_importance]:
            raise PluginError(f"ensemble members must slice the images alike: {first.plugin} and {p.plugin} "
                              "have different preprocessing")
    mean = lambda arrays: np.mean(np.stack(arrays), axis=0)  # noqa: E731
    logits, calibrated = mean([p.logits for p in predictions]), mean([p.calibrated_logits for p in predictions])
    prob = lambda z: probabilities(torch.from_numpy(z), first.task).numpy()  # noqa: E731
    heatmaps = [p.heatmap for p in predictions if p.heatmap is not None]
    return Prediction(
        plugin=name, labels=list(first.labels), task=first.task, logits=logits, calibrated_logits=calibrated,
        probabilities_raw=prob(logits), probabilities=prob(calibrated),
        thresholds=mean([p.thresholds for p in predictions]),
        slice_importance=[mean(list(views)) for views in zip(*(p.slice_importance for p in predictions))],
        embedding=mean([p.embedding for p in predictions]), heatmap_method=first.heatmap_method,
        heatmap=mean(heatmaps) if len(heatmaps) == len(predictions) else None,
        finding_heatmaps={k: mean([p.finding_heatmaps[k] for p in predictions]) for k in first.finding_heatmaps
                          if all(k in p.finding_heatmaps for p in predictions)},
        plugin_paths=[path for p in predictions for path in p.plugin_paths], geometry=first.geometry,
    )
