"""AnyMC3D web review: cases of a folder, their findings and heatmaps in a browser (trame-slicer).

The MRML nodes of the page are made by the Slicer module's Logic (package ``AnyMC3DSlicerLogic``: ``Logic/`` at
the repository root, ``pip install -e Logic``); this package adds only the case listing, the page and the command
``anymc3d review``.
"""

__version__ = "0.1.0"
