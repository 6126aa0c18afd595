// Fused modulated convolution: StyleGAN2's modulate -> conv -> demodulate -> noise -> bias_act.
//
//   y = clamp(act(out_scale[n, o] * conv2d(x * in_scale[n, i], weight, padding)
//                 + noise[n, 0] + bias[o], alpha) * gain, -clamp, clamp)
//
// (stride 1, cross-correlation as torch.conv2d; out_scale, noise, bias optional; clamp < 0 = off;
// act in linear / relu / lrelu.)
//
// One implicit-GEMM kernel on tensor cores (nvcuda::wmma): rows m = (n, oy, ox) of the output,
// columns o, reduction k = (ky, kx, i):
//
//   A[m, k] = x[n, i, oy + ky - padding, ox + kx - padding] * in_scale[n, i]   (0 outside)
//   B[k, o] = weight[o, i, ky, kx]
//
// The style scale is applied as a tile travels from registers to shared memory (to the A tile,
// or to the B tile when all rows of the block belong to one sample), the rest in the epilogue,
// so neither per-sample weights nor the modulated input ever reach global memory.
//
// Layout choices:
// - A reduction step is one tap (ky, kx) and BK input channels. A thread keeps one row m for the
//   whole reduction, so (n, oy, ox) is decoded once, the border test is made once per step, and
//   its BK / (threads per row) channels are one stride apart in x: per element, a load (and on
//   the small tiles the scale-and-round). Threads of a warp hold consecutive rows, and x is
//   contiguous along ox, so a warp reads 32 consecutive pixels of one channel, coalesced. In
//   shared memory A is row-major, so a thread's run of channels leaves as 16-byte stores.
// - B: the large tiles, which read each weight tile many times, take weight re-laid out once per
//   call as [O, kh, kw, I] (16-byte loads of BK contiguous channels). The small tiles serve the
//   4x4..16x16 layers, which read their (large) weight once or twice: a re-layout would cost
//   more than the convolution there, so they read [O, I, kh, kw] in place, element by element.
//   The channel-block-outer, tap-inner step order makes consecutive steps reuse the same weight
//   and x lines from L1.
// - Steps are double-buffered: the global loads of step s+1 are issued before the MMAs of step
//   s and written to the other buffer after them, so one barrier per step suffices.
// - fp16/bf16 use 16x16x16 fragments; fp32 uses tf32 16x16x8 fragments with fp32 accumulation,
//   what cuDNN does for fp32 convolutions under torch's default allow_tf32. Operands are rounded
//   to tf32 when they are stored to shared memory. With torch.backends.cudnn.allow_tf32 off,
//   batikfast.ops sends fp32 layers to cuDNN instead (wmma has no full-fp32 product).
// - The epilogue goes through shared memory so each warp writes 32 consecutive pixels of one
//   output channel; a tile may span several samples (small images), so out_scale and noise are
//   gathered per row.
// - Layers with too few output tiles to fill the GPU split the reduction over blocks
//   (deterministically: per-split fp32 slices summed in order by the last block to arrive).
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
#include <vector>

#include "common.h"

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
  __device__ static float operand_from_storage(float v) { return wmma::__float_to_tf32(v); }
  __device__ static float zero() { return 0.f; }
  __device__ static unsigned bits(float v) { return __float_as_uint(v); }
  __device__ static float from_bits(unsigned b) { return __uint_as_float(b); }
};

template <>
struct Traits<__half> {
  using mma_t = __half;
  static constexpr int kMmaK = 16;
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ static __half to_operand(float v) { return __float2half_rn(v); }
  __device__ static __half operand_from_storage(__half v) { return v; }
  __device__ static __half zero() { return __ushort_as_half(static_cast<unsigned short>(0)); }
  __device__ static unsigned bits(__half v) { return __half_as_ushort(v); }
  __device__ static __half from_bits(unsigned b) {
    return __ushort_as_half(static_cast<unsigned short>(b & 0xffffu));
  }
};

template <>
struct Traits<__nv_bfloat16> {
  using mma_t = __nv_bfloat16;
  static constexpr int kMmaK = 16;
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ static __nv_bfloat16 to_operand(float v) { return __float2bfloat16_rn(v); }
  __device__ static __nv_bfloat16 operand_from_storage(__nv_bfloat16 v) { return v; }
  __device__ static __nv_bfloat16 zero() {
    return __ushort_as_bfloat16(static_cast<unsigned short>(0));
  }
  __device__ static unsigned bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
  __device__ static __nv_bfloat16 from_bits(unsigned b) {
    return __ushort_as_bfloat16(static_cast<unsigned short>(b & 0xffffu));
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
  const T* __restrict__ x;              // [N, I, H, W] contiguous
  const T* __restrict__ w;              // [O, I, KH, KW], or tap-major [O, KH, KW, I_pad]
  const float* __restrict__ in_scale;   // [N, I]
  const float* __restrict__ out_scale;  // [N, O] or null
  const T* __restrict__ noise;          // [N, Ho * Wo] or null
  const T* __restrict__ bias;           // [O] or null
  T* __restrict__ y;                    // [N, O, Ho, Wo]
  float* __restrict__ partials;         // split-K: [splits, tiles, BN, BM] fp32, else null
  int* __restrict__ arrivals;           // split-K: [tiles] zeros, else null
  int64_t M;                            // N * Ho * Wo
  int I, H, W, O, Ho, Wo, KH, KW, pad;
  int I_pad;                            // tap-major weight: I rounded up to 16 bytes, zero-filled
  int splits;                           // blocks sharing one output tile along the reduction
  int o_begin;                          // first output channel of this launch (see plan)
  int act;
  float alpha, gain, clamp;
};

// Block tile BM x BN (rows x output channels); each reduction step covers one tap (ky, kx) and
// BK input channels (64 bytes of channels per A column for 16-bit types and for fp32).
template <typename T, int BM, int BN, int WARPS_M, int WARPS_N>
struct Tile {
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
  static constexpr int BK = sizeof(T) == 4 ? 16 : 32;
  static constexpr int kMmaK = Traits<T>::kMmaK;
  // Padding of 16 bytes shifts successive rows across banks and keeps wmma's 32-byte alignment.
  static constexpr int kPad = 16 / static_cast<int>(sizeof(T));
  static constexpr int ldA = BK + kPad;
  static constexpr int ldB = BK + kPad;
  static constexpr int ldC = BM + 4;
  static constexpr int kAGroups = kThreads / BM;  // threads sharing a row m
  static constexpr int kAPerThread = BK / kAGroups;
  static constexpr int kBRowsPerPass = kThreads / BK;
  static constexpr int kBPerThread = BN / kBRowsPerPass;
  static constexpr int kBVecsPerRow = BK / kVec;
  static constexpr int kBVecsPerThread = BN * kBVecsPerRow / kThreads;
  static constexpr int kFragsM = BM / WARPS_M / 16;
  static constexpr int kFragsN = BN / WARPS_N / 16;
  static constexpr int kAElems = BM * ldA;
  static constexpr int kBElems = BN * ldB;
  static constexpr int kMainBytes = 2 * (kAElems + kBElems) * static_cast<int>(sizeof(T));
  static constexpr int kCBytes = BN * ldC * 4;
  static constexpr int kSmemBytes = kMainBytes > kCBytes ? kMainBytes : kCBytes;
  static constexpr int kOutPerThread = BM * BN / kThreads;

  static_assert(kThreads % BM == 0, "each row m must belong to whole threads");
  static_assert(BM % 32 == 0, "a warp must share one channel group");
  static_assert(BK % kAGroups == 0, "A tile must split evenly over the threads of a row");
  static_assert((kAPerThread * sizeof(T)) % 16 == 0, "a thread's A run is whole 16-byte stores");
  static_assert(kThreads % BK == 0 && BN % kBRowsPerPass == 0, "B tile must split evenly");
  static_assert((BN * kBVecsPerRow) % kThreads == 0, "B vectors must split evenly");
  static_assert(BM % (WARPS_M * 16) == 0 && BN % (WARPS_N * 16) == 0, "warp tiles of 16x16");
  static_assert(BK % kMmaK == 0, "BK must be a multiple of the fragment depth");
  static_assert((kAElems * sizeof(T)) % 128 == 0 && (kBElems * sizeof(T)) % 128 == 0,
                "buffers must stay 128-byte aligned");
  static_assert(kSmemBytes <= 48 * 1024, "static shared memory limit");
};

__device__ __forceinline__ float activate(float v, int act, float alpha) {
  if (act == MC_RELU) return v < 0.f ? 0.f : v;  // NaN passes, as torch.relu's
  if (act == MC_LRELU) return v > 0.f ? v : v * alpha;
  return v;
}

// Reduction steps run channel block outer, tap inner: consecutive steps read the same channels
// of x shifted by one tap and the same weight rows, so they hit in L1; and the style scales of
// a thread's channels are loaded once per channel block, not once per tap.
//
// kTapMajor (the large tiles; the host guarantees that every row tile lies in one sample):
// - weight comes re-laid out as [O, KH, KW, I_pad], so a step's B tile is BN rows of BK
//   contiguous channels, read with 16-byte loads;
// - the style scale of the tile's one sample goes onto the B tile (w * s, as NVIDIA's fused
//   modconv does) instead of the A tile, which then goes to shared memory as loaded: the
//   convert-scale-round work is done on BN x BK elements per step instead of BM x BK.
// Otherwise weight is read in place, [O, I, KH, KW], one element at a time (KH*KW apart), and A
// rows are scaled per sample: cheaper for layers that read their weight only once or twice
// (where a re-layout would cost more than it saves) and general for any image size.
template <typename T, int BM, int BN, int WARPS_M, int WARPS_N, bool kTapMajor>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32)
    modulated_conv2d_kernel(const Params<T> p) {
  using Cfg = Tile<T, BM, BN, WARPS_M, WARPS_N>;
  using Tr = Traits<T>;
  using mma_t = typename Tr::mma_t;
  constexpr int BK = Cfg::BK;
  constexpr int kA = Cfg::kAPerThread;
  constexpr int kB = kTapMajor ? 1 : Cfg::kBPerThread;
  constexpr int kBV = kTapMajor ? Cfg::kBVecsPerThread : 1;

  __shared__ __align__(128) unsigned char smem[Cfg::kSmemBytes];
  T* const a_smem = reinterpret_cast<T*>(smem);
  T* const b_smem = a_smem + 2 * Cfg::kAElems;

  const int tid = threadIdx.x;
  const int m_local = tid % BM;
  const int a_group = tid / BM;
  const int o0 = p.o_begin + static_cast<int>(blockIdx.y) * BN;
  const int khw = p.KH * p.KW;

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

  // B: a thread always loads the same channel of the block, for BN / kBRowsPerPass channels o.
  const int b_channel = tid % BK;
  const int b_row = tid / BK;
  const int64_t w_row_stride = static_cast<int64_t>(p.I) * khw;

  // This block's share of the reduction steps (split-K over blockIdx.z).
  const int channel_blocks = (p.I + BK - 1) / BK;
  const int steps = channel_blocks * khw;
  const int step_begin = static_cast<int>(static_cast<int64_t>(steps) * blockIdx.z / p.splits);
  const int step_end = static_cast<int>(static_cast<int64_t>(steps) * (blockIdx.z + 1) / p.splits);

  T a_raw[kA];
  float a_scale[kA];
  T b_raw[kB];
  uint4 b_vec[kBV];
  float b_scale[Cfg::kVec];  // kTapMajor: the scales of this thread's B channels
  int scale_block = -1;
  // kTapMajor: this thread's B vectors all cover the same channels (kThreads is a multiple of
  // kBVecsPerRow), of the block's one sample.
  const int b_vec_channel = (tid % Cfg::kBVecsPerRow) * Cfg::kVec;
  const float* const tile_scale =
      p.in_scale + (static_cast<int64_t>(blockIdx.x) * BM / hw_out) * p.I;

  auto load = [&](int step) {
    const int channel_block = step / khw;
    const int tap = step - channel_block * khw;
    const int ky = tap / p.KW;
    const int kx = tap - ky * p.KW;
    const int i0 = channel_block * BK;

    const int iy = iy0 + ky;
    const int ix = ix0 + kx;
    const bool pix_ok = m_ok && static_cast<unsigned>(iy) < static_cast<unsigned>(p.H) &&
                        static_cast<unsigned>(ix) < static_cast<unsigned>(p.W);
    const int i_first = i0 + a_group * kA;
    const int i_left = p.I - i_first;  // channels of this thread's run that exist
    const T* const src = x_n + (pix_ok ? i_first * hw_in + static_cast<int64_t>(iy) * p.W + ix : 0);
#pragma unroll
    for (int j = 0; j < kA; ++j) a_raw[j] = (pix_ok && j < i_left) ? src[j * hw_in] : Tr::zero();
    if (channel_block != scale_block) {  // block-uniform
      scale_block = channel_block;
      if constexpr (kTapMajor) {
#pragma unroll
        for (int e = 0; e < Cfg::kVec; ++e) {
          const int i = i0 + b_vec_channel + e;
          b_scale[e] = i < p.I ? tile_scale[i] : 0.f;
        }
      } else {
#pragma unroll
        for (int j = 0; j < kA; ++j) a_scale[j] = (m_ok && j < i_left) ? scale_n[i_first + j] : 0.f;
      }
    }

    if constexpr (kTapMajor) {
      const int64_t row_stride = static_cast<int64_t>(khw) * p.I_pad;
#pragma unroll
      for (int q = 0; q < kBV; ++q) {
        const int idx = tid + q * Cfg::kThreads;
        const int o = o0 + idx / Cfg::kBVecsPerRow;
        const int i = i0 + (idx % Cfg::kBVecsPerRow) * Cfg::kVec;
        // I_pad is a multiple of kVec, so a vector is wholly inside or outside.
        b_vec[q] = (o < p.O && i < p.I_pad)
                       ? *reinterpret_cast<const uint4*>(p.w + o * row_stride +
                                                         static_cast<int64_t>(tap) * p.I_pad + i)
                       : make_uint4(0u, 0u, 0u, 0u);
      }
    } else {
      const int i = i0 + b_channel;
      const T* const wsrc = p.w + (i < p.I ? static_cast<int64_t>(i) * khw + tap : 0);
#pragma unroll
      for (int q = 0; q < kB; ++q) {
        const int o = o0 + b_row + q * Cfg::kBRowsPerPass;
        b_raw[q] = (o < p.O && i < p.I) ? wsrc[o * w_row_stride] : Tr::zero();
      }
    }
  };

  auto store = [&](int buf) {
    // A is row-major in shared memory: a thread's run of channels is contiguous there, so it
    // goes out as 16-byte stores.
    uint4* const a_dst = reinterpret_cast<uint4*>(a_smem + buf * Cfg::kAElems + m_local * Cfg::ldA +
                                                  a_group * kA);
    constexpr int kPerWord = 4 / static_cast<int>(sizeof(T));
    constexpr int kPerVec = 16 / static_cast<int>(sizeof(T));
#pragma unroll
    for (int c = 0; c < kA / kPerVec; ++c) {
      unsigned word[4];
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        word[w] = 0u;
#pragma unroll
        for (int e = 0; e < kPerWord; ++e) {
          const int j = c * kPerVec + w * kPerWord + e;
          const T value = kTapMajor ? Tr::operand_from_storage(a_raw[j])
                                    : Tr::to_operand(Tr::to_float(a_raw[j]) * a_scale[j]);
          word[w] |= Tr::bits(value) << (16 * e);
        }
      }
      a_dst[c] = make_uint4(word[0], word[1], word[2], word[3]);
    }
    if constexpr (kTapMajor) {
#pragma unroll
      for (int q = 0; q < kBV; ++q) {
        const int idx = tid + q * Cfg::kThreads;
        const unsigned in[4] = {b_vec[q].x, b_vec[q].y, b_vec[q].z, b_vec[q].w};
        unsigned out[4];
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          out[w] = 0u;
#pragma unroll
          for (int e = 0; e < kPerWord; ++e) {
            const T weight = Tr::from_bits(in[w] >> (16 * e));
            const T value = Tr::to_operand(Tr::to_float(weight) * b_scale[w * kPerWord + e]);
            out[w] |= Tr::bits(value) << (16 * e);
          }
        }
        *reinterpret_cast<uint4*>(b_smem + buf * Cfg::kBElems +
                                  (idx / Cfg::kBVecsPerRow) * Cfg::ldB +
                                  (idx % Cfg::kBVecsPerRow) * Cfg::kVec) =
            make_uint4(out[0], out[1], out[2], out[3]);
      }
    } else {
      T* const b_dst = b_smem + buf * Cfg::kBElems + b_row * Cfg::ldB + b_channel;
#pragma unroll
      for (int q = 0; q < kB; ++q)
        b_dst[q * Cfg::kBRowsPerPass * Cfg::ldB] = Tr::operand_from_storage(b_raw[q]);
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

  auto mma_step = [&](int buf) {
    const T* const a_base = a_smem + buf * Cfg::kAElems + warp_m * Cfg::kFragsM * 16 * Cfg::ldA;
    const T* const b_base = b_smem + buf * Cfg::kBElems + warp_n * Cfg::kFragsN * 16 * Cfg::ldB;
#pragma unroll
    for (int kk = 0; kk < BK; kk += Cfg::kMmaK) {
      wmma::fragment<wmma::matrix_a, 16, 16, Cfg::kMmaK, mma_t, wmma::row_major> a_frag[Cfg::kFragsM];
      wmma::fragment<wmma::matrix_b, 16, 16, Cfg::kMmaK, mma_t, wmma::col_major> b_frag[Cfg::kFragsN];
#pragma unroll
      for (int fm = 0; fm < Cfg::kFragsM; ++fm)
        wmma::load_matrix_sync(a_frag[fm], a_base + fm * 16 * Cfg::ldA + kk, Cfg::ldA);
#pragma unroll
      for (int fn = 0; fn < Cfg::kFragsN; ++fn)
        wmma::load_matrix_sync(b_frag[fn], b_base + fn * 16 * Cfg::ldB + kk, Cfg::ldB);
#pragma unroll
      for (int fm = 0; fm < Cfg::kFragsM; ++fm)
#pragma unroll
        for (int fn = 0; fn < Cfg::kFragsN; ++fn)
          wmma::mma_sync(acc[fm][fn], a_frag[fm], b_frag[fn], acc[fm][fn]);
    }
  };

  // Double buffer: the global loads of step s+1 are in flight during the MMAs of step s.
  if (step_begin < step_end) {
    load(step_begin);
    store(0);
  }
  __syncthreads();
  for (int s = step_begin; s < step_end; ++s) {
    const int buf = (s - step_begin) & 1;
    const bool more = s + 1 < step_end;
    if (more) load(s + 1);
    mma_step(buf);
    if (more) store(buf ^ 1);
    __syncthreads();
  }

  // The tile's sums, column-major (a warp reads 32 consecutive rows of one channel): in shared
  // memory, or with split-K in this split's slice of `partials`.
  const int frag_m = warp_m * Cfg::kFragsM * 16;
  const int frag_n = warp_n * Cfg::kFragsN * 16;
  const float* sums;
  int ld_sums;
  int64_t split_stride = 0;
  if (p.splits == 1) {
    float* const c_smem = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int fm = 0; fm < Cfg::kFragsM; ++fm)
#pragma unroll
      for (int fn = 0; fn < Cfg::kFragsN; ++fn)
        wmma::store_matrix_sync(c_smem + (frag_n + fn * 16) * Cfg::ldC + frag_m + fm * 16,
                                acc[fm][fn], Cfg::ldC, wmma::mem_col_major);
    __syncthreads();
    sums = c_smem;
    ld_sums = Cfg::ldC;
  } else {
    // Deterministic split-K: every split writes its own slice; the block that arrives last sums
    // the slices in split order and runs the epilogue, so the result never depends on timing.
    const int tile = blockIdx.y * gridDim.x + blockIdx.x;
    split_stride = static_cast<int64_t>(gridDim.x) * gridDim.y * BM * BN;
    float* const mine = p.partials + blockIdx.z * split_stride + static_cast<int64_t>(tile) * BM * BN;
#pragma unroll
    for (int fm = 0; fm < Cfg::kFragsM; ++fm)
#pragma unroll
      for (int fn = 0; fn < Cfg::kFragsN; ++fn)
        wmma::store_matrix_sync(mine + (frag_n + fn * 16) * BM + frag_m + fm * 16, acc[fm][fn],
                                BM, wmma::mem_col_major);
    __threadfence();  // this split's slice is visible device-wide before it counts as arrived
    __syncthreads();
    __shared__ int last;
    if (tid == 0) {
      last = atomicAdd(p.arrivals + tile, 1) == p.splits - 1;
      if (last) p.arrivals[tile] = 0;  // reusable without another memset
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    sums = p.partials + static_cast<int64_t>(tile) * BM * BN;
    ld_sums = BM;
  }
  if (!m_ok) return;

  const float noise = p.noise ? Tr::to_float(p.noise[n * hw_out + pix]) : 0.f;
  T* const y_row = p.y + n * p.O * hw_out + pix;
  const float* const out_scale_n = p.out_scale ? p.out_scale + n * p.O : nullptr;
#pragma unroll 4
  for (int q = 0; q < Cfg::kOutPerThread; ++q) {
    const int o_local = a_group + q * Cfg::kAGroups;
    const int o = o0 + o_local;
    if (o >= p.O) break;  // o grows with q
    const int slot = o_local * ld_sums + m_local;
    float v;
    if (p.splits == 1) {
      v = sums[slot];
    } else {
      v = 0.f;
      for (int z = 0; z < p.splits; ++z) v += __ldcg(sums + z * split_stride + slot);  // past L1
    }
    if (out_scale_n) v *= out_scale_n[o];
    v += noise;
    if (p.bias) v += Tr::to_float(p.bias[o]);
    v = activate(v, p.act, p.alpha) * p.gain;
    if (p.clamp >= 0.f) v = clamp_keep_nan(v, p.clamp);
    y_row[static_cast<int64_t>(o) * hw_out] = Tr::from_float(v);
  }
}

// CUDA's grid limits: 2**31 - 1 blocks along x, 65535 along y and z.
constexpr int64_t kMaxGridX = INT32_MAX;
constexpr int64_t kMaxGridY = 65535;

struct Launch {
  dim3 grid;
  int splits;
  int o_begin;  // first output channel of the launch
};

// The launches of one convolution with BM x BN tiles and `steps` reduction steps: row tiles on
// grid axis x, output-channel tiles on y, reduction splits on z. More than 65535 channel tiles
// (over 2M output channels with BN = 32) do not fit axis y, so they go in several launches of
// at most 65535 tiles each; the StyleGAN layers take one.
//
// The reduction is split when the output tiles alone would leave SMs idle (the 4x4 and 8x8
// layers: few rows, K = 9 * 512), keeping at least 8 reduction steps per block; that needs
// fewer tiles than SMs, so a split convolution is always a single launch.
std::vector<Launch> plan(int64_t M, int64_t O, int64_t steps, int64_t sms, int BM, int BN) {
  const int64_t m_tiles = (M + BM - 1) / BM;
  const int64_t o_tiles = (O + BN - 1) / BN;
  TORCH_CHECK(m_tiles <= kMaxGridX, "modulated_conv2d_forward: ", M,
              " output pixels (N * Ho * Wo) need ", m_tiles, " blocks of ", BM,
              " on grid axis x, more than CUDA's ", kMaxGridX);
  const int64_t tiles = m_tiles * o_tiles;
  int64_t splits = 1;
  if (tiles < sms) splits = std::min<int64_t>({(2 * sms + tiles - 1) / tiles, steps / 8, 16});
  splits = std::max<int64_t>(splits, 1);
  std::vector<Launch> launches;
  for (int64_t first = 0; first < o_tiles; first += kMaxGridY) {
    Launch l;
    l.grid = dim3(static_cast<unsigned>(m_tiles),
                  static_cast<unsigned>(std::min(o_tiles - first, kMaxGridY)),
                  static_cast<unsigned>(splits));
    l.splits = static_cast<int>(splits);
    l.o_begin = static_cast<int>(first * BN);
    launches.push_back(l);
  }
  return launches;
}

template <typename T, int BM, int BN, int WARPS_M, int WARPS_N, bool kTapMajor>
void launch_tile(Params<T> p, int64_t sms, const at::Tensor& like, cudaStream_t stream) {
  using Cfg = Tile<T, BM, BN, WARPS_M, WARPS_N>;
  const int64_t steps = static_cast<int64_t>((p.I + Cfg::BK - 1) / Cfg::BK) * p.KH * p.KW;
  for (const Launch& l : plan(p.M, p.O, steps, sms, BM, BN)) {
    p.splits = l.splits;
    p.o_begin = l.o_begin;
    at::Tensor partials, arrivals;
    if (l.splits > 1) {
      const int64_t tiles = static_cast<int64_t>(l.grid.x) * l.grid.y;
      partials = at::empty({l.splits * tiles * BM * BN}, like.options().dtype(at::kFloat));
      arrivals = at::zeros({tiles}, like.options().dtype(at::kInt));
      p.partials = partials.data_ptr<float>();
      p.arrivals = arrivals.data_ptr<int>();
    }
    modulated_conv2d_kernel<T, BM, BN, WARPS_M, WARPS_N, kTapMajor>
        <<<l.grid, Cfg::kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// plan() as a CPU op, so tests can check the launches of shapes too large to allocate: the
// flat list (grid x, grid y, grid z, first output channel) of each launch.
std::vector<int64_t> launch_plan(int64_t rows, int64_t out_channels, int64_t steps,
                                 int64_t multiprocessors, int64_t block_m, int64_t block_n) {
  TORCH_CHECK(rows >= 1 && out_channels >= 1 && steps >= 1 && multiprocessors >= 1 &&
                  block_m >= 1 && block_n >= 1,
              "_modulated_conv2d_launch_plan: every argument must be >= 1");
  std::vector<int64_t> flat;
  for (const Launch& l : plan(rows, out_channels, steps, multiprocessors, static_cast<int>(block_m),
                              static_cast<int>(block_n)))
    flat.insert(flat.end(), {l.grid.x, l.grid.y, l.grid.z, l.o_begin});
  return flat;
}

// weight as [O, KH, KW, I_pad] in x's dtype, channels zero-padded to a multiple of 16 bytes:
// one copy that also does the cast.
at::Tensor tap_major_weight(const at::Tensor& weight, at::ScalarType dtype, int64_t i_pad) {
  const int64_t O = weight.size(0), I = weight.size(1), KH = weight.size(2), KW = weight.size(3);
  const auto options = weight.options().dtype(dtype);
  at::Tensor w = i_pad == I ? at::empty({O, KH, KW, i_pad}, options)
                            : at::zeros({O, KH, KW, i_pad}, options);
  w.narrow(3, 0, I).copy_(weight.permute({0, 2, 3, 1}));
  return w;
}

// Large tiles amortise the A loads over more output channels and read every weight tile many
// times, so they take the tap-major weight (16-byte loads) and its one re-layout copy; they also
// need every 128-row tile inside one sample (Ho*Wo a multiple of 128: every StyleGAN layer from
// 16x16 up), so the style can scale the weight tile. When they would not fill about one wave of
// SMs (the 4x4..16x16 layers, which read their large weight once or twice), or for image sizes
// that are not, smaller tiles read the weight in place and scale A per row, with split-K if
// there are still too few tiles.
template <typename T>
void launch(Params<T> p, const at::Tensor& weight, const at::Tensor& like, cudaStream_t stream) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t big_blocks = ((p.M + 127) / 128) * ((p.O + 63) / 64);
  const auto dtype = like.scalar_type();
  const bool sample_tiles = (static_cast<int64_t>(p.Ho) * p.Wo) % 128 == 0;
  if (4 * big_blocks >= 3 * sms && sample_tiles) {
    const int64_t vec = 16 / static_cast<int64_t>(sizeof(T));
    p.I_pad = static_cast<int>((p.I + vec - 1) / vec * vec);
    const at::Tensor w = tap_major_weight(weight, dtype, p.I_pad);
    p.w = reinterpret_cast<const T*>(w.data_ptr());
    launch_tile<T, 128, 64, 4, 2, true>(p, sms, like, stream);
  } else {
    const at::Tensor w = weight.to(dtype).contiguous();
    p.w = reinterpret_cast<const T*>(w.data_ptr());
    p.I_pad = p.I;
    launch_tile<T, 64, 32, 2, 2, false>(p, sms, like, stream);
  }
}

// Every argument check runs before any tensor is read, cast, made contiguous or guarded, and
// reads nothing but metadata, so bad input reaching the op directly (torch.ops.batikfast_cuda,
// past the Python wrapper) raises an error naming the argument. Messages are built from string
// literals and values only: no view outlives the call.
void check_device(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.defined(), "modulated_conv2d_forward: ", name, " must be a defined tensor");
  TORCH_CHECK(t.is_cuda(), "modulated_conv2d_forward: ", name,
              " must be a CUDA tensor, got a tensor on ", t.device().str());
  TORCH_CHECK(t.device() == x.device(), "modulated_conv2d_forward: ", name,
              " must be on the same device as x (", x.device().str(), "), got ",
              t.device().str());
}

void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, "modulated_conv2d_forward: ",
              name, " must be float32, float16 or bfloat16, got ", c10::toString(s));
}

// Sizes of a validated call.
struct Shape {
  int64_t N, I, H, W, O, KH, KW, Ho, Wo;
  int act;
};

Shape validate(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& in_scale,
               const c10::optional<at::Tensor>& out_scale, const c10::optional<at::Tensor>& noise,
               const c10::optional<at::Tensor>& bias, c10::string_view act, int64_t padding) {
  Shape s{};
  // Scalars first: they need no tensor at all.
  s.act = parse_modconv_act(std::string_view(act.data(), act.size()));
  TORCH_CHECK(padding >= 0, "modulated_conv2d_forward: padding must be >= 0, got ", padding);

  TORCH_CHECK(x.defined(), "modulated_conv2d_forward: x must be a defined tensor");
  TORCH_CHECK(x.is_cuda(), "modulated_conv2d_forward: x must be a CUDA tensor, got a tensor on ",
              x.device().str());
  check_float_dtype(x, "x");
  TORCH_CHECK(x.dim() == 4, "modulated_conv2d_forward: x must be 4-D [N, I, H, W], got ", x.dim(),
              "-D");
  s.N = x.size(0);
  s.I = x.size(1);
  s.H = x.size(2);
  s.W = x.size(3);

  check_device(weight, "weight", x);
  check_float_dtype(weight, "weight");
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == s.I, "modulated_conv2d_forward: weight must be [O, ",
              s.I, ", kh, kw], got shape ", weight.sizes());
  TORCH_CHECK(weight.size(2) >= 1 && weight.size(3) >= 1,
              "modulated_conv2d_forward: weight must have a non-empty kernel, got shape ",
              weight.sizes());
  s.O = weight.size(0);
  s.KH = weight.size(2);
  s.KW = weight.size(3);

  check_device(in_scale, "in_scale", x);
  TORCH_CHECK(in_scale.scalar_type() == at::kFloat,
              "modulated_conv2d_forward: in_scale must be float32, got ",
              c10::toString(in_scale.scalar_type()));
  TORCH_CHECK(in_scale.dim() == 2 && in_scale.size(0) == s.N && in_scale.size(1) == s.I,
              "modulated_conv2d_forward: in_scale must be [", s.N, ", ", s.I, "], got shape ",
              in_scale.sizes());

  s.Ho = s.H + 2 * padding - s.KH + 1;
  s.Wo = s.W + 2 * padding - s.KW + 1;
  TORCH_CHECK(s.Ho >= 1 && s.Wo >= 1, "modulated_conv2d_forward: output would be empty (", s.Ho,
              "x", s.Wo, "): kernel ", s.KH, "x", s.KW, " is larger than the padded input ", s.H,
              "x", s.W, " with padding ", padding);

  if (out_scale.has_value() && out_scale->defined()) {
    const at::Tensor& t = *out_scale;
    check_device(t, "out_scale", x);
    TORCH_CHECK(t.scalar_type() == at::kFloat,
                "modulated_conv2d_forward: out_scale must be float32, got ",
                c10::toString(t.scalar_type()));
    TORCH_CHECK(t.dim() == 2 && t.size(0) == s.N && t.size(1) == s.O,
                "modulated_conv2d_forward: out_scale must be [", s.N, ", ", s.O, "], got shape ",
                t.sizes());
  }
  if (noise.has_value() && noise->defined()) {
    const at::Tensor& t = *noise;
    check_device(t, "noise", x);
    check_float_dtype(t, "noise");
    TORCH_CHECK(t.dim() == 4 && t.size(0) == s.N && t.size(1) == 1 && t.size(2) == s.Ho &&
                    t.size(3) == s.Wo,
                "modulated_conv2d_forward: noise must be [", s.N, ", 1, ", s.Ho, ", ", s.Wo,
                "], got shape ", t.sizes());
  }
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& t = *bias;
    check_device(t, "bias", x);
    check_float_dtype(t, "bias");
    TORCH_CHECK(t.dim() == 1 && t.size(0) == s.O, "modulated_conv2d_forward: bias must be [", s.O,
                "], got shape ", t.sizes());
  }
  // O and I * kh * kw keep room for the channel index of a tile's last column or step.
  TORCH_CHECK(std::max({s.N, s.I, s.H, s.W, s.KH, s.KW, s.Ho, s.Wo}) <= INT32_MAX &&
                  s.O <= INT32_MAX - 128 && s.I * s.KH * s.KW <= INT32_MAX - 64,
              "modulated_conv2d_forward: sizes too large (each dimension must fit in 32 bits, "
              "O and I*kh*kw with a tile to spare), got x ", x.sizes(), ", weight ",
              weight.sizes());
  return s;
}

}  // namespace

at::Tensor modulated_conv2d_forward(const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& in_scale,
                                    const c10::optional<at::Tensor>& out_scale,
                                    const c10::optional<at::Tensor>& noise,
                                    const c10::optional<at::Tensor>& bias, c10::string_view act,
                                    double alpha, double gain, double clamp, int64_t padding) {
  const Shape s = validate(x, weight, in_scale, out_scale, noise, bias, act, padding);
  const int64_t N = s.N, I = s.I, H = s.H, W = s.W;
  const int64_t O = s.O, KH = s.KH, KW = s.KW, Ho = s.Ho, Wo = s.Wo;
  const int act_code = s.act;
  // Validated above: present means given and defined.
  const at::Tensor* const out_scale_t =
      out_scale.has_value() && out_scale->defined() ? &*out_scale : nullptr;
  const at::Tensor* const noise_t = noise.has_value() && noise->defined() ? &*noise : nullptr;
  const at::Tensor* const bias_t = bias.has_value() && bias->defined() ? &*bias : nullptr;

  const c10::cuda::CUDAGuard guard(x.device());
  const auto dtype = x.scalar_type();
  at::Tensor y = at::empty({N, O, Ho, Wo}, x.options());
  if (y.numel() == 0) return y;

  // Entry normalisation: x, noise and bias contiguous in x's dtype, the scales in fp32; the
  // weight's layout goes with the tile (see launch).
  const at::Tensor xc = x.contiguous();
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
    p.w = nullptr;  // set by launch, which picks the weight layout
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
    p.partials = nullptr;
    p.arrivals = nullptr;
    p.splits = 1;
    p.o_begin = 0;
    p.act = act_code;
    p.alpha = static_cast<float>(alpha);
    p.gain = static_cast<float>(gain);
    p.clamp = clamp < 0 ? -1.f : static_cast<float>(clamp);
    launch<T>(p, weight, y, stream);
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
  m.def("_modulated_conv2d_launch_plan(int rows, int out_channels, int steps, "
        "int multiprocessors, int block_m, int block_n) -> int[]",
        &batikfast::launch_plan);
}

TORCH_LIBRARY_IMPL(batikfast_cuda, CUDA, m) {
  m.impl("modulated_conv2d_forward", &batikfast::modulated_conv2d_forward);
}
