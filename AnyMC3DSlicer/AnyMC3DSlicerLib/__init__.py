# ruff: noqa: N999 - the package is named after the module, as Slicer modules name theirs (DICOMLib)
"""Parts of the AnyMC3D module's widget and its self-test, one job per file (the module file wires them)."""
