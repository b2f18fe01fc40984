#!/usr/bin/env bash
# Build a kd_kernels wheel with the CUDA extension, install it into a fresh venv, and check from a
# directory outside the repository that kd_kernels._C loads and has its kernel functions.
# No GPU needed. Called by .ci/run after the tests; usable on its own:
#   bash .ci/check_wheel.sh
# Environment (all optional):
#   PYTHON        the interpreter that builds the wheel; it must have torch (default .venv/bin/python)
#   TORCH_SPEC    torch for the fresh venv (default: the build interpreter's torch version, since the
#                 extension only loads under the torch it was built against)
#   WHEEL_DIR     where the wheel and its build log (build.log) go (default /tmp/kdwheel, emptied first)
#   WHEEL_VENV    the fresh venv (default /tmp/kd_wheel_venv, recreated)
#   CUDA_HOME, KD_KERNELS_CUDA_ARCHS, MAX_JOBS   as for setup.py
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-$REPO/.venv/bin/python}
WHEEL_DIR=${WHEEL_DIR:-/tmp/kdwheel}
WHEEL_VENV=${WHEEL_VENV:-/tmp/kd_wheel_venv}
TORCH_SPEC=${TORCH_SPEC:-torch==$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')}
export KD_KERNELS_BUILD_CUDA=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
start=$(date +%s)

echo "== building the wheel ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
rm -rf "$WHEEL_DIR" && mkdir -p "$WHEEL_DIR"
# KD_KERNELS_PTXAS_VERBOSE=1 adds -Xptxas -v: the build log ($WHEEL_DIR/build.log) carries the
# registers / spills / smem of every kernel instantiation, read by the CUDA C++ part of the compile
# gate (.ci/run: benchmarks/compile_gate.py --cuda-log).
if ! KD_KERNELS_PTXAS_VERBOSE=1 "$PY" -m pip wheel -v --no-build-isolation --no-deps -w "$WHEEL_DIR" . \
    > "$WHEEL_DIR/build.log" 2>&1; then
  tail -n 60 "$WHEEL_DIR/build.log" >&2
  echo "FAIL: the wheel build failed (log: $WHEEL_DIR/build.log)" >&2
  exit 1
fi
echo "== ptxas -v lines in the build log: $(grep -c 'ptxas info' "$WHEEL_DIR/build.log" || true)"
wheel=$(ls "$WHEEL_DIR"/kd_kernels-*.whl)
built=$(date +%s)
echo "== built $(basename "$wheel") in $((built - start)) s, $(du -h "$wheel" | cut -f1)"
if ! unzip -l "$wheel" | grep -E 'kd_kernels/_C\.[^/]*\.so$'; then
  echo "FAIL: the wheel has no kd_kernels/_C*.so" >&2
  exit 1
fi

echo "== installing it into a fresh venv ($WHEEL_VENV) with $TORCH_SPEC"
# The venv uses the build interpreter's base Python: the wheel is tagged for that Python version.
base_python=$("$PY" -c 'import sys; print(sys._base_executable)')
rm -rf "$WHEEL_VENV"
"$base_python" -m venv "$WHEEL_VENV"
"$WHEEL_VENV/bin/pip" install --quiet "$TORCH_SPEC" numpy
"$WHEEL_VENV/bin/pip" install --quiet --no-deps "$wheel"

echo "== checking the installed package from outside the repository"
cd "$(mktemp -d)"
"$WHEEL_VENV/bin/python" - "$REPO" <<'EOF'
import ast
import json
import sys
from pathlib import Path

import torch

import kd_kernels
import kd_kernels._C as ext

repo = Path(sys.argv[1]).resolve()
# The plain pybind11 functions of kd_kernels._C, in binding order: the one list, EXT_FUNCTIONS of
# tests/test_build.py (read from the repository, not imported: the tests are not in the wheel).
tree = ast.parse((repo / "tests" / "test_build.py").read_text())
FUNCTIONS = next(
    ast.literal_eval(node.value) for node in tree.body
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "EXT_FUNCTIONS" for t in node.targets)
)
where = Path(kd_kernels.__file__).resolve()
assert repo not in where.parents, f"imported kd_kernels from the repository ({where}), not from the wheel"
info = kd_kernels.build_info()
print(json.dumps(info, indent=1))
assert info["extension_loaded"], f"kd_kernels._C did not load: {info.get('extension_status')} {info['extension_error']}"
assert list(info["extension"]["ops"]) == list(FUNCTIONS), info["extension"]["ops"]
for name in FUNCTIONS:
    assert callable(getattr(ext, name, None)), f"kd_kernels._C has no function {name}"
try:
    ext.kd_fwd_cuda(torch.randn(2, 3), torch.randn(2, 3), 1.0)
except RuntimeError as exc:
    assert "must be a CUDA tensor" in str(exc), exc
else:
    raise AssertionError("kd_fwd_cuda ran on CPU tensors")
# The CPU kernels run here: the wheel's divergence loops against the PyTorch formula.
if ext.divergence_cpu_supported():
    s, t = torch.randn(5, 37), torch.randn(5, 37)
    rows = ext.divergence_fwd_cpu("kd", s, t, torch.ones(5, dtype=torch.bool), 2.0, 0.0)[0]
    want = 4.0 * torch.nn.functional.kl_div(torch.log_softmax(s / 2, 1), torch.log_softmax(t / 2, 1),
                                            reduction="none", log_target=True).sum(1)
    assert torch.allclose(rows, want, rtol=1e-5, atol=1e-6), (rows, want)
print(f"OK: kd_kernels {kd_kernels.__version__} from {where.parent}, _C functions: {', '.join(FUNCTIONS)}")
EOF
echo "== wheel check passed in $(($(date +%s) - start)) s"
