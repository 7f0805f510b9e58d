"""Shared test helpers: device parametrization whose CUDA case is skipped without a GPU."""
import pytest


def cpu_and_cuda():
    return ("cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda))
