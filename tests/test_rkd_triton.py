"""The Triton RKD kernels' own contract (kd_kernels/triton/rkd*.py): configuration tables,
launcher-level behaviour, the near-anchor flags and the agreement of the angle loss's two
routes. Reference comparisons of values and gradients run through the public functions in
the backend matrix (tests/test_rkd.py, tests/test_rkd_near_duplicates.py).

They run on the CPU under the Triton interpreter (``TRITON_INTERPRET=1``) or on a CUDA device;
otherwise they are skipped.

    TRITON_INTERPRET=1 .venv/bin/pytest tests/test_rkd_triton.py
"""

from __future__ import annotations

import pytest
import torch

from kd_kernels._backend import TRITON_INTERPRET
from kd_kernels.testing import assert_close


def _devices() -> list:
    if TRITON_INTERPRET:
        return ["cpu"]
    return [pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else []


DEVICES = _devices()
pytestmark = pytest.mark.skipif(not DEVICES, reason="Triton needs a CUDA device or TRITON_INTERPRET=1")


def _k():
    from kd_kernels.triton import rkd  # imports triton: only once the module is not skipped

    return rkd


def test_config_tables():
    """Every configuration is a valid tl.dot tiling (powers of two >= 16) with a warp count and
    a stage count; the interpreter always takes its one small configuration."""
    from kd_kernels.triton import rkd_angle, rkd_distance

    for table in (rkd_distance.DISTANCE_CONFIGS, rkd_angle.ANGLE_CONFIGS):
        for name, cfg in table.items():
            for key, v in cfg.items():
                if key.startswith("BLOCK_"):
                    assert v >= 16 and v & (v - 1) == 0, f"{name}.{key} = {v}"
            assert cfg["num_warps"] in (1, 2, 4, 8, 16) and cfg["num_stages"] >= 1, name
    x = torch.randn(8, 128)
    if TRITON_INTERPRET:
        assert rkd_distance.pick_pair_config(x, x) is rkd_distance.DISTANCE_CONFIGS["interpret"]
        assert rkd_angle.pick_angle_config("explicit") is rkd_angle.ANGLE_CONFIGS["interpret_explicit"]
        from kd_kernels.triton._tiles import dot_precision

        assert dot_precision() == "ieee"
    else:
        cfgs = rkd_distance.DISTANCE_CONFIGS
        assert rkd_distance.pick_pair_config(x, x) is cfgs["fp32"]
        assert rkd_distance.pick_pair_config(x.half(), x.half()) is cfgs["16bit"]
        assert rkd_distance.pick_pair_config(x[:, :33], x) is cfgs["unaligned_fp32"]
        assert rkd_distance.pick_pair_config(x[:, :32].contiguous(), x[:, :64].contiguous()) is cfgs["small_d"]


@pytest.mark.skipif(TRITON_INTERPRET, reason="the interpreter always multiplies fp32 with 'ieee'")
def test_fp32_precision_read_at_call_time(monkeypatch):
    """The fp32 dot precision follows PyTorch's switch when the launcher runs."""
    from kd_kernels.triton._tiles import dot_precision

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert dot_precision() == "tf32x3"
        torch.set_float32_matmul_precision("high")
        assert dot_precision() == "tf32"
    finally:
        torch.set_float32_matmul_precision(prev)


@pytest.mark.parametrize("device", DEVICES or ["none"])
def test_launcher_contract(device):
    """Need flags give None, dtypes and shapes as the ops' fakes declare, mu in float32,
    contiguous gradients for non-contiguous inputs."""
    k = _k()
    s = torch.randn(5, 9, device=device).T  # [9, 5], column-major
    t = torch.randn(9, 6, device=device, dtype=torch.bfloat16)
    g = torch.tensor(0.5, device=device)
    loss, mu_s, mu_t = k.rkd_distance_fwd_triton(s, t, "mean")
    assert loss.shape == () and loss.dtype == s.dtype
    assert mu_s.shape == mu_t.shape == () and mu_s.dtype == mu_t.dtype == torch.float32
    assert k.rkd_distance_fwd_triton(s, t, "none")[0].shape == (9, 9)
    assert k.rkd_distance_bwd_triton(g, s, t, mu_s, mu_t, "mean", False, False) == (None, None)
    gs, gt = k.rkd_distance_bwd_triton(g, s, t, mu_s, mu_t, "mean", True, False)
    assert gt is None and gs.shape == s.shape and gs.dtype == s.dtype and gs.is_contiguous()
    assert k.rkd_angle_fwd_triton(s, t, "none").shape == (9,)
    assert k.rkd_angle_bwd_triton(g, s, t, "sum", False, False) == (None, None)
    gs, gt = k.rkd_angle_bwd_triton(g, s, t, "sum", False, True)
    assert gs is None and gt.shape == t.shape and gt.dtype == torch.bfloat16 and gt.is_contiguous()


@pytest.mark.parametrize("device", DEVICES or ["none"])
def test_rejects_float64_and_bad_reduction(device):
    """float64 is the PyTorch path's (the ops route it there): a clear error if it gets here."""
    k = _k()
    s, t = torch.randn(4, 3, device=device), torch.randn(4, 2, device=device)
    with pytest.raises(TypeError, match="float64"):
        k.rkd_distance_fwd_triton(s.double(), t, "mean")
    with pytest.raises(TypeError, match="float64"):
        k.rkd_angle_fwd_triton(s, t.double(), "mean")
    with pytest.raises(ValueError, match="reduction"):
        k.rkd_angle_fwd_triton(s, t, "batchmean")


@pytest.mark.parametrize("device", DEVICES or ["none"])
def test_near_anchor_flags(device):
    """The E kernel flags an anchor when it has a near pair in the student OR the teacher
    (E^gram < 2^-6 (s_i + s_j)), across tiles, and stores E = 0 on the diagonal and for
    identical rows (explicit differences)."""
    from kd_kernels.triton import rkd_angle
    from kd_kernels.triton._tiles import dot_precision

    s = torch.randn(40, 6, device=device) * 3 + 2
    t = torch.randn(40, 5, device=device)
    s[33] = s[1]  # identical, across tiles
    s[7] = s[2] + 1e-4 * torch.randn(6, device=device)  # near in the student
    t[20] = t[21] * (1 + 1e-3)  # near in the teacher only
    es, et, flags = rkd_angle._angle_e(s, t, dot_precision())
    assert sorted(torch.nonzero(flags).flatten().tolist()) == [1, 2, 7, 20, 21, 33]
    assert es[1, 33] == 0 and es[33, 1] == 0 and bool((es.diagonal() == 0).all())
    exact = (s[7].double() - s[2].double()).square().sum()
    assert_close(es[7, 2], exact, rtol=1e-5, atol=0, name="explicit E")


@pytest.mark.parametrize("device", DEVICES or ["none"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_angle_routes_agree(device, reduction):
    """With every anchor forced onto the explicit route (flags all 1), the explicit kernels
    give the E route's value and gradients on well-separated rows."""
    from kd_kernels.triton import rkd_angle

    k = _k()
    s, t = torch.randn(35, 7, device=device), torch.randn(35, 4, device=device)
    g = torch.tensor(0.7, device=device) if reduction == "mean" else torch.randn(35, device=device)
    e_route = (k.rkd_angle_fwd_triton(s, t, reduction), *k.rkd_angle_bwd_triton(g, s, t, reduction, True, True))
    real = rkd_angle._angle_e

    def all_near(*args):
        es, et, flags = real(*args)
        return es, et, torch.ones_like(flags)

    rkd_angle._angle_e = all_near
    try:
        explicit = (k.rkd_angle_fwd_triton(s, t, reduction), *k.rkd_angle_bwd_triton(g, s, t, reduction, True, True))
    finally:
        rkd_angle._angle_e = real
    for name, a, b in zip(("value", "grad student", "grad teacher"), explicit, e_route):
        assert_close(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item(), name=name)
