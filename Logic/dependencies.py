"""Python packages the backend needs inside Slicer: checked on the first Apply, installed after confirmation.

The list is the backend's own (``anymc3d.contract.requirements()``, read from its package metadata, with its
pins such as ``timm<1.1``), never a second hand-kept list, less what only ``anymc3d train`` / ``eval`` import
(``TRAINING_ONLY``: prediction and similarity never import them, and monai's own ``torch>=`` pin could make pip
replace the torch PyTorchUtils chose). Each requirement is routed:

- ``torch`` and ``torchvision``: the PyTorch extension's ``PyTorchUtils`` (it picks the wheel for the GPU driver);
- packages Slicer ships (numpy, SciPy, SimpleITK): never replaced by pip inside Slicer; a too-old one is reported;
- everything else (timm, peft, safetensors, nibabel, jsonschema, tqdm, ...): ``slicer.util.pip_install`` with
  the backend's version specifiers and a constraints file that pins the torch, torchvision, numpy and scipy
  already in Slicer's Python (``--constraint``), so pip can never replace them (on Windows an imported torch's
  DLLs are locked).

A failed install (``subprocess.CalledProcessError`` from pip or light-the-torch, no network, ...) is raised as
``InstallError`` with a one-line message.

``plan()`` and ``missingPackages()`` work anywhere, without torch; ``install()`` needs the Slicer application.
Versions are read from distribution metadata (nothing is imported), so checking is fast and never loads torch.
"""

import importlib
import importlib.metadata
import os
import shutil
import subprocess
import tempfile

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

TORCH_DISTRIBUTIONS = ("torch", "torchvision")  # installed through PyTorchUtils
SHIPPED_WITH_SLICER = ("numpy", "scipy", "simpleitk")  # canonical names; Slicer's own copies are never replaced
#: imported only by ``anymc3d train`` / ``eval`` (canonical names): not installed for prediction and similarity
TRAINING_ONLY = ("monai", "scikit-learn", "matplotlib")
#: pinned at their installed versions while pip installs the rest
PINNED_WHILE_INSTALLING = ("torch", "torchvision", "numpy", "scipy")


class InstallError(RuntimeError):
    """Installing dependencies failed or needs a restart of Slicer (``restartRequired``)."""

    def __init__(self, message, restartRequired=False):
        super().__init__(message)
        self.message = message
        self.restartRequired = restartRequired


def backendRequirements():
    """What prediction and similarity need (strings): the backend's requirements from ``anymc3d.contract``
    (torch-free, importable in a fresh Slicer) less ``TRAINING_ONLY``."""
    from anymc3d.contract import requirements

    return [r for r in requirements() if canonicalize_name(Requirement(r).name) not in TRAINING_ONLY]


def trainingRequirements():
    """What training in Slicer needs (``anymc3d train``, ``eval``): every backend requirement, ``TRAINING_ONLY``
    included."""
    from anymc3d.contract import requirements

    return list(requirements())


def installedVersion(distribution):
    """The installed version of a distribution, or None (read from metadata: nothing is imported)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def constraintLines(versionOf=installedVersion):
    """``name==version`` for each of ``PINNED_WHILE_INSTALLING`` that is installed (pip's constraints format)."""
    return [f"{name}=={versionOf(name)}" for name in PINNED_WHILE_INSTALLING if versionOf(name)]


def failureMessage(what, error):
    """One line for a failed install step (no traceback): the command's exit code, or the error itself."""
    if isinstance(error, subprocess.CalledProcessError):
        return f"{what} failed (exit code {error.returncode}). Check the network connection and the Python console."
    return f"{what} failed: {error}"


class DependencyChecker:
    """Args:
        requirements: requirement strings; default the backend's (``anymc3d.contract.requirements()``).
        versionOf: ``distribution name -> version or None``; default from installed metadata (tests pass a fake).
    """

    def __init__(self, requirements=None, versionOf=None):
        self.requirements = [Requirement(r) for r in (requirements if requirements is not None else backendRequirements())]
        self.versionOf = versionOf or installedVersion

    def _applies(self, requirement):
        return requirement.marker is None or requirement.marker.evaluate()

    def isSatisfied(self, requirement):
        version = self.versionOf(requirement.name)
        return version is not None and requirement.specifier.contains(version, prereleases=True)

    def unsatisfied(self):
        """The requirements that are missing or installed at a version outside the backend's specifier."""
        return [r for r in self.requirements if self._applies(r) and not self.isSatisfied(r)]

    def missingPackages(self):
        """Distribution names of the unsatisfied requirements (empty: nothing to install)."""
        return [r.name for r in self.unsatisfied()]

    def plan(self, missing=None):
        """How the unsatisfied requirements would be installed: ``{"torch": [...], "pip": [...], "shipped": [...]}``
        (requirement strings; "shipped" ones cannot be fixed from the module)."""
        missing = set(self.missingPackages() if missing is None else missing)
        routes = {"torch": [], "pip": [], "shipped": []}
        for requirement in self.requirements:
            if requirement.name not in missing:
                continue
            name = canonicalize_name(requirement.name)
            route = "torch" if name in TORCH_DISTRIBUTIONS else "shipped" if name in SHIPPED_WITH_SLICER else "pip"
            routes[route].append(str(requirement))
        return routes

    def installDescription(self, missing):
        """Lines for the confirmation dialog."""
        routes = self.plan(missing)
        lines = [f"{r} (through the PyTorch extension)" for r in routes["torch"]]
        return lines + routes["pip"]

    def torchSpecifiers(self):
        """(torch specifier, torchvision specifier) for ``PyTorchUtilsLogic.installTorch``, e.g. (">=2.3", "")."""
        specifiers = {canonicalize_name(r.name): str(r.specifier) for r in self.requirements}
        return specifiers.get("torch", ""), specifiers.get("torchvision", "")

    def install(self, missing, confirm):
        """Install ``missing`` after ``confirm(listOfLines) -> bool``. Raises InstallError (maybe restartRequired)."""
        if not missing:
            return
        routes = self.plan(missing)
        if routes["shipped"]:
            raise InstallError(f"This Slicer's {', '.join(routes['shipped'])} is too old for AnyMC3D: update Slicer.")
        if not confirm(self.installDescription(missing)):
            raise InstallError("The required Python packages are not installed.")
        if routes["torch"]:
            self._installTorch()
        if routes["pip"]:
            self._pipInstall(routes["pip"])
        importlib.invalidate_caches()
        stillMissing = self.missingPackages()
        if stillMissing:
            raise InstallError(f"Installed, but not importable yet: {', '.join(stillMissing)}. Restart Slicer.",
                               restartRequired=True)

    def _installTorch(self):
        try:
            import PyTorchUtils
        except ImportError as error:
            raise InstallError("This module needs PyTorch: install the 'PyTorch' extension from the Extensions "
                               "Manager, restart Slicer and try again.") from error
        torchSpecifier, torchvisionSpecifier = self.torchSpecifiers()
        try:  # light-the-torch runs blocking, raises CalledProcessError on failure, then torch is imported here
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=torchSpecifier, torchvisionVersionRequirement=torchvisionSpecifier)
        except (subprocess.CalledProcessError, OSError, ImportError) as error:
            raise InstallError(failureMessage("Installing PyTorch", error)) from error
        if torch is None:
            raise InstallError("PyTorch could not be installed.")

    def _pipInstall(self, requirements):
        """``slicer.util.pip_install`` with the constraints file (the versions already in Slicer's Python)."""
        import slicer

        folder = tempfile.mkdtemp(prefix="AnyMC3D-install-")
        try:
            constraints = os.path.join(folder, "constraints.txt")
            with open(constraints, "w", encoding="utf-8") as file:
                file.write("\n".join(constraintLines(self.versionOf)) + "\n")
            slicer.util.pip_install([*requirements, "--constraint", constraints])
        except (subprocess.CalledProcessError, OSError) as error:
            raise InstallError(failureMessage(f"Installing {', '.join(requirements)}", error)) from error
        finally:
            shutil.rmtree(folder, ignore_errors=True)
