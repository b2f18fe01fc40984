// Tensor-core Gram tiles of column-centred rows, shared by the RKD kernels (docs/rkd.md), and the
// WMMA k-step (MmaStep, any staging layout) shared with the geometry kernels (csrc/cuda/geometry.cu).
//
// One block of kTileThreads = 128 threads (4 warps, 2 × 2) owns a kTileM × kTileM = 64 × 64 tile of
// G_ij = x~_i · x~_j (x~ = x − mean(x), the column-centred rows); each warp owns a 32 × 32 quarter
// = 2 × 2 WMMA accumulators of 16 × 16. The features stream through shared memory in chunks of
// MmaTraits::kc columns; while staging, each element is upcast to fp32, centred there (x − mean,
// exact enough: the centring error is u·|x − mean| per coordinate) and rounded to the MMA input type.
//
// Precision policy (docs/precision.md):
//   float16 / bfloat16: fragments in the input's dtype (m16n16k16), fp32 accumulators;
//   float32, "tf32x3":  3xTF32: a = hi + lo with hi = tf32(a), lo = tf32(a − hi), and
//                       acc += lo·hi' + hi·lo' + hi·hi' (m16n16k8, fp32 accumulators; small terms first);
//                       the dropped lo·lo' term is ~2^-22 relative: fp32-faithful products;
//   float32, "tf32":    one TF32 pass, acc += hi·hi'.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace kd_kernels {
namespace tiles {

namespace wmma = nvcuda::wmma;

constexpr int kTileM = 64;        // rows (and columns) of a pair tile: each staged row is reused 64 times
constexpr int kTileThreads = 128; // 4 warps of 32 × 32 each: few enough registers for 0 spills at 3xTF32
constexpr int kWarpTile = 32;     // rows / columns of a warp's quarter (2 × 2 fragments of 16)
constexpr int kGramLd = kTileM + 4;  // fp32 tile row stride: a multiple of 4 (WMMA), 4 extra words vs bank conflicts

// The WMMA shape and staging type of one input dtype.
template <typename scalar_t>
struct MmaTraits;

template <>
struct MmaTraits<float> {
  using stage_t = float;                        // shared-memory staging type (fp32; rounded to tf32 at load)
  using frag_t = wmma::precision::tf32;         // fragment element type
  static constexpr int kK = 8;                  // m16n16k8
  static constexpr int kc = 16;                 // staged columns per chunk: 2 k-steps; 2 × 64 × 20 fp32 = 10 KB
  static constexpr int ld = kc + 4;             // staging row stride (multiple of 4 floats, 32-byte aligned rows of 16)
  __device__ static float round(float v) { return v; }
};
template <>
struct MmaTraits<c10::Half> {
  using stage_t = __half;
  using frag_t = __half;
  static constexpr int kK = 16;                 // m16n16k16
  static constexpr int kc = 32;                 // 2 k-steps; 2 × 64 × 40 halves = 10 KB
  static constexpr int ld = kc + 8;             // multiple of 8 halves (16 bytes), as WMMA needs
  __device__ static __half round(float v) { return __float2half_rn(v); }
};
template <>
struct MmaTraits<c10::BFloat16> {
  using stage_t = __nv_bfloat16;
  using frag_t = __nv_bfloat16;
  static constexpr int kK = 16;
  static constexpr int kc = 32;
  static constexpr int ld = kc + 8;
  __device__ static __nv_bfloat16 round(float v) { return __float2bfloat16_rn(v); }
};

// Shared memory of one Gram tile computation: the staged rows of the i tile and the j tile.
template <typename scalar_t>
struct GramStage {
  using T = MmaTraits<scalar_t>;
  alignas(32) typename T::stage_t a[kTileM * T::ld];  // rows i0.., columns k0..k0+kc (row-major)
  alignas(32) typename T::stage_t b[kTileM * T::ld];  // rows j0..
};

// Where a warp's 16 × 16 operand fragment starts in a staged tile, for the two WMMA layouts. The
// A operand (m × k) is staged [m][k] (row_major: Gram tiles, rows of features) or [k][m]
// (col_major: XᵀX over rows, the reduction index is the staged row); the B operand (k × n) is staged
// [n][k] (col_major) or [k][n] (row_major). mn0: first row of A / column of B; kk: first k.
template <typename Layout>
__device__ __forceinline__ int frag_offset_a(int mn0, int kk, int ld) {
  return std::is_same<Layout, wmma::row_major>::value ? mn0 * ld + kk : kk * ld + mn0;
}
template <typename Layout>
__device__ __forceinline__ int frag_offset_b(int mn0, int kk, int ld) {
  return std::is_same<Layout, wmma::col_major>::value ? mn0 * ld + kk : kk * ld + mn0;
}

// One k-step of the warp's 2 × 2 accumulators. For fp32 the split (3xTF32) or plain TF32 pass.
// LayoutA / LayoutB: how the operands are staged (frag_offset_a / frag_offset_b); the defaults are
// the Gram tiles' ([m][k] and [n][k]: both operands are rows of features).
template <typename scalar_t, bool kSplit, typename LayoutA = wmma::row_major, typename LayoutB = wmma::col_major>
struct MmaStep {
  using T = MmaTraits<scalar_t>;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, T::kK, typename T::frag_t, LayoutA>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, T::kK, typename T::frag_t, LayoutB>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, T::kK, float>;

  // acc[r][c] += A[rows wr + 16 r, kk..] · B[kk.., cols wc + 16 c]; sa / sb point at the staged tiles
  // (row strides lda / ldb, in elements).
  __device__ static void run_ld(const typename T::stage_t* sa, int lda, const typename T::stage_t* sb, int ldb,
                                int wr, int wc, int kk, Acc (&acc)[2][2]) {
    FragA a[2];
    FragB b[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) wmma::load_matrix_sync(a[r], sa + frag_offset_a<LayoutA>(wr + 16 * r, kk, lda), lda);
#pragma unroll
    for (int c = 0; c < 2; ++c) wmma::load_matrix_sync(b[c], sb + frag_offset_b<LayoutB>(wc + 16 * c, kk, ldb), ldb);
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int c = 0; c < 2; ++c) wmma::mma_sync(acc[r][c], a[r], b[c], acc[r][c]);
  }
  // The Gram tiles' call: both operands staged with the row stride T::ld.
  __device__ static void run(const typename T::stage_t* sa, const typename T::stage_t* sb, int wr, int wc, int kk,
                             Acc (&acc)[2][2]) {
    run_ld(sa, T::ld, sb, T::ld, wr, wc, kk, acc);
  }
};

template <bool kSplit, typename LayoutA, typename LayoutB>
struct MmaStep<float, kSplit, LayoutA, LayoutB> {
  using T = MmaTraits<float>;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, LayoutA>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, LayoutB>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

  // hi = tf32(v), lo = tf32(v − hi), element by element (the two fragments share one layout).
  template <typename Frag>
  __device__ static void split(Frag& hi, Frag& lo) {
#pragma unroll
    for (int t = 0; t < hi.num_elements; ++t) {
      const float v = hi.x[t];
      const float h = wmma::__float_to_tf32(v);
      hi.x[t] = h;
      if (kSplit) lo.x[t] = wmma::__float_to_tf32(v - h);
    }
  }

  __device__ static void run_ld(const float* sa, int lda, const float* sb, int ldb, int wr, int wc, int kk,
                                Acc (&acc)[2][2]) {
    FragA a_hi[2], a_lo[2];
    FragB b_hi[2], b_lo[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      wmma::load_matrix_sync(a_hi[r], sa + frag_offset_a<LayoutA>(wr + 16 * r, kk, lda), lda);
      split(a_hi[r], a_lo[r]);
    }
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      wmma::load_matrix_sync(b_hi[c], sb + frag_offset_b<LayoutB>(wc + 16 * c, kk, ldb), ldb);
      split(b_hi[c], b_lo[c]);
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
  __device__ static void run(const float* sa, const float* sb, int wr, int wc, int kk, Acc (&acc)[2][2]) {
    run_ld(sa, T::ld, sb, T::ld, wr, wc, kk, acc);
  }
};

// G tile: out[r * kGramLd + c] = x~_{i0+r} · x~_{j0+c} (fp32) for r, c < 64, with x~ = x − mean.
// Rows at or past n and columns at or past d stage as zeros. Called by all kTileThreads threads;
// starts and ends with __syncthreads() (the caller may reuse `stage` and read `out` right after).
template <typename scalar_t, bool kSplit>
__device__ __forceinline__ void gram_tile(const scalar_t* __restrict__ x,     // [n, d] row-major features
                                          const float* __restrict__ mean,     // [d] column means of x (fp32)
                                          int64_t n,                          // rows of x
                                          int64_t d,                          // columns of x
                                          int64_t i0,                         // first row of the i tile
                                          int64_t j0,                         // first row of the j tile
                                          GramStage<scalar_t>& stage,         // shared staging
                                          float* out) {                       // shared [64 * kGramLd] result
  using T = MmaTraits<scalar_t>;
  using Step = MmaStep<scalar_t, kSplit>;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wr = (warp / 2) * kWarpTile;  // the warp's first row / column inside the tile
  const int wc = (warp % 2) * kWarpTile;
  typename Step::Acc acc[2][2];
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int c = 0; c < 2; ++c) wmma::fill_fragment(acc[r][c], 0.0f);
  __syncthreads();
  for (int64_t k0 = 0; k0 < d; k0 += T::kc) {
    // consecutive threads read consecutive columns of one row (coalesced along k)
    for (int l = tid; l < kTileM * T::kc; l += kTileThreads) {
      const int row = l / T::kc;
      const int kk = l % T::kc;
      const int64_t k = k0 + kk;
      const float mk = k < d ? mean[k] : 0.0f;
      const int64_t gi = i0 + row;
      const int64_t gj = j0 + row;
      const float va = (gi < n && k < d) ? static_cast<float>(x[gi * d + k]) - mk : 0.0f;
      const float vb = (gj < n && k < d) ? static_cast<float>(x[gj * d + k]) - mk : 0.0f;
      stage.a[row * T::ld + kk] = T::round(va);
      stage.b[row * T::ld + kk] = T::round(vb);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < T::kc; kk += T::kK) Step::run(stage.a, stage.b, wr, wc, kk, acc);
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int c = 0; c < 2; ++c)
      wmma::store_matrix_sync(out + (wr + 16 * r) * kGramLd + wc + 16 * c, acc[r][c], kGramLd, wmma::mem_row_major);
  __syncthreads();
}

// Σ_k (x_ik − x_jk)² of the ORIGINAL rows, upcast to fp32 (the near-pair route of docs/rkd.md §4:
// exact to the rounding of the differences; identical rows give exactly 0).
template <typename scalar_t>
__device__ __forceinline__ float explicit_sqdist(const scalar_t* __restrict__ x, int64_t d, int64_t i, int64_t j) {
  const scalar_t* xi = x + i * d;
  const scalar_t* xj = x + j * d;
  float s = 0.0f;
  for (int64_t k = 0; k < d; ++k) {
    const float diff = static_cast<float>(xi[k]) - static_cast<float>(xj[k]);
    s = fmaf(diff, diff, s);
  }
  return s;
}

}  // namespace tiles
}  // namespace kd_kernels
