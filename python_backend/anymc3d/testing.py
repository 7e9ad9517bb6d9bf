"""Helpers shared by the tests and benchmarks of hostile input (nothing in the package calls them).

:func:`write_plugin_zip` makes a plugin file by hand, bypassing :func:`anymc3d.plugin.save_plugin`'s checks, so
that a test or benchmark can hand ``anymc3d`` a zip bomb or a malformed ``plugin.json`` as an attacker would.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Optional

from anymc3d.plugin_file import JSON_NAME, WEIGHTS_NAME

_MIB = 2 ** 20


def write_plugin_zip(path: os.PathLike | str, json_bytes: bytes, weights: Optional[bytes] = None, *,
                     compress: int = zipfile.ZIP_STORED, inflated_size: int = 0) -> Path:
    """A ``.anymc3d`` zip with ``json_bytes`` as plugin.json (stored) and, as plugin.safetensors, ``weights``
    (with ``compress``) or, without weights, ``inflated_size`` zero bytes deflated in whole MiB (streamed: a
    1 GiB bomb is never in memory here)."""
    path = Path(path)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(zipfile.ZipInfo(JSON_NAME), json_bytes, compress_type=zipfile.ZIP_STORED)
        if weights is not None:
            zf.writestr(zipfile.ZipInfo(WEIGHTS_NAME), weights, compress_type=compress)
            return path
        info = zipfile.ZipInfo(WEIGHTS_NAME)
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as member:
            for _ in range(inflated_size // _MIB):
                member.write(bytes(_MIB))
    return path
