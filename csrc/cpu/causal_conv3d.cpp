// causal_conv3d on the CPU: forward and backward (semantics: decovae_fast/ops/reference.py).
//
// Forward fast path (3x3 spatial kernel, spatial stride 1, fp32/fp16/bf16): Winograd F(4x4, 3x3) in space
// for every temporal tap. A 4x4 output tile costs 36 multiply-adds per (Cin, Cout, dt) instead of
// 144, so the GEMMs do 4x fewer FLOPs than a direct convolution. The kt temporal taps and Cin fold
// into the GEMM K dimension: transformed frames are stored frame-major ([pos][frame][Cin][tile]),
// so the kt frames an output frame reads form one contiguous (kt*Cin) x tiles matrix. The
// prologue (RMSNorm, SiLU) is applied while the input tiles are built, reading cache and chunk in
// place; the epilogue (bias, SiLU, residual) while the output tiles are written. The GEMMs are
// at::mm_out calls (MKL), one per (Winograd position, output frame), run in parallel.
// These fast paths live in causal_conv3d_kernels.h, compiled per ISA (kernels.h); this file holds
// the checks, the composite and the backward.
// Other kernel sizes and spatial strides: an implicit GEMM with the CUDA kernel's index logic (im2col_tap
// of causal_conv3d_common.h), gathering blocks of the im2col matrix from cache and chunk in place.
// fp64 (for gradcheck): the straightforward composite below, at::convolution on a prologue-fused
// buffer. The backward is that composite's backward written out (device-agnostic: it also serves
// the CUDA key).
//
// Numerics of the fast path: Winograd F(4x4, 3x3) with points {0, +-1, +-2, inf} adds rounding of
// a few fp32 ulps times the size of the transform coefficients (up to ~10x): measured max error vs
// the fp32 reference is ~1e-6 to 1e-5 relative to the output scale (tests/ops/test_causal_conv3d.py).
#include "causal_conv3d.h"
#include "cpu/kernels.h"

namespace decovae::conv3d {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---- argument checks (the Python wrapper validates too; these protect direct op calls) ----------
// Also used by csrc/cuda/causal_conv3d.cu, as are the composite functions below.

void check_causal_conv3d_args(const Tensor& x, const Tensor& weight, const OptTensor& bias, at::IntArrayRef stride,
                              const OptTensor& cache, const OptTensor& norm_weight, const OptTensor& residual) {
  TORCH_CHECK(x.dim() == 5, "causal_conv3d: x must be (B, C, T, H, W), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 5, "causal_conv3d: weight must be (Cout, Cin, kt, kh, kw), got ", weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(1), "causal_conv3d: weight has ", weight.size(1),
              " input channels but x has ", x.size(1));
  TORCH_CHECK(weight.size(2) >= 1 && weight.size(3) % 2 == 1 && weight.size(4) % 2 == 1,
              "causal_conv3d: weight's spatial kernel must be odd, got ", weight.sizes());
  TORCH_CHECK(stride.size() == 3 && stride[0] >= 1 && stride[1] >= 1 && stride[2] >= 1,
              "causal_conv3d: stride must be 3 positive ints, got ", stride);
  TORCH_CHECK(x.size(2) >= 1, "causal_conv3d: x must have at least one frame");
  const auto dt = x.scalar_type();
  TORCH_CHECK(weight.scalar_type() == dt, "causal_conv3d: weight dtype ", weight.scalar_type(), " != x dtype ", dt);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "causal_conv3d: bias must be (Cout,)");
    TORCH_CHECK(bias->scalar_type() == dt, "causal_conv3d: bias dtype must match x");
  }
  if (cache) {
    const std::vector<int64_t> want = {x.size(0), x.size(1), weight.size(2) - 1, x.size(3), x.size(4)};
    TORCH_CHECK(cache->sizes() == at::IntArrayRef(want), "causal_conv3d: cache must have shape ", want,
                ", got ", cache->sizes());
    TORCH_CHECK(cache->scalar_type() == dt, "causal_conv3d: cache dtype must match x");
  }
  if (norm_weight) {
    TORCH_CHECK(norm_weight->dim() == 1 && norm_weight->size(0) == x.size(1),
                "causal_conv3d: norm_weight must be (C,)");
    TORCH_CHECK(norm_weight->scalar_type() == dt, "causal_conv3d: norm_weight dtype must match x");
  }
  if (residual) {
    const std::vector<int64_t> want = {x.size(0), weight.size(0), out_size(x.size(2), stride[0]),
                                       out_size(x.size(3), stride[1]), out_size(x.size(4), stride[2])};
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(want), "causal_conv3d: residual must have shape ", want,
                ", got ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == dt, "causal_conv3d: residual dtype must match x");
  }
}

static Geometry geometry_of(const Tensor& x, const Tensor& weight, at::IntArrayRef stride, bool has_cache) {
  return make_geometry(x.size(0), x.size(1), weight.size(0), x.size(2), x.size(3), x.size(4), weight.size(2),
                       weight.size(3), weight.size(4), stride[0], stride[1], stride[2], has_cache);
}

static at::ScalarType acc_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ---- device-agnostic composite pieces (also used by csrc/cuda/causal_conv3d.cu) ------------------

// The last kt-1 raw frames of [history, x], frame by frame from wherever they live.
Tensor make_new_cache(const Tensor& x, const OptTensor& cache, int64_t kt) {
  const int64_t T = x.size(2);
  Tensor out = at::empty({x.size(0), x.size(1), kt - 1, x.size(3), x.size(4)}, x.options().memory_format(
                                                                                    at::MemoryFormat::Contiguous));
  for (int64_t i = 0; i < kt - 1; ++i) {
    const FrameRef f = new_cache_frame(i, kt, T, cache.has_value());
    Tensor dst = out.select(2, i);
    if (f.source == FrameSource::kZero) dst.zero_();
    else dst.copy_((f.source == FrameSource::kCache ? *cache : x).select(2, f.index));
  }
  return out;
}

struct Prologue {
  Tensor full;     // [history, x] in the accumulation dtype, (B, C, kt-1+T, H, W)
  Tensor inv_rms;  // (B, 1, P, H, W) when norm_weight is given
  Tensor normed;   // after RMSNorm, before SiLU
  Tensor a;        // the conv input
};

static Prologue run_prologue(const Tensor& x, const OptTensor& cache, const OptTensor& norm_weight, double eps,
                             bool silu, int64_t kt) {
  const auto acc = acc_type(x);
  Prologue p;
  Tensor xa = x.to(acc);
  Tensor hist = cache ? cache->to(acc) : at::zeros({x.size(0), x.size(1), kt - 1, x.size(3), x.size(4)}, xa.options());
  p.full = at::cat({hist, xa}, 2);
  p.normed = p.full;
  if (norm_weight) {
    p.inv_rms = at::rsqrt(p.full.pow(2).mean({1}, true) + eps);
    p.normed = p.full * p.inv_rms * norm_weight->to(acc).view({1, -1, 1, 1, 1});
  }
  p.a = silu ? at::silu(p.normed) : p.normed;
  return p;
}

static std::vector<int64_t> conv_padding(const Tensor& weight) { return {0, weight.size(3) / 2, weight.size(4) / 2}; }

// conv(a) + bias, in the accumulation dtype.
static Tensor conv_acc(const Tensor& a, const Tensor& weight, const OptTensor& bias, at::IntArrayRef stride) {
  const auto acc = a.scalar_type();
  OptTensor b = bias ? OptTensor(bias->to(acc)) : std::nullopt;
  return at::convolution(a, weight.to(acc), b, stride, conv_padding(weight), {1, 1, 1}, false, {0, 0, 0}, 1);
}

std::tuple<Tensor, Tensor> causal_conv3d_composite(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                                   at::IntArrayRef stride, const OptTensor& cache,
                                                   const OptTensor& norm_weight, double eps, bool prologue_silu,
                                                   bool epilogue_silu, const OptTensor& residual) {
  check_causal_conv3d_args(x, weight, bias, stride, cache, norm_weight, residual);
  const int64_t kt = weight.size(2);
  Prologue p = run_prologue(x, cache, norm_weight, eps, prologue_silu, kt);
  Tensor y = conv_acc(p.a, weight, bias, stride);
  if (epilogue_silu) y = at::silu(y);
  if (residual) y = y + residual->to(y.scalar_type());
  return {y.to(x.scalar_type()).contiguous(), make_new_cache(x, cache, kt)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> causal_conv3d_backward_composite(
    const Tensor& grad_y, const Tensor& x, const Tensor& weight, const OptTensor& bias, at::IntArrayRef stride,
    const OptTensor& cache, const OptTensor& norm_weight, double eps, bool prologue_silu, bool epilogue_silu,
    std::array<bool, 5> mask) {
  check_causal_conv3d_args(x, weight, bias, stride, cache, norm_weight, std::nullopt);
  TORCH_CHECK(grad_y.dim() == 5 && grad_y.size(1) == weight.size(0), "causal_conv3d_backward: grad_y must be the output's shape");
  const int64_t kt = weight.size(2), T = x.size(2);
  const bool need_x = mask[0], need_w = mask[1], need_b = mask[2] && bias, need_c = mask[3] && cache,
             need_n = mask[4] && norm_weight;
  const bool need_a = need_x || need_c || need_n;
  Prologue p = run_prologue(x, cache, norm_weight, eps, prologue_silu, kt);
  const auto acc = p.a.scalar_type();
  Tensor g = grad_y.to(acc);
  if (epilogue_silu) {  // d silu(z) / dz = s (1 + z (1 - s)), s = sigmoid(z)
    Tensor z = conv_acc(p.a, weight, bias, stride);
    Tensor s = at::sigmoid(z);
    g = g * s * (1 + z * (1 - s));
  }
  Tensor ga, gw, gb, gx, gc, gn;
  if (need_a || need_w) {
    auto grads = at::convolution_backward(g, p.a, weight.to(acc), std::nullopt, stride, conv_padding(weight),
                                          {1, 1, 1}, false, {0, 0, 0}, 1, {need_a, need_w, false});
    ga = std::get<0>(grads);
    if (need_w) gw = std::get<1>(grads).to(weight.scalar_type());
  }
  if (need_b) gb = g.sum({0, 2, 3, 4}).to(bias->scalar_type());
  if (need_a) {
    Tensor gnormed = ga;
    if (prologue_silu) {
      Tensor s = at::sigmoid(p.normed);
      gnormed = ga * s * (1 + p.normed * (1 - s));
    }
    Tensor gfull = gnormed;
    if (norm_weight) {
      // normed_c = u_c r w_c, r = (mean_k u_k^2 + eps)^(-1/2):
      // d/du_c = r w_c g_c - u_c r^3 mean_k(w_k g_k u_k).
      const Tensor& r = p.inv_rms;
      Tensor gw_n = gnormed * norm_weight->to(acc).view({1, -1, 1, 1, 1});
      if (need_n) gn = (gnormed * p.full * r).sum({0, 2, 3, 4}).to(norm_weight->scalar_type());
      gfull = r * gw_n - p.full * r.pow(3) * (gw_n * p.full).mean({1}, true);
    }
    if (need_x) gx = gfull.narrow(2, kt - 1, T).to(x.scalar_type()).contiguous();
    if (need_c) gc = gfull.narrow(2, 0, kt - 1).to(cache->scalar_type()).contiguous();
  }
  return {gx, gw, gb, gc, gn};
}

std::tuple<Tensor, Tensor> causal_conv3d_cpu(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                             at::IntArrayRef stride, const OptTensor& cache,
                                             const OptTensor& norm_weight, double eps, bool prologue_silu,
                                             bool epilogue_silu, const OptTensor& residual) {
  check_causal_conv3d_args(x, weight, bias, stride, cache, norm_weight, residual);
  const Geometry g = geometry_of(x, weight, stride, cache.has_value());
  if (x.scalar_type() == at::kDouble)  // fp64 (gradcheck): the composite, accumulating in fp64
    return causal_conv3d_composite(x, weight, bias, stride, cache, norm_weight, eps, prologue_silu, epilogue_silu,
                                   residual);
  const Tensor xc = x.contiguous();
  const OptTensor cc = cache ? OptTensor(cache->contiguous()) : std::nullopt;
  Tensor y = at::empty({g.B, g.Cout, g.To, g.Ho, g.Wo}, x.options().memory_format(at::MemoryFormat::Contiguous));
  decovae::cpu::kernels().conv3d_forward(
      {g, xc, weight, bias, cc, norm_weight, eps, prologue_silu, epilogue_silu, residual}, y);
  return {y, make_new_cache(x, cache, g.kt)};
}

}  // namespace decovae::conv3d

TORCH_LIBRARY_IMPL(decovae, CPU, m) {
  m.impl("causal_conv3d", &decovae::conv3d::causal_conv3d_cpu);
  m.impl("causal_conv3d_backward", &decovae::conv3d::causal_conv3d_backward_composite);
}
