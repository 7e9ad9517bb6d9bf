"""Checks of everything a page sends a review server: the state values it may write, the arguments of the RPCs it
may call and the interaction events handed to VTK. Each check returns the value to apply or raises ValueError;
nothing a page sends reaches the scene, VTK or a log without one (guard.AccessGuard applies them)."""

from __future__ import annotations

import math
import re

#: the largest render a page may ask for, per side in device pixels (a 4K screen's views are smaller)
MAX_RENDER_SIDE = 2560
#: every number a page sends is within this (slider positions in mm, event coordinates in pixels)
MAX_ABS_NUMBER = 1e6

_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")


def printable(text, limit: int = 200) -> str:
    """``text`` safe for a log line or a terminal: control and direction characters escaped (``\\x1b``),
    at most ``limit`` characters."""
    text = str(text)
    text = text[:limit] + ("…" if len(text) > limit else "")
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


# Validators of the state a page may write: each returns the value to apply or raises ValueError ----------------

def finite_float(low=-MAX_ABS_NUMBER, high=MAX_ABS_NUMBER):
    """A finite number clamped to [low, high] (by default +-MAX_ABS_NUMBER: never 1e308)."""
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"not a finite number: {printable(repr(value), 40)}")
        return min(max(float(value), low), high)
    return check


def index_below(count):
    """An int in [0, count()) (``count`` is called at check time: the listing may change)."""
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < count():
            raise ValueError(f"not an index below {count()}: {value!r}")
        return value
    return check


def one_of(choices):
    def check(value):
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"not one of {tuple(choices)}: {value!r}")
        return value
    return check


def boolean(value):
    if not isinstance(value, bool):
        raise ValueError(f"not a boolean: {value!r}")
    return value


# The RPCs a page may call besides state and life cycles: each checks its arguments and raises ValueError -------

#: the interaction events VTK's adapter handles, and the numeric fields each needs (vtkRemoteInteractionAdapter.cxx)
MOUSE_FIELDS = ("x", "y", "w", "h")
EVENT_FIELDS = {
    **{name: MOUSE_FIELDS for name in ("MouseMove", "LeftButtonPress", "LeftButtonRelease", "MiddleButtonPress",
                                       "MiddleButtonRelease", "RightButtonPress", "RightButtonRelease")},
    "MouseWheel": (*MOUSE_FIELDS, "spinY"),
    **{name: () for name in ("StartMouseWheel", "EndMouseWheel", "StartInteractionEvent", "EndInteractionEvent",
                             "StartInteraction", "Interaction", "EndInteraction")},
    **{name: ("w", "h", "factor") for name in ("StartPinch", "Pinch", "EndPinch")},
    **{name: ("w", "h") for name in ("StartPan", "Pan", "EndPan")},
    **{name: ("w", "h", "rotation") for name in ("StartRotate", "Rotate", "EndRotate")},
    **{name: () for name in ("KeyPress", "KeyDown", "KeyUp", "keyDown", "keyUp")},
}
KEY_EVENTS = ("KeyPress", "KeyDown", "KeyUp", "keyDown", "keyUp")
MODIFIERS = ("ctrlKey", "altKey", "shiftKey", "metaKey", "controlKey", "buttonLeft", "buttonMiddle", "buttonRight")
MAX_TEXT = 100


def _number(value, low=-MAX_ABS_NUMBER, high=MAX_ABS_NUMBER) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ValueError(f"not a number in [{low:g}, {high:g}]: {printable(repr(value), 40)}")
    return float(value)


def _text(value, limit=MAX_TEXT) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError(f"not a text of at most {limit} characters")
    return value


def _plain(value, depth=0):
    """A trigger argument: JSON scalars (finite numbers, short texts) in small lists and objects."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value if isinstance(value, int) and abs(value) <= MAX_ABS_NUMBER else _number(value)
    if isinstance(value, str):
        return _text(value, 1000)
    if depth < 3 and isinstance(value, list) and len(value) <= 64:
        return [_plain(v, depth + 1) for v in value]
    if depth < 3 and isinstance(value, dict) and len(value) <= 64:
        return {_text(k): _plain(v, depth + 1) for k, v in value.items()}
    raise ValueError("not a plain value")


def interaction_event(event) -> dict:
    """A page's interaction event rebuilt from checked fields only: a known type, finite numbers within bounds
    (sizes >= 1: VTK divides by them), modifiers as 0/1, at most 10 touch positions; what VTK reads and no more."""
    if not isinstance(event, dict) or not isinstance(event.get("type"), str) or event["type"] not in EVENT_FIELDS:
        raise ValueError("not a known interaction event")
    if event["type"] in KEY_EVENTS and not isinstance(event.get("key"), str):
        raise LookupError  # vtk.js's key events over a view (no key text): dropped quietly, VTK skips them anyway
    kind = event["type"]
    clean = {"type": kind}
    for name in EVENT_FIELDS[kind]:
        clean[name] = _number(event.get(name), 1.0 if name in ("w", "h") else -MAX_ABS_NUMBER)
    for name in MODIFIERS:
        clean[name] = 1 if event.get(name) in (True, 1) else 0
    if kind in KEY_EVENTS:
        clean["keyCode"] = int(_number(event.get("keyCode"), 0, 127))
        clean["key"] = _text(event.get("key"), 16)
    if kind.endswith(("Pinch", "Pan", "Rotate")):
        clean.update(_touch_fields(kind, event))
    return clean


def _touch_fields(kind, event) -> dict:
    """A touch gesture's positions (1 to 10 finite points) and, for a pan, its translation (two numbers)."""
    positions = event.get("positions")
    positions = list(positions.values()) if isinstance(positions, dict) else positions
    if not isinstance(positions, list) or not 1 <= len(positions) <= 10:
        raise ValueError("not 1 to 10 touch positions")
    fields = {"positions": [{"x": _number(p.get("x")), "y": _number(p.get("y"))} if isinstance(p, dict)
                            else _number(None) for p in positions]}
    if kind.endswith("Pan"):
        translation = event.get("translation")
        if not isinstance(translation, list) or len(translation) != 2:
            raise ValueError("not a translation of two numbers")
        fields["translation"] = [_number(v) for v in translation]
    return fields


def render_size(size) -> dict:
    """A view's size from the page, capped at MAX_RENDER_SIDE device pixels per side (pixel ratio included)."""
    if not isinstance(size, dict):
        raise ValueError("not a size")
    width, height = (_number(size.get(k, 300), 1.0) for k in ("w", "h"))
    ratio = _number(size.get("p", 1), 0.25, 8.0)
    width, height = min(width, MAX_RENDER_SIDE), min(height, MAX_RENDER_SIDE)
    ratio = min(ratio, MAX_RENDER_SIDE / width, MAX_RENDER_SIDE / height)
    return {"w": int(width), "h": int(height), "p": ratio}


def _area(protocol, name) -> str:
    if not isinstance(name, str) or name not in getattr(protocol, "_area_adapters", {}):
        raise ValueError("not a view of this page")
    return name


def rpc_wrappers(note) -> dict:
    """RPC name -> (function -> its checked wrapper). A call whose arguments fail a check is refused (``note``)
    and does nothing."""
    def checked(uri, check):
        def wrap(function):
            def call(protocol, *args, **kwargs):
                try:
                    args, kwargs = check(protocol, *args, **kwargs)
                except (TypeError, ValueError) as error:
                    note(f"{uri}: {error}")
                    return None
                except LookupError:
                    return None
                return function(protocol, *args, **kwargs)
            return call
        return wrap

    def no_arguments(protocol):
        return (), {}

    def force_push(protocol, *keys):
        if len(keys) > 64 or not all(isinstance(k, str) and k in protocol.server.state for k in keys):
            raise ValueError("not names of the server's state")
        return keys, {}

    def trigger(protocol, name, args=(), kwargs=None):
        if not isinstance(name, str) or len(name) > MAX_TEXT or protocol.server.controller.trigger_fn(name) is None:
            raise ValueError("not a trigger of this page")
        if not isinstance(args, list) or len(args) > 16 or not isinstance(kwargs or {}, dict) or len(kwargs or {}) > 16:
            raise ValueError("bad trigger arguments")
        return (name, _plain(args), _plain(kwargs or {})), {}

    def event(protocol, area, origin, event):
        return (_area(protocol, area), _text(origin), interaction_event(event)), {}

    def size(protocol, area, origin, size):
        return (_area(protocol, area), _text(origin), render_size(size)), {}

    def area_only(protocol, area):
        return (_area(protocol, area),), {}

    def negotiate(protocol, area, codecs):
        if not isinstance(codecs, list) or len(codecs) > 16:
            raise ValueError("not a list of codecs")
        return (_area(protocol, area), [_text(c) for c in codecs]), {}

    checks = {"trame.state.get": no_arguments, "trame.force.push": force_push, "trame.trigger": trigger,
              "trame.rca.event": event, "trame.rca.size": size, "trame.rca.reset": area_only,
              "trame.rca.video.codecs": area_only, "trame.rca.video.negotiate": negotiate}
    return {uri: checked(uri, check) for uri, check in checks.items()}
