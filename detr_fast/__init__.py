"""detr_fast: a DETR training engine whose hot paths are fused C++/CUDA kernels."""

__version__ = "0.1.0"
