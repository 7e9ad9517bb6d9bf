"""Settings for every test tier (backend, Logic, review)."""
import os

# The oracle tests compare with float32 computations, so precision "auto" means fp32 in the tests (subprocesses
# inherit it); python_backend/tests/test_precision.py runs bf16 against fp32 explicitly and clears the switch
# where it tests "auto".
os.environ.setdefault("ANYMC3D_NO_BF16", "1")
