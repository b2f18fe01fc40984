"""Benchmarks of the optimal-transport family: SinKD (``sinkhorn_loss``) and batched
log-domain Sinkhorn (``sinkhorn``), on benchmarks/harness.py.

Providers: ``reference`` (eager upstream semantics), ``compile`` (``torch.compile`` of the
reference; GPU only: on the CPU machines inductor takes 30 s or more to compile the unrolled
loops, longer than the whole quick run), ``torch`` (the kd_kernels "torch" backend: on CPU the
fused C++ forward ``kd_kernels._C.sinkhorn_fwd_cpu`` when built), and for ``sinkhorn`` only
``pot`` (POT's ``ot.sinkhorn(..., method="sinkhorn_log", stopThr=0)`` with torch tensors, looped
over the batch, forward only; skipped with the reason when POT is not installed). The full CPU
comparison against POT is benchmarks/bench_sinkhorn_pot.py.
Modes: fwd, bwd, fwd_bwd. The scalar timed for ``sinkhorn`` is the transport cost
``sum(plan * cost)``, the same extra reduction for every provider.

    pytest benchmarks/bench_sinkhorn.py --bench-quick --benchmark-disable -q   # smoke run
    pytest benchmarks/bench_sinkhorn.py --benchmark-json benchmarks/results/sinkhorn.json
"""

from __future__ import annotations

import pytest
import torch
from harness import run_case

from kd_kernels.losses.sinkhorn import sinkhorn, sinkhorn_loss
from kd_kernels.reference import sinkhorn as reference
from kd_kernels.torch_impl import sinkhorn as torch_impl

PROVIDERS = ("reference", "compile", "torch")
OT_PROVIDERS = PROVIDERS + ("pot",)
MODES = ("fwd", "bwd", "fwd_bwd")
SINKD_ITERS = 20  # the SinKD default (docs/sinkhorn.md §1)
OT_ITERS = {"cpu": 20, "cuda": 50}  # 50: the BENCHMARKS.md target; 20 keeps the CPU run to seconds

# SinKD (B, C): the GLUE setting first (smallest), then a larger batch and a vocabulary-sized C.
SINKD_SHAPES = {"cpu": [(32, 3), (512, 3), (64, 4096)], "cuda": [(32, 3), (1024, 3), (256, 32000)]}
# Sinkhorn (B, n, m): BENCHMARKS.md's CPU quick shape and its H100 target.
OT_SHAPES = {"cpu": [(8, 200, 200), (32, 300, 300)], "cuda": [(8, 200, 200), (256, 1000, 1000)]}


def _device_kind(bench_device: str) -> str:
    return "cuda" if bench_device.startswith("cuda") else "cpu"


def _select(shapes: dict, idx: int, bench_device: str, bench_quick: bool, provider: str):
    kind = _device_kind(bench_device)
    if idx >= len(shapes[kind]):
        pytest.skip(f"no shape #{idx} on {kind}")
    if bench_quick and idx > 0:
        pytest.skip("--bench-quick runs only the smallest shape")
    if provider == "compile" and kind == "cpu":
        pytest.skip("torch.compile(reference) takes 30 s+ to compile on CPU; GPU only")
    return shapes[kind][idx]


def _provider_fn(provider: str, ours, ref):
    if provider == "torch":
        return ours
    if provider == "reference":
        return ref
    return torch.compile(ref)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("idx", range(3))
def test_sinkhorn_loss(benchmark, bench_device, bench_quick, idx, provider, mode):
    b, c = _select(SINKD_SHAPES, idx, bench_device, bench_quick, provider)
    dtype = torch.float32
    s = torch.randn(b, c, device=bench_device, dtype=dtype, requires_grad=True)
    t = torch.randn(b, c, device=bench_device, dtype=dtype)
    fn = _provider_fn(provider, sinkhorn_loss, reference.sinkhorn_loss)
    esz = s.element_size()
    if provider == "torch":
        # the [rows, B, classes] tiles, D and K and a few B x B backward buffers
        predicted = 3 * min(torch_impl.TILE_ELEMS, b * b * c) * esz + 8 * b * b * esz
    else:
        # autograd keeps 2 B x B iterates per normalisation round; the cdist backward may
        # build a B x B x C buffer (it does on CUDA)
        predicted = (4 * SINKD_ITERS + 4) * b * b * esz + (b * b * c * esz if mode != "fwd" else 0)
    # cdist: 3 B^2 C (sub, abs, add); iterations: 4 B^2 per round; backward ~2x both
    flops = 3 * b * b * c + 4 * SINKD_ITERS * b * b
    flops = flops * (3 if mode == "fwd_bwd" else 2 if mode == "bwd" else 1)
    run_case(
        benchmark,
        family="sinkhorn",
        op="sinkhorn_loss",
        provider=provider,
        mode=mode,
        loss_fn=lambda: fn(s, t),
        inputs=[s],
        device=bench_device,
        shape={"B": b, "C": c, "n_iters": SINKD_ITERS},
        dtype=dtype,
        flops=flops,
        predicted_bytes=predicted,
    )


def _pot_sinkhorn(iters: int):
    """POT's log-domain Sinkhorn looped over the batch, on the transposed problem (POT updates the
    column potential first), so that it runs the same iteration as kd_kernels.sinkhorn."""
    try:
        import ot
    except ImportError:
        pytest.skip("POT is not installed (pip install pot): provider 'pot' skipped")
    import warnings

    def solve(cost, *, epsilon, n_iters):
        nb, n, m = cost.shape
        a = torch.full((n,), 1.0 / n, dtype=cost.dtype, device=cost.device)
        b = torch.full((m,), 1.0 / m, dtype=cost.dtype, device=cost.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "did not converge": a fixed iteration count is the point
            return torch.stack(
                [
                    ot.sinkhorn(b, a, cost[i].T, epsilon, method="sinkhorn_log", numItermax=n_iters, stopThr=0).T
                    for i in range(nb)
                ]
            )

    return solve


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", OT_PROVIDERS)
@pytest.mark.parametrize("idx", range(2))
def test_sinkhorn(benchmark, bench_device, bench_quick, idx, provider, mode):
    nb, n, m = _select(OT_SHAPES, idx, bench_device, bench_quick, provider)
    iters = OT_ITERS[_device_kind(bench_device)]
    if provider == "pot" and mode != "fwd":
        pytest.skip("provider 'pot' is timed forward only (its backward is autograd through POT's loop)")
    dtype = torch.float32
    x = torch.randn(nb, n, 2, device=bench_device, dtype=dtype)
    y = torch.randn(nb, m, 2, device=bench_device, dtype=dtype)
    cost = torch.cdist(x, y).pow_(2).requires_grad_(True)
    solve = _pot_sinkhorn(iters) if provider == "pot" else _provider_fn(provider, sinkhorn, reference.sinkhorn)
    numel = nb * n * m
    esz = cost.element_size()
    if provider == "torch":
        predicted = 6 * numel * esz  # M, one LSE temporary, the plan; backward: M, dM, Q
    else:
        predicted = (3 if mode == "fwd" else 2 * iters + 4) * numel * esz  # one saved LSE input per half-step
    # per half-step LSE: add, max, sub, exp, sum = 5 flops per element; backward ~7 per element
    flops = 2 * iters * numel * (5 + (7 if mode != "fwd" else 0) - (5 if mode == "bwd" else 0))
    run_case(
        benchmark,
        family="sinkhorn",
        op="sinkhorn",
        provider=provider,
        mode=mode,
        loss_fn=lambda: (solve(cost, epsilon=0.1, n_iters=iters) * cost).sum(),
        inputs=[cost],
        device=bench_device,
        shape={"B": nb, "n": n, "m": m, "n_iters": iters},
        dtype=dtype,
        flops=flops,
        predicted_bytes=predicted,
    )
