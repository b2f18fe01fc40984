// Argument checks shared by the CUDA launchers of kd_kernels.
//
// The public Python functions validate user input once (kd_kernels/_validate.py); these checks
// guard the C++ ops themselves, which can also be called directly through torch.ops.kd_kernels.
// Every message names the op and the argument, e.g.
//   "kd_fwd_cuda: student must be a CUDA tensor, got a tensor on cpu".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace kd_kernels {

// The tensor lives on a CUDA device.
inline void check_cuda(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.is_cuda(), op, ": ", name, " must be a CUDA tensor, got a tensor on ", x.device());
}

// The tensor lives on the same device as `ref` (named `ref_name`).
inline void check_same_device(const at::Tensor& x, const at::Tensor& ref, const char* op, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(x.device() == ref.device(), op, ": ", name, " must be on the same device as ", ref_name, " (",
              ref.device(), "), got ", x.device());
}

// float16, bfloat16, float32 or float64.
inline void check_floating(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": ", name,
              " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ", x.scalar_type());
}

// The tensor has the dtype of `ref` (named `ref_name`).
inline void check_same_dtype(const at::Tensor& x, const at::Tensor& ref, const char* op, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", x.scalar_type());
}

// The tensor has `dim` dimensions; `shape` spells the expected shape for the message, e.g. "[N, C]".
inline void check_dim(const at::Tensor& x, int64_t dim, const char* op, const char* name, const char* shape) {
  TORCH_CHECK(x.dim() == dim, op, ": ", name, " must be a ", dim, "-D tensor of shape ", shape, ", got shape ",
              x.sizes());
}

// The tensor has exactly the sizes `sizes`; `shape` spells them symbolically for the message.
inline void check_sizes(const at::Tensor& x, at::IntArrayRef sizes, const char* op, const char* name,
                        const char* shape) {
  TORCH_CHECK(x.sizes() == sizes, op, ": ", name, " must have shape ", shape, " = ", sizes, ", got ", x.sizes());
}

// The tensor is contiguous in memory (row-major), as a kernel that indexes it as a flat array needs.
inline void check_contiguous(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous()), got strides ",
              x.strides());
}

}  // namespace kd_kernels
