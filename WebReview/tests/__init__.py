"""Tests of the web review (a package: its conftest does not clash with the backend tests' one in a single pytest run)."""
