"""Benchmarks of the logit losses: kd, reverse_kl, jsd, tvd, dist (vocabulary-sized rows) and
grkd (class-sized rows, O(C^2) pairs per row).

Providers: ``reference`` (eager upstream semantics), ``compile`` (``torch.compile`` of the
reference), ``torch`` (the kd_kernels PyTorch path). Modes: ``fwd``, ``fwd_bwd``.
Shapes (BENCHMARKS.md): GPU rows=8192, C=128256 in float32 and bfloat16 (grkd: rows=1024,
C=1000); CPU rows=256, C=32000 (grkd: rows=16, C=500), plus one larger CPU shape without
``--bench-quick``. On CPU the ``compile`` provider runs only without ``--bench-quick``
(inductor needs ~10-30 s per loss and mode there). Besides the harness's facts, each row
records ``gb_per_s``: the bytes a fused kernel must move (read both logits; fwd_bwd: read
them twice and write the gradients) over the median time, against the HBM roofline.

Run: ``pytest benchmarks/bench_logit.py [--bench-quick] [--bench-device cpu|cuda]``.
"""

from __future__ import annotations

import pytest
import torch
from harness import run_case

from kd_kernels import functional as KF
from kd_kernels.reference import logit as ref

LOSSES = ("kd_loss", "reverse_kl_loss", "jsd_loss", "tvd_loss", "dist_loss", "grkd_loss")
PROVIDERS = ("reference", "compile", "torch")
MODES = ("fwd", "fwd_bwd")
_compiled: dict[str, object] = {}


def _shapes(name: str, device: str, quick: bool) -> list[tuple[int, int, torch.dtype]]:
    if name == "grkd_loss":
        if device == "cpu":
            shapes = [(16, 500, torch.float32), (64, 1000, torch.float32)]
        else:
            shapes = [(1024, 1000, torch.float32), (1024, 1000, torch.bfloat16)]
    elif device == "cpu":
        shapes = [(256, 32000, torch.float32), (1024, 32000, torch.float32)]
    else:
        shapes = [(8192, 128256, torch.float32), (8192, 128256, torch.bfloat16)]
    return shapes[:1] if quick else shapes


def _predicted_bytes(name: str, provider: str, n: int, c: int) -> float:
    """Rough peak of one fwd+bwd call (fp32 temporaries), to skip what cannot fit."""
    if name == "grkd_loss":
        per = n * c * c * 4
        return {"reference": 5 * per, "compile": 2 * per, "torch": 2**28 + 4 * n * c * 4}[provider]
    per = n * c * 4
    return {"reference": 10 * per, "compile": 5 * per, "torch": 3 * per + 8 * 2**27}[provider]


def _provider_fn(name: str, provider: str):
    if provider == "torch":
        return getattr(KF, name)
    if provider == "reference":
        return getattr(ref, name)
    if name not in _compiled:
        _compiled[name] = torch.compile(getattr(ref, name))
    return _compiled[name]


@pytest.mark.parametrize("shape_idx", [0, 1])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", LOSSES)
def test_logit(benchmark, bench_device, bench_quick, name, provider, mode, shape_idx):
    shapes = _shapes(name, bench_device, bench_quick)
    if shape_idx >= len(shapes):
        pytest.skip("--bench-quick runs only the smallest shape")
    if provider == "compile" and bench_device == "cpu" and bench_quick:
        pytest.skip("torch.compile(reference) takes ~10-30 s to build on CPU; runs without --bench-quick")
    n, c, dtype = shapes[shape_idx]
    fn = _provider_fn(name, provider)
    gen = torch.Generator(device=bench_device).manual_seed(0)
    student = torch.randn(n, c, device=bench_device, generator=gen).to(dtype).requires_grad_(True)
    teacher = torch.randn(n, c, device=bench_device, generator=gen).to(dtype)
    run_case(
        benchmark,
        family="logit",
        op=name,
        provider=provider,
        mode=mode,
        loss_fn=lambda: fn(student, teacher),
        inputs=[student],
        device=bench_device,
        shape={"rows": n, "C": c},
        dtype=dtype,
        predicted_bytes=_predicted_bytes(name, provider, n, c),
        rounds=1 if bench_quick and bench_device == "cpu" else None,  # quick CPU runs only prove it works
    )
    if benchmark.stats is not None:  # None under --benchmark-disable
        moved = 2 * n * c * student.element_size() * (1 if mode == "fwd" else 3)
        benchmark.extra_info["gb_per_s"] = round(moved / benchmark.stats.stats.median / 1e9, 2)
