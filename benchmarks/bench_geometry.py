"""Benchmarks of the feature-geometry losses: gram, procrustes, cka, relation.

Providers: ``reference`` (kd_kernels/reference/geometry.py: N x N Gram matrices, autograd),
``compile`` (torch.compile of the reference; GPU only: on the 2-core CPU machine its inductor
compile of every case costs far more than the run it would time), ``torch`` (the kd_kernels
PyTorch path: D x D form here since N > D, hand-written backward). Modes: fwd, bwd, fwd_bwd;
the teacher is detached, as in distillation.

Shapes: token features. CPU (float32): N=512/D=64 (``--bench-quick``) and N=4096/D=256.
GPU (bfloat16): N=4096/D=1024 (``--bench-quick``) and BENCHMARKS.md's N=32768/D=4096.
FLOPs count the D x D-form GEMMs (the useful work), the same figure for every provider.

    pytest benchmarks/bench_geometry.py --bench-quick --benchmark-disable -q
"""

from __future__ import annotations

import pytest
import torch
from harness import run_case

import kd_kernels
from kd_kernels.reference import geometry as reference

SHAPES = {
    "cpu": [(512, 64, 96), (4096, 256, 256)],  # (N, Ds, Dt)
    "cuda": [(4096, 1024, 1024), (32768, 4096, 4096)],
}
OPS = {
    "gram": (kd_kernels.gram_loss, reference.gram_loss),
    "procrustes": (kd_kernels.procrustes_loss, reference.procrustes_loss),
    "cka": (kd_kernels.cka_loss, reference.cka_loss),
    "relation": (kd_kernels.relation_loss, reference.relation_loss),
}


def _flops(op: str, mode: str, n: int, ds: int, dt: int) -> float:
    """GEMM FLOPs of the D x D form: forward products, then the student-gradient GEMMs."""
    if op == "procrustes":
        fwd, bwd = 2 * n * ds * dt, 2 * n * ds * dt
    else:
        fwd, bwd = 2 * n * (ds * ds + ds * dt + dt * dt), 2 * n * ds * (ds + dt)
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def _predicted_bytes(op: str, provider: str, n: int, ds: int, dt: int, elem: int) -> float:
    """Rough peak: the reference holds ~8 N x N matrices (Gram, centred, autograd saves)."""
    inputs = 4 * n * (ds + dt) * 4  # fp32 copies of the features and their gradients
    if provider == "torch" or op == "procrustes":
        return inputs + 4 * (ds + dt) ** 2 * 4
    return inputs + 8 * n * n * elem


@pytest.mark.parametrize("size", [0, 1], ids=["small", "large"])
@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", ["reference", "compile", "torch"])
@pytest.mark.parametrize("op", list(OPS))
def test_geometry(benchmark, bench_device, bench_quick, op, provider, mode, size):
    if bench_quick and size > 0:
        pytest.skip("--bench-quick runs only the smallest shape")
    if provider == "compile" and bench_device == "cpu":
        pytest.skip("torch.compile(reference) is GPU-only here: its CPU compile time dwarfs the run")
    device = "cuda" if bench_device.startswith("cuda") else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n, ds, dt = SHAPES[device][size]
    ours, ref = OPS[op]
    student = torch.randn(n, ds, device=device, dtype=dtype, requires_grad=True)
    teacher = torch.randn(n, dt, device=device, dtype=dtype)
    fn = {"reference": ref, "compile": torch.compile(ref), "torch": ours}[provider]
    run_case(
        benchmark,
        family="geometry",
        op=op,
        provider=provider,
        mode=mode,
        loss_fn=lambda: fn(student, teacher),
        inputs=[student],
        device=device,
        shape={"N": n, "Ds": ds, "Dt": dt},
        dtype=dtype,
        flops=_flops(op, mode, n, ds, dt),
        predicted_bytes=_predicted_bytes(op, provider, n, ds, dt, dtype.itemsize),
    )
