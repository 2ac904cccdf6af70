"""The CUDA kernel sources (*.cu), shipped as package data and compiled at first use through CuPy."""
