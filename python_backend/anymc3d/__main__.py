"""``python -m anymc3d`` runs the command-line interface (the Slicer module starts it this way)."""
from anymc3d.cli import run

run()
