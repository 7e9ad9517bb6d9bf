# ruff: noqa: N999 - the design names this folder Logic (installed as AnyMC3DSlicerLogic)
"""Slicer-side logic of AnyMC3D: moves data between the MRML scene and the ``anymc3d`` backend process.

Importable without Qt (slicer-core is enough); the Widget in ``AnyMC3DSlicer/AnyMC3DSlicer.py`` wires it to the GUI.
"""

from .backbones import BackboneDownload, BackboneResult, listBackbones
from .backbones import describe as describeBackbone
from .dependencies import DependencyChecker, InstallError
from .logic import (
    AnyMC3DSlicerLogic,
    BatchJob,
    CaseResult,
    PredictionJob,
    PredictionOutputs,
    Progress,
)
from .outputs import COLOR_TABLE_NAME, nodeRole, nodesByClass, removeNode
from .parameters import DisplayOptions, PredictionOptions
from .plugins import PluginInfo, PluginLibrary
from .process import (
    ExitCode,
    ProcessRunner,
    QProcessRunner,
    SubprocessRunner,
    killProcessTree,
)
from .similarity import (
    SimilarityJob,
    SimilarityOptions,
    SimilarityPointController,
    SimilarityResult,
    SimilaritySession,
)

__all__ = [
    "AnyMC3DSlicerLogic", "BatchJob", "CaseResult", "DependencyChecker", "DisplayOptions", "ExitCode", "InstallError",
    "PluginInfo", "PluginLibrary", "PredictionJob", "PredictionOptions", "PredictionOutputs", "ProcessRunner",
    "Progress", "QProcessRunner", "SubprocessRunner", "killProcessTree",
]
__all__ += ["COLOR_TABLE_NAME", "nodeRole", "nodesByClass", "removeNode"]
__all__ += ["BackboneDownload", "BackboneResult", "describeBackbone", "listBackbones"]
__all__ += ["SimilarityJob", "SimilarityOptions", "SimilarityPointController", "SimilarityResult", "SimilaritySession"]
__all__ += ["BackboneDownload", "BackboneResult", "listBackbones"]
