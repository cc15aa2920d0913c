"""Cython kernels of knhk. Private: import the public API from ``knhk``."""
