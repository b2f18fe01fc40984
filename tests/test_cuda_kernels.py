"""GPU tests of the CUDA C++ kernels of kd_kernels._C against float64 PyTorch.

kd_fwd_cuda: row_loss = T² · KL(p ‖ q), lse_s = logsumexp(student / T), lse_t = logsumexp(teacher / T);
kd_bwd_cuda: grad_student = grad_row · T · (q − p)   (p = softmax(teacher / T), q = softmax(student / T)).

Every test is marked ``gpu`` and skips with the reason when there is no CUDA device or the
extension was not built. The float64 reference runs on the same (low-precision) inputs, upcast,
so it measures only the kernels' own error; for float16/bfloat16 the gradient, which is rounded
to the input dtype, must also satisfy the 2x rule against plain PyTorch in that dtype.
"""

from __future__ import annotations

import pytest
import torch

import kd_kernels.ops.cuda_defs  # noqa: F401  (the schemas)
from kd_kernels._backend import extension_error, load_extension
from kd_kernels.testing import assert_close, assert_close_2x

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(load_extension() is None, reason=f"kd_kernels._C not built: {extension_error()}"),
]

fwd = torch.ops.kd_kernels.kd_fwd_cuda
bwd = torch.ops.kd_kernels.kd_bwd_cuda

# Statistics are accumulated in float32 (float64 for float64 inputs), whatever the input dtype.
STAT_TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 2e-5),
    torch.float16: (1e-5, 2e-5),
    torch.bfloat16: (1e-5, 2e-5),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def reference(student, teacher, temperature, grad_row):
    """Float64 PyTorch: (row_loss, lse_s, lse_t, grad_student) from the same inputs."""
    s = student.double() / temperature
    t = teacher.double() / temperature
    log_q, log_p = torch.log_softmax(s, dim=1), torch.log_softmax(t, dim=1)
    p = log_p.exp()
    row_loss = temperature**2 * torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=1)
    grad = grad_row.double()[:, None] * temperature * (log_q.exp() - p)
    return row_loss, torch.logsumexp(s, dim=1), torch.logsumexp(t, dim=1), grad


def logits(n, c, dtype, scale=3.0):
    """Teacher logits correlated with the student's, like a trained pair."""
    s = scale * torch.randn(n, c, device="cuda", dtype=torch.float64)
    t = s + scale * torch.randn(n, c, device="cuda", dtype=torch.float64)
    return s.to(dtype), t.to(dtype)


def stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check(student, teacher, temperature, grad_row):
    row_loss, lse_s, lse_t = fwd(student, teacher, temperature)
    grad = bwd(grad_row, student, teacher, lse_s, lse_t, temperature)
    ref_loss, ref_ls, ref_lt, ref_grad = reference(student, teacher, temperature, grad_row)
    rtol, atol = STAT_TOL[student.dtype]
    atol_loss = atol * temperature**2
    for name, out in (("row_loss", row_loss), ("lse_s", lse_s), ("lse_t", lse_t)):
        assert out.dtype == stat_dtype(student.dtype) and out.shape == (student.shape[0],), name
    assert_close(row_loss, ref_loss, rtol=rtol, atol=atol_loss, name="row_loss")
    assert_close(lse_s, ref_ls, rtol=rtol, atol=atol, name="lse_s")
    assert_close(lse_t, ref_lt, rtol=rtol, atol=atol, name="lse_t")
    assert grad.dtype == student.dtype and grad.shape == student.shape and grad.is_contiguous()
    if student.dtype in (torch.float32, torch.float64):
        assert_close(grad, ref_grad, rtol=rtol, atol=atol * temperature, name="grad_student")
    else:
        # The same gradient in plain PyTorch, in the input dtype: the 2x rule's baseline.
        s = student.detach().clone().requires_grad_()
        loss = temperature**2 * torch.nn.functional.kl_div(
            torch.log_softmax(s / temperature, dim=1),
            torch.log_softmax(teacher / temperature, dim=1),
            reduction="none",
            log_target=True,
        ).sum(dim=1)
        (baseline,) = torch.autograd.grad(loss, s, grad_row.to(loss.dtype))
        assert_close_2x(grad, ref_grad, baseline, name="grad_student")
        assert_close(grad, ref_grad, name="grad_student")  # and within the dtype's default tolerance


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 3, 257])
@pytest.mark.parametrize("c", [1271, 7])
def test_matches_float64(n, c, dtype):
    student, teacher = logits(n, c, dtype)
    grad_row = torch.rand(n, device="cuda", dtype=stat_dtype(dtype)) + 0.1
    check(student, teacher, 4.0, grad_row)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 8.0])
def test_temperatures_and_large_vocab(temperature):
    """A vocabulary larger than one block's sweep (several column chunks in the backward)."""
    student, teacher = logits(4, 151_936 // 4 + 13, torch.float32)
    check(student, teacher, temperature, torch.full((4,), 0.37, device="cuda"))


def test_single_class_and_identical_rows():
    """C = 1 gives KL = 0 and zero gradient; student == teacher gives KL ≈ 0."""
    x = torch.randn(5, 1, device="cuda")
    row_loss, _, _ = fwd(x, 2 * x, 4.0)
    # T² · ((u_t − u_s) − u_t + u_s) in float32: a few ulps of |u| ≈ 1, times T² = 16.
    assert_close(row_loss, torch.zeros(5, device="cuda", dtype=torch.float64), atol=1e-5, name="row_loss")
    student, _ = logits(6, 1271, torch.float32)
    check(student, student.clone(), 4.0, torch.ones(6, device="cuda"))


def test_non_contiguous_inputs_and_expanded_grad_row():
    base_s, base_t = logits(1271, 9, torch.float32)
    student, teacher = base_s.t(), base_t.t()  # [9, 1271] transposed views
    assert not student.is_contiguous()
    check(student, teacher, 4.0, torch.tensor(0.37, device="cuda").expand(9))  # stride-0 grad, as after a mean


def test_teacher_minus_inf_classes():
    """Masked vocabulary: teacher logits of −inf have p = 0 and contribute nothing (0 · log 0 = 0)."""
    student, teacher = logits(3, 1271, torch.float32)
    teacher[:, 1000:] = float("-inf")
    row_loss, _, _ = fwd(student, teacher, 2.0)
    assert torch.isfinite(row_loss).all()
    check(student, teacher, 2.0, torch.ones(3, device="cuda"))


def test_empty_batch():
    student = torch.empty(0, 1271, device="cuda")
    row_loss, lse_s, lse_t = fwd(student, student, 4.0)
    assert row_loss.shape == (0,)
    assert bwd(row_loss, student, student, lse_s, lse_t, 4.0).shape == (0, 1271)


def test_bad_arguments_name_the_argument():
    s, t = logits(3, 10, torch.float32)
    with pytest.raises(RuntimeError, match="teacher must have shape"):
        fwd(s, t[:, :9], 4.0)
    with pytest.raises(RuntimeError, match="teacher must be on the same device as student"):
        fwd(s, t.cpu(), 4.0)
    with pytest.raises(RuntimeError, match="teacher must have the dtype of student"):
        fwd(s, t.double(), 4.0)
    with pytest.raises(RuntimeError, match="student must be a floating-point tensor"):
        fwd(s.long(), t.long(), 4.0)
    with pytest.raises(RuntimeError, match="student must be a 2-D tensor"):
        fwd(s[0], t[0], 4.0)
    with pytest.raises(RuntimeError, match="temperature must be a positive"):
        fwd(s, t, 0.0)
    row_loss, lse_s, lse_t = fwd(s, t, 4.0)
    with pytest.raises(RuntimeError, match="grad_row must have shape"):
        bwd(row_loss[:2], s, t, lse_s, lse_t, 4.0)


def test_opcheck_and_compile():
    student, teacher = logits(5, 1271, torch.float32)
    torch.library.opcheck(fwd, (student, teacher, 4.0))
    row_loss, lse_s, lse_t = fwd(student, teacher, 4.0)
    torch.library.opcheck(bwd, (torch.rand_like(row_loss), student, teacher, lse_s, lse_t, 4.0))

    def loss_and_grad(s, t):
        rl, ls, lt = fwd(s, t, 4.0)
        return rl.mean(), bwd(torch.full_like(rl, 1.0 / rl.shape[0]), s, t, ls, lt, 4.0)

    eager = loss_and_grad(student, teacher)
    compiled = torch.compile(loss_and_grad, fullgraph=True)(student, teacher)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_kd_loss_backend_cuda_matches_reference(dtype, teacher_grad):
    """The public kd_loss with backend="cuda" (the C++ kernel behind the op, with its adapters
    for ignore_mask and the teacher's gradient) against the float64 reference."""
    from kd_kernels import kd_loss
    from kd_kernels.reference.logit import kd_loss as kd_loss_ref
    from kd_kernels.testing import assert_matches_reference

    s = torch.randn(37, 301, device="cuda", dtype=dtype) * 3
    t = (torch.randn(37, 301, device="cuda", dtype=dtype) * 3).requires_grad_(teacher_grad)
    mask = torch.rand(37, device="cuda") < 0.3
    for reduction in ("batchmean", "sum", "none"):
        g = torch.rand(37, device="cuda", dtype=dtype) if reduction == "none" else torch.tensor(0.37, device="cuda")
        assert_matches_reference(
            lambda a, b, **kw: kd_loss(a, b, backend="cuda", **kw),
            kd_loss_ref,
            s,
            t,
            grad_output=g,
            reduction=reduction,
            ignore_mask=mask,
            temperature=2.5,
        )
