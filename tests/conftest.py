import pytest
import torch


@pytest.fixture(autouse=True)
def _seed(request):
    """A fresh but reproducible random stream per test (seeded from the test's name)."""
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))
    yield
