"""The base of every loss module (``kd_kernels.nn``): live, validated keyword arguments.

A module stores the non-tensor keyword arguments of its function as plain attributes. They
are checked with the function's own argument spec (``kd_kernels/_validate.py``) at
construction and on every assignment, and read again at every ``forward``, so a schedule
such as ``loss_fn.temperature = t`` takes effect at the next call and a bad value fails
where it is given (``KDLoss(temperature=-1)`` raises, not the first forward).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from torch import nn

from kd_kernels._validate import ArgCheck, check_args

_LIVE_DOC = """The constructor takes the function's keyword arguments (the per-batch tensors excepted) and
checks them at once. They are plain attributes, validated on assignment and read at every
``forward``, so a schedule (``loss_fn.temperature = t`` between steps) takes effect at the
next call."""


def module_doc(head: str | None, function: Callable) -> str | None:
    """``head`` + the rule above + the function's full docstring (``None`` under ``python -OO``)."""
    if head is None or function.__doc__ is None:
        return head
    return (
        f"{inspect.cleandoc(head)}\n\n{_LIVE_DOC}\n\n"
        f"The function, :func:`kd_kernels.{function.__name__}`:\n\n{inspect.cleandoc(function.__doc__)}\n"
    )


class LossModule(nn.Module):
    """Stores the keyword arguments named by ``spec`` as attributes (validated); subclasses define ``forward``.

    Subclasses are declared as ``class KDLoss(LossModule, function=kd_loss, spec=KD_ARGS)``.
    """

    _function: ClassVar[Callable[..., Any]]
    _spec: ClassVar[Mapping[str, ArgCheck]] = {}

    def __init_subclass__(cls, function: Callable | None = None, spec: Mapping[str, ArgCheck] | None = None, **kw):
        super().__init_subclass__(**kw)
        if function is not None:
            cls._function = staticmethod(function)
            cls._spec = dict(spec or {})
            cls.__doc__ = module_doc(cls.__doc__, function)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        check_args(type(self).__name__, self._spec, **kwargs)
        for name, value in kwargs.items():
            super().__setattr__(name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        check = type(self)._spec.get(name)
        if check is not None:
            check(type(self).__name__, name, value)
        super().__setattr__(name, value)

    def arguments(self) -> dict[str, Any]:
        """The current keyword arguments, as passed to the function by ``forward``."""
        return {name: getattr(self, name) for name in self._spec}

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in self._spec)
