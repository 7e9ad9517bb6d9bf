"""Python packages the backend needs inside Slicer: checked on the first Apply, installed after confirmation.

``missingPackages()`` works anywhere; ``install()`` needs the Slicer application (``slicer.util.pip_install``,
the PyTorch extension's ``PyTorchUtils``). Packages Slicer ships (numpy, SimpleITK, requests) are never replaced.
"""

import importlib.util

TORCH_REQUIREMENT = ">=2.4"
# import name -> pip requirement (versions the project is tested with, python_backend/constraints.txt)
PIP_REQUIREMENTS = {
    "timm": "timm>=1.0.20",
    "peft": "peft>=0.17",
    "safetensors": "safetensors",
    "nibabel": "nibabel",
}
SHIPPED_WITH_SLICER = ("numpy", "SimpleITK")


class InstallError(RuntimeError):
    """Installing dependencies failed or needs a restart of Slicer (``restartRequired``)."""

    def __init__(self, message, restartRequired=False):
        super().__init__(message)
        self.message = message
        self.restartRequired = restartRequired


class DependencyChecker:
    """Args:
        backendRequirement: pip requirement of the backend, or None when the extension bundles ``anymc3d``.
        findSpec: ``importlib.util.find_spec``-like function (tests pass a fake).
    """

    def __init__(self, backendRequirement=None, findSpec=None):
        self.backendRequirement = backendRequirement
        self.findSpec = findSpec or importlib.util.find_spec

    def _isImportable(self, name):
        try:
            return self.findSpec(name) is not None
        except (ImportError, ValueError):
            return False

    def missingPackages(self):
        """Import names that cannot be imported: torch first, then the pip packages, then the backend."""
        names = ["torch", *PIP_REQUIREMENTS]
        if self.backendRequirement:
            names.append("anymc3d")
        return [name for name in names if not self._isImportable(name)]

    def missingShippedPackages(self):
        return [name for name in SHIPPED_WITH_SLICER if not self._isImportable(name)]

    def installDescription(self, missing):
        lines = []
        if "torch" in missing:
            lines.append(f"PyTorch {TORCH_REQUIREMENT} (through the PyTorch extension)")
        lines += [PIP_REQUIREMENTS[name] for name in missing if name in PIP_REQUIREMENTS]
        if "anymc3d" in missing:
            lines.append(self.backendRequirement)
        return lines

    def install(self, missing, confirm):
        """Install ``missing`` after ``confirm(listOfLines) -> bool``. Raises InstallError (maybe restartRequired)."""
        import slicer

        if not missing:
            return
        if not confirm(self.installDescription(missing)):
            raise InstallError("The required Python packages are not installed.")
        if "torch" in missing:
            try:
                import PyTorchUtils
            except ImportError as error:
                raise InstallError("This module needs PyTorch: install the 'PyTorch' extension from the Extensions "
                                   "Manager, restart Slicer and try again.") from error
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
                if torch is None:
                    raise InstallError("PyTorch could not be installed.")
        pipRequirements = [PIP_REQUIREMENTS[name] for name in missing if name in PIP_REQUIREMENTS]
        if "anymc3d" in missing:
            pipRequirements.append(self.backendRequirement)
        if pipRequirements:
            slicer.util.pip_install(pipRequirements)
        importlib.invalidate_caches()
        stillMissing = self.missingPackages()
        if stillMissing:
            raise InstallError(f"Installed, but not importable yet: {', '.join(stillMissing)}. Restart Slicer.",
                               restartRequired=True)
