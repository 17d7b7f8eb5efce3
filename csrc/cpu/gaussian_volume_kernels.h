// The Gaussian scale space (gaussian_volume and its backward) for one ISA, included by
// kernels_<isa>.cpp: separable blurs row by row with the inner loop over a contiguous row,
// vectorised for the ISA; fp32 math (fp64 for fp64 inputs), OpenMP over rows; each output element
// is written by one thread in a fixed order, so results are deterministic.
#pragma once

#include "cpu/kernels.h"

namespace decovae::cpu::DECOVAE_ISA::gaussian {

// Normalised taps of radius ceil(3 sigma), built in fp64 and rounded as the reference does.
template <typename acc_t>
std::vector<acc_t> gaussian_taps(double sigma) {
  const int r = static_cast<int>(std::ceil(3.0 * sigma));
  std::vector<double> t(2 * r + 1);
  double sum = 0;
  for (int k = -r; k <= r; ++k) {
    const double x = k / sigma;
    t[k + r] = std::exp(-0.5 * x * x);
    sum += t[k + r];
  }
  std::vector<acc_t> out(t.size());
  for (size_t k = 0; k < t.size(); ++k) out[k] = static_cast<acc_t>(t[k] / sum);
  return out;
}

// Weight of input index i in output index y of the 1-D replicate-border blur of length n: the sum
// of the taps k with clamp(y + k - r, 0, n-1) == i (an interval of k; prefix sums P).
template <typename acc_t>
acc_t tap_weight(const std::vector<acc_t>& prefix, int r, int n, int y, int i) {
  const int lo = std::max(0, i == 0 ? 0 : i - y + r);
  const int hi = std::min(2 * r, i == n - 1 ? 2 * r : i - y + r);
  return hi < lo ? acc_t(0) : prefix[hi + 1] - prefix[lo];
}

template <typename acc_t>
std::vector<acc_t> prefix_sums(const std::vector<acc_t>& taps) {
  std::vector<acc_t> p(taps.size() + 1, acc_t(0));
  for (size_t k = 0; k < taps.size(); ++k) p[k + 1] = p[k] + taps[k];
  return p;
}

// One blur level of all planes (planes x H x W, acc_t): horizontal pass into tmp, vertical into out.
template <typename acc_t, typename out_t>
void blur_planes(const acc_t* in, acc_t* tmp, out_t* out, int64_t out_plane_stride, int64_t planes, int H, int W,
                 const std::vector<acc_t>& taps) {
  const int r = static_cast<int>(taps.size() / 2), K = static_cast<int>(taps.size());
  const int64_t HW = static_cast<int64_t>(H) * W;
  at::parallel_for(0, planes * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> padded(W + 2 * r);
    for (int64_t row = begin; row < end; ++row) {
      const acc_t* src = in + row * W;
      for (int j = 0; j < W + 2 * r; ++j) padded[j] = src[std::clamp(j - r, 0, W - 1)];
      acc_t* dst = tmp + row * W;
      std::fill(dst, dst + W, acc_t(0));
      for (int k = 0; k < K; ++k) {
        const acc_t tk = taps[k];
        const acc_t* p = padded.data() + k;
#pragma omp simd
        for (int x = 0; x < W; ++x) dst[x] += tk * p[x];
      }
    }
  });
  at::parallel_for(0, planes * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(W);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / H;
      const int y = static_cast<int>(row % H);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int k = 0; k < K; ++k) {
        const acc_t tk = taps[k];
        const acc_t* p = tmp + plane * HW + static_cast<int64_t>(std::clamp(y + k - r, 0, H - 1)) * W;
#pragma omp simd
        for (int x = 0; x < W; ++x) acc[x] += tk * p[x];
      }
      out_t* dst = out + plane * out_plane_stride + static_cast<int64_t>(y) * W;
      for (int x = 0; x < W; ++x) dst[x] = static_cast<out_t>(acc[x]);
    }
  });
}

template <typename scalar_t>
void gaussian_volume_kernel(const at::Tensor& x0, at::Tensor& out, int64_t levels, double sigma0) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t planes = x0.size(0) * x0.size(1);
  const int H = static_cast<int>(x0.size(2)), W = static_cast<int>(x0.size(3));
  const int64_t HW = static_cast<int64_t>(H) * W, D = levels + 1;
  const auto acc_opts = x0.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor xa = x0.to(acc_opts.dtype()).contiguous();
  at::Tensor tmp = at::empty({planes, H, W}, acc_opts);
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const scalar_t* src = x0.const_data_ptr<scalar_t>();
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) std::copy(src + p * HW, src + (p + 1) * HW, o + p * D * HW);
  });
  for (int64_t i = 1; i <= levels; ++i) {
    const auto taps = gaussian_taps<acc_t>(sigma0 * std::pow(2.0, static_cast<double>(i - 1)));
    blur_planes<acc_t, scalar_t>(xa.const_data_ptr<acc_t>(), tmp.mutable_data_ptr<acc_t>(), o + i * HW, D * HW,
                                 planes, H, W, taps);
  }
}

// Transpose of one level's blur, added into grad_x (planes x H x W, acc_t). The blur is V(H(x))
// (horizontal first), so the transpose is H^T(V^T(g)).
template <typename acc_t, typename scalar_t>
void blur_transpose_add(const scalar_t* g, int64_t g_plane_stride, acc_t* tmp, acc_t* grad_x, int64_t planes, int H,
                        int W, const std::vector<acc_t>& taps) {
  const int r = static_cast<int>(taps.size() / 2);
  const auto prefix = prefix_sums(taps);
  // V^T: input row i gathers output rows y in [i-r, i+r] with weight tap_weight(y, i).
  at::parallel_for(0, planes * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(W);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / H;
      const int i = static_cast<int>(row % H);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int y = std::max(0, i - r); y <= std::min(H - 1, i + r); ++y) {
        const acc_t w = tap_weight(prefix, r, H, y, i);
        const scalar_t* p = g + plane * g_plane_stride + static_cast<int64_t>(y) * W;
#pragma omp simd
        for (int x = 0; x < W; ++x) acc[x] += w * static_cast<acc_t>(p[x]);
      }
      std::copy(acc.begin(), acc.end(), tmp + row * W);
    }
  });
  // H^T: interior columns are a correlation of the zero-padded row with the mirrored taps; the two
  // border columns also collect the replicated samples (tap_weight).
  at::parallel_for(0, planes * H, 16, [&](int64_t begin, int64_t end) {
    const int K = static_cast<int>(taps.size());
    std::vector<acc_t> padded(W + 2 * r, acc_t(0)), acc(W);
    for (int64_t row = begin; row < end; ++row) {
      const acc_t* src = tmp + row * W;
      std::copy(src, src + W, padded.begin() + r);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int k = 0; k < K; ++k) {
        const acc_t tk = taps[K - 1 - k];
        const acc_t* p = padded.data() + k;
#pragma omp simd
        for (int x = 0; x < W; ++x) acc[x] += tk * p[x];
      }
      for (int i : {0, W - 1}) {
        acc_t s = 0;
        for (int y = std::max(0, i - r); y <= std::min(W - 1, i + r); ++y) s += tap_weight(prefix, r, W, y, i) * src[y];
        acc[i] = s;
      }
      acc_t* dst = grad_x + row * W;
      for (int x = 0; x < W; ++x) dst[x] += acc[x];
    }
  });
}

template <typename scalar_t>
void gaussian_volume_backward_kernel(const at::Tensor& g, at::Tensor& grad_x, int64_t levels, double sigma0) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t planes = g.size(0) * g.size(1), D = g.size(2);
  const int H = static_cast<int>(g.size(3)), W = static_cast<int>(g.size(4));
  const int64_t HW = static_cast<int64_t>(H) * W;
  const auto acc_opts = g.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  // Level 0 is the identity.
  at::Tensor acc = g.select(2, 0).to(acc_opts.dtype()).contiguous();
  at::Tensor tmp = at::empty({planes, H, W}, acc_opts);
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  for (int64_t i = 1; i <= levels; ++i) {
    const auto taps = gaussian_taps<acc_t>(sigma0 * std::pow(2.0, static_cast<double>(i - 1)));
    blur_transpose_add<acc_t, scalar_t>(gp + i * HW, D * HW, tmp.mutable_data_ptr<acc_t>(),
                                        acc.mutable_data_ptr<acc_t>(), planes, H, W, taps);
  }
  grad_x.copy_(acc.view(grad_x.sizes()));
}

// Kernels::gaussian_volume / gaussian_volume_backward: contiguous input, preallocated output.
inline void gaussian_volume(const at::Tensor& x0, at::Tensor& out, int64_t levels, double sigma0) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "gaussian_volume",
                                  [&] { gaussian_volume_kernel<scalar_t>(x0, out, levels, sigma0); });
}

inline void gaussian_volume_backward(const at::Tensor& g, at::Tensor& grad_x, int64_t levels, double sigma0) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gaussian_volume_backward",
                                  [&] { gaussian_volume_backward_kernel<scalar_t>(g, grad_x, levels, sigma0); });
}

}  // namespace decovae::cpu::DECOVAE_ISA::gaussian
