"""One way to define a loss's custom ops: :func:`define_loss_op`.

A loss has two ``torch.library`` custom ops, ``kd_kernels::<name>_fwd`` and
``kd_kernels::<name>_bwd``. Each ``kd_kernels/ops/<family>.py`` states only their contract
(the two schemas, the forward's fake, the kernels per backend); this module derives the rest:
the backward's fake, the autograd registration, the backend dispatch, the float64 routing, the
autocast rule and the second-order-gradient error. The math of each loss is in ``docs/<family>.md``.

Kernels are referenced with :func:`lazy` (a Triton launcher, imported on first call) and
:func:`cuda_function` (a plain function of the compiled extension ``kd_kernels._C``, called
directly: no op inside an op).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.utils._python_dispatch

from kd_kernels import _backend

__all__ = ["LOSS_OPS", "LossOps", "call", "cuda_function", "define_loss_op", "lazy"]

# Backends whose kernels do not run float64: a float64 input goes to the "torch" kernel
# (docs/precision.md), decided here once for every op.
_ROUTED_TO_TORCH_FOR_FLOAT64 = ("triton", "cuda")


# Autocast rule (README "Autocast"): autocast never reaches into a loss op. Inside an autocast
# region the op computes in the dtypes of the tensors it is given, as outside: fp32 inputs stay
# fp32 (fp32-faithful, no silent fp16/bf16 GEMMs), fp16/bf16 inputs stay in their dtype with fp32
# accumulation; mixed inputs follow the op's own promotion. Forward and backward alike, so a
# backward run inside or outside the region sees the forward's dtypes.
_AUTOCAST_DEVICES = ("cpu", "cuda")


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """Disable every enabled autocast (CPU, CUDA) for the duration: the op's kernels run as called."""
    with contextlib.ExitStack() as stack:
        for device in _AUTOCAST_DEVICES:
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device_type=device, enabled=False))
        yield


class LossOps(NamedTuple):
    """What :func:`define_loss_op` defined: the two ops and the (live) backend table."""

    fwd: object
    bwd: object
    kernels: dict
    grads: tuple[str, ...]


# name -> LossOps, for every loss defined through the helper (tests iterate over it).
LOSS_OPS: dict[str, LossOps] = {}


def lazy(module: str, name: str) -> Callable:
    """``module.name``, imported on first call (Triton is imported lazily)."""

    def call(*args):
        return getattr(importlib.import_module(module), name)(*args)

    call.__name__ = name
    return call


def cuda_function(name: str, *, precision: bool = False) -> Callable:
    """``kd_kernels._C.<name>``, looked up at call time (the extension loads on first use).

    With ``precision=True`` the function gets ``kd_kernels._backend.fp32_dot_precision()``
    (``"tf32"`` or ``"tf32x3"``, read at each call) as its last argument.
    """

    def call(*args):
        ext = _backend.load_extension()
        if ext is None:
            raise RuntimeError(f"{name}: the compiled extension kd_kernels._C did not load ({_backend.extension_status()})")
        fn = getattr(ext, name, None)
        if fn is None:
            raise RuntimeError(f"{name}: kd_kernels._C has no function {name!r} (rebuild the extension)")
        return fn(*args, _backend.fp32_dot_precision()) if precision else fn(*args)

    call.__name__ = name
    return call


def _is_tensor(arg) -> bool:
    return arg.type.isSubtypeOf(torch._C.OptionalType.ofTensor())


def _empty_grad(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


def define_loss_op(
    name: str,
    *,
    fwd_schema: str,
    bwd_schema: str,
    fake_fwd: Callable,
    kernels: dict[str, tuple[Callable, Callable]],
) -> tuple:
    """Define ``kd_kernels::<name>_fwd`` and ``kd_kernels::<name>_bwd``; return ``(fwd, bwd)``.

    Args:
        name: the loss's stem, e.g. ``"rkd_distance"``.
        fwd_schema: ``"(<args>, str backend) -> (Tensor loss, Tensor <saved>, ...)"``. Output 0
            is the loss (the only differentiable output); the others are statistics saved for
            the backward and are marked non-differentiable.
        bwd_schema: ``"(Tensor grad, <args>, str backend) -> (Tensor grad_<x>, ...)"``, wired by
            name: the first argument receives the gradient of output 0; an argument named like
            a forward argument or output receives that value (saved by the autograd context:
            tensors through ``save_for_backward``, the rest on the context); ``bool need_<x>``
            receives ``ctx.needs_input_grad`` of forward argument ``x``; ``str backend`` is the
            forward's backend. It returns ``grad_<x>`` for each differentiable forward argument
            ``x`` (which must also be a backward argument): contiguous, ``x``'s shape and dtype,
            or an empty tensor (``numel() == 0``) when ``need_<x>`` is False; autograd gets
            ``None`` for a gradient not needed. Without ``need_*`` flags the op computes every
            gradient and is called only when one of them is needed.
        fake_fwd: shapes and dtypes of the forward's outputs (its arguments minus ``backend``).
            The backward's fake follows from its schema (see above).
        kernels: ``{backend: (forward, backward)}``: functions taking the op's arguments
            minus ``backend``, in order; the forward returns the outputs, the backward the
            gradients (``None`` is accepted for an unneeded one). The table stays live: an
            entry added later is used.

    Dispatch: an unknown backend raises ``NotImplementedError`` naming the available ones. A
    float64 tensor argument with backend ``"triton"`` or ``"cuda"`` runs the ``"torch"`` kernel
    (float64 throughout; docs/precision.md).

    Autocast never reaches into the kernels (module comment above ``autocast_off``): they run
    in the dtypes of the tensors they are given, inside an autocast region or not.

    Second-order gradients are not supported: differentiating through the backward
    (``create_graph=True``, then a gradient of the gradients) raises ``RuntimeError(
    "kd_kernels::<name>_bwd: second-order gradients (double backward) are not supported")``.
    """
    fwd_name, bwd_name = f"kd_kernels::{name}_fwd", f"kd_kernels::{name}_bwd"
    fs = torch._C.parse_schema(fwd_name + fwd_schema)
    bs = torch._C.parse_schema(bwd_name + bwd_schema)
    f_args, b_args = list(fs.arguments), list(bs.arguments)
    for op, args in ((fwd_name, f_args), (bwd_name, b_args)):
        if not args or args[-1].name != "backend" or str(args[-1].type) != "str":
            raise ValueError(f"{op}: the last argument must be 'str backend'")
    f_index = {a.name: i for i, a in enumerate(f_args)}
    f_outputs = {r.name: i for i, r in enumerate(fs.returns)}
    b_index = {a.name: i for i, a in enumerate(b_args)}
    grads = tuple(r.name.removeprefix("grad_") for r in bs.returns)
    for r, x in zip(bs.returns, grads, strict=True):
        if not r.name.startswith("grad_") or x not in f_index or x not in b_index:
            raise ValueError(f"{bwd_name}: return {r.name!r} must be grad_<x> for an argument x of both ops")
    grad_pos = tuple(f_index[x] for x in grads)

    # How each backward argument is obtained: ("grad",), ("tensor", k), ("const", k),
    # ("need", forward index), ("backend",).
    tensor_sources: list[tuple[str, int]] = []  # ("in" | "out", index) saved with save_for_backward
    const_sources: list[int] = []  # forward argument indices stored on ctx
    plan: list[tuple] = [("grad",)]
    for a in b_args[1:-1]:
        if a.name.startswith("need_") and a.name[5:] in grads:
            plan.append(("need", f_index[a.name[5:]]))
        elif a.name in f_index:
            if str(a.type) != str(f_args[f_index[a.name]].type):
                raise ValueError(f"{bwd_name}: argument {a.name!r} must have the forward's type")
            if _is_tensor(a):
                plan.append(("tensor", len(tensor_sources)))
                tensor_sources.append(("in", f_index[a.name]))
            else:
                plan.append(("const", len(const_sources)))
                const_sources.append(f_index[a.name])
        elif a.name in f_outputs and f_outputs[a.name] > 0:
            plan.append(("tensor", len(tensor_sources)))
            tensor_sources.append(("out", f_outputs[a.name]))
        else:
            raise ValueError(f"{bwd_name}: argument {a.name!r} is neither a forward argument, output nor need_<x>")
    plan.append(("backend",))
    need_flags = {b_index[f"need_{x}"]: x for x in grads if f"need_{x}" in b_index}

    def kernel(op: str, which: int, args: tuple):
        backend = args[-1]
        if backend not in kernels:
            raise NotImplementedError(f"{op}: no {backend!r} kernel (available: {tuple(kernels)})")
        if backend in _ROUTED_TO_TORCH_FOR_FLOAT64 and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in args
        ):
            backend = "torch"
        return kernels[backend][which]

    def fwd_impl(*args):
        with autocast_off():
            return kernel(fwd_name, 0, args)(*args[:-1])

    def bwd_impl(*args):
        with autocast_off():
            out = kernel(bwd_name, 1, args)(*args[:-1])
        out = (out,) if len(grads) == 1 and not isinstance(out, (tuple, list)) else tuple(out)
        likes = [args[b_index[x]] for x in grads]
        return _one([_empty_grad(x) if g is None else g.contiguous() for g, x in zip(out, likes, strict=True)])

    def bwd_fake(*args):
        out = []
        for x in grads:
            like = args[b_index[x]]
            need = True
            for i, flag_of in need_flags.items():
                if flag_of == x:
                    need = args[i]
            out.append(torch.empty_like(like, memory_format=torch.contiguous_format) if need else like.new_empty(0))
        return _one(out)

    fwd = torch.library.custom_op(fwd_name, fwd_impl, mutates_args=(), schema=fwd_schema)
    bwd = torch.library.custom_op(bwd_name, bwd_impl, mutates_args=(), schema=bwd_schema)
    fwd.register_fake(lambda *args: fake_fwd(*args[:-1]))
    bwd.register_fake(bwd_fake)

    def setup_context(ctx, inputs, output):
        outputs = output if isinstance(output, tuple) else (output,)
        if len(outputs) > 1:
            ctx.mark_non_differentiable(*outputs[1:])
        ctx.set_materialize_grads(False)  # no zero tensors for the saved (non-differentiable) outputs
        ctx.save_for_backward(*((inputs if kind == "in" else outputs)[i] for kind, i in tensor_sources))
        ctx.consts = tuple(inputs[i] for i in const_sources)
        ctx.backend = inputs[-1]

    def backward(ctx, grad, *_unused, eager: bool = False):
        needs = ctx.needs_input_grad
        result = [None] * len(f_args)
        if grad is None or not any(needs[i] for i in grad_pos):
            return tuple(result)
        saved = ctx.saved_tensors
        args = []
        for source in plan:
            kind = source[0]
            if kind == "grad":
                args.append(grad)
            elif kind == "tensor":
                args.append(saved[source[1]])
            elif kind == "const":
                args.append(ctx.consts[source[1]])
            elif kind == "need":
                args.append(bool(needs[source[1]]))
            else:
                args.append(ctx.backend)
        # eager (the autograd.Function below) without create_graph: the kernels directly; else the
        # op, whose autograd raises the double-backward error
        out = bwd_impl(*args) if eager and not torch.is_grad_enabled() else bwd(*args)
        out = (out,) if len(grads) == 1 else out
        for i, g in zip(grad_pos, out, strict=True):
            result[i] = g if needs[i] else None
        return tuple(result)

    fwd.register_autograd(backward, setup_context=setup_context)

    def no_double_backward(ctx, *_grads):
        raise RuntimeError(
            f"{bwd_name}: second-order gradients (double backward) are not supported; "
            f"the backward of {fwd_name} is not differentiable"
        )

    bwd.register_autograd(no_double_backward)

    class Eager(torch.autograd.Function):
        """The same forward, saved state and backward as the op, without the custom-op
        dispatch (~100 us per forward + backward on the CPU): :func:`call` uses it in eager mode."""

        @staticmethod
        def forward(ctx, *args):
            out = fwd_impl(*args)
            outputs = out if isinstance(out, tuple) else (out,)
            setup_context(ctx, args, out)
            return outputs if len(fs.returns) > 1 else outputs[0]

        @staticmethod
        def backward(ctx, grad, *_unused):
            return backward(ctx, grad, eager=True)

    Eager.__name__ = Eager.__qualname__ = f"{name}_eager"
    _EAGER[fwd] = Eager
    LOSS_OPS[name] = LossOps(fwd, bwd, kernels, grads)
    return fwd, bwd


# forward op -> its eager autograd.Function (define_loss_op)
_EAGER: dict = {}
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _traced(args: tuple) -> bool:
    """True when something records or transforms the call (torch.compile / export, FX or JIT
    tracing, functorch transforms, a dispatch mode, tensor subclasses, meta/fake tensors): the op
    must be called then, so that its schema, fake and registered autograd are what is seen."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active():
        return True
    if torch.utils._python_dispatch._get_current_dispatch_mode() is not None:
        return True
    return any(
        isinstance(a, torch.Tensor) and (type(a) not in _PLAIN_TENSORS or a.device.type not in ("cpu", "cuda"))
        for a in args
    )


def call(fwd, *args):
    """Run the forward op ``fwd`` of :func:`define_loss_op` (the public losses call this).

    In plain eager mode it runs the op's kernels through an equivalent ``torch.autograd.Function``
    (same outputs, saved tensors, backward and double-backward error; no custom-op dispatch, which
    costs more than the whole computation at small sizes on the CPU). Whenever something traces
    or transforms the call (see :func:`_traced`) it calls the op itself.
    """
    if _traced(args):
        return fwd(*args)
    return _EAGER[fwd].apply(*args)


def _one(out: list):
    return out[0] if len(out) == 1 else tuple(out)
