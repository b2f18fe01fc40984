"""Shared fixtures: per-test seeding and the backend matrix.

The ``backend`` fixture runs a test once per kernel backend:

* ``torch``  -- the PyTorch path, always (CPU tensors; CUDA tensors too on a GPU machine);
* ``triton`` -- the Triton kernels: on the CPU under the interpreter (``TRITON_INTERPRET=1``,
  as ``make test`` sets it) or on a CUDA device; skipped otherwise;
* ``cuda``   -- the CUDA C++ kernels of ``kd_kernels._C``: needs a CUDA device and the built
  extension; skipped otherwise, with the reason.

A test that takes ``backend`` calls ``require(backend, "<public loss name>")`` (or uses the
``device`` it returns) so that it skips, with the reason, for a loss that has no kernel of that
backend yet. A new kernel is then tested by every existing case as soon as the loss lists it.
"""

import zlib

import pytest
import torch

from kd_kernels.testing import BACKENDS, backend_skip_reason


@pytest.fixture(autouse=True)
def _seed(request):
    """A fresh but reproducible random stream per test (seeded from the test's id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture(params=BACKENDS)
def backend(request):
    """One kernel backend per test instance; skips (with the reason) where it cannot run."""
    why = backend_skip_reason(request.param)
    if why is not None:
        pytest.skip(why)
    return request.param
