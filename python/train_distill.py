"""Reference distillation run: relational knowledge distillation for metric learning (RKD,
Park et al., CVPR 2019) on scikit-learn's handwritten digits, plus a side-by-side time and
memory measurement of the kd_kernels losses against the naive (upstream) formulation.

Task (the RKD paper's metric-learning protocol, scaled to a CPU): the 1,797 8x8 digits (they
ship inside scikit-learn, nothing is downloaded) are split by *class*: the models train on
the digits of ``--train-classes`` and are evaluated on the held-out classes, which they never
saw, by embedding recall@1 / recall@5 (for each held-out image, is one of its k nearest other
held-out images, by Euclidean distance of the embeddings, of the same class?).

Three models per seed, all on the same split and data:

* teacher            -- 64 -> 512 -> 512 -> 128-d embedding, trained with the metric loss;
* student alone      -- 64 -> 64 -> ``--student-dim``-d (default 8) embedding, the same metric loss;
* student distilled  -- the same student (same initial weights), trained with
      rel_weight * relational(student_emb, normalize(teacher_emb)) + metric_weight * metric loss
  where the relational loss is ``--loss`` (default RKD distance + angle, lenscloth/RKD weights
  1 and 2) computed by kd_kernels; by default ``metric_weight = 0`` (RKD only, as the paper's
  metric-learning students).

The metric loss is cross-entropy through a linear head on the embedding (``--metric-loss ce``,
the default) or a normalised-softmax (proxy) loss on the L2-normalised embedding
(``--metric-loss normsoftmax``, temperature 0.1: a stronger baseline, with a smaller gain).

Batch sizes: ``--batch-size`` may be anything from 4 up; a batch larger than the training set
is clamped to the training-set size (full-batch training) with a notice. Batches are drawn
without replacement and the ragged last batch of an epoch is dropped.

Benchmark (unless ``--no-bench``): forward + backward time and peak memory of the chosen
relational loss, kd_kernels against the naive reference (``kd_kernels.reference``), at growing
batch sizes. A case is skipped (and reported as such, never crashed) when its predicted memory
is above ``--bench-mem-gb`` or its time, predicted from the previous size's by the loss's
complexity, is above ``--bench-time-cap``. Peak memory: on CUDA ``torch.cuda.max_memory_allocated``
above the level before the call; on the CPU the peak resident set size above the level before
the call (``VmHWM`` after resetting it through ``/proc/self/clear_refs``; tracemalloc does not
see torch's allocations). The naive formulation's predicted size is reported next to it.

Outputs in ``--out`` (default ``runs/train_distill``): ``results.json`` and, when matplotlib
is installed, ``recall_vs_epoch.png``, ``bench_time.png``, ``bench_memory.png``.

Several processes (global-batch relations through ``kd_kernels.distributed.all_gather``)::

    torchrun --nproc-per-node 2 python/train_distill.py --global-batch --quick --device cpu

Each rank takes its shard of every global batch; with ``--global-batch`` the relational loss is
computed on the all-gathered features (N = global batch), without it on the local shard only.
Gradients are averaged over ranks (gloo on the CPU, NCCL on CUDA); only rank 0 prints and writes.

    python python/train_distill.py                       # defaults (a few minutes on 2 CPU cores)
    python python/train_distill.py --quick               # a smoke run (seconds)
    python python/train_distill.py --device cuda --batch-size 1024 --loss rkd
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import kd_kernels
from kd_kernels.distributed import all_gather
from kd_kernels.reference import geometry as ref_geometry
from kd_kernels.reference import rkd as ref_rkd

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are a convenience, not a requirement
    tqdm = None

TEACHER_WIDTHS = [64, 512, 512, 128]
LOSSES = ("rkd", "rkd_distance", "rkd_angle", "cka", "gram", "relation", "procrustes")
MODELS = ("teacher", "student alone", "student distilled")

# Defaults; --quick replaces those not given explicitly on the command line.
DEFAULTS = {"seeds": 3, "epochs": 15, "bench_sizes": [64, 256, 512, 1024, 2048], "bench_time_cap": 10.0}
QUICK = {"seeds": 2, "epochs": 2, "bench_sizes": [32, 128], "bench_time_cap": 1.0}


# --------------------------------------------------------------------------------------------
# arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_distill.py",
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring (python/train_distill.py) for the task and the outputs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--device", default="auto", help="auto | cpu | cuda (auto: cuda when available)")
    a("--backend", default="auto", help="kd_kernels backend: auto | torch | triton | cuda")
    a("--loss", default="rkd", help="relational loss: " + " | ".join(LOSSES) + " (rkd = distance + angle)")
    a("--batch-size", default="64", help="global batch size (>= 4; above the train-set size it is clamped)")
    a("--seeds", default=None, help=f"independent runs (split, init) to average (default {DEFAULTS['seeds']})")
    a("--epochs", default=None, help=f"epochs per model (default {DEFAULTS['epochs']})")
    a("--out", default="runs/train_distill", help="output folder (results.json, *.png)")
    a("--global-batch", action="store_true", help="under torchrun: relational loss on all_gather'd features")
    a("--no-bench", action="store_true", help="skip the kd_kernels vs naive time/memory measurement")
    a("--quick", action="store_true", help="smoke run: 2 seeds, 2 epochs, tiny benchmark")
    a("--lr", default="0.003", help="Adam learning rate")
    a("--student-dim", default="8", help="student embedding width")
    a("--student-hidden", default="64", help="student hidden width")
    a("--train-classes", default="0,1,2,3,4", help="digit classes to train on; the others are held out")
    a("--train-fraction", default="1.0", help="fraction of the training-class images used for training")
    a("--metric-loss", default="ce", help="normsoftmax | ce")
    a("--rel-weight", default="1.0", help="weight of the relational loss in the distilled student")
    a("--metric-weight", default="0.0", help="weight of the metric loss in the distilled student (0: RKD only, as the paper)")
    a("--distance-weight", default="1.0", help="RKD distance weight inside --loss rkd (lenscloth/RKD: 1)")
    a("--angle-weight", default="2.0", help="RKD angle weight inside --loss rkd (lenscloth/RKD: 2)")
    a("--bench-sizes", default=None, help="comma-separated batch sizes for the benchmark")
    a("--bench-time-cap", default=None, help="seconds per benchmark case (predicted or measured) before skipping")
    a("--bench-mem-gb", default="4.0", help="memory budget (GB) per benchmark case, predicted")
    return p


def _parse_int(p: argparse.ArgumentParser, name: str, value, lo: int) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        p.error(f"argument {name}: must be an integer >= {lo}, got {value!r}")
    if v < lo:
        p.error(f"argument {name}: must be an integer >= {lo}, got {v}")
    return v


def _parse_float(p: argparse.ArgumentParser, name: str, value, lo: float, *, strict: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        p.error(f"argument {name}: must be a number, got {value!r}")
    if not math.isfinite(v) or v < lo or (strict and v == lo):
        p.error(f"argument {name}: must be a finite number {'>' if strict else '>='} {lo}, got {value!r}")
    return v


def _choice(p: argparse.ArgumentParser, name: str, value: str, choices) -> str:
    if value not in choices:
        p.error(f"argument {name}: must be one of {', '.join(choices)}; got {value!r}")
    return value


def parse_args(argv: list[str] | None, world: int) -> argparse.Namespace:
    """Parse and validate every argument (before any training): errors exit with status 2 and a
    message that names the argument."""
    p = build_parser()
    args = p.parse_args(argv)
    _choice(p, "--device", args.device, ("auto", "cpu", "cuda"))
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error(
            "argument --device: 'cuda' requested but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); use --device cpu or auto"
        )
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    _choice(p, "--backend", args.backend, ("auto", "torch", "triton", "cuda"))
    _choice(p, "--loss", args.loss, LOSSES)
    _choice(p, "--metric-loss", args.metric_loss, ("normsoftmax", "ce"))
    args.batch_size = _parse_int(p, "--batch-size", args.batch_size, 4)
    for key, src in (("seeds", None), ("epochs", None), ("bench_sizes", None), ("bench_time_cap", None)):
        if getattr(args, key) is None:
            setattr(args, key, (QUICK if args.quick else DEFAULTS)[key])
    args.seeds = _parse_int(p, "--seeds", args.seeds, 1)
    args.epochs = _parse_int(p, "--epochs", args.epochs, 1)
    args.lr = _parse_float(p, "--lr", args.lr, 0.0, strict=True)
    args.student_dim = _parse_int(p, "--student-dim", args.student_dim, 1)
    args.student_hidden = _parse_int(p, "--student-hidden", args.student_hidden, 1)
    args.train_fraction = _parse_float(p, "--train-fraction", args.train_fraction, 0.0, strict=True)
    if args.train_fraction > 1:
        p.error(f"argument --train-fraction: must be in (0, 1], got {args.train_fraction}")
    try:
        classes = sorted({int(c) for c in str(args.train_classes).split(",") if c.strip()})
    except ValueError:
        p.error(f"argument --train-classes: must be comma-separated digits 0-9, got {args.train_classes!r}")
    if not classes or any(not 0 <= c <= 9 for c in classes) or len(classes) > 8:
        p.error(f"argument --train-classes: must name 1 to 8 distinct digits 0-9 (>= 2 held out), got {args.train_classes!r}")
    args.train_classes = classes
    for name in ("rel_weight", "metric_weight", "distance_weight", "angle_weight"):
        setattr(args, name, _parse_float(p, "--" + name.replace("_", "-"), getattr(args, name), 0.0))
    if args.rel_weight == 0 and args.metric_weight == 0:
        p.error("argument --rel-weight: --rel-weight and --metric-weight are both 0: the distilled student has no loss")
    if isinstance(args.bench_sizes, str):
        try:
            args.bench_sizes = [int(s) for s in args.bench_sizes.split(",") if s.strip()]
        except ValueError:
            p.error(f"argument --bench-sizes: must be comma-separated integers >= 4, got {args.bench_sizes!r}")
    if not args.bench_sizes or min(args.bench_sizes) < 4:
        p.error(f"argument --bench-sizes: must be comma-separated integers >= 4, got {args.bench_sizes!r}")
    args.bench_sizes = sorted(set(args.bench_sizes))
    args.bench_time_cap = _parse_float(p, "--bench-time-cap", args.bench_time_cap, 0.0, strict=True)
    args.bench_mem_gb = _parse_float(p, "--bench-mem-gb", args.bench_mem_gb, 0.0, strict=True)
    if world > 1 and args.batch_size < 4 * world:
        p.error(f"argument --batch-size: must be >= 4 per rank ({4 * world} with {world} processes), got {args.batch_size}")

    # --backend against this installation and device, then against the chosen loss (tiny dry run)
    avail = kd_kernels.available_backends(args.device)
    if args.backend != "auto" and args.backend not in avail:
        hint = " (on the CPU, triton needs TRITON_INTERPRET=1)" if args.backend == "triton" else ""
        p.error(f"argument --backend: {args.backend!r} is not available on {args.device}; available: {avail}{hint}")
    try:
        s = torch.randn(6, 3, device=args.device, requires_grad=True)
        relational_loss(args, provider="kd_kernels")(s, torch.randn(6, 5, device=args.device)).backward()
    except (ValueError, RuntimeError) as exc:
        p.error(f"argument --backend: {args.backend!r} cannot run --loss {args.loss} on {args.device}: {exc}")

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"argument --out: {str(out)!r} exists and is not a folder")
    return args


# --------------------------------------------------------------------------------------------
# losses


def relational_loss(args, *, provider: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``f(student [N, Ds], teacher [N, Dt]) -> scalar`` for ``args.loss``; provider "kd_kernels"
    (the library, with ``args.backend``) or "naive" (``kd_kernels.reference``, upstream's code)."""
    dw, aw, b = args.distance_weight, args.angle_weight, args.backend
    if provider == "kd_kernels":
        table = {
            "rkd": lambda s, t: kd_kernels.rkd_loss(s, t, distance_weight=dw, angle_weight=aw, backend=b),
            "rkd_distance": lambda s, t: kd_kernels.rkd_distance_loss(s, t, backend=b),
            "rkd_angle": lambda s, t: kd_kernels.rkd_angle_loss(s, t, backend=b),
            "cka": lambda s, t: kd_kernels.cka_loss(s, t, backend=b),
            "gram": lambda s, t: kd_kernels.gram_loss(s, t, backend=b),
            "relation": lambda s, t: kd_kernels.relation_loss(s, t, backend=b),
            "procrustes": lambda s, t: kd_kernels.procrustes_loss(s, t, backend=b),
        }
    else:
        table = {
            "rkd": lambda s, t: ref_rkd.rkd_loss(s, t, distance_weight=dw, angle_weight=aw),
            "rkd_distance": ref_rkd.rkd_distance_loss,
            "rkd_angle": ref_rkd.rkd_angle_loss,
            "cka": ref_geometry.cka_loss,
            "gram": ref_geometry.gram_loss,
            "relation": ref_geometry.relation_loss,
            "procrustes": ref_geometry.procrustes_loss,
        }
    return table[args.loss]


def naive_bytes(loss: str, n: int, ds: int, dt: int) -> int:
    """Predicted peak bytes (fp32, forward + backward) of the naive formulation: the N x N x D
    difference tensors and N^3 angle tensors of RKD angle, the N x N matrices of the others."""
    nn2, nn3 = n * n, n**3
    dist = 16 * nn2  # pdist, its clamp/sqrt/clone/normalised copies, smooth-L1 terms, grads
    angle = 3 * nn2 * (ds + dt) + 5 * nn3  # diff, normalised diff (+grad); angles s, t, loss, grads
    per = {"rkd": dist + angle, "rkd_distance": dist, "rkd_angle": angle, "cka": 10 * nn2, "gram": 10 * nn2}
    return 4 * (per.get(loss, 10 * nn2) + n * (ds + dt))


def kd_bytes(loss: str, n: int, ds: int, dt: int) -> int:
    """Predicted peak bytes of the kd_kernels PyTorch path (a few N x N matrices at most)."""
    per = {"cka": 2 * (ds + dt) ** 2, "gram": 2 * (ds + dt) ** 2}
    return 4 * (per.get(loss, 8 * n * n) + 4 * n * (ds + dt))


def time_exponent(loss: str, provider: str) -> int:
    """How a step's time grows with N (used to predict the next size's time)."""
    if loss in ("rkd", "rkd_angle"):
        return 3
    if loss in ("cka", "gram") and provider == "kd_kernels":
        return 1
    return 2


# --------------------------------------------------------------------------------------------
# data, models, training, evaluation


def load_split(seed: int, args) -> tuple[torch.Tensor, ...]:
    """Standardised digits: (x_train [n, 64], y_train [n], x_eval [m, 64], y_eval [m]); train on
    ``args.train_classes`` (a seeded ``train_fraction`` subset), evaluate on the other classes."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    seen = torch.isin(y, torch.tensor(args.train_classes))
    g = torch.Generator().manual_seed(seed)
    train_idx = seen.nonzero().squeeze(1)
    train_idx = train_idx[torch.randperm(len(train_idx), generator=g)]
    train_idx = train_idx[: max(8, round(args.train_fraction * len(train_idx)))]
    eval_idx = (~seen).nonzero().squeeze(1)
    mean, std = x[train_idx].mean(0), x[train_idx].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    # relabel the training classes 0..C-1 for the classifier heads
    remap = torch.full((10,), -1, dtype=torch.long)
    remap[torch.tensor(args.train_classes)] = torch.arange(len(args.train_classes))
    return x[train_idx], remap[y[train_idx]], x[eval_idx], y[eval_idx]


class EmbeddingNet(nn.Module):
    """MLP ``widths[0] -> ... -> widths[-1]`` (Linear-BN-ReLU blocks, linear embedding layer)
    and a classifier head for the metric loss: a linear layer (``ce``) or cosine proxies
    (``normsoftmax``, logits = cos(embedding, proxy) / 0.1)."""

    def __init__(self, widths: list[int], n_classes: int, metric_loss: str):
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths[:-1]):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU()]
        layers.append(nn.Linear(widths[-2], widths[-1]))
        self.body = nn.Sequential(*layers)
        self.metric_loss = metric_loss
        self.head = nn.Linear(widths[-1], n_classes, bias=metric_loss == "ce")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.body(x)
        if self.metric_loss == "ce":
            return emb, self.head(emb)
        return emb, F.normalize(emb, dim=1) @ F.normalize(self.head.weight, dim=1).t() / 0.1


@torch.no_grad()
def recall_at(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Recall@k on (x [m, 64], y [m]): fraction of queries with a same-class image among their
    k nearest other images (Euclidean distance of the embeddings)."""
    was = model.training
    model.eval()
    emb = model(x)[0]
    model.train(was)
    d = torch.cdist(emb, emb)
    d.fill_diagonal_(float("inf"))
    nearest = d.topk(max(ks), dim=1, largest=False).indices
    hit = y[nearest] == y[:, None]
    return {f"recall@{k}": hit[:, :k].any(1).float().mean().item() for k in ks}


class Dist:
    """This process's place in torch.distributed (world 1 without torchrun)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.active = False

    def init(self, device: str) -> None:
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
            self.active = True

    def average_grads(self, model: nn.Module) -> None:
        if not self.active:
            return
        for p in model.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.world


def train(model, x, y, *, args, seed, loss_fn, dist: Dist, evaluate, bar, desc) -> list[dict[str, float]]:
    """Adam + cosine schedule over global batches of ``args.batch_size`` (each rank its shard
    ``batch[rank::world]``); ``loss_fn(model, xb, yb)`` is this rank's loss. Returns the
    evaluation after every epoch (rank 0; empty dicts elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    bs = min(args.batch_size, len(x))
    curve = []
    for _ in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - bs + 1, bs):  # drop the ragged last batch
            idx = perm[i : i + bs][dist.rank :: dist.world]
            loss = loss_fn(model, x[idx], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            dist.average_grads(model)
            opt.step()
        sched.step()
        curve.append(evaluate(model) if dist.rank == 0 else {})
        if bar is not None:
            bar.set_postfix_str(f"{desc} loss {loss.item():.3f} r@1 {curve[-1]['recall@1']:.3f}")
            bar.update(1)
    return curve


def run_seed(seed: int, args, dist: Dist, bar) -> dict[str, dict]:
    """Train the three models of one seed; per model the final recall@k and the per-epoch curve."""
    dev = args.device
    x_tr, y_tr, x_ev, y_ev = (t.to(dev) for t in load_split(seed, args))
    n_cls = len(args.train_classes)
    s_widths = [64, args.student_hidden, args.student_dim]

    def evaluate(model):
        return recall_at(model, x_ev, y_ev)

    def metric(model, xb, yb):
        return F.cross_entropy(model(xb)[1], yb)

    common = {"args": args, "seed": seed, "dist": dist, "evaluate": evaluate, "bar": bar}
    out = {}
    torch.manual_seed(seed)
    teacher = EmbeddingNet(TEACHER_WIDTHS, n_cls, args.metric_loss).to(dev)
    out["teacher"] = train(teacher, x_tr, y_tr, loss_fn=metric, desc="teacher", **common)
    teacher.eval()

    torch.manual_seed(seed + 1)
    alone = EmbeddingNet(s_widths, n_cls, args.metric_loss).to(dev)
    out["student alone"] = train(alone, x_tr, y_tr, loss_fn=metric, desc="student", **common)

    rel = relational_loss(args, provider="kd_kernels")
    scale = dist.world if args.global_batch else 1  # gradient averaging over ranks: undo it

    def distill(model, xb, yb):
        with torch.no_grad():
            t_emb = F.normalize(teacher(xb)[0], dim=1)  # lenscloth/RKD: teacher embedding L2-normalised
        s_emb, s_logits = model(xb)
        if args.global_batch:
            s_g, t_g = all_gather(s_emb), all_gather(t_emb)
        else:
            s_g, t_g = s_emb, t_emb
        loss = args.rel_weight * scale * rel(s_g, t_g)
        if args.metric_weight:
            loss = loss + args.metric_weight * F.cross_entropy(s_logits, yb)
        return loss

    torch.manual_seed(seed + 1)  # the same initial student as "alone"
    distilled = EmbeddingNet(s_widths, n_cls, args.metric_loss).to(dev)
    out["student distilled"] = train(distilled, x_tr, y_tr, loss_fn=distill, desc="distilled", **common)
    return out


# --------------------------------------------------------------------------------------------
# benchmark


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure_step(fn: Callable[[], None], device: str) -> tuple[float, float, str]:
    """(seconds, peak MB above the level before the call, how the memory was measured) of one call."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, (torch.cuda.max_memory_allocated() - base) / 2**20, "cuda max_memory_allocated"
    how = "peak RSS (VmHWM) above the RSS before the call"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _rss_kb("VmRSS")
    except OSError:
        base, how = None, "unavailable (no /proc/self/clear_refs)"
    t0 = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t0
    peak = max(_rss_kb("VmHWM") - base, 0) / 1024 if base is not None else float("nan")
    return elapsed, peak, how


def benchmark(args, ds: int, dt: int, bar) -> list[dict]:
    """Forward + backward of the relational loss, kd_kernels vs naive, at growing batch sizes."""
    rows = []
    budget = args.bench_mem_gb * 1e9
    cap = args.bench_time_cap
    for provider in ("kd_kernels", "naive"):
        fn = relational_loss(args, provider=provider)
        predict_mem = naive_bytes if provider == "naive" else kd_bytes
        last: tuple[int, float] | None = None
        for n in args.bench_sizes:
            row = {"provider": provider, "loss": args.loss, "n": n, "ds": ds, "dt": dt, "device": args.device}
            row["predicted_mb"] = predict_mem(args.loss, n, ds, dt) / 2**20
            row["naive_largest_intermediate_mb"] = 4 * (n**3 if args.loss in ("rkd", "rkd_angle") else n * n) / 2**20
            predicted_s = last[1] * (n / last[0]) ** time_exponent(args.loss, provider) if last else 0.0
            if row["predicted_mb"] * 2**20 > budget:
                row["skipped"] = f"would need {row['predicted_mb'] / 1024:.1f} GB (budget {args.bench_mem_gb:g} GB)"
            elif predicted_s > 3 * cap:  # small sizes are dominated by fixed costs: be generous
                row["skipped"] = f"over time cap (predicted {predicted_s:.0f} s from N={last[0]}, cap {cap:g} s)"
            else:
                g = torch.Generator().manual_seed(n)
                s = torch.randn(n, ds, generator=g).to(args.device).requires_grad_()
                t = torch.randn(n, dt, generator=g).to(args.device)

                def step(fn=fn, s=s, t=t):
                    fn(s, t).backward()
                    s.grad = None

                try:
                    if n <= 256:
                        step()  # warm-up (first-call overheads)
                    sec, mb, how = measure_step(step, args.device)
                    times = [sec]
                    while sec * (len(times) + 1) < min(cap / 4, 1.0) and len(times) < 5:
                        times.append(measure_step(step, args.device)[0])
                    row.update(seconds=min(times), peak_mb=mb, memory_method=how)
                    last = (n, min(times))
                    if sec > cap:
                        row["note"] = f"over time cap ({sec:.1f} s > {cap:g} s); larger sizes skipped"
                except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
                    row["skipped"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                del s, t
                gc.collect()
            rows.append(row)
            if bar is not None:
                bar.update(1)
    return rows


# --------------------------------------------------------------------------------------------
# reporting


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def make_plots(out: Path, curves: dict[str, list[list[dict]]], bench: list[dict]) -> list[str]:
    """PNG plots in ``out``; returns their paths (empty, with a notice, without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plots skipped (pip install matplotlib)")
        return []
    files = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("recall@1", "recall@5"), strict=True):
        for name, per_seed in curves.items():
            vals = [[e[key] for e in seed] for seed in per_seed]
            epochs = range(1, len(vals[0]) + 1)
            mean = [statistics.mean(v) for v in zip(*vals, strict=True)]
            ax.plot(epochs, [100 * m for m in mean], label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{key} % (held-out classes, mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    files.append(str(out / "recall_vs_epoch.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    bench_plots = (("seconds", "forward + backward time (s)", "bench_time.png"),
                   ("peak_mb", "peak memory (MB)", "bench_memory.png"))
    for key, ylabel, name in bench_plots if bench else ():
        fig, ax = plt.subplots(figsize=(6, 4))
        for provider in ("kd_kernels", "naive"):
            pts = [(r["n"], r[key]) for r in bench if r["provider"] == provider and key in r and r[key] > 0]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=provider)
        if key == "peak_mb":
            pts = [(r["n"], r["predicted_mb"]) for r in bench if r["provider"] == "naive"]
            ax.plot(*zip(*pts, strict=True), ls="--", color="gray", label="naive, predicted")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size N")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{bench[0]['loss']} on {bench[0]['device']}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        files.append(str(out / name))
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files


def print_tables(summary: dict, bench: list[dict], args, elapsed: float, n_train: int, n_eval: int) -> None:
    held = sorted(set(range(10)) - set(args.train_classes))
    print(
        f"\nsklearn digits, train classes {args.train_classes} ({n_train} images), recall on held-out classes "
        f"{held} ({n_eval} images); loss {args.loss}, batch {min(args.batch_size, n_train)}, {args.epochs} epochs, "
        f"{args.seeds} seeds, {elapsed:.0f} s on {args.device}"
    )
    print(f"{'model':<20} {'params':>8} {'emb':>4} {'recall@1 %':>16} {'recall@5 %':>16}")
    for name, row in summary.items():
        r1, r5 = row["recall@1"], row["recall@5"]
        print(
            f"{name:<20} {row['params']:>8} {row['dim']:>4} {100 * r1['mean']:>8.2f} +- {100 * r1['std']:<4.2f}"
            f" {100 * r5['mean']:>8.2f} +- {100 * r5['std']:<4.2f}"
        )
    a, d = summary["student alone"]["recall@1"], summary["student distilled"]["recall@1"]
    gain = d["mean"] - a["mean"]
    spread = max(a["std"], d["std"])
    verdict = "exceeds" if gain > spread else "does NOT exceed"
    print(f"distilled - alone recall@1: {100 * gain:+.2f} points; {verdict} the seed std ({100 * spread:.2f})")
    if bench:
        print(f"\n{args.loss} forward + backward on {args.device}, fp32 (memory: {bench[0].get('memory_method', 'see JSON')})")
        print(f"{'provider':<11} {'N':>6} {'time':>10} {'peak MB':>10} {'naive needs':>12}  note")
        for r in bench:
            pred = f"{r['predicted_mb']:.0f} MB" if r["provider"] == "naive" else ""
            if "skipped" in r:
                print(f"{r['provider']:<11} {r['n']:>6} {'-':>10} {'-':>10} {pred:>12}  skipped: {r['skipped']}")
            else:
                print(
                    f"{r['provider']:<11} {r['n']:>6} {1e3 * r['seconds']:>8.1f}ms {r['peak_mb']:>10.1f} "
                    f"{pred:>12}  {r.get('note', '')}"
                )
        print("naive needs: predicted fp32 forward + backward footprint of the upstream formulation")


def main(argv: list[str] | None = None) -> dict:
    dist = Dist()
    args = parse_args(argv, dist.world)
    dist.init(args.device)
    lead = dist.rank == 0
    out = Path(args.out)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    x_tr, _, x_ev, _ = load_split(0, args)
    notices = []
    if args.batch_size > len(x_tr):
        notices.append(f"--batch-size {args.batch_size} > {len(x_tr)} training images: clamped to {len(x_tr)} (full batch)")
    if args.global_batch and dist.world == 1:
        notices.append("--global-batch: a single process (not under torchrun): all_gather is the identity")
    if args.seeds == 1:
        notices.append("--seeds 1: no seed-to-seed std")
    info = kd_kernels.build_info()
    if lead:
        print(
            f"kd_kernels {info['version']} | torch {info['torch']} | device {args.device} | backends "
            f"{kd_kernels.available_backends(args.device)} (--backend {args.backend}) | world {dist.world}"
            f"{' (global-batch relations)' if args.global_batch else ''}"
        )
        for n in notices:
            print("notice:", n)

    start = time.time()
    steps = args.seeds * 3 * args.epochs + (0 if args.no_bench else 2 * len(args.bench_sizes))
    bar = tqdm(total=steps, unit="step", dynamic_ncols=True) if (tqdm and lead) else None
    curves: dict[str, list[list[dict]]] = {m: [] for m in MODELS}
    for seed in range(args.seeds):
        for name, curve in run_seed(seed, args, dist, bar).items():
            curves[name].append(curve)
    train_s = time.time() - start
    bench = [] if args.no_bench or not lead else benchmark(args, args.student_dim, TEACHER_WIDTHS[-1], bar)
    if bar is not None:
        bar.close()
    elapsed = time.time() - start
    if dist.active:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if not lead:
        return {}

    n_cls = len(args.train_classes)
    params = {
        "teacher": (sum(p.numel() for p in EmbeddingNet(TEACHER_WIDTHS, n_cls, args.metric_loss).body.parameters()), 128),
        "student alone": (
            sum(p.numel() for p in EmbeddingNet([64, args.student_hidden, args.student_dim], n_cls, args.metric_loss).body.parameters()),
            args.student_dim,
        ),
    }
    params["student distilled"] = params["student alone"]
    summary = {}
    for name, per_seed in curves.items():
        summary[name] = {"params": params[name][0], "dim": params[name][1]}
        for key in ("recall@1", "recall@5"):
            finals = [c[-1][key] for c in per_seed]
            m, s = mean_std(finals)
            summary[name][key] = {"mean": m, "std": s, "per_seed": finals}
    print_tables(summary, bench, args, elapsed, len(x_tr), len(x_ev))
    a, d = summary["student alone"]["recall@1"], summary["student distilled"]["recall@1"]
    settings = {k: v for k, v in vars(args).items()}
    settings["batch_size_used"] = min(args.batch_size, len(x_tr))
    results = {
        "settings": settings,
        "environment": {
            "kd_kernels": info["version"],
            "torch": info["torch"],
            "python": platform.python_version(),
            "machine": f"{platform.machine()} x{os.cpu_count()}",
            "world_size": dist.world,
            "backends": kd_kernels.available_backends(args.device),
        },
        "notices": notices,
        "data": {"dataset": "sklearn digits", "n_train": len(x_tr), "n_eval": len(x_ev),
                 "train_classes": args.train_classes, "held_out": sorted(set(range(10)) - set(args.train_classes))},
        "summary": summary,
        "gain_recall@1": {"mean": d["mean"] - a["mean"], "exceeds_seed_std": d["mean"] - a["mean"] > max(a["std"], d["std"])},
        "curves": curves,
        "bench": bench,
        "train_seconds": train_s,
        "elapsed_seconds": elapsed,
    }
    results["plots"] = make_plots(out, curves, bench) if bench or curves else []
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {out / 'results.json'}" + "".join(f", {p}" for p in results["plots"]))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
