import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cuda: needs a CUDA device; skipped where there is none")
    config.addinivalue_line("markers", "slow: longer tests (training runs)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)
