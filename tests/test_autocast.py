"""Autocast (README "Autocast"): every public loss works inside a ``torch.autocast`` region, and
autocast never reaches into its ops: fp32 inputs give the fp32 value and gradient, low-precision
inputs give what they give outside the region, with the backward inside or outside it."""

from __future__ import annotations

import pytest
import torch
from test_api import API, sample_inputs

import kd_kernels.functional as KF
from kd_kernels.testing import assert_close

CUDA_REASON = "needs a CUDA GPU (torch.cuda.is_available() is False)"


def _value_and_grads(fn, inputs, region=None, backward_inside=False):
    """Loss value and the gradients of every input, with the forward (and optionally the
    backward) inside ``region`` (a context manager factory) when given."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    ctx = region() if region is not None else torch.autocast("cpu", enabled=False)
    with ctx:
        out = fn(*leaves)
        # a grad_output that is not all ones: the scaling must reach every gradient
        weight = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
        if backward_inside:
            grads = torch.autograd.grad((out * weight).sum(), leaves, allow_unused=True)
    if not backward_inside:
        grads = torch.autograd.grad((out * weight).sum(), leaves, allow_unused=True)
    return out.detach(), grads


@pytest.mark.parametrize("backward_inside", [False, True], ids=["bwd_outside", "bwd_inside"])
@pytest.mark.parametrize("fn_name", sorted(API))
def test_cpu_bf16_autocast_keeps_fp32(fn_name, backward_inside):
    """fp32 inputs under CPU bf16 autocast: the fp32 value and gradients (no silent bf16 GEMMs)."""
    fn = getattr(KF, fn_name)
    torch.manual_seed(0)
    inputs = sample_inputs(fn_name)
    ref, ref_g = _value_and_grads(fn, inputs)
    out, g = _value_and_grads(
        fn, inputs, lambda: torch.autocast("cpu", dtype=torch.bfloat16), backward_inside=backward_inside
    )
    assert out.dtype == ref.dtype == torch.float32, (out.dtype, ref.dtype)
    assert_close(out, ref, rtol=1e-6, atol=1e-7, name=f"{fn_name} value under autocast")
    for i, (a, b) in enumerate(zip(g, ref_g, strict=True)):
        assert (a is None) == (b is None), i  # a loss that detaches its teacher gives it no gradient
        if a is None:
            continue
        assert a.dtype == b.dtype, (i, a.dtype, b.dtype)
        assert_close(a, b, rtol=1e-6, atol=1e-7, name=f"{fn_name} grad[{i}] under autocast")


@pytest.mark.parametrize("fn_name", sorted(API))
def test_cpu_autocast_low_precision_inputs_unchanged(fn_name):
    """bf16 inputs: the same value and gradients inside a CPU autocast region as outside it."""
    fn = getattr(KF, fn_name)
    torch.manual_seed(1)
    inputs = [x.to(torch.bfloat16) for x in sample_inputs(fn_name)]
    ref, ref_g = _value_and_grads(fn, inputs)
    out, g = _value_and_grads(fn, inputs, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert out.dtype == ref.dtype
    assert_close(out.float(), ref.float(), rtol=0, atol=0, name=f"{fn_name} bf16 value under autocast")
    for a, b in zip(g, ref_g, strict=True):
        assert (a is None) == (b is None)
        if a is None:
            continue
        assert a.dtype == b.dtype == torch.bfloat16
        assert_close(a.float(), b.float(), rtol=0, atol=0, name=f"{fn_name} bf16 grad under autocast")


def test_student_from_an_autocast_layer():
    """The usual training step: the student's features come out of a bf16 autocast layer, the
    teacher's are fp32; the loss runs and its gradient reaches the layer's fp32 weights."""
    torch.manual_seed(2)
    layer = torch.nn.Linear(6, 5)
    x = torch.randn(8, 6)
    teacher = torch.randn(8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student = layer(x)
        assert student.dtype == torch.bfloat16
        loss = KF.rkd_loss(student, teacher) + KF.cka_loss(student, teacher) + KF.relation_loss(student, teacher)
    loss.backward()
    assert torch.isfinite(loss)
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fn_name", sorted(API))
def test_cuda_autocast_keeps_fp32(fn_name, dtype):
    """fp32 CUDA inputs under CUDA fp16/bf16 autocast: the fp32 value and gradients."""
    fn = getattr(KF, fn_name)
    torch.manual_seed(0)
    inputs = [x.cuda() for x in sample_inputs(fn_name)]
    ref, ref_g = _value_and_grads(fn, inputs)
    out, g = _value_and_grads(fn, inputs, lambda: torch.autocast("cuda", dtype=dtype))
    assert out.dtype == torch.float32
    assert_close(out, ref, rtol=1e-5, atol=1e-6, name=f"{fn_name} value under CUDA autocast")
    for a, b in zip(g, ref_g, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b, rtol=1e-5, atol=1e-6, name=f"{fn_name} grad under CUDA autocast")
