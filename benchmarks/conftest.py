import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


def pytest_addoption(parser):
    parser.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.addoption("--bench-quick", action="store_true", help="only the smallest shape of each family")


@pytest.fixture(scope="session")
def bench_device(request) -> str:
    dev = request.config.getoption("--bench-device")
    if dev is None:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    return dev


@pytest.fixture(scope="session")
def bench_quick(request) -> bool:
    return bool(request.config.getoption("--bench-quick"))
