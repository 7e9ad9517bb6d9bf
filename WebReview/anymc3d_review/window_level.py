"""Window/level of the slice views' image: presets per kind of image (CT windows in HU, percentile windows for
the others), a typed window and one dragged in a slice view (Slicer's window/level widget), kept across cases."""

from __future__ import annotations

import numpy as np
from AnyMC3DSlicerLogic import outputs as logic_outputs

from .cases import RecordError

#: window presets of the slice views: name -> (title, window, level) in the image's units (HU for CT);
#: "auto" is the volume display's automatic window. Values: the usual radiology CT windows.
WINDOW_PRESETS = {"auto": ("Auto", None, None), "brain": ("Brain", 80.0, 40.0),
                  "soft_tissue": ("Soft tissue", 400.0, 40.0), "lung": ("Lung", 1500.0, -600.0),
                  "bone": ("Bone", 1800.0, 400.0)}
#: window presets of images that are not CT (MR, or no stated modality and no HU air): the window spans these
#: percentiles of the image's values (name -> (title, low percentile, high percentile)); HU values mean nothing there
PERCENTILE_PRESETS = {"p1_99": ("1–99 %", 1.0, 99.0), "p5_95": ("5–95 %", 5.0, 95.0), "p0_100": ("Full range", 0.0, 100.0)}
ALL_PRESETS = ("auto", *(n for n in WINDOW_PRESETS if n != "auto"), *PERCENTILE_PRESETS, "custom")


class WindowLevel:
    """The ReviewSession's window/level (a mixin: uses ``self.current``, ``self.window_preset``,
    ``self.window_values`` and ``self._applied_window``)."""

    def set_window_preset(self, name: str):
        """Window/level of the slice views' image (a name of ALL_PRESETS: CT windows in HU, percentile windows for
        other images), kept when the case changes while it fits the case (else the case gets Auto)."""
        if name not in ALL_PRESETS or (name == "custom" and self.window_values is None):
            raise RecordError(f"No window preset {name!r}")
        self.window_preset = name
        if self.current is not None:
            self._apply_window(self.current)

    def set_window_values(self, window: float, level: float):
        """A typed (or dragged) window and level, in the image's units; kept as the "custom" preset."""
        self.window_values = (max(float(window), 1e-3), float(level))
        self.set_window_preset("custom")

    def window_values_shown(self):
        """(window, level) the shown image is displayed with, or None."""
        node = self.current.input_node if self.current is not None else None
        display = node.GetDisplayNode() if node is not None else None
        return (display.GetWindow(), display.GetLevel()) if display is not None else None

    @staticmethod
    def presets_for(is_ct: bool) -> list[str]:
        """The presets that mean something for the image: CT windows in HU for a CT, percentiles otherwise."""
        return ["auto", *((n for n in WINDOW_PRESETS if n != "auto") if is_ct else PERCENTILE_PRESETS), "custom"]

    def window_dragged(self) -> bool:
        """Whether the shown image's window moved away from the one last applied here: a left-drag in a slice
        view (Slicer's window/level widget sets the display node itself). It is then the "custom" window."""
        shown = self.window_values_shown()
        applied = self._applied_window
        if shown is None or applied is None or max(abs(a - b) for a, b in zip(shown, applied)) < 1e-6:
            return False
        self.window_values = self._applied_window = shown
        self.window_preset = "custom"
        return True

    def _apply_window(self, loaded):
        self._set_window(loaded)
        if loaded is self.current:
            self._applied_window = self.window_values_shown()

    def _set_window(self, loaded):
        display = loaded.input_node.GetDisplayNode() if loaded.input_node is not None else None
        if display is None:
            return
        if self.window_preset == "custom" and self.window_values is not None:
            display.AutoWindowLevelOff()
            display.SetWindowLevel(*self.window_values)
            return
        if self.window_preset in PERCENTILE_PRESETS:
            _, low, high = PERCENTILE_PRESETS[self.window_preset]
            voxels = logic_outputs.arrayFromVolumeNode(loaded.input_node).ravel()
            sample = voxels[:: max(1, voxels.size // 2_000_000)]  # a subsample: the window of millions of voxels
            lo, hi = (float(v) for v in np.percentile(sample, [low, high]))
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(lo, max(hi, lo + 1e-3))
            return
        _, window, level = WINDOW_PRESETS.get(self.window_preset, WINDOW_PRESETS["auto"])
        auto = logic_outputs.autoWindowOf(loaded.input_node)
        if window is None and auto is not None:  # the automatic window computed when the file was read
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(*auto)
        elif window is None:
            display.AutoWindowLevelOn()
        else:
            display.AutoWindowLevelOff()
            display.SetWindowLevel(window, level)
