"""CPU comparison of ``kd_kernels.sinkhorn`` (forward) against POT's log-domain Sinkhorn looped
over the batch (issue 11), written as a Markdown report.

    python benchmarks/bench_sinkhorn_pot.py                       # prints the report
    python benchmarks/bench_sinkhorn_pot.py --out benchmarks/results/cpu_sinkhorn_vs_pot.md

Problem: B cost matrices C_b = ||x_i - y_j||^2 ([B, n, m], x, y ~ N(0, I_2)), uniform marginals,
eps = 0.1, a fixed number of iterations, fp32 and fp64. Providers:

* ``kd_kernels`` -- ``kd_kernels.sinkhorn(C, epsilon, n_iters, a, b, backend="torch")``: on CPU the
  fused C++ kernel ``kd_kernels._C.sinkhorn_fwd_cpu`` when the extension is built;
* ``kd_kernels (torch code)`` -- the same call with the PyTorch code forced
  (``kd_kernels.ops.sinkhorn.USE_CPU_KERNEL = False``);
* ``POT`` -- ``ot.sinkhorn(a, b, M, reg, method="sinkhorn_log", numItermax=n_iters, stopThr=0)``
  with torch tensors (POT's torch backend), called once per problem. POT updates the column
  potential first and kd_kernels the row potential first, so POT is given the transposed problem
  (``ot.sinkhorn(b, a, C_b.T, ...)``, the same work); its plan transposed is then the same plan
  (the report gives the largest difference).

Timing: wall clock of the whole batch, ``torch.set_num_threads(threads)``, the minimum of
``--repeats`` runs after one warm-up, providers interleaved so machine load hits all alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import cpu_model

import kd_kernels
from kd_kernels.ops import sinkhorn as sinkhorn_ops


def _problem(nb: int, n: int, m: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(nb, n, 2, generator=g, dtype=torch.float64)
    y = torch.randn(nb, m, 2, generator=g, dtype=torch.float64)
    cost = torch.cdist(x, y).pow(2).to(dtype)
    a = torch.full((n,), 1.0 / n, dtype=dtype)
    b = torch.full((m,), 1.0 / m, dtype=dtype)
    return cost, a, b


def _ours(cost, a, b, eps, iters, *, kernel: bool):
    old = sinkhorn_ops.USE_CPU_KERNEL
    sinkhorn_ops.USE_CPU_KERNEL = kernel
    try:
        with torch.no_grad():
            return kd_kernels.sinkhorn(cost, epsilon=eps, n_iters=iters, a=a, b=b, backend="torch")
    finally:
        sinkhorn_ops.USE_CPU_KERNEL = old


def _pot(cost, a, b, eps, iters):
    import ot

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sinkhorn did not converge": a fixed iteration count is the point
        plans = [
            ot.sinkhorn(b, a, cost[i].T, eps, method="sinkhorn_log", numItermax=iters, stopThr=0).T
            for i in range(cost.shape[0])
        ]
    return torch.stack(plans)


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--epsilon", type=float, default=0.1)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--torch-code-repeats", type=int, default=1, help="timed runs of the forced PyTorch code (slow; 0 = skip)"
    )
    ap.add_argument("--out", default=None, help="write the Markdown report here (else stdout only)")
    args = ap.parse_args(argv)

    try:
        import ot
    except ImportError:
        print("bench_sinkhorn_pot: POT is not installed (pip install pot): nothing to compare against")
        return 1
    torch.set_num_threads(args.threads)
    kernel = sinkhorn_ops._cpu_sinkhorn_kernel()
    kernel_name = (
        f"{getattr(kernel, '__module__', '?')}.sinkhorn_fwd_cpu (C++)"
        if kernel is not None
        else "none: kd_kernels._C has no sinkhorn_fwd_cpu, the PyTorch code runs"
    )
    nb, n, m, eps, iters = args.batch, args.n, args.m, args.epsilon, args.iters
    rows = []
    for dtype in (torch.float32, torch.float64):
        cost, a, b = _problem(nb, n, m, dtype)
        ours = _ours(cost, a, b, eps, iters, kernel=True)
        pot = _pot(cost, a, b, eps, iters)
        diff = (ours.double() - pot.double()).abs().max().item()
        rel = diff / pot.double().abs().max().item()
        fns = {
            "ours": lambda: _ours(cost, a, b, eps, iters, kernel=True),
            "pot": lambda: _pot(cost, a, b, eps, iters),
        }
        best = {k: float("inf") for k in fns}
        for _ in range(args.repeats):  # the first calls above were the warm-up
            for k, fn in fns.items():
                best[k] = min(best[k], _time(fn, 1))
        if args.torch_code_repeats > 0:
            best["torch_code"] = _time(lambda: _ours(cost, a, b, eps, iters, kernel=False), args.torch_code_repeats)
        rows.append((dtype, best, diff, rel))

    cmd = "python benchmarks/bench_sinkhorn_pot.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# CPU: `kd_kernels.sinkhorn` vs POT `sinkhorn_log` looped over the batch",
        "",
        f"Produced by `{cmd.strip()}` (benchmarks/bench_sinkhorn_pot.py; method in its docstring).",
        "",
        f"- device: {cpu_model()}, torch.set_num_threads({args.threads}); "
        f"{torch.get_num_threads()} intra-op threads",
        f"- versions: torch {torch.__version__}, POT {ot.__version__}, Python {platform.python_version()}",
        f"- kd_kernels CPU kernel: {kernel_name}",
        f"- problem: B={nb}, n={n}, m={m}, eps={eps}, {iters} iterations, uniform marginals, "
        "squared-Euclidean costs of 2-D Gaussian points; forward only (plans)",
        f"- time: wall clock for the whole batch, min of {args.repeats} interleaved runs after a warm-up "
        f"(the forced PyTorch code: min of {args.torch_code_repeats})",
        "",
        "| dtype | kd_kernels (s) | POT looped (s) | speedup vs POT | kd_kernels torch code (s) "
        "| max abs plan diff vs POT | relative to max plan entry |",
        "|---|---|---|---|---|---|---|",
    ]
    for dtype, best, diff, rel in rows:
        tc = f"{best['torch_code']:.4f}" if "torch_code" in best else "not run"
        lines.append(
            f"| {str(dtype).replace('torch.', '')} | {best['ours']:.4f} | {best['pot']:.4f} | "
            f"{best['pot'] / best['ours']:.1f}x | {tc} | {diff:.2e} | {rel:.2e} |"
        )
    lines += [
        "",
        "POT is given the transposed problem (it updates the column potential first, kd_kernels the row",
        "potential first), so both run the same iteration and return the same plan; the difference",
        "column is that check. GPU verification of this comparison is pending (CPU-only session).",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
