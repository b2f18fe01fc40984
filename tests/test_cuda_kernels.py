"""Contract of the CUDA C++ Hinton-KD functions of kd_kernels._C (csrc/cuda/logit.cu, documented
in kd_kernels/ops/logit.py): they exist when the extension is built, check their arguments and
return outputs in the documented dtypes and shapes. Values against the reference run in the
backend matrix (tests/test_logit.py, backend="cuda"); the op wiring with an emulated kernel is in
tests/test_ops.py. GPU tests skip with "no CUDA device" or "kd_kernels._C not built: ..."."""

from __future__ import annotations

import pytest
import torch

from kd_kernels.testing import require_extension, tolerance

_ext = require_extension  # kd_kernels._C, or skip with the reason


def test_functions_exist_in_the_extension():
    ext = _ext()
    assert hasattr(ext, "kd_fwd_cuda") and hasattr(ext, "kd_bwd_cuda")


@pytest.fixture
def C():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return _ext()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_output_dtypes_and_shapes(C, dtype):
    s, t = torch.randn(5, 1271, device="cuda").to(dtype), torch.randn(5, 1271, device="cuda").to(dtype)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    rows, lse_s, lse_t = C.kd_fwd_cuda(s, t, 4.0)
    for x in (rows, lse_s, lse_t):
        assert x.dtype == stat and x.shape == (5,)
    g = C.kd_bwd_cuda(torch.ones_like(rows), s, t, lse_s, lse_t, 4.0)
    assert g.dtype == dtype and g.shape == s.shape and g.is_contiguous()


@pytest.mark.gpu
def test_empty_batch(C):
    s = torch.empty(0, 1271, device="cuda")
    rows, lse_s, lse_t = C.kd_fwd_cuda(s, s, 4.0)
    assert rows.shape == (0,)
    assert C.kd_bwd_cuda(rows, s, s, lse_s, lse_t, 4.0).shape == (0, 1271)


@pytest.mark.gpu
def test_bad_arguments_name_the_argument(C):
    s, t = torch.randn(3, 10, device="cuda"), torch.randn(3, 10, device="cuda")
    with pytest.raises(RuntimeError, match="teacher must have shape"):
        C.kd_fwd_cuda(s, t[:, :9], 4.0)
    with pytest.raises(RuntimeError, match="teacher must be on the same device as student"):
        C.kd_fwd_cuda(s, t.cpu(), 4.0)
    with pytest.raises(RuntimeError, match="teacher must have the dtype of student"):
        C.kd_fwd_cuda(s, t.double(), 4.0)
    with pytest.raises(RuntimeError, match="student must be a floating-point tensor"):
        C.kd_fwd_cuda(s.long(), t.long(), 4.0)
    with pytest.raises(RuntimeError, match="student must be a 2-D tensor"):
        C.kd_fwd_cuda(s[0], t[0], 4.0)
    with pytest.raises(RuntimeError, match="temperature must be a positive"):
        C.kd_fwd_cuda(s, t, 0.0)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        C.kd_fwd_cuda(s.cpu(), t.cpu(), 4.0)
    rows, lse_s, lse_t = C.kd_fwd_cuda(s, t, 4.0)
    with pytest.raises(RuntimeError, match="grad_row must have shape"):
        C.kd_bwd_cuda(rows[:2], s, t, lse_s, lse_t, 4.0)


# ---- The divergence group: divergence_fwd_cuda / divergence_bwd_cuda (one template; kd is its
# "kd" instance). Values against the float64 PyTorch path (kd_kernels.torch_impl.logit).

_KINDS = ("kd", "reverse_kl", "jsd", "tvd")


def _div_ext():
    """kd_kernels._C with the divergence functions, or skip: an extension built before they
    existed (rebuild it) has only kd_fwd_cuda / kd_bwd_cuda."""
    ext = _ext()
    if not hasattr(ext, "divergence_fwd_cuda"):
        pytest.skip("kd_kernels._C was built before divergence_fwd_cuda / divergence_bwd_cuda existed (rebuild it)")
    return ext


@pytest.fixture
def D():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return _div_ext()


def _torch_divergence(kind, s, t, temperature, beta, grad_row):
    """(row_loss, lse_s, lse_t, grad_student) of the PyTorch path in float64."""
    from kd_kernels.torch_impl import logit as impl

    s, t, g = s.double(), t.double(), grad_row.double()
    rows, lse_s, lse_t = impl.divergence_fwd(kind, s, t, temperature, beta)
    gs, _ = impl.divergence_bwd(kind, g, s, t, lse_s, lse_t, temperature, beta, None, True, False)
    return rows, lse_s, lse_t, gs


def test_divergence_functions_check_the_device_and_name_themselves():
    """On CPU tensors the functions raise before any launch, naming the function (no GPU needed)."""
    ext = _div_ext()
    s, t, row = torch.randn(3, 5), torch.randn(3, 5), torch.ones(3)
    for kind in _KINDS:
        with pytest.raises(RuntimeError, match="divergence_fwd_cuda: student must be a CUDA tensor"):
            ext.divergence_fwd_cuda(kind, s, t, 2.0, 0.5)
        with pytest.raises(RuntimeError, match="divergence_bwd_cuda: student must be a CUDA tensor"):
            ext.divergence_bwd_cuda(kind, row, s, t, row, row, 2.0, 0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_divergence_output_dtypes_and_shapes(D, kind, dtype):
    s, t = torch.randn(5, 1271, device="cuda").to(dtype), torch.randn(5, 1271, device="cuda").to(dtype)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    rows, lse_s, lse_t = D.divergence_fwd_cuda(kind, s, t, 2.0, 0.3)
    for x in (rows, lse_s, lse_t):
        assert x.dtype == stat and x.shape == (5,)
    g = D.divergence_bwd_cuda(kind, torch.ones_like(rows), s, t, lse_s, lse_t, 2.0, 0.3)
    assert g.dtype == dtype and g.shape == s.shape and g.is_contiguous()


@pytest.mark.gpu
@pytest.mark.parametrize("kind,beta", [(k, 0.3) for k in _KINDS] + [("jsd", 0.0), ("jsd", 1.0), ("jsd", 0.5)])
@pytest.mark.parametrize("C", [1, 2, 1000, 32001])
def test_divergence_values_match_the_float64_torch_path(D, kind, beta, C):
    """fp32 kernels against the float64 PyTorch path: row loss, both lse, the student gradient;
    -inf logits (vocabulary masking) in both inputs and in the teacher only; a non-contiguous student."""
    gen = torch.Generator(device="cuda").manual_seed(C)
    n = 6
    s = (torch.randn(n, 2 * C, device="cuda", generator=gen) * 3)[:, ::2]  # non-contiguous: copied by the function
    t = torch.randn(n, C, device="cuda", generator=gen) * 3
    if C > 2:
        t[0, : C // 3] = float("-inf")  # teacher-only masking (forward KL stays finite)
        s[1, 1], t[1, 1] = float("-inf"), float("-inf")  # masked in both
    grad_row = torch.rand(n, device="cuda", generator=gen)
    rows, lse_s, lse_t = D.divergence_fwd_cuda(kind, s, t, 2.5, beta)
    gs = D.divergence_bwd_cuda(kind, grad_row, s, t, lse_s, lse_t, 2.5, beta)
    r_rows, r_ls, r_lt, r_gs = _torch_divergence(kind, s, t, 2.5, beta, grad_row)
    rtol, atol = tolerance(torch.float32, "cuda")
    for got, want in ((rows, r_rows), (lse_s, r_ls), (lse_t, r_lt), (gs, r_gs)):
        assert torch.equal(got.isfinite(), want.isfinite())
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.gpu
def test_kd_functions_are_the_kd_instance(D):
    s, t = torch.randn(7, 3001, device="cuda"), torch.randn(7, 3001, device="cuda")
    a = D.kd_fwd_cuda(s, t, 3.0)
    b = D.divergence_fwd_cuda("kd", s, t, 3.0, 0.7)  # beta is not read for kd
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    g = torch.rand(7, device="cuda")
    assert torch.equal(D.kd_bwd_cuda(g, s, t, *a[1:], 3.0), D.divergence_bwd_cuda("kd", g, s, t, *a[1:], 3.0, 0.7))


@pytest.mark.gpu
def test_jsd_endpoints_are_forward_and_reverse_kl(D):
    """beta = 0: forward KL without T^2 (the kd kernel scaled); beta = 1: the reverse-KL kernel."""
    s, t = torch.randn(4, 777, device="cuda"), torch.randn(4, 777, device="cuda")
    temperature, g = 2.0, torch.rand(4, device="cuda")
    kd_rows, ls, lt = D.divergence_fwd_cuda("kd", s, t, temperature, 0.0)
    j0_rows, _, _ = D.divergence_fwd_cuda("jsd", s, t, temperature, 0.0)
    torch.testing.assert_close(j0_rows, kd_rows / temperature**2)
    torch.testing.assert_close(
        D.divergence_bwd_cuda("jsd", g, s, t, ls, lt, temperature, 0.0),
        D.divergence_bwd_cuda("kd", g, s, t, ls, lt, temperature, 0.0) / temperature**2,
    )
    rk = D.divergence_fwd_cuda("reverse_kl", s, t, temperature, 0.0)
    j1 = D.divergence_fwd_cuda("jsd", s, t, temperature, 1.0)
    for x, y in zip(rk, j1, strict=True):
        assert torch.equal(x, y)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", _KINDS)
def test_divergence_nan_and_inf_rows_propagate(D, kind):
    """A NaN or +inf logit in a row gives a NaN row loss (and a non-finite gradient row); the
    other rows stay finite (the torch path's rule)."""
    s, t = torch.randn(4, 300, device="cuda"), torch.randn(4, 300, device="cuda")
    s[0, 17] = float("nan")
    t[1, 5] = float("nan")
    s[2, 40] = float("inf")
    rows, lse_s, lse_t = D.divergence_fwd_cuda(kind, s, t, 1.0, 0.5)
    assert rows[:3].isnan().all() and rows[3].isfinite()
    gs = D.divergence_bwd_cuda(kind, torch.ones_like(rows), s, t, lse_s, lse_t, 1.0, 0.5)
    assert not gs[:3].isfinite().all(dim=1).any() and gs[3].isfinite().all()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", _KINDS)
def test_divergence_empty_batch(D, kind):
    s = torch.empty(0, 1271, device="cuda")
    rows, lse_s, lse_t = D.divergence_fwd_cuda(kind, s, s, 4.0, 0.5)
    assert rows.shape == (0,)
    assert D.divergence_bwd_cuda(kind, rows, s, s, lse_s, lse_t, 4.0, 0.5).shape == (0, 1271)


@pytest.mark.gpu
def test_divergence_bad_arguments_name_the_argument(D):
    s, t = torch.randn(3, 10, device="cuda"), torch.randn(3, 10, device="cuda")
    with pytest.raises(RuntimeError, match="divergence_fwd_cuda: kind must be one of"):
        D.divergence_fwd_cuda("kl", s, t, 4.0, 0.5)
    for beta in (-0.1, 1.5, float("nan")):
        with pytest.raises(RuntimeError, match="divergence_fwd_cuda: beta must be in"):
            D.divergence_fwd_cuda("jsd", s, t, 4.0, beta)
    D.divergence_fwd_cuda("tvd", s, t, 4.0, 7.0)  # beta is read for jsd only
    with pytest.raises(RuntimeError, match="divergence_fwd_cuda: teacher must have shape"):
        D.divergence_fwd_cuda("tvd", s, t[:, :9], 4.0, 0.5)
    with pytest.raises(RuntimeError, match="divergence_fwd_cuda: temperature must be a positive"):
        D.divergence_fwd_cuda("reverse_kl", s, t, -1.0, 0.5)
    rows, lse_s, lse_t = D.divergence_fwd_cuda("jsd", s, t, 4.0, 0.5)
    with pytest.raises(RuntimeError, match="divergence_bwd_cuda: lse_t must have shape"):
        D.divergence_bwd_cuda("jsd", rows, s, t, lse_s, lse_t[:2], 4.0, 0.5)
    with pytest.raises(RuntimeError, match="divergence_bwd_cuda: kind must be one of"):
        D.divergence_bwd_cuda("kl", rows, s, t, lse_s, lse_t, 4.0, 0.5)


def _emulated_divergence_extension(calls: list):
    """CPU stand-ins for divergence_{fwd,bwd}_cuda computing their documented contract (one dtype,
    no mask, the student's gradient only) in float64 with the PyTorch path; each call is logged."""
    import types

    from kd_kernels.torch_impl import logit as impl

    def divergence_fwd_cuda(kind, student, teacher, temperature, beta):
        assert student.dtype == teacher.dtype
        calls.append(("fwd", kind, temperature, beta))
        stat = torch.float64 if student.dtype == torch.float64 else torch.float32
        out = impl.divergence_fwd(kind, student.double(), teacher.double(), temperature, beta)
        return tuple(x.to(stat) for x in out)

    def divergence_bwd_cuda(kind, grad_row, student, teacher, lse_s, lse_t, temperature, beta):
        assert student.dtype == teacher.dtype
        calls.append(("bwd", kind, temperature, beta))
        d = [x.double() for x in (grad_row, student, teacher, lse_s, lse_t)]
        gs, _ = impl.divergence_bwd(kind, *d[:1], *d[1:], temperature, beta, None, True, False)
        return gs.to(student.dtype)

    return types.SimpleNamespace(divergence_fwd_cuda=divergence_fwd_cuda, divergence_bwd_cuda=divergence_bwd_cuda)


@pytest.mark.parametrize(
    "loss,kwargs",
    [("reverse_kl", {}), ("tvd", {}), ("jsd", {"beta": 0.3}), ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0})],
    ids=["reverse_kl", "tvd", "jsd-0.3", "jsd-0", "jsd-1"],
)
def test_divergence_cuda_adapters_with_an_emulated_kernel(monkeypatch, loss, kwargs):
    """The backend="cuda" wiring of reverse_kl / jsd / tvd (kd_kernels/ops/logit.py: the scalars in
    the kernel's order, ignore_mask, mixed dtypes, the teacher's gradient from the PyTorch path) on
    the CPU, against the float64 reference, with emulated kd_kernels._C functions."""
    import kd_kernels.functional as KF
    import kd_kernels.losses.logit as logit_losses
    import kd_kernels.reference.logit as ref
    from kd_kernels import _backend
    from kd_kernels.testing import assert_matches_reference

    calls: list = []
    monkeypatch.setitem(_backend._ext_state, "module", _emulated_divergence_extension(calls))
    monkeypatch.setitem(_backend._ext_state, "error", None)
    monkeypatch.setattr(logit_losses, "resolve_backend", lambda backend, *a, **k: backend)
    fn, ref_fn = getattr(KF, f"{loss}_loss"), getattr(ref, f"{loss}_loss")
    n, c = 9, 23
    s = torch.randn(n, c) * 2
    t = (torch.randn(n, c) * 2).requires_grad_(True)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[[1, 4]] = True
    for reduction in ("batchmean", "sum", "none"):
        g = torch.rand(n) if reduction == "none" else torch.tensor(0.37)
        assert_matches_reference(
            lambda a, b, **kw: fn(a, b, backend="cuda", **kw),
            ref_fn,
            s,
            t,
            grad_output=g,
            reduction=reduction,
            ignore_mask=mask,
            temperature=3.0,
            **kwargs,
        )
    beta = float(kwargs.get("beta", 0.0))
    assert {call[1:] for call in calls} == {(loss, 3.0, beta)}
    assert {call[0] for call in calls} == {"fwd", "bwd"}
    # mixed dtypes run in their common dtype; ignored rows holding NaN logits do not leak
    s_nan = s.clone().to(torch.bfloat16).requires_grad_(True)
    with torch.no_grad():
        s_nan[1] = float("nan")
    v = fn(s_nan, t.detach(), backend="cuda", ignore_mask=mask, **kwargs)
    (gs,) = torch.autograd.grad(v, s_nan)
    assert torch.isfinite(v) and torch.isfinite(gs).all() and (gs[1] == 0).all() and gs.dtype == torch.bfloat16
