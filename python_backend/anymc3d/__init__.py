"""AnyMC3D: 3D medical image classification with a frozen 2D foundation model and small task plugins."""
__version__ = "0.1.0"
