// Fused modulated convolution: StyleGAN2's modulate -> conv -> demodulate -> noise -> bias_act.
//
//   y = clamp(act(out_scale[n, o] * conv2d(x * in_scale[n, i], weight, padding)
//                 + noise[n, 0] + bias[o], alpha) * gain, -clamp, clamp)
//
// (stride 1, cross-correlation as torch.conv2d; out_scale, noise, bias optional; clamp < 0 = off;
// act in linear / relu / lrelu.)
//
// One implicit-GEMM kernel on tensor cores (nvcuda::wmma): rows m = (n, oy, ox) of the output,
// columns o, reduction k = (i, ky, kx), the order of weight's own memory layout:
//
//   A[m, k] = x[n, i, oy + ky - padding, ox + kx - padding] * in_scale[n, i]   (0 outside)
//   B[k, o] = weight[o, i, ky, kx]
//
// The style scale is applied to A as it travels from registers to shared memory, the rest in the
// epilogue, so neither per-sample weights nor the modulated input ever reach global memory.
//
// Layout choices:
// - k in weight's own order makes every B tile row a contiguous run of `weight`, read with
//   16-byte loads and no re-layout (a re-layout would cost more than the whole conv on the
//   4x4..32x32 layers, where the weight is most of the traffic).
// - A tiles are stored k-major (column-major A for wmma) because x is contiguous along ox: a warp
//   then reads 32 consecutive pixels of one channel and tap, coalesced. Each thread keeps one row
//   m for the whole reduction, so (n, oy, ox) is decoded once, and walks its k's incrementally
//   (no division per element); the scale is reloaded only when i changes, which is the same for
//   the whole warp.
// - Tiles are double-buffered: the global loads of tile t+1 are issued before the MMAs of tile t
//   and written to the other buffer after them, so one barrier per tile suffices.
// - fp16/bf16 use 16x16x16 fragments; fp32 uses tf32 16x16x8 fragments with fp32 accumulation,
//   what cuDNN does for fp32 convolutions under torch's default allow_tf32 (and what the Triton
//   kernel does). Operands are rounded to tf32 when they are stored to shared memory.
// - The epilogue goes through shared memory so each warp writes 32 consecutive pixels of one
//   output channel; a tile may span several samples (small images), so out_scale and noise are
//   gathered per row.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>

namespace batikfast {
namespace {

namespace wmma = nvcuda::wmma;

enum ModconvAct : int { MC_LINEAR = 0, MC_RELU = 1, MC_LRELU = 2 };

int parse_modconv_act(std::string_view act) {
  if (act == "linear") return MC_LINEAR;
  if (act == "relu") return MC_RELU;
  if (act == "lrelu") return MC_LRELU;
  TORCH_CHECK(false, "modulated_conv2d_forward: act must be one of linear, relu, lrelu, got '",
              std::string(act), "'");
  return MC_LINEAR;
}

// Storage type <-> fp32, and the operand type of the tensor-core fragments.
template <typename T>
struct Traits;

template <>
struct Traits<float> {
  using mma_t = wmma::precision::tf32;
  static constexpr int kMmaK = 8;
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
  __device__ static float to_operand(float v) { return wmma::__float_to_tf32(v); }
  __device__ static float zero() { return 0.f; }
};

template <>
struct Traits<__half> {
  using mma_t = __half;
  static constexpr int kMmaK = 16;
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ static __half to_operand(float v) { return __float2half_rn(v); }
  __device__ static __half zero() { return __ushort_as_half(static_cast<unsigned short>(0)); }
};

template <>
struct Traits<__nv_bfloat16> {
  using mma_t = __nv_bfloat16;
  static constexpr int kMmaK = 16;
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ static __nv_bfloat16 to_operand(float v) { return __float2bfloat16_rn(v); }
  __device__ static __nv_bfloat16 zero() {
    return __ushort_as_bfloat16(static_cast<unsigned short>(0));
  }
};

// ATen's storage types and the CUDA types the intrinsics take (same bits).
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
struct Params {
  const T* __restrict__ x;          // [N, I, H, W] contiguous
  const T* __restrict__ w;          // [O, ldw], row o = weight[o] flattened (i, ky, kx), zero-padded
  const float* __restrict__ in_scale;   // [N, I]
  const float* __restrict__ out_scale;  // [N, O] or null
  const T* __restrict__ noise;      // [N, Ho * Wo] or null
  const T* __restrict__ bias;       // [O] or null
  T* __restrict__ y;                // [N, O, Ho, Wo]
  int64_t M;                        // N * Ho * Wo
  int I, H, W, O, Ho, Wo, KH, KW, pad;
  int K;                            // I * KH * KW
  int ldw;                          // row stride of w, a multiple of 16 bytes
  int act;
  float alpha, gain, clamp;
};

// Block tile BM x BN (rows x output channels), reduction step BK (128 bytes of k per A column
// for 16-bit types, 64 for fp32, which keeps both buffers of the fp32 tiles in 48 KiB).
template <typename T, int BM, int BN, int WARPS_M, int WARPS_N>
struct Tile {
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int BK = sizeof(T) == 4 ? 16 : 32;
  static constexpr int kMmaK = Traits<T>::kMmaK;
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
  // Padding shifts successive rows across banks; it keeps 32-byte alignment for wmma.
  static constexpr int ldA = BM + kVec;
  static constexpr int ldB = BK + kVec;
  static constexpr int ldC = BM + 4;
  static constexpr int kAGroups = kThreads / BM;  // threads sharing a row m
  static constexpr int kAPerThread = BK / kAGroups;
  static constexpr int kBVecsPerRow = BK / kVec;
  static constexpr int kBPerThread = BN * BK / kVec / kThreads;
  static constexpr int kFragsM = BM / WARPS_M / 16;
  static constexpr int kFragsN = BN / WARPS_N / 16;
  static constexpr int kABytes = BK * ldA * static_cast<int>(sizeof(T));
  static constexpr int kBBytes = BN * ldB * static_cast<int>(sizeof(T));
  static constexpr int kMainBytes = 2 * (kABytes + kBBytes);
  static constexpr int kCBytes = BN * ldC * 4;
  static constexpr int kSmemBytes = kMainBytes > kCBytes ? kMainBytes : kCBytes;
  static constexpr int kOutPerThread = BM * BN / kThreads;

  static_assert(kThreads % BM == 0, "each row m must belong to whole threads");
  static_assert(BM % 32 == 0, "a warp must share one k group (warp-uniform scale reloads)");
  static_assert(BK % kAGroups == 0, "A tile must split evenly over the threads of a row");
  static_assert((BN * BK / kVec) % kThreads == 0, "B tile must split evenly over the threads");
  static_assert(BM % (WARPS_M * 16) == 0 && BN % (WARPS_N * 16) == 0, "warp tiles of 16x16");
  static_assert(BK % kMmaK == 0, "BK must be a multiple of the fragment depth");
  static_assert(kABytes % 128 == 0 && kBBytes % 128 == 0, "buffers must stay 128-byte aligned");
  static_assert(kSmemBytes <= 48 * 1024, "static shared memory limit");
};

template <typename T>
__device__ __forceinline__ float activate(float v, int act, float alpha) {
  if (act == MC_RELU) return v > 0.f ? v : 0.f;
  if (act == MC_LRELU) return v > 0.f ? v : v * alpha;
  return v;
}

template <typename T, int BM, int BN, int WARPS_M, int WARPS_N>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32)
    modulated_conv2d_kernel(const Params<T> p) {
  using Cfg = Tile<T, BM, BN, WARPS_M, WARPS_N>;
  using Tr = Traits<T>;
  using mma_t = typename Tr::mma_t;
  constexpr int BK = Cfg::BK;
  constexpr int kA = Cfg::kAPerThread;
  constexpr int kB = Cfg::kBPerThread;
  constexpr int kVec = Cfg::kVec;

  __shared__ __align__(128) unsigned char smem[Cfg::kSmemBytes];
  T* const a_smem = reinterpret_cast<T*>(smem);
  T* const b_smem = reinterpret_cast<T*>(smem + 2 * Cfg::kABytes);

  const int tid = threadIdx.x;
  const int m_local = tid % BM;
  const int k_group = tid / BM;
  const int o0 = blockIdx.y * BN;

  // This thread's row m, decoded once.
  const int64_t hw_out = static_cast<int64_t>(p.Ho) * p.Wo;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * BM + m_local;
  const bool m_ok = m < p.M;
  const int64_t n = m_ok ? m / hw_out : 0;
  const int64_t pix = m_ok ? m - n * hw_out : 0;
  const int oy = static_cast<int>(pix / p.Wo);
  const int ox = static_cast<int>(pix - static_cast<int64_t>(oy) * p.Wo);
  const int64_t hw_in = static_cast<int64_t>(p.H) * p.W;
  const T* const x_n = p.x + n * p.I * hw_in;
  const float* const scale_n = p.in_scale + n * p.I;
  const int iy0 = oy - p.pad;
  const int ix0 = ox - p.pad;
  const int khw = p.KH * p.KW;

  T a_raw[kA];
  float a_scale[kA];
  uint4 b_raw[kB];

  auto load_a = [&](int k0) {
    const int k = k0 + k_group * kA;
    int i = k / khw;
    const int r = k - i * khw;
    int ky = r / p.KW;
    int kx = r - ky * p.KW;
    int scale_i = -1;
    float scale = 0.f;
#pragma unroll
    for (int j = 0; j < kA; ++j) {
      const int iy = iy0 + ky;
      const int ix = ix0 + kx;
      const bool ok = m_ok && i < p.I && static_cast<unsigned>(iy) < static_cast<unsigned>(p.H) &&
                      static_cast<unsigned>(ix) < static_cast<unsigned>(p.W);
      a_raw[j] = ok ? x_n[i * hw_in + static_cast<int64_t>(iy) * p.W + ix] : Tr::zero();
      if (i != scale_i) {  // warp-uniform: i depends only on k
        scale_i = i;
        scale = (m_ok && i < p.I) ? scale_n[i] : 0.f;
      }
      a_scale[j] = scale;
      if (++kx == p.KW) {
        kx = 0;
        if (++ky == p.KH) {
          ky = 0;
          ++i;
        }
      }
    }
  };

  auto store_a = [&](int buf) {
    T* const dst = a_smem + buf * (Cfg::kABytes / static_cast<int>(sizeof(T))) +
                   k_group * kA * Cfg::ldA + m_local;
#pragma unroll
    for (int j = 0; j < kA; ++j) dst[j * Cfg::ldA] = Tr::to_operand(Tr::to_float(a_raw[j]) * a_scale[j]);
  };

  auto load_b = [&](int k0) {
#pragma unroll
    for (int q = 0; q < kB; ++q) {
      const int idx = tid + q * Cfg::kThreads;
      const int o = o0 + idx / Cfg::kBVecsPerRow;
      const int k = k0 + (idx % Cfg::kBVecsPerRow) * kVec;
      // K is a multiple of kVec (the host pads weight rows), so a vector is wholly in or out.
      b_raw[q] = (o < p.O && k < p.K)
                     ? *reinterpret_cast<const uint4*>(p.w + static_cast<int64_t>(o) * p.ldw + k)
                     : make_uint4(0u, 0u, 0u, 0u);
    }
  };

  auto store_b = [&](int buf) {
    T* const base = b_smem + buf * (Cfg::kBBytes / static_cast<int>(sizeof(T)));
#pragma unroll
    for (int q = 0; q < kB; ++q) {
      const int idx = tid + q * Cfg::kThreads;
      T* const dst = base + (idx / Cfg::kBVecsPerRow) * Cfg::ldB + (idx % Cfg::kBVecsPerRow) * kVec;
      uint4 v = b_raw[q];
      if constexpr (sizeof(T) == 4) {
        v.x = __float_as_uint(Tr::to_operand(__uint_as_float(v.x)));
        v.y = __float_as_uint(Tr::to_operand(__uint_as_float(v.y)));
        v.z = __float_as_uint(Tr::to_operand(__uint_as_float(v.z)));
        v.w = __float_as_uint(Tr::to_operand(__uint_as_float(v.w)));
      }
      *reinterpret_cast<uint4*>(dst) = v;
    }
  };

  const int warp = tid / 32;
  const int warp_m = warp % WARPS_M;
  const int warp_n = warp / WARPS_M;

  wmma::fragment<wmma::accumulator, 16, 16, Cfg::kMmaK, float> acc[Cfg::kFragsM][Cfg::kFragsN];
#pragma unroll
  for (int fm = 0; fm < Cfg::kFragsM; ++fm)
#pragma unroll
    for (int fn = 0; fn < Cfg::kFragsN; ++fn) wmma::fill_fragment(acc[fm][fn], 0.f);

  auto mma_tile = [&](int buf) {
    const T* const a_base = a_smem + buf * (Cfg::kABytes / static_cast<int>(sizeof(T)));
    const T* const b_base = b_smem + buf * (Cfg::kBBytes / static_cast<int>(sizeof(T)));
#pragma unroll
    for (int kk = 0; kk < BK; kk += Cfg::kMmaK) {
      wmma::fragment<wmma::matrix_a, 16, 16, Cfg::kMmaK, mma_t, wmma::col_major> a_frag[Cfg::kFragsM];
      wmma::fragment<wmma::matrix_b, 16, 16, Cfg::kMmaK, mma_t, wmma::col_major> b_frag[Cfg::kFragsN];
#pragma unroll
      for (int fm = 0; fm < Cfg::kFragsM; ++fm)
        wmma::load_matrix_sync(a_frag[fm], a_base + kk * Cfg::ldA + (warp_m * Cfg::kFragsM + fm) * 16,
                               Cfg::ldA);
#pragma unroll
      for (int fn = 0; fn < Cfg::kFragsN; ++fn)
        wmma::load_matrix_sync(b_frag[fn], b_base + (warp_n * Cfg::kFragsN + fn) * 16 * Cfg::ldB + kk,
                               Cfg::ldB);
#pragma unroll
      for (int fm = 0; fm < Cfg::kFragsM; ++fm)
#pragma unroll
        for (int fn = 0; fn < Cfg::kFragsN; ++fn)
          wmma::mma_sync(acc[fm][fn], a_frag[fm], b_frag[fn], acc[fm][fn]);
    }
  };

  const int k_tiles = (p.K + BK - 1) / BK;
  load_a(0);
  load_b(0);
  store_a(0);
  store_b(0);
  __syncthreads();
  for (int t = 0; t < k_tiles; ++t) {
    const bool more = t + 1 < k_tiles;
    if (more) {
      load_a((t + 1) * BK);
      load_b((t + 1) * BK);
    }
    mma_tile(t & 1);
    if (more) {
      store_a((t + 1) & 1);
      store_b((t + 1) & 1);
    }
    __syncthreads();
  }

  // Epilogue: accumulators -> shared (column-major, so a warp reads 32 consecutive rows of one
  // channel) -> fused scale, noise, bias, activation, gain, clamp -> output.
  float* const c_smem = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int fm = 0; fm < Cfg::kFragsM; ++fm)
#pragma unroll
    for (int fn = 0; fn < Cfg::kFragsN; ++fn)
      wmma::store_matrix_sync(
          c_smem + (warp_n * Cfg::kFragsN + fn) * 16 * Cfg::ldC + (warp_m * Cfg::kFragsM + fm) * 16,
          acc[fm][fn], Cfg::ldC, wmma::mem_col_major);
  __syncthreads();
  if (!m_ok) return;

  const float noise = p.noise ? Tr::to_float(p.noise[n * hw_out + pix]) : 0.f;
  T* const y_row = p.y + n * p.O * hw_out + pix;
  const float* const out_scale_n = p.out_scale ? p.out_scale + n * p.O : nullptr;
#pragma unroll 4
  for (int q = 0; q < Cfg::kOutPerThread; ++q) {
    const int o_local = k_group + q * Cfg::kAGroups;
    const int o = o0 + o_local;
    if (o >= p.O) break;  // o grows with q
    float v = c_smem[o_local * Cfg::ldC + m_local];
    if (out_scale_n) v *= out_scale_n[o];
    v += noise;
    if (p.bias) v += Tr::to_float(p.bias[o]);
    v = activate<T>(v, p.act, p.alpha) * p.gain;
    if (p.clamp >= 0.f) v = fminf(fmaxf(v, -p.clamp), p.clamp);
    y_row[static_cast<int64_t>(o) * hw_out] = Tr::from_float(v);
  }
}

template <typename T, int BM, int BN, int WARPS_M, int WARPS_N>
void launch_tile(const Params<T>& p, cudaStream_t stream) {
  constexpr int threads = WARPS_M * WARPS_N * 32;
  const dim3 grid(static_cast<unsigned>((p.M + BM - 1) / BM), static_cast<unsigned>((p.O + BN - 1) / BN));
  modulated_conv2d_kernel<T, BM, BN, WARPS_M, WARPS_N><<<grid, threads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Large tiles amortise loads best; when they would leave SMs idle (the 4x4..32x32 layers),
// smaller tiles give more blocks.
template <typename T>
void launch(const Params<T>& p, cudaStream_t stream) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t big_blocks = ((p.M + 127) / 128) * ((p.O + 63) / 64);
  if (big_blocks >= sms) {
    launch_tile<T, 128, 64, 4, 2>(p, stream);
  } else {
    launch_tile<T, 64, 32, 2, 2>(p, stream);
  }
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.is_cuda(), "modulated_conv2d_forward: ", name,
              " must be a CUDA tensor, got a tensor on ", t.device());
  TORCH_CHECK(t.device() == x.device(), "modulated_conv2d_forward: ", name,
              " must be on the same device as x (", x.device(), "), got ", t.device());
}

void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, "modulated_conv2d_forward: ",
              name, " must be float32, float16 or bfloat16, got ", s);
}

const at::Tensor* present(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &t.value() : nullptr;
}

}  // namespace

at::Tensor modulated_conv2d_forward(const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& in_scale,
                                    const c10::optional<at::Tensor>& out_scale,
                                    const c10::optional<at::Tensor>& noise,
                                    const c10::optional<at::Tensor>& bias, c10::string_view act,
                                    double alpha, double gain, double clamp, int64_t padding) {
  TORCH_CHECK(x.is_cuda(), "modulated_conv2d_forward: x must be a CUDA tensor, got a tensor on ",
              x.device());
  check_float_dtype(x, "x");
  TORCH_CHECK(x.dim() == 4, "modulated_conv2d_forward: x must be 4-D [N, I, H, W], got shape ",
              x.sizes());
  check_device(weight, "weight", x);
  check_float_dtype(weight, "weight");
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1),
              "modulated_conv2d_forward: weight must be [O, ", x.size(1), ", kh, kw], got shape ",
              weight.sizes());
  TORCH_CHECK(weight.size(2) >= 1 && weight.size(3) >= 1,
              "modulated_conv2d_forward: weight must have a non-empty kernel, got shape ",
              weight.sizes());
  const int64_t N = x.size(0), I = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t O = weight.size(0), KH = weight.size(2), KW = weight.size(3);
  check_device(in_scale, "in_scale", x);
  TORCH_CHECK(in_scale.scalar_type() == at::kFloat,
              "modulated_conv2d_forward: in_scale must be float32, got ", in_scale.scalar_type());
  TORCH_CHECK(in_scale.dim() == 2 && in_scale.size(0) == N && in_scale.size(1) == I,
              "modulated_conv2d_forward: in_scale must be [", N, ", ", I, "], got shape ",
              in_scale.sizes());
  TORCH_CHECK(padding >= 0, "modulated_conv2d_forward: padding must be >= 0, got ", padding);
  const int64_t Ho = H + 2 * padding - KH + 1, Wo = W + 2 * padding - KW + 1;
  TORCH_CHECK(Ho >= 1 && Wo >= 1, "modulated_conv2d_forward: output would be empty (", Ho, "x", Wo,
              "): kernel ", KH, "x", KW, " is larger than the padded input ", H, "x", W,
              " with padding ", padding);
  const at::Tensor* out_scale_t = present(out_scale);
  if (out_scale_t) {
    check_device(*out_scale_t, "out_scale", x);
    TORCH_CHECK(out_scale_t->scalar_type() == at::kFloat,
                "modulated_conv2d_forward: out_scale must be float32, got ",
                out_scale_t->scalar_type());
    TORCH_CHECK(out_scale_t->dim() == 2 && out_scale_t->size(0) == N && out_scale_t->size(1) == O,
                "modulated_conv2d_forward: out_scale must be [", N, ", ", O, "], got shape ",
                out_scale_t->sizes());
  }
  const at::Tensor* noise_t = present(noise);
  if (noise_t) {
    check_device(*noise_t, "noise", x);
    check_float_dtype(*noise_t, "noise");
    TORCH_CHECK(noise_t->dim() == 4 && noise_t->size(0) == N && noise_t->size(1) == 1 &&
                    noise_t->size(2) == Ho && noise_t->size(3) == Wo,
                "modulated_conv2d_forward: noise must be [", N, ", 1, ", Ho, ", ", Wo,
                "], got shape ", noise_t->sizes());
  }
  const at::Tensor* bias_t = present(bias);
  if (bias_t) {
    check_device(*bias_t, "bias", x);
    check_float_dtype(*bias_t, "bias");
    TORCH_CHECK(bias_t->dim() == 1 && bias_t->size(0) == O, "modulated_conv2d_forward: bias must be [",
                O, "], got shape ", bias_t->sizes());
  }
  const int act_code = parse_modconv_act(act);
  TORCH_CHECK(std::max({N, I, O, H, W, KH, KW, Ho, Wo}) <= INT32_MAX && I * KH * KW <= INT32_MAX - 64,
              "modulated_conv2d_forward: sizes too large (each dimension and I*kh*kw must fit in "
              "32 bits), got x ", x.sizes(), ", weight ", weight.sizes());

  const c10::cuda::CUDAGuard guard(x.device());
  const auto dtype = x.scalar_type();
  at::Tensor y = at::empty({N, O, Ho, Wo}, x.options());
  if (y.numel() == 0) return y;

  // Entry normalisation: everything contiguous in x's dtype (scales in fp32); weight rows padded
  // to a multiple of 16 bytes (zeros) so every B-tile load is one aligned 16-byte vector.
  const at::Tensor xc = x.contiguous();
  const int64_t K = I * KH * KW;
  const int64_t vec = 16 / static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t ldw = (K + vec - 1) / vec * vec;
  at::Tensor w = weight.to(dtype).contiguous().reshape({O, K});
  if (ldw != K || reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 != 0) {
    at::Tensor padded = at::zeros({O, std::max<int64_t>(ldw, vec)}, w.options());
    if (K > 0) padded.narrow(1, 0, K).copy_(w);
    w = padded;
  }
  const at::Tensor in_scale_c = in_scale.contiguous();
  const at::Tensor out_scale_c = out_scale_t ? out_scale_t->contiguous() : at::Tensor();
  const at::Tensor noise_c = noise_t ? noise_t->to(dtype).contiguous() : at::Tensor();
  const at::Tensor bias_c = bias_t ? bias_t->to(dtype).contiguous() : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  auto run = [&](auto tag) {
    using AT = decltype(tag);
    using T = typename CudaType<AT>::type;
    Params<T> p;
    p.x = reinterpret_cast<const T*>(xc.data_ptr());
    p.w = reinterpret_cast<const T*>(w.data_ptr());
    p.in_scale = in_scale_c.data_ptr<float>();
    p.out_scale = out_scale_t ? out_scale_c.data_ptr<float>() : nullptr;
    p.noise = noise_t ? reinterpret_cast<const T*>(noise_c.data_ptr()) : nullptr;
    p.bias = bias_t ? reinterpret_cast<const T*>(bias_c.data_ptr()) : nullptr;
    p.y = reinterpret_cast<T*>(y.data_ptr());
    p.M = N * Ho * Wo;
    p.I = static_cast<int>(I);
    p.H = static_cast<int>(H);
    p.W = static_cast<int>(W);
    p.O = static_cast<int>(O);
    p.Ho = static_cast<int>(Ho);
    p.Wo = static_cast<int>(Wo);
    p.KH = static_cast<int>(KH);
    p.KW = static_cast<int>(KW);
    p.pad = static_cast<int>(padding);
    p.K = static_cast<int>(K);
    p.ldw = static_cast<int>(ldw);
    p.act = act_code;
    p.alpha = static_cast<float>(alpha);
    p.gain = static_cast<float>(gain);
    p.clamp = clamp < 0 ? -1.f : static_cast<float>(clamp);
    launch<T>(p, stream);
  };
  switch (dtype) {
    case at::kFloat:
      run(float{});
      break;
    case at::kHalf:
      run(at::Half{});
      break;
    default:
      run(at::BFloat16{});
      break;
  }
  return y;
}

}  // namespace batikfast

TORCH_LIBRARY_FRAGMENT(batikfast_cuda, m) {
  m.def("modulated_conv2d_forward(Tensor x, Tensor weight, Tensor in_scale, Tensor? out_scale, "
        "Tensor? noise, Tensor? bias, str act, float alpha, float gain, float clamp, int padding) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(batikfast_cuda, CUDA, m) {
  m.impl("modulated_conv2d_forward", &batikfast::modulated_conv2d_forward);
}
