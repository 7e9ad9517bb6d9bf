"""Inference engine: one resident backbone serving many plugins and volumes.

The engine owns the runtime options (device, precision, slice chunk, LoRA merging), loads the backbone
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
from torch import nn

from anymc3d import heatmap as hm
from anymc3d.backbone import BackboneSpec, LoadedBackbone, load_backbone, patch_grid
from anymc3d.errors import AnyMC3DError, InputError, PluginError
from anymc3d.contract import AUTO_HEATMAP, decide
from anymc3d.device import place_backbone, placement, precision_name, resolve_device, resolve_precision
from anymc3d.encoders import ENCODERS, create_encoder
from anymc3d.lora import (activate, add_adapter, check_state, fold_state, load_adapter_state, merged_adapter,
                          remove_adapter, unmerge)
from anymc3d.model import AnyMC3DModel
from anymc3d.planecycle.converter import VolumeFeatures
from anymc3d.plugin import LoadedPlugin, calibrated_logits, load_plugin, probabilities
from anymc3d.image_reading import read_image, validate_image
from anymc3d.preprocessing import SliceGeometry, prepare

logger = logging.getLogger(__name__)

#: progress(stage, done, total): stage is "reading", "encoding", "heatmap" (see docs/cli-contract.md).
Progress = Callable[[str, int, int], None]


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
    heatmap_localisation: Optional[dict] = None  # the plugin's measured localisation of heatmap_method; None: never
    kind: str = "slice_lora"
    precision: str = "fp32"  # the backbone's precision (anymc3d.device); pooling, head and probabilities are fp32

    @property
    def decisions(self) -> np.ndarray:
        """The contract's decision rule (:func:`anymc3d.contract.decide`), per label in label order."""
        decided = decide(self.task, self.labels, dict(zip(self.labels, self.probabilities.tolist())),
                         dict(zip(self.labels, self.thresholds.tolist())))
        return np.array([decided[k] for k in self.labels])

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
class CasePredictions:
    """Predictions of every plugin for one case."""

    sources: list[str]
    predictions: list[Prediction]


@dataclass
class _Attached:
    plugin: LoadedPlugin
    model: AnyMC3DModel
    folded: Optional[dict] = None  # merged plugins: their one view's LoRA tensors, folded in while they run


class Engine:
    """A resident backbone with attached plugins.

    Args:
        backbone: a weights file (safetensors with our metadata, or an official ``.pth`` with ``spec``),
            or an already loaded backbone (taken over: moved to the device and cast to the precision in place),
            or a bare timm model, taken over likewise, for :meth:`features` only (a plugin is checked against the
            architecture and fingerprint that a loaded backbone carries).
        spec: the architecture, needed when the file does not record it (taken from a plugin by the CLI).
        device: "auto", "cpu", "cuda" or a torch device.
        precision: the backbone's precision, "auto" (bf16 where the device computes it natively, else fp32),
            "fp32", "bf16", "fp16" or a torch dtype (see :mod:`anymc3d.device`); the head runs in fp32.
        chunk_size: slices per backbone forward (encoder kinds whose slices are independent).
        merge_lora: fold a single-view plugin's LoRA into the backbone weights while it runs (plain layers, no
            adapter matmuls; the fastest path, so the default); switching plugins restores the base weights bit
            for bit. False runs the adapters unmerged.
        compile: run the slice encoder through ``torch.compile`` (falls back to eager where it cannot compile).
        heatmap: the heatmap method the caller will ask for, if known (the precision before the first
            prediction). With "auto" precision each prediction runs in the precision its heatmap method allows
            (``anymc3d.device.BF16_METHODS``), switched in place at no cost; its record says which.
    """

    def __init__(self, backbone: Union[str, os.PathLike, LoadedBackbone, nn.Module], *,
                 spec: Optional[BackboneSpec] = None,
                 device: str | torch.device = "auto", precision: str | torch.dtype = "auto", chunk_size: int = 32,
                 merge_lora: bool = True, compile: bool = False, heatmap: Optional[str] = None):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.device = resolve_device(device)
        self.requested_precision = precision
        self.dtype = resolve_precision(precision, self.device, heatmap)
        self.chunk_size = chunk_size
        self.merge_lora = merge_lora
        self.compile = compile
        if isinstance(backbone, nn.Module):
            backbone = LoadedBackbone(model=backbone, spec=None, fingerprint="")
        self.backbone = backbone if isinstance(backbone, LoadedBackbone) else load_backbone(backbone, spec)
        self.model = place_backbone(self.backbone.model, self.device, self.dtype).eval()
        self.plugins: dict[str, _Attached] = {}
        self._adapter_count = 0

    # ----------------------------------------------------------------------------------- plugins
    def add_plugin(self, plugin: Union[str, os.PathLike, LoadedPlugin], name: Optional[str] = None) -> str:
        """Attach a plugin (file, folder or loaded) to the resident backbone; returns its name here."""
        plugin = plugin if isinstance(plugin, LoadedPlugin) else load_plugin(plugin)
        config = plugin.config
        source = plugin.path or config.name
        mine = self.backbone
        if mine.spec is None:
            raise PluginError(f"{source}: this engine runs a bare model, with no architecture or fingerprint to "
                              "check a plugin against; load the backbone from its file")
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
        folded = None
        if self.merge_lora and len(plugin.lora) == 1:  # no adapter layers: folded into the weights when it runs
            try:
                check_state(self.model, plugin.lora[0], config.lora)
            except PluginError as exc:
                raise PluginError(f"{source}: {exc}") from None
            folded = {k: v.to(self.device) for k, v in plugin.lora[0].items()}
            adapters = [f"folded{self._adapter_count}"]
            self._adapter_count += 1
        else:
            adapters = self._add_adapters(plugin, source)
        plugin.head.to(self.device).eval()
        model = AnyMC3DModel(self.model, plugin.head, adapters, kind=config.kind,
                             **self._encoder_options(config.kind, config.encoder))
        self.plugins[name] = _Attached(plugin, model, folded)
        return name

    def _add_adapters(self, plugin: LoadedPlugin, source) -> list[str]:
        """One peft adapter per view of ``plugin`` (multi-view plugins, or ``merge_lora=False``)."""
        adapters = []
        try:
            for view_state in plugin.lora:
                adapter = f"adapter{self._adapter_count}"
                self._adapter_count += 1
                add_adapter(self.model, adapter, plugin.config.lora)
                adapters.append(adapter)
                load_adapter_state(self.model, adapter, view_state)
        except PluginError as exc:
            for adapter in adapters:
                remove_adapter(self.model, adapter)
            raise PluginError(f"{source}: {exc}") from None
        place_backbone(self.model, self.device, self.dtype)  # the new adapter layers too
        return adapters

    def _encoder_options(self, kind: str, own: dict) -> dict:
        """The options for encoder ``kind``: the engine's runtime options the kind's constructor accepts, merged
        with the kind's own options (a plugin's ``encoder`` options, validated by the kind when it was read)."""
        if kind not in ENCODERS:
            raise ValueError(f"kind: unknown encoder kind {kind!r}; known: {sorted(ENCODERS)}")
        accepted = inspect.signature(ENCODERS[kind]).parameters
        options = {"chunk_size": self.chunk_size, "compile": self.compile}
        return {**{k: v for k, v in options.items() if k in accepted}, **own}

    def remove_plugin(self, name: str) -> None:
        attached = self.plugins.pop(name)
        if attached.folded is not None:
            if merged_adapter(self.model) == attached.model.adapters[0]:
                unmerge(self.model)
            return
        for adapter in attached.model.adapters:
            remove_adapter(self.model, adapter)

    # ----------------------------------------------------------------------------------- features
    def features(self, volume: torch.Tensor, kind: str = "planecycle", layers: Sequence[int] = (),
                 **options) -> VolumeFeatures:
        """Token features of one volume from the bare backbone (no plugin's LoRA), through encoder ``kind``.

        Args:
            volume: (D, 3, H, W) normalised slices (``preprocessing.to_model_input``), cast to the engine's
                device and precision.
            kind: "planecycle" (lifted; ``variant`` and ``cycle`` in ``options``) or "slice_lora" (the 2D model on
                every slice, in chunks of the engine's chunk size with the out-of-memory retry).
            layers: 0-based block indices whose (normed) outputs to return as well.

        Returns:
            :class:`VolumeFeatures` with batch size 1, float32 on the CPU.
        """
        activate(self.model, None)  # a plugin's merged or active LoRA is set aside (restored bit for bit)
        encoder = create_encoder(kind, self.model, **self._encoder_options(kind, options))
        x = volume.to(self.device, placement(self.model)[1])[None]  # (1, D, 3, H, W), the backbone's input dtype
        with torch.inference_mode():
            return encoder.features(x, layers).float_cpu()

    # ----------------------------------------------------------------------------------- prediction
    @property
    def precision(self) -> str:
        """The backbone's precision as records name it: 'fp32', 'bf16' or 'fp16'."""
        return precision_name(self.dtype)

    def _set_precision(self, heatmap: Optional[str]) -> None:
        """Under "auto" precision, the precision this prediction's heatmap method allows."""
        dtype = resolve_precision(self.requested_precision, self.device, heatmap)
        if dtype != self.dtype:
            self.dtype = dtype
            place_backbone(self.model, self.device, dtype)

    def _prepare_weights(self, attached: _Attached) -> None:
        """Fold a merged plugin's LoRA into the weights (another plugin's merged LoRA is restored first)."""
        if attached.folded is not None:
            fold_state(self.model, attached.model.adapters[0], attached.folded, attached.plugin.config.lora)

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
        if heatmap == AUTO_HEATMAP:  # the plugin's best measured map, else the kind's own default
            heatmap = auto_heatmap_method(config, encoder.heatmap_methods)
        if heatmap is not None:
            hm.check_method(heatmap)
            if heatmap not in encoder.heatmap_methods:
                raise PluginError(f"{plugin}: kind {config.kind!r} has no {heatmap!r} heatmap "
                                  f"(it has {', '.join(encoder.heatmap_methods) or 'none'})")
        if len(views) != len(model.adapters):
            raise InputError(None, f"plugin {plugin} takes {len(config.views)} view(s) {config.views}, got {len(views)}")
        batch = [v[None] for v in views]  # (1, S_v, M, M): one case
        stage = (lambda name: (lambda done, total: progress(name, done, total))) if progress else (lambda name: None)
        self._prepare_weights(attached)
        self._set_precision(heatmap)
        record = heatmap if heatmap in encoder.forward_heatmaps else None
        per_finding = heatmap in encoder.finding_heatmaps
        with torch.inference_mode():
            out = model(batch, heatmap=record, patch_tokens=per_finding and encoder.finding_needs_patch_tokens,
                        progress=stage("encoding"))
        grid = patch_grid(self.model, *views[0].shape[-2:])
        importance = out.importance[0][0]  # (S_0,)
        heatmap_volume, finding_heatmaps = None, {}
        if record is not None:
            heatmap_volume = _volume(out.patch_maps[0], grid, importance)
        elif per_finding:
            maps = model.finding_maps(batch, out, heatmap, progress=stage("heatmap"))  # (K, 1, S, P)
            if heatmap in encoder.unweighted_heatmaps:  # the map includes the pooling: no a_s again; drops only
                maps, weights = maps.clamp(min=0), torch.ones_like(importance)
            else:
                weights = importance
            finding_heatmaps = {label: _volume(m[0], grid, weights) for label, m in zip(config.labels, maps)}
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
            heatmap_localisation=config.heatmap_localisation(heatmap),
            precision=self.precision,
        )

    def predict_image(self, images: Union[sitk.Image, Sequence[sitk.Image]], plugins: Optional[Sequence[str]] = None,
                      heatmap: Optional[str] = None, sources: Optional[Sequence[str]] = None,
                      progress: Optional[Progress] = None) -> CasePredictions:
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
        return CasePredictions(sources=[str(s) for s in sources], predictions=predictions)

    def predict_file(self, paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
                     plugins: Optional[Sequence[str]] = None, heatmap: Optional[str] = None,
                     progress: Optional[Progress] = None) -> CasePredictions:
        """Predict one case from image file(s) or DICOM folder(s), one per view."""
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if progress:
            progress("reading", 0, 1)
        images = [read_image(p) for p in paths]
        return self.predict_image(images, plugins, heatmap, sources=[str(Path(p)) for p in paths], progress=progress)


def auto_heatmap_method(config, methods: Sequence[str]) -> Optional[str]:
    """``--heatmap-method auto``: the method the plugin's model card measured best (``localisation.best``) when
    its kind can give it, else the kind's default (the first of ``methods``); None for a kind without maps."""
    best = (config.localisation or {}).get("best")
    if best in methods:
        return best
    return methods[0] if methods else None


def _volume(patch_maps: torch.Tensor, grid: tuple[int, int], importance: torch.Tensor) -> np.ndarray:
    """(S, P) per-slice patch maps -> the (S, h, w) volume heatmap weighted by a_s, max 1."""
    return hm.weight_by_importance(hm.to_grid(patch_maps.float(), grid), importance).cpu().numpy()


def ensemble(predictions: Sequence[Prediction], name: str = "ensemble") -> Prediction:
    """Average the members' calibrated logits (the members must share labels and task)."""
    first = predictions[0]
    _check_members(predictions)
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
        finding_heatmaps=_common_finding_heatmaps(predictions, mean),
        plugin_paths=[path for p in predictions for path in p.plugin_paths], geometry=first.geometry,
        precision=first.precision,
    )


def _check_members(predictions: Sequence[Prediction]) -> None:
    """PluginError unless every member shares the first's labels, task and slicing."""
    first = predictions[0]
    for p in predictions[1:]:
        if p.labels != first.labels or p.task != first.task:
            raise PluginError(f"ensemble members must share labels and task: {first.plugin} has {first.labels} "
                              f"({first.task}), {p.plugin} has {p.labels} ({p.task})")
        if p.geometry != first.geometry or [len(a) for a in p.slice_importance] != [len(a) for a in first.slice_importance]:
            raise PluginError(f"ensemble members must slice the images alike: {first.plugin} and {p.plugin} "
                              "have different preprocessing")


def _common_finding_heatmaps(predictions: Sequence[Prediction], mean) -> dict[str, np.ndarray]:
    """The mean per-finding heatmap of every finding that all members have a map for."""
    first = predictions[0]
    return {k: mean([p.finding_heatmaps[k] for p in predictions]) for k in first.finding_heatmaps
            if all(k in p.finding_heatmaps for p in predictions)}
