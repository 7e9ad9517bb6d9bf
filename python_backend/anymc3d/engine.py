"""Inference engine: one resident backbone serving many plugins and volumes.

The engine owns the runtime options (device, autocast dtype, slice chunk, LoRA merging), loads the backbone
once, attaches each plugin as named LoRA adapters plus an :class:`~anymc3d.model.AnyMC3DModel` (the one
forward), and predicts at three levels: image files, SimpleITK images, and tensors of preprocessed slices.
Chunking and the out-of-memory retry belong to the plugin's encoder kind (:mod:`anymc3d.encoders`).
"""
from __future__ import annotations

import inspect
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
from anymc3d.contract import AUTO_HEATMAP
from anymc3d.encoders import ENCODERS
from anymc3d.lora import add_adapter, load_adapter_state, merge, remove_adapter
from anymc3d.model import AnyMC3DModel
from anymc3d.plugin import LoadedPlugin, calibrated_logits, load_plugin, probabilities
from anymc3d.preprocessing import SliceGeometry, prepare, read_image, validate_image

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
    """One plugin's (or ensemble's) answer for one case, built once and complete; arrays are numpy in the
    slice space of view 0, and ``geometry`` maps them back to the input (None when predicted from slices)."""

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
    kind: str = "slice_lora"

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
            why = "no heatmap was computed" if volume is None else "it was predicted from slices, with no input image"
            raise AnyMC3DError(f"{self.plugin}: no heatmap image: {why}")
        image = self.geometry.to_input(volume)
        peak = float(sitk.GetArrayViewFromImage(image).max())
        # interpolation onto the input grid can lower the peak a little: keep the max at exactly 1
        return sitk.Cast(image / peak, sitk.sitkFloat32) if peak > 0 else image

    def importance_per_input_slice(self) -> np.ndarray:
        """a_s per input slice index along the slicing axis of view 0 (sums to 1).

        Predicted from slices (no input image), the slices are the input: a_s is returned as it is.
        """
        if self.geometry is None:
            return np.asarray(self.slice_importance[0], dtype=np.float64)
        return self.geometry.importance_to_input(self.slice_importance[0])


@dataclass
class CaseResult:
    """Predictions of every plugin for one case."""

    sources: list[str]
    predictions: list[Prediction]


@dataclass
class _Attached:
    plugin: LoadedPlugin
    model: AnyMC3DModel


class Engine:
    """A resident backbone with attached plugins.

    Args:
        backbone: a weights file (safetensors with our metadata, or an official ``.pth`` with ``spec``),
            or an already loaded backbone.
        spec: the architecture, needed when the file does not record it (taken from a plugin by the CLI).
        device: "auto", "cpu", "cuda" or a torch device.
        amp_dtype: autocast dtype on CUDA (default bfloat16); the CPU path runs in float32.
        chunk_size: slices per backbone forward (encoder kinds whose slices are independent).
        merge_lora: fold a single-view plugin's LoRA into the backbone weights while it runs (plain layers, no
            adapter matmuls); switching plugins restores the base weights bit for bit.
        compile: run the slice encoder through ``torch.compile`` (falls back to eager where it cannot compile).
    """

    def __init__(self, backbone: Union[str, os.PathLike, LoadedBackbone], *, spec: Optional[BackboneSpec] = None,
                 device: str | torch.device = "auto", amp_dtype: torch.dtype = torch.bfloat16, chunk_size: int = 32,
                 merge_lora: bool = False, compile: bool = False):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.device = resolve_device(device)
        self.amp_dtype = amp_dtype
        self.chunk_size = chunk_size
        self.merge_lora = merge_lora
        self.compile = compile
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
                f"{source}: plugin was made for backbone {config.backbone.describe()} (weights "
                f"{config.backbone_fingerprint[:12]}), but the loaded backbone is {mine.spec.describe()} (weights "
                f"{mine.fingerprint[:12]}, {mine.path}); use the backbone the plugin was trained on")
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
        model = AnyMC3DModel(self.model, plugin.head, adapters, kind=config.kind, **self._encoder_options(config))
        self.plugins[name] = _Attached(plugin, model)
        return name

    def _encoder_options(self, config) -> dict:
        """The options for the plugin's encoder kind: the engine's runtime options the kind's constructor accepts,
        merged with the plugin's own ``encoder`` options (validated by the kind when the plugin was read)."""
        accepted = inspect.signature(ENCODERS[config.kind]).parameters
        options = {"chunk_size": self.chunk_size, "compile": self.compile}
        return {**{k: v for k, v in options.items() if k in accepted}, **config.encoder}

    def remove_plugin(self, name: str) -> None:
        attached = self.plugins.pop(name)
        for adapter in attached.model.adapters:
            remove_adapter(self.model, adapter)

    # ----------------------------------------------------------------------------------- prediction
    def _autocast(self):
        # bf16 autocast on CUDA only: CPU autocast is slower than fp32 on most CPUs and not bit-stable.
        return torch.autocast("cuda", dtype=self.amp_dtype, enabled=self.device.type == "cuda")

    def _prepare_weights(self, model: AnyMC3DModel) -> None:
        """Merge a single-view plugin's LoRA when asked (a merged adapter of another plugin is restored first)."""
        if self.merge_lora and len(model.adapters) == 1:
            merge(self.model, model.adapters[0])

    def predict_slices(self, views: Sequence[torch.Tensor], plugin: str, heatmap: Optional[str] = None,
                       progress: Optional[Progress] = None, geometry: Optional[SliceGeometry] = None) -> Prediction:
        """Predict one case from preprocessed slices.

        Args:
            views: one (S_v, M, M) tensor in [0, 1] per plugin view (the output of ``prepare``).
            plugin: name of an attached plugin.
            heatmap: None, "auto" (the kind's default) or one of ``heatmap.METHODS`` that the plugin's kind
                supports (``encoder.heatmap_methods``); computed for the first view.
            geometry: how view 0 was sliced from its input image (``prepare``'s second output), if any.
        """
        attached = self.plugins[plugin]
        config, model = attached.plugin.config, attached.model
        encoder = model.encoder
        if heatmap == AUTO_HEATMAP:  # the kind's own default map
            heatmap = encoder.heatmap_methods[0] if encoder.heatmap_methods else None
        if heatmap is not None:
            hm.check_method(heatmap)
            if heatmap not in encoder.heatmap_methods:
                raise PluginError(f"{plugin}: kind {config.kind!r} has no {heatmap!r} heatmap "
                                  f"(it has {', '.join(encoder.heatmap_methods) or 'none'})")
        if len(views) != len(model.adapters):
            raise InputError(None, f"plugin {plugin} takes {len(config.views)} view(s) {config.views}, got {len(views)}")
        batch = [v[None] for v in views]  # (1, S_v, M, M): one case
        stage = (lambda name: (lambda done, total: progress(name, done, total))) if progress else (lambda name: None)
        self._prepare_weights(model)
        record = heatmap if heatmap in encoder.forward_heatmaps else None
        per_finding = heatmap in encoder.finding_heatmaps
        with torch.inference_mode(), self._autocast():
            out = model(batch, heatmap=record, patch_tokens=per_finding and encoder.finding_needs_patch_tokens,
                        progress=stage("encoding"))
        grid = patch_grid(self.model, *views[0].shape[-2:])
        importance = out.importance[0][0]  # (S_0,)
        heatmap_volume, finding_heatmaps = None, {}
        if record is not None:
            heatmap_volume = _volume(out.patch_maps[0], grid, importance)
        elif per_finding:
            with self._autocast():
                maps = model.finding_maps(batch, out, heatmap, progress=stage("heatmap"))  # (K, 1, S, P)
            finding_heatmaps = {label: _volume(m[0], grid, importance) for label, m in zip(config.labels, maps)}
        logits = out.logits[0].float()
        calibrated = calibrated_logits(logits, config)
        probs = probabilities(calibrated, config.task).cpu().numpy()
        if finding_heatmaps:
            heatmap_volume = finding_heatmaps[config.labels[int(np.argmax(probs))]]
        return Prediction(
            plugin=plugin, labels=list(config.labels), task=config.task, kind=config.kind,
            logits=logits.cpu().numpy(), calibrated_logits=calibrated.cpu().numpy(),
            probabilities_raw=probabilities(logits, config.task).cpu().numpy(), probabilities=probs,
            thresholds=np.asarray(config.thresholds, dtype=np.float32),
            slice_importance=[a[0].float().cpu().numpy() for a in out.importance],
            embedding=out.pooled[0].float().cpu().numpy(), heatmap_method=heatmap, heatmap=heatmap_volume,
            finding_heatmaps=finding_heatmaps,
            plugin_paths=[str(attached.plugin.path)] if attached.plugin.path else [], geometry=geometry,
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
        if heatmap not in (None, AUTO_HEATMAP):
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
            predictions.append(self.predict_slices([s for s, _ in views], name, heatmap, progress, geometry=views[0][1]))
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


def _volume(patch_maps: torch.Tensor, grid: tuple[int, int], importance: torch.Tensor) -> np.ndarray:
    """(S, P) per-slice patch maps -> the (S, h, w) volume heatmap weighted by a_s, max 1."""
    return hm.weight_by_importance(hm.to_grid(patch_maps.float(), grid), importance).cpu().numpy()


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
