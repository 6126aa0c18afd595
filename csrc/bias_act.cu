// Fused bias + activation + gain + clamp, forward and the first two derivatives.
//
//   forward:  y  = clamp(act(x + b) * gain, -clamp, clamp)
//   backward: dx = dy * gain * act^(order)(x + b) * [|act(x + b) * gain| <= clamp]
//
// Non-finite values follow torch's backward formulas, which the reference is differentiated
// with (see chain() and backward_one()): the clamp selects dy or 0 before the activation's
// derivative multiplies it, relu's backward selects dy or 0, and the second derivative of the
// piecewise-linear activations is exactly 0.
//
// Memory-bound: each thread moves 16-byte vectors in a grid-stride loop and does the math in
// fp32. The bias channel of an element is found with one 64-bit division per vector and then
// stepped, so any `dim` (including the last one, whose channel changes every element) works
// without a division per element.
#include <torch/library.h>

#include <string_view>

#include "common.h"

namespace batikfast {
namespace {

enum Act : int { LINEAR, RELU, LRELU, TANH, SIGMOID, ELU, SELU, SOFTPLUS, SWISH };

constexpr float kSeluScale = 1.0507009873554805f;
constexpr float kSeluAlpha = 1.6732632423543772f;

int parse_act(std::string_view act) {
  if (act == "linear") return LINEAR;
  if (act == "relu") return RELU;
  if (act == "lrelu") return LRELU;
  if (act == "tanh") return TANH;
  if (act == "sigmoid") return SIGMOID;
  if (act == "elu") return ELU;
  if (act == "selu") return SELU;
  if (act == "softplus") return SOFTPLUS;
  if (act == "swish") return SWISH;
  TORCH_CHECK(false, "act must be one of linear relu lrelu tanh sigmoid elu selu softplus swish, got '",
              std::string(act), "'");
  return LINEAR;
}

__device__ __forceinline__ float sigmoidf(float z) { return 1.f / (1.f + expf(-z)); }

template <int ACT>
__device__ __forceinline__ float activate(float z, float alpha) {
  if (ACT == LINEAR) return z;
  if (ACT == RELU) return z < 0.f ? 0.f : z;  // -0 and NaN pass, as torch.relu's
  if (ACT == LRELU) return z > 0.f ? z : z * alpha;
  if (ACT == TANH) return tanhf(z);
  if (ACT == SIGMOID) return sigmoidf(z);
  if (ACT == ELU) return z > 0.f ? z : expm1f(z);
  if (ACT == SELU) return z > 0.f ? kSeluScale * z : kSeluScale * kSeluAlpha * expm1f(z);
  // log(1 + e^z) without overflow for large z or cancellation for very negative z.
  if (ACT == SOFTPLUS) return fmaxf(z, 0.f) + log1pf(expf(-fabsf(z)));
  if (ACT == SWISH) return z * sigmoidf(z);
  return z;
}

// d^order act / dz^order. At z == 0 the kinked activations take the z <= 0 branch, as
// PyTorch's relu / leaky_relu / elu gradients do. The saturating activations avoid 1 - s and
// 1 - t^2, which cancel in fp32 for large |z|: they use sigmoid(-z) and exp(-2|z|) instead.
template <int ACT>
__device__ __forceinline__ float derivative(float z, float alpha, int order) {
  const bool first = order == 1;
  if (ACT == LINEAR) return first ? 1.f : 0.f;
  if (ACT == RELU) return first ? (z > 0.f ? 1.f : 0.f) : 0.f;
  if (ACT == LRELU) return first ? (z > 0.f ? 1.f : alpha) : 0.f;
  if (ACT == TANH) {
    const float e = expf(-2.f * fabsf(z));
    const float d1 = 4.f * e / ((1.f + e) * (1.f + e));  // 1 - tanh(z)^2
    return first ? d1 : -2.f * tanhf(z) * d1;
  }
  // torch's elu double backward multiplies by (z < 0): the second derivative at 0 is 0. At a
  // NaN z both are NaN, as torch's vectorised CPU kernel gives (its scalar loop passes dy).
  const bool right_branch = z > 0.f || (!first && z == 0.f);
  if (ACT == ELU) return right_branch ? (first ? 1.f : 0.f) : expf(z);
  if (ACT == SELU) return right_branch ? (first ? kSeluScale : 0.f) : kSeluScale * kSeluAlpha * expf(z);
  const float sp = sigmoidf(z), sm = sigmoidf(-z);  // s and 1 - s
  if (ACT == SIGMOID) return first ? sp * sm : -sp * sm * tanhf(0.5f * z);  // 1 - 2s = -tanh(z/2)
  if (ACT == SOFTPLUS) return first ? sp : sp * sm;
  if (ACT == SWISH) return first ? sp * (1.f + z * sm) : sp * sm * (2.f - z * tanhf(0.5f * z));
  return 0.f;
}

// Walks the bias channel alongside the flat index: channel = (index / inner) % channels.
struct ChannelCursor {
  int64_t pos;      // index within the current run of `inner` elements
  int64_t channel;  // bias index
  __device__ ChannelCursor(int64_t index, int64_t inner, int64_t channels) {
    const int64_t run = div_nonneg(index, inner);
    pos = index - run * inner;
    channel = run - div_nonneg(run, channels) * channels;
  }
  __device__ __forceinline__ void step(int64_t inner, int64_t channels) {
    if (++pos == inner) {
      pos = 0;
      channel = channel + 1 == channels ? 0 : channel + 1;
    }
  }
};

struct Params {
  int64_t numel;
  int64_t inner;     // product of the sizes after `dim`
  int64_t channels;  // x.shape[dim]
  float alpha, gain, clamp;  // clamp < 0: no clamp
  int order;
};

// The clamp mask is decided on the output as stored (rounded to T), as the reference decides
// it on its output tensor.
template <typename T>
__device__ __forceinline__ bool inside_clamp(float y, float clamp) {
  return clamp < 0.f || fabsf(to_float(from_float<T>(y))) <= clamp;
}

template <typename T, int ACT>
__device__ __forceinline__ T forward_one(T x, float bias, const Params& p) {
  float y = activate<ACT>(to_float(x) + bias, p.alpha) * p.gain;
  if (p.clamp >= 0.f) y = clamp_keep_nan(y, p.clamp);
  return from_float<T>(y);
}

// upstream * act^(order)(z) as torch's backward formulas give it for non-finite values: relu's
// selects (0 at z <= 0 even for a NaN or inf upstream, which a NaN z passes), and the
// piecewise-linear activations have no second derivative (exactly 0, not 0 * NaN).
template <int ACT>
__device__ __forceinline__ float chain(float upstream, float z, float alpha, int order) {
  if (ACT == LINEAR || ACT == RELU || ACT == LRELU) {
    if (order == 2) return 0.f;
    if (ACT == RELU) return z <= 0.f ? 0.f : upstream;
  }
  return upstream * derivative<ACT>(z, alpha, order);
}

template <typename T, int ACT>
__device__ __forceinline__ T backward_one(T dy, T x, float bias, const Params& p) {
  const float z = to_float(x) + bias;
  float upstream = to_float(dy);
  // torch's clamp backward selects dy or 0 (also at a NaN output) and the activation's
  // derivative multiplies that, so a NaN z still gives 0 * NaN = NaN for the smooth ones.
  // The second order gets ddx * dy in one: torch keeps a NaN of ddx outside the clamp and
  // drops one of dy. Which it was is lost, so the NaN is kept.
  if (!inside_clamp<T>(activate<ACT>(z, p.alpha) * p.gain, p.clamp))
    upstream = p.order == 1 ? 0.f : upstream * 0.f;
  return from_float<T>(chain<ACT>(upstream * p.gain, z, p.alpha, p.order));
}

template <typename T, int ACT, bool BACKWARD>
__global__ void bias_act_kernel(T* __restrict__ out, const T* __restrict__ x,
                                const T* __restrict__ dy, const T* __restrict__ b, Params p) {
  constexpr int V = vec_width<T>();
  const int64_t vectors = p.numel / V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t v = first; v < vectors; v += stride) {
    const int64_t base = v * V;
    const Vec<T, V> xv = reinterpret_cast<const Vec<T, V>*>(x)[v];
    Vec<T, V> dyv;
    if (BACKWARD) dyv = reinterpret_cast<const Vec<T, V>*>(dy)[v];
    Vec<T, V> ov;
    ChannelCursor cursor(base, p.inner, p.channels);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float bias = b ? to_float(b[cursor.channel]) : 0.f;
      ov.v[j] = BACKWARD ? backward_one<T, ACT>(dyv.v[j], xv.v[j], bias, p)
                         : forward_one<T, ACT>(xv.v[j], bias, p);
      cursor.step(p.inner, p.channels);
    }
    reinterpret_cast<Vec<T, V>*>(out)[v] = ov;
  }
  // The numel % V trailing elements, one per thread of the first threads.
  const int64_t i = vectors * V + first;
  if (i < p.numel) {
    const float bias = b ? to_float(b[ChannelCursor(i, p.inner, p.channels).channel]) : 0.f;
    out[i] = BACKWARD ? backward_one<T, ACT>(dy[i], x[i], bias, p) : forward_one<T, ACT>(x[i], bias, p);
  }
}

template <typename T, bool BACKWARD>
void launch(int act, at::Tensor& out, const at::Tensor& x, const at::Tensor* dy,
            const at::Tensor* b, const Params& p) {
  constexpr int threads = 256;
  const int64_t blocks = grid_stride_blocks(std::max<int64_t>(p.numel / vec_width<T>(), 1), threads);
  const auto stream = current_stream();
  T* o = out.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const T* dyp = dy ? dy->data_ptr<T>() : nullptr;
  const T* bp = b ? b->data_ptr<T>() : nullptr;
#define BF_LAUNCH_ACT(A) \
  case A:                \
    bias_act_kernel<T, A, BACKWARD><<<blocks, threads, 0, stream>>>(o, xp, dyp, bp, p); break;
  switch (act) {
    BF_LAUNCH_ACT(LINEAR)
    BF_LAUNCH_ACT(RELU)
    BF_LAUNCH_ACT(LRELU)
    BF_LAUNCH_ACT(TANH)
    BF_LAUNCH_ACT(SIGMOID)
    BF_LAUNCH_ACT(ELU)
    BF_LAUNCH_ACT(SELU)
    BF_LAUNCH_ACT(SOFTPLUS)
    BF_LAUNCH_ACT(SWISH)
  }
#undef BF_LAUNCH_ACT
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Contiguous, and 16-byte aligned so the vector loads are legal (a contiguous view that starts
// mid-storage may not be; copying it is rare and cheap next to a fault).
at::Tensor dense(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (!is_aligned(c.data_ptr(), 16)) c = c.clone();
  return c;
}

struct Prepared {
  at::Tensor x, b;
  bool has_b;
  Params p;
  int act;
};

Prepared prepare(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& b,
                 int64_t dim, std::string_view act, double alpha, double gain, double clamp) {
  BF_CHECK_CUDA(x, "x");
  BF_CHECK_FLOAT_DTYPE(x, "x");
  TORCH_CHECK(x.dim() == 0 ? dim == 0 || dim == -1 : (dim >= -x.dim() && dim < x.dim()),
              op, ": dim must be an axis of x (rank ", x.dim(), "), got ", dim);
  Prepared r;
  r.act = parse_act(act);
  const int64_t axis = x.dim() == 0 ? 0 : (dim < 0 ? dim + x.dim() : dim);
  r.p.numel = x.numel();
  r.p.channels = x.dim() == 0 ? 1 : x.size(axis);
  r.p.inner = 1;
  for (int64_t a = axis + 1; a < x.dim(); ++a) r.p.inner *= x.size(a);
  r.p.alpha = static_cast<float>(alpha);
  r.p.gain = static_cast<float>(gain);
  r.p.clamp = clamp < 0 ? -1.f : static_cast<float>(clamp);
  r.p.order = 1;
  r.has_b = b.has_value() && b->defined();
  if (r.has_b) {
    BF_CHECK_CUDA(*b, "b");
    BF_CHECK_SAME_DEVICE(*b, x, "b", "x");
    BF_CHECK_FLOAT_DTYPE(*b, "b");
    TORCH_CHECK(b->dim() == 1 && b->size(0) == r.p.channels, op, ": b must be 1-D with x.shape[",
                dim, "] = ", r.p.channels, " elements, got shape ", b->sizes());
    // b is rounded to x's dtype as the reference rounds it; x + b is then taken in float32, as
    // NVIDIA's plugin takes it (the reference's 16-bit sum may differ by an ulp of x's dtype).
    r.b = b->to(x.scalar_type()).contiguous();
  }
  // Only now, with every argument checked, is x read (made dense, possibly copied).
  r.x = dense(x);
  // Guards against a zero divisor in the channel walk of empty axes (numel is 0 then anyway).
  r.p.inner = std::max<int64_t>(r.p.inner, 1);
  r.p.channels = std::max<int64_t>(r.p.channels, 1);
  return r;
}

at::Tensor bias_act_forward(const at::Tensor& x, const c10::optional<at::Tensor>& b, int64_t dim,
                            c10::string_view act, double alpha, double gain, double clamp) {
  Prepared r = prepare("bias_act_forward", x, b, dim, act, alpha, gain, clamp);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(r.x);
  if (r.p.numel == 0) return y;
  BF_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "bias_act_forward", [&] {
    launch<scalar_t, false>(r.act, y, r.x, nullptr, r.has_b ? &r.b : nullptr, r.p);
  });
  return y;
}

at::Tensor bias_act_backward(const at::Tensor& dy, const at::Tensor& x,
                             const c10::optional<at::Tensor>& b, int64_t dim, c10::string_view act,
                             double alpha, double gain, double clamp, int64_t order) {
  TORCH_CHECK(order == 1 || order == 2, "bias_act_backward: order must be 1 or 2, got ", order);
  // dy is checked before prepare() reads x, so that no bad call copies anything.
  BF_CHECK_CUDA(x, "x");
  BF_CHECK_CUDA(dy, "dy");
  BF_CHECK_SAME_DEVICE(dy, x, "dy", "x");
  TORCH_CHECK(dy.sizes() == x.sizes(), "bias_act_backward: dy must have the shape of x ",
              x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "bias_act_backward: dy must have x's dtype ",
              x.scalar_type(), ", got ", dy.scalar_type());
  Prepared r = prepare("bias_act_backward", x, b, dim, act, alpha, gain, clamp);
  r.p.order = static_cast<int>(order);
  const at::Tensor dy_dense = dense(dy);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(r.x);
  if (r.p.numel == 0) return dx;
  BF_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "bias_act_backward", [&] {
    launch<scalar_t, true>(r.act, dx, r.x, &dy_dense, r.has_b ? &r.b : nullptr, r.p);
  });
  return dx;
}

}  // namespace
}  // namespace batikfast

TORCH_LIBRARY_FRAGMENT(batikfast_cuda, m) {
  m.def("bias_act_forward(Tensor x, Tensor? b, int dim, str act, float alpha, float gain, "
        "float clamp) -> Tensor");
  m.def("bias_act_backward(Tensor dy, Tensor x, Tensor? b, int dim, str act, float alpha, "
        "float gain, float clamp, int order) -> Tensor");
}

TORCH_LIBRARY_IMPL(batikfast_cuda, CUDA, m) {
  m.impl("bias_act_forward", &batikfast::bias_act_forward);
  m.impl("bias_act_backward", &batikfast::bias_act_backward);
}
