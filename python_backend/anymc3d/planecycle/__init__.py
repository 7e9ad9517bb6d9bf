"""PlaneCycle: training-free 2D-to-3D lifting of the frozen 2D backbone (operator, timm converter, features)."""
