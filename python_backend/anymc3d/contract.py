"""The contract every layer shares, defined once: names, file conventions and the result record.

Importable with the standard library alone (no torch, numpy or SimpleITK), so the Slicer module can use it
before the backend's heavy dependencies are installed, and the web review and the Slicer Logic can read and
check records with the very rules the backend writes them by. ``jsonschema`` is used when present; without it
(a fresh Slicer) :func:`validate_record` still checks the schema's required fields and types by hand.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
from importlib import resources
from pathlib import PurePath
from typing import Any, Optional

#: heatmap methods (first: the paper's map). Which ones a plugin can give depends on its kind: ``contribution`` is
#: the exact per-token share of the logit of lifted-feature (PlaneCycle) plugins; the others are the 2D kind's.
HEATMAP_METHODS = ("attention", "rollout", "grad_rollout", "grad_last", "contribution", "occlusion")
#: ``--heatmap-method auto``: each plugin's own default map (``attention`` for 2D plugins)
AUTO_HEATMAP = "auto"
#: what a user may ask for: "auto" (a plugin's best measured method, else its kind's default) or a method
HEATMAP_CHOICES = (AUTO_HEATMAP, *HEATMAP_METHODS)
#: gradient-weighted attention methods (2D kind)
GRADIENT_METHODS = ("grad_rollout", "grad_last")
#: occlusion of token blocks in the plugin's slice space (2D kind): the logit's drop per block, per finding
OCCLUSION = "occlusion"
#: the methods that give one map per finding (records list them in ``finding_heatmaps``)
FINDING_METHODS = GRADIENT_METHODS + ("contribution", OCCLUSION)
#: ``--device`` choices
DEVICES = ("auto", "cpu", "cuda")
#: numeric precision of the backbone (--precision); auto = bf16 where the device computes it natively, else fp32
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: the help text of ``--precision`` (predict, eval, features, similarity)
PRECISION_HELP = ("Backbone precision: auto = bf16 where the device computes it natively (CPUs with AMX or "
                  "AVX-512-BF16, CUDA GPUs with bf16), else fp32; pooling, head and probabilities are always fp32 "
                  "(default: auto).")
#: heatmap file formats (``--heatmap-format``)
HEATMAP_FORMATS = ("nii.gz", "nrrd")
#: image files that are cases (a folder holding a DICOM series is a case too)
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
#: every temporary output is a hidden file whose name holds this marker; readers skip both
PARTIAL_MARKER = ".partial"
#: exit codes of the CLI
EXIT_OK, EXIT_CASE_FAILED, EXIT_USAGE = 0, 1, 2
#: record statuses
STATUS_OK, STATUS_ERROR = "ok", "error"
#: plugin tasks: a sigmoid per finding (findings independent), or a softmax over the findings (one class)
TASKS = ("multilabel", "multiclass")

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def safe_name(name: str) -> str:
    """A file-name-safe form of a plugin or label name (``[^A-Za-z0-9_.-]`` -> ``_``)."""
    return _UNSAFE.sub("_", name)


def split_suffix(name: str) -> tuple[str, str]:
    """('case1', '.nii.gz') from 'case1.nii.gz'; known image suffixes first, else the last suffix."""
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    stem, dot, ext = name.rpartition(".")
    return (stem, dot + ext) if dot and stem else (name, "")


def image_stem(path: str | os.PathLike) -> str:
    """The file name without its image suffix (``case1`` for ``case1.nii.gz``); other names as they are."""
    name = PurePath(path).name
    stem, suffix = split_suffix(name)
    return stem if suffix.lower() in IMAGE_SUFFIXES else name


def is_temporary(name: str) -> bool:
    """True for hidden files and the backend's own partial outputs: never a case, never a result."""
    return name.startswith(".") or PARTIAL_MARKER in name


def is_image_name(name: str) -> bool:
    """True for a visible, finished file whose name ends in an image suffix."""
    return not is_temporary(name) and name.lower().endswith(IMAGE_SUFFIXES)


def backbone_description(backbone: dict) -> str:
    """What a backbone is, for people (``info``, mismatch messages, the review page), from its architecture entry
    (``plugin.json``'s ``backbone``, ``BackboneSpec.to_dict()``): the released name (``dinov2_vits14_reg``), or
    for a shrunk architecture (block count or width overridden: the demo's and the tests', of which no weights are
    ever released or trained, the backbone being frozen) "DINOv2-architecture demo, 3 blocks, width 96, random
    weights"."""
    name = str(backbone.get("name", "?"))
    depth, width = backbone.get("depth"), backbone.get("embed_dim")
    if not depth and not width and not backbone.get("num_heads"):
        return name
    family = {"dinov2": "DINOv2", "dinov3": "DINOv3"}.get(name.split("_", 1)[0], name)
    parts = [f"{family}-architecture demo"] + ([f"{depth} blocks"] if depth else []) + \
        ([f"width {width}"] if width else []) + ["random weights"]
    return ", ".join(parts)


def heatmap_name(stem: str, plugin: str, label: Optional[str], fmt: str) -> str:
    """``<stem>__<plugin>.<fmt>``, or ``<stem>__<plugin>__<label>.<fmt>`` for per-finding maps."""
    parts = [stem, safe_name(plugin)] + ([safe_name(label)] if label is not None else [])
    return "__".join(parts) + f".{fmt}"


# ------------------------------------------------------------------------------------------ record
def decide(task: str, labels: list[str], probabilities: dict, thresholds: dict) -> dict[str, bool]:
    """The decision rule, per label: multilabel, calibrated probability >= threshold; multiclass, the most probable
    label (the first of equals)."""
    if task == "multiclass":
        top = max(labels, key=lambda k: probabilities[k])
        return {k: k == top for k in labels}
    return {k: probabilities[k] >= thresholds[k] for k in labels}


def record_schema() -> dict:
    """The JSON schema of one record of ``anymc3d predict`` (schemas/record.schema.json)."""
    return json.loads(resources.files("anymc3d").joinpath("schemas/record.schema.json").read_text())


class RecordError(ValueError):
    """A result record that breaks the contract; the message names the field."""


_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
          "object": dict, "null": type(None)}


def _type_ok(value: Any, kinds) -> bool:
    kinds = [kinds] if isinstance(kinds, str) else kinds
    for kind in kinds:
        if kind in ("integer", "number") and isinstance(value, bool):
            continue
        if isinstance(value, _TYPES[kind]):
            return True
    return False


def check_schema(value: Any, schema: dict, where: str) -> None:
    """Check ``value`` against the subset of JSON schema the project's schemas use (type, enum, const, allOf,
    if/then/else, required, properties, additionalProperties, items, minimum/maximum and their exclusive forms,
    minLength/maxLength, minItems/maxItems, pattern, not); raise :class:`RecordError` naming the place. Used where
    jsonschema is not installed (a fresh Slicer): hand-written because the point is to need no third-party package."""
    if "type" in schema and not _type_ok(value, schema["type"]):
        raise RecordError(f"{where}: expected {schema['type']}, got {type(value).__name__}")
    if "enum" in schema and value not in schema["enum"]:
        raise RecordError(f"{where}: {value!r} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        raise RecordError(f"{where}: {value!r} is not {schema['const']!r}")
    _check_combined(value, schema, where)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_bounds(value, schema, where)
    if isinstance(value, str):
        _check_string(value, schema, where)
    if isinstance(value, dict):
        _check_object(value, schema, where)
    if isinstance(value, list):
        _check_array(value, schema, where)


def _check_combined(value: Any, schema: dict, where: str) -> None:
    for part in schema.get("allOf", []):
        check_schema(value, part, where)
    if "if" in schema:
        try:
            check_schema(value, schema["if"], where)
        except RecordError:
            branch = schema.get("else")
        else:
            branch = schema.get("then")
        if branch is not None:
            check_schema(value, branch, where)
    if "not" in schema:
        try:
            check_schema(value, schema["not"], where)
        except RecordError:
            return
        raise RecordError(f"{where}: {value!r} must not match {schema['not']}")


def _check_string(value: str, schema: dict, where: str) -> None:
    if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf):
        raise RecordError(f"{where}: {value!r} has a length outside "
                          f"[{schema.get('minLength', 0)}, {schema.get('maxLength', 'inf')}]")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        raise RecordError(f"{where}: {value!r} does not match {schema['pattern']!r}")


def _check_object(value: dict, schema: dict, where: str) -> None:
    for key in schema.get("required", []):
        if key not in value:
            raise RecordError(f"{where}: '{key}' is a required property")
    props = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in props:
            check_schema(item, props[key], f"{where}/{key}")
        elif isinstance(extra, dict):
            check_schema(item, extra, f"{where}/{key}")
        elif extra is False:
            raise RecordError(f"{where}: unexpected property '{key}'")


def _check_array(value: list, schema: dict, where: str) -> None:
    if len(value) < schema.get("minItems", 0):
        raise RecordError(f"{where}: fewer than {schema['minItems']} items")
    if len(value) > schema.get("maxItems", math.inf):
        raise RecordError(f"{where}: more than {schema['maxItems']} items")
    if isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            check_schema(item, schema["items"], f"{where}/{i}")


def _check_bounds(value: float, schema: dict, where: str) -> None:
    if "minimum" in schema and value < schema["minimum"]:
        raise RecordError(f"{where}: {value} is below {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        raise RecordError(f"{where}: {value} is above {schema['maximum']}")
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        raise RecordError(f"{where}: {value} is not above {schema['exclusiveMinimum']}")
    if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
        raise RecordError(f"{where}: {value} is not below {schema['exclusiveMaximum']}")




def _check_semantics(record: dict) -> None:
    """What a schema cannot say: per-label maps cover the labels, probabilities are probabilities, and
    decisions follow from probability and threshold."""
    if record["status"] == STATUS_ERROR:
        if not record.get("error") or record["results"]:
            raise RecordError("an error record needs a message and no results")
        return
    for i, result in enumerate(record["results"]):
        where = f"results/{i}"
        labels = result["labels"]
        for key in ("probabilities", "probabilities_raw", "thresholds", "decisions"):
            if sorted(result[key]) != sorted(labels):
                raise RecordError(f"{where}/{key}: keys {sorted(result[key])} differ from labels {sorted(labels)}")
        for key in ("probabilities", "probabilities_raw"):
            for label, p in result[key].items():
                if not (isinstance(p, (int, float)) and math.isfinite(p) and 0.0 <= p <= 1.0):
                    raise RecordError(f"{where}/{key}/{label}: {p!r} is not a probability")
        for label, t in result["thresholds"].items():
            if not (math.isfinite(t) and 0.0 < t < 1.0):
                raise RecordError(f"{where}/thresholds/{label}: {t!r} is not a threshold in (0, 1)")
        expected = decide(result["task"], labels, result["probabilities"], result["thresholds"])
        if result["decisions"] != expected:
            raise RecordError(f"{where}/decisions: {result['decisions']} do not follow from the probabilities "
                              f"and thresholds ({expected})")
        importance = result["slice_importance"]
        if importance and abs(sum(importance) - 1.0) > 1e-3:
            raise RecordError(f"{where}/slice_importance: sums to {sum(importance):.4f}, not 1")
        if any(k not in labels for k in result["finding_heatmaps"]):
            raise RecordError(f"{where}/finding_heatmaps: names a finding that is not a label")


def validate_record(record: Any) -> dict:
    """Check one record against the schema and the contract's rules; raise :class:`RecordError` naming the
    field. Returns the record, so readers can write ``validate_record(json.loads(...))``."""
    try:
        import jsonschema  # noqa: F401 - only whether it is installed
    except ImportError:  # a fresh Slicer has no jsonschema: the hand check covers what the schema uses
        check_schema(record, record_schema(), "record")
    else:
        exc = schema_error(record, "record.schema.json")
        if exc is not None:
            where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
            raise RecordError(f"record/{where}: {exc.message}") from None
    _check_semantics(record)
    return record


def schema_error(instance: Any, schema_file: str):
    """jsonschema's best-matching error of ``instance`` against ``schemas/<schema_file>``, or None: the rule of
    ``jsonschema.validate``, with the schema checked and its validator built once (validate() redoes both per call:
    0.1 s, on a viewer's event loop at every case switch). Needs jsonschema."""
    import jsonschema

    return jsonschema.exceptions.best_match(_schema_validator(schema_file).iter_errors(instance))


@functools.lru_cache(maxsize=None)
def _schema_validator(schema_file: str):
    import jsonschema

    schema = json.loads(resources.files("anymc3d").joinpath("schemas", schema_file).read_text())
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    return validator(schema)


def validate_records(records: Any) -> list:
    """A whole ``--json`` output: a list of records, each valid."""
    if not isinstance(records, list):
        raise RecordError("records: expected a JSON list of records")
    for i, record in enumerate(records):
        try:
            validate_record(record)
        except RecordError as exc:
            raise RecordError(f"records/{i}: {exc}") from None
    return records


# ------------------------------------------------------------------------------------------ dependencies
def requirements() -> list[str]:
    """The backend's third-party requirements, read from its installed package metadata (never a hand list).

    Environment markers and extras are left to the installer. Works wherever ``anymc3d`` is installed or
    bundled with its ``.dist-info``.
    """
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("anymc3d") or []
    except PackageNotFoundError:
        return list(_FALLBACK_REQUIREMENTS)
    return [r for r in reqs if "extra ==" not in r]


#: used only where the package metadata is absent (a source tree not installed); a test keeps it equal to
#: pyproject.toml's dependencies.
_FALLBACK_REQUIREMENTS = (
    "torch>=2.3", "torchvision", "timm>=1.0.20,<1.1", "huggingface_hub>=0.20", "peft>=0.17", "SimpleITK>=2.3",
    "nibabel>=5", "numpy>=1.24",
    "safetensors>=0.4", "jsonschema>=4", "tqdm>=4.60", "monai>=1.3", "scipy>=1.10", "scikit-learn>=1.3",
    "matplotlib>=3.7",
)
