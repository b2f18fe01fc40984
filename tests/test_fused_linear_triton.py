"""The Triton kernels of fused_linear_kd_loss / fused_linear_jsd_loss (kd_kernels/triton/fused_linear.py)
against the float64 loss on explicitly computed logits (as tests/test_fused_linear.py): both losses,
JSD's mixture and endpoints, with and without biases, Hs != Ht, odd and tiny vocabularies (1, 37,
1000: one partial tile to 32 tiles of the interpreter's 32 columns), odd N, row masks (all rows
too), temperature != 1, teacher with and without grad, grad_output != 1, fp16 / bf16 by the 2x
rule, several V splits in the forward and several row chunks in the backward (forced).

They run on the CPU under the Triton interpreter (``TRITON_INTERPRET=1``) or on a CUDA device;
otherwise they are skipped.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_fused_linear_triton.py -q
"""

from __future__ import annotations

import pytest
import torch

from kd_kernels import functional as KF
from kd_kernels.testing import assert_close, assert_close_2x, low_precision_floor, require, tolerance
from kd_kernels.torch_impl import fused_linear as fl_impl

LOSSES = {
    "kd": (KF.fused_linear_kd_loss, KF.kd_loss, "fused_linear_kd_loss"),
    "jsd": (KF.fused_linear_jsd_loss, KF.jsd_loss, "fused_linear_jsd_loss"),
}
NAMES = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias")


def _device(loss: str) -> torch.device:
    return require("triton", LOSSES[loss][2])


def _tl():
    from kd_kernels.triton import fused_linear as tl_fl

    return tl_fl


def _inputs(n, v, hs, ht, device, dtype=torch.float32, bias=True, teacher_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((n, hs), (v, hs), (v,), (n, ht), (v, ht), (v,))
    ts = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    ts[0] *= 2.0  # logits of a few units: non-trivial distributions
    ts[3] *= 2.0
    ts = [t.to(dtype).to(device) for t in ts]
    if not bias:
        ts[2] = ts[5] = None
    for i, t in enumerate(ts):
        if t is not None and (i < 3 or teacher_grad):
            t.requires_grad_(True)
    return ts


def _leaves(ts, dtype=None):
    """Fresh leaves (same requires_grad), optionally cast (e.g. to float64 for the reference)."""
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad) for t in ts]


def _fused(loss, ts, **kw):
    hs, ws, bs, ht, wt, bt = ts
    return LOSSES[loss][0](hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, **kw)


def _explicit(loss, ts, **kw):
    """The plain loss on logits computed explicitly ([N, V] materialised), autograd through the matmul."""
    hs, ws, bs, ht, wt, bt = ts
    zs = hs @ ws.t() + (0 if bs is None else bs)
    zt = ht @ wt.t() + (0 if bt is None else bt)
    return LOSSES[loss][1](zs, zt, backend="torch", **kw)


def _value_and_grads(fn, loss, ts, grad_output, **kw):
    out = fn(loss, ts, **kw)
    wrt = [t for t in ts if t is not None and t.requires_grad]
    g = torch.ones_like(out) if grad_output is None else grad_output.to(device=out.device, dtype=out.dtype)
    return out.detach(), torch.autograd.grad(out, wrt, g)


def _compare_fp32(loss, ts, grad_output=None, **kw):
    """Triton (fp32) against the float64 explicit-logits reference: value and every gradient."""
    out, got = _value_and_grads(_fused, loss, _leaves(ts), grad_output, backend="triton", **kw)
    ref, want = _value_and_grads(_explicit, loss, _leaves(ts, torch.float64), grad_output, **kw)
    rtol, atol = tolerance(torch.float32, "triton")
    assert out.dtype == torch.float32
    assert_close(out, ref, rtol=rtol, atol=atol * max(1.0, ref.abs().max().item()), name=f"{loss} value")
    names = [n for n, t in zip(NAMES, ts, strict=True) if t is not None and t.requires_grad]
    assert len(got) == len(names)
    for name, a, b in zip(names, got, want, strict=True):
        assert a.shape == b.shape and a.dtype == torch.float32, name
        # an absolute floor relative to the gradient's scale: entries are sums over N or V of terms
        # of that scale, so near-zero entries carry fp32 rounding of the scale, not of themselves
        assert_close(a, b, rtol=rtol, atol=4 * atol * b.abs().max().item(), name=f"{loss} grad {name}")
    return ref, want


@pytest.fixture
def small_chunks(monkeypatch):
    """3 rows per backward chunk (the interpreter config's CHUNK_ELEMENTS, read at each call)."""

    def set_for(v):
        monkeypatch.setitem(_tl().FUSED_LINEAR_CONFIGS["interpret"], "CHUNK_ELEMENTS", 3 * v)
        monkeypatch.setitem(_tl().FUSED_LINEAR_CONFIGS["gpu"], "CHUNK_ELEMENTS", 3 * v)

    return set_for


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_matches_explicit_logits(small_chunks, loss, bias, masked, teacher_grad):
    """N = 11 (odd, 4 chunks of 3), V = 37 (two tiles, two splits), Hs = 6 != Ht = 9, T = 2.5."""
    device = _device(loss)
    n, v = 11, 37
    small_chunks(v)
    ts = _inputs(n, v, 6, 9, device, bias=bias, teacher_grad=teacher_grad)
    kw = {"temperature": 2.5}
    if loss == "jsd":
        kw["beta"] = 0.3
    if masked:
        kw["ignore_mask"] = torch.tensor([i % 3 == 1 for i in range(n)], device=device)
    _, want = _compare_fp32(loss, ts, torch.tensor(0.7, dtype=torch.float64), **kw)
    for b in want:
        assert b.abs().max() > 0, "reference gradient is zero (test would be vacuous)"


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_jsd_beta(small_chunks, beta, reduction):
    """The mixture and both endpoints (forward / reverse KL kernels), student and teacher gradients,
    a per-row grad_output for "none"."""
    device = _device("jsd")
    n, v = 9, 70
    small_chunks(v)
    ts = _inputs(n, v, 8, 5, device, teacher_grad=True, seed=1)
    grad_output = torch.linspace(-1.0, 2.0, n, dtype=torch.float64) if reduction == "none" else None
    _compare_fp32("jsd", ts, grad_output, beta=beta, temperature=1.5, reduction=reduction)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("v", [1, 2, 37, 1000])
def test_vocabulary_sizes(loss, v):
    """V = 1 (loss 0, gradient 0 up to rounding), 2, 37, 1000 (32 tiles over 4 V splits); N = 7."""
    device = _device(loss)
    ts = _inputs(7, v, 12, 20, device, teacher_grad=v == 37, seed=v)
    kw = {"temperature": 0.7, "ignore_mask": torch.tensor([0, 0, 1, 0, 0, 0, 1], dtype=torch.bool, device=device)}
    if loss == "jsd":
        kw["beta"] = 0.4
    out, got = _value_and_grads(_fused, loss, _leaves(ts), None, backend="triton", **kw)
    ref, want = _value_and_grads(_explicit, loss, _leaves(ts, torch.float64), None, **kw)
    _, base_g = _value_and_grads(_explicit, loss, _leaves(ts), None, **kw)  # plain PyTorch, fp32
    rtol, atol = tolerance(torch.float32, "triton")
    assert_close(out, ref, rtol=rtol, atol=atol * max(1.0, ref.abs().max().item()), name=f"{loss} V={v}")
    # T = 0.7 on logits of ~7 units: sharp rows; JSD's small gradients (~5e-4) are differences of
    # terms q (l_s - log M) of order 0.1-1 and carry their fp32 rounding (1e-4 of the gradient's
    # scale for fp32 PyTorch too, in another summation order): within 2x the error of fp32 PyTorch
    # on the explicit logits plus 1e-6 of max(largest gradient, 0.25) (the terms' scale)
    scale = max(max(b.abs().max().item() for b in want), 0.25)
    names = [n for n, t in zip(NAMES, ts, strict=True) if t.requires_grad]
    for name, a, b, c in zip(names, got, want, base_g, strict=True):
        assert_close_2x(a, b, c, name=f"{loss} V={v} grad {name}", floor=atol * scale)


@pytest.mark.parametrize("kind,beta", [("kd", 0.0), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("chunk_rows,splits", [(1, 1), (4, 3), (100, 2)])
def test_launchers_forced_chunks_and_splits(kind, beta, chunk_rows, splits):
    """The launchers with forced backward chunks and forward V splits equal the torch kernels on
    float64; every gradient, then only the student weight's (the others empty)."""
    device = _device(kind)
    tf = _tl()
    n, v = 10, 150  # 5 tiles of 32
    hs, ws, bs, ht, wt, bt = (t.detach() for t in _inputs(n, v, 7, 11, device, seed=2))
    mask = torch.tensor([i == 2 for i in range(n)], device=device)
    temperature = 3.0
    scal = (temperature,) if kind == "kd" else (beta, temperature)
    fwd = getattr(tf, f"fused_linear_{kind}_fwd_triton")
    bwd = getattr(tf, f"fused_linear_{kind}_bwd_triton")
    t64 = [t.double() for t in (hs, ws, bs, ht, wt, bt)]
    got = fwd(hs, ws, bs, ht, wt, bt, *scal, mask, splits=splits)
    want = fl_impl.fused_linear_fwd(kind, *t64, temperature, beta, mask)
    for a, b, name in zip(got, want, ("row_loss", "lse_s", "lse_t"), strict=True):
        assert a.dtype == torch.float32
        assert_close(a, b, rtol=2e-5, atol=2e-6 * max(1.0, b.abs().max().item()), name=name)
    grad_row = torch.randn(n, dtype=torch.float64, device=device)
    out = bwd(grad_row.float(), hs, ws, bs, ht, wt, bt, got[1], got[2], *scal, mask, *(True,) * 6,
              chunk_rows=chunk_rows, splits=splits)  # fmt: skip
    expected = fl_impl.fused_linear_bwd(kind, grad_row, *t64, want[1], want[2], temperature, beta, mask, (True,) * 6)
    for name, a, b in zip(NAMES, out, expected, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert_close(a, b, rtol=2e-5, atol=8e-6 * b.abs().max().item(), name=name)
    out = bwd(grad_row.float(), hs, ws, bs, ht, wt, bt, got[1], got[2], *scal, mask,
              False, True, False, False, False, False, chunk_rows=chunk_rows)  # fmt: skip
    assert [o.numel() for o in out] == [0, v * 7, 0, 0, 0, 0]
    assert_close(out[1], expected[1], rtol=2e-5, atol=8e-6 * expected[1].abs().max().item(), name="weight only")


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_all_rows_masked(loss):
    """Every row dropped, with huge (finite) hidden values: loss 0 and every gradient exactly 0."""
    device = _device(loss)
    ts = _inputs(5, 40, 6, 9, device, teacher_grad=True)
    with torch.no_grad():
        ts[3][1] = 1e30  # garbage in a dropped row: inf logits, NaN softmax, must not leak
    out = _fused(loss, ts, ignore_mask=torch.ones(5, dtype=torch.bool, device=device), backend="triton")
    assert out.item() == 0.0
    grads = torch.autograd.grad(out, [t for t in ts if t.requires_grad])
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("where", ["student_nan", "teacher_inf"])
def test_non_finite_input_gives_non_finite_loss(loss, where):
    device = _device(loss)
    ts = [t.detach() for t in _inputs(6, 50, 6, 9, device)]
    if where == "student_nan":
        ts[0][2, 1] = float("nan")
    else:
        ts[3][4, 0] = float("inf")
    out = _fused(loss, ts, backend="triton", reduction="none")
    assert not torch.isfinite(out).all()
    assert torch.isfinite(out[[0, 1, 3, 5]]).all()  # other rows are untouched


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_2x_rule(small_chunks, loss, dtype):
    """fp16 / bf16 inputs: value and gradients within 2x the error of plain PyTorch in that dtype
    (explicit logits, kd_loss / jsd_loss on them) against float64, plus the final rounding."""
    device = _device(loss)
    n, v = 9, 100
    small_chunks(v)
    ts64 = _inputs(n, v, 16, 24, device, dtype=torch.float64, teacher_grad=True, seed=3)
    ts = _leaves(ts64, dtype)
    kw = {"temperature": 2.0, "ignore_mask": torch.tensor([i == 4 for i in range(n)], device=device)}
    if loss == "jsd":
        kw["beta"] = 0.3
    out, got = _value_and_grads(_fused, loss, ts, None, backend="triton", **kw)
    base, base_g = _value_and_grads(_explicit, loss, _leaves(ts), None, **kw)
    ref, want = _value_and_grads(_explicit, loss, _leaves(ts, torch.float64), None, **kw)
    assert out.dtype == dtype
    eps = low_precision_floor(dtype)
    assert_close_2x(out, ref, base, name=f"{loss} {dtype} value", floor=eps * ref.abs().max().item())
    for name, a, b, c in zip(NAMES, got, want, base_g, strict=True):
        assert a.dtype == dtype, name
        assert_close_2x(a, b, c, name=f"{loss} {dtype} grad {name}", floor=eps * b.abs().max().item())


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_public_function_runs_the_triton_kernels(monkeypatch, loss):
    """backend="triton" reaches the launchers (forward and backward), not the torch kernels."""
    device = _device(loss)
    tf = _tl()
    calls = []
    real_f, real_b = tf._forward, tf._backward
    monkeypatch.setattr(tf, "_forward", lambda *a, **k: calls.append("fwd") or real_f(*a, **k))
    monkeypatch.setattr(tf, "_backward", lambda *a, **k: calls.append("bwd") or real_b(*a, **k))
    ts = _inputs(4, 20, 6, 9, device)
    _fused(loss, ts, backend="triton").backward()
    assert calls == ["fwd", "bwd"]


def test_chunk_rows_bound_the_gradient_buffer():
    """The backward's [chunk, V] buffers stay within CHUNK_ELEMENTS (independent of N)."""
    tf = _tl()
    cfg = tf.FUSED_LINEAR_CONFIGS["gpu"]
    for v in (1, 1000, 32000, 128256, 10**7):
        rows = tf._chunk_rows(cfg, v, None)
        assert 1 <= rows <= cfg["MAX_CHUNK_ROWS"]
        assert rows * v <= max(cfg["CHUNK_ELEMENTS"], v)
    assert tf._chunk_rows(cfg, 128256, None) == 128  # a multiple of BLOCK_M
