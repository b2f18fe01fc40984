"""Benchmarks of the RKD family (``rkd_distance_loss``, ``rkd_angle_loss``) on
benchmarks/harness.py, plus the two memory targets of the PyTorch path.

Providers: ``reference`` (eager upstream semantics), ``compile`` (``torch.compile`` of the
reference; GPU only: inductor takes 10-15 s per case on the CPU machines), ``torch`` (the
kd_kernels PyTorch path), ``triton`` and ``cuda`` (the fused kernels; GPU only). Modes: fwd,
bwd, fwd_bwd. Dtypes: float32 (and bfloat16 on GPU), student ``[N, D]``, teacher ``[N, D]``.
On the GPU the shapes sweep N at D=512, D over {128, 512, 2048}, and the BENCHMARKS.md targets;
``benchmarks/report.py`` turns the JSON into tables and time/memory-vs-N plots.

Memory cases (torch path only, fwd_bwd, one timed round; skipped by --bench-quick because they
take minutes on the CPU machines): ``test_rkd_angle_memory`` (N=1024, D=2048, peak < 2048 MB;
the reference needs ~40 GB) and ``test_rkd_distance_memory`` (N=16384, D=512, peak < 1536 MB;
one N x N fp32 matrix is 1 GiB). The peak is the harness's: CUDA allocator peak, or the CPU
process's peak RSS above the level before the call.

    pytest benchmarks/bench_rkd.py --bench-quick --benchmark-disable -q        # smoke run
    pytest benchmarks/bench_rkd.py -k memory -s                               # memory targets
    pytest benchmarks/bench_rkd.py --benchmark-json benchmarks/results/rkd.json
"""

from __future__ import annotations

import pytest
import torch
from harness import run_case

from kd_kernels import available_backends, build_info
from kd_kernels.losses.rkd import rkd_angle_loss, rkd_distance_loss
from kd_kernels.reference import rkd as reference
from kd_kernels.torch_impl import rkd as torch_impl

PROVIDERS = ("reference", "compile", "torch", "triton", "cuda")
MODES = ("fwd", "bwd", "fwd_bwd")
DTYPES = ("float32", "bfloat16")

# (N, D): small CPU shapes; on CUDA an N sweep at D=512 plus the D range and the
# BENCHMARKS.md targets (distance N=4096, D=2048 and N=65536, D=1024; angle N=1024, D=2048,
# N=4096). Providers that would not fit skip themselves with the predicted figure.
DISTANCE_SHAPES = {
    "cpu": [(256, 128), (1024, 512)],
    "cuda": [(n, 512) for n in (128, 512, 1024, 2048, 4096, 8192, 16384)] + [(4096, 128), (4096, 2048), (65536, 1024)],
}
ANGLE_SHAPES = {
    "cpu": [(32, 64), (128, 256)],
    "cuda": [(n, 512) for n in (128, 256, 512, 1024, 2048, 4096)] + [(1024, 128), (1024, 2048)],
}
ANGLE_MEMORY = (1024, 2048, 2048)  # N, D, peak limit in MB
DISTANCE_MEMORY = (16384, 512, 1536)


def _select(shapes: dict, idx: int, bench_device: str, bench_quick: bool, provider: str, dtype: str):
    kind = "cuda" if bench_device.startswith("cuda") else "cpu"
    if idx >= len(shapes[kind]):
        pytest.skip(f"{kind} has {len(shapes[kind])} shapes")
    if bench_quick and idx > 0:
        pytest.skip("--bench-quick runs only the smallest shape")
    if provider == "compile" and kind == "cpu":
        pytest.skip("torch.compile(reference) takes 10-15 s per case to compile on CPU; GPU only")
    if provider in ("triton", "cuda") and kind == "cpu":
        pytest.skip(f"{provider} kernels are timed on a GPU only (the Triton interpreter's timings mean nothing)")
    if dtype != "float32" and kind == "cpu":
        pytest.skip("low-precision cases are GPU only")
    if provider in ("triton", "cuda") and provider not in available_backends(bench_device):
        pytest.skip(f"backend {provider!r} is not available here: {build_info()['extension_error']}")
    return shapes[kind][idx]


def _provider_fn(provider: str, ours, ref):
    if provider in ("torch", "triton", "cuda"):
        return lambda s, t: ours(s, t, backend=provider)
    if provider == "reference":
        return ref
    return torch.compile(ref)


def _inputs(n: int, d: int, device: str, dtype: str = "float32"):
    s = torch.randn(n, d, device=device, dtype=getattr(torch, dtype), requires_grad=True)
    t = torch.randn(n, d, device=device, dtype=getattr(torch, dtype))
    return s, t


def _scale_flops(fwd: float, bwd: float, mode: str) -> float:
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def _distance_case(benchmark, provider, mode, n, d, device, rounds=None, dtype="float32"):
    s, t = _inputs(n, d, device, dtype)
    fn = _provider_fn(provider, rkd_distance_loss, reference.rkd_distance_loss)
    if provider in ("triton", "cuda"):
        predicted = 8 * n * d * 4  # O(N D): inputs, centred copies, gradients; no N x N buffer
    elif provider == "torch":
        # ~12 live [rows, N] fp32 blocks plus inputs, centred copies and gradient accumulators
        predicted = 12 * torch_impl._DIST_BLOCK_ELEMS * 4 + 8 * n * d * 4
    else:
        predicted = 10 * n * n * 4  # Gram, distances, clones, normalized, smooth-L1 terms, autograd saves
    # one Gram per network per pass (2 forward passes, 1 backward pass) + the backward's A @ X
    flops = _scale_flops(2 * 2 * (2 * n * n * d), 2 * (2 * n * n * d) + 2 * (2 * n * n * d), mode)
    run_case(
        benchmark,
        family="rkd",
        op="rkd_distance",
        provider=provider,
        mode=mode,
        loss_fn=lambda: fn(s, t),
        inputs=[s],
        device=device,
        shape={"N": n, "Ds": d, "Dt": d},
        dtype=getattr(torch, dtype),
        flops=flops,
        predicted_bytes=predicted,
        rounds=rounds,
    )


def _angle_case(benchmark, provider, mode, n, d, device, rounds=None, dtype="float32"):
    s, t = _inputs(n, d, device, dtype)
    fn = _provider_fn(provider, rkd_angle_loss, reference.rkd_angle_loss)
    if provider in ("triton", "cuda"):
        predicted = 6 * n * n * 4 + 8 * n * d * 4  # a few N x N fp32 buffers (E, R, dL/dE, S)
    elif provider == "torch":
        # G, W and masks (N x N each) plus ~6 live [chunk, N, N] fp32 buffers
        predicted = 8 * n * n * 4 + 6 * max(torch_impl._ANGLE_CHUNK_ELEMS, n * n) * 4
    else:
        # per network: N x N x D differences and normalized copy, N^3 angles; autograd saves
        predicted = (5 * n * n * d + 5 * n**3) * 4
    # Gram per network + ~12 flops per triple per network (forward); backward ~2x and A @ X
    fwd = 2 * (2 * n * n * d) + 24 * n**3
    flops = _scale_flops(fwd, 2 * fwd + 2 * n * n * d, mode)
    run_case(
        benchmark,
        family="rkd",
        op="rkd_angle",
        provider=provider,
        mode=mode,
        loss_fn=lambda: fn(s, t),
        inputs=[s],
        device=device,
        shape={"N": n, "Ds": d, "Dt": d},
        dtype=getattr(torch, dtype),
        flops=flops,
        predicted_bytes=predicted,
        rounds=rounds,
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("idx", range(len(DISTANCE_SHAPES["cuda"])))
@pytest.mark.parametrize("dtype", DTYPES)
def test_rkd_distance(benchmark, bench_device, bench_quick, dtype, idx, provider, mode):
    n, d = _select(DISTANCE_SHAPES, idx, bench_device, bench_quick, provider, dtype)
    _distance_case(benchmark, provider, mode, n, d, bench_device, dtype=dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("idx", range(len(ANGLE_SHAPES["cuda"])))
@pytest.mark.parametrize("dtype", DTYPES)
def test_rkd_angle(benchmark, bench_device, bench_quick, dtype, idx, provider, mode):
    n, d = _select(ANGLE_SHAPES, idx, bench_device, bench_quick, provider, dtype)
    _angle_case(benchmark, provider, mode, n, d, bench_device, dtype=dtype)


def _memory_case(case, benchmark, bench_device, bench_quick, shape):
    if bench_quick:
        pytest.skip("memory target case: minutes on CPU, not part of --bench-quick")
    n, d, limit_mb = shape
    case(benchmark, "torch", "fwd_bwd", n, d, bench_device, rounds=1)
    peak = benchmark.extra_info["peak_mb"]
    print(f"\n{case.__name__[1:-5]} N={n} D={d} fwd_bwd on {bench_device}: peak {peak:.0f} MB (limit {limit_mb} MB)")
    assert peak < limit_mb, f"peak {peak:.0f} MB >= {limit_mb} MB"


def test_rkd_angle_memory(benchmark, bench_device, bench_quick):
    _memory_case(_angle_case, benchmark, bench_device, bench_quick, ANGLE_MEMORY)


def test_rkd_distance_memory(benchmark, bench_device, bench_quick):
    _memory_case(_distance_case, benchmark, bench_device, bench_quick, DISTANCE_MEMORY)
