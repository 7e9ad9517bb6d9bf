"""A feature cache for interactive similarity maps: the token volume of an image is computed once and reused.

``anymc3d similarity IMAGE --features-cache DIR`` keeps one feature set in ``DIR`` (the files of
:func:`anymc3d.planecycle.features.write_features`, ``features.json`` last). ``features.json`` records a *key*: the
image's SHA-256 (every file of a DICOM folder), the backbone file's resolved path, size and modification time (a
SHA-256 of a 0.3-1.2 GB weights file would cost a second per click), ``--arch``, the mode, the lifting and
preprocessing settings and a format version. A later call with the same key loads ``patch_tokens.npy`` and never
builds or runs the backbone; any difference (a changed image, other settings) recomputes and replaces the set.

Atomicity: before a recomputation ``features.json`` is removed, then the arrays are written (each atomically) and
``features.json`` last, so a crash leaves a folder without a key (a miss next time), never a key over other arrays.
One writer per folder at a time (the Slicer module runs one backend process at a time).
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from anymc3d.planecycle.config import PlaneCycleConfig
from anymc3d.planecycle.features import write_features
from anymc3d.preprocess_config import PreprocessConfig

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
KEY_FIELD = "cache_key"
META_NAME = "features.json"
TOKENS_NAME = "patch_tokens.npy"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (names and contents, sorted by relative name)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def cache_key(image: Path, backbone: Path, arch: str | None, mode: str, config: PlaneCycleConfig,
              preprocess: PreprocessConfig, precision: str = "fp32") -> dict:
    """What the cached features depend on (JSON-serialisable; equal keys give equal features)."""
    stat = Path(backbone).stat()
    return {"version": CACHE_VERSION, "image_sha256": file_sha256(image),
            "backbone": {"path": str(Path(backbone).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
            "arch": arch, "mode": mode, "planecycle": config.to_dict() if mode == "planecycle" else None,
            "preprocess": preprocess.to_dict(), "precision": precision}


def _stored_key(folder: Path) -> dict | None:
    try:
        return json.loads((folder / META_NAME).read_text()).get(KEY_FIELD)
    except (OSError, ValueError, AttributeError):  # missing, unreadable or not a JSON object: a miss
        return None


@dataclass
class CachedTokens:
    patch_tokens: Tensor
    """(D, h, w, C) float32 lifted (or slice-wise) patch tokens after the final norm."""
    hit: bool
    """True when loaded from the cache, False when computed (and stored) by this call."""


def cached_patch_tokens(folder: Path, key: dict, compute: Callable[[], object], meta: dict) -> CachedTokens:
    """The patch tokens for ``key``: loaded from ``folder`` when its key matches, else ``compute()``d and stored.

    Args:
        folder: the cache folder (created when missing).
        key: from :func:`cache_key`.
        compute: returns a batch-size-1 ``VolumeFeatures`` (only called on a miss).
        meta: extra fields for ``features.json``.
    """
    folder = Path(folder)
    if _stored_key(folder) == key:
        try:
            tokens = np.load(folder / TOKENS_NAME, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            logger.warning("%s: unreadable cached features, recomputing", folder / TOKENS_NAME)
        else:
            if tokens.dtype == np.float32 and tokens.ndim == 4:
                logger.info("features loaded from the cache %s", folder)
                return CachedTokens(torch.from_numpy(tokens), hit=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META_NAME).unlink(missing_ok=True)  # invalidate first: no stale key over new arrays
    feats = compute()
    write_features(feats, folder, {**meta, KEY_FIELD: key})
    logger.info("features computed and cached in %s", folder)
    return CachedTokens(feats.patch_tokens[0], hit=False)

