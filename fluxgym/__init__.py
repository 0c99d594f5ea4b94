"""FluxGym layer: safe training scripts, VRAM presets, dataset preparation and a supervised runner.

Generation code here is pure and imports no torch/numpy, so the CLI starts fast and a web UI can call it.
"""

__version__ = "0.1.0"
