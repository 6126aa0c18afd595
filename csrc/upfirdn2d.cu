// upfirdn2d: zero-insertion upsampling, padding (negative crops), FIR filtering, downsampling,
// with the semantics of NVIDIA's _upfirdn2d_ref:
//
//   y[n,c,oy,ox] = gain * sum_{ty,tx} fk[ty,tx] * U[oy*downy + ty - pady0, ox*downx + tx - padx0]
//
// where U is x with upy-1 / upx-1 zeros inserted after every sample (zero outside the image)
// and fk is f flipped in both axes (a true convolution) unless flip_filter.
//
// Only taps that land on a non-inserted sample are visited: for an output whose window starts
// at upsampled row u, the first such tap is ty0 = (-u) mod upy, and every upy-th tap after it
// reads the next input row.
//
// Kernels, fastest first:
//   - tiled, specialised at compile time for StyleGAN's separable passes (4 taps along one axis,
//     up 2, down 2, or neither): a block stages the input window of its output tile and the
//     filter in shared memory, then every thread reads only shared memory;
//   - the same tiled kernel with every factor a runtime value (any up/down/filter/padding whose
//     window fits in shared memory);
//   - direct: one thread per output, reading global memory (huge filters or factors).
#include <torch/library.h>

#include "common.h"

namespace batikfast {
namespace {

struct UfdParams {
  int64_t stride_n, stride_c, stride_h, stride_w;  // of x, in elements (any layout)
  int64_t planes;                                  // N * C
  int channels;
  int in_h, in_w, out_h, out_w;
  int upx, upy, downx, downy, padx0, pady0;
  int fw, fh;
  bool flip;
  float gain;
  // tiled kernels only
  int tiles_x, tiles_y;
  int win_w, win_h;  // shared-memory input window of one tile
};

__host__ __device__ __forceinline__ int floor_div(int a, int b) {
  return (a >= 0 ? a : a - b + 1) / b;
}

__host__ __device__ __forceinline__ int pos_mod(int a, int b) {
  const int r = a % b;
  return r < 0 ? r + b : r;
}

// fk[ty][tx] of the header comment, as the kernels index it.
__device__ __forceinline__ int filter_index(const UfdParams& p, int ty, int tx) {
  return p.flip ? ty * p.fw + tx : (p.fh - 1 - ty) * p.fw + (p.fw - 1 - tx);
}

template <typename T>
__device__ __forceinline__ const T* plane_ptr(const T* x, const UfdParams& p, int64_t plane) {
  const int64_t n = plane / p.channels;
  const int64_t c = plane - n * p.channels;
  return x + n * p.stride_n + c * p.stride_c;
}

// A template argument of 0 means "take the runtime value from p": the StyleGAN cases get loops
// with constant trip counts, the general case shares the code.
template <typename T, int UPX, int UPY, int DOWNX, int DOWNY, int FW, int FH, int TW, int TH>
__global__ void __launch_bounds__(256) upfirdn2d_tiled_kernel(T* __restrict__ y,
                                                              const T* __restrict__ x, const float* __restrict__ f,
                                                              UfdParams p) {
  extern __shared__ float smem[];
  const int upx = UPX ? UPX : p.upx, upy = UPY ? UPY : p.upy;
  const int downx = DOWNX ? DOWNX : p.downx, downy = DOWNY ? DOWNY : p.downy;
  const int fw = FW ? FW : p.fw, fh = FH ? FH : p.fh;
  // Constant when the factors are (set_window's formula), so the window loop divides by a constant.
  const int win_w = (UPX && DOWNX && FW) ? ((TW - 1) * DOWNX + FW - 1) / UPX + 2 : p.win_w;
  const int win_h = (UPY && DOWNY && FH) ? ((TH - 1) * DOWNY + FH - 1) / UPY + 2 : p.win_h;
  float* filt = smem;                  // fh * fw, already in fk order
  float* window = smem + fh * fw;      // win_h * win_w

  for (int i = threadIdx.x; i < fh * fw; i += blockDim.x) {
    const int ty = i / fw, tx = i - ty * fw;
    filt[i] = f[filter_index(p, ty, tx)];
  }

  const int tile_x = blockIdx.x % p.tiles_x, tile_y = blockIdx.x / p.tiles_x;
  const int ox0 = tile_x * TW, oy0 = tile_y * TH;
  // First input row/column any output of the tile reads.
  const int ix0 = floor_div(ox0 * downx - p.padx0 + upx - 1, upx);
  const int iy0 = floor_div(oy0 * downy - p.pady0 + upy - 1, upy);

  for (int64_t plane = blockIdx.y; plane < p.planes; plane += gridDim.y) {
    const T* xp = plane_ptr(x, p, plane);
    __syncthreads();  // the previous plane's window is no longer read
    for (int i = threadIdx.x; i < win_h * win_w; i += blockDim.x) {
      const int r = i / win_w, col = i - r * win_w;
      const int iy = iy0 + r, ix = ix0 + col;
      float v = 0.f;
      if (iy >= 0 && iy < p.in_h && ix >= 0 && ix < p.in_w)
        v = to_float(xp[iy * p.stride_h + ix * p.stride_w]);
      window[i] = v;
    }
    __syncthreads();

    T* yp = y + plane * p.out_h * p.out_w;
    for (int i = threadIdx.x; i < TW * TH; i += blockDim.x) {
      const int oy = oy0 + i / TW, ox = ox0 + i % TW;
      if (oy >= p.out_h || ox >= p.out_w) continue;
      const int uy = oy * downy - p.pady0, ux = ox * downx - p.padx0;
      const int ty0 = pos_mod(-uy, upy), tx0 = pos_mod(-ux, upx);
      const int row0 = (uy + ty0) / upy - iy0, col0 = (ux + tx0) / upx - ix0;
      // Taps that hit input samples: constant counts (fully unrolled) in the specialised kernels.
      constexpr int MAX_NY = (FH && UPY) ? (FH + UPY - 1) / UPY : 0;
      constexpr int MAX_NX = (FW && UPX) ? (FW + UPX - 1) / UPX : 0;
      const int ny = (fh - ty0 + upy - 1) / upy, nx = (fw - tx0 + upx - 1) / upx;
      float acc = 0.f;
#pragma unroll
      for (int ky = 0; ky < (MAX_NY ? MAX_NY : ny); ++ky) {
        if (MAX_NY && ky >= ny) break;
        const float* frow = filt + (ty0 + ky * upy) * fw + tx0;
        const float* wrow = window + (row0 + ky) * win_w + col0;
#pragma unroll
        for (int kx = 0; kx < (MAX_NX ? MAX_NX : nx); ++kx) {
          if (MAX_NX && kx >= nx) break;
          acc += frow[kx * upx] * wrow[kx];
        }
      }
      yp[static_cast<int64_t>(oy) * p.out_w + ox] = from_float<T>(acc * p.gain);
    }
  }
}

template <typename T>
__global__ void upfirdn2d_direct_kernel(T* __restrict__ y, const T* __restrict__ x,
                                        const float* __restrict__ f, UfdParams p) {
  const int64_t total = p.planes * p.out_h * p.out_w;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int ox = static_cast<int>(i % p.out_w);
    const int oy = static_cast<int>((i / p.out_w) % p.out_h);
    const int64_t plane = i / (static_cast<int64_t>(p.out_w) * p.out_h);
    const T* xp = plane_ptr(x, p, plane);
    const int uy = oy * p.downy - p.pady0, ux = ox * p.downx - p.padx0;
    const int ty0 = pos_mod(-uy, p.upy), tx0 = pos_mod(-ux, p.upx);
    float acc = 0.f;
    for (int ty = ty0, iy = (uy + ty0) / p.upy; ty < p.fh; ty += p.upy, ++iy) {
      if (iy < 0 || iy >= p.in_h) continue;
      for (int tx = tx0, ix = (ux + tx0) / p.upx; tx < p.fw; tx += p.upx, ++ix) {
        if (ix < 0 || ix >= p.in_w) continue;
        acc += f[filter_index(p, ty, tx)] * to_float(xp[iy * p.stride_h + ix * p.stride_w]);
      }
    }
    y[i] = from_float<T>(acc * p.gain);
  }
}

constexpr int kThreads = 256;
constexpr int kMaxSharedBytes = 48 * 1024;  // the default limit, no opt-in needed

// Input window of a TW x TH output tile (one row/column of slack for the rounding of iy0), and
// the shared memory the tile needs. In 64 bits: (TW - 1) * down overflowed int for a down factor
// of tens of millions (an output one pixel wide), giving a negative or too small window.
int64_t set_window(UfdParams& p, int tw, int th) {
  const int64_t win_w = ((tw - 1) * static_cast<int64_t>(p.downx) + p.fw - 1) / p.upx + 2;
  const int64_t win_h = ((th - 1) * static_cast<int64_t>(p.downy) + p.fh - 1) / p.upy + 2;
  p.tiles_x = (p.out_w + tw - 1) / tw;
  p.tiles_y = (p.out_h + th - 1) / th;
  if (win_w > kMaxSharedBytes || win_h > kMaxSharedBytes) return INT64_MAX;  // never fits
  p.win_w = static_cast<int>(win_w);
  p.win_h = static_cast<int>(win_h);
  return (static_cast<int64_t>(p.fw) * p.fh + win_w * win_h) * static_cast<int64_t>(sizeof(float));
}

template <typename T, int UPX, int UPY, int DOWNX, int DOWNY, int FW, int FH, int TW, int TH>
bool try_tiled(T* y, const T* x, const float* f, UfdParams p, cudaStream_t stream) {
  const int64_t bytes = set_window(p, TW, TH);
  const int64_t tiles = static_cast<int64_t>(p.tiles_x) * p.tiles_y;
  if (bytes > kMaxSharedBytes || tiles > INT32_MAX) return false;
  const dim3 grid(static_cast<unsigned>(tiles),
                  static_cast<unsigned>(std::min<int64_t>(p.planes, 65535)));
  upfirdn2d_tiled_kernel<T, UPX, UPY, DOWNX, DOWNY, FW, FH, TW, TH>
      <<<grid, kThreads, bytes, stream>>>(y, x, f, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename T>
void launch(T* y, const T* x, const float* f, const UfdParams& p, cudaStream_t stream) {
  const bool horizontal = p.fh == 1 && p.fw == 4 && p.upy == 1 && p.downy == 1;
  const bool vertical = p.fw == 1 && p.fh == 4 && p.upx == 1 && p.downx == 1;
  if (horizontal && p.upx == 2 && p.downx == 1) {
    if (try_tiled<T, 2, 1, 1, 1, 4, 1, 128, 8>(y, x, f, p, stream)) return;
  } else if (horizontal && p.upx == 1 && p.downx == 2) {
    if (try_tiled<T, 1, 1, 2, 1, 4, 1, 64, 16>(y, x, f, p, stream)) return;
  } else if (horizontal && p.upx == 1 && p.downx == 1) {
    if (try_tiled<T, 1, 1, 1, 1, 4, 1, 128, 8>(y, x, f, p, stream)) return;
  } else if (vertical && p.upy == 2 && p.downy == 1) {
    if (try_tiled<T, 1, 2, 1, 1, 1, 4, 32, 32>(y, x, f, p, stream)) return;
  } else if (vertical && p.upy == 1 && p.downy == 2) {
    if (try_tiled<T, 1, 1, 1, 2, 1, 4, 32, 16>(y, x, f, p, stream)) return;
  } else if (vertical && p.upy == 1 && p.downy == 1) {
    if (try_tiled<T, 1, 1, 1, 1, 1, 4, 32, 32>(y, x, f, p, stream)) return;
  }
  if (try_tiled<T, 0, 0, 0, 0, 0, 0, 32, 16>(y, x, f, p, stream)) return;
  if (try_tiled<T, 0, 0, 0, 0, 0, 0, 8, 8>(y, x, f, p, stream)) return;
  const int64_t total = p.planes * p.out_h * p.out_w;
  upfirdn2d_direct_kernel<T><<<grid_stride_blocks(total, kThreads), kThreads, 0, stream>>>(y, x, f, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor upfirdn2d(const at::Tensor& x, const at::Tensor& f, int64_t upx, int64_t upy,
                     int64_t downx, int64_t downy, int64_t padx0, int64_t padx1, int64_t pady0,
                     int64_t pady1, bool flip_filter, double gain) {
  BF_CHECK_CUDA(x, "x");
  BF_CHECK_FLOAT_DTYPE(x, "x");
  TORCH_CHECK(x.dim() == 4, "upfirdn2d: x must be 4-D [N, C, H, W], got shape ", x.sizes());
  BF_CHECK_CUDA(f, "f");
  BF_CHECK_SAME_DEVICE(f, x, "f", "x");
  TORCH_CHECK(f.scalar_type() == at::kFloat, "upfirdn2d: f must be float32, got ", f.scalar_type());
  TORCH_CHECK(f.dim() == 2 && f.numel() > 0, "upfirdn2d: f must be a non-empty 2-D filter, got shape ",
              f.sizes());
  TORCH_CHECK(upx >= 1 && upy >= 1, "upfirdn2d: upx and upy must be >= 1, got ", upx, ", ", upy);
  TORCH_CHECK(downx >= 1 && downy >= 1, "upfirdn2d: downx and downy must be >= 1, got ", downx, ", ",
              downy);
  const int64_t fh = f.size(0), fw = f.size(1);
  const int64_t out_h = (x.size(2) * upy + pady0 + pady1 - fh + downy) / downy;
  const int64_t out_w = (x.size(3) * upx + padx0 + padx1 - fw + downx) / downx;
  const int64_t up_h = x.size(2) * upy + std::abs(pady0) + std::abs(pady1);
  const int64_t up_w = x.size(3) * upx + std::abs(padx0) + std::abs(padx1);
  TORCH_CHECK(up_h + fh < INT32_MAX / 2 && up_w + fw < INT32_MAX / 2,
              "upfirdn2d: the upsampled, padded image is too large for 32-bit coordinates");
  TORCH_CHECK(x.size(2) * upy + pady0 + pady1 >= fh && x.size(3) * upx + padx0 + padx1 >= fw &&
                  out_h >= 1 && out_w >= 1,
              "upfirdn2d: the output would be empty: input ", x.sizes(), " up ", upx, "x", upy,
              " padding [", padx0, ", ", padx1, ", ", pady0, ", ", pady1, "] filter ", f.sizes());

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), x.size(1), out_h, out_w}, x.options());
  if (y.numel() == 0) return y;
  const at::Tensor filter = f.contiguous();

  // Coordinates are int (checked above), offsets int64 (strides times coordinates): a plane of
  // any size, in any layout, is addressed exactly.
  TORCH_CHECK(x.size(1) <= INT32_MAX, "upfirdn2d: x has more than 2**31 - 1 channels");
  UfdParams p{};
  p.stride_n = x.stride(0);
  p.stride_c = x.stride(1);
  p.stride_h = x.stride(2);
  p.stride_w = x.stride(3);
  p.planes = x.size(0) * x.size(1);
  p.channels = static_cast<int>(x.size(1));
  p.in_h = static_cast<int>(x.size(2));
  p.in_w = static_cast<int>(x.size(3));
  p.out_h = static_cast<int>(out_h);
  p.out_w = static_cast<int>(out_w);
  p.upx = static_cast<int>(upx);
  p.upy = static_cast<int>(upy);
  // A down factor only multiplies output coordinates: with one output along an axis it is never
  // used, and it may then exceed int (with two or more outputs it is below the padded size).
  p.downx = out_w == 1 ? 1 : static_cast<int>(downx);
  p.downy = out_h == 1 ? 1 : static_cast<int>(downy);
  p.padx0 = static_cast<int>(padx0);
  p.pady0 = static_cast<int>(pady0);
  p.fw = static_cast<int>(fw);
  p.fh = static_cast<int>(fh);
  p.flip = flip_filter;
  p.gain = static_cast<float>(gain);

  const auto stream = current_stream();
  BF_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "upfirdn2d", [&] {
    launch<scalar_t>(y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), filter.data_ptr<float>(), p,
                     stream);
  });
  return y;
}

}  // namespace
}  // namespace batikfast

TORCH_LIBRARY_FRAGMENT(batikfast_cuda, m) {
  m.def("upfirdn2d(Tensor x, Tensor f, int upx, int upy, int downx, int downy, int padx0, "
        "int padx1, int pady0, int pady1, bool flip_filter, float gain) -> Tensor");
}

TORCH_LIBRARY_IMPL(batikfast_cuda, CUDA, m) {
  m.impl("upfirdn2d", &batikfast::upfirdn2d);
}
