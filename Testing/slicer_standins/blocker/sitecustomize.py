"""Test helper, imported by ``site`` at start-up when this folder is on PYTHONPATH (child processes inherit it):
makes the top-level packages named in ANYMC3D_TEST_BLOCK absent, as in a fresh Slicer. Their imports fail with
ModuleNotFoundError and their distributions have no metadata; each attempt to import one is appended to the
file ANYMC3D_TEST_BLOCK_LOG (so a test can show that nothing even tried)."""

import importlib.abc
import importlib.machinery
import importlib.metadata
import os
import sys

BLOCKED = {name for name in os.environ.get("ANYMC3D_TEST_BLOCK", "").split(",") if name}
LOG = os.environ.get("ANYMC3D_TEST_BLOCK_LOG")


class _Blocker(importlib.abc.MetaPathFinder):
    """Takes the place of the path finder: a blocked name is not found (``find_spec`` gives None, an import raises
    ModuleNotFoundError), exactly as for a package that is not installed; other names are found as usual."""

    def __init__(self, pathFinder):
        self.pathFinder = pathFinder

    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in BLOCKED and top not in sys.modules:
            if LOG:
                with open(LOG, "a", encoding="utf-8") as log:
                    log.write(f"{os.getpid()} {name}\n")
            return None
        return self.pathFinder.find_spec(name, path, target)

    def invalidate_caches(self):
        self.pathFinder.invalidate_caches()

    def find_distributions(self, *args, **kwargs):
        """Installed distributions (what importlib.metadata reads), the blocked ones left out."""
        blocked = {name.lower() for name in BLOCKED}
        return (dist for dist in self.pathFinder.find_distributions(*args, **kwargs)
                if (dist.metadata["Name"] or "").replace("-", "_").lower() not in blocked)


def _hide(function):
    def wrapped(name, *args, **kwargs):
        if name.replace("-", "_").lower() in {b.lower() for b in BLOCKED}:
            raise importlib.metadata.PackageNotFoundError(name)
        return function(name, *args, **kwargs)
    return wrapped


if BLOCKED:
    sys.meta_path[:] = [_Blocker(finder) if finder is importlib.machinery.PathFinder else finder for finder in sys.meta_path]
    importlib.metadata.version = _hide(importlib.metadata.version)
    importlib.metadata.distribution = _hide(importlib.metadata.distribution)
