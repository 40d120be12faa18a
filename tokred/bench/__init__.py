"""Measuring: methods side by side on one model (``tokred bench``), interleaved timing, the FLOP model,
structured inputs, and the ``bench-ops`` / ``bench-sdxl`` / ``bench-flux`` commands."""
