// The optimal-transport family on CUDA (math: docs/sinkhorn.md; code blueprint and recurrences:
// kd_kernels/torch_impl/sinkhorn.py; op contract: kd_kernels/ops/sinkhorn.py).
//
// Functions of kd_kernels._C (declared in include/kd_ops.h, bound in kd_kernels.cpp):
//   sinkhorn_fwd_cuda(cost, a, b, epsilon, n_iters, tol, check_every, implicit)
//       -> (plan [B, n, m] cost's dtype, alphas [S, B, n], betas [S, B, m] float32, n_run [B] int32)
//   sinkhorn_bwd_cuda(grad, cost, a, b, alphas, betas, n_run, epsilon, n_iters, implicit,
//                     need_cost, need_a, need_b) -> (grad_cost, grad_a, grad_b)  (empty where not needed)
//   sinkhorn_loss_fwd_cuda(student, teacher, temperature, epsilon, n_iters) -> (loss, D, U, V)
//   sinkhorn_loss_bwd_cuda(grad, student, teacher, D, U, V, temperature, epsilon, need_student,
//                          need_teacher) -> (grad_student, grad_teacher)       (empty where not needed)
// Inputs float32 / float16 / bfloat16 (float64 runs on the torch path: the ops route it there);
// all arithmetic in float32. No host synchronisation anywhere: every data-dependent decision
// (convergence, frozen problems, the number of backward steps of a problem) is read on the device.
//
// ---- Batched log-domain Sinkhorn ------------------------------------------------------------
// Base-2 form of the recurrences of torch_impl (log2(e) folded into the scale, exp2f / log2f):
//   M2 = C * (-log2(e) / eps) = M log2(e),  alpha2 = alpha log2(e),  beta2 = beta log2(e)
//   alpha2_k,i = log2 a_i - LSE2_j(M2_ij + beta2_{k-1,j})      (beta_0 = 0)
//   beta2_k,j  = log2 b_j - LSE2_i(M2_ij + alpha2_k,i)
//   P_ij = exp2(M2_ij + alpha2_i + beta2_j)
// Potentials are stored in natural units (alpha = alpha2 ln 2), as the torch path's.
// LSE2 is numerically safe: a (shift, sum) state with the shift = the clamped max (-FLT_MAX for an
// all -inf set, +FLT_MAX for a +inf entry), so two states merge with one exp2 each and no
// inf - inf: an all -inf set gives -inf, a +inf entry gives +inf, NaN propagates (torch.logsumexp).
//
// Forward iteration, rows fit (m <= kFusedMaxCols): ONE read of the cost per iteration.
//   fwd_fused_kernel, grid (B x G): each block takes a contiguous range of rows of one problem
//   in chunks of TR rows; a chunk is converted to M2 into shared memory (the tile visit); one warp
//   per row computes the row LSE (two passes over shared memory) -> alpha_k; then each thread
//   folds its columns' M2 + alpha2 of the chunk into register LSE states. Each block writes its
//   column states [B, G, m]; merge_lse_kernel finishes the columns (beta_k).
// Rows do not fit (m > kFusedMaxCols): row_kernel<kAlpha> (warp per row) + col_kernel<kBeta>
//   (thread per column over a row range, the same [B, G, m] states) + merge_lse_kernel.
// tol > 0: after iteration k (1-based) with k % check_every == 0 and k < n_iters, row_kernel<kErr>
//   writes per-block partial L1 row-marginal errors and freeze_kernel sums them per problem,
//   freezes it when err <= tol and writes n_run[b] = k. Every later launch reads frozen[b] first
//   and its blocks of a frozen problem return at once. Unrolled runs end with fill_kernel (rows
//   k >= n_run[b] of alphas / betas repeat the last potentials). The launch count is fixed by n_iters.
//
// Backward (W = dP o P, dM = W, abar = W 1, bbar = W^T 1; steps k = n_run[b]-1 .. 0):
//   Qb = exp2(M2 + alpha2_k 1^T + 1 sb2_k^T),  sb2 = beta2_k - log2 b (-inf where b = 0)
//   Qa = exp2(M2 + sa2_k 1^T + 1 bp2_k^T),     sa2 = alpha2_k - log2 a (-inf where a = 0),
//        bp2 = beta2_{k-1} (unrolled; 0 at k = 0) or beta2* (implicit)
//   abar_k = -Qb bbar_k (+ W 1 at the problem's first step);  bbar_{k-1} = -Qa^T abar_k
//   dlog a += abar_k, dlog b += bbar_k,  dM = W - sum_k (Qb_k diag(bbar_k) + diag(abar_k) Qa_k)
// The step is the forward's tile structure with sums instead of LSE: bwd_fused_kernel (one cost
// read per step; or row_kernel<kBwdStep> + col_kernel<kBwdStep>) then merge_sum_kernel. dM is
// never accumulated in memory: the steps keep the adjoint vectors (abar_k, bbar_k) [S, B, n + m]
// and bwd_cost_kernel forms dC = -dM / eps in one pass at the end (2 exp2 per element and step).
// Implicit: all steps use the final potentials, so Qa, Qb do not depend on k and
//   dM = W - Qb* diag(dlog b) - diag(dlog a) Qa*: the same last kernel with one "step".
//
// ---- SinKD --------------------------------------------------------------------------------
// p = softmax(z_s / T), q = softmax(z_t / T) are recomputed from the logits and the row log-sum-
// exps (softmax_lse_kernel) wherever a tile needs them; D_ij = sum_c |p_ic - q_jc| by 64 x 64 pair
// tiles over class chunks (cdist_kernel; split over classes into [splits, B, B] partials when the
// pair tiles alone would not fill the GPU; no B x B x C buffer).
//   B <= kSmallB (and K, D fit in shared memory): sinkd_small_fwd_kernel, ONE block: D (sum of the
//     partials), K = exp(-D/eps), the L scaling iterations u = 1/(K v), v = 1/(K^T u), and the
//     value u^T (K o D) v; sinkd_small_bwd_kernel: the carried-H reverse recurrence of torch_impl
//     with H and K in shared memory, then dD.
//   larger B (<= kMaxB): a few launches per iteration: matvec kernels on D and D^T (K recomputed
//     with one exp2 per element: cheaper than reading a stored K), and for the backward the
//     carried H in global memory with the pending rank-2 update applied in the next pass.
// Then the sign-tile L1 backward (l1_bwd_kernel) and the softmax backward.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/gt.h>
#include <ATen/ops/log2.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "checks.h"
#include "kd_ops.h"

namespace kd_kernels {
namespace {

constexpr int kWarp = 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kBig = 3.402823466e38f;  // FLT_MAX: the clamp of an LSE shift
// Threads of the row / column / elementwise kernels: 8 warps, enough to hide the load latency of
// one row (or 256 columns) per warp while many blocks share an SM.
constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / kWarp;  // row_kernel: one warp per row
// Register chunk of the register-only (non-tiled) LSE loops: 8 values per merge keeps the extra
// exp2 of a state merge at 2 per 8 elements, and 8 registers per thread.
constexpr int kChunk = 8;
// Fused tile path: each thread owns kCols columns (register states), at most kFusedMaxThreads
// threads per block, so rows of up to kFusedMaxCols columns fit; 8 states x 2 floats keep the
// kernels far from spilling under __launch_bounds__(512).
constexpr int kCols = 8;
constexpr int kFusedMaxThreads = 512;
constexpr int64_t kFusedMaxCols = static_cast<int64_t>(kCols) * kFusedMaxThreads;
// At most this many rows per shared-memory chunk: 32 rows amortise the 3 __syncthreads of a chunk.
constexpr int kMaxTileRows = 32;
// Shared memory a fused block may use: 80 KiB still allows 2 blocks per SM on A100 (164 KiB) and H100.
constexpr int64_t kFusedSmemBudget = 80 * 1024;
// Blocks per SM the fused / column kernels aim at (row ranges are split until the grid fills
// about this many blocks per SM): 4 hides the chunk barriers without tiny row ranges.
constexpr int kBlocksPerSm = 4;

// ---------------------------------------------------------------------------------------------
// Reductions and LSE states
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float x) {
  for (int mask = kWarp / 2; mask > 0; mask /= 2) x += __shfl_xor_sync(0xffffffffu, x, mask);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
  for (int mask = kWarp / 2; mask > 0; mask /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, mask));
  return x;
}

// The shift of an LSE: the max clamped to +-FLT_MAX (so shifts are finite and states merge without
// inf - inf; a NaN max, only when all values are NaN, becomes -FLT_MAX and the sum stays NaN).
__device__ __forceinline__ float lse_shift(float mx) { return fminf(fmaxf(mx, -kBig), kBig); }

// log2-sum-exp2 state: value = sh + log2(s). Empty: (-FLT_MAX, 0) -> -inf.
struct alignas(8) Lse2 {
  float sh;
  float s;
};
__device__ __forceinline__ Lse2 lse_empty() { return Lse2{-kBig, 0.f}; }
__device__ __forceinline__ void lse_merge(Lse2& x, const Lse2 y) {
  const float S = fmaxf(x.sh, y.sh);
  x.s = x.s * exp2f(x.sh - S) + y.s * exp2f(y.sh - S);
  x.sh = S;
}
__device__ __forceinline__ float lse_value(const Lse2 x) { return x.sh + log2f(x.s); }
__device__ __forceinline__ void warp_lse_merge(Lse2& st) {
  for (int mask = kWarp / 2; mask > 0; mask /= 2) {
    Lse2 o;
    o.sh = __shfl_xor_sync(0xffffffffu, st.sh, mask);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, mask);
    lse_merge(st, o);
  }
}

// LSE2 over j in [0, len) of f(j) by one warp (register chunks of kChunk per lane); all lanes get it.
template <class F>
__device__ __forceinline__ float warp_lse2(int64_t len, F f) {
  const int lane = threadIdx.x % kWarp;
  Lse2 st = lse_empty();
  for (int64_t j0 = 0; j0 < len; j0 += kWarp * kChunk) {
    float v[kChunk];
    float mx = -INFINITY;
#pragma unroll
    for (int q = 0; q < kChunk; ++q) {
      const int64_t j = j0 + q * kWarp + lane;
      v[q] = j < len ? f(j) : -INFINITY;
      mx = fmaxf(mx, v[q]);
    }
    const float sh = lse_shift(mx);
    float s = 0.f;
#pragma unroll
    for (int q = 0; q < kChunk; ++q) s += exp2f(v[q] - sh);
    lse_merge(st, Lse2{sh, s});
  }
  warp_lse_merge(st);
  return lse_value(st);
}

// sum over j in [0, len) of f(j) by one warp; all lanes get it.
template <class F>
__device__ __forceinline__ float warp_sum_of(int64_t len, F f) {
  float s = 0.f;
  for (int64_t j = threadIdx.x % kWarp; j < len; j += kWarp) s += f(j);
  return warp_sum(s);
}

// ---------------------------------------------------------------------------------------------
// Batched Sinkhorn: the problem view shared by all kernels
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
struct Problem {
  const scalar_t* cost;  // [B, n, m] cost C, read through its strides (cs0 = 0: one shared cost)
  int64_t cs0, cs1, cs2;  // strides of cost (elements)
  const float* a;         // [B, n] row marginal a (float32), read through its strides
  int64_t as0, as1;       // strides of a (as0 = 0: one shared marginal)
  const float* b;         // [B, m] column marginal b (float32)
  int64_t bs0, bs1;       // strides of b
  int64_t nb, n, m;       // B problems of n x m
  float scale2;           // -log2(e) / eps: M2 = C * scale2
  const int* frozen;      // [B] 1 = converged (forward, tol > 0): its blocks return at once; nullptr: none
  __device__ __forceinline__ float m2(int64_t bb, int64_t i, int64_t j) const {
    return static_cast<float>(cost[bb * cs0 + i * cs1 + j * cs2]) * scale2;
  }
  __device__ __forceinline__ float a_at(int64_t bb, int64_t i) const { return a[bb * as0 + i * as1]; }
  __device__ __forceinline__ float b_at(int64_t bb, int64_t j) const { return b[bb * bs0 + j * bs1]; }
  __device__ __forceinline__ bool is_frozen(int64_t bb) const { return frozen != nullptr && frozen[bb] != 0; }
};

// A gradient view [B, n, m] read through its strides (autograd may hand an expand).
template <typename scalar_t>
struct GradView {
  const scalar_t* p;      // dL/dP
  int64_t s0, s1, s2;     // strides (elements)
  __device__ __forceinline__ float at(int64_t bb, int64_t i, int64_t j) const {
    return static_cast<float>(p[bb * s0 + i * s1 + j * s2]);
  }
};

// The tile of rows [r0, r0 + tr) x [0, m) of problem bb as M2 into shared memory.
template <typename scalar_t>
__device__ __forceinline__ void load_tile(const Problem<scalar_t>& pr, int64_t bb, int64_t r0, int tr,
                                          float* __restrict__ tile) {
  for (int r = 0; r < tr; ++r) {
    for (int64_t j = threadIdx.x; j < pr.m; j += blockDim.x) tile[r * pr.m + j] = pr.m2(bb, r0 + r, j);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: fused iteration (rows fit)
// ---------------------------------------------------------------------------------------------
// Dynamic shared memory: bp2 [m] | tile [tile_rows, m] | row2 [tile_rows].
template <typename scalar_t>
__global__ void __launch_bounds__(kFusedMaxThreads)
    fwd_fused_kernel(Problem<scalar_t> pr,        // the problems (cost, marginals, frozen flags)
                     const float* beta_prev,      // [B, m] beta_{k-1} (natural units); nullptr: beta_0 = 0
                     float* __restrict__ alpha_out,  // [B, n] out: alpha_k
                     Lse2* __restrict__ col_part,    // [B, G, m] out: column LSE2 states of M2 + alpha2_k per block
                     int G,                          // blocks per problem
                     int64_t rows_per_block,         // rows of one block (the last block: the rest)
                     int tile_rows) {                // rows per shared-memory chunk (TR)
  extern __shared__ float smem[];
  const int64_t m = pr.m, n = pr.n;
  float* bp2 = smem;
  float* tile = smem + m;
  float* row2 = tile + static_cast<int64_t>(tile_rows) * m;
  const int64_t bb = blockIdx.x / G;
  const int g = blockIdx.x % G;
  if (pr.is_frozen(bb)) return;
  const int64_t row_begin = g * rows_per_block;
  const int64_t row_end = std::min<int64_t>(n, row_begin + rows_per_block);
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) bp2[j] = beta_prev ? beta_prev[bb * m + j] * kLog2e : 0.f;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, n_warps = blockDim.x / kWarp;
  Lse2 st[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) st[c] = lse_empty();

  for (int64_t r0 = row_begin; r0 < row_end; r0 += tile_rows) {
    const int tr = static_cast<int>(std::min<int64_t>(tile_rows, row_end - r0));
    load_tile(pr, bb, r0, tr, tile);
    __syncthreads();
    // rows: alpha2_i = log2 a_i - LSE2_j(M2_ij + bp2_j), two passes over the row in shared memory
    for (int r = warp; r < tr; r += n_warps) {
      const float* row = tile + static_cast<int64_t>(r) * m;
      float mx = -INFINITY;
      for (int64_t j = lane; j < m; j += kWarp) mx = fmaxf(mx, row[j] + bp2[j]);
      const float sh = lse_shift(warp_max(mx));
      float s = 0.f;
      for (int64_t j = lane; j < m; j += kWarp) s += exp2f(row[j] + bp2[j] - sh);
      s = warp_sum(s);
      if (lane == 0) {
        const int64_t i = r0 + r;
        const float alpha2 = log2f(pr.a_at(bb, i)) - (sh + log2f(s));
        row2[r] = alpha2;
        alpha_out[bb * n + i] = alpha2 * kLn2;
      }
    }
    __syncthreads();
    // columns: fold M2_ij + alpha2_i of the chunk into this thread's column states
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(c) * blockDim.x;
      if (j < m) {
        float mx = -INFINITY;
        for (int r = 0; r < tr; ++r) mx = fmaxf(mx, tile[r * m + j] + row2[r]);
        const float sh = lse_shift(mx);
        float s = 0.f;
        for (int r = 0; r < tr; ++r) s += exp2f(tile[r * m + j] + row2[r] - sh);
        lse_merge(st[c], Lse2{sh, s});
      }
    }
    __syncthreads();  // the next chunk overwrites tile and row2
  }
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(c) * blockDim.x;
    if (j < m) col_part[(bb * G + g) * m + j] = st[c];
  }
}

// beta_k,j = ln2 (log2 b_j - LSE2 of the G column states). Grid: B x ceil(m / kThreads).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    merge_lse_kernel(Problem<scalar_t> pr,           // the problems
                     const Lse2* __restrict__ col_part,  // [B, G, m] column states
                     int G,                              // states per column
                     float* __restrict__ beta_out) {     // [B, m] out: beta_k
  const int64_t cblocks = (pr.m + kThreads - 1) / kThreads;
  const int64_t bb = blockIdx.x / cblocks;
  const int64_t j = (blockIdx.x % cblocks) * kThreads + threadIdx.x;
  if (j >= pr.m || pr.is_frozen(bb)) return;
  Lse2 st = lse_empty();
  for (int g = 0; g < G; ++g) lse_merge(st, col_part[(bb * G + g) * pr.m + j]);
  beta_out[bb * pr.m + j] = (log2f(pr.b_at(bb, j)) - lse_value(st)) * kLn2;
}

// ---------------------------------------------------------------------------------------------
// Row and column kernels (rows do not fit; also the error check and the backward's first pass)
// ---------------------------------------------------------------------------------------------
enum class RowMode : int { kAlpha, kErr, kBwdInit, kBwdStep };

template <typename scalar_t>
struct RowArgs {
  const float* alpha;     // [B, n] alpha_k (kErr, kBwdInit: final, kBwdStep)
  const float* beta;      // [B, m] kAlpha: beta_{k-1} (nullptr: 0); kErr, kBwdInit: beta_k / final; kBwdStep: beta_k
  const float* bbar;      // [B, m] kBwdStep: bbar_k, the adjoint of beta_k
  const float* lb2;       // [B, m] kBwdStep: log2 b (+inf where b = 0)
  const float* la2;       // [B, n] kBwdStep: log2 a (+inf where a = 0)
  GradView<scalar_t> grad;  // kBwdInit: dL/dP
  float* out;             // kAlpha: [B, n] alpha_k; kErr: [B, row blocks] partial errors;
                          // kBwdInit: [B, n] abar_out = W 1; kBwdStep: [B, n] abar_k
  const float* abar_out;  // kBwdStep: [B, n] W 1, added at problem b's first step
  float* dloga;           // kBwdStep: [B, n] dlog a += abar_k
  float* hist_a;          // kBwdStep: [B, n] abar_k history row of this step (nullptr: not kept)
  const int* n_run;       // kBwdStep: [B] steps of each problem
  int step;               // kBwdStep: k (0-based)
};

// One warp per row, kRowsPerBlock rows of one problem per block. Grid: B x ceil(n / kRowsPerBlock).
template <RowMode mode, typename scalar_t>
__global__ void __launch_bounds__(kThreads) row_kernel(Problem<scalar_t> pr,  // the problems
                                                       RowArgs<scalar_t> ra) {  // the mode's vectors
  const int64_t rblocks = (pr.n + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t bb = blockIdx.x / rblocks;
  const int64_t rb = blockIdx.x % rblocks;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t i = rb * kRowsPerBlock + warp;
  const int64_t n = pr.n, m = pr.m;
  if constexpr (mode == RowMode::kBwdStep) {
    if (ra.step >= ra.n_run[bb]) return;
  } else {
    if (pr.is_frozen(bb)) return;
  }
  const float* beta = ra.beta ? ra.beta + bb * m : nullptr;
  if constexpr (mode == RowMode::kAlpha) {
    if (i >= n) return;
    const float lse2 = warp_lse2(m, [&](int64_t j) { return pr.m2(bb, i, j) + (beta ? beta[j] * kLog2e : 0.f); });
    if (lane == 0) ra.out[bb * n + i] = (log2f(pr.a_at(bb, i)) - lse2) * kLn2;
  } else if constexpr (mode == RowMode::kErr) {
    __shared__ float part[kRowsPerBlock];
    float e = 0.f;
    if (i < n) {
      const float al2 = ra.alpha[bb * n + i] * kLog2e;
      const float r = warp_sum_of(m, [&](int64_t j) { return exp2f(pr.m2(bb, i, j) + al2 + beta[j] * kLog2e); });
      e = fabsf(r - pr.a_at(bb, i));
    }
    if (lane == 0) part[warp] = e;
    __syncthreads();
    if (threadIdx.x == 0) {
      float s = 0.f;
      for (int w = 0; w < kRowsPerBlock; ++w) s += part[w];
      ra.out[bb * rblocks + rb] = s;
    }
  } else if constexpr (mode == RowMode::kBwdInit) {
    if (i >= n) return;
    const float al2 = ra.alpha[bb * n + i] * kLog2e;
    const float s = warp_sum_of(
        m, [&](int64_t j) { return ra.grad.at(bb, i, j) * exp2f(pr.m2(bb, i, j) + al2 + beta[j] * kLog2e); });
    if (lane == 0) ra.out[bb * n + i] = s;
  } else {  // kBwdStep: abar_i = -sum_j Qb_ij bbar_j (+ W 1 at the first step)
    if (i >= n) return;
    const float al2 = ra.alpha[bb * n + i] * kLog2e;
    const float* bbar = ra.bbar + bb * m;
    const float* lb2 = ra.lb2 + bb * m;
    const float s = warp_sum_of(
        m, [&](int64_t j) { return exp2f(pr.m2(bb, i, j) + al2 + (beta[j] * kLog2e - lb2[j])) * bbar[j]; });
    if (lane == 0) {
      const float abar = -s + (ra.step == ra.n_run[bb] - 1 ? ra.abar_out[bb * n + i] : 0.f);
      ra.out[bb * n + i] = abar;
      ra.dloga[bb * n + i] += abar;
      if (ra.hist_a) ra.hist_a[bb * n + i] = abar;
    }
  }
}

enum class ColMode : int { kBeta, kBwdInit, kBwdStep };

template <typename scalar_t>
struct ColArgs {
  const float* alpha;     // [B, n] kBeta: alpha_k; kBwdInit: final alpha; kBwdStep: alpha_k
  const float* beta;      // [B, m] kBwdInit: final beta; kBwdStep: beta_{k-1} / beta* (nullptr: 0)
  const float* abar;      // [B, n] kBwdStep: abar_k
  const float* la2;       // [B, n] kBwdStep: log2 a (+inf where a = 0)
  GradView<scalar_t> grad;  // kBwdInit: dL/dP
  void* part;             // [B, G, m] out: Lse2 states (kBeta) or float partial sums (others)
  int G;                  // row ranges per problem
  int64_t rows_per_block;  // rows of one range
  const int* n_run;       // kBwdStep: [B] steps of each problem
  int step;               // kBwdStep: k
};

// One thread per column over one row range. Grid: B x G x ceil(m / kThreads).
template <ColMode mode, typename scalar_t>
__global__ void __launch_bounds__(kThreads) col_kernel(Problem<scalar_t> pr,  // the problems
                                                       ColArgs<scalar_t> ca) {  // the mode's vectors
  const int64_t cblocks = (pr.m + kThreads - 1) / kThreads;
  const int64_t bg = blockIdx.x / cblocks;
  const int64_t bb = bg / ca.G;
  const int g = static_cast<int>(bg % ca.G);
  const int64_t j = (blockIdx.x % cblocks) * kThreads + threadIdx.x;
  const int64_t n = pr.n, m = pr.m;
  if constexpr (mode == ColMode::kBwdStep) {
    if (ca.step >= ca.n_run[bb]) return;
  } else {
    if (pr.is_frozen(bb)) return;
  }
  if (j >= m) return;
  const int64_t r_begin = g * ca.rows_per_block;
  const int64_t r_end = std::min<int64_t>(n, r_begin + ca.rows_per_block);
  const float* alpha = ca.alpha + bb * n;
  if constexpr (mode == ColMode::kBeta) {
    Lse2 st = lse_empty();
    for (int64_t i0 = r_begin; i0 < r_end; i0 += kChunk) {
      float v[kChunk];
      float mx = -INFINITY;
#pragma unroll
      for (int q = 0; q < kChunk; ++q) {
        const int64_t i = i0 + q;
        v[q] = i < r_end ? pr.m2(bb, i, j) + alpha[i] * kLog2e : -INFINITY;
        mx = fmaxf(mx, v[q]);
      }
      const float sh = lse_shift(mx);
      float s = 0.f;
#pragma unroll
      for (int q = 0; q < kChunk; ++q) s += exp2f(v[q] - sh);
      lse_merge(st, Lse2{sh, s});
    }
    static_cast<Lse2*>(ca.part)[(bb * ca.G + g) * m + j] = st;
  } else if constexpr (mode == ColMode::kBwdInit) {
    const float be2 = ca.beta[bb * m + j] * kLog2e;
    float s = 0.f;
    for (int64_t i = r_begin; i < r_end; ++i) s += ca.grad.at(bb, i, j) * exp2f(pr.m2(bb, i, j) + alpha[i] * kLog2e + be2);
    static_cast<float*>(ca.part)[(bb * ca.G + g) * m + j] = s;
  } else {  // kBwdStep: sum_i Qa_ij abar_i
    const float bp2 = ca.beta ? ca.beta[bb * m + j] * kLog2e : 0.f;
    const float* abar = ca.abar + bb * n;
    const float* la2 = ca.la2 + bb * n;
    float s = 0.f;
    for (int64_t i = r_begin; i < r_end; ++i) s += exp2f(pr.m2(bb, i, j) + (alpha[i] * kLog2e - la2[i]) + bp2) * abar[i];
    static_cast<float*>(ca.part)[(bb * ca.G + g) * m + j] = s;
  }
}

// ---------------------------------------------------------------------------------------------
// Convergence check, fill, plan
// ---------------------------------------------------------------------------------------------
// err_b = sum of the row blocks' partial errors; freeze when err_b <= tol. Grid: B, kThreads threads.
__global__ void __launch_bounds__(kThreads)
    freeze_kernel(const float* __restrict__ err_part,  // [B, rblocks] partial L1 row-marginal errors
                  int64_t rblocks,                      // partials per problem
                  float tol,                            // tolerance (> 0)
                  int k,                                // iterations done (1-based)
                  int* __restrict__ frozen,             // [B] in/out: 1 = converged
                  int* __restrict__ n_run) {            // [B] out: k where frozen now
  __shared__ float part[kRowsPerBlock];
  const int64_t bb = blockIdx.x;
  if (frozen[bb]) return;  // uniform over the block
  float s = 0.f;
  for (int64_t r = threadIdx.x; r < rblocks; r += blockDim.x) s += err_part[bb * rblocks + r];
  s = warp_sum(s);
  if (threadIdx.x % kWarp == 0) part[threadIdx.x / kWarp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float e = 0.f;
    for (int w = 0; w < kRowsPerBlock; ++w) e += part[w];
    if (e <= tol) {  // NaN: never frozen
      frozen[bb] = 1;
      n_run[bb] = k;
    }
  }
}

// Unrolled runs with tol > 0: alphas[s, b] = alphas[n_run[b] - 1, b] for s >= n_run[b] (and betas).
// Grid: S x B.
__global__ void __launch_bounds__(kThreads)
    fill_kernel(float* __restrict__ alphas,  // [S, B, n] in/out
                float* __restrict__ betas,   // [S, B, m] in/out
                const int* __restrict__ n_run,  // [B]
                int64_t nb, int64_t n, int64_t m) {  // sizes
  const int64_t s = blockIdx.x / nb, bb = blockIdx.x % nb;
  const int64_t last = n_run[bb] - 1;
  if (s <= last) return;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) alphas[(s * nb + bb) * n + i] = alphas[(last * nb + bb) * n + i];
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) betas[(s * nb + bb) * m + j] = betas[(last * nb + bb) * m + j];
}

// P = exp2(M2 + alpha2 1^T + 1 beta2^T), contiguous [B, n, m]. Block (32, 8): 8 rows, 32 columns at a time.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    plan_kernel(Problem<scalar_t> pr,          // the problems
                const float* __restrict__ alpha,  // [B, n] final alpha
                const float* __restrict__ beta,   // [B, m] final beta
                scalar_t* __restrict__ plan) {    // [B, n, m] out
  const int64_t R = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (R >= pr.nb * pr.n) return;
  const int64_t bb = R / pr.n, i = R % pr.n;
  const float al2 = alpha[R] * kLog2e;
  for (int64_t j = threadIdx.x; j < pr.m; j += blockDim.x) {
    plan[R * pr.m + j] = static_cast<scalar_t>(exp2f(pr.m2(bb, i, j) + al2 + beta[bb * pr.m + j] * kLog2e));
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
// One step k (rows fit): abar_k = -Qb bbar_k (+ W 1 first), column partial sums of Qa diag(abar_k).
// Dynamic shared memory: sb2 [m] | bb_ [m] | tile [tile_rows, m] | rab [tile_rows] | rsa [tile_rows].
template <typename scalar_t>
__global__ void __launch_bounds__(kFusedMaxThreads)
    bwd_fused_kernel(Problem<scalar_t> pr,           // the problems
                     const float* __restrict__ alpha,   // [B, n] alpha_k
                     const float* __restrict__ beta,    // [B, m] beta_k
                     const float* beta_prev,            // [B, m] beta_{k-1} or beta* (nullptr: 0)
                     const float* __restrict__ bbar,    // [B, m] bbar_k
                     const float* __restrict__ la2,     // [B, n] log2 a (+inf where a = 0)
                     const float* __restrict__ lb2,     // [B, m] log2 b (+inf where b = 0)
                     const float* __restrict__ abar_out,  // [B, n] W 1 (added at the problem's first step)
                     const int* __restrict__ n_run,     // [B] steps of each problem
                     int step,                          // k (0-based)
                     float* __restrict__ dloga,         // [B, n] in/out: += abar_k
                     float* hist_a,                     // [B, n] out: abar_k (nullptr: not kept)
                     float* __restrict__ col_part,      // [B, G, m] out: partial sums of Qa_ij abar_i
                     int G,                             // blocks per problem
                     int64_t rows_per_block,            // rows of one block
                     int tile_rows) {                   // rows per shared-memory chunk
  extern __shared__ float smem[];
  const int64_t m = pr.m, n = pr.n;
  float* sb2 = smem;
  float* sbb = smem + m;
  float* tile = smem + 2 * m;
  float* rab = tile + static_cast<int64_t>(tile_rows) * m;
  float* rsa = rab + tile_rows;
  const int64_t bb = blockIdx.x / G;
  const int g = blockIdx.x % G;
  const int nr = n_run[bb];
  if (step >= nr) return;
  const bool first = step == nr - 1;
  const int64_t row_begin = g * rows_per_block;
  const int64_t row_end = std::min<int64_t>(n, row_begin + rows_per_block);
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    sb2[j] = beta[bb * m + j] * kLog2e - lb2[bb * m + j];
    sbb[j] = bbar[bb * m + j];
  }
  float bp2[kCols], acc[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(c) * blockDim.x;
    bp2[c] = (beta_prev != nullptr && j < m) ? beta_prev[bb * m + j] * kLog2e : 0.f;
    acc[c] = 0.f;
  }
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, n_warps = blockDim.x / kWarp;
  for (int64_t r0 = row_begin; r0 < row_end; r0 += tile_rows) {
    const int tr = static_cast<int>(std::min<int64_t>(tile_rows, row_end - r0));
    load_tile(pr, bb, r0, tr, tile);
    __syncthreads();
    for (int r = warp; r < tr; r += n_warps) {
      const int64_t i = r0 + r;
      const float* row = tile + static_cast<int64_t>(r) * m;
      const float al2 = alpha[bb * n + i] * kLog2e;
      float s = 0.f;
      for (int64_t j = lane; j < m; j += kWarp) s += exp2f(row[j] + al2 + sb2[j]) * sbb[j];
      s = warp_sum(s);
      if (lane == 0) {
        const float abar = -s + (first ? abar_out[bb * n + i] : 0.f);
        rab[r] = abar;
        rsa[r] = al2 - la2[bb * n + i];
        dloga[bb * n + i] += abar;
        if (hist_a) hist_a[bb * n + i] = abar;
      }
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(c) * blockDim.x;
      if (j < m) {
        float s = 0.f;
        for (int r = 0; r < tr; ++r) s += exp2f(tile[r * m + j] + rsa[r] + bp2[c]) * rab[r];
        acc[c] += s;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(c) * blockDim.x;
    if (j < m) col_part[(bb * G + g) * m + j] = acc[c];
  }
}

// The column half of a step: bbar_{k-1} = -sum_g partials; dlog b += bbar_k; keeps bbar_k. With
// step < 0 (the backward's first pass): bbar = +sum_g partials (= W^T 1). Grid: B x ceil(m / kThreads).
__global__ void __launch_bounds__(kThreads)
    merge_sum_kernel(const float* __restrict__ col_part,  // [B, G, m] partial sums
                     int G,                               // partials per column
                     int64_t nb, int64_t m,               // sizes
                     float* __restrict__ bbar,            // [B, m] in/out: bbar_k -> bbar_{k-1}
                     float* __restrict__ dlogb,           // [B, m] in/out: += bbar_k (step >= 0)
                     float* hist_b,                       // [B, m] out: bbar_k (nullptr: not kept)
                     const int* __restrict__ n_run,       // [B] steps of each problem
                     int step) {                          // k, or -1 for the first pass
  const int64_t cblocks = (m + kThreads - 1) / kThreads;
  const int64_t bb = blockIdx.x / cblocks;
  const int64_t j = (blockIdx.x % cblocks) * kThreads + threadIdx.x;
  if (j >= m) return;
  if (step >= 0 && step >= n_run[bb]) return;
  float s = 0.f;
  for (int g = 0; g < G; ++g) s += col_part[(bb * G + g) * m + j];
  const int64_t o = bb * m + j;
  if (step < 0) {
    bbar[o] = s;
    return;
  }
  const float cur = bbar[o];
  dlogb[o] += cur;
  if (hist_b) hist_b[o] = cur;
  bbar[o] = -s;
}

// Tile geometry of bwd_cost_kernel: 16 rows x 64 columns, 4 elements per thread; steps staged in
// shared memory 8 at a time (6 KiB), so one barrier pair serves 8 x 2 exp2 per element.
constexpr int kCostTileRows = 16;
constexpr int kCostTileCols = 64;
constexpr int kCostSteps = 8;

struct CostArgs {
  const float* alpha_fin;  // [B, n] final alpha (W)
  const float* beta_fin;   // [B, m] final beta (W)
  const float* alphas;     // alpha_k = alphas + k * a_ks
  int64_t a_ks;            // stride of a step in alphas (0: implicit)
  const float* betas;      // beta_k = betas + k * b_ks
  int64_t b_ks;            // stride of a step in betas (0: implicit)
  const float* ha;         // abar_k = ha + k * ha_ks (implicit: dlog a, stride 0)
  int64_t ha_ks;
  const float* hb;         // bbar_k = hb + k * hb_ks (implicit: dlog b, stride 0)
  int64_t hb_ks;
  const float* la2;        // [B, n] log2 a (+inf where a = 0)
  const float* lb2;        // [B, m] log2 b (+inf where b = 0)
  const int* n_run;        // [B] steps of each problem
  bool implicit;           // one step, beta_{k-1} = beta*
  float neg_inv_eps;       // -1 / eps: dC = dM * neg_inv_eps
};

// dC = -(1/eps) (W - sum_k (Qb_k diag(bbar_k) + diag(abar_k) Qa_k)). Grid: B x row tiles x column tiles.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    bwd_cost_kernel(Problem<scalar_t> pr,        // the problems
                    GradView<scalar_t> grad,     // dL/dP
                    CostArgs ca,                 // potentials, adjoint vectors
                    scalar_t* __restrict__ grad_cost) {  // [B, n, m] out (contiguous)
  __shared__ float rA[kCostSteps][kCostTileRows], rS[kCostSteps][kCostTileRows], rH[kCostSteps][kCostTileRows];
  __shared__ float cB[kCostSteps][kCostTileCols], cP[kCostSteps][kCostTileCols], cH[kCostSteps][kCostTileCols];
  constexpr int kPer = kCostTileRows * kCostTileCols / kThreads;  // rows per thread
  const int64_t n = pr.n, m = pr.m;
  const int64_t tn = (n + kCostTileRows - 1) / kCostTileRows, tm = (m + kCostTileCols - 1) / kCostTileCols;
  const int64_t bb = blockIdx.x / (tn * tm);
  const int64_t ti = (blockIdx.x / tm) % tn, tj = blockIdx.x % tm;
  const int cj = threadIdx.x % kCostTileCols, r_base = threadIdx.x / kCostTileCols;
  const int64_t j = tj * kCostTileCols + cj;
  float m2[kPer], acc[kPer];
  const float be2 = j < m ? ca.beta_fin[bb * m + j] * kLog2e : 0.f;
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    const int64_t i = ti * kCostTileRows + r_base + q * (kThreads / kCostTileCols);
    const bool ok = i < n && j < m;
    m2[q] = ok ? pr.m2(bb, i, j) : 0.f;
    acc[q] = ok ? grad.at(bb, i, j) * exp2f(m2[q] + ca.alpha_fin[bb * n + i] * kLog2e + be2) : 0.f;
  }
  const int steps = ca.implicit ? 1 : ca.n_run[bb];
  for (int k0 = 0; k0 < steps; k0 += kCostSteps) {
    const int kc = steps - k0 < kCostSteps ? steps - k0 : kCostSteps;
    __syncthreads();  // the previous chunk's reads are done
    for (int e = threadIdx.x; e < kCostSteps * kCostTileRows; e += kThreads) {
      const int kk = e / kCostTileRows, r = e % kCostTileRows;
      const int64_t i = ti * kCostTileRows + r;
      if (kk < kc && i < n) {
        const int64_t k = k0 + kk;
        const float a2 = ca.alphas[k * ca.a_ks + bb * n + i] * kLog2e;
        rA[kk][r] = a2;
        rS[kk][r] = a2 - ca.la2[bb * n + i];
        rH[kk][r] = ca.ha[k * ca.ha_ks + bb * n + i];
      }
    }
    for (int e = threadIdx.x; e < kCostSteps * kCostTileCols; e += kThreads) {
      const int kk = e / kCostTileCols, c = e % kCostTileCols;
      const int64_t jj = tj * kCostTileCols + c;
      if (kk < kc && jj < m) {
        const int64_t k = k0 + kk;
        const float b2 = ca.betas[k * ca.b_ks + bb * m + jj] * kLog2e;
        cB[kk][c] = b2 - ca.lb2[bb * m + jj];
        cP[kk][c] = ca.implicit ? b2 : (k > 0 ? ca.betas[(k - 1) * ca.b_ks + bb * m + jj] * kLog2e : 0.f);
        cH[kk][c] = ca.hb[k * ca.hb_ks + bb * m + jj];
      }
    }
    __syncthreads();
    for (int kk = 0; kk < kc; ++kk) {
      const float sb = cB[kk][cj], bp = cP[kk][cj], hbj = cH[kk][cj];
#pragma unroll
      for (int q = 0; q < kPer; ++q) {
        const int r = r_base + q * (kThreads / kCostTileCols);
        acc[q] -= exp2f(m2[q] + rA[kk][r] + sb) * hbj + exp2f(m2[q] + rS[kk][r] + bp) * rH[kk][r];
      }
    }
  }
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    const int64_t i = ti * kCostTileRows + r_base + q * (kThreads / kCostTileCols);
    if (i < n && j < m) grad_cost[(bb * n + i) * m + j] = static_cast<scalar_t>(acc[q] * ca.neg_inv_eps);
  }
}

// ---------------------------------------------------------------------------------------------
// SinKD kernels
// ---------------------------------------------------------------------------------------------
// B above which the one-block path is not used: K and D [B, B] (padded) must fit in shared memory
// (2 x 128 x 129 x 4 B = 129 KiB, within the opt-in limit of A100 and H100), and one block of 1024
// threads still finishes 128-row matrix-vector products in a few passes.
constexpr int64_t kSmallB = 128;
constexpr int kSmallThreads = 1024;  // the one-block kernels: all 32 warps of a block
// The largest batch: the B x B float32 buffers of the many-launch path (D, D^T, H) stay <= 64 MiB each.
constexpr int64_t kMaxB = 4096;
// cdist_kernel / l1_bwd_kernel tiles: 64 x 64 outputs per 256 threads (4 x 4 per thread) reuse
// each shared-memory value 4 times from registers; 32 classes (16 partner rows) per chunk.
constexpr int kPairTile = 64;
constexpr int kClassChunk = 32;
constexpr int kPartnerChunk = 16;
// Largest class / partner split (partials or atomics): enough blocks for small B on 132 SMs.
constexpr int kMaxSplits = 64;

// Row log2-sum-exp2 of z / T (base 2: z * log2(e) / T). Rows 0..B-1: student, B..2B-1: teacher. Grid: 2B.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    softmax_lse_kernel(const scalar_t* __restrict__ zs,  // [B, C] student logits, contiguous
                       const scalar_t* __restrict__ zt,  // [B, C] teacher logits, contiguous
                       int64_t nb, int64_t C,            // sizes
                       float inv_t2,                     // log2(e) / T
                       float* __restrict__ lse2) {       // [2B] out: LSE2 of the rows of z * inv_t2
  __shared__ Lse2 part[kThreads / kWarp];
  const int64_t row = blockIdx.x;
  const scalar_t* z = row < nb ? zs + row * C : zt + (row - nb) * C;
  Lse2 st = lse_empty();
  for (int64_t c0 = 0; c0 < C; c0 += static_cast<int64_t>(kThreads) * kChunk) {
    float v[kChunk];
    float mx = -INFINITY;
#pragma unroll
    for (int q = 0; q < kChunk; ++q) {
      const int64_t c = c0 + q * kThreads + threadIdx.x;
      v[q] = c < C ? static_cast<float>(z[c]) * inv_t2 : -INFINITY;
      mx = fmaxf(mx, v[q]);
    }
    const float sh = lse_shift(mx);
    float s = 0.f;
#pragma unroll
    for (int q = 0; q < kChunk; ++q) s += exp2f(v[q] - sh);
    lse_merge(st, Lse2{sh, s});
  }
  warp_lse_merge(st);
  if (threadIdx.x % kWarp == 0) part[threadIdx.x / kWarp] = st;
  __syncthreads();
  if (threadIdx.x == 0) {
    Lse2 t = part[0];
    for (int w = 1; w < kThreads / kWarp; ++w) lse_merge(t, part[w]);
    lse2[row] = lse_value(t);
  }
}

// p_ic = exp2(z_ic * inv_t2 - lse2_i)
template <typename scalar_t>
__device__ __forceinline__ float prob(const scalar_t* z, int64_t C, int64_t i, int64_t c, float inv_t2, const float* lse2) {
  return exp2f(static_cast<float>(z[i * C + c]) * inv_t2 - lse2[i]);
}

// Dpart[s, i, j] = sum_{c in class range s} |p_ic - q_jc|. Grid: splits x tiles_i x tiles_j.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    cdist_kernel(const scalar_t* __restrict__ zs,  // [B, C] student logits
                 const scalar_t* __restrict__ zt,  // [B, C] teacher logits
                 const float* __restrict__ lse2,   // [2B] row LSE2 (student, then teacher)
                 int64_t nb, int64_t C,            // sizes
                 float inv_t2,                     // log2(e) / T
                 int64_t classes_per_split,        // classes of one split
                 float* __restrict__ dpart) {      // [splits, B, B] out: partial L1 distances
  __shared__ float ps[kClassChunk][kPairTile + 1], qs[kClassChunk][kPairTile + 1];
  const int64_t tiles = (nb + kPairTile - 1) / kPairTile;
  const int64_t split = blockIdx.x / (tiles * tiles);
  const int64_t ti = (blockIdx.x / tiles) % tiles, tj = blockIdx.x % tiles;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t c_begin = split * classes_per_split;
  const int64_t c_end = std::min<int64_t>(C, c_begin + classes_per_split);
  float acc[4][4] = {};
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kClassChunk) {
    __syncthreads();  // the previous chunk's reads are done
    for (int e = threadIdx.x; e < kPairTile * kClassChunk; e += kThreads) {
      const int r = e / kClassChunk, c = e % kClassChunk;
      const int64_t cls = c0 + c;
      const int64_t i = ti * kPairTile + r, j = tj * kPairTile + r;
      ps[c][r] = (i < nb && cls < c_end) ? prob(zs, C, i, cls, inv_t2, lse2) : 0.f;
      qs[c][r] = (j < nb && cls < c_end) ? prob(zt, C, j, cls, inv_t2, lse2 + nb) : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int c = 0; c < kClassChunk; ++c) {
      float pv[4], qv[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        pv[a] = ps[c][ty + 16 * a];
        qv[a] = qs[c][tx + 16 * a];
      }
#pragma unroll
      for (int a = 0; a < 4; ++a) {
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[a][q] += fabsf(pv[a] - qv[q]);
      }
    }
  }
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int64_t i = ti * kPairTile + ty + 16 * a;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t j = tj * kPairTile + tx + 16 * q;
      if (i < nb && j < nb) dpart[(split * nb + i) * nb + j] = acc[a][q];
    }
  }
}

// The one-block forward (B <= kSmallB): D, K = exp(-D/eps), u_l = 1/(K v_{l-1}), v_l = 1/(K^T u_l),
// loss = u_L^T (K o D) v_L. Dynamic shared memory: K [B, ld] | D [B, ld] | u [B] | v [B] | red [32].
template <typename scalar_t>
__global__ void __launch_bounds__(kSmallThreads)
    sinkd_small_fwd_kernel(const float* __restrict__ dpart,  // [splits, B, B] partial distances
                           int splits,                        // partials per pair
                           int64_t nb,                        // B
                           int n_iters,                       // L
                           float scale2,                      // -log2(e) / eps: K = exp2(D * scale2)
                           float* __restrict__ d_out,         // [B, B] out: D
                           float* __restrict__ U,             // [L+1, B] out: u_0..u_L
                           float* __restrict__ V,             // [L+1, B] out: v_0..v_L
                           scalar_t* __restrict__ loss) {     // [] out
  extern __shared__ float smem[];
  const int64_t ld = nb | 1;  // odd row stride: column walks hit 32 distinct banks
  float* Ks = smem;
  float* Ds = Ks + nb * ld;
  float* u = Ds + nb * ld;
  float* v = u + nb;
  float* red = v + nb;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, n_warps = blockDim.x / kWarp;
  for (int64_t e = threadIdx.x; e < nb * nb; e += blockDim.x) {
    float d = 0.f;
    for (int s = 0; s < splits; ++s) d += dpart[s * nb * nb + e];
    d_out[e] = d;
    const int64_t i = e / nb, j = e % nb;
    Ds[i * ld + j] = d;
    Ks[i * ld + j] = exp2f(d * scale2);
  }
  for (int64_t i = threadIdx.x; i < nb; i += blockDim.x) {
    u[i] = v[i] = 1.f;
    U[i] = V[i] = 1.f;
  }
  __syncthreads();
  for (int l = 1; l <= n_iters; ++l) {
    for (int64_t i = warp; i < nb; i += n_warps) {
      const float s = warp_sum_of(nb, [&](int64_t j) { return Ks[i * ld + j] * v[j]; });
      if (lane == 0) {
        u[i] = 1.f / s;
        U[l * nb + i] = 1.f / s;
      }
    }
    __syncthreads();
    for (int64_t j = warp; j < nb; j += n_warps) {
      const float s = warp_sum_of(nb, [&](int64_t i) { return Ks[i * ld + j] * u[i]; });
      if (lane == 0) {
        v[j] = 1.f / s;
        V[l * nb + j] = 1.f / s;
      }
    }
    __syncthreads();
  }
  float acc = 0.f;
  for (int64_t i = warp; i < nb; i += n_warps) {
    acc += u[i] * warp_sum_of(nb, [&](int64_t j) { return Ks[i * ld + j] * Ds[i * ld + j] * v[j]; });
  }
  if (lane == 0) red[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int w = 0; w < n_warps; ++w) s += red[w];
    loss[0] = static_cast<scalar_t>(s);
  }
}

// D = sum of the partials, and D^T. Block (32, 8), 32 x 32 tiles. Grid: tiles^2.
__global__ void __launch_bounds__(kThreads)
    sinkd_prep_kernel(const float* __restrict__ dpart,  // [splits, B, B]
                      int splits, int64_t nb,            // partials per pair, B
                      float* __restrict__ d_out,         // [B, B] out: D
                      float* __restrict__ dt_out) {      // [B, B] out: D^T
  __shared__ float tile[32][33];
  const int64_t tiles = (nb + 31) / 32;
  const int64_t bi = blockIdx.x / tiles, bj = blockIdx.x % tiles;
  for (int r = threadIdx.y; r < 32; r += blockDim.y) {
    const int64_t i = bi * 32 + r, j = bj * 32 + threadIdx.x;
    if (i < nb && j < nb) {
      float d = 0.f;
      for (int s = 0; s < splits; ++s) d += dpart[(s * nb + i) * nb + j];
      d_out[i * nb + j] = d;
      tile[r][threadIdx.x] = d;
    }
  }
  __syncthreads();
  for (int r = threadIdx.y; r < 32; r += blockDim.y) {
    const int64_t j = bj * 32 + r, i = bi * 32 + threadIdx.x;
    if (i < nb && j < nb) dt_out[j * nb + i] = tile[threadIdx.x][r];
  }
}

// out_i = 1 / sum_j exp2(A_ij scale2) x_j (A = D: u update; A = D^T: v update); with kd set (the
// value): out_i = x2_i sum_j exp2(A_ij scale2) A_ij x_j. Warp per row. Grid: ceil(B / 8).
template <bool kValue>
__global__ void __launch_bounds__(kThreads)
    sinkd_mv_kernel(const float* __restrict__ A,   // [B, B] D or D^T
                    const float* __restrict__ x,   // [B] v_{l-1} or u_l (kValue: v_L)
                    const float* __restrict__ x2,  // [B] kValue: u_L
                    int64_t nb,                    // B
                    float scale2,                  // -log2(e) / eps
                    float* __restrict__ out) {     // [B] out
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (i >= nb) return;
  const float* row = A + i * nb;
  const float s = warp_sum_of(nb, [&](int64_t j) {
    const float d = row[j];
    return kValue ? exp2f(d * scale2) * d * x[j] : exp2f(d * scale2) * x[j];
  });
  if (threadIdx.x % kWarp == 0) out[i] = kValue ? x2[i] * s : 1.f / s;
}

// loss = sum_i rows_i (one block, fixed order). Grid: 1.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    sum_kernel(const float* __restrict__ rows,  // [B]
               int64_t nb,                      // B
               scalar_t* __restrict__ loss) {   // [] out
  __shared__ float part[kThreads / kWarp];
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < nb; i += blockDim.x) s += rows[i];
  s = warp_sum(s);
  if (threadIdx.x % kWarp == 0) part[threadIdx.x / kWarp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (int w = 0; w < kThreads / kWarp; ++w) t += part[w];
    loss[0] = static_cast<scalar_t>(t);
  }
}

// The one-block backward (B <= kSmallB): the carried-H reverse recurrence of torch_impl
// (sinkhorn_loss_bwd) with H and K in shared memory, then G = dD = g P - (H o K) / eps.
// Dynamic shared memory: K [B, ld] | H [B, ld] | w [B] | z [B].
__global__ void __launch_bounds__(kSmallThreads)
    sinkd_small_bwd_kernel(const float* __restrict__ grad,  // [] upstream gradient g
                           const float* __restrict__ D,     // [B, B]
                           const float* __restrict__ U,     // [L+1, B]
                           const float* __restrict__ V,     // [L+1, B]
                           int64_t nb,                      // B
                           int n_iters,                     // L
                           float scale2,                    // -log2(e) / eps
                           float inv_eps,                   // 1 / eps
                           float* __restrict__ G) {         // [B, B] out: dLoss / dD
  extern __shared__ float smem[];
  const int64_t ld = nb | 1;
  float* Ks = smem;
  float* Hs = Ks + nb * ld;
  float* w = Hs + nb * ld;
  float* z = w + nb;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, n_warps = blockDim.x / kWarp;
  const float g = grad[0];
  const float* uL = U + static_cast<int64_t>(n_iters) * nb;
  const float* vL = V + static_cast<int64_t>(n_iters) * nb;
  for (int64_t e = threadIdx.x; e < nb * nb; e += blockDim.x) {
    const int64_t i = e / nb, j = e % nb;
    const float d = D[e];
    Ks[i * ld + j] = exp2f(d * scale2);
    Hs[i * ld + j] = g * uL[i] * vL[j] * d;  // H_L = diag(u_L) (g D) diag(v_L)
  }
  __syncthreads();
  for (int l = n_iters; l >= 1; --l) {
    const float* ul = U + static_cast<int64_t>(l) * nb;
    const float* vl = V + static_cast<int64_t>(l) * nb;
    const float* vm = V + static_cast<int64_t>(l - 1) * nb;
    for (int64_t j = warp; j < nb; j += n_warps) {  // w = (N^T 1) o v_l, N = H o K
      const float s = warp_sum_of(nb, [&](int64_t i) { return Hs[i * ld + j] * Ks[i * ld + j]; });
      if (lane == 0) w[j] = s * vl[j];
    }
    __syncthreads();
    for (int64_t i = warp; i < nb; i += n_warps) {  // z = u_l o (N 1 - u_l o (K w))
      const float* hr = Hs + i * ld;
      const float* kr = Ks + i * ld;
      float rs = 0.f, kw = 0.f;
      for (int64_t j = lane; j < nb; j += kWarp) {
        rs += hr[j] * kr[j];
        kw += kr[j] * w[j];
      }
      rs = warp_sum(rs);
      kw = warp_sum(kw);
      if (lane == 0) z[i] = (rs - ul[i] * kw) * ul[i];
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < nb * nb; e += blockDim.x) {  // H -= u_l w^T + z v_{l-1}^T
      const int64_t i = e / nb, j = e % nb;
      Hs[i * ld + j] -= ul[i] * w[j] + z[i] * vm[j];
    }
    __syncthreads();
  }
  for (int64_t e = threadIdx.x; e < nb * nb; e += blockDim.x) {
    const int64_t i = e / nb, j = e % nb;
    const float k = Ks[i * ld + j];
    G[e] = g * uL[i] * vL[j] * k - Hs[i * ld + j] * k * inv_eps;
  }
}

// The many-launch backward. One pass of iteration l over H (32 rows x 256 columns per block):
//   h = H_L = g u_L v_L^T o D (l == L)  or  h = H - (u_{l+1} w^T + z v_l^T) (the pending update);
//   H = h;  column partials of h o K -> colpart [row blocks, B], row partials -> rowpart [col blocks, B].
constexpr int kHRows = 32;
struct HPass {
  const float* D;       // [B, B]
  float* H;             // [B, B] in/out: carried H
  bool init;            // l == L: h = g u_L v_L^T o D
  const float* grad;    // [] g
  const float* uL;      // [B] u_L
  const float* vL;      // [B] v_L
  const float* up;      // [B] u_{l+1} (pending update; init: unused)
  const float* w;       // [B] w_{l+1}
  const float* z;       // [B] z_{l+1}
  const float* vp;      // [B] v_l
  int64_t nb;           // B
  float scale2;         // -log2(e) / eps
  float* colpart;       // [ceil(B / 32), B] out
  float* rowpart;       // [ceil(B / 256), B] out
};

__device__ __forceinline__ float h_value(const HPass& hp, int64_t i, int64_t j, float g) {
  const int64_t e = i * hp.nb + j;
  return hp.init ? g * hp.uL[i] * hp.vL[j] * hp.D[e] : hp.H[e] - (hp.up[i] * hp.w[j] + hp.z[i] * hp.vp[j]);
}

__global__ void __launch_bounds__(kThreads) sinkd_h_kernel(HPass hp) {  // the pass's tensors
  __shared__ float tile[kHRows][kThreads + 1];
  const int64_t nb = hp.nb;
  const int64_t cblocks = (nb + kThreads - 1) / kThreads;
  const int64_t rb = blockIdx.x / cblocks, cb = blockIdx.x % cblocks;
  const int64_t j = cb * kThreads + threadIdx.x;
  const float g = hp.grad[0];
  float col = 0.f;
  for (int r = 0; r < kHRows; ++r) {
    const int64_t i = rb * kHRows + r;
    float nk = 0.f;
    if (i < nb && j < nb) {
      const float h = h_value(hp, i, j, g);
      hp.H[i * nb + j] = h;
      nk = h * exp2f(hp.D[i * nb + j] * hp.scale2);
    }
    col += nk;
    tile[r][threadIdx.x] = nk;
  }
  if (j < nb) hp.colpart[rb * nb + j] = col;
  __syncthreads();
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int r = warp; r < kHRows; r += kThreads / kWarp) {
    float s = 0.f;
    for (int c = lane; c < kThreads; c += kWarp) s += tile[r][c];
    s = warp_sum(s);
    const int64_t i = rb * kHRows + r;
    if (lane == 0 && i < nb) hp.rowpart[cb * nb + i] = s;
  }
}

// w_j = (sum colpart) v_l,j ; rs_i = sum rowpart. Grid: ceil(B / kThreads).
__global__ void __launch_bounds__(kThreads)
    sinkd_h_merge_kernel(const float* __restrict__ colpart,  // [rblocks, B]
                         int64_t rblocks,
                         const float* __restrict__ rowpart,  // [cblocks, B]
                         int64_t cblocks,
                         const float* __restrict__ vl,       // [B] v_l
                         int64_t nb,                         // B
                         float* __restrict__ w,              // [B] out: w_l
                         float* __restrict__ rs) {           // [B] out: (H o K) 1
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= nb) return;
  float c = 0.f, r = 0.f;
  for (int64_t k = 0; k < rblocks; ++k) c += colpart[k * nb + i];
  for (int64_t k = 0; k < cblocks; ++k) r += rowpart[k * nb + i];
  w[i] = c * vl[i];
  rs[i] = r;
}

// z_i = u_l,i (rs_i - u_l,i (K w)_i). Warp per row. Grid: ceil(B / 8).
__global__ void __launch_bounds__(kThreads)
    sinkd_z_kernel(const float* __restrict__ D,   // [B, B]
                   const float* __restrict__ w,   // [B] w_l
                   const float* __restrict__ rs,  // [B] (H o K) 1
                   const float* __restrict__ ul,  // [B] u_l
                   int64_t nb,                    // B
                   float scale2,                  // -log2(e) / eps
                   float* __restrict__ z) {       // [B] out: z_l
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (i >= nb) return;
  const float* row = D + i * nb;
  const float kw = warp_sum_of(nb, [&](int64_t j) { return exp2f(row[j] * scale2) * w[j]; });
  if (threadIdx.x % kWarp == 0) z[i] = (rs[i] - ul[i] * kw) * ul[i];
}

// G = g P - (H_0 o K) / eps, H_0 = H - (u_1 w^T + z v_0^T). Grid: ceil(B^2 / kThreads).
__global__ void __launch_bounds__(kThreads)
    sinkd_g_kernel(HPass hp,           // H with the last pending update (up = u_1, vp = v_0)
                   float inv_eps,      // 1 / eps
                   float* __restrict__ G) {  // [B, B] out
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t nb = hp.nb;
  if (e >= nb * nb) return;
  const int64_t i = e / nb, j = e % nb;
  const float g = hp.grad[0];
  const float k = exp2f(hp.D[e] * hp.scale2);
  G[e] = g * hp.uL[i] * hp.vL[j] * k - h_value(hp, i, j, g) * k * inv_eps;
}

// The sign-tile L1 backward for one side: out_xc = sum_y W_xy sign(X_xc - Y_yc) with X = p, Y = q,
// W = G (student) or X = q, Y = p, W = G^T (teacher: dq_jc = -sum_i G_ij sign(p_ic - q_jc)).
// sign(0) = 0, NaN kept. Tile: 64 own rows x 64 classes, partner rows in chunks of 16 (split over
// `splits` partner ranges with float atomics when the tiles alone do not fill the GPU).
// Grid: splits x row tiles x class tiles.
template <typename scalar_t, bool kTeacher>
__global__ void __launch_bounds__(kThreads)
    l1_bwd_kernel(const scalar_t* __restrict__ zx,  // [B, C] own logits
                  const scalar_t* __restrict__ zy,  // [B, C] partner logits
                  const float* __restrict__ lx,     // [B] own LSE2
                  const float* __restrict__ ly,     // [B] partner LSE2
                  const float* __restrict__ G,      // [B, B] dLoss/dD (student rows i, teacher columns j)
                  int64_t nb, int64_t C,            // sizes
                  float inv_t2,                     // log2(e) / T
                  int64_t partners_per_split,       // partner rows of one split
                  bool atomic,                      // splits > 1: accumulate with atomics into zeros
                  float* __restrict__ out) {        // [B, C] out: dLoss/dX (float32)
  __shared__ float ys[kPartnerChunk][kPairTile];
  __shared__ float ws[kPairTile][kPartnerChunk + 1];
  const int64_t rtiles = (nb + kPairTile - 1) / kPairTile, ctiles = (C + kPairTile - 1) / kPairTile;
  const int64_t split = blockIdx.x / (rtiles * ctiles);
  const int64_t ti = (blockIdx.x / ctiles) % rtiles, tc = blockIdx.x % ctiles;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float xv[4][4], acc[4][4] = {};
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int64_t x = ti * kPairTile + ty + 16 * a;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t c = tc * kPairTile + tx + 16 * q;
      xv[a][q] = (x < nb && c < C) ? prob(zx, C, x, c, inv_t2, lx) : 0.f;
    }
  }
  const int64_t y_begin = split * partners_per_split;
  const int64_t y_end = std::min<int64_t>(nb, y_begin + partners_per_split);
  for (int64_t y0 = y_begin; y0 < y_end; y0 += kPartnerChunk) {
    __syncthreads();
    for (int e = threadIdx.x; e < kPartnerChunk * kPairTile; e += kThreads) {
      const int yy = e / kPairTile, cl = e % kPairTile;
      const int64_t y = y0 + yy, c = tc * kPairTile + cl;
      ys[yy][cl] = (y < y_end && c < C) ? prob(zy, C, y, c, inv_t2, ly) : 0.f;
    }
    for (int e = threadIdx.x; e < kPairTile * kPartnerChunk; e += kThreads) {
      const int xl = e / kPartnerChunk, yy = e % kPartnerChunk;
      const int64_t x = ti * kPairTile + xl, y = y0 + yy;
      ws[xl][yy] = (x < nb && y < y_end) ? (kTeacher ? G[y * nb + x] : G[x * nb + y]) : 0.f;
    }
    __syncthreads();
#pragma unroll 2  // 4 spilled (sm_80, fp32): 16 products x 2 rows of loads in flight
    for (int yy = 0; yy < kPartnerChunk; ++yy) {
      float yv[4], wv[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        wv[a] = ws[ty + 16 * a][yy];
        yv[a] = ys[yy][tx + 16 * a];
      }
#pragma unroll
      for (int a = 0; a < 4; ++a) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float d = xv[a][q] - yv[q];
          const float sg = d > 0.f ? 1.f : (d < 0.f ? -1.f : d * 0.f);  // d * 0: 0, or NaN kept
          acc[a][q] = fmaf(wv[a], sg, acc[a][q]);
        }
      }
    }
  }
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int64_t x = ti * kPairTile + ty + 16 * a;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t c = tc * kPairTile + tx + 16 * q;
      if (x < nb && c < C) {
        if (atomic) {
          atomicAdd(out + x * C + c, acc[a][q]);
        } else {
          out[x * C + c] = acc[a][q];
        }
      }
    }
  }
}

// dz = p o (gp - <gp, p>) / T in z's dtype. Grid: B, one block per row.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    softmax_bwd_kernel(const scalar_t* __restrict__ z,  // [B, C] logits
                       const float* __restrict__ lse2,  // [B] row LSE2
                       const float* __restrict__ gp,    // [B, C] dLoss / dp
                       int64_t C,                       // classes
                       float inv_t2,                    // log2(e) / T
                       float inv_t,                     // 1 / T
                       scalar_t* __restrict__ dz) {     // [B, C] out
  __shared__ float part[kThreads / kWarp];
  __shared__ float dot_s;
  const int64_t row = blockIdx.x;
  float s = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) s += gp[row * C + c] * prob(z, C, row, c, inv_t2, lse2);
  s = warp_sum(s);
  if (threadIdx.x % kWarp == 0) part[threadIdx.x / kWarp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (int w = 0; w < kThreads / kWarp; ++w) t += part[w];
    dot_s = t;
  }
  __syncthreads();
  const float dot = dot_s;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float p = prob(z, C, row, c, inv_t2, lse2);
    dz[row * C + c] = static_cast<scalar_t>(p * (gp[row * C + c] - dot) * inv_t);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: geometry, checks, launchers
// ---------------------------------------------------------------------------------------------
// Calls f(scalar_t{}) for a float32 / float16 / bfloat16 cost (three instantiations, no float64).
template <typename F>
void dispatch_cost(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t, " (float32, float16 or bfloat16)");
  }
}

int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

unsigned int grid_size(int64_t blocks, const char* op) {
  TORCH_CHECK(blocks <= static_cast<int64_t>(std::numeric_limits<int32_t>::max()), op, ": the problem needs ",
              blocks, " blocks in one launch (at most 2^31 - 1)");
  return static_cast<unsigned int>(std::max<int64_t>(blocks, 1));
}

// Row ranges per problem for a grid of about kBlocksPerSm blocks per SM: G ranges of rows_per_block rows.
struct RowSplit {
  int G;
  int64_t rows_per_block;
};
RowSplit split_rows(int64_t nb, int64_t n, int64_t min_rows, int64_t blocks_per_range) {
  const int64_t target = static_cast<int64_t>(num_sms()) * kBlocksPerSm;
  int64_t G = std::max<int64_t>(1, ceil_div(target, std::max<int64_t>(1, nb * blocks_per_range)));
  G = std::min<int64_t>(G, std::max<int64_t>(1, ceil_div(n, min_rows)));
  const int64_t rpb = ceil_div(n, G);
  return RowSplit{static_cast<int>(ceil_div(n, rpb)), rpb};
}

// The fused path's geometry for n x m problems with `vecs` column vectors in shared memory.
struct FusedGeom {
  bool ok;       // the rows fit
  int threads;   // block size
  int tile_rows;  // rows per chunk
  size_t smem;   // dynamic shared memory (bytes)
  RowSplit split;
};
FusedGeom fused_geometry(int64_t nb, int64_t n, int64_t m, int vecs, int row_vecs) {
  FusedGeom fg{};
  if (m > kFusedMaxCols) return fg;
  const int64_t per_row = 4 * (m + row_vecs);
  const int64_t fixed = 4 * vecs * m;
  const int64_t tr = std::min<int64_t>({kMaxTileRows, n, (kFusedSmemBudget - fixed) / per_row});
  if (tr < 1) return fg;
  fg.ok = true;
  fg.tile_rows = static_cast<int>(tr);
  fg.threads = static_cast<int>(std::clamp<int64_t>(ceil_div(ceil_div(m, kCols), kWarp) * kWarp, 128, kFusedMaxThreads));
  fg.smem = static_cast<size_t>(fixed + per_row * tr);
  fg.split = split_rows(nb, n, tr, 1);
  return fg;
}

// Opt a kernel in to more than 48 KiB of dynamic shared memory (host-side attribute, no sync).
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

void check_cost_inputs(const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b, double epsilon,
                       int64_t n_iters, const char* op) {
  check_cuda(cost, op, "cost");
  check_same_device(a, cost, op, "a", "cost");
  check_same_device(b, cost, op, "b", "cost");
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&cost, "cost"}, {&a, "a"}, {&b, "b"}}) {
    check_floating(*t, op, name);
    TORCH_CHECK(t->scalar_type() != at::kDouble, op, ": ", name,
                " is float64; float64 runs on the torch path (the ops route it there)");
  }
  check_dim(cost, 3, op, "cost", "[B, n, m]");
  const int64_t nb = cost.size(0), n = cost.size(1), m = cost.size(2);
  check_sizes(a, {nb, n}, op, "a", "[B, n]");
  check_sizes(b, {nb, m}, op, "b", "[B, m]");
  TORCH_CHECK(nb >= 1 && n >= 1 && m >= 1, op, ": cost [B, n, m] needs B, n, m >= 1, got ", cost.sizes());
  TORCH_CHECK(n_iters >= 1 && n_iters <= std::numeric_limits<int32_t>::max(), op, ": n_iters must be >= 1, got ",
              n_iters);
  TORCH_CHECK(std::isfinite(epsilon) && epsilon > 0, op, ": epsilon must be a positive finite number, got ", epsilon);
}

template <typename scalar_t>
Problem<scalar_t> make_problem(const at::Tensor& cost, const at::Tensor& a_f, const at::Tensor& b_f, double epsilon,
                               const int* frozen) {
  Problem<scalar_t> pr;
  pr.cost = cost.const_data_ptr<scalar_t>();
  pr.cs0 = cost.stride(0);
  pr.cs1 = cost.stride(1);
  pr.cs2 = cost.stride(2);
  pr.a = a_f.const_data_ptr<float>();
  pr.as0 = a_f.stride(0);
  pr.as1 = a_f.stride(1);
  pr.b = b_f.const_data_ptr<float>();
  pr.bs0 = b_f.stride(0);
  pr.bs1 = b_f.stride(1);
  pr.nb = cost.size(0);
  pr.n = cost.size(1);
  pr.m = cost.size(2);
  pr.scale2 = static_cast<float>(-static_cast<double>(kLog2e) / epsilon);
  pr.frozen = frozen;
  return pr;
}

// One forward iteration: alpha_out from beta_prev, then beta_out.
template <typename scalar_t>
void fwd_iteration(const Problem<scalar_t>& pr, const FusedGeom& fg, const float* beta_prev, float* alpha_out,
                   float* beta_out, Lse2* part, const RowSplit& col_split, cudaStream_t stream, const char* op) {
  const int64_t nb = pr.nb, n = pr.n, m = pr.m;
  int G;
  if (fg.ok) {
    G = fg.split.G;
    fwd_fused_kernel<scalar_t><<<grid_size(nb * G, op), fg.threads, fg.smem, stream>>>(
        pr, beta_prev, alpha_out, part, G, fg.split.rows_per_block, fg.tile_rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    RowArgs<scalar_t> ra{};
    ra.beta = beta_prev;
    ra.out = alpha_out;
    row_kernel<RowMode::kAlpha, scalar_t><<<grid_size(nb * ceil_div(n, kRowsPerBlock), op), kThreads, 0, stream>>>(pr, ra);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ColArgs<scalar_t> ca{};
    ca.alpha = alpha_out;
    ca.part = part;
    ca.G = G = col_split.G;
    ca.rows_per_block = col_split.rows_per_block;
    col_kernel<ColMode::kBeta, scalar_t><<<grid_size(nb * G * ceil_div(m, kThreads), op), kThreads, 0, stream>>>(pr, ca);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  merge_lse_kernel<scalar_t><<<grid_size(nb * ceil_div(m, kThreads), op), kThreads, 0, stream>>>(pr, part, G, beta_out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void sinkhorn_fwd_launch(const at::Tensor& cost, const at::Tensor& a_f, const at::Tensor& b_f, double epsilon,
                         int64_t n_iters, double tol, int64_t check_every, bool implicit, at::Tensor& plan,
                         at::Tensor& alphas, at::Tensor& betas, at::Tensor& n_run, const char* op) {
  const int64_t nb = cost.size(0), n = cost.size(1), m = cost.size(2);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool check = tol > 0;
  const auto iopt = cost.options().dtype(at::kInt);
  const auto fopt = cost.options().dtype(at::kFloat);
  at::Tensor frozen = check ? at::zeros({nb}, iopt) : at::Tensor();
  const int64_t rblocks = ceil_div(n, kRowsPerBlock);
  at::Tensor err_part = check ? at::empty({nb, rblocks}, fopt) : at::Tensor();
  const Problem<scalar_t> pr = make_problem<scalar_t>(cost, a_f, b_f, epsilon, check ? frozen.data_ptr<int>() : nullptr);

  const FusedGeom fg = fused_geometry(nb, n, m, 1, 1);
  const RowSplit col_split = split_rows(nb, n, 64, ceil_div(m, kThreads));  // >= 64 rows per column thread
  const int G = fg.ok ? fg.split.G : col_split.G;
  at::Tensor part = at::empty({nb * G * m * 2}, fopt);  // Lse2 states
  if (fg.ok) allow_smem(fwd_fused_kernel<scalar_t>, fg.smem);

  float* al = alphas.data_ptr<float>();
  float* be = betas.data_ptr<float>();
  for (int64_t k = 0; k < n_iters; ++k) {
    const int64_t ks = implicit ? 0 : k;
    float* alpha_out = al + ks * nb * n;
    float* beta_out = be + ks * nb * m;
    const float* beta_prev = k == 0 ? nullptr : be + (implicit ? 0 : k - 1) * nb * m;
    fwd_iteration(pr, fg, beta_prev, alpha_out, beta_out, reinterpret_cast<Lse2*>(part.data_ptr<float>()), col_split,
                  stream, op);
    const int64_t done = k + 1;
    if (check && done % check_every == 0 && done < n_iters) {
      RowArgs<scalar_t> ra{};
      ra.alpha = alpha_out;
      ra.beta = beta_out;
      ra.out = err_part.data_ptr<float>();
      row_kernel<RowMode::kErr, scalar_t><<<grid_size(nb * rblocks, op), kThreads, 0, stream>>>(pr, ra);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      freeze_kernel<<<grid_size(nb, op), kThreads, 0, stream>>>(err_part.data_ptr<float>(), rblocks,
                                                                 static_cast<float>(tol), static_cast<int>(done),
                                                                 frozen.data_ptr<int>(), n_run.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  const int64_t S = alphas.size(0);
  if (check && !implicit && S > 1) {
    fill_kernel<<<grid_size(S * nb, op), kThreads, 0, stream>>>(al, be, n_run.data_ptr<int>(), nb, n, m);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const Problem<scalar_t> pr_all = make_problem<scalar_t>(cost, a_f, b_f, epsilon, nullptr);
  const dim3 block(kWarp, kThreads / kWarp);
  plan_kernel<scalar_t><<<grid_size(ceil_div(nb * n, block.y), op), block, 0, stream>>>(
      pr_all, al + (S - 1) * nb * n, be + (S - 1) * nb * m, plan.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// log2 x where x > 0, +inf where x == 0 (so that potential2 - this = -inf for a zero marginal).
at::Tensor log2_or_inf(const at::Tensor& x) {
  return at::where(at::gt(x, 0), at::log2(x), at::full({}, std::numeric_limits<float>::infinity(), x.options()));
}

template <typename scalar_t>
void sinkhorn_bwd_launch(const at::Tensor& grad, const at::Tensor& cost, const at::Tensor& a_f, const at::Tensor& b_f,
                         const at::Tensor& alphas, const at::Tensor& betas, const at::Tensor& n_run, double epsilon,
                         int64_t n_iters, bool implicit, bool need_cost, at::Tensor& grad_cost, at::Tensor& dloga,
                         at::Tensor& dlogb, const char* op) {
  const int64_t nb = cost.size(0), n = cost.size(1), m = cost.size(2);
  const int64_t S = alphas.size(0);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto fopt = cost.options().dtype(at::kFloat);
  const Problem<scalar_t> pr = make_problem<scalar_t>(cost, a_f, b_f, epsilon, nullptr);
  const GradView<scalar_t> gv{grad.const_data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), grad.stride(2)};
  const at::Tensor la2 = log2_or_inf(a_f).contiguous();
  const at::Tensor lb2 = log2_or_inf(b_f).contiguous();
  const float* al = alphas.const_data_ptr<float>();
  const float* be = betas.const_data_ptr<float>();
  const float* al_fin = al + (S - 1) * nb * n;
  const float* be_fin = be + (S - 1) * nb * m;
  const int* nr = n_run.const_data_ptr<int>();
  at::Tensor abar_out = at::empty({nb, n}, fopt);
  at::Tensor abar = at::empty({nb, n}, fopt);
  at::Tensor bbar = at::empty({nb, m}, fopt);
  const bool keep = need_cost && !implicit;
  at::Tensor hist_a = keep ? at::empty({S, nb, n}, fopt) : at::Tensor();
  at::Tensor hist_b = keep ? at::empty({S, nb, m}, fopt) : at::Tensor();

  const FusedGeom fg = fused_geometry(nb, n, m, 2, 2);
  const RowSplit col_split = split_rows(nb, n, 64, ceil_div(m, kThreads));
  const int G_max = std::max(fg.ok ? fg.split.G : 1, col_split.G);
  at::Tensor part = at::empty({nb * G_max * m}, fopt);
  if (fg.ok) allow_smem(bwd_fused_kernel<scalar_t>, fg.smem);
  const unsigned int row_grid = grid_size(nb * ceil_div(n, kRowsPerBlock), op);
  const unsigned int col_grid = grid_size(nb * col_split.G * ceil_div(m, kThreads), op);
  const unsigned int merge_grid = grid_size(nb * ceil_div(m, kThreads), op);

  // first pass: abar_out = W 1, bbar = W^T 1, W = dP o P
  {
    RowArgs<scalar_t> ra{};
    ra.alpha = al_fin;
    ra.beta = be_fin;
    ra.grad = gv;
    ra.out = abar_out.data_ptr<float>();
    row_kernel<RowMode::kBwdInit, scalar_t><<<row_grid, kThreads, 0, stream>>>(pr, ra);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ColArgs<scalar_t> ca{};
    ca.alpha = al_fin;
    ca.beta = be_fin;
    ca.grad = gv;
    ca.part = part.data_ptr<float>();
    ca.G = col_split.G;
    ca.rows_per_block = col_split.rows_per_block;
    col_kernel<ColMode::kBwdInit, scalar_t><<<col_grid, kThreads, 0, stream>>>(pr, ca);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    merge_sum_kernel<<<merge_grid, kThreads, 0, stream>>>(part.data_ptr<float>(), col_split.G, nb, m,
                                                           bbar.data_ptr<float>(), dlogb.data_ptr<float>(), nullptr, nr, -1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // steps k = n_iters - 1 .. 0 (problem b takes those with k < n_run[b])
  for (int64_t k = n_iters - 1; k >= 0; --k) {
    const float* alpha_k = implicit ? al : al + k * nb * n;
    const float* beta_k = implicit ? be : be + k * nb * m;
    const float* beta_prev = implicit ? be : (k > 0 ? be + (k - 1) * nb * m : nullptr);
    float* ha = keep ? hist_a.data_ptr<float>() + k * nb * n : nullptr;
    float* hb = keep ? hist_b.data_ptr<float>() + k * nb * m : nullptr;
    int G;
    if (fg.ok) {
      G = fg.split.G;
      bwd_fused_kernel<scalar_t><<<grid_size(nb * G, op), fg.threads, fg.smem, stream>>>(
          pr, alpha_k, beta_k, beta_prev, bbar.data_ptr<float>(), la2.data_ptr<float>(), lb2.data_ptr<float>(),
          abar_out.data_ptr<float>(), nr, static_cast<int>(k), dloga.data_ptr<float>(), ha, part.data_ptr<float>(), G,
          fg.split.rows_per_block, fg.tile_rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      RowArgs<scalar_t> ra{};
      ra.alpha = alpha_k;
      ra.beta = beta_k;
      ra.bbar = bbar.data_ptr<float>();
      ra.lb2 = lb2.data_ptr<float>();
      ra.la2 = la2.data_ptr<float>();
      ra.out = abar.data_ptr<float>();
      ra.abar_out = abar_out.data_ptr<float>();
      ra.dloga = dloga.data_ptr<float>();
      ra.hist_a = ha;
      ra.n_run = nr;
      ra.step = static_cast<int>(k);
      row_kernel<RowMode::kBwdStep, scalar_t><<<row_grid, kThreads, 0, stream>>>(pr, ra);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      ColArgs<scalar_t> ca{};
      ca.alpha = alpha_k;
      ca.beta = beta_prev;
      ca.abar = abar.data_ptr<float>();
      ca.la2 = la2.data_ptr<float>();
      ca.part = part.data_ptr<float>();
      ca.G = G = col_split.G;
      ca.rows_per_block = col_split.rows_per_block;
      ca.n_run = nr;
      ca.step = static_cast<int>(k);
      col_kernel<ColMode::kBwdStep, scalar_t><<<col_grid, kThreads, 0, stream>>>(pr, ca);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    merge_sum_kernel<<<merge_grid, kThreads, 0, stream>>>(part.data_ptr<float>(), G, nb, m, bbar.data_ptr<float>(),
                                                           dlogb.data_ptr<float>(), hb, nr, static_cast<int>(k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (need_cost) {
    CostArgs ca{};
    ca.alpha_fin = al_fin;
    ca.beta_fin = be_fin;
    ca.alphas = al;
    ca.a_ks = implicit ? 0 : nb * n;
    ca.betas = be;
    ca.b_ks = implicit ? 0 : nb * m;
    ca.ha = implicit ? dloga.data_ptr<float>() : hist_a.data_ptr<float>();
    ca.ha_ks = implicit ? 0 : nb * n;
    ca.hb = implicit ? dlogb.data_ptr<float>() : hist_b.data_ptr<float>();
    ca.hb_ks = implicit ? 0 : nb * m;
    ca.la2 = la2.data_ptr<float>();
    ca.lb2 = lb2.data_ptr<float>();
    ca.n_run = nr;
    ca.implicit = implicit;
    ca.neg_inv_eps = static_cast<float>(-1.0 / epsilon);
    const int64_t tiles = nb * ceil_div(n, kCostTileRows) * ceil_div(m, kCostTileCols);
    bwd_cost_kernel<scalar_t><<<grid_size(tiles, op), kThreads, 0, stream>>>(pr, gv, ca, grad_cost.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}


// ---- SinKD host side ----------------------------------------------------------------------------
void check_logits_pair(const at::Tensor& student, const at::Tensor& teacher, double temperature, double epsilon,
                       const char* op) {
  check_cuda(student, op, "student");
  check_same_device(teacher, student, op, "teacher", "student");
  check_floating(student, op, "student");
  check_floating(teacher, op, "teacher");
  TORCH_CHECK(student.scalar_type() != at::kDouble && teacher.scalar_type() != at::kDouble, op,
              ": float64 runs on the torch path (the ops route it there)");
  check_dim(student, 2, op, "student", "[B, C]");
  check_sizes(teacher, student.sizes(), op, "teacher", "[B, C] (the student's shape)");
  TORCH_CHECK(student.size(0) >= 1 && student.size(0) <= kMaxB, op, ": the batch B must be in [1, ", kMaxB, "], got ",
              student.size(0));
  TORCH_CHECK(student.size(1) >= 1, op, ": student must have at least one class, got shape ", student.sizes());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be a positive finite number, got ",
              temperature);
  TORCH_CHECK(std::isfinite(epsilon) && epsilon > 0, op, ": epsilon must be a positive finite number, got ", epsilon);
}

// Both logits in one dtype (their own, or float32 when they differ), contiguous.
std::pair<at::Tensor, at::Tensor> common_logits(const at::Tensor& student, const at::Tensor& teacher) {
  if (student.scalar_type() == teacher.scalar_type()) return {student.contiguous(), teacher.contiguous()};
  return {student.to(at::kFloat).contiguous(), teacher.to(at::kFloat).contiguous()};
}

size_t small_smem_bytes(int64_t nb) { return static_cast<size_t>((2 * nb * (nb | 1) + 2 * nb + kWarp) * 4); }

bool use_small_path(int64_t nb) {
  return nb <= kSmallB &&
         small_smem_bytes(nb) <= static_cast<size_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
}

template <typename scalar_t>
at::Tensor softmax_lse(const at::Tensor& zs, const at::Tensor& zt, double temperature, cudaStream_t stream,
                       const char* op) {
  const int64_t nb = zs.size(0), C = zs.size(1);
  at::Tensor lse2 = at::empty({2 * nb}, zs.options().dtype(at::kFloat));
  softmax_lse_kernel<scalar_t><<<grid_size(2 * nb, op), kThreads, 0, stream>>>(
      zs.const_data_ptr<scalar_t>(), zt.const_data_ptr<scalar_t>(), nb, C,
      static_cast<float>(kLog2e / temperature), lse2.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return lse2;
}

template <typename scalar_t>
void sinkd_fwd_launch(const at::Tensor& zs, const at::Tensor& zt, double temperature, double epsilon, int64_t n_iters,
                      at::Tensor& loss, at::Tensor& D, at::Tensor& U, at::Tensor& V, const char* op) {
  const int64_t nb = zs.size(0), C = zs.size(1);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto fopt = zs.options().dtype(at::kFloat);
  const float inv_t2 = static_cast<float>(kLog2e / temperature);
  const float scale2 = static_cast<float>(-kLog2e / epsilon);
  const at::Tensor lse2 = softmax_lse<scalar_t>(zs, zt, temperature, stream, op);
  // class splits: enough pair-tile blocks for about kBlocksPerSm per SM
  const int64_t tiles = ceil_div(nb, kPairTile) * ceil_div(nb, kPairTile);
  const int64_t want = ceil_div(static_cast<int64_t>(num_sms()) * kBlocksPerSm, tiles);
  const int64_t splits = std::clamp<int64_t>(want, 1, std::min<int64_t>(kMaxSplits, ceil_div(C, kClassChunk)));
  const int64_t per_split = ceil_div(ceil_div(C, splits), kClassChunk) * kClassChunk;
  const int64_t used = ceil_div(C, per_split);
  at::Tensor dpart = at::empty({used, nb, nb}, fopt);
  cdist_kernel<scalar_t><<<grid_size(used * tiles, op), kThreads, 0, stream>>>(
      zs.const_data_ptr<scalar_t>(), zt.const_data_ptr<scalar_t>(), lse2.data_ptr<float>(), nb, C, inv_t2, per_split,
      dpart.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (use_small_path(nb)) {
    const size_t smem = small_smem_bytes(nb);
    allow_smem(sinkd_small_fwd_kernel<scalar_t>, smem);
    sinkd_small_fwd_kernel<scalar_t><<<1, kSmallThreads, smem, stream>>>(
        dpart.data_ptr<float>(), static_cast<int>(used), nb, static_cast<int>(n_iters), scale2, D.data_ptr<float>(),
        U.data_ptr<float>(), V.data_ptr<float>(), loss.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  at::Tensor DT = at::empty({nb, nb}, fopt);
  sinkd_prep_kernel<<<grid_size(ceil_div(nb, 32) * ceil_div(nb, 32), op), dim3(32, 8), 0, stream>>>(
      dpart.data_ptr<float>(), static_cast<int>(used), nb, D.data_ptr<float>(), DT.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  U.select(0, 0).fill_(1.0);
  V.select(0, 0).fill_(1.0);
  float* u = U.data_ptr<float>();
  float* v = V.data_ptr<float>();
  const unsigned int rows = grid_size(ceil_div(nb, kRowsPerBlock), op);
  for (int64_t l = 1; l <= n_iters; ++l) {
    sinkd_mv_kernel<false><<<rows, kThreads, 0, stream>>>(D.data_ptr<float>(), v + (l - 1) * nb, nullptr, nb, scale2,
                                                          u + l * nb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sinkd_mv_kernel<false><<<rows, kThreads, 0, stream>>>(DT.data_ptr<float>(), u + l * nb, nullptr, nb, scale2,
                                                          v + l * nb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor row_vals = at::empty({nb}, fopt);
  sinkd_mv_kernel<true><<<rows, kThreads, 0, stream>>>(D.data_ptr<float>(), v + n_iters * nb, u + n_iters * nb, nb,
                                                       scale2, row_vals.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_kernel<scalar_t><<<1, kThreads, 0, stream>>>(row_vals.data_ptr<float>(), nb, loss.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// G = dLoss/dD [B, B] float32 (the reverse recurrence).
void sinkd_cost_grad(const at::Tensor& g, const at::Tensor& D, const at::Tensor& U, const at::Tensor& V,
                     double epsilon, at::Tensor& G, cudaStream_t stream, const char* op) {
  const int64_t nb = D.size(0);
  const int64_t L = U.size(0) - 1;
  const float scale2 = static_cast<float>(-kLog2e / epsilon);
  const float inv_eps = static_cast<float>(1.0 / epsilon);
  const float* u = U.const_data_ptr<float>();
  const float* v = V.const_data_ptr<float>();
  if (use_small_path(nb)) {
    const size_t smem = small_smem_bytes(nb);
    allow_smem(sinkd_small_bwd_kernel, smem);
    sinkd_small_bwd_kernel<<<1, kSmallThreads, smem, stream>>>(g.const_data_ptr<float>(), D.const_data_ptr<float>(), u,
                                                               v, nb, static_cast<int>(L), scale2, inv_eps,
                                                               G.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const auto fopt = D.options();
  const int64_t rblocks = ceil_div(nb, kHRows), cblocks = ceil_div(nb, kThreads);
  at::Tensor H = at::empty({nb, nb}, fopt);
  at::Tensor colpart = at::empty({rblocks, nb}, fopt);
  at::Tensor rowpart = at::empty({cblocks, nb}, fopt);
  at::Tensor w = at::empty({nb}, fopt), z = at::empty({nb}, fopt), rs = at::empty({nb}, fopt);
  HPass hp{};
  hp.D = D.const_data_ptr<float>();
  hp.H = H.data_ptr<float>();
  hp.grad = g.const_data_ptr<float>();
  hp.uL = u + L * nb;
  hp.vL = v + L * nb;
  hp.w = w.data_ptr<float>();
  hp.z = z.data_ptr<float>();
  hp.nb = nb;
  hp.scale2 = scale2;
  hp.colpart = colpart.data_ptr<float>();
  hp.rowpart = rowpart.data_ptr<float>();
  for (int64_t l = L; l >= 1; --l) {
    hp.init = l == L;
    hp.up = u + (l + 1) * nb;  // read only when !init (l < L)
    hp.vp = v + l * nb;
    if (hp.init) hp.up = hp.vp = nullptr;
    sinkd_h_kernel<<<grid_size(rblocks * cblocks, op), kThreads, 0, stream>>>(hp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sinkd_h_merge_kernel<<<grid_size(ceil_div(nb, kThreads), op), kThreads, 0, stream>>>(
        hp.colpart, rblocks, hp.rowpart, cblocks, v + l * nb, nb, w.data_ptr<float>(), rs.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sinkd_z_kernel<<<grid_size(ceil_div(nb, kRowsPerBlock), op), kThreads, 0, stream>>>(
        hp.D, w.data_ptr<float>(), rs.data_ptr<float>(), u + l * nb, nb, scale2, z.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  hp.init = L == 0;
  hp.up = u + nb;  // the pending update of l = 1: u_1 w^T + z v_0^T
  hp.vp = v;
  sinkd_g_kernel<<<grid_size(ceil_div(nb * nb, kThreads), op), kThreads, 0, stream>>>(hp, inv_eps, G.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// gp = dLoss/dp of one side from G, then the softmax backward into its dtype.
template <typename scalar_t, bool kTeacher>
at::Tensor sinkd_side_grad(const at::Tensor& zx, const at::Tensor& zy, const at::Tensor& lse2, const at::Tensor& G,
                           double temperature, cudaStream_t stream, const char* op) {
  const int64_t nb = zx.size(0), C = zx.size(1);
  const float inv_t2 = static_cast<float>(kLog2e / temperature);
  const int64_t tiles = ceil_div(nb, kPairTile) * ceil_div(C, kPairTile);
  const int64_t want = ceil_div(static_cast<int64_t>(num_sms()) * kBlocksPerSm, tiles);
  const int64_t splits = std::clamp<int64_t>(want, 1, std::min<int64_t>(kMaxSplits, ceil_div(nb, kPartnerChunk)));
  const int64_t per_split = ceil_div(ceil_div(nb, splits), kPartnerChunk) * kPartnerChunk;
  const int64_t used = ceil_div(nb, per_split);
  const auto fopt = zx.options().dtype(at::kFloat);
  at::Tensor gp = used > 1 ? at::zeros({nb, C}, fopt) : at::empty({nb, C}, fopt);
  const float* lx = lse2.const_data_ptr<float>() + (kTeacher ? nb : 0);
  const float* ly = lse2.const_data_ptr<float>() + (kTeacher ? 0 : nb);
  l1_bwd_kernel<scalar_t, kTeacher><<<grid_size(used * tiles, op), kThreads, 0, stream>>>(
      zx.const_data_ptr<scalar_t>(), zy.const_data_ptr<scalar_t>(), lx, ly, G.const_data_ptr<float>(), nb, C, inv_t2,
      per_split, used > 1, gp.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor dz = at::empty({nb, C}, zx.options());
  softmax_bwd_kernel<scalar_t><<<grid_size(nb, op), kThreads, 0, stream>>>(
      zx.const_data_ptr<scalar_t>(), lx, gp.data_ptr<float>(), C, inv_t2, static_cast<float>(1.0 / temperature),
      dz.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dz;
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_fwd_cuda(const at::Tensor& cost, const at::Tensor& a,
                                                                             const at::Tensor& b, double epsilon,
                                                                             int64_t n_iters, double tol,
                                                                             int64_t check_every, bool implicit) {
  const char* op = "sinkhorn_fwd_cuda";
  check_cost_inputs(cost, a, b, epsilon, n_iters, op);
  TORCH_CHECK(!(tol > 0) || check_every >= 1, op, ": check_every must be >= 1 when tol > 0, got ", check_every);
  TORCH_CHECK(!std::isnan(tol), op, ": tol must not be NaN");
  const c10::cuda::CUDAGuard guard(cost.device());
  const int64_t nb = cost.size(0), n = cost.size(1), m = cost.size(2);
  const int64_t S = implicit ? 1 : n_iters;
  const auto fopt = cost.options().dtype(at::kFloat);
  at::Tensor plan = at::empty({nb, n, m}, cost.options());
  at::Tensor alphas = at::empty({S, nb, n}, fopt);
  at::Tensor betas = at::empty({S, nb, m}, fopt);
  at::Tensor n_run = at::full({nb}, n_iters, cost.options().dtype(at::kInt));
  const at::Tensor a_f = a.to(at::kFloat);  // strides kept (a stride-0 expand stays one)
  const at::Tensor b_f = b.to(at::kFloat);
  dispatch_cost(cost.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    sinkhorn_fwd_launch<scalar_t>(cost, a_f, b_f, epsilon, n_iters, tol, check_every, implicit, plan, alphas, betas,
                                  n_run, op);
  });
  return {plan, alphas, betas, n_run};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_bwd_cuda(const at::Tensor& grad, const at::Tensor& cost,
                                                                 const at::Tensor& a, const at::Tensor& b,
                                                                 const at::Tensor& alphas, const at::Tensor& betas,
                                                                 const at::Tensor& n_run, double epsilon,
                                                                 int64_t n_iters, bool implicit, bool need_cost,
                                                                 bool need_a, bool need_b) {
  const char* op = "sinkhorn_bwd_cuda";
  check_cost_inputs(cost, a, b, epsilon, n_iters, op);
  const int64_t nb = cost.size(0), n = cost.size(1), m = cost.size(2);
  const int64_t S = implicit ? 1 : n_iters;
  check_same_device(grad, cost, op, "grad", "cost");
  check_sizes(grad, cost.sizes(), op, "grad", "[B, n, m] (the plan's shape)");
  check_same_device(alphas, cost, op, "alphas", "cost");
  check_same_device(betas, cost, op, "betas", "cost");
  check_same_device(n_run, cost, op, "n_run", "cost");
  check_sizes(alphas, {S, nb, n}, op, "alphas", "[S, B, n] (S = 1 if implicit else n_iters)");
  check_sizes(betas, {S, nb, m}, op, "betas", "[S, B, m] (S = 1 if implicit else n_iters)");
  check_sizes(n_run, {nb}, op, "n_run", "[B]");
  TORCH_CHECK(alphas.scalar_type() == at::kFloat && betas.scalar_type() == at::kFloat, op,
              ": alphas and betas must be float32 (the forward's potentials), got ", alphas.scalar_type(), " and ",
              betas.scalar_type());
  TORCH_CHECK(n_run.scalar_type() == at::kInt, op, ": n_run must be int32, got ", n_run.scalar_type());
  const c10::cuda::CUDAGuard guard(cost.device());
  const auto fopt = cost.options().dtype(at::kFloat);
  at::Tensor grad_cost = need_cost ? at::empty({nb, n, m}, cost.options()) : cost.new_empty({0});
  at::Tensor dloga = at::zeros({nb, n}, fopt);
  at::Tensor dlogb = at::zeros({nb, m}, fopt);
  const at::Tensor g = grad.to(cost.scalar_type());
  const at::Tensor a_f = a.to(at::kFloat);
  const at::Tensor b_f = b.to(at::kFloat);
  const at::Tensor al = alphas.contiguous();
  const at::Tensor be = betas.contiguous();
  const at::Tensor nr = n_run.contiguous();
  dispatch_cost(cost.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    sinkhorn_bwd_launch<scalar_t>(g, cost, a_f, b_f, al, be, nr, epsilon, n_iters, implicit, need_cost, grad_cost,
                                  dloga, dlogb, op);
  });
  at::Tensor grad_a = need_a ? at::div(dloga, a_f).to(a.scalar_type()) : a.new_empty({0});
  at::Tensor grad_b = need_b ? at::div(dlogb, b_f).to(b.scalar_type()) : b.new_empty({0});
  return {grad_cost, grad_a, grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_loss_fwd_cuda(const at::Tensor& student,
                                                                                  const at::Tensor& teacher,
                                                                                  double temperature, double epsilon,
                                                                                  int64_t n_iters) {
  const char* op = "sinkhorn_loss_fwd_cuda";
  check_logits_pair(student, teacher, temperature, epsilon, op);
  TORCH_CHECK(n_iters >= 1 && n_iters <= std::numeric_limits<int32_t>::max(), op, ": n_iters must be >= 1, got ",
              n_iters);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto [zs, zt] = common_logits(student, teacher);
  const int64_t nb = zs.size(0);
  const auto fopt = zs.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, zs.options());
  at::Tensor D = at::empty({nb, nb}, fopt);
  at::Tensor U = at::empty({n_iters + 1, nb}, fopt);
  at::Tensor V = at::empty({n_iters + 1, nb}, fopt);
  dispatch_cost(zs.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    sinkd_fwd_launch<scalar_t>(zs, zt, temperature, epsilon, n_iters, loss, D, U, V, op);
  });
  return {loss.to(student.scalar_type()), D, U, V};
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_loss_bwd_cuda(const at::Tensor& grad, const at::Tensor& student,
                                                          const at::Tensor& teacher, const at::Tensor& cost,
                                                          const at::Tensor& u, const at::Tensor& v, double temperature,
                                                          double epsilon, bool need_student, bool need_teacher) {
  const char* op = "sinkhorn_loss_bwd_cuda";
  check_logits_pair(student, teacher, temperature, epsilon, op);
  const int64_t nb = student.size(0);
  check_same_device(grad, student, op, "grad", "student");
  TORCH_CHECK(grad.numel() == 1, op, ": grad must be the 0-dim gradient of the loss, got shape ", grad.sizes());
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&cost, "cost"}, {&u, "u"}, {&v, "v"}}) {
    check_same_device(*t, student, op, name, "student");
    TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32 (the forward's output), got ",
                t->scalar_type());
  }
  check_sizes(cost, {nb, nb}, op, "cost", "[B, B]");
  check_dim(u, 2, op, "u", "[L+1, B]");
  TORCH_CHECK(u.size(0) >= 2 && u.size(1) == nb, op, ": u must have shape [L+1, B] with L >= 1, got ", u.sizes());
  check_sizes(v, u.sizes(), op, "v", "[L+1, B] (u's shape)");
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor gs = student.new_empty({0});
  at::Tensor gt = teacher.new_empty({0});
  if (!need_student && !need_teacher) return {gs, gt};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto [zs, zt] = common_logits(student, teacher);
  const at::Tensor g = grad.reshape({}).to(at::kFloat).contiguous();
  const at::Tensor D = cost.contiguous(), U = u.contiguous(), V = v.contiguous();
  at::Tensor G = at::empty({nb, nb}, D.options());
  sinkd_cost_grad(g, D, U, V, epsilon, G, stream, op);
  dispatch_cost(zs.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    const at::Tensor lse2 = softmax_lse<scalar_t>(zs, zt, temperature, stream, op);
    if (need_student) gs = sinkd_side_grad<scalar_t, false>(zs, zt, lse2, G, temperature, stream, op).to(student.scalar_type());
    if (need_teacher) gt = sinkd_side_grad<scalar_t, true>(zt, zs, lse2, G, temperature, stream, op).to(teacher.scalar_type());
  });
  return {gs, gt};
}

}  // namespace kd_kernels
