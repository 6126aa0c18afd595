// Diffusion forward noising: y[n] = x_scale[n] * x[n] + noise_scale[n] * eps[n].
//
// eps is the given noise tensor, or N(0, 1) drawn in the kernel and never written to memory.
// The draw is counter-based: element i of the flattened x uses counter position
// pos = offset + i; one Philox4x32-10 call with key = seed and counter = pos / 4 gives four
// 32-bit words, turned into four normals by Box-Muller on the pairs (w0, w1) -> angle a and
// (w2, w3) -> angle b; the element takes number pos % 4 of (r_a cos a, r_b cos b, r_a sin a,
// r_b sin b), the stream kernels/diffusion_noise.py draws too. So a result depends only on
// (seed, offset, i): reproducible across launches, grid sizes, GPUs and backends, and a call
// with offset + k continues the stream of a call with offset. Each thread handles one counter (four positions), so every
// Philox output is used once.
#include <torch/library.h>

#include "common.h"

namespace batikfast {
namespace {

enum Mode : int { SCALE_ONLY, GIVEN_NOISE, PHILOX };

struct NoiseParams {
  int64_t numel;
  int64_t per_sample;  // elements of one x[n]
  int64_t offset;
  uint64_t seed;
  bool aligned;  // x, noise and y allow 4-element vector access
};

// Philox4x32 with 10 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").
__device__ __forceinline__ uint4 philox4x32_10(uint4 ctr, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint32_t hi0 = __umulhi(0xD2511F53u, ctr.x), lo0 = 0xD2511F53u * ctr.x;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, ctr.z), lo1 = 0xCD9E8D57u * ctr.z;
    ctr = make_uint4(hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0);
  }
  return ctr;
}

// A uniform in (0, 1] from the top 24 bits, (k + 0.5) / 2**24 rounded to fp32: the same
// conversion (and the same Philox words) as the Triton kernel, so both backends draw the same
// noise for a seed up to the last bits of log/sin/cos. It is 1.0 for the largest k only, which
// gives a zero-radius pair; it is never 0, so the log is finite.
__device__ __forceinline__ float uniform_open(uint32_t w) {
  return (static_cast<float>(w >> 8) + 0.5f) * (1.f / 16777216.f);
}

__device__ __forceinline__ void box_muller(uint32_t a, uint32_t b, float& z0, float& z1) {
  const float radius = sqrtf(-2.f * logf(uniform_open(a)));
  float s, c;
  sincospif(2.f * uniform_open(b), &s, &c);
  z0 = radius * c;
  z1 = radius * s;
}

template <typename T, int MODE>
__global__ void diffusion_noise_kernel(T* __restrict__ y, const T* __restrict__ x,
                                       const T* __restrict__ noise,
                                       const float* __restrict__ x_scale,
                                       const float* __restrict__ noise_scale, NoiseParams p) {
  // Counter positions of this call: [offset, offset + numel); groups of 4 share one counter.
  // Without in-kernel noise the phase is irrelevant and groups start at element 0.
  const int64_t phase = MODE == PHILOX ? p.offset % 4 : 0;
  const int64_t first_group = MODE == PHILOX ? p.offset / 4 : 0;
  const int64_t groups = (phase + p.numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const uint32_t k0 = static_cast<uint32_t>(p.seed), k1 = static_cast<uint32_t>(p.seed >> 32);
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += stride) {
    const int64_t start = 4 * g - phase;  // element index of the group's first position
    float eps[4] = {0.f, 0.f, 0.f, 0.f};
    if (MODE == PHILOX) {
      const uint64_t counter = static_cast<uint64_t>(first_group + g);
      const uint4 w = philox4x32_10(
          make_uint4(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u),
          k0, k1);
      // Positions 4c .. 4c+3 take (r_a cos a, r_b cos b, r_a sin a, r_b sin b): the layout the
      // Triton kernel's join of its four normals produces.
      box_muller(w.x, w.y, eps[0], eps[2]);
      box_muller(w.z, w.w, eps[1], eps[3]);
    }
    const int64_t lo = start < 0 ? 0 : start;
    int64_t sample = div_nonneg(lo, p.per_sample);
    int64_t within = lo - sample * p.per_sample;
    // Vector access needs the group to start on a 4-element boundary: phase 0 and a full group.
    if (p.aligned && phase == 0 && start + 4 <= p.numel) {
      const Vec<T, 4> xv = reinterpret_cast<const Vec<T, 4>*>(x + start)[0];
      Vec<T, 4> nv;
      if (MODE == GIVEN_NOISE) nv = reinterpret_cast<const Vec<T, 4>*>(noise + start)[0];
      Vec<T, 4> out;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float v = x_scale[sample] * to_float(xv.v[j]);
        if (MODE == GIVEN_NOISE) v += noise_scale[sample] * to_float(nv.v[j]);
        if (MODE == PHILOX) v += noise_scale[sample] * eps[j];
        out.v[j] = from_float<T>(v);
        if (++within == p.per_sample) {
          within = 0;
          ++sample;
        }
      }
      reinterpret_cast<Vec<T, 4>*>(y + start)[0] = out;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t i = start + j;
        if (i < 0 || i >= p.numel) continue;
        float v = x_scale[sample] * to_float(x[i]);
        if (MODE == GIVEN_NOISE) v += noise_scale[sample] * to_float(noise[i]);
        if (MODE == PHILOX) v += noise_scale[sample] * eps[j];
        y[i] = from_float<T>(v);
        if (++within == p.per_sample) {
          within = 0;
          ++sample;
        }
      }
    }
  }
}

template <typename T, int MODE>
void launch(at::Tensor& y, const at::Tensor& x, const at::Tensor* noise, const at::Tensor& x_scale,
            const at::Tensor* noise_scale, const NoiseParams& p) {
  constexpr int threads = 256;
  const int64_t groups = (p.offset % 4 + p.numel + 3) / 4;
  diffusion_noise_kernel<T, MODE>
      <<<grid_stride_blocks(groups, threads), threads, 0, current_stream()>>>(
          y.data_ptr<T>(), x.data_ptr<T>(), noise ? noise->data_ptr<T>() : nullptr,
          x_scale.data_ptr<float>(), noise_scale ? noise_scale->data_ptr<float>() : nullptr, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_per_sample(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.is_cuda(), "diffusion_noise_forward: ", name, " must be a CUDA tensor, got a tensor on ",
              t.device());
  TORCH_CHECK(t.device() == x.device(), "diffusion_noise_forward: ", name,
              " must be on the same device as x (", x.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "diffusion_noise_forward: ", name,
              " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0), "diffusion_noise_forward: ", name,
              " must have shape [", x.size(0), "] (one value per sample), got ", t.sizes());
}

at::Tensor diffusion_noise_forward(const at::Tensor& x, const at::Tensor& x_scale,
                                   const c10::optional<at::Tensor>& noise_scale,
                                   const c10::optional<at::Tensor>& noise, int64_t seed,
                                   int64_t offset) {
  BF_CHECK_CUDA(x, "x");
  BF_CHECK_FLOAT_DTYPE(x, "x");
  TORCH_CHECK(x.dim() >= 1, "diffusion_noise_forward: x must have a batch axis, got a 0-d tensor");
  check_per_sample(x_scale, "x_scale", x);
  const bool has_scale = noise_scale.has_value() && noise_scale->defined();
  const bool has_noise = has_scale && noise.has_value() && noise->defined();
  if (has_scale) check_per_sample(*noise_scale, "noise_scale", x);
  if (noise.has_value() && noise->defined()) {
    BF_CHECK_CUDA(*noise, "noise");
    BF_CHECK_SAME_DEVICE(*noise, x, "noise", "x");
    TORCH_CHECK(noise->sizes() == x.sizes(), "diffusion_noise_forward: noise must have x's shape ",
                x.sizes(), ", got ", noise->sizes());
  }
  TORCH_CHECK(seed >= 0, "diffusion_noise_forward: seed must be >= 0, got ", seed);
  TORCH_CHECK(offset >= 0, "diffusion_noise_forward: offset must be >= 0, got ", offset);

  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor xs = x_scale.contiguous();
  at::Tensor ns, nz;
  if (has_scale) ns = noise_scale->contiguous();
  if (has_noise) nz = noise->to(x.scalar_type()).contiguous();
  at::Tensor y = at::empty_like(xc);
  NoiseParams p;
  p.numel = xc.numel();
  if (p.numel == 0) return y;
  p.per_sample = p.numel / x.size(0);
  p.offset = offset;
  p.seed = static_cast<uint64_t>(seed);
  const int64_t vec_bytes = 4 * static_cast<int64_t>(xc.element_size());
  p.aligned = is_aligned(xc.data_ptr(), vec_bytes) && is_aligned(y.data_ptr(), vec_bytes) &&
              (!has_noise || is_aligned(nz.data_ptr(), vec_bytes));

  BF_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "diffusion_noise_forward", [&] {
    if (!has_scale) {
      launch<scalar_t, SCALE_ONLY>(y, xc, nullptr, xs, nullptr, p);
    } else if (has_noise) {
      launch<scalar_t, GIVEN_NOISE>(y, xc, &nz, xs, &ns, p);
    } else {
      launch<scalar_t, PHILOX>(y, xc, nullptr, xs, &ns, p);
    }
  });
  return y;
}

}  // namespace
}  // namespace batikfast

TORCH_LIBRARY_FRAGMENT(batikfast_cuda, m) {
  m.def("diffusion_noise_forward(Tensor x, Tensor x_scale, Tensor? noise_scale, Tensor? noise, "
        "int seed, int offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(batikfast_cuda, CUDA, m) {
  m.impl("diffusion_noise_forward", &batikfast::diffusion_noise_forward);
}
