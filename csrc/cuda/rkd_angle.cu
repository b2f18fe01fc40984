// RKD angle loss (Park et al. 2019), forward and backward. Functions (include/kd_ops.h):
//   rkd_angle_fwd_cuda(student, teacher, reduction, precision) -> loss (0-dim, or [N] for "none")
//   rkd_angle_bwd_cuda(grad, student, teacher, reduction, need_student, need_teacher, precision)
//       -> (grad_student, grad_teacher)   (an unneeded one is an empty tensor)
// student [N, Ds], teacher [N, Dt], float32 / float16 / bfloat16 (float64: the PyTorch path).
// Math: docs/rkd.md sections 3 and 4; the semantics are those of kd_kernels/torch_impl/rkd.py.
// If student and teacher dtypes differ, both are cast to float32.
//
// Routes (docs/rkd.md section 4), per call:
//  1. E buffer, per network, on tensor-core Gram tiles (include/pairwise_tiles.cuh; precision policy
//     docs/precision.md): E_ij = s_i + s_j − 2 x~_i·x~_j, explicit differences of the original rows
//     for near pairs (E_ij < TAU (s_i + s_j)), E_ii = 0; R_ij = 1/max(sqrt(E_ij), 1e-12) for E_ij > 0,
//     else 0 (a zero-length difference: ψ = 0 as in the reference, and no gradient). Anchors with a
//     near pair in the student OR the teacher are flagged (int32 [N], plain stores of 1).
//  2. E route for every other anchor: the N³ kernels below (FMA: ψ is not a dot product), via the
//     polarization identity ψ_abc = (E_ab + E_ac − E_bc) / 2 · R_ab R_ac. Flagged anchors are skipped.
//  3. Explicit route for flagged anchors (rare), upstream's formula on explicit differences
//     v_b = x_b − x_a (fp32), in ATen (batched GEMMs on the current stream). Listing the flagged
//     anchors is the one host synchronisation of these functions (a nonzero over [N] flags).
// Backward of the E route: W = ∂L/∂E from two N³ kernels, A = 2 (W + Wᵀ) with a zero diagonal,
// ∂L/∂X = rowsum(A) x~ − A x~ on tensor cores (rkd_laplacian_pass, csrc/cuda/rkd_distance.cu).
//
// Tiling of the N³ kernels. A block of kThreads = 256 threads owns a kTile × kTile = 64 × 64 tile of
// (i, j) pairs; thread (ty, tx) = (tid / 16, tid % 16) owns the 4 × 4 pairs i = i0 + ty + 16 r,
// j = j0 + tx + 16 c (r, c < 4): strided rather than blocked so that shared-memory reads are
// conflict-free (the 16 tx of a half-warp read 16 consecutive words).
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>

#include "kd_ops.h"
#include "pairwise_tiles.cuh"
#include "rkd_common.cuh"

namespace kd_kernels {
namespace {

using tiles::kGramLd;
using tiles::kTileM;
using tiles::kTileThreads;

constexpr int kThreads = 256;       // N³ kernels: 16 × 16 threads, enough warps to hide shared-memory latency
constexpr int kSub = 16;            // threads along each side of the tile
constexpr int kPer = 4;             // pairs per thread along each side (kSub · kPer = kTile)
constexpr int kTile = kSub * kPer;  // 64: a 64 × 64 tile reuses each staged row 64 times
constexpr int kChunk = 16;          // rows k staged per step: 6 (fwd) or 8 (bwd) × 16 × 64 fp32 <= 32 KB
// Explicit route: about 2^24 fp32 elements (64 MB) per batch of anchors ([B, N, max(D, N)]).
constexpr int64_t kExplicitElems = int64_t(1) << 24;
static_assert(kTile == kTileM, "the E buffer and the N³ kernels share one tile size");

// ---------------------------------------------------------------------------------------------
// 1. E buffer (one network): block (bj, bi) computes the 64 × 64 Gram tile and its E, R entries.
// Thread t owns the pairs (r, c) = (t / 64 + 2 q, t % 64), q < 32: coalesced row segments.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, bool kSplit>
__global__ void __launch_bounds__(kTileThreads, kMinBlocks)
    rkd_angle_gram_kernel(const scalar_t* __restrict__ x,   // [n, d] original rows
                          const float* __restrict__ mean,   // [d] column means
                          const float* __restrict__ sq,     // [n] |x~_i|² (centred rows as rounded for the MMA)
                          int64_t n,                        // rows
                          int64_t d,                        // features
                          float* __restrict__ e,            // [n, n] out: squared distances
                          float* __restrict__ rinv,         // [n, n] out: R (0 for zero-length differences)
                          int* __restrict__ flag) {         // [n] in/out: 1 for near anchors (both networks)
  __shared__ tiles::GramStage<scalar_t> stage;
  __shared__ alignas(32) float g[kTileM * kGramLd];
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  tiles::gram_tile<scalar_t, kSplit>(x, mean, n, d, i0, j0, stage, g);
  const int c = threadIdx.x % kTileM;
  const int64_t j = j0 + c;
  for (int q = 0; q < kTileM / 2; ++q) {
    const int r = threadIdx.x / kTileM + 2 * q;
    const int64_t i = i0 + r;
    if (i >= n || j >= n) continue;
    float ev = 0.0f;
    if (i != j) {
      bool near = false;
      ev = fmaxf(pair_sqdist(x, sq, d, i, j, g[r * kGramLd + c], &near), 0.0f);
      if (near) {  // near is symmetric in exact arithmetic; flag both ends so the set is too
        flag[i] = 1;
        flag[j] = 1;
      }
    }
    e[i * n + j] = ev;
    rinv[i * n + j] = ev > 0.0f ? 1.0f / fmaxf(sqrtf(ev), kSqClamp) : 0.0f;
  }
}

// ---------------------------------------------------------------------------------------------
// 2. E route (docs/rkd.md section 3), anchor a not flagged:
//   ψ_abc = (E_ab + E_ac − E_bc) / 2 · R_ab R_ac,  ℓ_abc = h(ψˢ_abc − ψᵗ_abc)
//   mean = Σ ℓ / N³,  sum = Σ ℓ,  none[a] = Σ_bc ℓ_abc / N²
// Backward, with g_a = ∂L/∂ℓ_a.. (grad / N³, grad, or grad[a] / N²), G_abc = g_a h'(ψˢ − ψᵗ),
// q_ab = R_ab² where E_ab >= 1e-24 (else 0: the clamped norm has no gradient), W_ij = ∂L/∂E_ij:
//   W_ab = Σ_c G_abc (R_ab R_ac − ψ_abc q_ab)   (anchor rows: rkd_angle_anchor_kernel)
//        − ½ Σ_k G_kab R_ka R_kb                (pair entries over anchors k: rkd_angle_bwd_pair_kernel)
// and the teacher's W the same with its E, R, ψ and G → −G. The kernels loop over a third index k,
// reading row k of E and R (E_ki = E_ik: both tile slices of row k are contiguous).
// ---------------------------------------------------------------------------------------------

// Stages rows k0 .. k0 + kChunk − 1 of `m`, columns c0 .. c0 + 63, into s[kk][col] (zeros outside
// the matrix: they make every term of an out-of-range k vanish).
__device__ __forceinline__ void stage_rows(const float* __restrict__ m, int64_t n, int64_t k0, int64_t c0,
                                           float (*s)[kTile]) {
  for (int l = threadIdx.x; l < kChunk * kTile; l += kThreads) {
    const int kk = l / kTile;
    const int col = l % kTile;
    const int64_t k = k0 + kk;
    const int64_t cidx = c0 + col;
    s[kk][col] = (k < n && cidx < n) ? m[k * n + cidx] : 0.0f;
  }
}

// The thread's 4 × 4 entries (i, j) of an [n, n] matrix (0 outside).
__device__ __forceinline__ void load_pairs(const float* __restrict__ m, int64_t n, int64_t i0, int64_t j0,
                                           float scale, float (&out)[kPer][kPer]) {
  const int ty = threadIdx.x / kSub;
  const int tx = threadIdx.x % kSub;
#pragma unroll
  for (int r = 0; r < kPer; ++r)
#pragma unroll
    for (int c = 0; c < kPer; ++c) {
      const int64_t i = i0 + ty + kSub * r;
      const int64_t j = j0 + tx + kSub * c;
      out[r][c] = (i < n && j < n) ? scale * m[i * n + j] : 0.0f;
    }
}

// Per-anchor gradient scale g_a.
__device__ __forceinline__ float anchor_grad(const float* __restrict__ grad, bool per_anchor, float scale, int64_t a) {
  return (per_anchor ? grad[a] : grad[0]) * scale;
}

// Shared staging of one k chunk: rows k0 .. k0 + kChunk − 1 of E and R of both networks, restricted
// to the tile's i columns, and of E restricted to its j columns.
struct AnchorStage {
  float es_i[kChunk][kTile], rs_i[kChunk][kTile], es_j[kChunk][kTile];
  float et_i[kChunk][kTile], rt_i[kChunk][kTile], et_j[kChunk][kTile];
};

__device__ __forceinline__ void stage_chunk(const float* __restrict__ es, const float* __restrict__ rs,
                                            const float* __restrict__ et, const float* __restrict__ rt, int64_t n,
                                            int64_t k0, int64_t i0, int64_t j0, AnchorStage& st) {
  stage_rows(es, n, k0, i0, st.es_i);
  stage_rows(rs, n, k0, i0, st.rs_i);
  stage_rows(es, n, k0, j0, st.es_j);
  stage_rows(et, n, k0, i0, st.et_i);
  stage_rows(rt, n, k0, i0, st.rt_i);
  stage_rows(et, n, k0, j0, st.et_j);
}

// Anchor rows (anchor i, pairs (j, k) with j in the tile, k over all rows), one kernel for both
// directions (FWD: forward; else backward with NEED_S / NEED_T):
//   forward:  partial[i, bj] = Σ_{j in tile bj} Σ_k ℓ_ijk  (0 for flagged anchors: the explicit route
//             fills them);
//   backward: W_ij = g_i Σ_k h'(ψˢ_ijk − ψᵗ_ijk) (R_ij R_ik − ψ_ijk q_ij) for the student and the same
//             with the teacher's R, ψ, q and the opposite sign (0 for flagged i), written, not added.
template <bool FWD, bool NEED_S, bool NEED_T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    rkd_angle_anchor_kernel(const float* __restrict__ es,    // [n, n] student E
                            const float* __restrict__ rs,    // [n, n] student R
                            const float* __restrict__ et,    // [n, n] teacher E
                            const float* __restrict__ rt,    // [n, n] teacher R
                            const int* __restrict__ flag,    // [n] near-anchor flags
                            int64_t n,                       // rows
                            const float* __restrict__ grad,  // backward: [n] ("none") or [1] ∂L/∂loss
                            bool per_anchor,                 // backward: grad is [n] (reduction "none")
                            float grad_scale,                // backward: 1/N³ ("mean"), 1/N² ("none"), 1 ("sum")
                            float* __restrict__ partial,     // forward: [n, tiles] out
                            float* __restrict__ ws,          // backward: [n, n] out, student W
                            float* __restrict__ wt) {        // backward: [n, n] out, teacher W
  __shared__ AnchorStage st;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int ty = threadIdx.x / kSub;
  const int tx = threadIdx.x % kSub;
  float es_ij[kPer][kPer], hrs_ij[kPer][kPer], et_ij[kPer][kPer], hrt_ij[kPer][kPer];
  // forward: Σ_k ℓ (a0); backward: Σ_k h' R_ik (a1) and Σ_k h' ψ_ijk (a2) of the student, the same of
  // the teacher (a3, a4). Unused ones are never read and cost no registers.
  float a0[kPer][kPer], a1[kPer][kPer], a2[kPer][kPer], a3[kPer][kPer], a4[kPer][kPer];
  load_pairs(es, n, i0, j0, 1.0f, es_ij);
  load_pairs(rs, n, i0, j0, 0.5f, hrs_ij);  // ½ R_ij: ψ = (E_ij + E_ik − E_jk) · ½ R_ij · R_ik
  load_pairs(et, n, i0, j0, 1.0f, et_ij);
  load_pairs(rt, n, i0, j0, 0.5f, hrt_ij);
#pragma unroll
  for (int r = 0; r < kPer; ++r)
#pragma unroll
    for (int c = 0; c < kPer; ++c) a0[r][c] = a1[r][c] = a2[r][c] = a3[r][c] = a4[r][c] = 0.0f;
  for (int64_t k0 = 0; k0 < n; k0 += kChunk) {
    stage_chunk(es, rs, et, rt, n, k0, i0, j0, st);
    __syncthreads();
#pragma unroll 2
    for (int kk = 0; kk < kChunk; ++kk) {
#pragma unroll
      for (int r = 0; r < kPer; ++r) {
        const float es_ik = st.es_i[kk][ty + kSub * r];
        const float rs_ik = st.rs_i[kk][ty + kSub * r];
        const float et_ik = st.et_i[kk][ty + kSub * r];
        const float rt_ik = st.rt_i[kk][ty + kSub * r];
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
          const float ps = (es_ij[r][c] + es_ik - st.es_j[kk][tx + kSub * c]) * hrs_ij[r][c] * rs_ik;
          const float pt = (et_ij[r][c] + et_ik - st.et_j[kk][tx + kSub * c]) * hrt_ij[r][c] * rt_ik;
          if (FWD) {
            a0[r][c] += smooth_l1(ps - pt);
          } else {
            const float hp = smooth_l1_grad(ps - pt);
            if (NEED_S) {
              a1[r][c] += hp * rs_ik;
              a2[r][c] += hp * ps;
            }
            if (NEED_T) {
              a3[r][c] += hp * rt_ik;
              a4[r][c] += hp * pt;
            }
          }
        }
      }
    }
    __syncthreads();
  }
  if (FWD) {
    // Row sums over the tile's 64 j: 4 per thread, then the 16 tx lanes (one half-warp per ty).
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
      float row = a0[r][0] + a0[r][1] + a0[r][2] + a0[r][3];
#pragma unroll
      for (int off = kSub / 2; off > 0; off >>= 1) row += __shfl_xor_sync(0xffffffffu, row, off);
      const int64_t i = i0 + ty + kSub * r;
      if (tx == 0 && i < n) partial[i * gridDim.x + blockIdx.x] = flag[i] ? 0.0f : row;
    }
    return;
  }
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int64_t i = i0 + ty + kSub * r;
    if (i >= n) continue;
    const float g = flag[i] ? 0.0f : anchor_grad(grad, per_anchor, grad_scale, i);
#pragma unroll
    for (int c = 0; c < kPer; ++c) {
      const int64_t j = j0 + tx + kSub * c;
      if (j >= n) continue;
      if (NEED_S) {
        const float rij = 2.0f * hrs_ij[r][c];
        const float q = es_ij[r][c] >= kSqClamp * kSqClamp ? rij * rij : 0.0f;
        ws[i * n + j] = g * (rij * a1[r][c] - q * a2[r][c]);
      }
      if (NEED_T) {
        const float rij = 2.0f * hrt_ij[r][c];
        const float q = et_ij[r][c] >= kSqClamp * kSqClamp ? rij * rij : 0.0f;
        wt[i * n + j] = -g * (rij * a3[r][c] - q * a4[r][c]);
      }
    }
  }
}

// Backward, pair entries: W_ij += −½ Σ_k g_k h'(ψˢ_kij − ψᵗ_kij) Rˢ_ki Rˢ_kj (student, NEED_S) and
// W_ij += +½ Σ_k g_k h'(ψˢ_kij − ψᵗ_kij) Rᵗ_ki Rᵗ_kj (teacher, NEED_T), over unflagged anchors k;
// runs after the anchor kernel.
template <bool NEED_S, bool NEED_T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    rkd_angle_bwd_pair_kernel(const float* __restrict__ es,    // [n, n] student E
                              const float* __restrict__ rs,    // [n, n] student R
                              const float* __restrict__ et,    // [n, n] teacher E
                              const float* __restrict__ rt,    // [n, n] teacher R
                              const int* __restrict__ flag,    // [n] near-anchor flags
                              int64_t n,                       // rows
                              const float* __restrict__ grad,  // [n] ("none") or [1]: ∂L/∂loss
                              bool per_anchor,                 // grad is [n] (reduction "none")
                              float grad_scale,                // 1/N³ ("mean"), 1/N² ("none"), 1 ("sum")
                              float* __restrict__ ws,          // [n, n] in/out: student W (added to)
                              float* __restrict__ wt) {        // [n, n] in/out: teacher W (added to)
  __shared__ AnchorStage st;
  __shared__ float s_rs_j[kChunk][kTile];
  __shared__ float s_rt_j[kChunk][kTile];
  __shared__ float s_g[kChunk];
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int ty = threadIdx.x / kSub;
  const int tx = threadIdx.x % kSub;
  float es_ij[kPer][kPer], et_ij[kPer][kPer], ps_acc[kPer][kPer], pt_acc[kPer][kPer];
  load_pairs(es, n, i0, j0, 1.0f, es_ij);
  load_pairs(et, n, i0, j0, 1.0f, et_ij);
#pragma unroll
  for (int r = 0; r < kPer; ++r)
#pragma unroll
    for (int c = 0; c < kPer; ++c) ps_acc[r][c] = pt_acc[r][c] = 0.0f;
  for (int64_t k0 = 0; k0 < n; k0 += kChunk) {
    stage_chunk(es, rs, et, rt, n, k0, i0, j0, st);
    stage_rows(rs, n, k0, j0, s_rs_j);
    stage_rows(rt, n, k0, j0, s_rt_j);
    if (threadIdx.x < kChunk) {
      const int64_t k = k0 + threadIdx.x;
      s_g[threadIdx.x] = (k < n && !flag[k]) ? anchor_grad(grad, per_anchor, grad_scale, k) : 0.0f;
    }
    __syncthreads();
#pragma unroll 2
    for (int kk = 0; kk < kChunk; ++kk) {
      const float g = s_g[kk];
#pragma unroll
      for (int r = 0; r < kPer; ++r) {
        const float es_ki = st.es_i[kk][ty + kSub * r];
        const float rs_ki = st.rs_i[kk][ty + kSub * r];
        const float et_ki = st.et_i[kk][ty + kSub * r];
        const float rt_ki = st.rt_i[kk][ty + kSub * r];
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
          const float rrs = rs_ki * s_rs_j[kk][tx + kSub * c];
          const float rrt = rt_ki * s_rt_j[kk][tx + kSub * c];
          const float ps = 0.5f * (es_ki + st.es_j[kk][tx + kSub * c] - es_ij[r][c]) * rrs;
          const float pt = 0.5f * (et_ki + st.et_j[kk][tx + kSub * c] - et_ij[r][c]) * rrt;
          const float gh = g * smooth_l1_grad(ps - pt);
          if (NEED_S) ps_acc[r][c] += gh * rrs;
          if (NEED_T) pt_acc[r][c] += gh * rrt;
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < kPer; ++r)
#pragma unroll
    for (int c = 0; c < kPer; ++c) {
      const int64_t i = i0 + ty + kSub * r;
      const int64_t j = j0 + tx + kSub * c;
      if (i < n && j < n) {
        if (NEED_S) ws[i * n + j] -= 0.5f * ps_acc[r][c];
        if (NEED_T) wt[i * n + j] += 0.5f * pt_acc[r][c];
      }
    }
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------

dim3 tile_grid(int64_t tiles, const char* op) {
  TORCH_CHECK(tiles <= 65535, op, ": N is too large for the tile grid (at most 65535 tiles of ", kTile, " rows)");
  return dim3(static_cast<unsigned int>(tiles), static_cast<unsigned int>(tiles));
}

// What both directions need: each network's prepared rows, E, R, and the shared near-anchor flags.
struct AngleState {
  RkdPrep s, t;
  at::Tensor es, rs, et, rt;  // [n, n] float32
  at::Tensor flag;            // [n] int32
  int64_t n;
};

void angle_e(const RkdPrep& x, bool split, at::Tensor& flag, at::Tensor& e, at::Tensor& r, const char* op) {
  const auto f32 = x.x.options().dtype(at::kFloat);
  e = at::empty({x.n, x.n}, f32);
  r = at::empty({x.n, x.n}, f32);
  const dim3 grid = tile_grid(ceil_div(x.n, kTileM), op);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  KD_DISPATCH_RKD_TYPES(x.x.scalar_type(), "rkd_angle_gram", [&] {
    auto launch = [&](auto split_tag) {  // 3xTF32 exists for fp32 inputs only (no dead instantiations)
      constexpr bool kSplit = decltype(split_tag)::value && std::is_same_v<scalar_t, float>;
      rkd_angle_gram_kernel<scalar_t, kSplit><<<grid, kTileThreads, 0, stream>>>(
          x.x.data_ptr<scalar_t>(), x.mean.data_ptr<float>(), x.sq.data_ptr<float>(), x.n, x.d, e.data_ptr<float>(),
          r.data_ptr<float>(), flag.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (split) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
  });
}

AngleState angle_state(const at::Tensor& student, const at::Tensor& teacher, bool split, const char* op) {
  at::Tensor xs, xt;
  std::tie(xs, xt) = rkd_inputs(student, teacher);
  AngleState st{rkd_prepare(xs), rkd_prepare(xt), {}, {}, {}, {}, {}, xs.size(0)};
  st.flag = at::zeros({st.n}, xs.options().dtype(at::kInt));
  angle_e(st.s, split, st.flag, st.es, st.rs, op);
  angle_e(st.t, split, st.flag, st.et, st.rt, op);
  return st;
}

// ---- 3. Explicit route (near anchors; docs/rkd.md section 4), in ATen, fp32 ----------------------
// V = X − x_a (original rows), V^ = V / max(|v_b|, 1e-12), ψ_a = V^ V^ᵀ. Backward given U [B, N, N]
// (sign included): G = 2 U V^, dV = (G − V^ (V^ · G)) / |v_b| (0 where |v_b| < 1e-12),
// dX += dV, dx_a −= Σ_b dV_b.
struct Explicit {
  at::Tensor vh;    // [B, N, D] normalized differences
  at::Tensor norm;  // [B, N] |v_b|
  at::Tensor psi;   // [B, N, N]
};

Explicit explicit_psi(const at::Tensor& xf, const at::Tensor& anchors) {
  at::Tensor v = xf.unsqueeze(0) - xf.index_select(0, anchors).unsqueeze(1);
  at::Tensor norm = (v * v).sum(2).sqrt();
  at::Tensor vh = v.div_(norm.clamp_min(kSqClamp).unsqueeze(2));
  at::Tensor psi = vh.bmm(vh.transpose(1, 2));
  return {vh, norm, psi};
}

void explicit_grad(at::Tensor& dx, const at::Tensor& u, const Explicit& side, const at::Tensor& anchors) {
  at::Tensor g = u.bmm(side.vh).mul_(2.0);
  g.sub_(side.vh * (side.vh * g).sum(2, /*keepdim=*/true));
  const at::Tensor inv = at::where(side.norm >= kSqClamp, side.norm.reciprocal(), 0.0);  // no gradient below eps
  const at::Tensor dv = g.mul_(inv.unsqueeze(2));
  dx.add_(dv.sum(0));
  dx.index_add_(0, anchors, dv.sum(1), -1.0);
}

// Batches of flagged anchors (the one host synchronisation: listing them).
template <typename Fn>
void for_near_anchors(const AngleState& st, Fn&& fn) {
  const at::Tensor near = st.flag.nonzero().reshape({-1});
  const int64_t count = near.size(0);
  if (count == 0) return;
  const int64_t width = std::max({st.n, st.s.d, st.t.d});
  const int64_t batch = std::max<int64_t>(1, kExplicitElems / (st.n * width));
  const at::Tensor xs = st.s.x.to(at::kFloat);
  const at::Tensor xt = st.t.x.to(at::kFloat);
  for (int64_t b0 = 0; b0 < count; b0 += batch) {
    const at::Tensor idx = near.slice(0, b0, std::min(count, b0 + batch));
    fn(idx, explicit_psi(xs, idx), explicit_psi(xt, idx));
  }
}

at::Tensor smooth_l1_sum(const at::Tensor& ps, const at::Tensor& pt) {  // Σ_bc h(ψˢ − ψᵗ) per anchor
  const at::Tensor diff = ps - pt;
  const at::Tensor ad = diff.abs();
  return at::where(ad < 1.0, 0.5 * diff * diff, ad - 0.5).sum(2).sum(1);
}

template <bool NEED_S, bool NEED_T>
void launch_angle_bwd(const AngleState& st, const at::Tensor& g, bool per_anchor, float scale, at::Tensor& ws,
                      at::Tensor& wt, const char* op) {
  const dim3 grid = tile_grid(ceil_div(st.n, kTile), op);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  float* ws_ptr = NEED_S ? ws.data_ptr<float>() : nullptr;
  float* wt_ptr = NEED_T ? wt.data_ptr<float>() : nullptr;
  const int* flag = st.flag.data_ptr<int>();
  rkd_angle_anchor_kernel<false, NEED_S, NEED_T><<<grid, kThreads, 0, stream>>>(
      st.es.data_ptr<float>(), st.rs.data_ptr<float>(), st.et.data_ptr<float>(), st.rt.data_ptr<float>(), flag, st.n,
      g.data_ptr<float>(), per_anchor, scale, nullptr, ws_ptr, wt_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  rkd_angle_bwd_pair_kernel<NEED_S, NEED_T><<<grid, kThreads, 0, stream>>>(
      st.es.data_ptr<float>(), st.rs.data_ptr<float>(), st.et.data_ptr<float>(), st.rt.data_ptr<float>(), flag, st.n,
      g.data_ptr<float>(), per_anchor, scale, ws_ptr, wt_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ∂L/∂X of the E route: A = 2 (W + Wᵀ) with a zero diagonal (E_ii = 0 is no function of X), then
// rowsum(A) x~ − A x~ on tensor cores; float32 [n, d].
at::Tensor e_route_grad(const at::Tensor& w, const RkdPrep& x, bool split) {
  at::Tensor a = (w + w.t()).mul_(2.0);
  a.diagonal().zero_();
  const at::Tensor rowsum = a.sum(1).contiguous();
  at::Tensor gacc = at::zeros({x.n, x.d}, a.options());
  rkd_laplacian_pass(a, rowsum, x.x, x.mean, 0, x.n, split, gacc);
  return gacc;
}

}  // namespace

at::Tensor rkd_angle_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher, const std::string& reduction,
                              const std::string& precision) {
  constexpr const char* op = "rkd_angle_fwd_cuda";
  check_rkd_pair(student, teacher, op, 1);
  const Reduction red = parse_reduction(reduction, op);
  const bool split = parse_precision(precision, op);
  const c10::cuda::CUDAGuard guard(student.device());
  const AngleState st = angle_state(student, teacher, split, op);
  const int64_t n = st.n;
  const int64_t tiles = ceil_div(n, kTile);
  at::Tensor partial = at::empty({n, tiles}, st.es.options());
  rkd_angle_anchor_kernel<true, false, false><<<tile_grid(tiles, op), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      st.es.data_ptr<float>(), st.rs.data_ptr<float>(), st.et.data_ptr<float>(), st.rt.data_ptr<float>(),
      st.flag.data_ptr<int>(), n, nullptr, false, 0.0f, partial.data_ptr<float>(), nullptr, nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // [n]: Σ_bc ℓ_abc (flagged anchors 0 so far); NaN everywhere for a non-finite input
  at::Tensor per_anchor = partial.sum(1) + (nan_carrier(st.s.x) + nan_carrier(st.t.x));
  for_near_anchors(st, [&](const at::Tensor& idx, const Explicit& s, const Explicit& t) {
    per_anchor.index_copy_(0, idx, smooth_l1_sum(s.psi, t.psi));
  });
  const double nd = static_cast<double>(n);
  at::Tensor loss;
  if (red == Reduction::kNone) {
    loss = per_anchor / (nd * nd);
  } else if (red == Reduction::kSum) {
    loss = per_anchor.sum();
  } else {
    loss = per_anchor.sum() / (nd * nd * nd);
  }
  return loss.to(student.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> rkd_angle_bwd_cuda(const at::Tensor& grad, const at::Tensor& student,
                                                      const at::Tensor& teacher, const std::string& reduction,
                                                      bool need_student, bool need_teacher,
                                                      const std::string& precision) {
  constexpr const char* op = "rkd_angle_bwd_cuda";
  check_rkd_pair(student, teacher, op, 1);
  const Reduction red = parse_reduction(reduction, op);
  const bool split = parse_precision(precision, op);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor grad_student = at::empty({0}, student.options());
  at::Tensor grad_teacher = at::empty({0}, teacher.options());
  if (!need_student && !need_teacher) return {grad_student, grad_teacher};
  const int64_t n = student.size(0);
  const double nd = static_cast<double>(n);
  const bool none = red == Reduction::kNone;
  const at::Tensor g = rkd_upstream_grad(grad, student, {n}, none, op);
  const double scale = red == Reduction::kMean ? 1.0 / (nd * nd * nd) : (none ? 1.0 / (nd * nd) : 1.0);
  const AngleState st = angle_state(student, teacher, split, op);
  const auto f32 = st.es.options();
  at::Tensor ws = need_student ? at::empty({n, n}, f32) : at::Tensor();
  at::Tensor wt = need_teacher ? at::empty({n, n}, f32) : at::Tensor();
  const float fscale = static_cast<float>(scale);
  if (need_student && need_teacher) {
    launch_angle_bwd<true, true>(st, g, none, fscale, ws, wt, op);
  } else if (need_student) {
    launch_angle_bwd<true, false>(st, g, none, fscale, ws, wt, op);
  } else {
    launch_angle_bwd<false, true>(st, g, none, fscale, ws, wt, op);
  }
  at::Tensor gs = need_student ? e_route_grad(ws, st.s, split) : at::Tensor();
  at::Tensor gt = need_teacher ? e_route_grad(wt, st.t, split) : at::Tensor();
  const at::Tensor anchor_scale = (none ? g * scale : (g * scale).expand({n})).contiguous();  // [n] g_a
  for_near_anchors(st, [&](const at::Tensor& idx, const Explicit& s, const Explicit& t) {
    const at::Tensor u = (s.psi - t.psi).clamp(-1.0, 1.0).mul_(anchor_scale.index_select(0, idx).view({-1, 1, 1}));
    if (need_student) explicit_grad(gs, u, s, idx);
    if (need_teacher) explicit_grad(gt, -u, t, idx);
  });
  const at::Tensor carrier = nan_carrier(st.s.x) + nan_carrier(st.t.x);  // NaN for a non-finite input
  if (need_student) grad_student = (gs + carrier).to(student.scalar_type());
  if (need_teacher) grad_teacher = (gt + carrier).to(teacher.scalar_type());
  return {grad_student, grad_teacher};
}

}  // namespace kd_kernels
