"""CPU speed of the PyTorch path against the library's own literal references (issue 9, item 6).

For every public loss at 2-3 typical CPU shapes, times ``kd_kernels.<loss>(..., backend="torch")``
against ``kd_kernels.reference.<family>.<loss>`` (plain autograd), fp32, forward + backward
(the student requires grad, the teacher does not; ``sinkhorn`` differentiates the cost), with
``torch.set_num_threads(2)``. Each timing is the minimum over ``--repeats`` runs after one
warm-up, reference and torch runs alternated (the machine is shared: the minimum is the least disturbed run). Writes a markdown
table (loss, shape, reference ms, torch ms, speedup = reference / torch) with a header giving
the CPU model, torch version, thread count, date and git commit.

Usage::

    python benchmarks/bench_cpu_vs_reference.py [--quick] [--repeats 5] [--threads 2]
        [--retries 2] [--out benchmarks/results/cpu_vs_reference.md] [--angle-1024]

``--quick`` runs one shape per loss with 3 repeats (a smoke run); ``--angle-1024`` adds
rkd_angle_loss at N=1024, D=64 (torch path only, one run: the reference needs N x N x N).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import cpu_model, peak_memory_mb

import kd_kernels
from kd_kernels.reference import geometry as ref_geo
from kd_kernels.reference import logit as ref_logit
from kd_kernels.reference import rkd as ref_rkd
from kd_kernels.reference import sinkhorn as ref_sink

Case = tuple[str, str, Callable[[], tuple], Callable, Callable]


def _feat(n: int, ds: int, dt: int):
    def make():
        g = torch.Generator().manual_seed(0)
        return torch.randn(n, ds, generator=g), torch.randn(n, dt, generator=g)

    return make


def _logits(n: int, c: int, scale: float = 3.0):
    def make():
        g = torch.Generator().manual_seed(0)
        return scale * torch.randn(n, c, generator=g), scale * torch.randn(n, c, generator=g)

    return make


def _cost(b: int, n: int, m: int):
    def make():
        g = torch.Generator().manual_seed(0)
        return (torch.rand(b, n, m, generator=g),)

    return make


def _wrap(fn: Callable, **kw) -> Callable:
    return lambda *xs: fn(*xs, **kw)


def _torch(name: str, **kw) -> Callable:
    return _wrap(getattr(kd_kernels, name), backend="torch", **kw)


def cases(quick: bool) -> list[Case]:
    """(loss, shape label, input factory, reference callable, torch callable)."""
    out: list[Case] = []

    def add(loss, shapes, ref, tor):
        for label, make in shapes[:1] if quick else shapes:
            out.append((loss, label, make, ref, tor))

    feat = lambda n, ds, dt: (f"N={n}, Ds={ds}, Dt={dt}", _feat(n, ds, dt))
    add(
        "rkd_distance_loss",
        [feat(256, 128, 256), feat(1024, 128, 256), feat(2048, 128, 256)],
        ref_rkd.rkd_distance_loss,
        _torch("rkd_distance_loss"),
    )
    add("rkd_angle_loss", [feat(256, 64, 64), feat(512, 64, 64)], ref_rkd.rkd_angle_loss, _torch("rkd_angle_loss"))
    add("rkd_loss", [feat(128, 64, 64), feat(256, 64, 64)], ref_rkd.rkd_loss, _torch("rkd_loss"))
    geo = [feat(256, 128, 256), feat(1024, 256, 512), feat(4096, 256, 256)]
    add("gram_loss", geo, ref_geo.gram_loss, _torch("gram_loss"))
    add("cka_loss", geo, ref_geo.cka_loss, _torch("cka_loss"))
    add("relation_loss", geo, ref_geo.relation_loss, _torch("relation_loss"))
    add("procrustes_loss", geo, ref_geo.procrustes_loss, _torch("procrustes_loss"))
    lg = lambda n, c: (f"N={n}, C={c}", _logits(n, c))
    add("sinkhorn_loss", [lg(64, 100), lg(128, 100), lg(128, 1000)], ref_sink.sinkhorn_loss, _torch("sinkhorn_loss"))
    cs = lambda b, n, m: (f"B={b}, n={n}, m={m}", _cost(b, n, m))
    add("sinkhorn", [cs(8, 64, 64), cs(4, 256, 256)], _wrap(ref_sink.sinkhorn), _torch("sinkhorn"))
    logit_shapes = [lg(256, 100), lg(1024, 1000), lg(64, 32000)]
    for name in ("kd_loss", "reverse_kl_loss", "jsd_loss", "tvd_loss", "dist_loss"):
        add(name, logit_shapes, getattr(ref_logit, name), _torch(name))
    add("grkd_loss", [lg(256, 100), lg(128, 200)], ref_logit.grkd_loss, _torch("grkd_loss"))
    return out


def _fwd_bwd(fn: Callable, inputs: tuple) -> None:
    xs = [x.detach().clone() for x in inputs]
    xs[0].requires_grad_(True)
    out = fn(*xs)
    out.sum().backward() if out.dim() else out.backward()


def time_pair(ref: Callable, tor: Callable, inputs: tuple, repeats: int, budget_s: float = 0.4) -> tuple[float, float]:
    """Minimum ms of reference and torch, timed alternately (so that both see the same load on a
    shared machine): one warm-up each, then at least ``repeats`` runs each, more (up to 50)
    while the pair has run for less than ``budget_s``."""
    _fwd_bwd(ref, inputs)  # warm-up
    _fwd_bwd(tor, inputs)
    best = [float("inf"), float("inf")]
    spent, k = 0.0, 0
    while k < repeats or (spent < budget_s and k < 50):
        for i, fn in enumerate((ref, tor)):
            t0 = time.perf_counter()
            _fwd_bwd(fn, inputs)
            dt = time.perf_counter() - t0
            best[i] = min(best[i], dt)
            spent += dt
        k += 1
    return best[0] * 1e3, best[1] * 1e3


def _git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--", "../kd_kernels"], cwd=here, text=True)
        return head + (" (+ uncommitted changes in kd_kernels/)" if dirty.strip() else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one shape per loss, 3 repeats")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per entry (min is reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--retries", type=int, default=2, help="re-time entries below 1.0x this many more rounds")
    ap.add_argument("--only", default=None, help="comma-separated loss names")
    ap.add_argument("--angle-1024", action="store_true", help="also time rkd_angle_loss N=1024 D=64 (torch)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu_vs_reference.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 5)
    rows = []
    t_start = time.perf_counter()
    only = set(args.only.split(",")) if args.only else None
    for loss, label, make, ref, tor in cases(args.quick):
        if only and loss not in only:
            continue
        inputs = make()
        r, t = time_pair(ref, tor, inputs, repeats)
        rows.append([loss, label, r, t, make, ref, tor])
        print(f"{loss:18s} {label:26s} reference {r:9.2f} ms  torch {t:9.2f} ms  {r / t:5.2f}x", flush=True)
    # Shared machine: entries below 1.0x are timed again (both providers, alternated) up to
    # --retries more times, keeping each provider's minimum over all rounds.
    for _ in range(args.retries):
        for row in rows:
            if row[2] / row[3] >= 1.0:
                continue
            r, t = time_pair(row[5], row[6], row[4](), repeats)
            row[2], row[3] = min(row[2], r), min(row[3], t)
            print(f"  again: {row[0]:18s} {row[1]:26s} reference {row[2]:9.2f} ms  torch {row[3]:9.2f} ms  {row[2] / row[3]:5.2f}x", flush=True)
    # Peak memory (process peak RSS above the level before the call) of one forward + backward at
    # each loss's largest shape: the memory side of the comparison.
    largest = {}
    for row in rows:
        largest[row[0]] = row
    for row in rows:
        row.append(None)
    for row in largest.values():
        inputs = row[4]()
        row[-1] = tuple(peak_memory_mb(lambda fn=fn: _fwd_bwd(fn, inputs), "cpu") for fn in (row[5], row[6]))
        print(f"  memory: {row[0]:18s} {row[1]:26s} reference {row[-1][0]:8.1f} MB  torch {row[-1][1]:8.1f} MB", flush=True)
    rows = [(*row[:4], row[-1]) for row in rows]
    extra = ""
    if args.angle_1024:
        inputs = _feat(1024, 64, 64)()
        t0 = time.perf_counter()
        _fwd_bwd(_torch("rkd_angle_loss"), inputs)
        ms = (time.perf_counter() - t0) * 1e3
        extra = f"\nrkd_angle_loss, N=1024, D=64, torch path, one forward+backward: {ms:.0f} ms (the reference needs several N^3 fp32 buffers of 4 GiB and is not timed).\n"
        print(extra.strip(), flush=True)
    total = time.perf_counter() - t_start
    lines = [
        "# CPU: PyTorch path vs the literal reference (fp32, forward + backward)",
        "",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs visible; the machine is shared)",
        f"- torch {torch.__version__}, torch.set_num_threads({args.threads})",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- git commit: {_git_commit()}",
        f"- timing: minimum of >= {repeats} runs (more while under 0.4 s) after one warm-up, reference and torch alternated; entries below 1.0x re-timed up to {args.retries} more rounds (minimum kept); student requires grad, teacher does not",
        f"- command: `python benchmarks/bench_cpu_vs_reference.py{' --quick' if args.quick else ''}{' --angle-1024' if args.angle_1024 else ''}` ({total:.0f} s)",
        "- speedup = reference ms / torch ms (>= 1 means the torch path is at least as fast)",
        "- peak MB: process peak RSS above the level before one forward + backward (reference / torch), at each loss's largest shape",
        "",
        "| loss | shape | reference ms | torch ms | speedup | peak MB reference / torch |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for loss, label, r, t, mem in rows:
        peak = f"{mem[0]:.1f} / {mem[1]:.1f}" if mem else ""
        lines.append(f"| {loss} | {label} | {r:.2f} | {t:.2f} | {r / t:.2f}x | {peak} |")
    text = "\n".join(lines) + "\n" + extra
    if not only:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out} ({total:.0f} s)")


if __name__ == "__main__":
    main()
