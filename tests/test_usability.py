"""Everyday use (issue 9, items 2 and 7): arguments are checked where they are given, modules
read their attributes at every forward, and the packaging details (py.typed, ``python -OO``,
build_info without ``_C``, available_backends without a GPU, runnable docstring examples)."""

from __future__ import annotations

import doctest
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch

import kd_kernels
import kd_kernels.functional as KF
import kd_kernels.nn as KN
from kd_kernels import _backend

ROOT = Path(__file__).resolve().parents[1]

# function -> module class (None: no module)
MODULE_OF = {
    "rkd_distance_loss": "RKDDistanceLoss",
    "rkd_angle_loss": "RKDAngleLoss",
    "rkd_loss": "RKDLoss",
    "gram_loss": "GramLoss",
    "procrustes_loss": "ProcrustesLoss",
    "cka_loss": "CKALoss",
    "relation_loss": "RelationLoss",
    "sinkhorn_loss": "SinkhornLoss",
    "sinkhorn": None,
    "kd_loss": "KDLoss",
    "reverse_kl_loss": "ReverseKLLoss",
    "jsd_loss": "JSDLoss",
    "tvd_loss": "TVDLoss",
    "dist_loss": "DISTLoss",
    "grkd_loss": "GRKDLoss",
    "fused_linear_kd_loss": "FusedLinearKDLoss",
    "fused_linear_jsd_loss": "FusedLinearJSDLoss",
}


def inputs(name: str, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if name.startswith("rkd"):
        return torch.randn(7, 5, dtype=dtype, generator=g), torch.randn(7, 3, dtype=dtype, generator=g)
    if name in ("gram_loss", "procrustes_loss", "cka_loss", "relation_loss"):
        return torch.randn(9, 4, dtype=dtype, generator=g), torch.randn(9, 6, dtype=dtype, generator=g)
    if name == "sinkhorn":
        return (torch.rand(2, 5, 4, dtype=dtype, generator=g),)
    if name.startswith("fused_linear"):  # hidden [N, Hs], head [V, Hs], hidden [N, Ht], head [V, Ht]
        return tuple(torch.randn(*shape, dtype=dtype, generator=g) for shape in ((6, 5), (11, 5), (6, 7), (11, 7)))
    return 2 * torch.randn(6, 11, dtype=dtype, generator=g), 2 * torch.randn(6, 11, dtype=dtype, generator=g)


def string_args(fn) -> list[str]:
    """The keyword arguments of ``fn`` whose default is a string (reduction, backend)."""
    return [p.name for p in inspect.signature(fn).parameters.values() if isinstance(p.default, str)]


STRING_CASES = [(fn, arg) for fn in sorted(MODULE_OF) for arg in string_args(getattr(KF, fn))]


def test_every_public_function_is_covered():
    assert set(MODULE_OF) == set(KF.__all__)
    assert {m for m in MODULE_OF.values() if m} == set(KN.__all__)
    assert ("kd_loss", "reduction") in STRING_CASES and ("rkd_angle_loss", "reduction") in STRING_CASES
    assert all((fn, "backend") in STRING_CASES for fn in MODULE_OF)


# ---------------------------------------------------------------------------------------------- item 2


@pytest.mark.parametrize("fn_name,arg", STRING_CASES, ids=[f"{f}-{a}" for f, a in STRING_CASES])
@pytest.mark.parametrize("bad", [None, "", "bogus", "MEAN", 1], ids=repr)
def test_bad_string_argument_raises(fn_name, arg, bad):
    fn = getattr(KF, fn_name)
    with pytest.raises(ValueError, match=rf"^{fn_name}: {arg} must be one of .*got {bad!r}$".replace("(", r"\(")):
        fn(*inputs(fn_name), **{arg: bad})


@pytest.mark.parametrize("fn_name", ["kd_loss", "reverse_kl_loss", "jsd_loss", "tvd_loss"])
def test_reduction_none_is_not_mean(fn_name):
    """Regression: ``reduction=None`` used to fall through to "mean" (mean over classes) silently."""
    s, t = inputs(fn_name)
    fn = getattr(KF, fn_name)
    with pytest.raises(ValueError, match=f"{fn_name}: reduction"):
        fn(s, t, reduction=None)
    # every valid value is accepted and they differ (so the check is not hiding a real mode)
    values = {r: fn(s, t, reduction=r) for r in ("batchmean", "sum", "mean")}
    assert torch.allclose(values["mean"] * s.shape[1], values["batchmean"])
    assert torch.allclose(values["batchmean"] * s.shape[0], values["sum"])


@pytest.mark.parametrize(
    "fn_name,kwargs,exc,match",
    [
        ("kd_loss", {"temperature": None}, TypeError, "kd_loss: temperature"),
        ("kd_loss", {"temperature": 0.0}, ValueError, "kd_loss: temperature must be > 0"),
        ("jsd_loss", {"beta": 1.5}, ValueError, "jsd_loss: beta must be <= 1"),
        ("dist_loss", {"inter_weight": -1.0}, ValueError, "dist_loss: inter_weight must be >= 0"),
        ("grkd_loss", {"top_k": 0}, ValueError, "grkd_loss: top_k must be >= 1"),
        ("grkd_loss", {"top_k": 2.0}, TypeError, "grkd_loss: top_k must be a Python int"),
        ("rkd_loss", {"angle_weight": float("nan")}, ValueError, "rkd_loss: angle_weight must be a finite"),
        ("gram_loss", {"center": None}, TypeError, "gram_loss: center must be a bool"),
        ("cka_loss", {"unbiased": 1}, TypeError, "cka_loss: unbiased must be a bool"),
        ("sinkhorn_loss", {"n_iters": 0}, ValueError, "sinkhorn_loss: n_iters must be >= 1"),
        ("sinkhorn", {"epsilon": -0.1}, ValueError, "sinkhorn: epsilon must be > 0"),
    ],
    ids=str,
)
def test_bad_number_or_flag_argument_raises(fn_name, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        getattr(KF, fn_name)(*inputs(fn_name), **kwargs)


CTOR_CASES = [
    ("KDLoss", {"temperature": -1.0}, ValueError, "KDLoss: temperature must be > 0"),
    ("KDLoss", {"reduction": None}, ValueError, "KDLoss: reduction must be one of"),
    ("KDLoss", {"backend": "fastest"}, ValueError, "KDLoss: backend must be one of"),
    ("ReverseKLLoss", {"reduction": "avg"}, ValueError, "ReverseKLLoss: reduction"),
    ("JSDLoss", {"beta": 2.0}, ValueError, "JSDLoss: beta must be <= 1"),
    ("TVDLoss", {"temperature": "1"}, TypeError, "TVDLoss: temperature must be a Python number"),
    ("DISTLoss", {"intra_weight": -0.5}, ValueError, "DISTLoss: intra_weight must be >= 0"),
    ("GRKDLoss", {"top_k": 0}, ValueError, "GRKDLoss: top_k must be >= 1"),
    ("RKDDistanceLoss", {"reduction": None}, ValueError, "RKDDistanceLoss: reduction"),
    ("RKDAngleLoss", {"reduction": "batchmean"}, ValueError, "RKDAngleLoss: reduction"),
    ("RKDLoss", {"distance_weight": -1.0}, ValueError, "RKDLoss: distance_weight must be >= 0"),
    ("GramLoss", {"normalize": "yes"}, TypeError, "GramLoss: normalize must be a bool"),
    ("ProcrustesLoss", {"center": None}, TypeError, "ProcrustesLoss: center must be a bool"),
    ("CKALoss", {"backend": None}, ValueError, "CKALoss: backend must be one of"),
    ("RelationLoss", {"backend": "gpu"}, ValueError, "RelationLoss: backend must be one of"),
    ("SinkhornLoss", {"epsilon": 0.0}, ValueError, "SinkhornLoss: epsilon must be > 0"),
    ("SinkhornLoss", {"n_iters": 2.5}, TypeError, "SinkhornLoss: n_iters must be a Python int"),
]


@pytest.mark.parametrize("cls_name,kwargs,exc,match", CTOR_CASES, ids=str)
def test_constructor_validates(cls_name, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        getattr(KN, cls_name)(**kwargs)


@pytest.mark.parametrize("cls_name,kwargs,exc,match", CTOR_CASES, ids=str)
def test_assignment_validates(cls_name, kwargs, exc, match):
    mod = getattr(KN, cls_name)()
    (name, bad), = kwargs.items()
    before = getattr(mod, name)
    with pytest.raises(exc, match=match):
        setattr(mod, name, bad)
    assert getattr(mod, name) == before, "a rejected value must not be stored"


# (module, attribute, new value): every non-tensor argument that a schedule may change
SCHEDULES = [
    ("kd_loss", "temperature", 1.5),
    ("kd_loss", "reduction", "sum"),
    ("reverse_kl_loss", "temperature", 2.5),
    ("reverse_kl_loss", "reduction", "mean"),
    ("jsd_loss", "beta", 0.2),
    ("jsd_loss", "temperature", 3.0),
    ("tvd_loss", "temperature", 0.5),
    ("dist_loss", "temperature", 2.0),
    ("dist_loss", "inter_weight", 0.25),
    ("dist_loss", "intra_weight", 3.0),
    ("grkd_loss", "temperature", 2.0),
    ("grkd_loss", "top_k", 3),
    ("rkd_distance_loss", "reduction", "sum"),
    ("rkd_angle_loss", "reduction", "sum"),
    ("rkd_loss", "distance_weight", 1.0),
    ("rkd_loss", "angle_weight", 2.0),
    ("gram_loss", "center", False),
    ("gram_loss", "normalize", False),
    ("procrustes_loss", "center", False),
    ("cka_loss", "unbiased", True),
    ("sinkhorn_loss", "temperature", 1.0),
    ("sinkhorn_loss", "epsilon", 0.5),
    ("sinkhorn_loss", "n_iters", 3),
]


@pytest.mark.parametrize("fn_name,attr,value", SCHEDULES, ids=str)
def test_attribute_schedule_takes_effect(fn_name, attr, value):
    fn, mod = getattr(KF, fn_name), getattr(KN, MODULE_OF[fn_name])()
    s, t = inputs(fn_name, torch.float64)
    before = mod(s, t)
    torch.testing.assert_close(before, fn(s, t), rtol=1e-12, atol=0)
    setattr(mod, attr, value)
    after = mod(s, t)
    expected = fn(s, t, **{attr: value})
    torch.testing.assert_close(after, expected, rtol=1e-12, atol=0)
    assert not torch.allclose(after, before), f"{attr}={value!r} should change the loss"
    assert f"{attr}={value!r}" in repr(mod)


def test_modules_copy_and_pickle_with_their_current_arguments():
    import copy
    import pickle

    crit = KN.JSDLoss(beta=0.3)
    crit.temperature = 2.0
    s, t = inputs("jsd_loss", torch.float64)
    for clone in (copy.deepcopy(crit), pickle.loads(pickle.dumps(crit))):
        assert clone.arguments() == crit.arguments() == {
            "beta": 0.3, "temperature": 2.0, "reduction": "batchmean", "backend": "auto"
        }
        torch.testing.assert_close(clone(s, t), KF.jsd_loss(s, t, beta=0.3, temperature=2.0), rtol=1e-12, atol=0)
        with pytest.raises(ValueError, match="JSDLoss: beta"):
            clone.beta = -0.1


def test_compiled_module_follows_the_schedule():
    crit = KN.KDLoss()
    compiled = torch.compile(crit, fullgraph=True)
    s, t = inputs("kd_loss", torch.float32)
    for temp in (4.0, 2.0):
        crit.temperature = temp
        torch.testing.assert_close(compiled(s, t), KF.kd_loss(s, t, temperature=temp), rtol=1e-6, atol=1e-7)


def test_temperature_schedule_in_a_loop():
    crit = KN.KDLoss()
    s, t = inputs("kd_loss", torch.float64)
    for temp in (4.0, 3.0, 2.0, 1.0):
        crit.temperature = temp
        torch.testing.assert_close(crit(s, t), KF.kd_loss(s, t, temperature=temp), rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------- item 7


def test_import_and_use_under_python_OO():
    code = (
        "import torch, kd_kernels\n"
        "assert kd_kernels.kd_loss.__doc__ is None and kd_kernels.KDLoss.__doc__ is None\n"
        "s, t = torch.randn(4, 5), torch.randn(4, 5)\n"
        "v = kd_kernels.KDLoss(temperature=2.0)(s, t)\n"
        "assert torch.allclose(v, kd_kernels.kd_loss(s, t, temperature=2.0))\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-OO", "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_py_typed_marker_is_package_data():
    assert (Path(kd_kernels.__file__).parent / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["kd_kernels"]


def _fake_loader(monkeypatch, exc: BaseException | None):
    """Make ``import kd_kernels._C`` raise ``exc`` for the rest of the test (fresh loader state)."""
    real = importlib.import_module

    def fake(name, package=None):
        if name == "kd_kernels._C":
            raise exc
        return real(name, package)

    monkeypatch.setattr(_backend, "_ext_state", {})
    monkeypatch.setattr(_backend.importlib, "import_module", fake)


def test_build_info_pure_python_install(monkeypatch):
    _fake_loader(monkeypatch, ModuleNotFoundError("No module named 'kd_kernels._C'", name="kd_kernels._C"))
    info = kd_kernels.build_info()
    assert info["extension_loaded"] is False
    assert info["extension_error"] is None, "an extension that was not built is not an error"
    assert info["extension_status"] == "not built (pure-Python install)"
    assert "extension" not in info
    assert kd_kernels.available_backends("cpu")[-1] == "torch"
    # the losses still run on the torch path
    s, t = inputs("kd_loss")
    torch.testing.assert_close(KF.kd_loss(s, t, backend="auto"), KF.kd_loss(s, t, backend="torch"))


@pytest.mark.parametrize(
    "exc",
    [
        ImportError("kd_kernels/_C.so: undefined symbol: _ZN3c10"),
        ModuleNotFoundError("No module named 'libcudart'", name="libcudart"),
    ],
    ids=["undefined-symbol", "missing-dependency"],
)
def test_build_info_broken_extension_is_an_error(monkeypatch, exc):
    _fake_loader(monkeypatch, exc)
    info = kd_kernels.build_info()
    assert info["extension_loaded"] is False
    assert info["extension_error"] is not None and type(exc).__name__ in info["extension_error"]
    assert info["extension_status"].startswith("failed to load: ")
    assert "extension" not in info


def test_build_info_status_when_loaded():
    info = kd_kernels.build_info()
    if info["extension_loaded"]:
        assert info["extension_status"] == "loaded" and info["extension_error"] is None and "extension" in info
    else:
        assert info["extension_status"] != "loaded" and "extension" not in info


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)], ids=str)
def test_available_backends_without_gpu(monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kd_kernels.available_backends(device) == ["torch"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the real answer on a machine without a GPU")
def test_available_backends_on_this_cpu_machine():
    assert kd_kernels.available_backends("cuda") == ["torch"]


def _public_objects():
    names = [n for n in kd_kernels.__all__ if n != "__version__"]
    return [(n, getattr(kd_kernels, n)) for n in names]


def _examples(obj) -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(recurse=False, exclude_empty=True)
    return [t for t in finder.find(obj, name=obj.__name__) if t.examples]


DOCTEST_NAMES = [n for n, obj in _public_objects() if callable(obj) and obj.__doc__ and ">>>" in obj.__doc__]


def test_every_loss_and_module_has_an_example():
    losses = set(KF.__all__) | set(KN.__all__)
    assert losses <= set(DOCTEST_NAMES), f"no example: {sorted(losses - set(DOCTEST_NAMES))}"


@pytest.mark.parametrize("name", DOCTEST_NAMES)
def test_docstring_examples_run_as_written(name):
    """Examples run in a namespace that holds only ``torch`` and ``kd_kernels`` (use the prefix)."""
    obj = getattr(kd_kernels, name)
    tests = _examples(obj)
    assert tests, f"{name}: no >>> examples found"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        test.globs = {"torch": torch, "kd_kernels": kd_kernels}
        runner.run(test, out=lambda s: None)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0 and result.failed == 0, f"{name}: {result.failed} of {result.attempted} failed"


@pytest.mark.parametrize("fn_name", sorted(f for f, m in MODULE_OF.items() if m))
def test_module_docstring_contains_function_docstring(fn_name):
    fn, cls = getattr(KF, fn_name), getattr(KN, MODULE_OF[fn_name])
    assert inspect.cleandoc(fn.__doc__) in cls.__doc__
    assert "Args:" in cls.__doc__ and "Example" in cls.__doc__
