// RKD angle loss (Park et al. 2019), forward and backward. Functions (include/kd_ops.h):
//   rkd_angle_fwd_cuda(student, teacher, reduction, precision) -> loss (0-dim, or [N] for "none")
//   rkd_angle_bwd_cuda(grad, student, teacher, reduction, need_student, need_teacher, precision)
//       -> (grad_student, grad_teacher)   (an unneeded one is an empty tensor)
// student [N, Ds], teacher [N, Dt], float32 / float16 / bfloat16 (float64: the PyTorch path).
// Math: docs/rkd.md. If student and teacher dtypes differ, both are cast to float32.
//
// Numerics. All arithmetic is in float32. Squared distances are summed from explicit differences,
// Σ_k (x_ik − x_jk)², never from a Gram matrix, so every pair, near duplicates included, is exact to
// the rounding of its differences (docs/rkd.md section 4 asks the explicit route only for near anchors;
// here every anchor takes it, which is at least as accurate). A duplicated row has squared distance
// exactly 0 and E is exactly symmetric with a zero diagonal, so every degenerate triple gives ψ = 0
// bit for bit. Zero-length difference vectors (|x_b − x_a| < 1e-12) get 1/|v| := 0: ψ is 0 there as
// in the reference, and they contribute no gradient (never the reference's 1/eps = 1e12).
// `precision` is accepted for the common signature: these kernels use no tensor cores yet
// (FMA tiles; a tensor-core angle kernel on include/pairwise_tiles.cuh is future work).
//
// Shared tiling. A block of kThreads = 256 threads owns a kTile × kTile = 64 × 64 tile of (i, j)
// pairs; thread (ty, tx) = (tid / 16, tid % 16) owns the 4 × 4 pairs i = i0 + ty + 16 r,
// j = j0 + tx + 16 c (r, c < 4): strided rather than blocked so that shared-memory reads are
// conflict-free (the 16 tx of a half-warp read 16 consecutive words).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>

#include "checks.h"
#include "kd_ops.h"

// float32 / float16 / bfloat16 only: float64 runs on the PyTorch path (fewer kernels to compile).
#define KD_DISPATCH_RKD_TYPES(TYPE, NAME, ...)                          \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
#define KD_DISPATCH_ACC_FLOAT(TYPE, NAME, ...) AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__))

namespace kd_kernels {
namespace {

// ---------------------------------------------------------------------------------------------
// Tiling constants.
// ---------------------------------------------------------------------------------------------
constexpr int kThreads = 256;          // 16 × 16 threads: enough warps to hide shared-memory latency
constexpr int kSub = 16;               // threads along each side of the tile
constexpr int kPer = 4;                // pairs per thread along each side (kSub · kPer = kTile)
constexpr int kTile = kSub * kPer;     // 64: a 64 × 64 tile reuses each loaded row 64 times
constexpr int kKc = 32;                // feature chunk of the distance tiles: 32 consecutive loads per row
constexpr int kPad = kTile + 1;        // padded row length: column-wise stores hit distinct banks
constexpr int kWarps = kThreads / 32;  // warps per block, for block reductions
// Both eps of the reference: pdist clamps d² at 1e-12; F.normalize clamps the norm at 1e-12.
constexpr double kSqClamp = 1e-12;
constexpr double kNormEps = 1e-12;

// Anchor chunk of the angle kernels: 6 (forward) or 8 (backward) rows of kTile values per anchor
// are staged in shared memory; 16 anchors of float32 (8 of float64) keep that under 32 KB.
template <typename acc_t>
struct AngleChunk {
  static constexpr int kc = sizeof(acc_t) == 8 ? 8 : 16;
};

// Feature chunk of the distance backward's A·X product: 64 columns of float32 (4 per thread), 16 of
// float64 (1 per thread) so that the A tile plus the X chunk stay under the 48 KB static limit.
template <typename acc_t>
struct GradChunk {
  static constexpr int cc = sizeof(acc_t) == 8 ? 1 : 4;  // columns per thread
  static constexpr int cw = kSub * cc;                    // columns per chunk
};

enum class Reduction { kMean, kSum, kNone };

Reduction parse_reduction(const std::string& reduction, const char* op) {
  if (reduction == "mean") return Reduction::kMean;
  if (reduction == "sum") return Reduction::kSum;
  if (reduction == "none") return Reduction::kNone;
  TORCH_CHECK(false, op, ": reduction must be one of 'mean', 'sum', 'none', got '", std::string(reduction), "'");
  return Reduction::kMean;  // unreachable
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Device helpers.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

// smooth-L1 with beta 1: h(x) = x²/2 for |x| < 1, |x| − 1/2 otherwise; h'(x) = clamp(x, −1, 1).
template <typename T>
__device__ __forceinline__ T smooth_l1(T x) {
  const T ax = fabs(x);
  return ax < T(1) ? T(0.5) * x * x : ax - T(0.5);
}
template <typename T>
__device__ __forceinline__ T smooth_l1_grad(T x) {
  return x < T(-1) ? T(-1) : (x > T(1) ? T(1) : x);
}

// The reference's distance from a squared distance: sqrt(clamp(d², min=1e-12)).
template <typename T>
__device__ __forceinline__ T clamped_dist(T sq) {
  return sqrt(sq > T(kSqClamp) ? sq : T(kSqClamp));
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum of v over the block; the result is valid in thread 0. `red` holds kWarps values.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* red) {
  v = warp_sum(v);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  __syncthreads();  // red may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = threadIdx.x < kWarps ? red[threadIdx.x] : T(0);
  if (warp == 0) v = warp_sum(v);
  return v;
}

// Squared distances of one 64 × 64 tile, from explicit differences:
//   acc[r][c] = Σ_k (x[i, k] − x[j, k])²,  i = i0 + ty + 16 r,  j = j0 + tx + 16 c.
// Rows at or past n read as zeros (their results are garbage and must be masked by the caller).
// The features are streamed in chunks of kKc columns through shared memory, stored transposed
// (sa[k][row]) so that each thread reads its 4 + 4 operands with broadcasts / consecutive words.
// Ends with a __syncthreads(), so the caller may reuse sa / sb at once.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void tile_sqdist(const scalar_t* __restrict__ x,  // [n, d] row-major features
                                            int64_t n,                        // rows
                                            int64_t d,                        // features per row
                                            int64_t i0,                       // first row of the tile
                                            int64_t j0,                       // first column of the tile
                                            acc_t (*sa)[kPad],                // [kKc][kPad] staging of rows i
                                            acc_t (*sb)[kPad],                // [kKc][kPad] staging of rows j
                                            acc_t (&acc)[kPer][kPer]) {       // out: the thread's 4 × 4 values
  const int tid = threadIdx.x;
  const int ty = tid / kSub;
  const int tx = tid % kSub;
#pragma unroll
  for (int r = 0; r < kPer; ++r)
#pragma unroll
    for (int c = 0; c < kPer; ++c) acc[r][c] = acc_t(0);
  for (int64_t k0 = 0; k0 < d; k0 += kKc) {
    for (int l = tid; l < kKc * kTile; l += kThreads) {
      const int row = l / kKc;
      const int kk = l % kKc;
      const int64_t k = k0 + kk;
      const int64_t gi = i0 + row;
      const int64_t gj = j0 + row;
      sa[kk][row] = (gi < n && k < d) ? static_cast<acc_t>(x[gi * d + k]) : acc_t(0);
      sb[kk][row] = (gj < n && k < d) ? static_cast<acc_t>(x[gj * d + k]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < kKc; ++kk) {
      acc_t a[kPer];
      acc_t b[kPer];
#pragma unroll
      for (int r = 0; r < kPer; ++r) a[r] = sa[kk][ty + kSub * r];
#pragma unroll
      for (int c = 0; c < kPer; ++c) b[c] = sb[kk][tx + kSub * c];
#pragma unroll
      for (int r = 0; r < kPer; ++r)
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
          const acc_t diff = a[r] - b[c];
          acc[r][c] = fma_rn(diff, diff, acc[r][c]);
        }
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// RKD angle.
//
// Forward (lenscloth/RKD RKdAngle), for anchor a and pair (b, c), via the polarization identity:
//   E_ab = Σ_k (x_ak − x_bk)²  (exact, from differences; E symmetric, E_aa = 0)
//   n_ab = max(sqrt(E_ab), 1e-12),  R_ab = 1 / n_ab                      (F.normalize's eps)
//   ψ_abc = <x_b − x_a, x_c − x_a> / (n_ab n_ac) = (E_ab + E_ac − E_bc) / 2 · R_ab R_ac
//   ℓ_abc = h(ψˢ_abc − ψᵗ_abc);  mean = Σ ℓ / N³,  sum = Σ ℓ,  none[a] = Σ_bc ℓ_abc / N²
// Degenerate triples (b = a, c = a, or a duplicated row) give E_ab + E_ac − E_bc = 0 exactly, hence
// ψ = 0, for both networks: zero loss and, since h'(0) = 0, zero gradient, but counted in N³.
//
// Backward, with g_a = ∂L/∂ℓ_a.. (grad / N³, grad, or grad[a] / N²), G_abc = g_a h'(ψˢ − ψᵗ),
// q_ab = 1/E_ab where sqrt(E_ab) ≥ 1e-12 (else 0: the clamped norm has no gradient),
// and the entries of E treated as independent variables W_ij = ∂L/∂E_ij:
//   ∂ψ_abc/∂E_ab = R_ab R_ac / 2 − ψ_abc q_ab / 2  (∂ψ_abc/∂E_ac likewise),  ∂ψ_abc/∂E_bc = −R_ab R_ac / 2
//   W_ab = Σ_c G_abc (R_ab R_ac − ψ_abc q_ab)        (the anchor rows; G, ψ symmetric in b, c)
//        − ½ Σ_k G_kab R_ka R_kb                     (the pair entries, summed over anchors k)
//   ∂L/∂x_i = Σ_j (W_ij + W_ji) ∂E_ij/∂x_i = 2 Σ_j S_ij (x_i − x_j),   S = W + Wᵀ
// i.e. ∂L/∂X = 2 (diag(S 1) − S) X_c: one GEMM (X_c = X minus its column mean; the Laplacian is
// translation invariant, centring only removes cancellation). The teacher's gradient is the same
// with the teacher's E, R, ψ and G → −G.
// Three kernels, all over 64 × 64 tiles (i, j) that loop over a third index k, reading row k of
// E and R (E_ki = E_ik: both tile slices of row k are contiguous):
//   rkd_angle_fwd_kernel      anchor i: ψ_ijk, Σ_k ℓ per (i, j); per-anchor row partials
//   rkd_angle_bwd_anchor_kernel  anchor i: W_ij  = Σ_k G_ijk (R_ij R_ik − ψ_ijk q_ij)
//   rkd_angle_bwd_pair_kernel    anchor k: W_ij += −½ Σ_k G_kij R_ki R_kj
// ---------------------------------------------------------------------------------------------

// E and R of one feature matrix: E[i, j] = Σ_k (x_ik − x_jk)², R[i, j] = 1 / max(sqrt(E[i, j]), 1e-12).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    rkd_sqdist_kernel(const scalar_t* __restrict__ x,  // [n, d] features
                      int64_t n,                       // rows
                      int64_t d,                       // features per row
                      acc_t* __restrict__ e,           // [n, n] out: squared distances
                      acc_t* __restrict__ rinv) {      // [n, n] out: inverse clamped norms
  __shared__ acc_t smem[2 * kKc * kPad];
  auto sa = reinterpret_cast<acc_t(*)[kPad]>(smem);
  auto sb = reinterpret_cast<acc_t(*)[kPad]>(smem + kKc * kPad);
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  acc_t sq[kPer][kPer];
  tile_sqdist(x, n, d, i0, j0, sa, sb, sq);
  const int ty = threadIdx.x / kSub;
  const int tx = threadIdx.x % kSub;
#pragma unroll
  for (int r = 0; r < kPer; ++r)
#pragma unroll
    for (int c = 0; c < kPer; ++c) {
      const int64_t i = i0 + ty + kSub * r;
      const int64_t j = j0 + tx + kSub * c;
      if (i < n && j < n) {
        const acc_t norm = sqrt(sq[r][c]);
        e[i * n + j] = sq[r][c];
        rinv[i * n + j] = norm >= acc_t(kNormEps) ? acc_t(1) / norm : acc_t(0);  // zero-length: no gradient
      }
    }
}

// Stages rows k0 .. k0 + kc − 1 of `m`, restricted to the columns c0 .. c0 + 63, into s[kk][col]
// (zeros outside the matrix: they make every term of an out-of-range anchor vanish).
template <typename acc_t, int kc>
__device__ __forceinline__ void stage_rows(const acc_t* __restrict__ m,  // [n, n] matrix (E or R)
                                           int64_t n,                    // rows
                                           int64_t k0,                   // first staged row
                                           int64_t c0,                   // first staged column
                                           acc_t (*s)[kTile]) {          // [kc][kTile] destination
  for (int l = threadIdx.x; l < kc * kTile; l += kThreads) {
    const int kk = l / kTile;
    const int col = l % kTile;
    const int64_t k = k0 + kk;
    const int64_t cidx = c0 + col;
    s[kk][col] = (k < n && cidx < n) ? m[k * n + cidx] : acc_t(0);
  }
}

// Forward: block (bj, bi) sums ℓ_ijk = h(ψˢ_ijk − ψᵗ_ijk) over all k for its pairs (anchor i) and
// writes, per row i, the sum over its 64 j into partial[i, bj].
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    rkd_angle_fwd_kernel(const acc_t* __restrict__ es,   // [n, n] student squared distances
                         const acc_t* __restrict__ rs,   // [n, n] student inverse clamped norms
                         const acc_t* __restrict__ et,   // [n, n] teacher squared distances
                         const acc_t* __restrict__ rt,   // [n, n] teacher inverse clamped norms
                         int64_t n,                      // rows
                         acc_t* __restrict__ partial) {  // [n, tiles] out: Σ_{j in tile bj, k} ℓ_ijk
  constexpr int kc = AngleChunk<acc_t>::kc;
  __shared__ acc_t s_es_i[kc][kTile];
  __shared__ acc_t s_rs_i[kc][kTile];
  __shared__ acc_t s_es_j[kc][kTile];
  __shared__ acc_t s_et_i[kc][kTile];
  __shared__ acc_t s_rt_i[kc][kTile];
  __shared__ acc_t s_et_j[kc][kTile];
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int ty = threadIdx.x / kSub;
  const int tx = threadIdx.x % kSub;
  acc_t es_ij[kPer][kPer], hrs_ij[kPer][kPer], et_ij[kPer][kPer], hrt_ij[kPer][kPer], acc[kPer][kPer];
#pragma unroll
  for (int r = 0; r < kPer; ++r)
#pragma unroll
    for (int c = 0; c < kPer; ++c) {
      const int64_t i = i0 + ty + kSub * r;
      const int64_t j = j0 + tx + kSub * c;
      const bool in = i < n && j < n;
      es_ij[r][c] = in ? es[i * n + j] : acc_t(0);
      hrs_ij[r][c] = in ? acc_t(0.5) * rs[i * n + j] : acc_t(0);
      et_ij[r][c] = in ? et[i * n + j] : acc_t(0);
      hrt_ij[r][c] = in ? acc_t(0.5) * rt[i * n + j] : acc_t(0);
      acc[r][c] = acc_t(0);
    }
  for (int64_t k0 = 0; k0 < n; k0 += kc) {
    stage_rows<acc_t, kc>(es, n, k0, i0, s_es_i);
    stage_rows<acc_t, kc>(rs, n, k0, i0, s_rs_i);
    stage_rows<acc_t, kc>(es, n, k0, j0, s_es_j);
    stage_rows<acc_t, kc>(et, n, k0, i0, s_et_i);
    stage_rows<acc_t, kc>(rt, n, k0, i0, s_rt_i);
    stage_rows<acc_t, kc>(et, n, k0, j0, s_et_j);
    __syncthreads();
#pragma unroll 2
    for (int kk = 0; kk < kc; ++kk) {
#pragma unroll
      for (int r = 0; r < kPer; ++r) {
        const acc_t es_ik = s_es_i[kk][ty + kSub * r];
        const acc_t rs_ik = s_rs_i[kk][ty + kSub * r];
        const acc_t et_ik = s_et_i[kk][ty + kSub * r];
        const acc_t rt_ik = s_rt_i[kk][ty + kSub * r];
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
          const acc_t ps = (es_ij[r][c] + es_ik - s_es_j[kk][tx + kSub * c]) * hrs_ij[r][c] * rs_ik;
          const acc_t pt = (et_ij[r][c] + et_ik - s_et_j[kk][tx + kSub * c]) * hrt_ij[r][c] * rt_ik;
          acc[r][c] += smooth_l1(ps - pt);
        }
      }
    }
    __syncthreads();
  }
  // Row sums over the tile's 64 j: 4 per thread, then the 16 tx lanes (one half-warp per ty).
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    acc_t row = acc[r][0] + acc[r][1] + acc[r][2] + acc[r][3];
#pragma unroll
    for (int off = kSub / 2; off > 0; off >>= 1) row += __shfl_xor_sync(0xffffffffu, row, off);
    const int64_t i = i0 + ty + kSub * r;
    if (tx == 0 && i < n) partial[i * gridDim.x + blockIdx.x] = row;
  }
}

// Per-anchor gradient scale g_a (see the comment block above).
template <typename acc_t>
__device__ __forceinline__ acc_t anchor_grad(const acc_t* __restrict__ grad, bool per_anchor, acc_t scale,
                                             int64_t a) {
  return (per_anchor ? grad[a] : grad[0]) * scale;
}

// Backward, anchor rows: W_ij = g_i Σ_k h'(ψˢ_ijk − ψᵗ_ijk) (R_ij R_ik − ψ_ijk q_ij) for the student
// (NEED_S) and the same with the teacher's R, ψ, q and the opposite sign (NEED_T).
template <typename acc_t, bool NEED_S, bool NEED_T>
__global__ void __launch_bounds__(kThreads)
    rkd_angle_bwd_anchor_kernel(const acc_t* __restrict__ es,    // [n, n] student squared distances
                                const acc_t* __restrict__ rs,    // [n, n] student inverse clamped norms
                                const acc_t* __restrict__ et,    // [n, n] teacher squared distances
                                const acc_t* __restrict__ rt,    // [n, n] teacher inverse clamped norms
                                int64_t n,                       // rows
                                const acc_t* __restrict__ grad,  // [n] ("none") or [1]: ∂L/∂loss
                                bool per_anchor,                 // grad is [n] (reduction "none")
                                acc_t grad_scale,                // 1/N³ ("mean"), 1/N² ("none"), 1 ("sum")
                                acc_t* __restrict__ ws,          // [n, n] out: student W (written, not added)
                                acc_t* __restrict__ wt) {        // [n, n] out: teacher W (written, not added)
  constexpr int kc = AngleChunk<acc_t>::kc;
  __shared__ acc_t s_es_i[kc][kTile];
  __shared__ acc_t s_rs_i[kc][kTile];
  __shared__ acc_t s_es_j[kc][kTile];
  __shared__ acc_t s_et_i[kc][kTile];
  __shared__ acc_t s_rt_i[kc][kTile];
  __shared__ acc_t s_et_j[kc][kTile];
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int ty = threadIdx.x / kSub;
  const int tx = threadIdx.x % kSub;
  acc_t es_ij[kPer][kPer], rs_ij[kPer][kPer], et_ij[kPer][kPer], rt_ij[kPer][kPer];
  // Σ_k h' R_ik and Σ_k h' ψ_ijk, for each network.
  acc_t s1s[kPer][kPer], s2s[kPer][kPer], s1t[kPer][kPer], s2t[kPer][kPer];
#pragma unroll
  for (int r = 0; r < kPer; ++r)
#pragma unroll
    for (int c = 0; c < kPer; ++c) {
      const int64_t i = i0 + ty + kSub * r;
      const int64_t j = j0 + tx + kSub * c;
      const bool in = i < n && j < n;
      es_ij[r][c] = in ? es[i * n + j] : acc_t(0);
      rs_ij[r][c] = in ? rs[i * n + j] : acc_t(0);
      et_ij[r][c] = in ? et[i * n + j] : acc_t(0);
      rt_ij[r][c] = in ? rt[i * n + j] : acc_t(0);
      s1s[r][c] = s2s[r][c] = s1t[r][c] = s2t[r][c] = acc_t(0);
    }
  for (int64_t k0 = 0; k0 < n; k0 += kc) {
    stage_rows<acc_t, kc>(es, n, k0, i0, s_es_i);
    stage_rows<acc_t, kc>(rs, n, k0, i0, s_rs_i);
    stage_rows<acc_t, kc>(es, n, k0, j0, s_es_j);
    stage_rows<acc_t, kc>(et, n, k0, i0, s_et_i);
    stage_rows<acc_t, kc>(rt, n, k0, i0, s_rt_i);
    stage_rows<acc_t, kc>(et, n, k0, j0, s_et_j);
    __syncthreads();
#pragma unroll 2
    for (int kk = 0; kk < kc; ++kk) {
#pragma unroll
      for (int r = 0; r < kPer; ++r) {
        const acc_t es_ik = s_es_i[kk][ty + kSub * r];
        const acc_t rs_ik = s_rs_i[kk][ty + kSub * r];
        const acc_t et_ik = s_et_i[kk][ty + kSub * r];
        const acc_t rt_ik = s_rt_i[kk][ty + kSub * r];
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
          const acc_t ps = acc_t(0.5) * (es_ij[r][c] + es_ik - s_es_j[kk][tx + kSub * c]) * rs_ij[r][c] * rs_ik;
          const acc_t pt = acc_t(0.5) * (et_ij[r][c] + et_ik - s_et_j[kk][tx + kSub * c]) * rt_ij[r][c] * rt_ik;
          const acc_t hp = smooth_l1_grad(ps - pt);
          if (NEED_S) {
            s1s[r][c] += hp * rs_ik;
            s2s[r][c] += hp * ps;
          }
          if (NEED_T) {
            s1t[r][c] += hp * rt_ik;
            s2t[r][c] += hp * pt;
          }
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int64_t i = i0 + ty + kSub * r;
    if (i >= n) continue;
    const acc_t g = anchor_grad(grad, per_anchor, grad_scale, i);
#pragma unroll
    for (int c = 0; c < kPer; ++c) {
      const int64_t j = j0 + tx + kSub * c;
      if (j >= n) continue;
      if (NEED_S) {
        const acc_t q = sqrt(es_ij[r][c]) >= acc_t(kNormEps) ? rs_ij[r][c] * rs_ij[r][c] : acc_t(0);
        ws[i * n + j] = g * (rs_ij[r][c] * s1s[r][c] - q * s2s[r][c]);
      }
      if (NEED_T) {
        const acc_t q = sqrt(et_ij[r][c]) >= acc_t(kNormEps) ? rt_ij[r][c] * rt_ij[r][c] : acc_t(0);
        wt[i * n + j] = -g * (rt_ij[r][c] * s1t[r][c] - q * s2t[r][c]);
      }
    }
  }
}

// Backward, pair entries: W_ij += −½ Σ_k g_k h'(ψˢ_kij − ψᵗ_kij) Rˢ_ki Rˢ_kj (student, NEED_S) and
// W_ij += +½ Σ_k g_k h'(ψˢ_kij − ψᵗ_kij) Rᵗ_ki Rᵗ_kj (teacher, NEED_T); runs after the anchor kernel.
template <typename acc_t, bool NEED_S, bool NEED_T>
__global__ void __launch_bounds__(kThreads)
    rkd_angle_bwd_pair_kernel(const acc_t* __restrict__ es,    // [n, n] student squared distances
                              const acc_t* __restrict__ rs,    // [n, n] student inverse clamped norms
                              const acc_t* __restrict__ et,    // [n, n] teacher squared distances
                              const acc_t* __restrict__ rt,    // [n, n] teacher inverse clamped norms
                              int64_t n,                       // rows
                              const acc_t* __restrict__ grad,  // [n] ("none") or [1]: ∂L/∂loss
                              bool per_anchor,                 // grad is [n] (reduction "none")
                              acc_t grad_scale,                // 1/N³ ("mean"), 1/N² ("none"), 1 ("sum")
                              acc_t* __restrict__ ws,          // [n, n] in/out: student W (added to)
                              acc_t* __restrict__ wt) {        // [n, n] in/out: teacher W (added to)
  constexpr int kc = AngleChunk<acc_t>::kc;
  __shared__ acc_t s_es_i[kc][kTile];
  __shared__ acc_t s_rs_i[kc][kTile];
  __shared__ acc_t s_es_j[kc][kTile];
  __shared__ acc_t s_rs_j[kc][kTile];
  __shared__ acc_t s_et_i[kc][kTile];
  __shared__ acc_t s_rt_i[kc][kTile];
  __shared__ acc_t s_et_j[kc][kTile];
  __shared__ acc_t s_rt_j[kc][kTile];
  __shared__ acc_t s_g[kc];
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int ty = threadIdx.x / kSub;
  const int tx = threadIdx.x % kSub;
  acc_t es_ij[kPer][kPer], et_ij[kPer][kPer], ps_acc[kPer][kPer], pt_acc[kPer][kPer];
#pragma unroll
  for (int r = 0; r < kPer; ++r)
#pragma unroll
    for (int c = 0; c < kPer; ++c) {
      const int64_t i = i0 + ty + kSub * r;
      const int64_t j = j0 + tx + kSub * c;
      const bool in = i < n && j < n;
      es_ij[r][c] = in ? es[i * n + j] : acc_t(0);
      et_ij[r][c] = in ? et[i * n + j] : acc_t(0);
      ps_acc[r][c] = pt_acc[r][c] = acc_t(0);
    }
  for (int64_t k0 = 0; k0 < n; k0 += kc) {
    stage_rows<acc_t, kc>(es, n, k0, i0, s_es_i);
    stage_rows<acc_t, kc>(rs, n, k0, i0, s_rs_i);
    stage_rows<acc_t, kc>(es, n, k0, j0, s_es_j);
    stage_rows<acc_t, kc>(rs, n, k0, j0, s_rs_j);
    stage_rows<acc_t, kc>(et, n, k0, i0, s_et_i);
    stage_rows<acc_t, kc>(rt, n, k0, i0, s_rt_i);
    stage_rows<acc_t, kc>(et, n, k0, j0, s_et_j);
    stage_rows<acc_t, kc>(rt, n, k0, j0, s_rt_j);
    if (threadIdx.x < kc) {
      const int64_t k = k0 + threadIdx.x;
      s_g[threadIdx.x] = k < n ? anchor_grad(grad, per_anchor, grad_scale, k) : acc_t(0);
    }
    __syncthreads();
#pragma unroll 2
    for (int kk = 0; kk < kc; ++kk) {
      const acc_t g = s_g[kk];
#pragma unroll
      for (int r = 0; r < kPer; ++r) {
        const acc_t es_ki = s_es_i[kk][ty + kSub * r];
        const acc_t rs_ki = s_rs_i[kk][ty + kSub * r];
        const acc_t et_ki = s_et_i[kk][ty + kSub * r];
        const acc_t rt_ki = s_rt_i[kk][ty + kSub * r];
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
          const acc_t rrs = rs_ki * s_rs_j[kk][tx + kSub * c];
          const acc_t rrt = rt_ki * s_rt_j[kk][tx + kSub * c];
          const acc_t ps = acc_t(0.5) * (es_ki + s_es_j[kk][tx + kSub * c] - es_ij[r][c]) * rrs;
          const acc_t pt = acc_t(0.5) * (et_ki + s_et_j[kk][tx + kSub * c] - et_ij[r][c]) * rrt;
          const acc_t gh = g * smooth_l1_grad(ps - pt);
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
        if (NEED_S) ws[i * n + j] -= acc_t(0.5) * ps_acc[r][c];
        if (NEED_T) wt[i * n + j] += acc_t(0.5) * pt_acc[r][c];
      }
    }
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------

// Checks every op's student / teacher pair (the public Python functions validate user input; these
// guard direct calls through torch.ops).
void check_pair(const at::Tensor& student, const at::Tensor& teacher, const char* op, int64_t min_rows) {
  check_cuda(student, op, "student");
  check_cuda(teacher, op, "teacher");
  check_same_device(teacher, student, op, "teacher", "student");
  check_floating(student, op, "student");
  check_floating(teacher, op, "teacher");
  TORCH_CHECK(student.scalar_type() != at::kDouble && teacher.scalar_type() != at::kDouble, op,
              ": float64 inputs run on the PyTorch path (kd_kernels/torch_impl/rkd.py); the CUDA kernels take "
              "float32, float16 or bfloat16, got student ", student.scalar_type(), " and teacher ",
              teacher.scalar_type());
  check_dim(student, 2, op, "student", "[N, Ds]");
  check_dim(teacher, 2, op, "teacher", "[N, Dt]");
  TORCH_CHECK(teacher.size(0) == student.size(0), op, ": teacher must have the student's N = ", student.size(0),
              " rows, got ", teacher.size(0));
  TORCH_CHECK(student.size(0) >= min_rows, op, ": needs N >= ", min_rows, " rows, got N = ", student.size(0));
}

// The accumulation dtype: float64 if either input is float64, else float32 (as torch_impl.rkd.compute_dtype).
at::ScalarType acc_dtype(const at::Tensor& student, const at::Tensor& teacher) {
  const bool f64 = student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble;
  return f64 ? at::kDouble : at::kFloat;
}

// Contiguous student / teacher of one dtype: their own if they agree, else both cast to acc_dtype.
std::pair<at::Tensor, at::Tensor> compute_inputs(const at::Tensor& student, const at::Tensor& teacher) {
  if (student.scalar_type() == teacher.scalar_type()) return {student.contiguous(), teacher.contiguous()};
  const at::ScalarType ct = acc_dtype(student, teacher);
  return {student.to(ct).contiguous(), teacher.to(ct).contiguous()};
}

// grad as a contiguous tensor in the accumulation dtype, after checking its shape and device.
at::Tensor upstream_grad(const at::Tensor& grad, const at::Tensor& student, at::IntArrayRef none_shape,
                         bool none, at::ScalarType acc, const char* op) {
  check_same_device(grad, student, op, "grad", "student");
  if (none) {
    check_sizes(grad, none_shape, op, "grad", none_shape.size() == 2 ? "[N, N]" : "[N]");
  } else {
    TORCH_CHECK(grad.numel() == 1, op, ": grad must have one element for a reduced loss, got shape ", grad.sizes());
  }
  return grad.to(acc).contiguous().reshape({-1});
}

dim3 tile_grid(int64_t tiles) {
  TORCH_CHECK(tiles <= 65535, "rkd: N is too large for the tile grid (at most 65535 tiles of 64 rows)");
  return dim3(static_cast<unsigned int>(tiles), static_cast<unsigned int>(tiles));
}

void check_precision(const std::string& precision, const char* op) {
  TORCH_CHECK(precision == "tf32x3" || precision == "tf32", op, ": precision must be 'tf32x3' or 'tf32', got '",
              precision, "'");
}

}  // namespace

namespace {

// E and R ([n, n], accumulation dtype) of one contiguous feature matrix.
std::pair<at::Tensor, at::Tensor> sqdist_and_rinv(const at::Tensor& x, at::ScalarType acc) {
  const int64_t n = x.size(0);
  const int64_t d = x.size(1);
  at::Tensor e = at::empty({n, n}, x.options().dtype(acc));
  at::Tensor r = at::empty({n, n}, x.options().dtype(acc));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  KD_DISPATCH_RKD_TYPES(x.scalar_type(), "rkd_sqdist", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    rkd_sqdist_kernel<scalar_t, acc_t><<<tile_grid(ceil_div(n, kTile)), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), n, d, e.data_ptr<acc_t>(), r.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {e, r};
}

}  // namespace

at::Tensor rkd_angle_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher, const std::string& reduction,
                              const std::string& precision) {
  constexpr const char* op = "rkd_angle_fwd_cuda";
  check_pair(student, teacher, op, 1);
  check_precision(precision, op);
  const Reduction red = parse_reduction(reduction, op);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor xs, xt;
  std::tie(xs, xt) = compute_inputs(student, teacher);
  const at::ScalarType acc = acc_dtype(student, teacher);
  const int64_t n = xs.size(0);
  const int64_t tiles = ceil_div(n, kTile);
  at::Tensor es, rs, et, rt;
  std::tie(es, rs) = sqdist_and_rinv(xs, acc);
  std::tie(et, rt) = sqdist_and_rinv(xt, acc);
  at::Tensor partial = at::empty({n, tiles}, xs.options().dtype(acc));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  KD_DISPATCH_ACC_FLOAT(acc, op, [&] {
    rkd_angle_fwd_kernel<scalar_t><<<tile_grid(tiles), kThreads, 0, stream>>>(
        es.data_ptr<scalar_t>(), rs.data_ptr<scalar_t>(), et.data_ptr<scalar_t>(), rt.data_ptr<scalar_t>(), n,
        partial.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const double nd = static_cast<double>(n);
  at::Tensor loss;
  if (red == Reduction::kNone) {
    loss = partial.sum(1) / (nd * nd);
  } else if (red == Reduction::kSum) {
    loss = partial.sum();
  } else {
    loss = partial.sum() / (nd * nd * nd);
  }
  return loss.to(student.scalar_type());
}

namespace {

// Launches the two angle backward kernels for one (NEED_S, NEED_T) combination.
template <typename acc_t, bool NEED_S, bool NEED_T>
void launch_angle_bwd(const at::Tensor& es, const at::Tensor& rs, const at::Tensor& et, const at::Tensor& rt,
                      const at::Tensor& g, bool per_anchor, double scale, at::Tensor& ws, at::Tensor& wt) {
  const int64_t n = es.size(0);
  const dim3 grid = tile_grid(ceil_div(n, kTile));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  acc_t* ws_ptr = NEED_S ? ws.data_ptr<acc_t>() : nullptr;
  acc_t* wt_ptr = NEED_T ? wt.data_ptr<acc_t>() : nullptr;
  rkd_angle_bwd_anchor_kernel<acc_t, NEED_S, NEED_T><<<grid, kThreads, 0, stream>>>(
      es.data_ptr<acc_t>(), rs.data_ptr<acc_t>(), et.data_ptr<acc_t>(), rt.data_ptr<acc_t>(), n, g.data_ptr<acc_t>(),
      per_anchor, static_cast<acc_t>(scale), ws_ptr, wt_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  rkd_angle_bwd_pair_kernel<acc_t, NEED_S, NEED_T><<<grid, kThreads, 0, stream>>>(
      es.data_ptr<acc_t>(), rs.data_ptr<acc_t>(), et.data_ptr<acc_t>(), rt.data_ptr<acc_t>(), n, g.data_ptr<acc_t>(),
      per_anchor, static_cast<acc_t>(scale), ws_ptr, wt_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ∂L/∂X = 2 (diag(S 1) − S) X_c with S = W + Wᵀ and X_c the column-centred features (one GEMM).
at::Tensor laplacian_grad(const at::Tensor& w, const at::Tensor& x, at::ScalarType out_dtype) {
  const at::Tensor s = w + w.t();
  at::Tensor xc = x.to(w.scalar_type());
  xc = xc - xc.mean(0, /*keepdim=*/true);
  return (2.0 * (s.sum(1, /*keepdim=*/true) * xc - s.matmul(xc))).to(out_dtype);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rkd_angle_bwd_cuda(const at::Tensor& grad, const at::Tensor& student,
                                                      const at::Tensor& teacher, const std::string& reduction,
                                                      bool need_student, bool need_teacher,
                                                      const std::string& precision) {
  constexpr const char* op = "rkd_angle_bwd_cuda";
  check_pair(student, teacher, op, 1);
  check_precision(precision, op);
  const Reduction red = parse_reduction(reduction, op);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor grad_student = at::empty({0}, student.options());
  at::Tensor grad_teacher = at::empty({0}, teacher.options());
  if (!need_student && !need_teacher) return {grad_student, grad_teacher};
  at::Tensor xs, xt;
  std::tie(xs, xt) = compute_inputs(student, teacher);
  const at::ScalarType acc = acc_dtype(student, teacher);
  const int64_t n = xs.size(0);
  const double nd = static_cast<double>(n);
  const bool none = red == Reduction::kNone;
  const at::Tensor g = upstream_grad(grad, student, {n}, none, acc, op);
  const double scale = red == Reduction::kMean ? 1.0 / (nd * nd * nd) : (none ? 1.0 / (nd * nd) : 1.0);
  at::Tensor es, rs, et, rt;
  std::tie(es, rs) = sqdist_and_rinv(xs, acc);
  std::tie(et, rt) = sqdist_and_rinv(xt, acc);
  at::Tensor ws = need_student ? at::empty({n, n}, xs.options().dtype(acc)) : at::Tensor();
  at::Tensor wt = need_teacher ? at::empty({n, n}, xs.options().dtype(acc)) : at::Tensor();
  KD_DISPATCH_ACC_FLOAT(acc, op, [&] {
    if (need_student && need_teacher) {
      launch_angle_bwd<scalar_t, true, true>(es, rs, et, rt, g, none, scale, ws, wt);
    } else if (need_student) {
      launch_angle_bwd<scalar_t, true, false>(es, rs, et, rt, g, none, scale, ws, wt);
    } else {
      launch_angle_bwd<scalar_t, false, true>(es, rs, et, rt, g, none, scale, ws, wt);
    }
  });
  if (need_student) grad_student = laplacian_grad(ws, xs, student.scalar_type());
  if (need_teacher) grad_teacher = laplacian_grad(wt, xt, teacher.scalar_type());
  return {grad_student, grad_teacher};
}

}  // namespace kd_kernels
