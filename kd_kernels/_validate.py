"""Input checks shared by every public loss. Each raises ValueError or TypeError naming
the argument and the expected shape. They read only shapes, dtypes and devices (never
tensor values), so they cost nothing on the device and are safe under torch.compile."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(loss: str, name: str, t, shape_doc: str) -> None:
    """``t`` must be a floating tensor of one of the supported dtypes."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{loss}: {name} must be a torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{loss}: {name} must be float16, bfloat16, float32 or float64 (shape {shape_doc}), got {t.dtype}"
        )


def check_pair(
    loss: str,
    student,
    teacher,
    *,
    names: tuple[str, str] = ("student", "teacher"),
    ranks: Sequence[int] = (2,),
    min_rows: int = 1,
    same_last_dim: bool = False,
    row_what: str = "rows",
) -> None:
    """Check a (student, teacher) pair.

    Both must be floating tensors of a rank in ``ranks`` (2: ``[N, D]``; 3: ``[B, N, D]``),
    on the same device, with the same leading dims, at least ``min_rows`` rows (dim -2) and,
    when ``same_last_dim``, the same last dim (logits ``[N, C]``).
    """
    sn, tn = names
    last = "C" if same_last_dim else "Ds"
    last_t = "C" if same_last_dim else "Dt"
    doc_s = " or ".join(f"[{'B, ' if r == 3 else ''}N, {last}]" for r in ranks)
    doc_t = " or ".join(f"[{'B, ' if r == 3 else ''}N, {last_t}]" for r in ranks)
    check_tensor(loss, sn, student, doc_s)
    check_tensor(loss, tn, teacher, doc_t)
    if student.dim() not in ranks:
        raise ValueError(f"{loss}: {sn} must have shape {doc_s}, got {tuple(student.shape)}")
    if teacher.dim() != student.dim():
        raise ValueError(
            f"{loss}: {tn} must have shape {doc_t} with the same rank as {sn} "
            f"{tuple(student.shape)}, got {tuple(teacher.shape)}"
        )
    if student.device != teacher.device:
        raise ValueError(f"{loss}: {sn} is on {student.device} but {tn} is on {teacher.device}; put both on one device")
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"{loss}: {sn} {tuple(student.shape)} and {tn} {tuple(teacher.shape)} must agree in every dim "
            f"but the last (expected {doc_s} and {doc_t})"
        )
    if same_last_dim and student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"{loss}: {sn} {tuple(student.shape)} and {tn} {tuple(teacher.shape)} must have the same shape [N, C]"
        )
    if student.shape[-2] < min_rows:
        raise ValueError(f"{loss}: needs at least {min_rows} {row_what} (N >= {min_rows}), got N={student.shape[-2]}")
    if student.shape[-1] < 1 or teacher.shape[-1] < 1:
        raise ValueError(
            f"{loss}: the last dim of {sn} and {tn} must be >= 1, got {tuple(student.shape)}, {tuple(teacher.shape)}"
        )


def check_choice(loss: str, name: str, value, allowed: Sequence) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{loss}: {name} must be one of {tuple(allowed)}, got {value!r}")


def check_number(
    loss: str, name: str, value, *, positive: bool = False, nonneg: bool = False, lo=None, hi=None, integer=False
) -> None:
    """Python scalar checks (never a tensor: a tensor here would force a host sync)."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{loss}: {name} must be a Python {'int' if integer else 'number'}, got {type(value).__name__}")
    if not (-math.inf < value < math.inf):  # NaN fails every comparison; plain comparisons trace in dynamo
        raise ValueError(f"{loss}: {name} must be a finite number, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{loss}: {name} must be > 0, got {value}")
    if nonneg and not value >= 0:
        raise ValueError(f"{loss}: {name} must be >= 0, got {value}")
    if lo is not None and value < lo:
        raise ValueError(f"{loss}: {name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{loss}: {name} must be <= {hi}, got {value}")


def check_mask(loss: str, name: str, mask, expected_shape: tuple[int, ...], device: torch.device) -> None:
    """``mask`` must be None or a bool/0-1 tensor of ``expected_shape`` on ``device``."""
    if mask is None:
        return

    def doc() -> str:  # built only for a message: str() of a SymInt would specialise under torch.compile
        return "[" + ", ".join(str(s) for s in expected_shape) + "]"

    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{loss}: {name} must be a bool tensor of shape {doc()} or None, got {type(mask).__name__}")
    if mask.dtype.is_complex or (mask.dtype.is_floating_point and mask.dtype not in FLOAT_DTYPES):
        raise TypeError(f"{loss}: {name} must be a bool tensor (or integers/floats, nonzero = True), got {mask.dtype}")
    if tuple(mask.shape) != tuple(expected_shape):
        raise ValueError(f"{loss}: {name} must have shape {doc()}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{loss}: {name} is on {mask.device} but the inputs are on {device}")


# ---------------------------------------------------------------------------------------------
# Non-tensor keyword arguments: one spec per loss, checked by the function at every call and by
# its nn.Module at construction and on every assignment (``loss_fn.temperature = t``).
# A check is ``check(loss, name, value) -> None``; it raises ValueError/TypeError naming both.

ArgCheck = Callable[[str, str, object], None]


def choice(*allowed: str) -> ArgCheck:
    """A string argument that must be one of ``allowed`` (``None`` and non-strings are rejected)."""

    def check(loss: str, name: str, value) -> None:
        check_choice(loss, name, value, allowed)

    return check


def number(**bounds) -> ArgCheck:
    """A finite Python number; ``bounds`` are :func:`check_number`'s keywords (positive, nonneg, lo, hi, integer)."""

    def check(loss: str, name: str, value) -> None:
        check_number(loss, name, value, **bounds)

    return check


def optional(inner: ArgCheck) -> ArgCheck:
    """``None`` or a value that passes ``inner``."""

    def check(loss: str, name: str, value) -> None:
        if value is not None:
            inner(loss, name, value)

    return check


def flag(loss: str, name: str, value) -> None:
    """A Python bool (not a 0/1 int, not a tensor)."""
    if not isinstance(value, bool):
        raise TypeError(f"{loss}: {name} must be a bool, got {type(value).__name__}")


def backend_choice(loss: str, name: str, value) -> None:
    """``backend=``: one of ``"auto" | "cuda" | "triton" | "torch"`` (availability is resolved per call)."""
    from kd_kernels._backend import BACKENDS

    check_choice(loss, name, value, BACKENDS)


def check_args(loss: str, spec: Mapping[str, ArgCheck], **values) -> None:
    """Check each keyword value against its entry in ``spec`` (every key of ``values`` must be in ``spec``)."""
    for name, value in values.items():
        spec[name](loss, name, value)


# ---------------------------------------------------------------------------------------------
# Degenerate input (issue 9 item 5).


def check_batch(loss: str, name: str, t: torch.Tensor, shape_doc: str) -> None:
    """A batched (3-D) input must have at least one item: B = 0 has no mean over B (NaN)."""
    if t.dim() == 3 and t.shape[0] == 0:
        raise ValueError(f"{loss}: {name} must have at least one item (B >= 1) in {shape_doc}, got {tuple(t.shape)}")


def check_mask_rows(loss: str, name: str, mask, min_rows: int, why: str) -> None:
    """Every item of a keep-mask ``[N]`` / ``[B, N]`` must keep at least ``min_rows`` rows.

    This reads tensor values: it runs in eager mode only (one host sync on a CUDA mask) and is
    skipped while ``torch.compile`` traces (a data-dependent ``if`` would break the graph); there
    a mask keeping too few rows gives NaN (or the degenerate value the loss documents)."""
    if mask is None or torch.compiler.is_compiling():
        return
    kept = (mask != 0).sum(dim=-1)
    if bool((kept < min_rows).any()):
        fewest = int(kept.min())
        which = "" if mask.dim() == 1 else f" in item {int(kept.argmin())}"
        raise ValueError(
            f"{loss}: {name} must keep at least {min_rows} rows ({why}), got {fewest} kept rows{which}"
            + (" (an all-False mask)" if fewest == 0 else "")
        )
