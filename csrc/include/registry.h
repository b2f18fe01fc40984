// The list of ops that kd_kernels._C implements on CUDA, reported by _C.build_info()["ops"].
//
// Register a CUDA kernel with KD_KERNELS_IMPL inside a TORCH_LIBRARY_IMPL(kd_kernels, CUDA, m)
// block: it calls m.impl() and records the op's name, so the list can never drift from what the
// library actually registers. The schemas themselves are defined in Python
// (kd_kernels/ops/cuda_defs.py), so fake tensors and torch.compile work without this library.
#pragma once

#include <string>
#include <vector>

namespace kd_kernels {

// Names ("kd_kernels::<op>") of the ops registered on the CUDA key by this library, in
// registration order. A function-local static: safe to use from other files' static initialisers
// (TORCH_LIBRARY_IMPL blocks run while the shared library is loaded).
std::vector<std::string>& cuda_op_names();

}  // namespace kd_kernels

// Inside TORCH_LIBRARY_IMPL(kd_kernels, CUDA, m): KD_KERNELS_IMPL(m, "kd_fwd_cuda", &kd_fwd_cuda);
#define KD_KERNELS_IMPL(m, op_name, fn)                                    \
  do {                                                                     \
    (m).impl(op_name, fn);                                                 \
    ::kd_kernels::cuda_op_names().push_back(std::string("kd_kernels::") + (op_name)); \
  } while (0)
