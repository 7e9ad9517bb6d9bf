"""Backbones by name: the catalog of known backbones and the one cache folder they are fetched into.

``--backbone dinov2_vits14_reg`` names an entry of ``schemas/backbone-catalog.json``; it resolves to the copy in
the cache folder that ``anymc3d backbone get`` wrote (docs/backbones.md). The cache folder is
``$ANYMC3D_HOME/backbones`` when ``ANYMC3D_HOME`` is set, else ``$XDG_CACHE_HOME/anymc3d/backbones`` (by default
``~/.cache/anymc3d/backbones``). Each name has its own sub-folder, complete once its ``provenance.json``
(source, SHA-256, licence) is written, which ``get`` does last.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Optional

from anymc3d.errors import BackboneError

CATALOG_FILE = Path(__file__).parent / "schemas" / "backbone-catalog.json"
PROVENANCE = "provenance.json"


@lru_cache(maxsize=1)
def catalog() -> dict[str, dict]:
    """Name -> entry (arch, params, size_mb, licence, description, source)."""
    return json.loads(CATALOG_FILE.read_text(encoding="utf-8"))["backbones"]


def cache_dir(override: Optional[os.PathLike | str] = None) -> Path:
    """The backbone cache folder: ``override``, else from ``ANYMC3D_HOME``, else the user's cache folder."""
    if override:
        return Path(override).expanduser()
    home = os.environ.get("ANYMC3D_HOME")
    if home:
        return Path(home).expanduser() / "backbones"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "anymc3d" / "backbones"


def entry(name: str) -> dict:
    try:
        return catalog()[name]
    except KeyError:
        raise BackboneError(f"{name}: not a known backbone name; known: {', '.join(catalog())}") from None


def target(name: str, cache: Optional[os.PathLike | str] = None) -> Path:
    """Where ``name``'s weights live in the cache: a file, or the folder of a transformers checkpoint."""
    folder = cache_dir(cache) / name
    source = entry(name)["source"]
    return folder if source["kind"] == "hub" else folder / source["file"]


def is_cached(name: str, cache: Optional[os.PathLike | str] = None) -> bool:
    return (cache_dir(cache) / name / PROVENANCE).is_file()


def resolve_backbone(source: os.PathLike | str, cache: Optional[os.PathLike | str] = None) -> Path:
    """A backbone path as given, or the cached copy of a catalog name; a name not fetched yet is refused in one
    line that says how to fetch it and where a copy made by hand goes."""
    path = Path(source)
    text = str(source)
    if path.name == "config.json" and (path.parent / "model.safetensors").is_file():
        return path.parent  # a transformers checkpoint named by its config (what a file chooser can pick)
    if path.exists() or text not in catalog():
        return path
    if not is_cached(text, cache):
        raise BackboneError(f"{text}: backbone not in the cache {cache_dir(cache) / text}; run `anymc3d backbone get "
                            f"{text}` (or copy the weights to {target(text, cache)} and run it again to record them)")
    return target(text, cache)
