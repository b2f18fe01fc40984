"""The Triton JSD, DIST and GRKD kernels (kd_kernels/triton/logit.py) where the backend matrix
(tests/test_logit.py, 13 classes, a handful of rows) misses something: vocabularies spanning
several tiles (the interpreter's BLOCK_C is 64, GRKD's pair tiles 16 x 64), DIST's column
moments merged over many row groups, GRKD's top_k spanning several first-class tiles, all rows
masked (with garbage in them), and -inf logits at the same classes in teacher and student.

They run on the CPU under the Triton interpreter (``TRITON_INTERPRET=1``) or on a CUDA device;
otherwise they are skipped.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_logit_triton.py -q
"""

from __future__ import annotations

import pytest
import torch

from kd_kernels import functional as KF
from kd_kernels.reference import logit as ref
from kd_kernels.testing import assert_close, assert_matches_reference, require, value_and_grads
from kd_kernels.torch_impl import logit as impl

# (loss, kwargs): the JSD mixture and both endpoints, DIST with both terms, GRKD full and top-k
CASES = [
    ("jsd_loss", {"beta": 0.3, "temperature": 2.0}),
    ("jsd_loss", {"beta": 0.0, "temperature": 2.0}),
    ("jsd_loss", {"beta": 1.0, "temperature": 0.5}),
    ("dist_loss", {"temperature": 2.0, "inter_weight": 1.5, "intra_weight": 0.5}),
    ("grkd_loss", {"temperature": 2.0}),
    ("grkd_loss", {"top_k": 20}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in CASES]


def _logits(n, c, device, dtype=torch.float32, scale=2.0):
    g = torch.Generator().manual_seed(1000 * n + c)
    s = (scale * torch.randn(n, c, generator=g, dtype=torch.float64)).to(dtype).to(device)
    t = (scale * torch.randn(n, c, generator=g, dtype=torch.float64)).to(dtype).to(device)
    return s, t


def _grad_output(name, kwargs, n):
    if name == "jsd_loss" and kwargs.get("reduction") == "none":
        return torch.randn(n, dtype=torch.float64)
    return torch.tensor(0.71, dtype=torch.float64)


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
@pytest.mark.parametrize("c", [1, 2, 1000])
def test_vocabulary_spans_tiles(name, kwargs, c):
    """C = 1, 2 (one partial tile) and 1000 (16 tiles of 64, the last partial) against the
    float64 reference: value and student/teacher gradients, fp32, with a row mask."""
    device = require("triton", name)
    n = 3 if name == "grkd_loss" and c == 1000 else 5  # GRKD: C^2 pairs per row
    s, t = _logits(n, c, device)
    t.requires_grad_(name != "grkd_loss")
    mask = torch.tensor([0, 1, 0, 0, 1][:n], dtype=torch.bool, device=device)
    fn = getattr(KF, name)
    assert_matches_reference(
        fn, getattr(ref, name), s, t, grad_output=_grad_output(name, kwargs, n), name=name, backend="triton",
        ignore_mask=mask, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("masked", [False, True])
def test_dist_many_row_groups(masked):
    """300 rows: 75 row blocks of 4 over 64 row groups (some groups merge two blocks, Chan's
    update in the kernel, then 64 partials merged by the second kernel); class_stats as the
    torch path returns them and the loss against the float64 reference."""
    device = require("triton", "dist_loss")
    from kd_kernels.triton import logit as tk

    n, c = 300, 70
    s, t = _logits(n, c, device, scale=3.0)
    mask = (torch.arange(n, device=device) % 7 == 3) if masked else None
    loss, lse_s, lse_t, stats = tk.dist_fwd_triton(s, t, 2.0, 1.0, 1.0, mask)
    e_loss, e_lse_s, e_lse_t, e_stats = impl.dist_fwd(s.double(), t.double(), 2.0, 1.0, 1.0, mask)
    assert stats.shape == (5, c) and stats.dtype == torch.float32 and loss.dtype == torch.float32
    assert_close(stats, e_stats, rtol=1e-4, atol=1e-6, name="class_stats")
    assert_close(lse_s, e_lse_s, name="lse_s")
    assert_close(lse_t, e_lse_t, name="lse_t")
    assert_close(loss, e_loss, rtol=1e-4, atol=1e-6, name="loss")
    t.requires_grad_(True)
    assert_matches_reference(
        KF.dist_loss, ref.dist_loss, s, t, grad_output=torch.tensor(1.3, dtype=torch.float64), name="dist_loss",
        backend="triton", ignore_mask=mask, temperature=2.0,
    )  # fmt: skip


@pytest.mark.parametrize("top_k", [17, 40, 150])
def test_grkd_top_k_spans_first_class_tiles(top_k):
    """top_k over several first-class tiles of 16 (and top_k = C); pair counts as the torch path."""
    device = require("triton", "grkd_loss")
    from kd_kernels.triton import logit as tk

    s, t = _logits(4, 150, device)
    t[1, 10:30] = t[1, 9]  # ties: no pair between equal teacher logits
    loss, pairs = tk.grkd_fwd_triton(s, t, 1.5, top_k, None)
    e_loss, e_pairs = impl.grkd_fwd(s.double(), t.double(), 1.5, top_k, None)
    assert pairs.dtype == torch.int64 and torch.equal(pairs, e_pairs)
    assert_close(loss, e_loss, name="loss")
    assert_matches_reference(
        KF.grkd_loss, ref.grkd_loss, s, t, grad_output=torch.tensor(0.5, dtype=torch.float64), name="grkd_loss",
        backend="triton", top_k=top_k, temperature=1.5,
    )  # fmt: skip


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_all_rows_masked(name, kwargs):
    """Every row dropped, NaN/inf in some of them: loss 0, gradients 0 (nothing leaks)."""
    device = require("triton", name)
    s, t = _logits(6, 130, device)
    s[1, 3], t[2, 5], s[4, 0] = float("nan"), float("inf"), float("-inf")
    t.requires_grad_(name != "grkd_loss")
    mask = torch.ones(6, dtype=torch.bool, device=device)
    kw = dict(kwargs)
    if name == "jsd_loss":
        kw["reduction"] = "none"
    go = torch.randn(6, dtype=torch.float64) if name == "jsd_loss" else torch.tensor(1.0, dtype=torch.float64)
    v, gs, gt = value_and_grads(getattr(KF, name), s, t, grad_output=go, backend="triton", ignore_mask=mask, **kw)
    assert (v == 0).all(), f"{name}: {v}"
    assert (gs == 0).all()
    assert gt is None or (gt == 0).all()


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_neg_inf_at_the_same_classes(name, kwargs):
    """-inf in teacher and student at the same classes (vocabulary masking, across tile
    boundaries): finite, and equal to the torch path, value and student gradient (-inf classes
    get gradient 0)."""
    device = require("triton", name)
    s, t = _logits(5, 200, device)
    cols = torch.tensor([0, 63, 64, 65, 127, 199])
    s[:, cols] = float("-inf")
    t[:, cols] = float("-inf")
    fn = getattr(KF, name)
    v, gs, _ = value_and_grads(fn, s, t, grad_output=torch.tensor(0.9, dtype=torch.float64), backend="triton", **kwargs)
    e, egs, _ = value_and_grads(fn, s, t, grad_output=torch.tensor(0.9, dtype=torch.float64), backend="torch", **kwargs)
    assert torch.isfinite(v).all() and torch.isfinite(gs).all(), f"{name}: {v}"
    assert_close(v, e, name=f"{name} value")
    assert_close(gs, egs, name=f"{name} grad student")
    assert (gs[:, cols] == 0).all()


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_launcher_contract(beta):
    """jsd_fwd_triton returns float32 (row_loss, lse_s, lse_t) as the torch path; unneeded
    gradients are empty; the teacher's gradient (PyTorch path) matches the torch path."""
    device = require("triton", "jsd_loss")
    from kd_kernels.triton import logit as tk

    s, t = _logits(4, 150, device, dtype=torch.bfloat16)
    mask = torch.tensor([0, 0, 1, 0], dtype=torch.bool, device=device)
    out = tk.jsd_fwd_triton(s, t, beta, 1.7, mask)
    exp = impl.jsd_fwd(s, t, beta, 1.7, mask)
    for a, e, what in zip(out, exp, ("row_loss", "lse_s", "lse_t")):
        assert a.dtype == torch.float32 and a.shape == (4,)
        assert_close(a, e, rtol=1e-5, atol=1e-6, name=what)
    g = torch.randn(4, device=device)
    gs, gt = tk.jsd_bwd_triton(g, s, t, out[1], out[2], beta, 1.7, mask, True, False)
    assert gs.dtype == torch.bfloat16 and gt.numel() == 0
    egs, egt = impl.jsd_bwd(g, s, t, exp[1], exp[2], beta, 1.7, mask, True, True)
    assert_close(gs, egs, rtol=1e-2, atol=1e-4, name="grad student")
    gs2, gt2 = tk.jsd_bwd_triton(g, s, t, out[1], out[2], beta, 1.7, mask, False, True)
    assert gs2.numel() == 0
    assert_close(gt2, egt, rtol=1e-2, atol=1e-4, name="grad teacher")
