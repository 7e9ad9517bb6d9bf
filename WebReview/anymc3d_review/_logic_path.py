"""Make the Slicer module's ``Logic`` package importable.

``Logic/`` lives at the repository root (the Slicer extension installs it next to the module); it is not a
distribution of its own. The review package is installed editable from a checkout (``pip install -e WebReview``),
so its source stays at ``<repo>/WebReview/anymc3d_review`` and the repository root is two folders up. That root is
appended to ``sys.path`` (appended, so it never shadows an installed package). ``ANYMC3D_REPO`` overrides the
location (e.g. for a non-editable install next to a checkout).
"""

import os
import sys
from pathlib import Path


def repository_root() -> Path:
    override = os.environ.get("ANYMC3D_REPO")
    root = Path(override).resolve() if override else Path(__file__).resolve().parents[2]
    if not (root / "Logic" / "__init__.py").is_file():
        raise ImportError(f"The AnyMC3D Slicer Logic package was not found in {root}: install the review app from a "
                          "checkout with 'pip install -e WebReview', or set ANYMC3D_REPO to the repository root")
    return root


def ensure_logic_importable() -> None:
    try:
        import Logic  # noqa: F401
        return
    except ImportError:
        pass
    root = str(repository_root())
    if root not in sys.path:
        sys.path.append(root)
