// Shared argument checks, dtype dispatch and launch helpers for batikfast's CUDA kernels.
//
// Every entry point validates its inputs itself (the Python wrappers check too, but the ops are
// reachable directly through torch.ops.batikfast_cuda), so a bad call fails with a message that
// names the argument instead of faulting on the device.
#pragma once

// Per-operator headers instead of ATen/ATen.h: each .cu is parsed once per target
// architecture, and the full ATen headers dominate the build time.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#define BF_CHECK_CUDA(t, name)                                                               \
  TORCH_CHECK((t).is_cuda(), name " must be a CUDA tensor, got a tensor on ", (t).device())

#define BF_CHECK_SAME_DEVICE(t, ref, name, ref_name)                                         \
  TORCH_CHECK((t).device() == (ref).device(), name " must be on the same device as " ref_name \
              " (", (ref).device(), "), got ", (t).device())

#define BF_CHECK_FLOAT_DTYPE(t, name)                                                        \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||            \
                  (t).scalar_type() == at::kBFloat16,                                        \
              name " must be float32, float16 or bfloat16, got ", (t).scalar_type())

// Only the three dtypes the package supports are instantiated: fewer template instances keep
// the build short (AT_DISPATCH_FLOATING_TYPES_AND2 would add double).
#define BF_DISPATCH_FLOAT_HALF_BF16(dtype, name, ...)                                        \
  [&] {                                                                                      \
    switch (dtype) {                                                                         \
      case at::kFloat: {                                                                     \
        using scalar_t = float;                                                              \
        return __VA_ARGS__();                                                                \
      }                                                                                      \
      case at::kHalf: {                                                                      \
        using scalar_t = at::Half;                                                           \
        return __VA_ARGS__();                                                                \
      }                                                                                      \
      case at::kBFloat16: {                                                                  \
        using scalar_t = at::BFloat16;                                                       \
        return __VA_ARGS__();                                                                \
      }                                                                                      \
      default:                                                                               \
        TORCH_CHECK(false, name ": unsupported dtype ", dtype,                               \
                    " (float32, float16 or bfloat16 expected)");                             \
    }                                                                                        \
  }()

namespace batikfast {

// at::Half / at::BFloat16 convert to and from float on the device; spelling the conversions
// out keeps the arithmetic in fp32 whatever the storage type.
template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}

// A group of N elements moved with one aligned memory transaction.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Elements per 16-byte transaction: the widest load a thread can issue.
template <typename T>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T));
}

// a / b for non-negative operands; a 64-bit division is a long software sequence on the GPU,
// so take the hardware-friendly 32-bit one whenever the operands fit.
__device__ __forceinline__ int64_t div_nonneg(int64_t a, int64_t b) {
  if (((a | b) >> 32) == 0) return static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
  return a / b;
}

// clamp(v, -limit, limit) that keeps a NaN a NaN, as torch.clamp does: fminf / fmaxf return the
// other operand, which turned a NaN (the training loop's non-finite check looks for it) into
// -limit.
__device__ __forceinline__ float clamp_keep_nan(float v, float limit) {
  return v > limit ? limit : (v < -limit ? -limit : v);
}

inline bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Blocks for a grid-stride loop over `work` items: enough to fill every SM several times,
// never more than the work needs.
inline int64_t grid_stride_blocks(int64_t work, int threads, int blocks_per_sm = 8) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t needed = (work + threads - 1) / threads;
  return std::max<int64_t>(1, std::min<int64_t>(needed, static_cast<int64_t>(sms) * blocks_per_sm));
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

}  // namespace batikfast
