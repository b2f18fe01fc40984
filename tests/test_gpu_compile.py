"""GPU compile gate in CI mode (benchmarks/compile_gate.py): every Triton kernel compiles for
sm_90 (and sm_80 for bf16) without spills, with tensor cores in every dot kernel and relaxed
atomics. Runs in a subprocess with TRITON_INTERPRET removed (the suite itself runs under the
interpreter, and kd_kernels reads TRITON_INTERPRET at import). Deselect with ``-m "not gate"``.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GATE = ROOT / "benchmarks" / "compile_gate.py"

pytestmark = pytest.mark.gate


def _skip_reason():
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.is_file():
        return f"Triton's bundled ptxas is missing ({ptxas})"
    return None


def test_triton_compile_gate(tmp_path):
    why = _skip_reason()
    if why:
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "gate.json"
    proc = subprocess.run(
        [sys.executable, str(GATE), "--json", str(out), "--jobs", "2"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=2700,  # ~1000 specialisations on 2 cores
    )  # fmt: skip
    print(proc.stdout[-20000:])
    print(proc.stderr[-5000:], file=sys.stderr)
    assert out.is_file(), f"the gate wrote no report (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(out.read_text())
    fails = report["failures"]
    assert not fails, f"{len(fails)} compile-gate failure(s):\n" + "\n".join(fails)
    assert proc.returncode == 0, proc.stdout[-3000:]
