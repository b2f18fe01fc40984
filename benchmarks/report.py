"""Turn pytest-benchmark JSON files into a markdown table and SVG plots.

    python benchmarks/report.py benchmarks/results/cpu.json [more.json ...] --out benchmarks/results/cpu

writes ``<out>.md`` (one table per op: provider x shape x mode, median ms with p25/p75,
peak MB, TFLOP/s when known, speedup against the eager reference) and, for every op measured
at several N, ``<out>_<op>.svg`` with time and peak memory against N, one line per provider.
The plots are plain SVG written here (no plotting dependency).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf"]


def load_rows(paths: list[str]) -> tuple[list[dict], dict]:
    rows, machine = [], {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        machine = data.get("machine_info", machine)
        for b in data.get("benchmarks", []):
            info = b.get("extra_info", {})
            if "provider" not in info or not b.get("stats"):
                continue
            st = b["stats"]
            rows.append({**info, "median_ms": st["median"] * 1e3, "q1_ms": st["q1"] * 1e3, "q3_ms": st["q3"] * 1e3})
    return rows, machine


def shape_key(shape: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in shape.items())


def markdown(rows: list[dict]) -> str:
    out = []
    first = rows[0] if rows else {}
    out.append(
        f"Device: {first.get('device', '?')} | torch {first.get('torch', '?')} | triton {first.get('triton', '?')} "
        f"| commit {first.get('commit', '?')}\n"
    )
    by_op = defaultdict(list)
    for r in rows:
        by_op[(r["family"], r["op"])].append(r)
    for (family, op), rs in sorted(by_op.items()):
        ref = {
            (shape_key(r["shape"]), r["dtype"], r["mode"]): r["median_ms"] for r in rs if r["provider"] == "reference"
        }
        out.append(f"\n### {family} / {op}\n")
        out.append(
            "| shape | dtype | mode | provider | median ms (p25-p75) | peak MB | TFLOP/s | % TC peak (policy) "
            "| vs reference |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|")
        rs.sort(key=lambda r: (shape_key(r["shape"]), r["dtype"], r["mode"], r["provider"]))
        for r in rs:
            k = (shape_key(r["shape"]), r["dtype"], r["mode"])
            speed = f"{ref[k] / r['median_ms']:.2f}x" if k in ref and r["median_ms"] > 0 else "-"
            tf = f"{r['tflops']:.3f}" if r.get("tflops") is not None else "-"
            pct = f"{r['pct_of_tc_peak']:.1f}%" if r.get("pct_of_tc_peak") is not None else "-"
            if r.get("precision_policy"):
                pct += f" ({r['precision_policy']})"
            out.append(
                f"| {k[0]} | {r['dtype']} | {r['mode']} | {r['provider']} | {r['median_ms']:.3f} "
                f"({r['q1_ms']:.3f}-{r['q3_ms']:.3f}) | {r['peak_mb']:.1f} | {tf} | {pct} | {speed} |"
            )
    return "\n".join(out) + "\n"


def _polyline(points, xmap, ymap, color):
    pts = " ".join(f"{xmap(x):.1f},{ymap(y):.1f}" for x, y in points)
    dots = "".join(f'<circle cx="{xmap(x):.1f}" cy="{ymap(y):.1f}" r="3" fill="{color}"/>' for x, y in points)
    return f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>{dots}'


def svg_panel(series: dict[str, list[tuple[float, float]]], title: str, ylabel: str, x0: int) -> str:
    """One log-log panel, 420x300, placed at x offset ``x0``."""
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts if y > 0]
    if not xs or not ys:
        return ""
    lx0, lx1 = math.log10(min(xs)), math.log10(max(xs)) + 1e-9
    ly0, ly1 = math.log10(min(ys)), math.log10(max(ys)) + 1e-9
    if lx1 - lx0 < 1e-6:
        lx0, lx1 = lx0 - 0.5, lx1 + 0.5
    if ly1 - ly0 < 1e-6:
        ly0, ly1 = ly0 - 0.5, ly1 + 0.5

    def xmap(x):
        return x0 + 60 + 340 * (math.log10(x) - lx0) / (lx1 - lx0)

    def ymap(y):
        return 260 - 220 * (math.log10(max(y, 10**ly0)) - ly0) / (ly1 - ly0)

    parts = [
        f'<text x="{x0 + 230}" y="20" text-anchor="middle" font-size="14">{title}</text>',
        f'<line x1="{x0 + 60}" y1="260" x2="{x0 + 400}" y2="260" stroke="black"/>',
        f'<line x1="{x0 + 60}" y1="40" x2="{x0 + 60}" y2="260" stroke="black"/>',
        f'<text x="{x0 + 230}" y="290" text-anchor="middle" font-size="12">N (log)</text>',
        f'<text x="{x0 + 15}" y="150" font-size="12" transform="rotate(-90 {x0 + 15} 150)">{ylabel} (log)</text>',
        f'<text x="{x0 + 60}" y="275" font-size="10">{min(xs):g}</text>',
        f'<text x="{x0 + 400}" y="275" font-size="10" text-anchor="end">{max(xs):g}</text>',
        f'<text x="{x0 + 55}" y="260" font-size="10" text-anchor="end">{10**ly0:.3g}</text>',
        f'<text x="{x0 + 55}" y="45" font-size="10" text-anchor="end">{10**ly1:.3g}</text>',
    ]
    for i, (name, pts) in enumerate(sorted(series.items())):
        color = COLORS[i % len(COLORS)]
        parts.append(_polyline(sorted(pts), xmap, ymap, color))
        parts.append(f'<text x="{x0 + 70}" y="{55 + 14 * i}" font-size="11" fill="{color}">{name}</text>')
    return "".join(parts)


def plots(rows: list[dict], out: Path) -> list[Path]:
    """Time and memory vs N per (op, mode, dtype, D), one line per provider."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        shape = dict(r["shape"])
        n = shape.pop("N", None)
        if n is None:
            continue
        key = (r["family"], r["op"], r["mode"], r["dtype"], shape_key(shape))
        groups[key][r["provider"]].append((n, r["median_ms"], r["peak_mb"]))
    written = []
    for (family, op, mode, dtype, rest), provs in sorted(groups.items()):
        if max(len(v) for v in provs.values()) < 2:
            continue
        t = {p: [(n, ms) for n, ms, _ in v] for p, v in provs.items()}
        m = {p: [(n, mb) for n, _, mb in v if not math.isnan(mb) and mb > 0] for p, v in provs.items()}
        title = f"{op} {mode} {dtype} {rest}"
        body = svg_panel(t, f"time: {title}", "median ms", 0) + svg_panel(m, "peak memory", "MB", 440)
        path = out.with_name(f"{out.name}_{op}_{mode}_{dtype}_{rest.replace(', ', '_').replace('=', '')}.svg")
        path.write_text(
            f'<svg xmlns="http://www.w3.org/2000/svg" width="880" height="300" font-family="sans-serif">{body}</svg>'
        )
        written.append(path)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files")
    p.add_argument("--out", required=True, help="output stem, e.g. benchmarks/results/cpu")
    args = p.parse_args(argv)
    rows, _ = load_rows(args.json)
    if not rows:
        raise SystemExit("no kd_kernels benchmark rows (extra_info.provider) in the given files")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown(rows))
    svgs = plots(rows, out)
    print(f"wrote {out.with_suffix('.md')} ({len(rows)} rows) and {len(svgs)} plot(s)")


if __name__ == "__main__":
    main()
