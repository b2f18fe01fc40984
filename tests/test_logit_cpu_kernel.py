"""The CPU C++ kernels of the divergence group (csrc/cpu/logit.cpp), which the "torch" backend runs
on CPU float32 logits when kd_kernels._C is built: values and gradients against the float64
reference and against the PyTorch code they replace (``kd_kernels.ops.logit.CPU_KERNELS = False``),
and proof that the route is taken. Skipped, with the reason, when the extension is not built."""

from __future__ import annotations

import pytest
import torch

import kd_kernels
from kd_kernels import _backend
from kd_kernels.ops import logit as logit_ops
from kd_kernels.reference import logit as ref
from kd_kernels.testing import assert_close, assert_close_2x

LOSSES = {
    "kd_loss": {"temperature": 3.0},
    "reverse_kl_loss": {"temperature": 1.5},
    "jsd_loss": {"beta": 0.3, "temperature": 2.0},
    "jsd_loss_b0": {"beta": 0.0, "temperature": 2.0},
    "jsd_loss_b1": {"beta": 1.0, "temperature": 0.7},
    "tvd_loss": {"temperature": 1.0},
}


def _ext():
    ext = _backend.load_extension()
    if ext is None or not hasattr(ext, "divergence_fwd_cpu"):
        pytest.skip("kd_kernels._C has no divergence_fwd_cpu (extension not built)")
    if not ext.divergence_cpu_supported():
        pytest.skip("this CPU lacks AVX2/FMA: the C++ divergence loops do not run here")
    return ext


def _fn(name):
    return getattr(kd_kernels, name.split("_loss")[0] + "_loss"), getattr(ref, name.split("_loss")[0] + "_loss")


def _inputs(n, c, seed, *, special=False, shifted=True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, c, generator=g) * 2
    t = torch.randn(n, c, generator=g) * 2
    if n > 2 and c > 2:
        if shifted:  # identical distributions up to a constant: 0 divergence (TVD's sign(q - p) is then rounding)
            t[1] = s[1] + 0.75
        s[2, 3] = s[2, 2]  # duplicated logits
    if special and c > 2:
        s[0, :2] = float("-inf")  # vocabulary masking: -inf at the same classes in both
        t[0, :2] = float("-inf")
    return s, t


def _run(fn, s, t, kw, mask=None, grad_out=None):
    s = s.clone().requires_grad_(True)
    loss = fn(s, t, reduction="none", ignore_mask=mask, **kw)
    go = torch.linspace(0.5, 1.7, loss.numel(), dtype=loss.dtype).reshape(loss.shape) if grad_out is None else grad_out
    loss.backward(go)
    return loss.detach(), s.grad


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("shape", [(5, 1), (6, 2), (33, 1000), (3, 32001)])
def test_matches_float64_reference(name, shape):
    _ext()
    fn, rfn = _fn(name)
    kw = LOSSES[name]
    # (-inf masking is compared with the PyTorch code below: the literal references give NaN there)
    s, t = _inputs(*shape, seed=shape[1], shifted=not name.startswith("tvd"))
    mask = torch.zeros(shape[0], dtype=torch.bool)
    mask[-1] = True
    got, got_g = _run(fn, s, t, kw, mask)
    want, want_g = _run(rfn, s.double(), t.double(), kw, mask)
    assert got.dtype == torch.float32
    assert_close(got, want, name=f"{name} value")
    assert_close(got_g, want_g, name=f"{name} grad")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_same_as_the_pytorch_code_it_replaces(name, monkeypatch):
    _ext()
    fn, _ = _fn(name)
    kw = LOSSES[name]
    s, t = _inputs(40, 257, seed=7, special=True, shifted=not name.startswith("tvd"))
    mask = torch.arange(40) % 5 == 0
    got, got_g = _run(fn, s, t, kw, mask)
    monkeypatch.setattr(logit_ops, "CPU_KERNELS", False)
    base, base_g = _run(fn, s, t, kw, mask)  # the PyTorch code in float32
    want, want_g = _run(fn, s.double(), t.double(), kw, mask)  # ... in float64 (-inf masking exact)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got_g.isnan(), want_g.isnan())
    # at most twice the float32 PyTorch code's own error, plus 1e-6 (values are O(1))
    assert_close_2x(got, want, base, name=f"{name} value")
    assert_close_2x(got_g, want_g, base_g, name=f"{name} grad")


@pytest.mark.parametrize("name", ["kd_loss", "jsd_loss", "tvd_loss", "reverse_kl_loss"])
def test_the_route_is_taken(name, monkeypatch):
    ext = _ext()
    calls = []
    real_fwd, real_bwd = ext.divergence_fwd_cpu, ext.divergence_bwd_cpu

    class Spy:
        def __getattr__(self, attr):
            return getattr(ext, attr)

        def divergence_fwd_cpu(self, *args):
            calls.append("fwd")
            return real_fwd(*args)

        def divergence_bwd_cpu(self, *args):
            calls.append("bwd")
            return real_bwd(*args)

    monkeypatch.setattr(_backend, "load_extension", lambda: Spy())
    fn, _ = _fn(name)
    _run(fn, *_inputs(4, 9, seed=1), LOSSES[name])
    assert calls == ["fwd", "bwd"]
    calls.clear()
    _run(fn, *(x.double() for x in _inputs(4, 9, seed=1)), LOSSES[name])
    assert calls == [], "float64 stays on the PyTorch code"


@pytest.mark.parametrize("name", ["kd_loss", "jsd_loss", "tvd_loss", "reverse_kl_loss"])
def test_non_finite_rows(name):
    _ext()
    fn, _ = _fn(name)
    s, t = _inputs(4, 12, seed=3)
    s[1, 4] = float("nan")
    t[2, 0] = float("inf")
    s[3, 5] = float("nan")
    mask = torch.tensor([False, False, False, True])  # a dropped row's NaN does not leak
    loss, grad = _run(fn, s, t, LOSSES[name], mask)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1]) and torch.isnan(loss[2]) and loss[3] == 0
    assert torch.isfinite(grad[0]).all() and torch.isnan(grad[1]).all() and torch.isnan(grad[2]).all()
    assert (grad[3] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["kd_loss", "jsd_loss", "tvd_loss", "reverse_kl_loss"])
def test_half_inputs_two_x_rule(name, dtype):
    _ext()
    fn, rfn = _fn(name)
    kw = LOSSES[name]
    s, t = _inputs(16, 300, seed=11)
    s, t = s.to(dtype), t.to(dtype)
    got, got_g = _run(fn, s, t, kw)
    want, want_g = _run(rfn, s.double(), t.double(), kw)
    base, base_g = _run(rfn, s, t, kw)
    assert got_g.dtype == dtype
    assert_close_2x(got, want, base, name=f"{name} value")
    assert_close_2x(got_g, want_g, base_g, name=f"{name} grad")


def test_teacher_gradient_and_large_rows_in_parallel():
    """A teacher that requires grad gets the PyTorch path's gradient; 2048 rows span several
    parallel tasks (at::parallel_for)."""
    _ext()
    s, t = _inputs(2048, 64, seed=5)
    s.requires_grad_(True)
    t.requires_grad_(True)
    kd_kernels.kd_loss(s, t, temperature=2.0).backward()
    s64, t64 = s.detach().double().requires_grad_(True), t.detach().double().requires_grad_(True)
    ref.kd_loss(s64, t64, temperature=2.0).backward()
    assert_close(s.grad, s64.grad, name="student grad")
    assert_close(t.grad, t64.grad, name="teacher grad")


def test_kernel_checks_its_arguments():
    ext = _ext()
    s = torch.randn(3, 4)
    keep = torch.ones(3, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="kind must be one of"):
        ext.divergence_fwd_cpu("kl", s, s, keep, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="student must be float32"):
        ext.divergence_fwd_cpu("kd", s.double(), s, keep, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="keep must be"):
        ext.divergence_fwd_cpu("kd", s, s, keep[:2], 1.0, 0.0)
    with pytest.raises(RuntimeError, match="temperature must be > 0"):
        ext.divergence_fwd_cpu("kd", s, s, keep, 0.0, 0.0)


def test_avx2_and_avx512_loops_agree(tmp_path):
    """Both instruction-set builds of the row loops (csrc/cpu/logit_rows.h) give the same values to
    float32 rounding: the AVX2 loops forced with KD_KERNELS_CPU_ISA=avx2 in a subprocess."""
    import os
    import subprocess
    import sys

    ext = _ext()
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch\n"
        "from kd_kernels import _backend\n"
        "ext = _backend.load_extension()\n"
        "g = torch.Generator().manual_seed(3)\n"
        "s, t = torch.randn(37, 1001, generator=g) * 2, torch.randn(37, 1001, generator=g) * 2\n"
        "keep = torch.ones(37, dtype=torch.bool)\n"
        "out = {'isa': ext.divergence_cpu_isa()}\n"
        "for kind in ('kd', 'reverse_kl', 'jsd', 'tvd'):\n"
        "    rows, ls, lt = ext.divergence_fwd_cpu(kind, s, t, keep, 1.5, 0.3)\n"
        "    out[kind] = (rows, ext.divergence_bwd_cpu(kind, torch.ones(37), s, t, ls, lt, keep, 1.5, 0.3))\n"
        "torch.save(out, sys.argv[1])\n"
    )
    results = {}
    for isa in ("default", "avx2"):
        env = dict(os.environ)
        env.pop("KD_KERNELS_CPU_ISA", None)
        if isa == "avx2":
            env["KD_KERNELS_CPU_ISA"] = "avx2"
        out = tmp_path / f"{isa}.pt"
        subprocess.run([sys.executable, str(script), str(out)], check=True, env=env)
        results[isa] = torch.load(out)
    assert results["avx2"]["isa"] == "avx2"
    assert results["default"]["isa"] == ext.divergence_cpu_isa()
    for kind in ("kd", "reverse_kl", "jsd", "tvd"):
        for a, b in zip(results["default"][kind], results["avx2"][kind], strict=True):
            assert_close(a, b, rtol=1e-5, atol=1e-7, name=f"{kind} avx2 vs {results['default']['isa']}")
