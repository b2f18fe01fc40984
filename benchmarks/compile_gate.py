"""GPU compile gate: proves on a CPU-only machine that every kernel is GPU-grade.

Triton part. The real launchers run on CPU tensors with Triton pointed at a stub CUDA driver
(``StubDriver``: current device/stream/target, a benchmarker that runs each autotune config
once) and ``triton.knobs.runtime.jit_cache_hook`` set to a recorder that stores the kernel and
its compile arguments and returns True, so nothing is compiled or launched during the dry run
(outputs stay uninitialised). Every distinct record (kernel + signature + constexprs + attrs +
options) is then compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc,
32))`` in a process pool, and the bundled ``ptxas -v`` reads registers, spills and shared
memory; the PTX shows tensor cores (``mma``/``wgmma``) and the atomics' memory semantics,
the SASS (bundled ``cuobjdump``) confirms HMMA/HGMMA and MEMBAR.

A kernel fails the gate on: a compile error; any spill (unless its module's
``GATE_SPILL_ALLOWANCE = {"_kernel": (bytes, "why")}`` allows it); a ``tt.dot`` in its TTIR
without an ``mma``/``wgmma`` in its PTX (fp16/bf16 inputs and fp32 under both precision
policies, tf32x3 and tf32); an atomic with acquire/release semantics or a memory fence (unless
``GATE_ATOMIC_ALLOWANCE = {"_kernel": "why"}`` allows it).

CUDA C++ part. ``parse_ptxas_log`` reads the ``ptxas -v`` output of an extension build
(``KD_KERNELS_PTXAS_VERBOSE=1``, see setup.py): registers, spills, shared memory per demangled
kernel instantiation and sm. Spills fail for float/half/bfloat16 instantiations (double may
spill; reported). ``sass_tensor_cores`` counts HMMA/HGMMA per function in the built .so with
``cuobjdump -sass``; a kernel whose name contains "gram" or "mma" (or is in
``CUDA_TENSOR_CORE_KERNELS``) must have them.

Usage:
  python benchmarks/compile_gate.py                      # CI mode: sm_90 every variant, sm_80 bf16
  python benchmarks/compile_gate.py --full               # every variant on sm_80 and sm_90
  python benchmarks/compile_gate.py --report benchmarks/results/compile_gate.md [--cuda-log build.log --cuda-so _C.so]
Exit status 1 when any kernel fails. TRITON_INTERPRET must be unset (the script removes it
and re-executes itself when it is set).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = ROOT / "build" / "compile_gate_cache"

# ------------------------------------------------------------------------------------ cases
# One entry per public loss with Triton kernels: the launcher module and a function that calls
# its launchers (forward and backward) for one input pair. The gate sweeps every entry over
# DTYPES x SHAPES x REDUCTIONS (x both fp32 policies). A new loss is one more entry here.
DTYPES = ("float32", "float16", "bfloat16")
# aligned (every stride and width a multiple of 16) and odd (divisibility attrs change)
SHAPES = {"aligned": (256, 128, 256), "odd": (97, 37, 61)}  # (N, Ds, Dt)
REDUCTIONS = ("mean", "none")  # "sum" specialises like "mean"
POLICIES = ("tf32x3", "tf32")  # fp32 only; fp16/bf16 are "native"


def _rkd_distance_case(mod, student, teacher, reduction):
    import torch

    loss, mu_s, mu_t = mod.rkd_distance_fwd_triton(student, teacher, reduction)
    n = student.shape[0]
    grad = torch.ones(n, n) if reduction == "none" else torch.tensor(1.0)
    mod.rkd_distance_bwd_triton(grad, student, teacher, mu_s, mu_t, reduction, True, True)
    mod.rkd_distance_bwd_triton(grad, student, teacher, mu_s, mu_t, reduction, True, False)


def _rkd_angle_case(mod, student, teacher, reduction):
    import torch

    mod.rkd_angle_fwd_triton(student, teacher, reduction)
    grad = torch.ones(student.shape[0]) if reduction == "none" else torch.tensor(1.0)
    mod.rkd_angle_bwd_triton(grad, student, teacher, reduction, True, True)
    mod.rkd_angle_bwd_triton(grad, student, teacher, reduction, True, False)


def _logit_inputs(student, reduction):
    """A teacher of the student's vocabulary, and a row mask for the "none" variant."""
    import torch

    teacher = torch.randn_like(student)
    return teacher, ((torch.arange(student.shape[0]) % 3 == 0) if reduction == "none" else None)


def _divergence_case(stem):
    def case(mod, student, teacher, reduction):
        import torch

        teacher, mask = _logit_inputs(student, reduction)
        rows, lse_s, lse_t = getattr(mod, f"{stem}_fwd_triton")(student, teacher, 2.0, mask)
        getattr(mod, f"{stem}_bwd_triton")(torch.ones_like(rows), student, teacher, lse_s, lse_t, 2.0, mask, True, False)

    return case


def _jsd_case(mod, student, teacher, reduction):
    import torch

    teacher, mask = _logit_inputs(student, reduction)
    for beta in (0.3, 0.0, 1.0):  # the mixture kernels, and the endpoints (KD / reverse-KL kernels)
        rows, lse_s, lse_t = mod.jsd_fwd_triton(student, teacher, beta, 2.0, mask)
        mod.jsd_bwd_triton(torch.ones_like(rows), student, teacher, lse_s, lse_t, beta, 2.0, mask, True, False)


def _dist_case(mod, student, teacher, reduction):
    import torch

    teacher, mask = _logit_inputs(student, reduction)
    loss, lse_s, lse_t, stats = mod.dist_fwd_triton(student, teacher, 2.0, 1.0, 1.0, mask)
    mod.dist_bwd_triton(torch.ones_like(loss), student, teacher, lse_s, lse_t, stats, 2.0, 1.0, 1.0, mask, True, False)


def _grkd_case(mod, student, teacher, reduction):
    import torch

    teacher, mask = _logit_inputs(student, reduction)
    for top_k in (None, 5):  # the full pair grid and the top-k (gathered) first classes
        loss, pairs = mod.grkd_fwd_triton(student, teacher, 2.0, top_k, mask)
        mod.grkd_bwd_triton(torch.ones_like(loss), student, teacher, pairs, 2.0, top_k, mask)


def _topk_case(kind):
    # divergences against a top-k teacher (kd_kernels/triton/topk.py): k = 5 entries of the
    # teacher's log-softmax (the student's dtype), both missing modes (renormalize: kd skips the
    # outside log-sum-exp; rest: every kind reads it), on the gate's vocabulary (many rows per
    # program) and on a wide one (V = 5001: one row per program, BLOCK_V = 2048, the GPU tile).
    # JSD: the mixture and both endpoints (the kd / reverse-KL modes without and with T^2).
    def case(mod, student, teacher, reduction):
        import torch

        betas = (0.3, 0.0, 1.0) if kind == "jsd" else (0.0,)
        for s in (student, torch.randn(3, 5001).to(student.dtype)):
            n, v = s.shape
            mask = (torch.arange(n) % 3 == 0) if reduction == "none" else None
            lp, idx = torch.log_softmax(torch.randn(n, v), dim=1).topk(min(5, v), dim=1)
            lp = lp.to(s.dtype)
            for rest in (False, True):
                for beta in betas:
                    rows, lse, lse_out = mod.topk_fwd_triton(s, idx, lp, kind, rest, beta, 2.0, mask)
                    mod.topk_bwd_triton(torch.ones_like(rows), s, idx, lp, lse, lse_out, kind, rest, beta, 2.0, mask)

    return case


def _geometry_case(stem):
    # gram / cka / relation in both forms: the D x D form (kd_kernels/triton/geometry.py; a teacher
    # of the student's width where N <= max(Ds, Dt)) and the N x N form (geometry_nn.py; the gate's
    # pair where N <= max(Ds, Dt), else a teacher of width N + 3). "mean": no mask, the default
    # flags; "none": a mask and the other flags (gram: no centring/normalisation, cka: unbiased),
    # so both row-load variants and the 'frob' / 'row' / no-scaling paths compile.
    def case(mod, student, teacher, reduction):
        import torch

        n = student.shape[0]
        nn = n <= max(student.shape[1], teacher.shape[1])
        dd_teacher = torch.randn(n, student.shape[1]).to(student.dtype) if nn else teacher
        nn_teacher = teacher if nn else torch.randn(n, n + 3).to(student.dtype)
        mask = (torch.arange(n) % 4 != 0) if reduction == "none" else None
        plain = reduction == "mean"
        flags = {"gram": (plain, plain), "cka": (not plain,), "relation": ()}[stem]
        for t in (dd_teacher, nn_teacher):
            out = getattr(mod, f"{stem}_fwd_triton")(student, t, mask, *flags)
            bwd = getattr(mod, f"{stem}_bwd_triton")
            bwd(torch.tensor(1.0), student, t, mask, *out[1:], *flags, True, True)
            bwd(torch.tensor(1.0), student, t, mask, *out[1:], *flags, True, False)

    return case


def _procrustes_case(mod, student, teacher, reduction):
    # the products pass and the one-sided backward GEMM (kd_kernels/triton/procrustes.py; the polar
    # factor is torch ops: SVD / eigh, or Newton–Schulz GEMMs). "mean": centred, no mask; "none":
    # a mask, no centring.
    import torch

    n = student.shape[0]
    mask = (torch.arange(n) % 4 != 0) if reduction == "none" else None
    center = reduction == "mean"
    out = mod.procrustes_fwd_triton(student, teacher, mask, center)
    mod.procrustes_bwd_triton(torch.tensor(1.0), student, teacher, mask, *out[1:], center, True, True)
    mod.procrustes_bwd_triton(torch.tensor(1.0), student, teacher, mask, *out[1:], center, True, False)


def _fused_linear_case(kind):
    # student / teacher are the hidden states [N, Hs] / [N, Ht]; heads of V = 512 (aligned) or 301
    # (odd) classes. "mean": no biases, no mask; "none": both biases and a mask. The backward runs
    # student-only and with every gradient (teacher row scalars, bias atomics), in chunks of 64
    # rows so the accumulating weight-gradient GEMM compiles too. JSD: the mixture and both
    # endpoints (their KL kernels).
    def case(mod, student, teacher, reduction):
        import torch

        n = student.shape[0]
        v = 512 if n % 16 == 0 else 301
        ws, wt = torch.randn(v, student.shape[1]).to(student.dtype), torch.randn(v, teacher.shape[1]).to(teacher.dtype)
        plain = reduction == "mean"
        bs = student.new_empty(0) if plain else torch.randn(v).to(student.dtype)
        bt = teacher.new_empty(0) if plain else torch.randn(v).to(teacher.dtype)
        mask = None if plain else torch.arange(n) % 3 == 0
        tensors = (student, ws, bs, teacher, wt, bt)
        student_only, every = (True, True, True, False, False, False), (True,) * 6
        runs = [((2.0,), student_only), ((2.0,), every)] if kind == "kd" else [
            ((0.3, 2.0), student_only), ((0.3, 2.0), every), ((0.0, 2.0), student_only), ((1.0, 2.0), every)]
        for scalars, needs in runs:
            rows, lse_s, lse_t = getattr(mod, f"fused_linear_{kind}_fwd_triton")(*tensors, *scalars, mask)
            getattr(mod, f"fused_linear_{kind}_bwd_triton")(torch.ones_like(rows), *tensors, lse_s, lse_t, *scalars,
                                                            mask, *needs, chunk_rows=64)  # fmt: skip

    return case


def _sinkhorn_case(mod, student, teacher, reduction):
    # batched log-domain Sinkhorn (kd_kernels/triton/sinkhorn.py) on B = 3 costs [3, n, m] in the
    # student's dtype: m = Ds (one tile per row on the GPU config, SINGLE_MAX = 256) and m = 300
    # (two sweeps over column tiles). "mean": per-problem costs, unrolled, no tol; "none": a shared
    # (stride-0) cost read for problem groups, tol checks and both saved modes. Backward with every
    # gradient and without the cost gradient (no dM buffer).
    import torch

    n, ds = student.shape
    for m in (ds, 300):
        if reduction == "mean":
            runs = [(torch.rand(3, n, m).to(student.dtype), 0.0, False)]
        else:
            shared = torch.rand(n, m).to(student.dtype).expand(3, n, m)
            runs = [(shared, 1e-3, False), (shared, 1e-3, True)]
        a, b = torch.full((3, n), 1.0 / n), torch.full((1, m), 1.0 / m).expand(3, m)
        for cost, tol, implicit in runs:
            plan, alphas, betas, n_run = mod.sinkhorn_fwd_triton(cost, a, b, 0.1, 3, tol, 1, implicit)
            for need_cost in (True, False):
                mod.sinkhorn_bwd_triton(torch.ones_like(plan), cost, a, b, alphas, betas, n_run, 0.1, 3, implicit,
                                        need_cost, True, True)  # fmt: skip


def _sinkhorn_loss_case(mod, student, teacher, reduction):
    # SinKD on a teacher of the student's classes. "mean": the gate's rows as they are (N = 256:
    # the "grid" regime, 2L + 2 launches; N = 97: "grid" with ragged blocks) and the first 64
    # ("fused", BB = 64, the largest one-program tile); every gradient combination. "none": the SinKD default B = 32 ("fused", BB = 32; teacher-only gradient) and
    # B = 24 over 20001 classes ("split": statistics, cost-span and sign-span grids, BB = 32).
    import torch

    shapes = [student, student[:64]] if reduction == "mean" else [student[:32], torch.randn(24, 20001).to(student.dtype)]
    for s in shapes:
        t = torch.randn_like(s)
        _, cost, u, v = mod.sinkhorn_loss_fwd_triton(s, t, 2.0, 0.1, 3)
        for needs in ((True, True), (True, False), (False, True)):
            mod.sinkhorn_loss_bwd_triton(torch.tensor(1.0), s, t, cost, u, v, 2.0, 0.1, *needs)


# loss -> (launcher module, case function)
# Losses that run other losses' kernels (no Triton kernel of their own to compile).
COMPOSITE_LOSSES = {"rkd_loss"}

TRITON_CASES = {
    "rkd_distance_loss": ("kd_kernels.triton.rkd", _rkd_distance_case),
    "rkd_angle_loss": ("kd_kernels.triton.rkd", _rkd_angle_case),
    "kd_loss": ("kd_kernels.triton.logit", _divergence_case("kd")),
    "reverse_kl_loss": ("kd_kernels.triton.logit", _divergence_case("reverse_kl")),
    "tvd_loss": ("kd_kernels.triton.logit", _divergence_case("tvd")),
    "gram_loss": ("kd_kernels.triton.geometry", _geometry_case("gram")),
    "cka_loss": ("kd_kernels.triton.geometry", _geometry_case("cka")),
    "relation_loss": ("kd_kernels.triton.geometry", _geometry_case("relation")),
    "procrustes_loss": ("kd_kernels.triton.procrustes", _procrustes_case),
    "jsd_loss": ("kd_kernels.triton.logit", _jsd_case),
    "dist_loss": ("kd_kernels.triton.logit", _dist_case),
    "grkd_loss": ("kd_kernels.triton.logit", _grkd_case),
    "fused_linear_kd_loss": ("kd_kernels.triton.fused_linear", _fused_linear_case("kd")),
    "fused_linear_jsd_loss": ("kd_kernels.triton.fused_linear", _fused_linear_case("jsd")),
    # TopKTeacher routes of kd_loss / reverse_kl_loss / jsd_loss / tvd_loss (one kernel pair)
    "topk_kd": ("kd_kernels.triton.topk", _topk_case("kd")),
    "topk_reverse_kl": ("kd_kernels.triton.topk", _topk_case("reverse_kl")),
    "topk_jsd": ("kd_kernels.triton.topk", _topk_case("jsd")),
    "topk_tvd": ("kd_kernels.triton.topk", _topk_case("tvd")),
    "sinkhorn_loss": ("kd_kernels.triton.sinkhorn_loss", _sinkhorn_loss_case),
    "sinkhorn": ("kd_kernels.triton.sinkhorn", _sinkhorn_case),
}

# CUDA C++ kernels that must use tensor cores besides those named *gram* / *mma*.
CUDA_TENSOR_CORE_KERNELS: set[str] = {
    "rkd_distance_tile_kernel", "rkd_laplacian_kernel", "rkd_angle_gram_kernel",
    "geometry_products_kernel", "geometry_grad_kernel",
}

# ------------------------------------------------------------------------------ tools


def triton_bin(name: str) -> str | None:
    """A binary bundled with Triton (ptxas, cuobjdump, nvdisasm), else the CUDA toolkit's."""
    try:
        import triton

        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if p.is_file():
            return str(p)
    except Exception:  # noqa: BLE001
        pass
    cuda = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name
    return str(cuda) if cuda.is_file() else shutil.which(name)


def tool_version(path: str | None) -> str | None:
    if not path:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except Exception:  # noqa: BLE001
        return None
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1] if out.strip() else None


def sm_name(cc: int) -> str:
    # Triton compiles sm_90 PTX for sm_90a (wgmma needs the arch-specific target)
    return f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"


# ------------------------------------------------------------------------ recording


class StubDriver:
    """Enough of a CUDA driver for the launchers to reach Triton's jit_cache_hook on the CPU."""

    def __init__(self, cc: int = 90):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", cc, 32)

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_device_interface(self):
        import torch

        return torch.cuda

    def get_benchmarker(self):
        # the autotuner "times" each config by calling it once: every config gets recorded
        def bench(fn, quantiles=None, **kwargs):
            fn()
            return [1.0, 1.0, 1.0] if quantiles else 1.0

        return bench

    def get_empty_cache_for_benchmark(self):
        import torch

        return torch.empty(1)

    def clear_cache(self, cache):
        pass


@dataclasses.dataclass
class Record:
    """One kernel specialisation a launcher asked for."""

    module: str
    kernel: str
    signature: dict
    constants: dict
    attrs: dict
    num_warps: int
    num_stages: int
    extra: dict  # other compile options (num_ctas, enable_fp_fusion, ...)
    variants: list  # [(loss, dtype, policy, shape, reduction)] that produced it

    def key(self) -> str:
        blob = repr((self.module, self.kernel, sorted(self.signature.items()), sorted(self.constants.items()),
                     sorted((k, repr(v)) for k, v in self.attrs.items()), self.num_warps, self.num_stages,
                     sorted(self.extra.items())))  # fmt: skip
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def constexprs_named(self) -> dict:
        names = list(self.signature)
        out = {}
        for path, val in self.constants.items():
            idx = path[0] if isinstance(path, tuple) else path
            name = names[idx] if isinstance(idx, int) and idx < len(names) else str(path)
            out[name] = val if isinstance(val, (int, float, str, bool)) or val is None else repr(val)
        return out


@contextlib.contextmanager
def recording(cc: int = 90):
    """Point Triton at StubDriver and collect every compile request; yields the list."""
    from triton import knobs
    from triton.runtime import autotuner, driver

    recs: list[dict] = []

    def hook(*args, **kwargs):
        recs.append(kwargs)
        return True

    old_hook = knobs.runtime.jit_cache_hook
    old_disk = getattr(autotuner.Autotuner, "check_disk_cache", None)
    old_driver = getattr(driver, "_active", None)  # reset_active() would build the real driver
    driver.set_active(StubDriver(cc))
    knobs.runtime.jit_cache_hook = hook
    if old_disk is not None:  # never reuse tuning results from disk: run (record) every config

        def no_disk(self, tuning_key, configs, bench_fn):
            bench_fn()
            return False

        autotuner.Autotuner.check_disk_cache = no_disk
    try:
        yield recs
    finally:
        knobs.runtime.jit_cache_hook = old_hook
        if old_disk is not None:
            autotuner.Autotuner.check_disk_cache = old_disk
        if hasattr(driver, "_active"):
            driver._active = old_driver


def _to_record(kw: dict, variant: tuple) -> Record:
    c = kw["compile"]
    fn = kw["fn"]
    jit = getattr(fn, "jit_function", None)
    attrs = c["configs"][0] if c.get("configs") else {}
    extra = {k: c[k] for k in ("num_ctas", "enable_fp_fusion", "launch_cooperative_grid") if k in c}
    try:  # options the hook's kwargs leave out (a launcher's maxnreg) are in the specialisation data
        maxnreg = json.loads(c.get("specialization_data") or "{}").get("options", {}).get("maxnreg")
    except ValueError:
        maxnreg = None
    if maxnreg is not None:
        extra["maxnreg"] = int(maxnreg)
    return Record(
        module=getattr(fn, "module", getattr(jit, "__module__", "?")),
        kernel=getattr(fn, "name", getattr(jit, "__name__", "?")),
        signature=dict(c["signature"]),
        constants=dict(c.get("constants", c.get("constexprs", {}))),
        attrs={k: [list(a) for a in v] for k, v in attrs.items()},
        num_warps=int(c["num_warps"]),
        num_stages=int(c["num_stages"]),
        extra=extra,
        variants=[variant],
    )


def record_triton(cases: dict | None = None) -> tuple[dict[str, Record], list[str]]:
    """Dry-run every case; returns (deduplicated records by key, errors)."""
    import torch

    cases = TRITON_CASES if cases is None else cases
    records: dict[str, Record] = {}
    errors: list[str] = []
    for loss, (modname, case) in cases.items():
        try:
            mod = importlib.import_module(modname)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{loss}: cannot import {modname}: {type(exc).__name__}: {exc}")
            continue
        for dtype in DTYPES:
            for policy in POLICIES if dtype == "float32" else ("native",):
                for shape, (n, ds, dt) in SHAPES.items():
                    for reduction in REDUCTIONS:
                        variant = (loss, dtype, policy, shape, reduction)
                        torch_dtype = getattr(torch, dtype)
                        student = torch.randn(n, ds).to(torch_dtype)
                        teacher = torch.randn(n, dt).to(torch_dtype)
                        old_tf32 = torch.backends.cuda.matmul.allow_tf32
                        old_prec = torch.get_float32_matmul_precision()
                        try:
                            torch.backends.cuda.matmul.allow_tf32 = policy == "tf32"
                            torch.set_float32_matmul_precision("high" if policy == "tf32" else "highest")
                            with recording() as recs:
                                case(mod, student, teacher, reduction)
                        except Exception as exc:  # noqa: BLE001
                            errors.append(f"{'/'.join(variant)}: launcher failed: {type(exc).__name__}: {exc}")
                            continue
                        finally:
                            torch.backends.cuda.matmul.allow_tf32 = old_tf32
                            torch.set_float32_matmul_precision(old_prec)
                        for kw in recs:
                            rec = _to_record(kw, variant)
                            k = rec.key()
                            if k in records:
                                if variant not in records[k].variants:
                                    records[k].variants.append(variant)
                            else:
                                records[k] = rec
    return records, errors


# ------------------------------------------------------------------------- analysis

_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers(.*)")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_MMA = re.compile(r"^\s*(?:@!?%p\d+\s+)?((?:wgmma\.mma_async|mma\.sync|tcgen05\.mma)[.\w]*)", re.MULTILINE)
_ATOM = re.compile(r"^\s*(?:@!?%p\d+\s+)?((?:atom|red)\.[.\w]*)", re.MULTILINE)
_FENCE = re.compile(r"^\s*(?:@!?%p\d+\s+)?((?:fence\.(?:sc|acq_rel)|membar)[.\w]*)", re.MULTILINE)
_SEMS = ("relaxed", "acquire", "release", "acq_rel", "sc")


def atomic_semantics(ptx: str) -> tuple[list[str], list[str]]:
    """(sorted semantics of every atom/red instruction, memory fences) in PTX. An atom without a
    .sem qualifier is relaxed (PTX ISA)."""
    sems = set()
    for ins in _ATOM.findall(ptx):
        parts = ins.split(".")
        sems.add(next((p for p in parts if p in _SEMS), "relaxed"))
    return sorted(sems), sorted(set(_FENCE.findall(ptx)))


def mma_flavours(ptx: str) -> list[str]:
    """Operand types of the tensor-core instructions, e.g. ['bf16', 'tf32']."""
    out = set()
    for ins in _MMA.findall(ptx):
        for t in ("tf32", "bf16", "f16", "e4m3", "e5m2", "s8", "f64"):
            if f".{t}" in ins:
                out.add(t)
                break
        else:
            out.add("?")
    return sorted(out)


def parse_ptxas_log(text: str) -> list[dict]:
    """Per (function, sm): registers, spill stores/loads, stack, smem, from `ptxas -v` output
    (a Triton PTX or a whole nvcc build log with -Xptxas -v)."""
    rows: list[dict] = []
    cur = None
    for line in text.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            cur = {"function": m.group(1), "sm": m.group(2), "registers": None, "spill_stores": 0,
                   "spill_loads": 0, "stack": 0, "smem": 0}  # fmt: skip
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = (int(g) for g in m.groups())
            continue
        m = _PTXAS_REGS.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            s = _PTXAS_SMEM.search(m.group(2))
            if s:
                cur["smem"] = int(s.group(1))
    return rows


def sass_counts(cubin: str, cuobjdump: str | None) -> dict[str, dict]:
    """Per function in a cubin/.so: HMMA/HGMMA/MEMBAR/atomic instruction counts from SASS."""
    if not cuobjdump:
        return {}
    try:
        out = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, timeout=600).stdout
    except Exception:  # noqa: BLE001
        return {}
    res: dict[str, dict] = {}
    cur = None
    arch = None
    for line in out.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = {"arch": arch, "hmma": 0, "hgmma": 0, "membar": 0, "atom": 0}
            res.setdefault(m.group(1), {})[arch or "?"] = cur
            continue
        if cur is None or "/*" not in line:
            continue
        ins = line.split("*/", 1)[-1]
        cur["hmma"] += " HMMA" in ins
        cur["hgmma"] += " HGMMA" in ins
        cur["membar"] += " MEMBAR" in ins
        cur["atom"] += bool(re.search(r"\b(RED|ATOM|ATOMG)\b", ins))
    return res


def _compile_one(job: tuple) -> dict:
    """Worker: compile one record for one cc, run ptxas -v and cuobjdump; returns a result row."""
    key, rec_d, cc, cache_dir = job
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    row = {"key": key, "cc": cc, "sm": sm_name(cc), "error": None}
    t0 = time.time()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        mod = importlib.import_module(rec_d["module"])
        fn = getattr(mod, rec_d["kernel"])
        fn = getattr(fn, "fn", fn) if not hasattr(fn, "params") else fn  # unwrap autotune/heuristics
        while not hasattr(fn, "params") and hasattr(fn, "fn"):
            fn = fn.fn
        attrs = {k: [tuple(a) for a in v] for k, v in rec_d["attrs"].items()}
        src = ASTSource(fn=fn, signature=rec_d["signature"], constexprs=rec_d["constants"], attrs=attrs)
        opts = {"num_warps": rec_d["num_warps"], "num_stages": rec_d["num_stages"]}
        opts.update({k: v for k, v in rec_d["extra"].items() if k in ("num_ctas", "enable_fp_fusion", "maxnreg")})
        ck = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)
        ttir, ptx = ck.asm.get("ttir", ""), ck.asm["ptx"]
        row["has_dot"] = bool(re.search(r"\btt\.dot(_scaled)?\b", ttir))
        row["mma"] = len(_MMA.findall(ptx))
        row["mma_types"] = mma_flavours(ptx)
        row["atomics"], row["fences"] = atomic_semantics(ptx)
        row["shared"] = int(getattr(ck.metadata, "shared", 0))
        # ptxas -v on the PTX (same flags as Triton's own ptxas step), cached by the PTX's hash
        h = hashlib.sha1((ptx + str(cc)).encode()).hexdigest()
        cdir = Path(cache_dir) / "gate"
        cdir.mkdir(parents=True, exist_ok=True)
        cached = cdir / f"{h}.json"
        if cached.is_file():
            info = json.loads(cached.read_text())
        else:
            with tempfile.TemporaryDirectory() as tmp:
                p = Path(tmp) / "k.ptx"
                p.write_text(ptx)
                cmd = [triton_bin("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_name(cc)}",
                       str(p), "-o", str(Path(tmp) / "k.cubin")]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                if proc.returncode != 0:
                    raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
                rows = parse_ptxas_log(proc.stderr)
                sass = sass_counts(str(Path(tmp) / "k.cubin"), triton_bin("cuobjdump"))
                info = {"ptxas": rows[0] if rows else {}, "sass": next(iter(sass.values()), {})}
            cached.write_text(json.dumps(info))
        pt = info["ptxas"]
        row.update(registers=pt.get("registers"), spill_stores=pt.get("spill_stores", 0),
                   spill_loads=pt.get("spill_loads", 0), stack=pt.get("stack", 0))  # fmt: skip
        sass = next(iter(info["sass"].values()), {}) if info["sass"] else {}
        row["sass_mma"] = sass.get("hmma", 0) + sass.get("hgmma", 0) if sass else None
        row["sass_membar"] = sass.get("membar") if sass else None
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
    row["seconds"] = round(time.time() - t0, 2)
    return row


def _allowances(module: str) -> tuple[dict, dict]:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001
        return {}, {}
    return dict(getattr(mod, "GATE_SPILL_ALLOWANCE", {}) or {}), dict(getattr(mod, "GATE_ATOMIC_ALLOWANCE", {}) or {})


def judge(rec: Record, row: dict) -> list[str]:
    """The reasons a compiled record fails the gate (empty: it passes)."""
    if row.get("error"):
        return [f"compile error: {row['error']}"]
    why = []
    spill_ok, atomic_ok = _allowances(rec.module)
    spill = row["spill_stores"] + row["spill_loads"]
    if spill:
        allowed = spill_ok.get(rec.kernel)
        if allowed is None or spill > allowed[0]:
            why.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads per thread")
    if row["has_dot"] and row["mma"] == 0:
        why.append("tt.dot without tensor-core instructions (no mma/wgmma in the PTX)")
    bad = [s for s in row["atomics"] if s != "relaxed"]
    if (bad or row["fences"]) and rec.kernel not in atomic_ok:
        why.append(f"non-relaxed atomics {bad or ''} {('fences ' + str(row['fences'])) if row['fences'] else ''}".strip())
    return why


def run_triton_gate(full: bool = False, jobs: int = 2, cache_dir: Path = DEFAULT_CACHE,
                    only: list[str] | None = None) -> dict:
    """Record, compile and judge every Triton kernel (``only``: these losses' cases); returns the report dict."""
    t0 = time.time()
    if only:
        unknown = sorted(set(only) - set(TRITON_CASES))
        if unknown:
            raise SystemExit(f"compile_gate: --only names no case: {unknown}; cases are {sorted(TRITON_CASES)}")
    records, errors = record_triton({k: v for k, v in TRITON_CASES.items() if k in only} if only else None)
    t_rec = time.time() - t0
    # missing cases: a loss that has a Triton kernel but no entry in TRITON_CASES
    try:
        from kd_kernels.testing import loss_kernels

        for loss, backends in loss_kernels().items():
            if "triton" in backends and loss not in TRITON_CASES and loss not in COMPOSITE_LOSSES:
                errors.append(f"{loss}: has a Triton kernel but no case in compile_gate.TRITON_CASES")
    except Exception:  # noqa: BLE001
        pass
    job_list = []
    for k, rec in records.items():
        ccs = [90]
        if full or any(v[1] == "bfloat16" for v in rec.variants):
            ccs.append(80)
        for cc in ccs:
            rec_d = dataclasses.asdict(rec)
            job_list.append((k, rec_d, cc, str(cache_dir)))
    cache_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    if jobs <= 1:
        rows = [_compile_one(j) for j in job_list]
    else:
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            rows = list(pool.map(_compile_one, job_list))
    results = []
    for row in rows:
        rec = records[row["key"]]
        fails = judge(rec, row)
        results.append({
            "kernel": rec.kernel, "module": rec.module,
            "variants": ["/".join(v[1:]) for v in rec.variants], "losses": sorted({v[0] for v in rec.variants}),
            "constexprs": rec.constexprs_named(), "num_warps": rec.num_warps, "num_stages": rec.num_stages,
            **{k: v for k, v in row.items() if k != "key"}, "failures": fails,
        })  # fmt: skip
    results.sort(key=lambda r: (r["kernel"], r["cc"], r["variants"][0]))
    import triton

    return {
        "triton": triton.__version__,
        "ptxas": tool_version(triton_bin("ptxas")),
        "mode": "full" if full else "ci",
        "records": len(records),
        "compiles": len(job_list),
        "seconds_record": round(t_rec, 1),
        "seconds_total": round(time.time() - t0, 1),
        "errors": errors,
        "results": results,
    }


# ------------------------------------------------------------------------------ CUDA C++


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cu++filt")
    if not Path(tool).is_file():
        tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    try:
        out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=60).stdout
        dem = out.splitlines()
        return dict(zip(names, dem)) if len(dem) == len(names) else {n: n for n in names}
    except Exception:  # noqa: BLE001
        return {n: n for n in names}


def _scalar_kind(name: str) -> str:
    if re.search(r"\bdouble\b", name):
        return "double"
    if re.search(r"BFloat16|bfloat16|__nv_bfloat16", name):
        return "bfloat16"
    if re.search(r"\bHalf\b|\b__half\b|\bhalf\b", name):
        return "half"
    if re.search(r"\bfloat\b", name):
        return "float"
    return "?"


def cuda_gate(log_path: str | None, so_path: str | None) -> dict:
    """Parse a CUDA C++ build log (ptxas -v) and the built .so's SASS; judge every instantiation."""
    out: dict = {"log": log_path, "so": so_path, "results": [], "errors": []}
    if not log_path or not Path(log_path).is_file():
        out["errors"].append(f"no CUDA build log at {log_path!r} (build with KD_KERNELS_PTXAS_VERBOSE=1)")
        return out
    rows = parse_ptxas_log(Path(log_path).read_text(errors="replace"))
    # keep only kernels of this project (torch's own headers compile none, but be safe) and dedupe
    seen = {}
    for r in rows:
        seen[(r["function"], r["sm"])] = r
    rows = list(seen.values())
    names = demangle(sorted({r["function"] for r in rows}))
    sass = sass_counts(so_path, shutil.which("cuobjdump") or triton_bin("cuobjdump")) if so_path else {}
    out["nvcc"] = tool_version(shutil.which("nvcc") or str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin/nvcc"))
    for r in sorted(rows, key=lambda r: (names[r["function"]], r["sm"])):
        dem = names[r["function"]]
        kind = _scalar_kind(dem)
        short = re.sub(r"\(.*$", "", re.sub(r"^void ", "", dem.replace("(anonymous namespace)::", "")))
        base = re.sub(r"<.*$", "", short).split("::")[-1]
        arch = r["sm"].rstrip("a")
        s = sass.get(r["function"], {})
        sa = s.get(arch) or s.get(r["sm"]) or (next(iter(s.values())) if s else None)
        tc = None if sa is None else sa["hmma"] + sa["hgmma"]
        fails = []
        if (r["spill_stores"] or r["spill_loads"]) and kind != "double":
            fails.append(f"spills {r['spill_stores']} B stores / {r['spill_loads']} B loads ({kind})")
        expects_tc = "gram" in base.lower() or "mma" in base.lower() or base in CUDA_TENSOR_CORE_KERNELS
        if expects_tc and kind != "double" and tc == 0:
            fails.append("expected tensor cores (HMMA/HGMMA), SASS has none")
        out["results"].append({
            "kernel": short, "mangled": r["function"], "dtype": kind, "sm": r["sm"], "registers": r["registers"],
            "spill_stores": r["spill_stores"], "spill_loads": r["spill_loads"], "smem": r["smem"],
            "tensor_cores": tc, "expects_tensor_cores": expects_tc,
            "double_spill_ok": kind == "double" and bool(r["spill_stores"] or r["spill_loads"]), "failures": fails,
        })  # fmt: skip
    if not rows:
        out["errors"].append(f"{log_path}: no 'ptxas info' lines (was the build run with -Xptxas -v?)")
    return out


# --------------------------------------------------------------------------------- report


def failures(report: dict) -> list[str]:
    lines = [f"triton: {e}" for e in report["triton"].get("errors", [])]
    for r in report["triton"].get("results", []):
        for f in r["failures"]:
            lines.append(f"triton {r['kernel']} [{', '.join(r['variants'][:3])}{' ...' if len(r['variants']) > 3 else ''}] {r['sm']}: {f}")
    cu = report.get("cuda")
    if cu:
        lines += [f"cuda: {e}" for e in cu.get("errors", []) if cu.get("required")]
        for r in cu["results"]:
            for f in r["failures"]:
                lines.append(f"cuda {r['kernel']} {r['sm']}: {f}")
    return lines


def _fmt_variants(vs: list[str]) -> str:
    return "<br>".join(vs) if len(vs) <= 4 else "<br>".join(vs[:4]) + f"<br>(+{len(vs) - 4})"


def markdown(report: dict) -> str:
    t = report["triton"]
    L = [
        "# GPU compile gate",
        "",
        f"Generated {report['date']} by `benchmarks/compile_gate.py` (mode {t.get('mode')}), "
        f"triton {t.get('triton')}, ptxas {t.get('ptxas')}, git {report.get('git')}.",
        "",
        "Compiled without a GPU: the launchers' own specialisations, `triton.compile` for each "
        "sm, `ptxas -v` for registers/spills. Tensor cores: mma/wgmma instructions in the PTX "
        "(operand types in brackets), HMMA/HGMMA count in SASS. Atomics: memory semantics of every "
        "atom/red in the PTX. Variants: dtype/policy/shape/reduction.",
        "",
        f"**Result: {'PASS' if not report['failures'] else 'FAIL (' + str(len(report['failures'])) + ')'}**",
        "",
    ]
    if report["failures"]:
        L += ["## Failures", ""] + [f"- {f}" for f in report["failures"]] + [""]
    L += ["## Triton", "", f"{t.get('records')} distinct specialisations, {t.get('compiles')} compiles, "
          f"{t.get('seconds_total')} s.", "",
          "| kernel | variants | sm | warps/stages | registers | spills (st/ld B) | smem B | tensor cores | atomics | status |",
          "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in t.get("results", []):
        if r.get("error"):
            L.append(f"| `{r['kernel']}` | {_fmt_variants(r['variants'])} | {r['sm']} | | | | | | | compile error |")
            continue
        tc = "—" if not r["has_dot"] else (f"yes {r['mma']} ({','.join(r['mma_types'])}), SASS {r['sass_mma']}" if r["mma"] else "**no**")
        at = ", ".join(r["atomics"]) or "none"
        if r["fences"]:
            at += " + " + ", ".join(r["fences"])
        status = "ok" if not r["failures"] else "**FAIL**: " + "; ".join(r["failures"])
        if not r["failures"] and (r["spill_stores"] or r["spill_loads"]):
            status = "allowed spill (`GATE_SPILL_ALLOWANCE`)"
        L.append(f"| `{r['kernel']}` | {_fmt_variants(r['variants'])} | {r['sm']} | {r['num_warps']}/{r['num_stages']} | "
                 f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['shared']} | {tc} | {at} | {status} |")  # fmt: skip
    cu = report.get("cuda")
    if cu:
        L += ["", "## CUDA C++", "", f"Build log `{cu.get('log')}`, SASS of `{cu.get('so')}`, nvcc {cu.get('nvcc')}. "
              "double instantiations may spill (reported, not failed).", ""]  # fmt: skip
        L += [f"- {e}" for e in cu.get("errors", [])]
        L += ["| kernel | dtype | sm | registers | spills (st/ld B) | smem B | tensor cores (SASS) | status |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in cu["results"]:
            tc = "?" if r["tensor_cores"] is None else ("yes " + str(r["tensor_cores"]) if r["tensor_cores"] else "no")
            status = "ok" if not r["failures"] else "**FAIL**: " + "; ".join(r["failures"])
            if r["double_spill_ok"]:
                status += " (double: spill allowed)"
            L.append(f"| `{r['kernel']}` | {r['dtype']} | {r['sm']} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | "
                     f"{r['smem']} | {tc} | {status} |")  # fmt: skip
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="every variant on sm_80 and sm_90 (default: sm_80 for bf16 only)")
    ap.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    ap.add_argument("--report", help="write a markdown report here (and a .json next to it)")
    ap.add_argument("--json", help="write the JSON report here")
    ap.add_argument("--cuda-log", help="CUDA C++ build log with ptxas -v output")
    ap.add_argument("--cuda-so", help="the built kd_kernels._C .so (SASS: tensor cores)")
    ap.add_argument("--require-cuda", action="store_true", help="fail when the CUDA log is missing or empty")
    ap.add_argument("--no-triton", action="store_true", help="CUDA C++ part only")
    ap.add_argument("--only", help="comma-separated losses: gate only their Triton cases (a quick check while developing)")
    ap.add_argument("--cache-dir", default=os.environ.get("KD_KERNELS_GATE_CACHE", str(DEFAULT_CACHE)))
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env=env)
    cache = Path(args.cache_dir)
    os.environ["TRITON_CACHE_DIR"] = str(cache)
    sys.path.insert(0, str(ROOT))
    report: dict = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        report["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip()  # fmt: skip
    except Exception:  # noqa: BLE001
        report["git"] = None
    report["triton"] = {"results": [], "errors": []} if args.no_triton else run_triton_gate(
        args.full, args.jobs, cache, only=[x.strip() for x in args.only.split(",") if x.strip()] if args.only else None)
    if args.cuda_log or args.cuda_so:
        report["cuda"] = cuda_gate(args.cuda_log, args.cuda_so)
        report["cuda"]["required"] = args.require_cuda
    report["failures"] = failures(report)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(markdown(report))
        Path(args.json or Path(args.report).with_suffix(".json")).write_text(json.dumps(report, indent=1, default=str))
    elif args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    t = report["triton"]
    print(f"compile gate ({t.get('mode', 'cuda-only')}): {t.get('records', 0)} Triton specialisations, "
          f"{t.get('compiles', 0)} compiles in {t.get('seconds_total', 0)} s; "
          f"{len(report.get('cuda', {}).get('results', []))} CUDA C++ instantiations")  # fmt: skip
    for r in t.get("results", []):
        print(f"  {r['kernel']:<34} {r['sm']:<7} regs {r.get('registers')!s:>4} spill {r.get('spill_stores')}/{r.get('spill_loads')}"
              f" mma {r.get('mma')} atomics {','.join(r.get('atomics') or []) or '-'} {'OK' if not r['failures'] else 'FAIL'}")  # fmt: skip
    if report["failures"]:
        print("GATE FAILURES:")
        for f in report["failures"]:
            print("  " + f)
        return 1
    print("GATE PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
