"""Quiet logs: trame/wslink/aiohttp internals at WARNING and VTK's own warnings off (errors stay), unless
``--log-level DEBUG``. Used by the command (before the app is made) and by the app (after Slicer's application
logic installs its own VTK output window)."""

from __future__ import annotations

import logging

QUIET_LOGGERS = ("trame", "trame_server", "trame_client", "trame_slicer", "trame_rca", "wslink", "aiohttp", "vtk")


def quiet_loggers() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def quiet_vtk() -> None:
    """VTK's own warnings (deprecation notices of the render window interactors trame-slicer makes, three per
    launch) are internals a reader cannot act on: only VTK errors reach stderr, once (vtkLogger)."""
    import vtk

    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_ERROR)
    vtk.vtkOutputWindow.GetInstance().SetDisplayModeToNever()  # errors still go through vtkLogger
