// RKD distance loss (Park et al. 2019), forward and backward, on tensor-core Gram tiles.
// The math is docs/rkd.md (sections 1 and 4); the semantics are those of the PyTorch path
// kd_kernels/torch_impl/rkd.py. Functions (include/kd_ops.h, bound in kd_kernels.cpp):
//   rkd_distance_fwd_cuda(student, teacher, reduction, precision) -> (loss, mu_s, mu_t)
//   rkd_distance_bwd_cuda(grad, student, teacher, mu_s, mu_t, reduction, need_student, need_teacher,
//                         precision) -> (grad_student, grad_teacher)
//
// Forward. Per network, x~ = x − mean(x) (columns), s_i = |x~_i|², G = x~ x~ᵀ (tensor cores,
// include/pairwise_tiles.cuh), E_ij = s_i + s_j − 2 G_ij, and the near-duplicate rule (TAU = 2^-6):
//   near_ij := i ≠ j and E_ij < TAU (s_i + s_j)  ->  E_ij := Σ_k (x_ik − x_jk)² of the original rows (fp32).
//   d_ij = sqrt(max(E_ij, 1e-12)) (i ≠ j), d_ii = 0;  μ = Σ_{i≠j} d_ij / M, M = N(N − 1);
//   ℓ_ij = h(d_ij/μ_s − t_ij/μ_t) (h = smooth-L1, beta 1); mean = Σ ℓ / N², sum = Σ ℓ, none = ℓ [N, N].
// Backward. γ_ij = ∂L/∂ℓ_ij (grad/N², grad, grad[i, j]); h'_ij = clamp(d̂_ij − t̂_ij, −1, 1);
//   c̄_s = Σ h' γ d̂ / M, c̄_t = Σ h' γ t̂ / M  (pass "stats");
//   A^s_ij = (h'_ij (γ_ij + γ_ji) − 2 c̄_s) / (μ_s d_ij),  A^t_ij = −(h'_ij (γ_ij + γ_ji) − 2 c̄_t) / (μ_t t_ij)
//   on live pairs (i ≠ j, E_ij ≥ 1e-12; else 0);  ∂L/∂x_i = Σ_j A_ij (x_i − x_j), evaluated as
//   far pairs:  rowsum(A) x~_i − (A x~)_i   (A stored per row block, then a TF32 tensor-core GEMM);
//   near pairs: A_ij (x_i − x_j) from the original rows, added explicitly (A_ij := 0 in the GEMM),
//   since the Laplacian form would lose u·A_ij·|x| against the true A_ij·|x_i − x_j|.
//
// Passes: fwd = "sum" (μ partials per tile) + "loss"; bwd = "stats" (c̄ partials) + per row block
// ("A" tiles: A buffer, rowsum, explicit near terms) + Laplacian GEMM. Partials are per tile (no
// float atomics in the reductions: deterministic); the rowsum and near terms use relaxed atomicAdd.
// No host synchronisation anywhere: μ and c̄ stay on the device.
#include <ATen/Dispatch.h>
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
namespace wmma = nvcuda::wmma;

// What one launch of rkd_distance_tile_kernel computes (a runtime argument: one kernel per dtype
// and precision instead of four, for compile time; the branch is uniform per launch).
enum Mode : int { kModeSum = 0, kModeLoss = 1, kModeStats = 2, kModeA = 3 };

// Laplacian GEMM tile: 64 rows × 64 feature columns, j staged 16 at a time (2 TF32 k-steps).
constexpr int kLapKc = 16;
constexpr int kLapLdA = kLapKc + 4;   // A staging row stride (floats): multiple of 4, 32-byte aligned fragments
constexpr int kLapLdB = kTileM + 4;   // x~ staging row stride
// Rows per backward row block: the two A buffers hold 2^23 fp32 entries each (32 MB) at most.
constexpr int64_t kRowBlockElems = int64_t(1) << 23;

// One 64 × 64 tile of pairs (i in the row tile blockIdx.y of the row block starting at row0,
// j in tile blockIdx.x) of both networks; what it does with them is `mode` (see the top comment).
// Block: kTileThreads threads; thread t owns the pairs (r, c) = (t / 64 + 2 q, t % 64), q < 32, so
// a warp holds 32 consecutive columns of one row (coalesced stores, one warp sum per row segment).
template <typename scalar_t, bool kSplit>
__global__ void __launch_bounds__(kTileThreads, kMinBlocks)
    rkd_distance_tile_kernel(const scalar_t* __restrict__ xs,    // [n, ds] student rows (original)
                             const float* __restrict__ mean_s,   // [ds] student column means
                             const float* __restrict__ sq_s,     // [n] |x~_i|² (student)
                             int64_t ds,                         // student features
                             const scalar_t* __restrict__ xt,    // [n, dt] teacher rows (original)
                             const float* __restrict__ mean_t,   // [dt] teacher column means
                             const float* __restrict__ sq_t,     // [n] |y~_i|² (teacher)
                             int64_t dt,                         // teacher features
                             int64_t n,                          // rows N
                             int64_t row0,                       // first row of this launch's row block
                             int mode,                           // Mode
                             const float* __restrict__ mu,       // [2] μ_s, μ_t (modes loss, stats, A)
                             const float* __restrict__ cbar,     // [2] c̄_s, c̄_t (mode A)
                             const float* __restrict__ grad,     // [1] or [n, n] upstream grad (stats, A)
                             bool grad_full,                     // grad is [n, n] (reduction "none")
                             float gscale,                       // γ = gscale · grad (1/N² for "mean")
                             float* __restrict__ partial,        // [blocks, 2] per-tile sums (sum, loss, stats)
                             float* __restrict__ none_out,       // [n, n] ℓ (mode loss, "none"), or null
                             float* __restrict__ a_s,            // [rows, n] student A of the row block, or null
                             float* __restrict__ a_t,            // [rows, n] teacher A, or null
                             float* __restrict__ rowsum_s,       // [n] Σ_j far A^s_ij (atomic), or null
                             float* __restrict__ rowsum_t,       // [n] Σ_j far A^t_ij, or null
                             float* __restrict__ gacc_s,         // [n, ds] ∂L/∂x accumulator (near terms), or null
                             float* __restrict__ gacc_t) {       // [n, dt] ∂L/∂y accumulator, or null
  __shared__ tiles::GramStage<scalar_t> stage;
  __shared__ alignas(32) float g_s[kTileM * kGramLd];
  __shared__ alignas(32) float g_t[kTileM * kGramLd];
  __shared__ float red[kTileThreads / 32][2];
  const int64_t i0 = row0 + static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  tiles::gram_tile<scalar_t, kSplit>(xs, mean_s, n, ds, i0, j0, stage, g_s);
  tiles::gram_tile<scalar_t, kSplit>(xt, mean_t, n, dt, i0, j0, stage, g_t);

  const int tid = threadIdx.x;
  const int c = tid % kTileM;
  const int64_t j = j0 + c;
  float mu_s = 1.0f, mu_t = 1.0f;
  if (mode != kModeSum) {
    mu_s = mu[0];
    mu_t = mu[1];
  }
  const float gam0 = (mode >= kModeStats && !grad_full) ? grad[0] * gscale : 0.0f;
  float acc0 = 0.0f, acc1 = 0.0f;
  for (int q = 0; q < kTileM / 2; ++q) {
    const int r = tid / kTileM + 2 * q;
    const int64_t i = i0 + r;
    const bool valid = i < n && j < n;
    float dsv = 0.0f, dtv = 0.0f;
    bool live_s = false, live_t = false, near_s = false, near_t = false;
    if (valid && i != j) {
      const float es = pair_sqdist(xs, sq_s, ds, i, j, g_s[r * kGramLd + c], &near_s);
      const float et = pair_sqdist(xt, sq_t, dt, i, j, g_t[r * kGramLd + c], &near_t);
      live_s = es >= kSqClamp;
      live_t = et >= kSqClamp;
      dsv = sqrtf(fmaxf(es, kSqClamp));
      dtv = sqrtf(fmaxf(et, kSqClamp));
    }
    float as = 0.0f, at = 0.0f;  // far A entries of this pair (mode A)
    if (mode == kModeSum) {
      acc0 += dsv;
      acc1 += dtv;
    } else if (valid) {
      const float dh = dsv / mu_s;
      const float th = dtv / mu_t;
      if (mode == kModeLoss) {
        const float l = smooth_l1(dh - th);
        if (none_out != nullptr) none_out[i * n + j] = l;
        acc0 += l;
      } else {
        const float hp = smooth_l1_grad(dh - th);
        const float g_ij = grad_full ? grad[i * n + j] * gscale : gam0;
        if (mode == kModeStats) {
          acc0 += hp * g_ij * dh;
          acc1 += hp * g_ij * th;
        } else {  // kModeA
          const float g_ji = grad_full ? grad[j * n + i] * gscale : gam0;
          const float hg = hp * (g_ij + g_ji);
          if (a_s != nullptr) {
            const float v = live_s ? (hg - 2.0f * cbar[0]) / (mu_s * dsv) : 0.0f;
            if (near_s && v != 0.0f) {
              for (int64_t k = 0; k < ds; ++k)
                atomicAdd(gacc_s + i * ds + k,
                          v * (static_cast<float>(xs[i * ds + k]) - static_cast<float>(xs[j * ds + k])));
            }
            as = near_s ? 0.0f : v;
            a_s[(i - row0) * n + j] = as;
          }
          if (a_t != nullptr) {
            const float v = live_t ? -(hg - 2.0f * cbar[1]) / (mu_t * dtv) : 0.0f;
            if (near_t && v != 0.0f) {
              for (int64_t k = 0; k < dt; ++k)
                atomicAdd(gacc_t + i * dt + k,
                          v * (static_cast<float>(xt[i * dt + k]) - static_cast<float>(xt[j * dt + k])));
            }
            at = near_t ? 0.0f : v;
            a_t[(i - row0) * n + j] = at;
          }
        }
      }
    }
    if (mode == kModeA) {  // row sums of the far A over this warp's 32 columns (all lanes take part)
      as = warp_sum(as);
      at = warp_sum(at);
      if (tid % 32 == 0 && i < n) {
        if (rowsum_s != nullptr) atomicAdd(rowsum_s + i, as);
        if (rowsum_t != nullptr) atomicAdd(rowsum_t + i, at);
      }
    }
  }
  if (mode == kModeA) return;
  acc0 = warp_sum(acc0);
  acc1 = warp_sum(acc1);
  if (tid % 32 == 0) {
    red[tid / 32][0] = acc0;
    red[tid / 32][1] = acc1;
  }
  __syncthreads();
  if (tid == 0) {
    float t0 = 0.0f, t1 = 0.0f;
    for (int w = 0; w < kTileThreads / 32; ++w) {
      t0 += red[w][0];
      t1 += red[w][1];
    }
    const int64_t b = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
    partial[2 * b] = t0;
    partial[2 * b + 1] = t1;
  }
}

// Laplacian product of one row block on TF32 tensor cores:
//   gacc[i, k] += rowsum[i] · x~_ik − Σ_j A[i − row0, j] · x~_jk,   x~ = x − mean,
// for i in the block's 64 rows (tile blockIdx.y of the row block) and k in its 64 columns
// (blockIdx.x). kSplit: 3xTF32 (fp32 inputs under "tf32x3"), else one TF32 pass (A is fp32; for
// half/bf16 inputs TF32's 10-bit mantissa matches fp16's, with fp32's range for A ~ 1/d).
// Each gacc element belongs to one block of the launch: a plain read-modify-write.
template <typename scalar_t, bool kSplit>
__global__ void __launch_bounds__(kTileThreads, kMinBlocks)
    rkd_laplacian_kernel(const float* __restrict__ a,       // [rows, n] A of the row block (near pairs 0)
                         const float* __restrict__ rowsum,  // [n] Σ_j A_ij (far pairs)
                         const scalar_t* __restrict__ x,    // [n, d] original rows
                         const float* __restrict__ mean,    // [d] column means
                         int64_t n,                         // rows N
                         int64_t d,                         // features
                         int64_t row0,                      // first row of the row block
                         int64_t rows,                      // rows in the row block
                         float* __restrict__ gacc) {        // [n, d] in/out: ∂L/∂x accumulator (fp32)
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  __shared__ alignas(32) float sa[kTileM * kLapLdA];   // A[i, j0..j0+16]
  __shared__ alignas(32) float sb[kLapKc * kLapLdB];   // x~[j0..j0+16, k]
  __shared__ alignas(32) float sc[kTileM * kGramLd];   // the product tile
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wr = (warp / 2) * 32;
  const int wc = (warp % 2) * 32;
  const int64_t il0 = static_cast<int64_t>(blockIdx.y) * kTileM;  // first local row
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kTileM;   // first feature column
  Acc acc[2][2];
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int c = 0; c < 2; ++c) wmma::fill_fragment(acc[r][c], 0.0f);
  for (int64_t jc = 0; jc < n; jc += kLapKc) {
    for (int l = tid; l < kTileM * kLapKc; l += kTileThreads) {
      const int r = l / kLapKc;
      const int jj = l % kLapKc;
      const int64_t il = il0 + r;
      const int64_t j = jc + jj;
      sa[r * kLapLdA + jj] = (il < rows && j < n) ? a[il * n + j] : 0.0f;
    }
    for (int l = tid; l < kLapKc * kTileM; l += kTileThreads) {
      const int jj = l / kTileM;
      const int kk = l % kTileM;
      const int64_t j = jc + jj;
      const int64_t k = k0 + kk;
      sb[jj * kLapLdB + kk] = (j < n && k < d) ? static_cast<float>(x[j * d + k]) - mean[k] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kLapKc; kk += 8) {
      FragA a_hi[2], a_lo[2];
      FragB b_hi[2], b_lo[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        wmma::load_matrix_sync(a_hi[r], sa + (wr + 16 * r) * kLapLdA + kk, kLapLdA);
        tiles::MmaStep<float, kSplit>::split(a_hi[r], a_lo[r]);
      }
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        wmma::load_matrix_sync(b_hi[c], sb + kk * kLapLdB + wc + 16 * c, kLapLdB);
        tiles::MmaStep<float, kSplit>::split(b_hi[c], b_lo[c]);
      }
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          if (kSplit) {
            wmma::mma_sync(acc[r][c], a_lo[r], b_hi[c], acc[r][c]);
            wmma::mma_sync(acc[r][c], a_hi[r], b_lo[c], acc[r][c]);
          }
          wmma::mma_sync(acc[r][c], a_hi[r], b_hi[c], acc[r][c]);
        }
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int c = 0; c < 2; ++c)
      wmma::store_matrix_sync(sc + (wr + 16 * r) * kGramLd + wc + 16 * c, acc[r][c], kGramLd, wmma::mem_row_major);
  __syncthreads();
  for (int l = tid; l < kTileM * kTileM; l += kTileThreads) {
    const int r = l / kTileM;
    const int kk = l % kTileM;
    const int64_t il = il0 + r;
    const int64_t k = k0 + kk;
    if (il < rows && k < d) {
      const int64_t i = row0 + il;
      const float xc = static_cast<float>(x[i * d + k]) - mean[k];
      gacc[i * d + k] += rowsum[i] * xc - sc[r * kGramLd + kk];
    }
  }
}

// Launch the tile kernel of the dtype / precision at hand.
struct TileArgs {
  const RkdPrep* s;
  const RkdPrep* t;
  int64_t row0;
  int mode;
  const float* mu;
  const float* cbar;
  const float* grad;
  bool grad_full;
  float gscale;
  float* partial;
  float* none_out;
  float* a_s;
  float* a_t;
  float* rowsum_s;
  float* rowsum_t;
  float* gacc_s;
  float* gacc_t;
};

template <typename scalar_t, bool kSplit>
void launch_tile(const TileArgs& p, dim3 grid, cudaStream_t stream) {
  rkd_distance_tile_kernel<scalar_t, kSplit><<<grid, kTileThreads, 0, stream>>>(
      p.s->x.data_ptr<scalar_t>(), p.s->mean.data_ptr<float>(), p.s->sq.data_ptr<float>(), p.s->d,
      p.t->x.data_ptr<scalar_t>(), p.t->mean.data_ptr<float>(), p.t->sq.data_ptr<float>(), p.t->d, p.s->n, p.row0,
      p.mode, p.mu, p.cbar, p.grad, p.grad_full, p.gscale, p.partial, p.none_out, p.a_s, p.a_t, p.rowsum_s,
      p.rowsum_t, p.gacc_s, p.gacc_t);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void tile_pass(const TileArgs& p, bool split, dim3 grid) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  KD_DISPATCH_RKD_TYPES(p.s->x.scalar_type(), "rkd_distance_tile", [&] {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (split) {
        launch_tile<float, true>(p, grid, stream);
      } else {
        launch_tile<float, false>(p, grid, stream);
      }
    } else {
      launch_tile<scalar_t, false>(p, grid, stream);
    }
  });
}

}  // namespace

void rkd_laplacian_pass(const at::Tensor& a, const at::Tensor& rowsum, const at::Tensor& x, const at::Tensor& mean,
                        int64_t row0, int64_t rows, bool split, at::Tensor& gacc) {
  const int64_t n = x.size(0);
  const int64_t d = x.size(1);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned int>(ceil_div(d, kTileM)), static_cast<unsigned int>(ceil_div(rows, kTileM)));
  KD_DISPATCH_RKD_TYPES(x.scalar_type(), "rkd_laplacian", [&] {
    auto launch = [&](auto split_tag) {  // 3xTF32 exists for fp32 inputs only (no dead instantiations)
      constexpr bool kSplit = decltype(split_tag)::value && std::is_same_v<scalar_t, float>;
      rkd_laplacian_kernel<scalar_t, kSplit><<<grid, kTileThreads, 0, stream>>>(
          a.data_ptr<float>(), rowsum.data_ptr<float>(), x.data_ptr<scalar_t>(), mean.data_ptr<float>(), n, d, row0,
          rows, gacc.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (split) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
  });
}

namespace {

dim3 pair_grid(int64_t col_tiles, int64_t row_tiles, const char* op) {
  TORCH_CHECK(row_tiles <= 65535, op, ": N is too large for the tile grid (at most 65535 row tiles of ", kTileM,
              " rows)");
  return dim3(static_cast<unsigned int>(col_tiles), static_cast<unsigned int>(row_tiles));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> rkd_distance_fwd_cuda(const at::Tensor& student,
                                                                      const at::Tensor& teacher,
                                                                      const std::string& reduction,
                                                                      const std::string& precision) {
  constexpr const char* op = "rkd_distance_fwd_cuda";
  check_rkd_pair(student, teacher, op, 2);
  const Reduction red = parse_reduction(reduction, op);
  const bool split = parse_precision(precision, op);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor xs, xt;
  std::tie(xs, xt) = rkd_inputs(student, teacher);
  const RkdPrep s = rkd_prepare(xs);
  const RkdPrep t = rkd_prepare(xt);
  const int64_t n = s.n;
  const int64_t tn = ceil_div(n, kTileM);
  const dim3 grid = pair_grid(tn, tn, op);
  const auto f32 = xs.options().dtype(at::kFloat);
  const double m = static_cast<double>(n) * static_cast<double>(n - 1);
  at::Tensor partial = at::empty({tn * tn, 2}, f32);
  TileArgs p{&s, &t, 0, kModeSum, nullptr, nullptr, nullptr, false, 1.0f, partial.data_ptr<float>(),
             nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  tile_pass(p, split, grid);
  // [2] μ_s, μ_t on the device; NaN for a non-finite input (then the loss and, through the saved
  // μ, both gradients are NaN)
  const at::Tensor mu = (partial.sum(0) / m + at::stack({nan_carrier(xs), nan_carrier(xt)})).contiguous();
  at::Tensor none_out = red == Reduction::kNone ? at::empty({n, n}, f32) : at::Tensor();
  at::Tensor loss_partial = at::empty({tn * tn, 2}, f32);
  p.mode = kModeLoss;
  p.mu = mu.data_ptr<float>();
  p.partial = loss_partial.data_ptr<float>();
  p.none_out = none_out.defined() ? none_out.data_ptr<float>() : nullptr;
  tile_pass(p, split, grid);
  at::Tensor loss;
  if (red == Reduction::kNone) {
    loss = none_out;
  } else {
    loss = loss_partial.select(1, 0).sum();
    if (red == Reduction::kMean) loss = loss / (static_cast<double>(n) * static_cast<double>(n));
  }
  return {loss.to(student.scalar_type()), mu.select(0, 0).clone(), mu.select(0, 1).clone()};
}

std::tuple<at::Tensor, at::Tensor> rkd_distance_bwd_cuda(const at::Tensor& grad, const at::Tensor& student,
                                                         const at::Tensor& teacher, const at::Tensor& mu_s,
                                                         const at::Tensor& mu_t, const std::string& reduction,
                                                         bool need_student, bool need_teacher,
                                                         const std::string& precision) {
  constexpr const char* op = "rkd_distance_bwd_cuda";
  check_rkd_pair(student, teacher, op, 2);
  const Reduction red = parse_reduction(reduction, op);
  const bool split = parse_precision(precision, op);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor grad_student = at::empty({0}, student.options());
  at::Tensor grad_teacher = at::empty({0}, teacher.options());
  if (!need_student && !need_teacher) return {grad_student, grad_teacher};
  check_same_device(mu_s, student, op, "mu_s", "student");
  check_same_device(mu_t, student, op, "mu_t", "student");
  TORCH_CHECK(mu_s.numel() == 1 && mu_t.numel() == 1, op, ": mu_s and mu_t must have one element, got shapes ",
              mu_s.sizes(), " and ", mu_t.sizes());
  at::Tensor xs, xt;
  std::tie(xs, xt) = rkd_inputs(student, teacher);
  const RkdPrep s = rkd_prepare(xs);
  const RkdPrep t = rkd_prepare(xt);
  const int64_t n = s.n;
  const int64_t tn = ceil_div(n, kTileM);
  const auto f32 = xs.options().dtype(at::kFloat);
  const bool none = red == Reduction::kNone;
  const at::Tensor g = rkd_upstream_grad(grad, student, {n, n}, none, op);
  const float gscale = red == Reduction::kMean ? static_cast<float>(1.0 / (static_cast<double>(n) * n)) : 1.0f;
  const at::Tensor mu = at::stack({mu_s.reshape({}), mu_t.reshape({})}).to(at::kFloat).contiguous();
  const double m = static_cast<double>(n) * static_cast<double>(n - 1);

  at::Tensor partial = at::empty({tn * tn, 2}, f32);
  TileArgs p{&s, &t, 0, kModeStats, mu.data_ptr<float>(), nullptr, g.data_ptr<float>(), none, gscale,
             partial.data_ptr<float>(), nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  tile_pass(p, split, pair_grid(tn, tn, op));
  const at::Tensor cbar = (partial.sum(0) / m).contiguous();  // [2] c̄_s, c̄_t

  // Row blocks of R rows (a multiple of the tile): A buffers [R, N] of at most kRowBlockElems each.
  const int64_t rb = std::min(ceil_div(n, kTileM) * kTileM, std::max<int64_t>(kTileM, kRowBlockElems / n / kTileM * kTileM));
  at::Tensor gacc_s = need_student ? at::zeros({n, s.d}, f32) : at::Tensor();
  at::Tensor gacc_t = need_teacher ? at::zeros({n, t.d}, f32) : at::Tensor();
  at::Tensor rowsum_s = need_student ? at::zeros({n}, f32) : at::Tensor();
  at::Tensor rowsum_t = need_teacher ? at::zeros({n}, f32) : at::Tensor();
  at::Tensor a_s = need_student ? at::empty({rb, n}, f32) : at::Tensor();
  at::Tensor a_t = need_teacher ? at::empty({rb, n}, f32) : at::Tensor();
  p.mode = kModeA;
  p.cbar = cbar.data_ptr<float>();
  p.partial = nullptr;
  p.a_s = need_student ? a_s.data_ptr<float>() : nullptr;
  p.a_t = need_teacher ? a_t.data_ptr<float>() : nullptr;
  p.rowsum_s = need_student ? rowsum_s.data_ptr<float>() : nullptr;
  p.rowsum_t = need_teacher ? rowsum_t.data_ptr<float>() : nullptr;
  p.gacc_s = need_student ? gacc_s.data_ptr<float>() : nullptr;
  p.gacc_t = need_teacher ? gacc_t.data_ptr<float>() : nullptr;
  for (int64_t row0 = 0; row0 < n; row0 += rb) {
    const int64_t rows = std::min(rb, n - row0);
    p.row0 = row0;
    tile_pass(p, split, pair_grid(tn, ceil_div(rows, kTileM), op));
    // rowsum of a row block is complete after its A pass (its rows see every j tile)
    if (need_student) rkd_laplacian_pass(a_s, rowsum_s, s.x, s.mean, row0, rows, split, gacc_s);
    if (need_teacher) rkd_laplacian_pass(a_t, rowsum_t, t.x, t.mean, row0, rows, split, gacc_t);
  }
  const at::Tensor carrier = mu.sum().mul(0.0);  // NaN when the forward's μ was (non-finite input)
  if (need_student) grad_student = (gacc_s + carrier).to(student.scalar_type());
  if (need_teacher) grad_teacher = (gacc_t + carrier).to(teacher.scalar_type());
  return {grad_student, grad_teacher};
}

}  // namespace kd_kernels
