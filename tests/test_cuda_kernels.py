"""Contract of the CUDA C++ Hinton-KD functions of kd_kernels._C (csrc/cuda/logit.cu, documented
in kd_kernels/ops/logit.py): they exist when the extension is built, check their arguments and
return outputs in the documented dtypes and shapes. Values against the reference run in the
backend matrix (tests/test_logit.py, backend="cuda"); the op wiring with an emulated kernel is in
tests/test_ops.py. GPU tests skip with "no CUDA device" or "kd_kernels._C not built: ..."."""

from __future__ import annotations

import pytest
import torch

from kd_kernels.testing import require_extension

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
