"""Tests of the op helper (kd_kernels/ops/_define.py): every loss's ops exist with their schemas,
differentiating through a backward raises the documented error, float64 inputs run the torch
kernel whatever the backend, and the CUDA paths call the plain functions of kd_kernels._C
(checked on the CPU with emulated functions)."""

from __future__ import annotations

import types

import pytest
import torch

import kd_kernels.functional as KF
from kd_kernels import _backend
from kd_kernels.ops import _define, geometry, logit, rkd, sinkhorn
from kd_kernels.testing import assert_matches_reference

LOSSES = ["rkd_distance", "rkd_angle", "kd", "reverse_kl", "jsd", "tvd", "dist", "grkd", "topk"]
LOSSES += ["gram", "cka", "relation", "procrustes", "sinkhorn_loss", "sinkhorn"]
LOSSES += ["fused_linear_kd", "fused_linear_jsd"]


def test_every_loss_is_defined_by_the_helper():
    assert sorted(_define.LOSS_OPS) == sorted(LOSSES)
    for name in LOSSES:
        for d in ("fwd", "bwd"):
            schema = getattr(torch.ops.kd_kernels, f"{name}_{d}").default._schema
            assert schema.arguments[-1].name == "backend"


def _pair(n=5, c=4, dtype=torch.float32):
    return torch.randn(n, c, dtype=dtype, requires_grad=True), torch.randn(n, c, dtype=dtype, requires_grad=True)


DOUBLE_BACKWARD = {
    "rkd_distance": lambda s, t: rkd.rkd_distance_fwd(s, t, "mean", "torch")[0],
    "rkd_angle": lambda s, t: rkd.rkd_angle_fwd(s, t, "mean", "torch"),
    "kd": lambda s, t: logit.kd_fwd(s, t, 2.0, None, "torch")[0].sum(),
    "dist": lambda s, t: logit.dist_fwd(s, t, 1.0, 1.0, 1.0, None, "torch")[0],
    "grkd": lambda s, t: logit.grkd_fwd(s, t, 1.0, None, None, "torch")[0],
    "gram": lambda s, t: geometry.gram_fwd(s, t, None, True, True, "torch")[0],
    "sinkhorn_loss": lambda s, t: sinkhorn.sinkhorn_loss_fwd(s, t, 1.0, 0.1, 3, "torch")[0],
}


@pytest.mark.parametrize("name", list(DOUBLE_BACKWARD))
def test_double_backward_raises_a_clear_error(name):
    s, t = _pair()
    loss = DOUBLE_BACKWARD[name](s, t)
    (gs,) = torch.autograd.grad(loss, s, create_graph=True)
    with pytest.raises(RuntimeError, match=rf"kd_kernels::{name}_bwd: second-order gradients \(double backward\)"):
        torch.autograd.grad(gs.sum(), s)


def test_first_order_with_create_graph_still_works():
    s, t = _pair()
    loss = rkd.rkd_distance_fwd(s, t, "mean", "torch")[0]
    (gs,) = torch.autograd.grad(loss, s, create_graph=True)
    (ref,) = torch.autograd.grad(rkd.rkd_distance_fwd(s, t, "mean", "torch")[0], s)
    torch.testing.assert_close(gs.detach(), ref)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_float64_runs_the_torch_kernel(monkeypatch, backend):
    def boom(*args):
        raise AssertionError(f"the {backend} kernel got float64 inputs")

    monkeypatch.setitem(rkd._DISTANCE, backend, (boom, boom))
    s, t = _pair(dtype=torch.float64)
    loss = rkd.rkd_distance_fwd(s, t, "mean", backend)[0]
    loss.backward()
    ref = rkd.rkd_distance_fwd(s.detach(), t.detach(), "mean", "torch")[0]
    torch.testing.assert_close(loss.detach(), ref)
    # a float32 input reaches the backend's own kernel
    with pytest.raises(AssertionError, match="float64"):
        rkd.rkd_distance_fwd(s.detach().float(), t.detach().float(), "mean", backend)


def test_unknown_backend_raises():
    s, t = _pair()
    with pytest.raises(NotImplementedError, match="no 'fastest' kernel"):
        rkd.rkd_angle_fwd(s, t, "mean", "fastest")


def test_kernel_none_grads_become_empty(monkeypatch):
    torch_fwd, torch_bwd = rkd._ANGLE["torch"]
    monkeypatch.setitem(rkd._ANGLE, "torch", (torch_fwd, lambda *a: (torch_bwd(*a)[0], None)))
    s, t = _pair()
    gs, gt = rkd.rkd_angle_bwd(torch.ones(()), s.detach(), t.detach(), "mean", True, False, "torch")
    assert gs.shape == s.shape and gt.numel() == 0 and gt.dtype == t.dtype


def _emulated_extension():
    """CPU stand-ins for the _C functions, computing their documented contracts in float64."""

    def kd_fwd_cuda(student, teacher, temperature):
        assert student.dtype == teacher.dtype
        ls = torch.log_softmax(student.double() / temperature, 1)
        lt = torch.log_softmax(teacher.double() / temperature, 1)
        rows = temperature**2 * (lt.exp() * (lt - ls)).sum(1)
        lse_s = torch.logsumexp(student.double() / temperature, 1)
        lse_t = torch.logsumexp(teacher.double() / temperature, 1)
        return rows.float(), lse_s.float(), lse_t.float()

    def kd_bwd_cuda(grad_row, student, teacher, lse_s, lse_t, temperature):
        q = torch.exp(student.double() / temperature - lse_s.double()[:, None])
        p = torch.exp(teacher.double() / temperature - lse_t.double()[:, None])
        return (grad_row.double()[:, None] * temperature * (q - p)).to(student.dtype)

    calls = []

    def rkd_distance_fwd_cuda(student, teacher, reduction, precision):
        calls.append(precision)
        from kd_kernels.torch_impl import rkd as impl

        return impl.rkd_distance_fwd(student, teacher, reduction)

    return types.SimpleNamespace(
        kd_fwd_cuda=kd_fwd_cuda, kd_bwd_cuda=kd_bwd_cuda, rkd_distance_fwd_cuda=rkd_distance_fwd_cuda
    ), calls


def test_kd_cuda_adapter_with_an_emulated_kernel(monkeypatch):
    """The backend="cuda" wiring of kd_loss (ops/logit.py: ignore_mask, the teacher's gradient from
    the PyTorch path) on the CPU, with emulated kd_kernels._C functions."""
    import kd_kernels.losses.logit as logit_losses
    from kd_kernels.reference.logit import kd_loss as kd_loss_ref

    ext, _ = _emulated_extension()
    monkeypatch.setitem(_backend._ext_state, "module", ext)
    monkeypatch.setitem(_backend._ext_state, "error", None)
    monkeypatch.setattr(logit_losses, "resolve_backend", lambda backend, *a, **k: backend)
    n, c = 9, 23
    s = torch.randn(n, c) * 2
    t = (torch.randn(n, c) * 2).requires_grad_(True)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[[1, 4]] = True
    for reduction in ("batchmean", "sum", "none"):
        g = torch.rand(n) if reduction == "none" else torch.tensor(0.37)
        assert_matches_reference(
            lambda a, b, **kw: KF.kd_loss(a, b, backend="cuda", **kw),
            kd_loss_ref,
            s,
            t,
            grad_output=g,
            reduction=reduction,
            ignore_mask=mask,
            temperature=3.0,
        )
    # ignored rows holding NaN logits must not leak into the loss or the gradient
    s_nan = s.clone().requires_grad_(True)
    with torch.no_grad():
        s_nan[1] = float("nan")
    v = KF.kd_loss(s_nan, t.detach(), backend="cuda", ignore_mask=mask)
    (gs,) = torch.autograd.grad(v, s_nan)
    assert torch.isfinite(v) and torch.isfinite(gs).all() and (gs[1] == 0).all()


def test_rkd_cuda_function_gets_the_precision_at_call_time(monkeypatch):
    ext, calls = _emulated_extension()
    monkeypatch.setitem(_backend._ext_state, "module", ext)
    s, t = _pair()
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        rkd.rkd_distance_fwd(s.detach(), t.detach(), "mean", "cuda")
        torch.set_float32_matmul_precision("high")
        rkd.rkd_distance_fwd(s.detach(), t.detach(), "mean", "cuda")
    finally:
        torch.set_float32_matmul_precision(old)
    assert calls == ["tf32x3", "tf32"] or (calls[1] == "tf32" and torch.backends.cuda.matmul.allow_tf32)


def test_cuda_function_without_extension_raises(monkeypatch):
    monkeypatch.setitem(_backend._ext_state, "module", None)
    monkeypatch.setitem(_backend._ext_state, "error", "ImportError: not built")
    s, t = _pair()
    with pytest.raises(RuntimeError, match="kd_kernels._C did not load"):
        rkd.rkd_angle_fwd(s.detach(), t.detach(), "mean", "cuda")


def test_func_transforms_documented_behaviour():
    """README "Limits": vmap works (PyTorch's per-item fallback, equal to a loop); torch.func.grad
    raises a RuntimeError instead of returning a wrong value."""
    import warnings

    import kd_kernels

    torch.manual_seed(0)
    teacher = torch.randn(6, 3, dtype=torch.float64)
    batch = torch.randn(3, 6, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "performance drop ... batching rule" from the fallback
        mapped = torch.func.vmap(lambda x: kd_kernels.rkd_distance_loss(x, teacher))(batch)
    looped = torch.stack([kd_kernels.rkd_distance_loss(x, teacher) for x in batch])
    torch.testing.assert_close(mapped, looped, rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError):
        torch.func.grad(lambda x: kd_kernels.rkd_distance_loss(x, teacher))(batch[0])


# ------------------------------------------------------------- the eager path of _define.call
# The public losses call their forward op through _define.call: in plain eager mode an equivalent
# autograd.Function (no custom-op dispatch), whenever something traces or transforms the call the
# op itself. Both must give the same values, gradients and errors.

EAGER_CASES = {
    "rkd_distance": (lambda s, t: (rkd.rkd_distance_fwd, (s, t, "mean", "torch")), 0),
    "kd": (lambda s, t: (logit.kd_fwd, (s, t, 2.0, torch.tensor([False, True, False, False, False]), "torch")), 0),
    "gram": (lambda s, t: (geometry.gram_fwd, (s, t, None, True, True, "torch")), 0),
    "sinkhorn_loss": (lambda s, t: (sinkhorn.sinkhorn_loss_fwd, (s, t, 1.0, 0.1, 3, "torch")), 0),
}


def _spy_eager(monkeypatch):
    """Count the calls of each eager autograd.Function."""
    used = []
    for fwd, fn in list(_define._EAGER.items()):

        class Spy(fn):
            @staticmethod
            def forward(ctx, *args, _fn=fn):
                used.append(_fn.__name__)
                return _fn.forward(ctx, *args)

        monkeypatch.setitem(_define._EAGER, fwd, Spy)
    return used


@pytest.mark.parametrize("name", list(EAGER_CASES))
def test_eager_call_equals_the_op(name, monkeypatch):
    make, index = EAGER_CASES[name]
    used = _spy_eager(monkeypatch)
    results = []
    for via_call in (True, False):
        torch.manual_seed(0)
        s, t = _pair()
        op, args = make(s, t)
        out = _define.call(op, *args) if via_call else op(*args)
        loss = (out[index] if isinstance(out, tuple) else out).sum()
        loss.backward(torch.tensor(1.7))
        results.append((loss.detach(), s.grad, t.grad))
    assert used == [f"{name}_eager"], "eager mode must take the autograd.Function"
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["rkd_distance", "kd", "gram", "sinkhorn_loss"])
def test_eager_call_keeps_the_double_backward_error(name):
    make, index = EAGER_CASES[name]
    s, t = _pair()
    op, args = make(s, t)
    out = _define.call(op, *args)
    loss = (out[index] if isinstance(out, tuple) else out).sum()
    (gs,) = torch.autograd.grad(loss, s, create_graph=True)
    with pytest.raises(RuntimeError, match=rf"kd_kernels::{name}_bwd: second-order gradients \(double backward\)"):
        torch.autograd.grad(gs.sum(), s)


def test_traced_calls_take_the_op(monkeypatch):
    used = _spy_eager(monkeypatch)
    s, t = _pair()
    # torch.func transforms, a fake-tensor mode, meta tensors and torch.compile: the op, not the Function
    with pytest.raises(RuntimeError, match="functorch"):  # the op's documented torch.func.grad error (README "Limits")
        torch.func.grad(lambda x: _define.call(rkd.rkd_distance_fwd, x, t.detach(), "mean", "torch")[0])(s.detach())
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fs, ft = torch.empty(5, 4), torch.empty(5, 4)
        out = _define.call(rkd.rkd_distance_fwd, fs, ft, "mean", "torch")
    assert out[0].shape == ()
    meta = _define.call(logit.kd_fwd, s.to("meta"), t.to("meta"), 2.0, None, "torch")
    assert meta[0].shape == (5,) and meta[0].device.type == "meta"
    compiled = torch.compile(lambda x, y: _define.call(rkd.rkd_distance_fwd, x, y, "mean", "torch")[0],
                             backend="eager", fullgraph=True)  # fmt: skip
    compiled(s.detach(), t.detach())
    assert used == [], f"traced calls took the eager Function: {used}"
    _define.call(rkd.rkd_distance_fwd, s, t, "mean", "torch")
    assert used == ["rkd_distance_eager"]
