"""User-facing errors: each names the file (or object) and the problem in one sentence.

The CLI and the Slicer module show ``str(error)`` as it is, so messages are written for a
radiologist or researcher, never as a traceback from deep inside torch.
"""
from __future__ import annotations

import os
from typing import Optional


def one_line(message: object) -> str:
    """A message on one line: records, logs and the Slicer status line never carry a multi-line text."""
    return " ".join(str(message).split())


class AnyMC3DError(Exception):
    """Base class of every error the package raises on purpose."""


class InputError(AnyMC3DError):
    """An image that cannot be used: unreadable, wrong dimension, bad voxels or geometry."""

    def __init__(self, source: Optional[os.PathLike | str], problem: str):
        self.source = None if source is None else str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}" if self.source else problem)


class BackboneError(AnyMC3DError):
    """A backbone that cannot be built or whose weights do not fit it."""


class PluginError(AnyMC3DError):
    """A task plugin that cannot be read, is inconsistent, or was made for another backbone."""
