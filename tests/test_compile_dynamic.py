"""torch.compile(fullgraph=True, dynamic=True) with masks and batch sizes that change between
calls: every public function compiles without graph breaks and matches eager."""

from __future__ import annotations

import pytest
import torch
from test_api import API, sample_inputs

import kd_kernels.functional as KF
from kd_kernels.testing import assert_close

GEOMETRY = ("gram_loss", "procrustes_loss", "cka_loss", "relation_loss")
LOGIT = ("kd_loss", "reverse_kl_loss", "jsd_loss", "tvd_loss", "dist_loss", "grkd_loss")


def _inputs(fn_name: str, rows: int, masked: bool, seed: int):
    """Inputs of ``fn_name`` with ``rows`` rows (batch size), and its mask keyword if ``masked``."""
    g = torch.Generator().manual_seed(seed)
    base = sample_inputs(fn_name)
    tensors = [torch.randn((rows, *x.shape[1:]), generator=g) if fn_name != "sinkhorn" else
               torch.rand((rows, *x.shape[1:]), generator=g) for x in base]  # fmt: skip
    kwargs = {}
    if masked and fn_name in GEOMETRY:
        keep = torch.rand(rows, generator=g) > 0.3
        keep[:3] = True  # enough kept rows for every geometry loss
        kwargs["mask"] = keep
    elif masked and fn_name in LOGIT:
        keep = torch.rand(rows, generator=g) > 0.3
        keep[0] = True
        kwargs["ignore_mask"] = ~keep
    elif masked and fn_name == "sinkhorn":  # marginals instead of a mask: a [B, n], b [m]
        _, n, m = tensors[0].shape
        kwargs["a"] = torch.softmax(torch.randn(rows, n, generator=g), dim=1)
        kwargs["b"] = torch.softmax(torch.randn(m, generator=g), dim=0)
    return tensors, kwargs


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])  # masked: mask / ignore_mask / marginals
@pytest.mark.parametrize("fn_name", sorted(API))
def test_dynamic_shapes_and_masks(fn_name, masked):
    if masked and fn_name not in GEOMETRY + LOGIT + ("sinkhorn",):
        pytest.skip(f"{fn_name} takes no mask or marginals")
    torch._dynamo.reset()
    fn = getattr(KF, fn_name)
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for seed, rows in enumerate((7, 12, 9)):
        tensors, kwargs = _inputs(fn_name, rows, masked, seed)
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        eager = fn(*leaves, **kwargs)
        (g_eager,) = torch.autograd.grad(eager.sum(), leaves[:1])
        leaves_c = [t.clone().requires_grad_(True) for t in tensors]
        out = compiled(*leaves_c, **kwargs)
        (g_comp,) = torch.autograd.grad(out.sum(), leaves_c[:1])
        assert_close(out, eager, rtol=1e-5, atol=1e-6, name=f"{fn_name} rows={rows} value")
        assert_close(g_comp, g_eager, rtol=1e-5, atol=1e-6, name=f"{fn_name} rows={rows} grad")
