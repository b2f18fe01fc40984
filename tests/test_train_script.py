"""The reference training script python/train_distill.py: argument validation before any
training, and a --quick run end to end (results JSON, plots when matplotlib is installed)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "python" / "train_distill.py"


def _run(args: list[str], tmp_path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["TRITON_INTERPRET"] = "0"  # triton must be unavailable on the CPU for the --backend case
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), *args],
        check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
    )


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--device", "tpu"], "--device"),
        (["--backend", "triton"], "--backend"),  # not available on the CPU without the interpreter
        (["--batch-size", "0"], "--batch-size"),
        (["--loss", "mse"], "--loss"),
    ],
)
def test_bad_arguments_fail_before_training(args, named, tmp_path):
    proc = _run(args, tmp_path, timeout=60)
    assert proc.returncode != 0, proc.stdout
    assert named in proc.stderr, proc.stderr
    assert "error" in proc.stderr
    # nothing trained, nothing written
    assert "recall" not in proc.stdout + proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the message for a machine without CUDA"
)
def test_cuda_device_without_cuda_fails_at_once(tmp_path):
    proc = _run(["--device", "cuda"], tmp_path, timeout=60)
    assert proc.returncode != 0
    assert "--device" in proc.stderr and "cuda" in proc.stderr.lower()
    assert not (tmp_path / "out").exists()


def test_quick_run_end_to_end(tmp_path):
    # batch above the 900-odd training images: clamped, with a notice, not a crash
    proc = _run(["--quick", "--seeds", "2", "--epochs", "1", "--batch-size", "5000", "--loss", "rkd_distance", "--bench-sizes", "16,32"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "clamped" in proc.stdout
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    for key in ("settings", "environment", "data", "summary", "gain_recall@1", "curves", "bench", "plots", "elapsed_seconds"):
        assert key in res, key
    assert res["settings"]["batch_size_used"] == res["data"]["n_train"] < 5000
    assert set(res["summary"]) == {"teacher", "student alone", "student distilled"}
    for row in res["summary"].values():
        for k in ("recall@1", "recall@5"):
            assert len(row[k]["per_seed"]) == 2
            assert 0.0 <= row[k]["mean"] <= 1.0 and row[k]["std"] >= 0.0
        assert row["recall@1"]["mean"] <= row["recall@5"]["mean"]
    assert all(len(c) == 1 for per_seed in res["curves"].values() for c in per_seed)  # 1 epoch
    providers = {(r["provider"], r["n"]) for r in res["bench"]}
    assert providers == {(p, n) for p in ("kd_kernels", "naive") for n in (16, 32)}
    for r in res["bench"]:
        assert ("seconds" in r and r["seconds"] > 0) or "skipped" in r
    assert "recall@1" in proc.stdout and "kd_kernels" in proc.stdout  # the final tables
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("recall_vs_epoch.png", "bench_time.png", "bench_memory.png"):
            assert (tmp_path / "out" / name).stat().st_size > 0
            assert str(tmp_path / "out" / name) in res["plots"]
    else:
        assert res["plots"] == [] and "matplotlib is not installed" in proc.stdout


def test_benchmark_skips_instead_of_crashing(tmp_path):
    # a tiny memory budget: the naive RKD angle (N^3 tensors) must be reported as skipped
    td = _import_script()
    args = td.parse_args(["--loss", "rkd_angle", "--bench-sizes", "8,512", "--bench-mem-gb", "0.1", "--bench-time-cap", "5", "--out", str(tmp_path)], 1)
    rows = td.benchmark(args, 4, 8, None)
    by = {(r["provider"], r["n"]): r for r in rows}
    assert "seconds" in by[("naive", 8)] and "seconds" in by[("kd_kernels", 8)]
    big = by[("naive", 512)]
    assert "skipped" in big and "would need" in big["skipped"]
    assert big["predicted_mb"] > 100  # 5 N^3 fp32 alone is 2.5 GB
    assert td.naive_bytes("rkd_angle", 512, 4, 8) > td.kd_bytes("rkd_angle", 512, 4, 8)


def _import_script():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import train_distill
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return train_distill


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--backend", "fast"], "--backend"),
        (["--backend", "cuda"], "--backend"),  # never available on CPU tensors
        (["--batch-size", "many"], "--batch-size"),
        (["--batch-size", "3"], "--batch-size"),
        (["--seeds", "0"], "--seeds"),
        (["--epochs", "-1"], "--epochs"),
        (["--bench-sizes", "64,x"], "--bench-sizes"),
        (["--train-classes", "0,11"], "--train-classes"),
        (["--rel-weight", "nan"], "--rel-weight"),
    ],
)
def test_bad_arguments_in_process(args, named, tmp_path, capsys):
    td = _import_script()
    with pytest.raises(SystemExit) as exc:
        td.parse_args([*args, "--out", str(tmp_path / "out")], 1)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {named}:" in err, err


def test_batch_size_per_rank_checked(tmp_path, capsys):
    td = _import_script()
    with pytest.raises(SystemExit):
        td.parse_args(["--batch-size", "6", "--out", str(tmp_path)], 2)  # 2 processes: >= 8
    assert "--batch-size" in capsys.readouterr().err
    assert td.parse_args(["--batch-size", "8", "--out", str(tmp_path)], 2).batch_size == 8
