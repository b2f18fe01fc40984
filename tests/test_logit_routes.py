"""Routes of the PyTorch DIST and GRKD kernels (kd_kernels/torch_impl/logit.py) against the
float64 literal references (issue 9, item 6).

* DIST: the single-chunk route (all rows in one chunk: class statistics straight from it, the
  gradient returned without an [N, C] copy) and the chunked route (Chan merge of chunk
  statistics, ``chunk_rows`` forced small), with and without ``ignore_mask``, temperature != 1,
  unequal weights, grad_output != 1, C = 1 and 2, student and teacher gradients.
* GRKD: the arithmetic pair selection (``minimum`` with ±inf instead of a select, softplus as
  relu - log sigmoid(|x|)) with teacher ties, ``top_k``, masks, temperature != 1, one tile and
  many tiles; large logit gaps (softplus in its linear range, sigmoid saturated); non-finite
  student logits (NaN, +inf, -inf where the teacher ranks the class higher, masked vocabulary).
"""

from __future__ import annotations

import pytest
import torch

import kd_kernels.torch_impl.logit as impl
from kd_kernels.reference import logit as ref
from kd_kernels.testing import assert_close, tolerance

INF = float("inf")


def _logits(n: int, c: int, dtype=torch.float64, scale: float = 2.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = scale * torch.randn(n, c, generator=g, dtype=torch.float64)
    t = scale * torch.randn(n, c, generator=g, dtype=torch.float64)
    return s.to(dtype), t.to(dtype)


def _mask(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(n, generator=g) < 0.3
    m[0] = False  # at least one kept row
    return m


# ------------------------------------------------------------------------------------- DIST
def _dist_ref(s, t, temperature, beta, gamma, mask, go):
    s64 = s.detach().double().requires_grad_(True)
    t64 = t.detach().double().requires_grad_(True)
    loss = ref.dist_loss(s64, t64, temperature=temperature, inter_weight=beta, intra_weight=gamma, ignore_mask=mask)
    (loss * go).backward()
    return loss.detach(), s64.grad, t64.grad


def _dist_impl(s, t, temperature, beta, gamma, mask, go, chunk_rows=None):
    loss, lse_s, lse_t, stats = impl.dist_fwd(s, t, temperature, beta, gamma, mask, chunk_rows=chunk_rows)
    go = torch.tensor(go, dtype=loss.dtype)
    args = (lse_s, lse_t, stats, temperature, beta, gamma, mask, True, True)
    gs, gt = impl.dist_bwd(go, s, t, *args, chunk_rows=chunk_rows)
    return loss, lse_s, lse_t, stats, gs, gt


@pytest.mark.parametrize("chunk_rows", [None, 3])  # None: one chunk (the default route)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
    "n, c, temperature, beta, gamma, go",
    [(9, 7, 1.0, 1.0, 1.0, 1.0), (9, 7, 2.5, 1.5, 0.5, -0.7), (8, 1, 1.0, 1.0, 1.0, 1.3), (8, 2, 0.7, 1.0, 2.0, 0.4)],
)
def test_dist_routes_match_float64_reference(n, c, temperature, beta, gamma, go, masked, chunk_rows):
    s, t = _logits(n, c)
    mask = _mask(n) if masked else None
    want = _dist_ref(s, t, temperature, beta, gamma, mask, go)
    loss, lse_s, lse_t, _, gs, gt = _dist_impl(s, t, temperature, beta, gamma, mask, go, chunk_rows)
    name = f"dist n={n} c={c} T={temperature} masked={masked} chunk_rows={chunk_rows}"
    assert_close(loss, want[0], name=f"{name} loss")
    assert_close(gs, want[1], name=f"{name} grad student")
    assert_close(gt, want[2], name=f"{name} grad teacher")
    # the saved row statistic is the log-sum-exp of z/τ
    assert_close(lse_s, torch.logsumexp(s / temperature, 1), name=f"{name} lse_s")
    assert_close(lse_t, torch.logsumexp(t / temperature, 1), name=f"{name} lse_t")
    if masked:
        assert (gs[mask] == 0).all() and (gt[mask] == 0).all()


@pytest.mark.parametrize("masked", [False, True])
def test_dist_single_chunk_and_chunked_routes_agree(masked):
    s, t = _logits(11, 6, seed=3)
    mask = _mask(11, seed=4) if masked else None
    one = _dist_impl(s, t, 1.7, 1.2, 0.8, mask, 0.9)
    for rows in (1, 2, 4, 10):
        many = _dist_impl(s, t, 1.7, 1.2, 0.8, mask, 0.9, chunk_rows=rows)
        for a, b, what in zip(many, one, ("loss", "lse_s", "lse_t", "class_stats", "grad_s", "grad_t")):
            assert_close(a, b, name=f"dist chunk_rows={rows} {what}")


@pytest.mark.parametrize("chunk_rows", [None, 5])
@pytest.mark.parametrize("masked", [False, True])
def test_dist_float32_matches_float64_reference(masked, chunk_rows):
    s, t = _logits(16, 12, torch.float32, scale=3.0, seed=5)
    mask = _mask(16, seed=6) if masked else None
    want = _dist_ref(s, t, 2.0, 1.0, 1.0, mask, 1.0)
    loss, _, _, _, gs, gt = _dist_impl(s, t, 2.0, 1.0, 1.0, mask, 1.0, chunk_rows)
    assert loss.dtype == torch.float32 and gs.dtype == torch.float32 and gt.dtype == torch.float32
    rtol, atol = tolerance(torch.float32)
    assert_close(loss, want[0], rtol=rtol, atol=atol, name="dist fp32 loss")
    assert_close(gs, want[1], rtol=rtol, atol=atol, name="dist fp32 grad student")
    assert_close(gt, want[2], rtol=rtol, atol=atol, name="dist fp32 grad teacher")


def test_dist_student_only_gradient_and_dropped_rows():
    """need_teacher=False gives an empty teacher gradient; a NaN in a dropped row never leaks."""
    s, t = _logits(7, 5, seed=7)
    mask = torch.tensor([0, 1, 0, 0, 1, 0, 0], dtype=torch.bool)
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[1, 2], t_bad[4, 0] = float("nan"), INF
    loss, lse_s, lse_t, stats = impl.dist_fwd(s_bad, t_bad, 1.3, 1.0, 1.0, mask)
    gs, gt = impl.dist_bwd(
        torch.tensor(1.0, dtype=torch.float64), s_bad, t_bad, lse_s, lse_t, stats, 1.3, 1.0, 1.0, mask, True, False
    )
    assert gt.numel() == 0
    want = _dist_ref(s, t, 1.3, 1.0, 1.0, mask, 1.0)
    assert_close(loss, want[0], name="dist dropped-NaN loss")
    assert_close(gs, want[1], name="dist dropped-NaN grad")
    assert torch.isfinite(gs).all() and (gs[mask] == 0).all()


# ------------------------------------------------------------------------------------- GRKD
def _grkd_ref(s, t, temperature, top_k, mask, go):
    s64 = s.detach().double().requires_grad_(True)
    loss = ref.grkd_loss(s64, t.double(), temperature=temperature, top_k=top_k, ignore_mask=mask)
    (loss * go).backward()
    return loss.detach(), s64.grad


def _grkd_impl(s, t, temperature, top_k, mask, go, tile=None):
    loss, pairs = impl.grkd_fwd(s, t, temperature, top_k, mask, tile_elements=tile)
    gs = impl.grkd_bwd(torch.tensor(go, dtype=loss.dtype), s, t, pairs, temperature, top_k, mask, tile_elements=tile)
    return loss, pairs, gs


def _ref_pairs(t, top_k):
    pairs = t[:, :, None] > t[:, None, :]
    if top_k is not None:
        top = torch.zeros_like(t, dtype=torch.bool)
        top.scatter_(1, torch.topk(t, min(top_k, t.shape[1]), dim=1).indices, True)
        pairs = pairs & top[:, :, None]
    return pairs.sum((1, 2))


def _tied_teacher(t: torch.Tensor) -> torch.Tensor:
    """Round the teacher so that many classes tie (ties make no pair)."""
    t = t.round()
    t[2] = 0.5  # a row of all-equal teacher logits: no pair at all, contributes 0
    return t


@pytest.mark.parametrize("tile", [None, 7, 30])  # one tile; 1 row x 1 class; several classes
@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
    "n, c, temperature, go", [(6, 7, 1.0, 1.0), (6, 7, 2.5, -0.6), (5, 1, 1.0, 1.0), (5, 2, 0.5, 1.7)]
)
def test_grkd_routes_match_float64_reference_with_ties(n, c, temperature, go, masked, top_k, tile):
    s, t = _logits(n, c, seed=11)
    t = _tied_teacher(t)
    mask = _mask(n, seed=12) if masked else None
    want = _grkd_ref(s, t, temperature, top_k, mask, go)
    loss, pairs, gs = _grkd_impl(s, t, temperature, top_k, mask, go, tile)
    name = f"grkd n={n} c={c} T={temperature} top_k={top_k} masked={masked} tile={tile}"
    assert pairs.dtype == torch.int64
    assert (pairs == _ref_pairs(t, top_k)).all(), f"{name}: pair counts"
    assert_close(loss, want[0], name=f"{name} loss")
    assert_close(gs, want[1], name=f"{name} grad")
    if masked:
        assert (gs[mask] == 0).all()


@pytest.mark.parametrize("top_k", [None, 4])
def test_grkd_float32_matches_float64_reference(top_k):
    s, t = _logits(12, 10, torch.float32, scale=3.0, seed=13)
    t = _tied_teacher(t)
    want = _grkd_ref(s, t, 1.5, top_k, None, 1.0)
    loss, _, gs = _grkd_impl(s, t, 1.5, top_k, None, 1.0)
    assert loss.dtype == torch.float32 and gs.dtype == torch.float32
    rtol, atol = tolerance(torch.float32)
    assert_close(loss, want[0], rtol=rtol, atol=atol, name="grkd fp32 loss")
    assert_close(gs, want[1], rtol=rtol, atol=atol, name="grkd fp32 grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grkd_large_logit_gaps(dtype):
    """Gaps far beyond the softplus threshold (and beyond exp's fp32 range, |x| > 88): the
    linear branch of softplus and the saturated sigmoid. Compared with a float64 reference."""
    s, t = _logits(6, 8, seed=14)
    s = s * 60.0  # gaps of several hundred
    want = _grkd_ref(s, t, 1.0, None, None, 1.0)
    loss, _, gs = _grkd_impl(s.to(dtype), t.to(dtype), 1.0, None, None, 1.0)
    rtol, atol = tolerance(dtype)
    assert_close(loss, want[0], rtol=rtol, atol=atol, name="grkd large gaps loss")
    assert_close(gs, want[1], rtol=rtol, atol=atol, name="grkd large gaps grad")


def test_grkd_non_finite_student_logits():
    s, t = _logits(4, 6, torch.float32, seed=15)
    go = 1.0
    # -inf where the teacher ranks the class above another: forward-KL-like +inf
    # (ranked first: several pairs above others; second lowest: exactly one such pair)
    for where in (int(t[1].argmax()), int(t[1].argsort()[1])):
        s1 = s.clone()
        s1[1, where] = -INF
        loss, _, gs = _grkd_impl(s1, t, 1.0, None, None, go)
        assert loss == INF and torch.isfinite(gs).all(), f"grkd: -inf student at class {where} gave {loss}"
    # NaN or +inf: the row (and so the loss) is NaN
    for bad in (float("nan"), INF):
        s2 = s.clone()
        s2[2, 3] = bad
        loss, _, _ = _grkd_impl(s2, t, 1.0, None, None, go)
        assert torch.isnan(loss), f"grkd: student {bad} gave {loss}"
    # NaN in the teacher makes no pair but a NaN row
    t3 = t.clone()
    t3[0, 1] = float("nan")
    assert torch.isnan(_grkd_impl(s, t3, 1.0, None, None, go)[0])
    # ... unless the row is dropped
    mask = torch.tensor([True, False, False, False])
    loss, _, gs = _grkd_impl(s, t3, 1.0, None, mask, go)
    want = _grkd_ref(s, t, 1.0, None, mask, go)
    rtol, atol = tolerance(torch.float32)
    assert_close(loss, want[0], rtol=rtol, atol=atol, name="grkd dropped NaN row")
    assert torch.isfinite(gs).all() and (gs[0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grkd_masked_vocabulary(dtype):
    """-inf in student and teacher at the same classes: those pairs add 0 to the sum (the pair
    count still includes the pairs above them) and the masked classes get zero gradient."""
    s, t = _logits(5, 7, seed=16)
    masked = [1, 4]
    sm, tm = s.clone(), t.clone()
    sm[:, masked], tm[:, masked] = -INF, -INF
    loss, pairs, gs = _grkd_impl(sm.to(dtype), tm.to(dtype), 1.3, None, None, 1.0)
    assert torch.isfinite(loss) and torch.isfinite(gs).all()
    assert (gs[:, masked] == 0).all()
    # expected: kept-class pairs as in the reference on the kept columns, plus the
    # (kept, masked) pairs that add 0 but count
    kept = [0, 2, 3, 5, 6]
    sk = s[:, kept].clone().requires_grad_(True)
    tk = t[:, kept]
    pk = _ref_pairs(tk, None).double()
    total = pk + len(kept) * len(masked)
    assert (pairs == total.long()).all()
    diff = (sk[:, :, None] - sk[:, None, :]) / 1.3
    rows = (torch.nn.functional.softplus(-diff) * (tk[:, :, None] > tk[:, None, :])).sum((1, 2)) / total
    want = rows.mean()
    want.backward()
    rtol, atol = tolerance(dtype)
    assert_close(loss, want.detach(), rtol=rtol, atol=atol, name="grkd masked vocabulary loss")
    assert_close(gs[:, kept], sk.grad, rtol=rtol, atol=atol, name="grkd masked vocabulary grad")
