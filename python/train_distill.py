"""Reference distillation run: a wide teacher MLP is distilled into a small student MLP on
scikit-learn's handwritten digits (1,797 8x8 images, 10 classes; the data ships inside
scikit-learn, nothing is downloaded).

Three models are trained per seed, all on the same split:

* teacher            -- 64 -> 512 -> 512 -> 128-d embedding -> 10 classes, cross-entropy;
* student alone      -- 64 -> 24 -> 16-d embedding -> 10 classes, cross-entropy;
* student distilled  -- the same student, trained with
      ce_weight * CE + kd_weight * kd_loss(T) + rkd_loss(distance_weight, angle_weight)
  where kd_loss is Hinton KD on the logits and rkd_loss is RKD distance + angle between the
  student's embedding and the teacher's (L2-normalised) embedding, as in lenscloth/RKD.

The final table reports test accuracy and embedding recall@1 (for each test image, is its
nearest other test image, by Euclidean distance of the embeddings, of the same class?) as
mean +- std over the seeds. Runs on the CPU in a minute or two with the defaults:

    python python/train_distill.py                 # defaults
    python python/train_distill.py --seeds 5 --epochs 80 --backend torch
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import kd_kernels

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are a convenience, not a requirement
    tqdm = None


def load_digits_split(seed: int, test_fraction: float = 0.3):
    """Standardised digits features and a stratified-by-shuffle train/test split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = int(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


class MLP(nn.Module):
    """Feature extractor ending in an embedding, plus a linear classifier on top."""

    def __init__(self, widths: list[int], n_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths[:-1]):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU()]
        layers.append(nn.Linear(widths[-2], widths[-1]))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], n_classes)

    def forward(self, x):
        emb = self.body(x)
        return emb, self.head(F.relu(emb))


@torch.no_grad()
def evaluate(model: MLP, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, recall@1 of the embeddings) on (x, y)."""
    model.eval()
    emb, logits = model(x)
    acc = (logits.argmax(1) == y).float().mean().item()
    d = torch.cdist(emb, emb)
    d.fill_diagonal_(float("inf"))
    recall = (y[d.argmin(1)] == y).float().mean().item()
    return acc, recall


def train(model, x, y, *, epochs, batch_size, lr, seed, desc, loss_fn, bar):
    """Adam + cosine schedule; ``loss_fn(model, xb, yb)`` returns the batch loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch_size + 1, batch_size):  # drop the ragged last batch
            idx = perm[i : i + batch_size]
            loss = loss_fn(model, x[idx], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if bar is not None:
            bar.set_postfix_str(f"{desc} loss {loss.item():.3f}")
            bar.update(1)
    return model


def run_seed(seed: int, args, bar) -> dict[str, tuple[float, float]]:
    x_tr, y_tr, x_te, y_te = load_digits_split(seed)
    common = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": seed, "bar": bar}

    def ce(model, xb, yb):
        return F.cross_entropy(model(xb)[1], yb)

    torch.manual_seed(seed)
    teacher = train(MLP([64, 512, 512, 128]), x_tr, y_tr, desc="teacher", loss_fn=ce, **common).eval()

    torch.manual_seed(seed + 1)
    alone = train(MLP(args.student_widths), x_tr, y_tr, desc="student", loss_fn=ce, **common)

    kd = kd_kernels.KDLoss(temperature=args.temperature, backend=args.backend)
    rkd = kd_kernels.RKDLoss(distance_weight=args.distance_weight, angle_weight=args.angle_weight, backend=args.backend)

    def distill(model, xb, yb):
        with torch.no_grad():
            t_emb, t_logits = teacher(xb)
            t_emb = F.normalize(t_emb, dim=1)  # lenscloth/RKD: teacher embedding L2-normalised
        s_emb, s_logits = model(xb)
        return (
            args.ce_weight * F.cross_entropy(s_logits, yb) + args.kd_weight * kd(s_logits, t_logits) + rkd(s_emb, t_emb)
        )

    torch.manual_seed(seed + 1)  # same initial student as "alone"
    distilled = train(MLP(args.student_widths), x_tr, y_tr, desc="distilled", loss_fn=distill, **common)
    return {
        "teacher": evaluate(teacher, x_te, y_te),
        "student alone": evaluate(alone, x_te, y_te),
        "student distilled": evaluate(distilled, x_te, y_te),
    }


def fmt(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:6.2f} +- {std:4.2f}"


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", type=int, default=3, help="independent runs (split, init) to average")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--student-widths", type=int, nargs="+", default=[64, 24, 16], help="input, hidden..., embedding")
    p.add_argument("--temperature", type=float, default=4.0, help="KD temperature")
    p.add_argument("--ce-weight", type=float, default=0.1)
    p.add_argument("--kd-weight", type=float, default=0.9)
    p.add_argument("--distance-weight", type=float, default=1.0, help="RKD distance weight (lenscloth/RKD: 1)")
    p.add_argument("--angle-weight", type=float, default=2.0, help="RKD angle weight (lenscloth/RKD: 2)")
    p.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "torch"])
    args = p.parse_args(argv)
    if args.student_widths[0] != 64 or len(args.student_widths) < 2:
        p.error("--student-widths must start with 64 (the digits input) and name at least the embedding width")

    info = kd_kernels.build_info()
    print(
        f"kd_kernels {info['version']} | torch {info['torch']} | backends on cpu: "
        f"{kd_kernels.available_backends('cpu')} | {args.seeds} seeds x 3 models x {args.epochs} epochs"
    )
    start = time.time()
    results: dict[str, list[tuple[float, float]]] = {}
    bar = tqdm(total=args.seeds * 3 * args.epochs, unit="epoch", dynamic_ncols=True) if tqdm else None
    for seed in range(args.seeds):
        for name, metrics in run_seed(seed, args, bar).items():
            results.setdefault(name, []).append(metrics)
    if bar is not None:
        bar.close()

    print(f"\nsklearn digits, test split 30%, {args.seeds} seeds, {time.time() - start:.0f} s on the CPU")
    print(f"{'model':<20} {'params':>8} {'accuracy %':>16} {'recall@1 %':>16}")
    n_params = {
        "teacher": sum(p.numel() for p in MLP([64, 512, 512, 128]).parameters()),
        "student alone": sum(p.numel() for p in MLP(args.student_widths).parameters()),
    }
    n_params["student distilled"] = n_params["student alone"]
    for name, rows in results.items():
        accs, recalls = [r[0] for r in rows], [r[1] for r in rows]
        print(f"{name:<20} {n_params[name]:>8} {fmt(accs):>16} {fmt(recalls):>16}")
    return results


if __name__ == "__main__":
    main()
