"""Run and display options of the module, as ``@parameterPack`` classes.

Inside Slicer these are real ``slicer.parameterNodeWrapper.parameterPack`` classes (the Widget's parameter node
holds them and binds them to the .ui). Outside Slicer (slicer-core, tests) ``parameterPack`` falls back to a
plain dataclass, so the Logic takes the same objects in both places.
"""

import dataclasses
from typing import Annotated

from anymc3d.contract import (  # noqa: F401 (the contract's, re-exported)
    AUTO_HEATMAP,
    DEVICES,
    GRADIENT_METHODS,
    HEATMAP_CHOICES,
    HEATMAP_METHODS,
    PRECISIONS,
)

try:
    from slicer.parameterNodeWrapper import Choice, Maximum, Minimum, parameterPack
except ImportError:  # slicer-core has no parameterNodeWrapper
    parameterPack = dataclasses.dataclass

    def Choice(options):
        return ("choice", tuple(options))

    def Minimum(value):
        return ("minimum", value)

    def Maximum(value):
        return ("maximum", value)


@parameterPack
class PredictionOptions:
    """Options passed to ``anymc3d predict``."""

    device: Annotated[str, Choice(DEVICES)] = "auto"
    heatmapMethod: Annotated[str, Choice(HEATMAP_CHOICES)] = AUTO_HEATMAP  # each plugin's best measured map
    ensemble: bool = False
    chunkSize: Annotated[int, Minimum(1)] = 32
    precision: Annotated[str, Choice(PRECISIONS)] = "auto"

    def validate(self):
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.heatmapMethod not in HEATMAP_CHOICES:
            raise ValueError(f"heatmapMethod must be one of {HEATMAP_CHOICES}, got {self.heatmapMethod!r}")
        if int(self.chunkSize) < 1:
            raise ValueError(f"chunkSize must be >= 1, got {self.chunkSize!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def commandLineArguments(self):
        self.validate()
        arguments = ["--device", self.device, "--heatmap-method", self.heatmapMethod, "--chunk-size", str(int(self.chunkSize)),
                     "--precision", self.precision]
        if self.ensemble:
            arguments.append("--ensemble")
        return arguments


@parameterPack
class DisplayOptions:
    """How heatmaps are shown: slice-view overlay opacity and the threshold at and under which nothing is
    added to the image (the slice views add the heatmap; the 3D view's opacity starts there).

    ``volumeRenderingMaxSize`` > 0: the 3D view renders a block-averaged copy of a heatmap larger than that (voxels
    per axis); 0 (Slicer's default, a GPU renders the full volume): the heatmap itself.
    """

    opacity: Annotated[float, Minimum(0.0), Maximum(1.0)] = 0.5
    threshold: Annotated[float, Minimum(0.0), Maximum(1.0)] = 0.2
    volumeRendering: bool = True
    volumeRenderingMaxSize: Annotated[int, Minimum(0)] = 0
