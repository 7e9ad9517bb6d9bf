"""PlaneCycle's names and settings, importable without torch (the CLI parser and plugins read them).

Names follow the paper: planes HW, DW, DH; variants PCg ('pcg', adaptive average pooling of the global tokens)
and PCm ('pcm', their mean).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

PLANES: tuple[str, ...] = ("HW", "DW", "DH")
VARIANTS: tuple[str, ...] = ("pcg", "pcm")
DEFAULT_CYCLE: tuple[str, ...] = ("HW", "DW", "DH", "HW")


def parse_cycle(text: str | Sequence[str]) -> tuple[str, ...]:
    """'HW,DW,DH,HW' (or a sequence of plane names) -> ('HW', 'DW', 'DH', 'HW'); ValueError naming 'cycle'."""
    items = [str(p).strip().upper() for p in (text.split(",") if isinstance(text, str) else text)]
    if not items or any(p not in PLANES for p in items):
        raise ValueError(f"cycle: must be a comma-separated list of {', '.join(PLANES)}, got {text!r}")
    return tuple(items)


def check_layers(layers: Sequence[int], depth: int) -> tuple[int, ...]:
    """Block indices, 0-based, each in [0, depth), sorted and unique; ValueError naming 'layers' otherwise."""
    bad = [i for i in layers if not 0 <= int(i) < depth]
    if bad:
        raise ValueError(f"layers: block indices must be in 0..{depth - 1}, got {bad}")
    return tuple(sorted({int(i) for i in layers}))


@dataclass
class PlaneCycleConfig:
    """How a 2D backbone is lifted; JSON-serialisable (stored with lifted features and plugins)."""

    variant: str = field(default="pcg", metadata={"help": f"Global-token handling, one of {VARIANTS} (default pcg)."})
    cycle: tuple[str, ...] = field(default=DEFAULT_CYCLE, metadata={
        "help": "Plane of block i is cycle[i mod len(cycle)] (default HW,DW,DH,HW)."})

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: must be one of {VARIANTS}, got {self.variant!r}")
        self.cycle = parse_cycle(self.cycle)

    def to_dict(self) -> dict:
        return {"variant": self.variant, "cycle": list(self.cycle)}

    @classmethod
    def from_dict(cls, d: dict) -> PlaneCycleConfig:
        unknown = set(d) - {"variant", "cycle"}
        if unknown:
            raise ValueError(f"planecycle: unknown keys {sorted(unknown)}")
        return cls(**d)
