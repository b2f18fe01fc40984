// Module init of the compiled extension kd_kernels._C.
//
// The kernels register themselves with the PyTorch dispatcher from their own files
// (TORCH_LIBRARY_IMPL(kd_kernels, CUDA, m) in csrc/cuda/<stem>.cu) while this shared library is
// loaded; the op schemas live in Python (kd_kernels/ops/cuda_defs.py), which this module imports
// so that `import kd_kernels._C` alone leaves every op usable. The Python side only adds
// build_info(): what was compiled, for which CUDA architectures and against which torch.
//
// Build macros (set by setup.py and CMakeLists.txt):
//   KD_KERNELS_CUDA_ARCHS  the arch list as a bare token sequence with ':' for ';' (8.0:9.0+PTX)
//   KD_KERNELS_DEBUG       1 for a debug build (-O0 -g, device -G), else 0
#include <cuda.h>  // CUDA_VERSION
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/version.h>  // TORCH_VERSION

#include <string>
#include <vector>

#include "registry.h"

#ifndef KD_KERNELS_CUDA_ARCHS
#define KD_KERNELS_CUDA_ARCHS unknown
#endif
#ifndef KD_KERNELS_DEBUG
#define KD_KERNELS_DEBUG 0
#endif

#define KD_KERNELS_STR_(x) #x
#define KD_KERNELS_STR(x) KD_KERNELS_STR_(x)

namespace kd_kernels {

std::vector<std::string>& cuda_op_names() {
  static std::vector<std::string> names;
  return names;
}

namespace {

// "8.0:9.0+PTX" -> {"8.0", "9.0+PTX"}.
std::vector<std::string> split_archs(const std::string& archs) {
  std::vector<std::string> out;
  std::string cur;
  for (char ch : archs) {
    if (ch == ':') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else if (ch != ' ') {
      cur.push_back(ch);
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["cuda_version"] = static_cast<int>(CUDA_VERSION);  // e.g. 13000 for CUDA 13.0
  info["archs"] = split_archs(KD_KERNELS_STR(KD_KERNELS_CUDA_ARCHS));
  info["torch_version_at_build"] = std::string(TORCH_VERSION);
  info["debug"] = static_cast<bool>(KD_KERNELS_DEBUG);
  info["ops"] = cuda_op_names();
  return info;
}

}  // namespace
}  // namespace kd_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kd_kernels CUDA C++ kernels (registered as torch.ops.kd_kernels.*_cuda)";
  // Define the schemas the CUDA kernels implement (Python owns them; see cuda_defs.py).
  pybind11::module_::import("kd_kernels.ops.cuda_defs");
  m.def("build_info", &kd_kernels::build_info,
        "dict(cuda_version, archs, torch_version_at_build, debug, ops): how this library was built");
}
