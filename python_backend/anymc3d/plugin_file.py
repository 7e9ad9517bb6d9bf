"""A plugin on disk, read without torch: its members (``.anymc3d`` zip file or folder) and its ``plugin.json``.

A plugin is ``plugin.json`` (metadata) plus ``plugin.safetensors`` (weights), stored as a zip file named
``*.anymc3d`` or as a folder. This module reads the members and checks ``plugin.json`` against
``schemas/plugin.schema.json`` with the standard library alone (``jsonschema`` when installed, else the contract's
hand checker), so that the Slicer module can list plugins before torch is installed, and so that listing never
imports torch, timm or peft. :mod:`anymc3d.plugin` adds the torch side: the semantic checks of
``PluginConfig`` and the tensors. Plugins are never unpickled: the weights are safetensors.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import zipfile
from importlib import resources
from pathlib import Path
from typing import Optional

from anymc3d.contract import RecordError, check_schema, is_temporary, schema_error
from anymc3d.errors import PluginError
from anymc3d.safeio import MAX_JSON_BYTES, check_stored_members, loads, read_limited

JSON_NAME, WEIGHTS_NAME = "plugin.json", "plugin.safetensors"
PLUGIN_SUFFIX = ".anymc3d"
MAX_MEMBER_BYTES = 4 * 1024 ** 3
TRAINING_KEY = "anymc3d.training"  # safetensors metadata key of the optional training summary


def plugin_schema() -> dict:
    """The JSON schema of ``plugin.json`` (schemas/plugin.schema.json)."""
    return json.loads(resources.files("anymc3d").joinpath("schemas/plugin.schema.json").read_text())


def check_card(**texts: str) -> None:
    """Check a plugin's model-card texts (``name``, ``description``, ``modality``, ``body_part``) against their
    ``plugin.json`` schema, before a plugin is made or a training starts; ValueError naming the field and what it
    must be (one line, length-limited, no control characters; the modality a DICOM Modality code)."""
    properties = plugin_schema()["properties"]
    for key, value in texts.items():
        if value == "" and key != "name":
            continue  # not stated
        try:
            check_schema(value, properties[key], key)
        except RecordError:
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            must = properties[key]["description"].removeprefix("optional: ").split("; absent")[0]
            raise ValueError(f"{key}: {must}; got {shown}") from None


def read_members(path: os.PathLike | str, weights: bool = True) -> tuple[bytes, Optional[bytes]]:
    """(plugin.json bytes, plugin.safetensors bytes) of a plugin file or folder; the weights are None when
    ``weights`` is False (a listing reads the small JSON member only). Sizes (and, in a zip, the members' names and
    stored method) are checked before a byte is read. Raises PluginError naming the file."""
    path = Path(path)
    limits = {JSON_NAME: MAX_JSON_BYTES, WEIGHTS_NAME: MAX_MEMBER_BYTES}
    if path.is_dir():
        files = [path / JSON_NAME, path / WEIGHTS_NAME]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise PluginError(f"{path}: plugin folder lacks {', '.join(missing)}")
        try:
            return (read_limited(files[0], limits[JSON_NAME]),
                    read_limited(files[1], limits[WEIGHTS_NAME]) if weights else None)
        except (OSError, ValueError) as exc:
            raise PluginError(f"{path}: {exc}") from None
    if not path.is_file():
        raise PluginError(f"{path}: plugin not found")
    try:
        with zipfile.ZipFile(path) as zf:
            check_stored_members(zf, path, limits)
            return zf.read(JSON_NAME), zf.read(WEIGHTS_NAME) if weights else None
    except ValueError as exc:
        raise PluginError(str(exc)) from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise PluginError(f"{path}: not a readable plugin file ({exc})") from None


def parse_json(raw: bytes, path: os.PathLike | str) -> dict:
    """``plugin.json`` bytes as a dict (size and nesting limited: :func:`anymc3d.safeio.loads`); PluginError
    naming the file when it is not a JSON object."""
    try:
        d = loads(raw, f"{path}: {JSON_NAME}", MAX_JSON_BYTES)
    except ValueError as exc:
        raise PluginError(str(exc)) from None
    if not isinstance(d, dict):
        raise PluginError(f"{path}: {JSON_NAME} must hold a JSON object")
    return d


def check_plugin_schema(d: dict, source: os.PathLike | str = "plugin") -> dict:
    """Check ``plugin.json`` contents against the schema (jsonschema when installed, else the contract's hand
    checker, which covers every keyword the schema uses); PluginError names the file and the field."""
    try:
        import jsonschema  # noqa: F401 - only whether it is installed
    except ImportError:  # a fresh Slicer has no jsonschema
        try:
            check_schema(d, plugin_schema(), "(top level)")
        except RecordError as exc:
            where = str(exc).removeprefix("(top level)/")
            raise PluginError(f"{source}: invalid plugin metadata at {where}") from None
        _check_evaluation(d, source)
        return d
    exc = schema_error(d, "plugin.schema.json")
    if exc is not None:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise PluginError(f"{source}: invalid plugin metadata at {where}: {exc.message}") from None
    _check_evaluation(d, source)
    return d


def _check_evaluation(d: dict, source) -> None:
    """What the schema cannot say of a schema-valid ``evaluation`` card: one entry per label in the labels' order,
    positives within the cases, every number finite (JSON readers accept NaN, which no bound refuses)."""
    card = d.get("evaluation")
    if card is None:
        return
    findings = card["findings"]
    problem = None
    if [f["label"] for f in findings] != list(d.get("labels") or []):
        problem = "one entry per label, in the order of labels"
    elif any(f["positives"] > card["cases"] for f in findings):
        problem = "positives above the evaluated cases"
    elif not all(math.isfinite(v) for v in _numbers(findings)):
        problem = "numbers must be finite"
    if problem:
        raise PluginError(f"{source}: invalid plugin metadata at evaluation/findings: {problem}")


def _numbers(value):
    """Every number inside a JSON value."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def read_plugin_json(path: os.PathLike | str) -> dict:
    """The schema-checked ``plugin.json`` of a plugin file or folder (the weights are not read)."""
    raw, _ = read_members(path, weights=False)
    return check_plugin_schema(parse_json(raw, path), path)


def is_plugin_path(path: os.PathLike | str) -> bool:
    """A finished plugin: a ``*.anymc3d`` file, or a folder holding ``plugin.json``; never a temporary."""
    path = Path(path)
    if is_temporary(path.name):
        return False
    return (path.suffix == PLUGIN_SUFFIX and path.is_file()) or (path / JSON_NAME).is_file()


def find_plugins(folder: os.PathLike | str) -> list[Path]:
    """Plugins in a folder: ``*.anymc3d`` files and sub-folders holding a ``plugin.json``, sorted; hidden and
    partial (being written) entries are skipped."""
    return sorted(p for p in Path(folder).iterdir() if is_plugin_path(p))


def _weights_header(path: Path) -> bytes:
    """The safetensors header of a plugin's weights (length-prefixed JSON), read without the tensors; the member
    checks of :func:`read_members` first."""
    limits = {JSON_NAME: MAX_JSON_BYTES, WEIGHTS_NAME: MAX_MEMBER_BYTES}
    with contextlib.ExitStack() as stack:
        if path.is_dir():
            read_members(path, weights=False)
            file = stack.enter_context(open(path / WEIGHTS_NAME, "rb"))
        else:
            archive = stack.enter_context(zipfile.ZipFile(path))
            check_stored_members(archive, path, limits)
            file = stack.enter_context(archive.open(WEIGHTS_NAME))
        (length,) = struct.unpack("<Q", file.read(8))
        return file.read(min(length, MAX_JSON_BYTES + 1))


def read_training_summary(path: os.PathLike | str) -> Optional[dict]:
    """The training summary a trained plugin carries in its weights' safetensors header (``anymc3d train`` writes
    it, see :func:`anymc3d.plugin.plugin_bytes`), or None for a plugin made otherwise (e.g. the untrained demo).

    Torch-free, and only the header is read (the review page and the Slicer module show it before torch is
    installed, for plugins of any size). Raises PluginError naming the file when the header cannot be read."""
    path = Path(path)
    try:
        header = loads(_weights_header(path), f"{path}: weights header")
        raw = (header.get("__metadata__") or {}).get(TRAINING_KEY)
        summary = None if raw is None else loads(raw, f"{path}: training summary")
    except PluginError:
        raise
    except (struct.error, ValueError, AttributeError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise PluginError(f"{path}: unreadable training summary ({exc})") from None
    if summary is not None and not isinstance(summary, dict):
        raise PluginError(f"{path}: the training summary is not a JSON object")
    return summary


def _short(value, limit: int = 300) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _number(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return "?"


def training_lines(summary: dict) -> list[str]:
    """How a plugin was trained (the summary ``anymc3d train`` stores in it), as short lines for people:
    ``anymc3d info`` and the review page show these. Lines whose keys the summary lacks are left out, and names
    are shortened: the summary is a file from elsewhere."""
    lines = []
    if "epochs_run" in summary:
        limit = f" of at most {_short(summary['epochs_max'], 20)}" if "epochs_max" in summary else ""
        best = f" (best epoch {_short(summary['best_epoch'], 20)})" if "best_epoch" in summary else ""
        seconds = f", {_number(summary['seconds'], 1)} s" if "seconds" in summary else ""
        lines.append(f"training     {_short(summary['epochs_run'], 20)} epochs{limit}{best}{seconds}, "
                     f"{_short(summary.get('processes', 1), 20)} process(es)")
    splits = summary.get("splits")
    if isinstance(splits, dict) and splits:
        lines.append("cases        " + "; ".join(_split_counts(split, s) for split, s in splits.items()
                                                 if isinstance(s, dict)))
    if "best_val_auroc" in summary:
        per_label = summary.get("val_auroc_per_label")
        val = (", ".join(f"{_short(k, 40)} {_number(v)}" for k, v in per_label.items())
               if isinstance(per_label, dict) else "")
        lines.append(f"validation   AUROC {_number(summary['best_val_auroc'])}" + (f" ({val})" if val else ""))
    if "raw_f1_thresholds" in summary:
        n_val = splits.get("val", {}).get("cases", "?") if isinstance(splits, dict) else "?"
        lines.append(f"calibrated   Platt scaling fitted on the {_short(n_val, 20)} validation cases "
                     "(F1-optimal raw score -> 0.5)")
    if "manifest" in summary:
        lines.append(f"manifest     {_short(os.path.basename(str(summary['manifest'])), 120)} "
                     f"(sha256 {_short(summary.get('manifest_sha256'), 64)[:16]})")
    return lines


def evaluation_lines(card: Optional[dict]) -> list[str]:
    """A plugin's recorded held-out evaluation (``plugin.json`` ``evaluation``), one line per finding, for
    ``anymc3d info``, the review page and the Slicer module: AUROC with its 95 % CI, sensitivity / specificity at the
    plugin's threshold and at the validation's Youden threshold, cases and positives."""
    if not card:
        return []
    split = "test split" if card.get("split") == "test" else "all cases"
    lines = [f"held-out evaluation on the {split} of manifest sha256 {_short(card.get('manifest_sha256'), 64)[:16]}"]
    for f in card.get("findings") or []:
        ci = f.get("auroc_ci95")
        auroc = (f"AUROC {_number(f.get('auroc'), 2)}" + (f" (95 % CI {_number(ci[0], 2)}-{_number(ci[1], 2)})" if ci else "")
                 if f.get("auroc") is not None else "AUROC n/a (one class only)")
        points = [_operating_point(f.get("at_threshold"), "")]
        if f.get("at_youden"):
            points.append(_operating_point(f["at_youden"], " (validation Youden)"))
        lines.append(f"  {_short(f.get('label'), 40)}: held-out {auroc}, {'; '.join(points)}, "
                     f"{_short(card.get('cases'), 20)} cases ({_short(f.get('positives'), 20)} positive)")
    return lines


def _operating_point(point: dict, name: str) -> str:
    return (f"sensitivity {_number(point.get('sensitivity'), 2)} / specificity {_number(point.get('specificity'), 2)} "
            f"at {_number(point.get('threshold'), 2)}{name}")


def _split_counts(split, s: dict) -> str:
    """'train 40 (lesion 19 positive, ...)': a split's cases and positives per finding (or cases per class)."""
    per = s.get("positives", s.get("per_class"))
    kind = "positive" if "positives" in s else "cases"
    detail = ", ".join(f"{_short(k, 40)} {_short(v, 20)} {kind}" for k, v in per.items()) if isinstance(per, dict) else ""
    return f"{_short(split, 20)} {_short(s.get('cases', '?'), 20)}" + (f" ({detail})" if detail else "")
