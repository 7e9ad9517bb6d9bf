"""Python packages the backend needs inside Slicer: checked on the first Apply, installed after confirmation.

The list is the backend's own (``anymc3d.contract.requirements()``, read from its package metadata, with its
pins such as ``timm<1.1``), never a second hand-kept list. Each requirement is routed:

- ``torch`` and ``torchvision``: the PyTorch extension's ``PyTorchUtils`` (it picks the wheel for the GPU driver);
- packages Slicer ships (numpy, SciPy, SimpleITK): never replaced by pip inside Slicer; a too-old one is reported;
- everything else (timm, peft, safetensors, nibabel, jsonschema, tqdm, ...): ``slicer.util.pip_install`` with
  the backend's version specifiers.

``plan()`` and ``missingPackages()`` work anywhere, without torch; ``install()`` needs the Slicer application.
Versions are read from distribution metadata (nothing is imported), so checking is fast and never loads torch.
"""

import importlib
import importlib.metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

TORCH_DISTRIBUTIONS = ("torch", "torchvision")  # installed through PyTorchUtils
SHIPPED_WITH_SLICER = ("numpy", "scipy", "simpleitk")  # canonical names; Slicer's own copies are never replaced


class InstallError(RuntimeError):
    """Installing dependencies failed or needs a restart of Slicer (``restartRequired``)."""

    def __init__(self, message, restartRequired=False):
        super().__init__(message)
        self.message = message
        self.restartRequired = restartRequired


def backendRequirements():
    """The backend's requirements (strings), from ``anymc3d.contract`` (torch-free, importable in a fresh Slicer)."""
    from anymc3d.contract import requirements

    return list(requirements())


def installedVersion(distribution):
    """The installed version of a distribution, or None (read from metadata: nothing is imported)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


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
        import slicer

        if not missing:
            return
        routes = self.plan(missing)
        if routes["shipped"]:
            raise InstallError(f"This Slicer's {', '.join(routes['shipped'])} is too old for AnyMC3D: update Slicer.")
        if not confirm(self.installDescription(missing)):
            raise InstallError("The required Python packages are not installed.")
        if routes["torch"]:
            try:
                import PyTorchUtils
            except ImportError as error:
                raise InstallError("This module needs PyTorch: install the 'PyTorch' extension from the Extensions "
                                   "Manager, restart Slicer and try again.") from error
            torchSpecifier, torchvisionSpecifier = self.torchSpecifiers()
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=torchSpecifier, torchvisionVersionRequirement=torchvisionSpecifier)
            if torch is None:
                raise InstallError("PyTorch could not be installed.")
        if routes["pip"]:
            slicer.util.pip_install(routes["pip"])
        importlib.invalidate_caches()
        stillMissing = self.missingPackages()
        if stillMissing:
            raise InstallError(f"Installed, but not importable yet: {', '.join(stillMissing)}. Restart Slicer.",
                               restartRequired=True)
