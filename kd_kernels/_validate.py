"""Input checks shared by every public loss. Each raises ValueError or TypeError naming
the argument and the expected shape. They read only shapes, dtypes and devices (never
tensor values), so they cost nothing on the device and are safe under torch.compile."""

from __future__ import annotations

import math
from collections.abc import Sequence

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
    doc = "[" + ", ".join(str(s) for s in expected_shape) + "]"
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{loss}: {name} must be a bool tensor of shape {doc} or None, got {type(mask).__name__}")
    if mask.dtype.is_complex or (mask.dtype.is_floating_point and mask.dtype not in FLOAT_DTYPES):
        raise TypeError(f"{loss}: {name} must be a bool tensor (or integers/floats, nonzero = True), got {mask.dtype}")
    if tuple(mask.shape) != tuple(expected_shape):
        raise ValueError(f"{loss}: {name} must have shape {doc}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{loss}: {name} is on {mask.device} but the inputs are on {device}")
