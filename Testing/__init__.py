# ruff: noqa: N999 - the design names this folder Testing
"""pytest suite of the Slicer Logic (a package, so that its conftest does not clash with the backend tests' one)."""
