// causal_conv3d on CUDA (semantics: decovae_fast/ops/reference.py).
//
// fp16/bf16 forward: one implicit-GEMM kernel on tensor cores (WMMA 16x16x16, fp32 accumulate).
// GEMM view (causal_conv3d_common.h): M = Cout, N = output positions (b, t, oh, ow), K = (ci, dt,
// dy, dx), the order of weight's own layout, so weight viewed as (Cout, K) is the A matrix. The B
// matrix (im2col) is never materialised: each K x N element is gathered from cache or chunk in
// place (zero for spatial padding or zero history) with the index logic the CPU tests exercise,
// the prologue (RMSNorm with per-position statistics from a small pre-pass, SiLU) is applied in
// fp32 as it is loaded, and the result is rounded to the input dtype for the MMA. The epilogue
// (bias, SiLU, residual) runs on the fp32 accumulators. Deliberately simple (no pipelining, no
// vectorised loads): correctness first.
// fp32/fp64 forward and the backward: the device-agnostic ATen composites of
// csrc/cpu/causal_conv3d.cpp (cuDNN convolution on a prologue-fused buffer).
//
// NOTE: written and compiled without a GPU; it has never run on one.
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "causal_conv3d.h"
#include "causal_conv3d_common.h"

namespace decovae::conv3d {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

namespace {

template <typename T>
struct Convert;
template <>
struct Convert<__half> {
  static __device__ float to_float(__half v) { return __half2float(v); }
  static __device__ __half from_float(float v) { return __float2half(v); }
};
template <>
struct Convert<__nv_bfloat16> {
  static __device__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __nv_bfloat16 from_float(float v) { return __float2bfloat16(v); }
};

[[maybe_unused]] __device__ inline float silu(float v) { return v / (1.f + __expf(-v)); }

template <typename T>
__device__ inline const T* frame_base(const T* x, const T* cache, const Geometry& g, const FrameRef& f, int64_t b,
                                      int64_t c) {
  if (f.source == FrameSource::kChunk) return x + offset5(b, c, f.index, 0, 0, g.Cin, g.T, g.H, g.W);
  return cache + offset5(b, c, f.index, 0, 0, g.Cin, g.kt - 1, g.H, g.W);
}

// inv_rms[b, p, h, w] = 1 / sqrt(mean_c x^2 + eps) for every padded frame p that holds data.
template <typename T>
__global__ void inv_rms_kernel(const T* x, const T* cache, Geometry g, float eps, float* inv_rms) {
  const int64_t P = g.padded_frames(), HW = g.H * g.W;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= g.B * P * HW) return;
  const int64_t hw = i % HW, p = (i / HW) % P, b = i / (HW * P);
  const FrameRef f = padded_frame(p, g.kt, g.has_cache);
  if (f.source == FrameSource::kZero) {
    inv_rms[i] = 0.f;  // never read: zero frames are skipped by the loader
    return;
  }
  float sum = 0.f;
  for (int64_t c = 0; c < g.Cin; ++c) {
    const float v = Convert<T>::to_float(frame_base(x, cache, g, f, b, c)[hw]);
    sum += v * v;
  }
  inv_rms[i] = rsqrtf(sum / static_cast<float>(g.Cin) + eps);
}

struct Epilogue {
  const float* bias;  // nullptr: none
  bool silu;
  const void* residual;  // same dtype as y; nullptr: none
};

struct Prologue {
  const float* inv_rms;      // (B, P, H, W); nullptr without RMSNorm
  const float* norm_weight;  // (Cin,) fp32
  bool silu;
};

constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 128;  // 4 warps, each 32 x 32
[[maybe_unused]] constexpr int kLdA = kBK + 8, kLdB = kBN + 8, kLdC = kBN + 4;     // padding against bank conflicts

template <typename T>
__global__ void __launch_bounds__(kThreads)
    implicit_gemm_kernel(const T* x, const T* cache, const T* weight, Geometry g, Prologue pro, Epilogue epi, T* y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  __shared__ __align__(32) T As[kBM * kLdA];
  __shared__ __align__(32) T Bs[kBK * kLdB];
  __shared__ __align__(32) float Cs[kBM * kLdC];

  const int tid = threadIdx.x, warp = tid / 32, warp_m = warp / 2, warp_n = warp % 2;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t K = g.gemm_k(), N = g.gemm_n(), P = g.padded_frames();

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
    // A tile: weight rows m0.., columns k0.. (zero outside).
    for (int e = tid; e < kBM * kBK; e += kThreads) {
      const int r = e / kBK, c = e % kBK;
      const int64_t m = m0 + r, k = k0 + c;
      As[r * kLdA + c] = (m < g.Cout && k < K) ? weight[m * K + k] : Convert<T>::from_float(0.f);
    }
    // B tile: gathered im2col elements with the prologue applied (consecutive threads take
    // consecutive n, i.e. consecutive ow: coalesced reads along W).
    for (int e = tid; e < kBK * kBN; e += kThreads) {
      const int r = e / kBN, c = e % kBN;
      const int64_t k = k0 + r, n = n0 + c;
      float v = 0.f;
      if (k < K && n < N) {
        const NIndex ni = split_n(g, n);
        const KIndex ki = split_k(g, k);
        const Tap tap = im2col_tap(g, ki, ni);
        if (tap.valid) {
          v = Convert<T>::to_float(frame_base(x, cache, g, tap.frame, ni.b, tap.ci)[tap.ih * g.W + tap.iw]);
          if (pro.inv_rms) {
            const int64_t p = input_frame(ni.t, ki.dt, g.st);
            v *= pro.inv_rms[((ni.b * P + p) * g.H + tap.ih) * g.W + tap.iw] * pro.norm_weight[tap.ci];
          }
          if (pro.silu) v = silu(v);
        }
      }
      Bs[r * kLdB + c] = Convert<T>::from_float(v);
    }
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[2];
    for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], As + (warp_m * 32 + i * 16) * kLdA, kLdA);
    for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], Bs + warp_n * 32 + j * 16, kLdB);
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    __syncthreads();
  }

  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(Cs + (warp_m * 32 + i * 16) * kLdC + warp_n * 32 + j * 16, acc[i][j], kLdC,
                              wmma::mem_row_major);
  __syncthreads();

  const int64_t out_plane = g.To * g.Ho * g.Wo;
  for (int e = tid; e < kBM * kBN; e += kThreads) {
    const int r = e / kBN, c = e % kBN;
    const int64_t m = m0 + r, n = n0 + c;
    if (m >= g.Cout || n >= N) continue;
    float v = Cs[r * kLdC + c];
    if (epi.bias) v += epi.bias[m];
    if (epi.silu) v = silu(v);
    // n = ((b * To + t) * Ho + oh) * Wo + ow, so y's offset is b * Cout * plane + m * plane + (n % plane).
    const int64_t b = n / out_plane, off = (b * g.Cout + m) * out_plane + n % out_plane;
    if (epi.residual) v += Convert<T>::to_float(static_cast<const T*>(epi.residual)[off]);
    y[off] = Convert<T>::from_float(v);
  }
#else
  __trap();  // tensor-core bf16/fp16 WMMA needs sm_80 or newer; the host side never launches it there
#endif
}

template <typename T>
void launch(const Geometry& g, const Tensor& x, const OptTensor& cache, const Tensor& weight, const OptTensor& bias,
            const OptTensor& norm_weight, double eps, bool pro_silu, bool epi_silu, const OptTensor& residual,
            Tensor& y) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* cp = cache ? reinterpret_cast<const T*>(cache->data_ptr()) : nullptr;
  Tensor inv_rms, nw, bf;
  Prologue pro{nullptr, nullptr, pro_silu};
  if (norm_weight) {
    inv_rms = at::empty({g.B, g.padded_frames(), g.H, g.W}, x.options().dtype(at::kFloat));
    nw = norm_weight->to(at::kFloat).contiguous();
    const int64_t total = inv_rms.numel();
    const int threads = 256;
    inv_rms_kernel<T><<<static_cast<unsigned>((total + threads - 1) / threads), threads, 0, stream>>>(
        xp, cp, g, static_cast<float>(eps), inv_rms.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pro.inv_rms = inv_rms.data_ptr<float>();
    pro.norm_weight = nw.data_ptr<float>();
  }
  if (bias) bf = bias->to(at::kFloat).contiguous();
  Epilogue epi{bf.defined() ? bf.data_ptr<float>() : nullptr, epi_silu,
               residual ? residual->data_ptr() : nullptr};
  const dim3 grid(static_cast<unsigned>((g.gemm_n() + kBN - 1) / kBN), static_cast<unsigned>((g.Cout + kBM - 1) / kBM));
  implicit_gemm_kernel<T><<<grid, kThreads, 0, stream>>>(xp, cp, reinterpret_cast<const T*>(weight.data_ptr()), g,
                                                          pro, epi, reinterpret_cast<T*>(y.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<Tensor, Tensor> causal_conv3d_cuda(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                              at::IntArrayRef stride, const OptTensor& cache,
                                              const OptTensor& norm_weight, double eps, bool prologue_silu,
                                              bool epilogue_silu, const OptTensor& residual) {
  check_causal_conv3d_args(x, weight, bias, stride, cache, norm_weight, residual);
  const auto dtype = x.scalar_type();
  const bool tensor_cores = at::cuda::getCurrentDeviceProperties()->major >= 8;
  if ((dtype != at::kHalf && dtype != at::kBFloat16) || !tensor_cores)
    return causal_conv3d_composite(x, weight, bias, stride, cache, norm_weight, eps, prologue_silu, epilogue_silu,
                                   residual);
  const c10::cuda::CUDAGuard guard(x.device());
  const Geometry g = make_geometry(x.size(0), x.size(1), weight.size(0), x.size(2), x.size(3), x.size(4),
                                   weight.size(2), weight.size(3), weight.size(4), stride[0], stride[1], stride[2],
                                   cache.has_value());
  const Tensor xc = x.contiguous(), wc = weight.contiguous();
  const OptTensor cc = cache ? OptTensor(cache->contiguous()) : std::nullopt;
  const OptTensor rc = residual ? OptTensor(residual->contiguous()) : std::nullopt;
  Tensor y = at::empty({g.B, g.Cout, g.To, g.Ho, g.Wo}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() > 0) {
    if (dtype == at::kHalf)
      launch<__half>(g, xc, cc, wc, bias, norm_weight, eps, prologue_silu, epilogue_silu, rc, y);
    else
      launch<__nv_bfloat16>(g, xc, cc, wc, bias, norm_weight, eps, prologue_silu, epilogue_silu, rc, y);
  }
  return {y, make_new_cache(x, cache, g.kt)};
}

}  // namespace decovae::conv3d

TORCH_LIBRARY_IMPL(decovae, CUDA, m) {
  m.impl("causal_conv3d", &decovae::conv3d::causal_conv3d_cuda);
  m.impl("causal_conv3d_backward", &decovae::conv3d::causal_conv3d_backward_composite);
}
