"""Contract of the CUDA C++ RKD functions of kd_kernels._C (csrc/cuda/, documented in
kd_kernels/ops/rkd.py): they exist when the extension is built, check their arguments, return
empty gradients for unneeded sides and outputs in the documented dtypes. Values against the
reference run in the backend matrix (tests/test_rkd.py, backend="cuda"). GPU tests skip with
"no CUDA device" or "kd_kernels._C not built: ..."."""

from __future__ import annotations

import pytest
import torch

from kd_kernels.testing import require_extension

NAMES = ("rkd_distance_fwd_cuda", "rkd_distance_bwd_cuda", "rkd_angle_fwd_cuda", "rkd_angle_bwd_cuda")


_ext = require_extension  # kd_kernels._C, or skip with the reason


def test_functions_exist_in_the_extension():
    ext = _ext()
    missing = [n for n in NAMES if not hasattr(ext, n)]
    assert not missing, f"kd_kernels._C lacks {missing}"


@pytest.fixture
def C():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return _ext()


def _features(n, dtype, ds=33, dt=20):
    return torch.randn(n, ds, device="cuda").to(dtype), torch.randn(n, dt, device="cuda").to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_output_dtypes_and_empty_grads(C, dtype, reduction):
    s, t = _features(9, dtype)
    loss, mu_s, mu_t = C.rkd_distance_fwd_cuda(s, t, reduction, "tf32x3")
    assert loss.dtype == dtype and loss.shape == ((9, 9) if reduction == "none" else ())
    assert mu_s.dtype == mu_t.dtype == torch.float32 and mu_s.shape == ()
    g = torch.ones_like(loss)
    gs, gt = C.rkd_distance_bwd_cuda(g, s, t, mu_s, mu_t, reduction, True, False, "tf32x3")
    assert gs.shape == s.shape and gs.dtype == dtype and gs.is_contiguous() and gt.numel() == 0
    a = C.rkd_angle_fwd_cuda(s, t, reduction, "tf32")
    assert a.dtype == dtype and a.shape == ((9,) if reduction == "none" else ())
    gs, gt = C.rkd_angle_bwd_cuda(torch.ones_like(a), s, t, reduction, False, True, "tf32")
    assert gs.numel() == 0 and gt.shape == t.shape and gt.dtype == dtype


@pytest.mark.gpu
def test_bad_arguments_raise_named_errors(C):
    s, t = _features(5, torch.float32)
    with pytest.raises(RuntimeError, match="reduction"):
        C.rkd_distance_fwd_cuda(s, t, "avg", "tf32x3")
    with pytest.raises(RuntimeError, match="precision"):
        C.rkd_angle_fwd_cuda(s, t, "mean", "ieee")
    with pytest.raises(RuntimeError, match="teacher"):
        C.rkd_angle_fwd_cuda(s, t[:4], "mean", "tf32x3")
    with pytest.raises(RuntimeError, match="student"):
        C.rkd_angle_fwd_cuda(s[0], t, "mean", "tf32x3")
    with pytest.raises(RuntimeError, match="N >= 2"):
        C.rkd_distance_fwd_cuda(s[:1], t[:1], "mean", "tf32x3")
    with pytest.raises(RuntimeError, match="grad"):
        C.rkd_angle_bwd_cuda(torch.ones(4, device="cuda"), s, t, "none", True, False, "tf32x3")
    with pytest.raises(RuntimeError, match="CUDA"):
        C.rkd_angle_fwd_cuda(s.cpu(), t.cpu(), "mean", "tf32x3")
    with pytest.raises(RuntimeError):
        C.rkd_distance_fwd_cuda(s.double(), t.double(), "mean", "tf32x3")  # float64 is the torch path's
