// Feature-geometry losses (gram, CKA, relation, Procrustes): the streaming primitives of the D x D
// form on WMMA tensor-core tiles. The math is docs/geometry.md and the module docstring of
// kd_kernels/torch_impl/geometry.py; the design (and the D x D epilogue, shared Python code) is that
// of the Triton kernels in kd_kernels/triton/geometry.py, whose launchers `_products`, `_grad_gemm`
// and `_row_sq` these functions mirror argument for argument. Functions (include/kd_ops.h, bound in
// kd_kernels.cpp; an empty tensor (numel 0) stands for Python's None):
//   geometry_products_cuda(x, y, w, rinv_x, rinv_y, shift_x, shift_y, precision)
//       -> (XᵀWX, XᵀWY, YᵀWY, Σ w x', Σ w y', Σ w)          (fp32; x' = (x − c_x) · rinv_x)
//   geometry_grad_cuda(a, v, w, ra, rv, p, q, mu_a, mu_v, out_f32, precision)
//       -> W ((A − 1μ_aᵀ) P + (V − 1μ_vᵀ) Q)                 ([B, N, Dout])
//   geometry_row_sq_cuda(x, w, mu) -> w_i ‖x_i − μ‖²          ([B, N] fp32)
// The small D x D epilogues (h, the loss, the chain-rule matrices P'', Q'', Procrustes' polar factor)
// are torch ops on device tensors in kd_kernels/triton/geometry.py / kd_kernels/ops/geometry_cuda.py
// (no host sync); those files call these primitives through their `prims=` argument.
//
// Why WMMA tiles and not a CUTLASS device GEMM: every fusion of these passes sits in the operand
// loads (the 0/1 row mask, the per-item shift of the rank-1 centring, the row scaling 1/r_i of
// relation, the centring of the backward's operands), and the products kernel also folds the column
// sums and the kept-row count into the same loads. A stock CUTLASS device GEMM reads its operands
// as stored; expressing these as custom iterators / visitor prologues is much more code (and compile
// time) than the staging loop below, which reuses the MmaStep fragments (bf16/fp16 native, fp32
// 3xTF32 or TF32) of include/pairwise_tiles.cuh that the RKD kernels already use.
//
// geometry_products_kernel. Grid (output tiles of the three products, split-K blocks over N, B).
//   A block owns one 64 x 64 tile (i, j) of one product M ∈ {XᵀWX, XᵀWY, YᵀWY} and the rows
//   [r_begin, r_end) of its split; 4 warps of 32 x 32 (2 x 2 fragments of 16 x 16). Per step it
//   stages kProdRows rows of both operands column-major for the MMA ([row][feature]: the reduction
//   index is the staged row), applying (a − c) · f_r in fp32 (c: shift, f_r = w_r or w_r / r_r),
//   rounded to the MMA input type, and adds M[i, j] += Σ_r a_r[i] b_r[j]. The fp32 partial tile
//   goes to global memory with atomicAdd (relaxed: a RED.ADD.F32, no ordering) into zeroed buffers.
//   Blocks with j = 0 of XᵀX / YᵀY also sum their staged column (Σ w x'), block (0, 0) of XᵀX the
//   kept-row count. Masked rows are read and multiplied by 0, not skipped: a NaN/inf there still
//   reaches the loss, as x · w on the torch path (README "Non-finite input").
//   MMA types: fp16/bf16 rows in their dtype (masking is exact; a shift is only passed for fp32);
//   with row scaling the scaled rows are fp32 (3xTF32 / TF32 by `precision`), as the Triton kernel.
// geometry_grad_kernel. Grid (row tiles of 64, output column tiles of 64, B). out[r, c] =
//   w_r (Σ_k a'_r[k] P[k, c] + Σ_k v'_r[k] Q[k, c]) with a' = (a − μ_a) · ra (centred / scaled in the
//   loads, so the centring term u = Pᵀμ_a + Qᵀμ_v never forms and cannot cancel), staged in fp32
//   (P, Q are fp32: 3xTF32 / TF32 keeps P's accuracy for every input dtype). Masked rows stage 0 and
//   the result is multiplied by w_r (NaN statistics stay NaN in masked rows, as torch).
// geometry_row_sq_kernel. One warp per row, fp32 sums over the features.
//
// Deviations from the Triton kernels: none in the math; the full (not triangular) XᵀX / YᵀY tiles
// are computed, as there. N x N form (N <= max(Ds, Dt)): the torch path (kd_kernels/ops/geometry_cuda.py).
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>

#include "checks.h"
#include "kd_ops.h"
#include "pairwise_tiles.cuh"

namespace kd_kernels {
namespace {

// A staged MMA operand back in fp32 (the build defines __CUDA_NO_HALF_CONVERSIONS__: explicit calls).
__device__ __forceinline__ float stage_to_float(float v) { return v; }
__device__ __forceinline__ float stage_to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float stage_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }


namespace wmma = nvcuda::wmma;
using tiles::kGramLd;
using tiles::kTileM;
using tiles::kTileThreads;

// float32 / float16 / bfloat16 only: float64 runs on the PyTorch path (fewer kernels to compile).
#define KD_DISPATCH_GEOMETRY_TYPES(TYPE, NAME, ...)                               \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)       \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Rows staged per step of the products kernel (its reduction chunk): 4 TF32 / 2 fp16 k-steps between
// two __syncthreads, and exactly one warp computes the chunk's row factors and kept-row count.
constexpr int kProdRows = 32;
static_assert(kProdRows == 32, "warp 0 computes a chunk's row factors and counts its kept rows");
static_assert(kTileThreads % kTileM == 0 && kTileThreads / kTileM == 2, "2 staging threads per tile column");
// Row stride of a tile staged [row][64 features] (products: both operands; backward: P and Q):
// a multiple of 8 elements (16-byte WMMA rows for fp16), and 8 extra words against bank conflicts.
constexpr int kLdFeat = kTileM + 8;
// Features (the backward's k) staged per step of the backward kernel: 4 TF32 k-steps per sync pair,
// 128-byte fp32 row segments per load.
constexpr int kGradK = 32;
static_assert(kTileThreads % kGradK == 0, "each backward staging thread keeps one feature column");
constexpr int kLdGradA = kGradK + 4;  // backward row tile stride (floats): multiple of 4, 32-byte aligned fragments
// Minimum resident blocks per SM in __launch_bounds__: 1 lets ptxas use the registers it needs (<= 255)
// instead of its occupancy heuristic's cap (which spilled in the RKD kernels, include/rkd_common.cuh).
constexpr int kMinBlocks = 1;
// Split-K target of the products kernel: about two waves of blocks per SM (as the Triton launcher's
// 264 programs on a 132-SM H100).
constexpr int kWavesPerSm = 2;
constexpr int kRowSqWarps = 8;  // rows per block of the row pass (one warp each)

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// true: 3xTF32 for fp32 products ("tf32x3", the default policy); false: one TF32 pass ("tf32").
inline bool parse_precision(const std::string& precision, const char* op) {
  TORCH_CHECK(precision == "tf32x3" || precision == "tf32", op, ": precision must be 'tf32x3' or 'tf32', got '",
              precision, "'");
  return precision == "tf32x3";
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Shared memory of the products kernel, as raw words: the two staged operand tiles (kProdRows rows of
// 64 features in the MMA type) during the loop, then the fp32 64 x 64 result tile (kGramLd stride).
constexpr int kProdStageWords = 2 * kProdRows * kLdFeat;  // fp32 staging, the largest case
constexpr int kProdSmemWords = kProdStageWords > kTileM * kGramLd ? kProdStageWords : kTileM * kGramLd;

template <typename scalar_t, typename mma_t, bool kSplit>
__global__ void __launch_bounds__(kTileThreads, kMinBlocks)
    geometry_products_kernel(const scalar_t* __restrict__ x,     // [B, N, Ds] student (unit column stride)
                             const scalar_t* __restrict__ y,     // [B, N, Dt] teacher (x's dtype)
                             const int8_t* __restrict__ w,       // [B, N] 0/1 row mask, or null (all rows)
                             const float* __restrict__ rinv_x,   // [B, N] 1 / r_x row scales, or null
                             const float* __restrict__ rinv_y,   // [B, N] 1 / r_y (null iff rinv_x is)
                             const float* __restrict__ shift_x,  // [B, Ds] per-item shift c_x, or null
                             const float* __restrict__ shift_y,  // [B, Dt] shift c_y (null iff shift_x is)
                             float* __restrict__ mxx,            // [B, Ds, Ds] zeroed out: Σ w x' x'ᵀ
                             float* __restrict__ mxy,            // [B, Ds, Dt] zeroed out: Σ w x' y'ᵀ
                             float* __restrict__ myy,            // [B, Dt, Dt] zeroed out: Σ w y' y'ᵀ
                             float* __restrict__ csx,            // [B, Ds] zeroed out: Σ w x'
                             float* __restrict__ csy,            // [B, Dt] zeroed out: Σ w y'
                             float* __restrict__ cnt,            // [B] zeroed out: Σ w
                             int64_t n,                          // rows N
                             int64_t ds,                         // student features Ds
                             int64_t dt,                         // teacher features Dt
                             int64_t sxb,                        // x batch stride (elements)
                             int64_t sxn,                        // x row stride
                             int64_t syb,                        // y batch stride
                             int64_t syn,                        // y row stride
                             int64_t rows_per_split) {           // rows per split-K block (multiple of kProdRows)
  using T = tiles::MmaTraits<mma_t>;
  using Stage = typename T::stage_t;
  using Step = tiles::MmaStep<mma_t, kSplit, wmma::col_major, wmma::row_major>;
  __shared__ alignas(32) float smem[kProdSmemWords];
  __shared__ float fac_a[kProdRows];  // row factors of the chunk: w_r (· 1 / r_r), 0 past r_end
  __shared__ float fac_c[kProdRows];
  __shared__ float col_red[kTileThreads];
  Stage* sa = reinterpret_cast<Stage*>(smem);
  Stage* sc = sa + kProdRows * kLdFeat;

  // decode the product and the tile: [0, ts²) XᵀX, [ts², ts² + ts·tt) XᵀY, then YᵀY (uniform per block)
  const int64_t ts = ceil_div(ds, kTileM);
  const int64_t tt = ceil_div(dt, kTileM);
  int64_t q = blockIdx.x;
  int which = 0;
  if (q >= ts * ts + ts * tt) {
    which = 2;
    q -= ts * ts + ts * tt;
  } else if (q >= ts * ts) {
    which = 1;
    q -= ts * ts;
  }
  const bool a_y = which == 2;  // left operand is y
  const bool c_y = which >= 1;  // right operand is y
  const int64_t ncol = c_y ? tt : ts;
  const int64_t i0 = (q / ncol) * kTileM;
  const int64_t j0 = (q % ncol) * kTileM;
  const int64_t da = a_y ? dt : ds;
  const int64_t dc = c_y ? dt : ds;
  const int64_t b = blockIdx.z;
  const scalar_t* A = a_y ? y + b * syb : x + b * sxb;
  const scalar_t* C = c_y ? y + b * syb : x + b * sxb;
  const int64_t san = a_y ? syn : sxn;
  const int64_t scn = c_y ? syn : sxn;
  const bool row_scale = rinv_x != nullptr;
  const bool has_shift = shift_x != nullptr;
  const float* ra = row_scale ? (a_y ? rinv_y : rinv_x) + b * n : nullptr;
  const float* rc = row_scale ? (c_y ? rinv_y : rinv_x) + b * n : nullptr;
  const int8_t* wb = w != nullptr ? w + b * n : nullptr;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wr = (warp / 2) * 32;  // the warp's first row (i) / column (j) inside the tile
  const int wc = (warp % 2) * 32;
  const int col = tid % kTileM;  // this thread's staged feature column (fixed: 128 threads, 64 columns)
  const int64_t gi = i0 + col;
  const int64_t gj = j0 + col;
  const bool in_i = gi < da;
  const bool in_j = gj < dc;
  const float sh_a = (has_shift && in_i) ? (a_y ? shift_y + b * dt : shift_x + b * ds)[gi] : 0.0f;
  const float sh_c = (has_shift && in_j) ? (c_y ? shift_y + b * dt : shift_x + b * ds)[gj] : 0.0f;

  typename Step::Acc acc[2][2];
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int c = 0; c < 2; ++c) wmma::fill_fragment(acc[r][c], 0.0f);
  float col_sum = 0.0f;  // Σ of this thread's staged a values (its column, half of the rows)
  float kept = 0.0f;     // kept rows seen by this thread (tid < kProdRows)

  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r_end = std::min(r_begin + rows_per_split, n);
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kProdRows) {
    if (tid < kProdRows) {
      const int64_t r = r0 + tid;
      const bool keep = r < r_end && (wb == nullptr || wb[r] != 0);
      fac_a[tid] = keep ? (row_scale ? ra[r] : 1.0f) : 0.0f;
      fac_c[tid] = keep ? (row_scale ? rc[r] : 1.0f) : 0.0f;
      kept += keep ? 1.0f : 0.0f;
    }
    __syncthreads();
    // consecutive threads read consecutive features of one row (coalesced); rows past r_end and
    // features past D stage as 0; masked rows as value · 0 (NaN stays NaN)
#pragma unroll 4
    for (int rr = tid / kTileM; rr < kProdRows; rr += kTileThreads / kTileM) {
      const int64_t r = r0 + rr;
      const bool in_r = r < r_end;
      const float va = (in_r && in_i) ? (static_cast<float>(A[r * san + gi]) - sh_a) * fac_a[rr] : 0.0f;
      const float vc = (in_r && in_j) ? (static_cast<float>(C[r * scn + gj]) - sh_c) * fac_c[rr] : 0.0f;
      const Stage ta = T::round(va);
      sa[rr * kLdFeat + col] = ta;
      sc[rr * kLdFeat + col] = T::round(vc);
      col_sum += stage_to_float(ta);  // the operand as multiplied (the Triton kernel's cs)
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kProdRows; kk += T::kK) Step::run_ld(sa, kLdFeat, sc, kLdFeat, wr, wc, kk, acc);
    __syncthreads();  // the next chunk overwrites the staging and the row factors
  }

  // epilogue: the partial tile through shared memory (it aliases the staging, free after the last sync)
  float* out = smem;
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int c = 0; c < 2; ++c)
      wmma::store_matrix_sync(out + (wr + 16 * r) * kGramLd + wc + 16 * c, acc[r][c], kGramLd, wmma::mem_row_major);
  col_red[tid] = col_sum;
  __syncthreads();
  float* m = (which == 0 ? mxx : which == 1 ? mxy : myy) + b * da * dc;
  for (int l = tid; l < kTileM * kTileM; l += kTileThreads) {
    const int r = l / kTileM;
    const int c = l % kTileM;
    if (i0 + r < da && j0 + c < dc) atomicAdd(m + (i0 + r) * dc + j0 + c, out[r * kGramLd + c]);
  }
  if (which != 1 && j0 == 0 && tid < kTileM && in_i)
    atomicAdd((a_y ? csy + b * dt : csx + b * ds) + gi, col_red[tid] + col_red[tid + kTileM]);
  if (which == 0 && i0 == 0 && j0 == 0 && warp == 0) {  // kProdRows == 32: warp 0 saw every row factor
    kept = warp_sum(kept);
    if (tid == 0) atomicAdd(cnt + b, kept);
  }
}

// Shared memory of the backward kernel: the staged row tile [64][kGradK] and matrix tile [kGradK][64]
// (fp32) during the loop, then the fp32 64 x 64 result tile.
constexpr int kGradStageWords = kTileM * kLdGradA + kGradK * kLdFeat;
constexpr int kGradSmemWords = kGradStageWords > kTileM * kGramLd ? kGradStageWords : kTileM * kGramLd;

// acc += (Z − 1μᵀ)[rows, :] · Pm[:, cols] over the d features of one operand, staged in fp32.
template <typename scalar_t, bool kSplit>
__device__ __forceinline__ void grad_operand_pass(
    const scalar_t* __restrict__ z, int64_t szn, int64_t szd, int64_t d, const float* __restrict__ mu,
    const float* __restrict__ pm, int64_t dout, int64_t c0, const float* fac, const bool* keep, int64_t rows_left,
    float* sa, float* sp, int wr, int wc,
    typename tiles::MmaStep<float, kSplit, wmma::row_major, wmma::row_major>::Acc (&acc)[2][2]) {
  using Step = tiles::MmaStep<float, kSplit, wmma::row_major, wmma::row_major>;
  const int tid = threadIdx.x;
  for (int64_t k0 = 0; k0 < d; k0 += kGradK) {
    {
      const int kk = tid % kGradK;  // fixed per thread (kTileThreads is a multiple of kGradK)
      const int64_t k = k0 + kk;
      const bool in_k = k < d;
      const float mk = (mu != nullptr && in_k) ? mu[k] : 0.0f;
#pragma unroll 4
      for (int r = tid / kGradK; r < kTileM; r += kTileThreads / kGradK) {
        const bool ok = r < rows_left && keep[r] && in_k;
        sa[r * kLdGradA + kk] = ok ? (static_cast<float>(z[r * szn + k * szd]) - mk) * fac[r] : 0.0f;
      }
    }
#pragma unroll 4
    for (int l = tid; l < kGradK * kTileM; l += kTileThreads) {
      const int kk = l / kTileM;
      const int c = l % kTileM;
      const int64_t k = k0 + kk;
      sp[kk * kLdFeat + c] = (k < d && c0 + c < dout) ? pm[k * dout + c0 + c] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kGradK; kk += 8) Step::run_ld(sa, kLdGradA, sp, kLdFeat, wr, wc, kk, acc);
    __syncthreads();
  }
}

template <typename scalar_t, bool kSplit>
__global__ void __launch_bounds__(kTileThreads, kMinBlocks)
    geometry_grad_kernel(const scalar_t* __restrict__ a,     // [B, N, Da] rows multiplied by P
                         const scalar_t* __restrict__ v,     // [B, N, Dv] rows multiplied by Q (a's dtype)
                         const int8_t* __restrict__ w,       // [B, N] 0/1 row mask, or null
                         const float* __restrict__ ra,       // [B, N] row scales of a, or null (1)
                         const float* __restrict__ rv,       // [B, N] row scales of v, or null (1)
                         const float* __restrict__ p,        // [B, Da, Dout] fp32 contiguous
                         const float* __restrict__ qm,       // [B, Dv, Dout] fp32 contiguous
                         const float* __restrict__ mu_a,     // [B, Da] column means of a, or null (no centring)
                         const float* __restrict__ mu_v,     // [B, Dv] column means of v, or null
                         void* __restrict__ out,             // [B, N, Dout] contiguous, fp32 or scalar_t
                         bool out_f32,                       // out is fp32 (else scalar_t)
                         int64_t n,                          // rows N
                         int64_t da,                         // features of a
                         int64_t dv,                         // features of v
                         int64_t dout,                       // output columns
                         int64_t sab, int64_t san, int64_t sad,    // a strides (batch, row, feature)
                         int64_t svb, int64_t svn, int64_t svd) {  // v strides
  using Step = tiles::MmaStep<float, kSplit, wmma::row_major, wmma::row_major>;
  __shared__ alignas(32) float smem[kGradSmemWords];
  __shared__ float fac_a[kTileM];  // row scales of the tile (1 without row scaling)
  __shared__ float fac_v[kTileM];
  __shared__ bool keep[kTileM];    // row kept (in bounds and unmasked)
  float* sa = smem;
  float* sp = smem + kTileM * kLdGradA;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wr = (warp / 2) * 32;
  const int wc = (warp % 2) * 32;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t b = blockIdx.z;
  const int64_t rows_left = n - r0;
  if (tid < kTileM) {
    const int64_t r = r0 + tid;
    const bool k = r < n && (w == nullptr || w[b * n + r] != 0);
    keep[tid] = k;
    fac_a[tid] = (k && ra != nullptr) ? ra[b * n + r] : 1.0f;
    fac_v[tid] = (k && rv != nullptr) ? rv[b * n + r] : 1.0f;
  }
  __syncthreads();
  typename Step::Acc acc[2][2];
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int c = 0; c < 2; ++c) wmma::fill_fragment(acc[r][c], 0.0f);
  grad_operand_pass<scalar_t, kSplit>(a + b * sab + r0 * san, san, sad, da, mu_a != nullptr ? mu_a + b * da : nullptr,
                                      p + b * da * dout, dout, c0, fac_a, keep, rows_left, sa, sp, wr, wc, acc);
  grad_operand_pass<scalar_t, kSplit>(v + b * svb + r0 * svn, svn, svd, dv, mu_v != nullptr ? mu_v + b * dv : nullptr,
                                      qm + b * dv * dout, dout, c0, fac_v, keep, rows_left, sa, sp, wr, wc, acc);
  float* res = smem;  // aliases the staging (free after the last pass's closing sync)
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int c = 0; c < 2; ++c)
      wmma::store_matrix_sync(res + (wr + 16 * r) * kGramLd + wc + 16 * c, acc[r][c], kGramLd, wmma::mem_row_major);
  __syncthreads();
  for (int l = tid; l < kTileM * kTileM; l += kTileThreads) {
    const int r = l / kTileM;
    const int c = l % kTileM;
    if (r < rows_left && c0 + c < dout) {
      const float val = res[r * kGramLd + c] * (keep[r] ? 1.0f : 0.0f);  // w ⊙ (…): NaN stays NaN
      const int64_t o = (b * n + r0 + r) * dout + c0 + c;
      if (out_f32) {
        static_cast<float*>(out)[o] = val;
      } else {
        static_cast<scalar_t*>(out)[o] = static_cast<scalar_t>(val);
      }
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRowSqWarps * 32)
    geometry_row_sq_kernel(const scalar_t* __restrict__ x,   // [B, N, D]
                           const int8_t* __restrict__ w,     // [B, N] 0/1 row mask, or null
                           const float* __restrict__ mu,     // [B, D] fp32 column means, or null
                           float* __restrict__ out,          // [B, N] out: w_i ‖x_i − μ‖² (0 on masked rows)
                           int64_t n,                        // rows N
                           int64_t d,                        // features D
                           int64_t sxb, int64_t sxn, int64_t sxd) {  // x strides
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowSqWarps + threadIdx.x / 32;
  const int64_t b = blockIdx.y;
  if (r >= n) return;  // whole warps leave together (r is uniform per warp)
  const bool keep = w == nullptr || w[b * n + r] != 0;
  float s = 0.0f;
  if (keep) {
    const scalar_t* xr = x + b * sxb + r * sxn;
    for (int64_t k = lane; k < d; k += 32) {
      const float v = static_cast<float>(xr[k * sxd]) - (mu != nullptr ? mu[b * d + k] : 0.0f);
      s = fmaf(v, v, s);
    }
  }
  s = warp_sum(s);
  if (lane == 0) out[b * n + r] = s;
}

// ---------------------------------------------------------------------------------- host side

// Optional tensors: numel 0 means "none" (Python's None).
inline bool given(const at::Tensor& t) { return t.defined() && t.numel() > 0; }

// x [B, N, D] on CUDA in float32 / float16 / bfloat16, with unit feature stride (else a contiguous copy).
at::Tensor rows_input(const at::Tensor& x, const char* op, const char* name) {
  check_cuda(x, op, name);
  check_floating(x, op, name);
  TORCH_CHECK(x.scalar_type() != at::kDouble, op, ": float64 inputs run on the PyTorch path "
              "(kd_kernels/torch_impl/geometry.py); the CUDA kernels take float32, float16 or bfloat16, got ",
              name, " ", x.scalar_type());
  check_dim(x, 3, op, name, "[B, N, D]");
  TORCH_CHECK(x.size(0) <= 65535, op, ": at most 65535 batch items (a grid dimension), got B = ", x.size(0));
  return x.stride(2) == 1 ? x : x.contiguous();
}

// The row mask as contiguous int8 0/1 [B, N], or an undefined tensor for none.
at::Tensor mask_input(const at::Tensor& w, const at::Tensor& x, const char* op) {
  if (!given(w)) return at::Tensor();
  check_same_device(w, x, op, "w", "x");
  check_sizes(w, {x.size(0), x.size(1)}, op, "w", "[B, N]");
  return w.scalar_type() == at::kChar ? w.contiguous() : w.ne(0).to(at::kChar).contiguous();
}

// An optional fp32 side input of the given sizes (contiguous), or an undefined tensor.
at::Tensor f32_input(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef sizes, const char* op,
                     const char* name, const char* shape) {
  if (!given(t)) return at::Tensor();
  check_same_device(t, x, op, name, "x");
  check_sizes(t, sizes, op, name, shape);
  return t.to(at::kFloat).contiguous();
}

template <typename T>
struct TypeTag {  // a type as a value (the MMA operand type of a launch)
  using type = T;
};

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> geometry_products_cuda(
    const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& w_in, const at::Tensor& rinv_x_in,
    const at::Tensor& rinv_y_in, const at::Tensor& shift_x_in, const at::Tensor& shift_y_in,
    const std::string& precision) {
  constexpr const char* op = "geometry_products_cuda";
  const bool split = parse_precision(precision, op);
  const at::Tensor x = rows_input(x_in, op, "x");
  const at::Tensor y = rows_input(y_in, op, "y");
  check_same_device(y, x, op, "y", "x");
  check_same_dtype(y, x, op, "y", "x");
  TORCH_CHECK(y.size(0) == x.size(0) && y.size(1) == x.size(1), op, ": y must have x's [B, N] = [", x.size(0), ", ",
              x.size(1), "], got ", y.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t bsz = x.size(0), n = x.size(1), ds = x.size(2), dt = y.size(2);
  TORCH_CHECK(given(rinv_x_in) == given(rinv_y_in), op, ": rinv_x and rinv_y must both be given or both be empty");
  TORCH_CHECK(given(shift_x_in) == given(shift_y_in), op, ": shift_x and shift_y must both be given or both be empty");
  const at::Tensor w = mask_input(w_in, x, op);
  const at::Tensor rinv_x = f32_input(rinv_x_in, x, {bsz, n}, op, "rinv_x", "[B, N]");
  const at::Tensor rinv_y = f32_input(rinv_y_in, x, {bsz, n}, op, "rinv_y", "[B, N]");
  const at::Tensor shift_x = f32_input(shift_x_in, x, {bsz, ds}, op, "shift_x", "[B, Ds]");
  const at::Tensor shift_y = f32_input(shift_y_in, x, {bsz, dt}, op, "shift_y", "[B, Dt]");
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor mxx = at::zeros({bsz, ds, ds}, f32), mxy = at::zeros({bsz, ds, dt}, f32),
             myy = at::zeros({bsz, dt, dt}, f32);
  at::Tensor csx = at::zeros({bsz, ds}, f32), csy = at::zeros({bsz, dt}, f32), cnt = at::zeros({bsz}, f32);
  const int64_t ts = ceil_div(ds, kTileM), tt = ceil_div(dt, kTileM);
  const int64_t tiles_n = ts * ts + ts * tt + tt * tt;
  if (bsz == 0 || n == 0 || tiles_n == 0) return {mxx, mxy, myy, csx, csy, cnt};
  // split-K: enough blocks for ~kWavesPerSm waves; each split a multiple of the staged chunk
  const int64_t target = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * kWavesPerSm;
  const int64_t splits = std::max<int64_t>(1, std::min(ceil_div(n, kProdRows), ceil_div(target, tiles_n * bsz)));
  const int64_t rows = ceil_div(ceil_div(n, splits), kProdRows) * kProdRows;
  const dim3 grid(static_cast<unsigned int>(tiles_n), static_cast<unsigned int>(ceil_div(n, rows)),
                  static_cast<unsigned int>(bsz));
  const bool row_scale = rinv_x.defined();
  auto stream = at::cuda::getCurrentCUDAStream();
  KD_DISPATCH_GEOMETRY_TYPES(x.scalar_type(), op, [&] {
    auto launch = [&](auto mma_tag, auto split_tag) {
      using mma_t = typename decltype(mma_tag)::type;
      // 3xTF32 exists for fp32 MMA operands only (no dead instantiations)
      constexpr bool kSplit = decltype(split_tag)::value && std::is_same_v<mma_t, float>;
      geometry_products_kernel<scalar_t, mma_t, kSplit><<<grid, kTileThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), ptr_or_null<int8_t>(w), ptr_or_null<float>(rinv_x),
          ptr_or_null<float>(rinv_y), ptr_or_null<float>(shift_x), ptr_or_null<float>(shift_y),
          mxx.data_ptr<float>(), mxy.data_ptr<float>(), myy.data_ptr<float>(), csx.data_ptr<float>(),
          csy.data_ptr<float>(), cnt.data_ptr<float>(), n, ds, dt, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
          rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    // fp16/bf16 rows are MMA operands in their dtype, unless scaled (relation): then fp32 rows
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (split) launch(TypeTag<float>{}, std::true_type{});
      else launch(TypeTag<float>{}, std::false_type{});
    } else {
      if (!row_scale) launch(TypeTag<scalar_t>{}, std::false_type{});
      else if (split) launch(TypeTag<float>{}, std::true_type{});
      else launch(TypeTag<float>{}, std::false_type{});
    }
  });
  return {mxx, mxy, myy, csx, csy, cnt};
}

at::Tensor geometry_grad_cuda(const at::Tensor& a_in, const at::Tensor& v_in, const at::Tensor& w_in,
                              const at::Tensor& ra_in, const at::Tensor& rv_in, const at::Tensor& p_in,
                              const at::Tensor& q_in, const at::Tensor& mu_a_in, const at::Tensor& mu_v_in,
                              bool out_f32, const std::string& precision) {
  constexpr const char* op = "geometry_grad_cuda";
  const bool split = parse_precision(precision, op);
  const at::Tensor a = rows_input(a_in, op, "a");
  const at::Tensor v = rows_input(v_in, op, "v");
  check_same_device(v, a, op, "v", "a");
  check_same_dtype(v, a, op, "v", "a");
  TORCH_CHECK(v.size(0) == a.size(0) && v.size(1) == a.size(1), op, ": v must have a's [B, N] = [", a.size(0), ", ",
              a.size(1), "], got ", v.sizes());
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t bsz = a.size(0), n = a.size(1), da = a.size(2), dv = v.size(2);
  check_same_device(p_in, a, op, "p", "a");
  check_same_device(q_in, a, op, "q", "a");
  check_dim(p_in, 3, op, "p", "[B, Da, Dout]");
  const int64_t dout = p_in.size(2);
  check_sizes(p_in, {bsz, da, dout}, op, "p", "[B, Da, Dout]");
  check_sizes(q_in, {bsz, dv, dout}, op, "q", "[B, Dv, Dout]");
  // a one-sided pass (Dv = 0, or Da = 0) has no rows on the other side to scale or centre
  const bool one_sided = da == 0 || dv == 0;
  TORCH_CHECK(one_sided || given(ra_in) == given(rv_in), op, ": ra and rv must both be given or both be empty");
  TORCH_CHECK(one_sided || given(mu_a_in) == given(mu_v_in), op,
              ": mu_a and mu_v must both be given or both be empty");
  const at::Tensor p = p_in.to(at::kFloat).contiguous();
  const at::Tensor q = q_in.to(at::kFloat).contiguous();
  const at::Tensor w = mask_input(w_in, a, op);
  const at::Tensor ra = f32_input(ra_in, a, {bsz, n}, op, "ra", "[B, N]");
  const at::Tensor rv = f32_input(rv_in, a, {bsz, n}, op, "rv", "[B, N]");
  const at::Tensor mu_a = f32_input(mu_a_in, a, {bsz, da}, op, "mu_a", "[B, Da]");
  const at::Tensor mu_v = f32_input(mu_v_in, a, {bsz, dv}, op, "mu_v", "[B, Dv]");
  at::Tensor out = at::empty({bsz, n, dout}, a.options().dtype(out_f32 ? at::kFloat : a.scalar_type()));
  if (out.numel() == 0) return out;
  const int64_t row_tiles = ceil_div(n, kTileM);
  const int64_t col_tiles = ceil_div(dout, kTileM);
  TORCH_CHECK(col_tiles <= 65535, op, ": Dout is too large for the tile grid (at most 65535 tiles of ", kTileM, ")");
  const dim3 grid(static_cast<unsigned int>(row_tiles), static_cast<unsigned int>(col_tiles),
                  static_cast<unsigned int>(bsz));
  auto stream = at::cuda::getCurrentCUDAStream();
  KD_DISPATCH_GEOMETRY_TYPES(a.scalar_type(), op, [&] {
    auto launch = [&](auto split_tag) {
      geometry_grad_kernel<scalar_t, decltype(split_tag)::value><<<grid, kTileThreads, 0, stream>>>(
          a.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), ptr_or_null<int8_t>(w), ptr_or_null<float>(ra),
          ptr_or_null<float>(rv), p.data_ptr<float>(), q.data_ptr<float>(), ptr_or_null<float>(mu_a),
          ptr_or_null<float>(mu_v), out.data_ptr(), out_f32, n, da, dv, dout, a.stride(0), a.stride(1), a.stride(2),
          v.stride(0), v.stride(1), v.stride(2));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (split) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
  });
  return out;
}

at::Tensor geometry_row_sq_cuda(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& mu_in) {
  constexpr const char* op = "geometry_row_sq_cuda";
  const at::Tensor x = rows_input(x_in, op, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t bsz = x.size(0), n = x.size(1), d = x.size(2);
  const at::Tensor w = mask_input(w_in, x, op);
  const at::Tensor mu = f32_input(mu_in, x, {bsz, d}, op, "mu", "[B, D]");
  at::Tensor out = at::empty({bsz, n}, x.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const dim3 grid(static_cast<unsigned int>(ceil_div(n, kRowSqWarps)), static_cast<unsigned int>(bsz));
  auto stream = at::cuda::getCurrentCUDAStream();
  KD_DISPATCH_GEOMETRY_TYPES(x.scalar_type(), op, [&] {
    geometry_row_sq_kernel<scalar_t><<<grid, kRowSqWarps * 32, 0, stream>>>(
        x.data_ptr<scalar_t>(), ptr_or_null<int8_t>(w), ptr_or_null<float>(mu), out.data_ptr<float>(), n, d,
        x.stride(0), x.stride(1), x.stride(2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace kd_kernels
