"""Reading untrusted files with limits, and writing outputs that never go through a link.

Everything a user hands to ``anymc3d`` or the review page (plugin files and folders, results files, metadata) may be
hostile. This module holds the limits in one place:

- JSON: a size limit before parsing and a nesting limit checked on the text before ``json.loads`` (whose C scanner
  would otherwise recurse until ``RecursionError``); one-line ``ValueError`` naming the source.
- zip members: sizes and the compression method checked from the central directory before a byte is inflated (a
  plugin's members are stored, never deflated: a 1 MB file cannot declare a 1 GiB member).
- image headers: :data:`MAX_VOXELS`, the voxel limit of every reader (checked from the header, before voxels).
- outputs: :func:`create_exclusive` makes a new file beside its target with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (a
  link planted at the name is never followed), :func:`inside` says whether a folder resolves inside another.

Standard library and numpy only: the Slicer module and the review page use it without torch.
"""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np

MAX_JSON_BYTES = 16 * 1024 ** 2
#: deeper than any file this project writes (records and plugin metadata nest fewer than 8 levels)
MAX_JSON_DEPTH = 64
#: voxels of an image or heatmap a reader accepts (512 Mi: above a 1024x1024x512 volume)
MAX_VOXELS = 512 * 1024 ** 2

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_OPEN, _CLOSE = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON ``text`` (strings skipped): one pass in C and numpy."""
    if "[" not in text and "{" not in text:
        return 0
    codes = np.frombuffer(_STRING.sub("0", text).encode("utf-8", "surrogatepass"), np.uint8)
    steps = np.isin(codes, _OPEN).astype(np.int32) - np.isin(codes, _CLOSE).astype(np.int32)
    return int(np.cumsum(steps).max()) if steps.size else 0


def loads(raw, source, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH):
    """``json.loads`` of untrusted ``raw`` (bytes or str) with a size and a nesting limit (the values are the
    caller's to check: the contract refuses a NaN probability).

    Raises:
        ValueError: one line naming ``source``.
    """
    if len(raw) > max_bytes:
        raise ValueError(f"{source}: JSON larger than {max_bytes} bytes")
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
    except UnicodeDecodeError as error:
        raise ValueError(f"{source}: not UTF-8 JSON ({error.reason} at byte {error.start})") from None
    if json_depth(text) > max_depth:
        raise ValueError(f"{source}: JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{source} is not valid JSON ({message})") from None


def read_json(path, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH):
    """:func:`loads` of a file, reading at most ``max_bytes`` + 1 bytes (the size is never trusted from ``stat``)."""
    try:
        with open(path, "rb") as file:
            raw = file.read(max_bytes + 1)
    except OSError as error:
        raise ValueError(f"{path}: cannot read ({error.strerror or error})") from None
    return loads(raw, path, max_bytes, max_depth)


def link_problem(path) -> str | None:
    """Why ``path`` cannot be opened as a file system entry: a symbolic-link loop, a dangling link, or
    missing; None when it can. (``Path.exists()`` says False for all three without telling which.)"""
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if os.path.islink(path):
            return f"is a dangling symbolic link (to {os.readlink(path)})"
        return "file or folder not found"
    except ValueError as error:  # embedded NUL and the like
        return f"is not a usable path ({error})"
    return None


def read_limited(path, max_bytes: int) -> bytes:
    """The bytes of a file of at most ``max_bytes`` (ValueError naming it otherwise); never reads more."""
    with open(path, "rb") as file:
        raw = file.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ValueError(f"{path}: larger than {max_bytes} bytes")
    return raw


def check_stored_members(archive: zipfile.ZipFile, source, limits: dict) -> None:
    """Check a zip's members against ``limits`` (name -> most bytes) from its central directory, before reading:
    exactly those names, each stored (not compressed: its size on disk is its size), within its limit, and all
    of them within the file. Raises ValueError naming ``source``."""
    infos = archive.infolist()
    names = [info.filename for info in infos]
    if sorted(names) != sorted(limits):
        raise ValueError(f"{source}: holds exactly {' and '.join(sorted(limits))}, found {sorted(names)}")
    total = 0
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise ValueError(f"{source}: member {info.filename} is compressed (a plugin's members are stored)")
        if info.file_size > limits[info.filename]:
            raise ValueError(f"{source}: member {info.filename} is larger than {limits[info.filename]} bytes")
        total += info.file_size
    size = os.fstat(archive.fp.fileno()).st_size if hasattr(archive.fp, "fileno") else None
    if size is not None and total > size:
        raise ValueError(f"{source}: members declare {total} bytes, more than the file's {size}")


def check_voxels(source, size, max_voxels: int = MAX_VOXELS) -> None:
    """ValueError naming ``source`` when an image header's ``size`` holds more than ``max_voxels`` voxels."""
    count = 1
    for extent in size:
        count *= int(extent)
    if count > max_voxels:
        raise ValueError(f"{source} is too large: {tuple(int(s) for s in size)} = {count} voxels (limit {max_voxels})")


def inside(path, folder) -> bool:
    """Whether ``path`` resolves (links followed) to ``folder`` or somewhere below it."""
    resolved, root = Path(path).resolve(), Path(folder).resolve()
    return resolved == root or root in resolved.parents


def create_exclusive(folder, name_hint: str):
    """A new, empty file in ``folder`` opened for binary writing: ``(file, path)``. Made with ``mkstemp``
    (``O_CREAT | O_EXCL | O_NOFOLLOW``, a random hidden name): nothing planted at a guessable name is followed."""
    descriptor, path = tempfile.mkstemp(prefix=f".{name_hint}.", suffix=".partial", dir=folder)
    return os.fdopen(descriptor, "wb"), path


def link_new(source: str, target: str) -> None:
    """Give the finished file ``source`` the name ``target`` only if nothing is there (a hard link fails on any
    existing name, a link included: atomic, never overwrites), then remove ``source``'s name."""
    try:
        os.link(source, target, follow_symlinks=False)
    except FileExistsError:
        raise ValueError(f"{target} exists: results are never overwritten") from None
    finally:
        os.unlink(source)


__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "MAX_VOXELS", "check_stored_members", "check_voxels",
           "create_exclusive", "inside", "json_depth", "link_new", "link_problem", "loads", "read_json", "read_limited"]
