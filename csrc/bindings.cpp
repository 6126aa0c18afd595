// Python module batikfast._C. The kernels register themselves as torch ops
// (torch.ops.batikfast_cuda.*) from their own .cu files when this library is loaded; the module
// itself only reports what the library was built with, so a loader can refuse a stale build.
#include <torch/extension.h>

#include <algorithm>
#include <string>

#define BATIKFAST_STR_(...) #__VA_ARGS__
#define BATIKFAST_STR(...) BATIKFAST_STR_(__VA_ARGS__)

#ifndef BATIKFAST_TORCH_VERSION
#define BATIKFAST_TORCH_VERSION unknown
#endif
#ifndef BATIKFAST_CUDA_VERSION
#define BATIKFAST_CUDA_VERSION unknown
#endif
#ifndef BATIKFAST_ARCH_LIST
#define BATIKFAST_ARCH_LIST unknown
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "batikfast CUDA kernels; the ops are torch.ops.batikfast_cuda.*";
  m.def(
      "build_info",
      [] {
        pybind11::dict info;
        info["torch_version"] = BATIKFAST_STR(BATIKFAST_TORCH_VERSION);
        info["cuda_version"] = BATIKFAST_STR(BATIKFAST_CUDA_VERSION);
        // extension.py passes the list with '_' for ';' (a shell and nvcc would split it).
        std::string arch_list = BATIKFAST_STR(BATIKFAST_ARCH_LIST);
        std::replace(arch_list.begin(), arch_list.end(), '_', ';');
        info["arch_list"] = arch_list;
        return info;
      },
      "torch version, CUDA version and GPU architectures this library was compiled for");
}
