"""Shared benchmark harness (pytest-benchmark).

Each ``bench_<stem>.py`` builds a case (inputs + one callable per provider and mode) and
calls :func:`run_case`. The harness times the callable with pytest-benchmark, measures peak
memory once (CUDA: the allocator's peak; CPU: the process's peak RSS above the level before
the call, from /proc/self/status after resetting it through /proc/self/clear_refs), and
stores machine-readable facts in ``benchmark.extra_info`` (provider, mode, shapes, dtype,
device name, versions, git commit, peak MB, FLOPs and rate when given).

Providers every family offers: ``reference`` (eager upstream semantics), ``compile``
(``torch.compile(reference)``), ``torch`` (the kd_kernels PyTorch path), and on GPU
``triton`` / ``cuda`` when built. Modes: ``fwd``, ``bwd``, ``fwd_bwd``.

A provider whose predicted memory exceeds what the device has is skipped with the
predicted figure in the reason (never run into an OOM on purpose on the CPU machine).
"""

from __future__ import annotations

import functools
import gc
import os
import platform
import subprocess
from collections.abc import Callable

import torch

MODES = ("fwd", "bwd", "fwd_bwd")


@functools.lru_cache(None)
def git_commit() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(__file__), stderr=subprocess.DEVNULL, text=True
        ).strip()
    except Exception:  # noqa: BLE001  (no git, not a repository: record "unknown")
        return "unknown"


@functools.lru_cache(None)
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@functools.lru_cache(None)
def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU {cpu_model()} x{os.cpu_count()}"


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def available_memory_bytes(device: str) -> int:
    """Free memory a provider may use on ``device``."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


def _malloc_trim() -> None:
    """glibc's malloc_trim(0) where available: freed memory the heap keeps is returned to the OS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mb(fn: Callable[[], object], device: str) -> float:
    """Peak memory (MB) that one call of ``fn`` allocates above the level before it."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak / 2**20
    _malloc_trim()  # hand freed heap pages back, so that reused ones count again (order-independent)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    except OSError:
        return float("nan")
    base = _rss_kb("VmRSS")
    out = fn()
    peak = _rss_kb("VmHWM") - base
    del out
    return max(peak, 0) / 1024


def make_mode_fn(loss_fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor], mode: str) -> Callable[[], object]:
    """Wrap ``loss_fn`` (no-arg, returns a scalar loss) as the timed callable for ``mode``.

    ``bwd`` times only the backward: the forward runs untimed in pytest-benchmark's setup.
    Returns ``(fn, setup)``; ``setup`` is None except for ``bwd``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def clear():
        for t in inputs:
            t.grad = None

    if mode == "fwd":

        def fwd():
            with torch.no_grad():
                return loss_fn()

        return fwd, None
    if mode == "fwd_bwd":

        def fwd_bwd():
            clear()
            loss = loss_fn()
            loss.backward()
            return loss

        return fwd_bwd, None
    state = {}

    def setup():
        clear()
        state["loss"] = loss_fn()

    def bwd():
        state.pop("loss").backward()

    return bwd, setup


def run_case(
    benchmark,
    *,
    family: str,
    op: str,
    provider: str,
    mode: str,
    loss_fn: Callable[[], torch.Tensor],
    inputs: list[torch.Tensor],
    device: str,
    shape: dict,
    dtype: torch.dtype,
    flops: float | None = None,
    predicted_bytes: float | None = None,
    rounds: int | None = None,
) -> float:
    """Time one (op, provider, mode, shape) case and record its facts; return the peak MB.

    Args:
        benchmark: the pytest-benchmark fixture.
        loss_fn: no-arg callable returning the scalar loss (inputs captured).
        inputs: the leaf tensors that receive gradients (cleared between rounds).
        predicted_bytes: the provider's expected peak; the case is skipped when it exceeds
            80% of the free memory, with the figure in the reason.
        flops: useful floating-point work of one call in ``mode``, for the TFLOP/s column.
    """
    import pytest

    if predicted_bytes is not None and predicted_bytes > 0.8 * available_memory_bytes(device):
        pytest.skip(
            f"{provider} would need ~{predicted_bytes / 2**30:.1f} GiB on {device}, "
            f"more than 80% of the {available_memory_bytes(device) / 2**30:.1f} GiB free"
        )
    fn, setup = make_mode_fn(loss_fn, inputs, mode)
    # One untimed call first, so that one-off allocations (the inputs' .grad buffers, the
    # allocator's first growth, lazy imports) do not count as the provider's working memory.
    if setup is not None:
        setup()
    fn()
    if setup is not None:
        setup()
    peak = peak_memory_mb(fn, device)
    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)

    def timed():
        fn()
        sync()

    benchmark.extra_info.update(
        family=family,
        op=op,
        provider=provider,
        mode=mode,
        shape=shape,
        dtype=str(dtype).replace("torch.", ""),
        device=device_name(device),
        torch=torch.__version__,
        triton=_triton_version(),
        commit=git_commit(),
        peak_mb=round(peak, 2),
        flops=flops,
    )
    n = rounds or (3 if device == "cpu" else 20)
    if setup is None:
        benchmark.pedantic(timed, rounds=n, iterations=1, warmup_rounds=1)
    else:
        benchmark.pedantic(timed, setup=setup, rounds=n, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if flops and stats is not None:
        rate = flops / stats.stats.median / 1e12
        benchmark.extra_info["tflops"] = round(rate, 4)
        peak_tc = tensor_core_peak_tflops(device, dtype)
        if device.startswith("cuda"):
            benchmark.extra_info["precision_policy"] = tensor_core_policy(dtype)
        if peak_tc is not None:
            benchmark.extra_info["tc_peak_tflops"] = peak_tc
            benchmark.extra_info["pct_of_tc_peak"] = round(100.0 * rate / peak_tc, 2)
    return peak


# Dense tensor-core peaks (TFLOP/s, datasheet, no sparsity) per GPU family and operand type.
# 3xTF32 does three TF32 products per fp32 product, so its fp32-faithful ceiling is a third of
# TF32's. Used for the "% of tensor-core peak" column; unknown devices get no percentage.
_TC_PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "tf32": 495.0},
    "H200": {"bf16": 989.0, "tf32": 495.0},
    "A100": {"bf16": 312.0, "tf32": 156.0},
}


def tensor_core_policy(dtype: torch.dtype) -> str:
    """The precision policy a kernel uses for ``dtype`` (docs/precision.md), read now."""
    from kd_kernels._backend import fp32_dot_precision

    if dtype in (torch.float16, torch.bfloat16):
        return "bf16/fp16 tensor cores"
    if dtype == torch.float32:
        return fp32_dot_precision()
    return "float64 (torch path)"


def tensor_core_peak_tflops(device: str, dtype: torch.dtype) -> float | None:
    """The device's tensor-core peak for the policy in use with ``dtype``, or None (CPU, unknown GPU)."""
    if not device.startswith("cuda"):
        return None
    name = device_name(device)
    family = next((k for k in _TC_PEAK_TFLOPS if k in name), None)
    if family is None:
        return None
    policy = tensor_core_policy(dtype)
    if policy.startswith("bf16"):
        return _TC_PEAK_TFLOPS[family]["bf16"]
    if policy == "tf32":
        return _TC_PEAK_TFLOPS[family]["tf32"]
    if policy == "tf32x3":
        return _TC_PEAK_TFLOPS[family]["tf32"] / 3.0
    return None


def _triton_version():
    from kd_kernels._backend import triton_version

    return triton_version()
