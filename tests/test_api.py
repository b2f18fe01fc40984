"""The public API against the API contract (the README's API section): names, argument order, defaults,
function <-> module parity, backend handling, build information, and every public
function under torch.compile(fullgraph=True)."""

from __future__ import annotations

import inspect

import pytest
import torch

import kd_kernels
import kd_kernels.functional as KF
import kd_kernels.nn as KN
from kd_kernels.testing import assert_close

# The API contract, transcribed: function -> (module, positional tensors, keyword-only defaults in order).
# Per-batch tensors that the contract lists beside the table (geometry `mask`, logit
# `ignore_mask`) are keyword arguments of the function and forward() arguments of the module.
LOGIT = ("student_logits", "teacher_logits")
FUSED = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")
API = {
    "rkd_distance_loss": ("RKDDistanceLoss", ("student", "teacher"), {"reduction": "mean", "backend": "auto"}),
    "rkd_angle_loss": ("RKDAngleLoss", ("student", "teacher"), {"reduction": "mean", "backend": "auto"}),
    "rkd_loss": ("RKDLoss", ("student", "teacher"), {"distance_weight": 25.0, "angle_weight": 50.0, "backend": "auto"}),
    "gram_loss": (
        "GramLoss",
        ("student", "teacher"),
        {"center": True, "normalize": True, "mask": None, "backend": "auto"},
    ),
    "procrustes_loss": ("ProcrustesLoss", ("student", "teacher"), {"center": True, "mask": None, "backend": "auto"}),
    "cka_loss": ("CKALoss", ("student", "teacher"), {"unbiased": False, "mask": None, "backend": "auto"}),
    "relation_loss": ("RelationLoss", ("student", "teacher"), {"mask": None, "backend": "auto"}),
    "sinkhorn_loss": (
        "SinkhornLoss",
        LOGIT,
        {"temperature": 2.0, "epsilon": 0.1, "n_iters": 20, "backend": "auto"},
    ),
    "sinkhorn": (None, ("cost",), {"epsilon": 0.1, "n_iters": 100, "a": None, "b": None, "tol": None, "grad": "unrolled",
                               "backend": "auto", "check_every": 10, "return_n_iters": False}),
    "kd_loss": (
        "KDLoss",
        LOGIT,
        {"temperature": 4.0, "reduction": "batchmean", "ignore_mask": None, "backend": "auto"},
    ),
    "reverse_kl_loss": (
        "ReverseKLLoss",
        LOGIT,
        {"temperature": 1.0, "reduction": "batchmean", "ignore_mask": None, "backend": "auto"},
    ),
    "jsd_loss": (
        "JSDLoss",
        LOGIT,
        {"beta": 0.5, "temperature": 1.0, "reduction": "batchmean", "ignore_mask": None, "backend": "auto"},
    ),
    "tvd_loss": (
        "TVDLoss",
        LOGIT,
        {"temperature": 1.0, "reduction": "batchmean", "ignore_mask": None, "backend": "auto"},
    ),
    "dist_loss": (
        "DISTLoss",
        LOGIT,
        {"temperature": 1.0, "inter_weight": 1.0, "intra_weight": 1.0, "ignore_mask": None, "backend": "auto"},
    ),
    "grkd_loss": ("GRKDLoss", LOGIT, {"temperature": 1.0, "top_k": None, "ignore_mask": None, "backend": "auto"}),
    "fused_linear_kd_loss": (
        "FusedLinearKDLoss",
        FUSED,
        {
            "student_bias": None,
            "teacher_bias": None,
            "temperature": 4.0,
            "reduction": "batchmean",
            "ignore_mask": None,
            "backend": "auto",
        },
    ),
    "fused_linear_jsd_loss": (
        "FusedLinearJSDLoss",
        FUSED,
        {
            "student_bias": None,
            "teacher_bias": None,
            "beta": 0.5,
            "temperature": 1.0,
            "reduction": "batchmean",
            "ignore_mask": None,
            "backend": "auto",
        },
    ),
}
PER_BATCH = ("mask", "ignore_mask", "student_bias", "teacher_bias")


def sample_inputs(name: str, dtype=torch.float32):
    """Small valid inputs for each public function."""
    if name.startswith("rkd"):
        return torch.randn(7, 5, dtype=dtype), torch.randn(7, 3, dtype=dtype)
    if name in ("gram_loss", "procrustes_loss", "cka_loss", "relation_loss"):
        return torch.randn(9, 4, dtype=dtype), torch.randn(9, 6, dtype=dtype)
    if name == "sinkhorn":
        return (torch.rand(2, 5, 4, dtype=dtype),)
    if name.startswith("fused_linear"):  # hidden [N, Hs], head [V, Hs], hidden [N, Ht], head [V, Ht]
        return tuple(torch.randn(*shape, dtype=dtype) for shape in ((6, 5), (11, 5), (6, 7), (11, 7)))
    return torch.randn(6, 11, dtype=dtype), torch.randn(6, 11, dtype=dtype)


def test_every_api_name_is_exported():
    for fn_name, (mod_name, _, _) in API.items():
        assert getattr(kd_kernels, fn_name) is getattr(KF, fn_name), fn_name
        if mod_name is not None:
            assert getattr(kd_kernels, mod_name) is getattr(KN, mod_name), mod_name
            assert issubclass(getattr(KN, mod_name), torch.nn.Module)
    assert set(API) <= set(KF.__all__)
    assert set(KF.__all__) <= set(API), f"functions not in the contract: {set(KF.__all__) - set(API)}"
    assert callable(kd_kernels.build_info) and callable(kd_kernels.available_backends)


@pytest.mark.parametrize("fn_name", sorted(API))
def test_signature_matches_contract(fn_name):
    _, positional, kwdefaults = API[fn_name]
    params = list(inspect.signature(getattr(KF, fn_name)).parameters.values())
    pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    kw = [p for p in params if p.kind == p.KEYWORD_ONLY]
    assert [p.name for p in pos] == list(positional), f"{fn_name}: positional {[p.name for p in pos]}"
    assert all(p.default is p.empty for p in pos), f"{fn_name}: tensors must not have defaults"
    assert [p.name for p in kw] == list(kwdefaults), f"{fn_name}: keyword-only args {[p.name for p in kw]}"
    for p in kw:
        assert p.default == kwdefaults[p.name] and type(p.default) is type(kwdefaults[p.name]), (
            f"{fn_name}: default of {p.name} is {p.default!r}, contract says {kwdefaults[p.name]!r}"
        )
    assert getattr(KF, fn_name).__doc__ and "Example" in getattr(KF, fn_name).__doc__


@pytest.mark.parametrize("fn_name", sorted(n for n, v in API.items() if v[0] is not None))
def test_module_defaults_match_function(fn_name):
    mod_name, positional, kwdefaults = API[fn_name]
    cls = getattr(KN, mod_name)
    ctor = {
        p.name: p.default
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind != p.VAR_KEYWORD
    }
    expected = {k: v for k, v in kwdefaults.items() if k not in PER_BATCH}
    assert ctor == expected, f"{mod_name}.__init__ defaults {ctor} != {fn_name} defaults {expected}"
    fwd = [p.name for p in inspect.signature(cls.forward).parameters.values() if p.name != "self"]
    per_batch = [k for k in kwdefaults if k in PER_BATCH]
    assert len(fwd) >= len(positional), f"{mod_name}.forward must take {positional}, has {fwd}"
    extra = fwd[len(positional) :]
    assert extra == per_batch, f"{mod_name}.forward extra args {extra} != {per_batch}"


@pytest.mark.parametrize("fn_name", sorted(n for n, v in API.items() if v[0] is not None))
def test_module_equals_function(fn_name):
    mod_name, _, kwdefaults = API[fn_name]
    inputs = sample_inputs(fn_name, torch.float64)
    # non-default keyword values where a float one exists, so the module must forward them
    kwargs = {k: v * 0.75 for k, v in kwdefaults.items() if isinstance(v, float)}
    f = getattr(KF, fn_name)(*inputs, **kwargs)
    m = getattr(KN, mod_name)(**kwargs)(*inputs)
    assert_close(m, f, rtol=1e-12, atol=1e-14, name=fn_name)


@pytest.mark.parametrize("fn_name", sorted(API))
def test_backend_validation(fn_name):
    fn = getattr(KF, fn_name)
    inputs = sample_inputs(fn_name)
    with pytest.raises(ValueError, match="backend"):
        fn(*inputs, backend="fastest")
    with pytest.raises(ValueError, match="cuda"):
        fn(*inputs, backend="cuda")  # CPU tensors: the CUDA C++ kernels cannot run them
    ref = fn(*inputs)
    assert_close(fn(*inputs, backend="torch"), ref, name=f"{fn_name} torch vs auto")


def test_build_info_and_backends():
    info = kd_kernels.build_info()
    for key in ("version", "torch", "torch_cuda", "triton", "triton_interpret", "extension_loaded", "extension_error"):
        assert key in info, key
    assert info["version"] == kd_kernels.__version__
    # extension_error is None both when _C loaded and when it was not built (a pure-Python install)
    assert info["extension_loaded"] == (info["extension_status"] == "loaded")
    assert info["extension_error"] is None or not info["extension_loaded"]
    cpu = kd_kernels.available_backends("cpu")
    assert cpu[-1] == "torch" and "cuda" not in cpu
    assert ("triton" in cpu) == (info["triton_interpret"] and info["triton"] is not None)
    assert kd_kernels.available_backends() == cpu


@pytest.mark.parametrize("fn_name", sorted(API))
def test_compiles_fullgraph(fn_name):
    """Every public function runs under torch.compile(fullgraph=True) with the eager value and gradient."""
    torch._dynamo.reset()
    fn = getattr(KF, fn_name)
    inputs = [x.requires_grad_(True) for x in sample_inputs(fn_name)]
    eager = fn(*inputs)
    (g_eager,) = torch.autograd.grad(eager.sum(), inputs[:1])
    compiled = torch.compile(fn, fullgraph=True)(*inputs)
    (g_comp,) = torch.autograd.grad(compiled.sum(), inputs[:1])
    assert_close(compiled, eager, rtol=1e-5, atol=1e-6, name=f"{fn_name} compiled value")
    assert_close(g_comp, g_eager, rtol=1e-5, atol=1e-6, name=f"{fn_name} compiled grad")


@pytest.mark.parametrize(
    "fn_name", sorted(n for n, v in API.items() if any(isinstance(d, float) for d in v[2].values()))
)
def test_non_finite_scalars_are_rejected(fn_name):
    """NaN or inf in any float keyword (temperature, beta, epsilon, weights) is a ValueError
    naming the argument, never a silent NaN loss."""
    floats = [k for k, v in API[fn_name][2].items() if isinstance(v, float)]
    inputs = sample_inputs(fn_name)
    for name in floats:
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match=name):
                getattr(KF, fn_name)(*inputs, **{name: bad})
