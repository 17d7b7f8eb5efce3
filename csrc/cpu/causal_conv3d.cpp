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
// Other kernel sizes and spatial strides: an implicit GEMM with the CUDA kernel's index logic (im2col_tap
// of causal_conv3d_common.h), gathering blocks of the im2col matrix from cache and chunk in place.
// fp64 (for gradcheck): the straightforward composite below, at::convolution on a prologue-fused
// buffer. The backward is that composite's backward written out (device-agnostic: it also serves
// the CUDA key).
//
// Numerics of the fast path: Winograd F(4x4, 3x3) with points {0, +-1, +-2, inf} adds rounding of
// a few fp32 ulps times the size of the transform coefficients (up to ~10x): measured max error vs
// the fp32 reference is ~1e-6 to 1e-5 relative to the output scale (tests/test_causal_conv3d.py).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <cmath>
#include <vector>

#include "causal_conv3d_common.h"

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

// ---- CPU Winograd F(4x4, 3x3) fast path ----------------------------------------------------------

namespace {

constexpr int64_t kM = 4;          // outputs per tile side
constexpr int64_t kA = kM + 2;     // transformed tile side (m + r - 1)
constexpr int64_t kPos = kA * kA;  // Winograd positions: one GEMM each

// 1-D transforms (Lavin & Gray, points 0, +-1, +-2, inf). Input: v = B^T d, written with stride vs.
inline void input_1d(float d0, float d1, float d2, float d3, float d4, float d5, float* v, int64_t vs) {
  v[0 * vs] = 4.f * d0 - 5.f * d2 + d4;
  v[1 * vs] = -4.f * (d1 + d2) + d3 + d4;
  v[2 * vs] = 4.f * (d1 - d2) - d3 + d4;
  v[3 * vs] = 2.f * (d3 - d1) - d2 + d4;
  v[4 * vs] = 2.f * (d1 - d3) - d2 + d4;
  v[5 * vs] = 4.f * d1 - 5.f * d3 + d5;
}

// Weight: u = G g.
inline void weight_1d(const float g[3], float u[6]) {
  u[0] = g[0] / 4.f;
  u[1] = -(g[0] + g[1] + g[2]) / 6.f;
  u[2] = -(g[0] - g[1] + g[2]) / 6.f;
  u[3] = g[0] / 24.f + g[1] / 12.f + g[2] / 6.f;
  u[4] = g[0] / 24.f - g[1] / 12.f + g[2] / 6.f;
  u[5] = g[2];
}

// Output: y = A^T m.
inline void output_1d(const float m[6], float y[4]) {
  const float a = m[1] + m[2], b = m[1] - m[2], c = m[3] + m[4], d = m[3] - m[4];
  y[0] = m[0] + a + c;
  y[1] = b + 2.f * d;
  y[2] = a + 4.f * c;
  y[3] = b + 8.f * d + m[5];
}

// exp(v) as 2^n * p(f) with v log2(e) = n + f, f in [0, 1), p a degree-6 fit of 2^f (relative
// error < 1e-7, under an fp32 ulp). Written without library calls so that loops using it vectorise.
inline float fast_exp(float v) {
  const float t = std::min(std::max(v, -87.f), 88.f) * 1.44269504088896341f;
  const float n = std::floor(t), f = t - n;
  float p = 2.187751062e-4f;
  p = p * f + 1.238782649e-3f;
  p = p * f + 9.684578963e-3f;
  p = p * f + 5.548042774e-2f;
  p = p * f + 2.402305015e-1f;
  p = p * f + 6.931469288e-1f;
  p = p * f + 1.f;
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

inline float silu(float v) { return v / (1.f + fast_exp(-v)); }

// at::parallel_for's worker threads do not inherit the caller's InferenceMode, and ATen calls in
// them (mm_out into buffers made under it) would fail: each worker re-enters the caller's mode.
template <typename F>
void parallel_units(int64_t n, const F& body) {
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, n, 1, [&](int64_t u0, int64_t u1) {
    c10::InferenceMode guard(inference);
    body(u0, u1);
  });
}

// U[pos][co][dt * Cin + ci] = (G g G^T)[pos] for g = weight[co, ci, dt]: the K index (dt, ci)
// matches the frame-major layout of the transformed input.
Tensor transform_weight(const Tensor& weight) {
  const Tensor w = weight.to(at::kFloat).contiguous();
  const int64_t Cout = w.size(0), Cin = w.size(1), kt = w.size(2), K = kt * Cin;
  Tensor U = at::empty({kPos, Cout, K}, w.options());
  const float* wp = w.data_ptr<float>();
  float* up = U.data_ptr<float>();
  at::parallel_for(0, Cout, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t co = c0; co < c1; ++co)
      for (int64_t ci = 0; ci < Cin; ++ci)
        for (int64_t dt = 0; dt < kt; ++dt) {
          const float* g = wp + ((co * Cin + ci) * kt + dt) * 9;
          float cols[3][6], u[6][6];  // cols[dx] = G g[:, dx]
          for (int dx = 0; dx < 3; ++dx) {
            const float col[3] = {g[dx], g[3 + dx], g[6 + dx]};
            weight_1d(col, cols[dx]);
          }
          for (int i = 0; i < 6; ++i) {
            const float row[3] = {cols[0][i], cols[1][i], cols[2][i]};
            weight_1d(row, u[i]);
          }
          for (int64_t pos = 0; pos < kPos; ++pos) up[(pos * Cout + co) * K + dt * Cin + ci] = u[pos / kA][pos % kA];
        }
  });
  return U;
}

// Inputs and outputs of one call, shared read-only by the threads.
template <typename scalar_t>
struct Problem {
  Geometry g;
  Tiling tiling;
  const scalar_t* x;
  const scalar_t* cache;     // nullptr without history
  const float* norm_weight;  // nullptr without RMSNorm
  float eps;
  bool pro_silu, epi_silu;
  const float* bias;         // nullptr without bias
  const scalar_t* residual;  // nullptr without residual
  scalar_t* y;
  Tensor U;                  // (36, Cout, kt*Cin) transformed weight
  int64_t block_rows;        // tile rows per unit of work

  const scalar_t* frame_ptr(const FrameRef& f, int64_t b, int64_t c) const {
    if (f.source == FrameSource::kChunk) return x + offset5(b, c, f.index, 0, 0, g.Cin, g.T, g.H, g.W);
    return cache + offset5(b, c, f.index, 0, 0, g.Cin, g.kt - 1, g.H, g.W);
  }
};

// One unit of work, run by one thread from start to end: batch b, tile rows [row0, row0 +
// block_rows) of every frame. It walks the padded frames in order; each transformed frame is kept
// in slots p % kt and p % kt + kt of V, so the kt frames an output frame reads are always kt
// consecutive slots (one GEMM operand) without moving data.
template <typename scalar_t>
struct Unit {
  const Problem<scalar_t>& pb;
  int64_t b, row0;
  int64_t N;         // tiles per frame in this unit (block_rows * tile cols)
  int64_t slots;     // 2 kt (1 when kt == 1)
  Tensor V;          // (36, slots, Cin, N)
  Tensor M;          // (36, Cout, N)
  std::vector<float> plane, rows6, inv_rms, stage;

  Unit(const Problem<scalar_t>& p, int64_t b_, int64_t row0_) : pb(p), b(b_), row0(row0_) {
    const Geometry& g = pb.g;
    N = pb.block_rows * pb.tiling.cols;
    slots = g.kt == 1 ? 1 : 2 * g.kt;
    const auto fopts = pb.U.options();
    V = at::empty({kPos, slots, g.Cin, N}, fopts);
    M = at::empty({kPos, g.Cout, N}, fopts);
    plane.resize(plane_h() * plane_w());
    rows6.resize(kA * plane_w());
    inv_rms.resize(plane_h() * g.W);
    stage.resize(kM * pb.tiling.cols * kM);
  }

  // The zero-padded plane of a unit: input rows [row0*4 - 1, (row0+block_rows)*4 + 1), columns
  // [-1, cols*4 + 1).
  int64_t plane_h() const { return pb.block_rows * kM + 2; }
  int64_t plane_w() const { return pb.tiling.cols * kM + 2; }
  int64_t plane_row0() const { return tile_input_origin(row0, kM, 3); }

  // 1 / rms over channels for the plane rows of frame f.
  void compute_inv_rms(const FrameRef& f) {
    const Geometry& g = pb.g;
    const float inv_c = 1.f / static_cast<float>(g.Cin);
    for (int64_t r = 0; r < plane_h(); ++r) {
      const int64_t h = plane_row0() + r;
      if (!in_range(h, g.H)) continue;
      float* o = inv_rms.data() + r * g.W;
      std::fill(o, o + g.W, 0.f);
      for (int64_t c = 0; c < g.Cin; ++c) {
        const scalar_t* src = pb.frame_ptr(f, b, c) + h * g.W;
        for (int64_t w = 0; w < g.W; ++w) {
          const float v = static_cast<float>(src[w]);
          o[w] += v * v;
        }
      }
      for (int64_t w = 0; w < g.W; ++w) o[w] = 1.f / std::sqrt(o[w] * inv_c + pb.eps);
    }
  }

  // Channel c of frame f: builds the zero-padded, prologue-applied plane, then writes its
  // transformed tiles to V[:, slot, c, :].
  void transform_input(const FrameRef& f, int64_t c, int64_t slot) {
    const Geometry& g = pb.g;
    const int64_t ph = plane_h(), pw = plane_w(), cols = pb.tiling.cols;
    const int64_t pos_stride = slots * g.Cin * N;
    float* vbase = V.data_ptr<float>() + (slot * g.Cin + c) * N;
    const scalar_t* src = pb.frame_ptr(f, b, c);
    const float nw = pb.norm_weight ? pb.norm_weight[c] : 1.f;
    for (int64_t r = 0; r < ph; ++r) {
      float* prow = plane.data() + r * pw;
      const int64_t h = plane_row0() + r;
      std::fill(prow, prow + pw, 0.f);
      if (!in_range(h, g.H)) continue;
      const scalar_t* s = src + h * g.W;
      float* dst = prow + 1;
      if (pb.norm_weight) {
        const float* ir = inv_rms.data() + r * g.W;
        for (int64_t w = 0; w < g.W; ++w) dst[w] = static_cast<float>(s[w]) * ir[w] * nw;
      } else {
        for (int64_t w = 0; w < g.W; ++w) dst[w] = static_cast<float>(s[w]);
      }
      if (pb.pro_silu)
        for (int64_t w = 0; w < g.W; ++w) dst[w] = silu(dst[w]);
    }
    for (int64_t tr = 0; tr < pb.block_rows; ++tr) {
      // B^T along the 6 plane rows this tile row reads, over the whole width at once.
      const float* p0 = plane.data() + tr * kM * pw;
      for (int64_t w = 0; w < pw; ++w)
        input_1d(p0[w], p0[pw + w], p0[2 * pw + w], p0[3 * pw + w], p0[4 * pw + w], p0[5 * pw + w],
                 rows6.data() + w, pw);
      // B along each tile's row: position (i, j) goes to V[i*6 + j].
      for (int64_t i = 0; i < kA; ++i) {
        const float* q = rows6.data() + i * pw;
        float* v = vbase + (i * kA) * pos_stride + tr * cols;
        for (int64_t tc = 0; tc < cols; ++tc) {
          const float* d = q + tc * kM;
          input_1d(d[0], d[1], d[2], d[3], d[4], d[5], v + tc, pos_stride);
        }
      }
    }
  }

  void zero_slot(int64_t slot) {
    const Geometry& g = pb.g;
    float* v = V.data_ptr<float>();
    for (int64_t pos = 0; pos < kPos; ++pos) {
      float* s = v + ((pos * slots + slot) * g.Cin) * N;
      std::fill(s, s + g.Cin * N, 0.f);
    }
  }

  // Output frame t, channel co: A^T m A for every tile, then bias, SiLU, residual, store.
  void transform_output(int64_t t, int64_t co) {
    const Geometry& g = pb.g;
    const int64_t cols = pb.tiling.cols, sw = cols * kM, pos_stride = g.Cout * N;
    const float* mbase = M.data_ptr<float>() + co * N;
    const float bv = pb.bias ? pb.bias[co] : 0.f;
    for (int64_t tr = 0; tr < pb.block_rows; ++tr) {
      const int64_t trow = row0 + tr;
      if (trow >= pb.tiling.rows) break;  // padding rows of the last unit
      for (int64_t tc = 0; tc < cols; ++tc) {
        const float* m = mbase + tr * cols + tc;
        float rows[kA][kM];  // A^T along each transformed row
        for (int64_t i = 0; i < kA; ++i) {
          const float* mi = m + i * kA * pos_stride;
          const float row[6] = {mi[0], mi[pos_stride], mi[2 * pos_stride], mi[3 * pos_stride],
                                mi[4 * pos_stride], mi[5 * pos_stride]};
          output_1d(row, rows[i]);
        }
        for (int64_t j = 0; j < kM; ++j) {
          const float col[6] = {rows[0][j], rows[1][j], rows[2][j], rows[3][j], rows[4][j], rows[5][j]};
          float out[kM];
          output_1d(col, out);
          for (int64_t i = 0; i < kM; ++i) stage[i * sw + tc * kM + j] = out[i];
        }
      }
      const int64_t rows_here = tile_extent(trow, kM, g.Ho);
      for (int64_t i = 0; i < rows_here; ++i) {
        const int64_t off = offset5(b, co, t, trow * kM + i, 0, g.Cout, g.To, g.Ho, g.Wo);
        const float* s = stage.data() + i * sw;
        scalar_t* dst = pb.y + off;
        const scalar_t* res = pb.residual ? pb.residual + off : nullptr;
        for (int64_t w = 0; w < g.Wo; ++w) {
          float v = s[w] + bv;
          if (pb.epi_silu) v = silu(v);
          if (res) v += static_cast<float>(res[w]);
          dst[w] = static_cast<scalar_t>(v);
        }
      }
    }
  }

  void run() {
    const Geometry& g = pb.g;
    const int64_t K = g.kt * g.Cin;
    const int64_t last = (g.To - 1) * g.st + g.kt;  // padded frames read by some output frame
    for (int64_t p = 0; p < last; ++p) {
      const FrameRef f = padded_frame(p, g.kt, g.has_cache);
      const int64_t slot = p % g.kt;
      if (f.source == FrameSource::kZero) {  // zero history: the prologue maps 0 to 0
        zero_slot(slot);
        if (slots > 1) zero_slot(slot + g.kt);
      } else {
        if (pb.norm_weight) compute_inv_rms(f);
        for (int64_t c = 0; c < g.Cin; ++c) {
          transform_input(f, c, slot);
          if (slots > 1) {  // the second copy keeps every window of kt slots contiguous
            float* v = V.data_ptr<float>();
            for (int64_t pos = 0; pos < kPos; ++pos) {
              const float* s = v + ((pos * slots + slot) * g.Cin + c) * N;
              std::copy(s, s + N, v + ((pos * slots + slot + g.kt) * g.Cin + c) * N);
            }
          }
        }
      }
      // The output frame t whose last tap is frame p reads frames q .. p, q = t * st.
      const int64_t q = p - (g.kt - 1);
      if (q < 0 || q % g.st != 0) continue;
      const int64_t t = q / g.st;
      // M[pos] (Cout x N) = U[pos] (Cout x kt*Cin) @ V[pos][q%kt .. q%kt+kt-1] (kt*Cin x N).
      for (int64_t pos = 0; pos < kPos; ++pos) {
        Tensor out = M.select(0, pos);
        at::mm_out(out, pb.U.select(0, pos), V.select(0, pos).narrow(0, q % g.kt, g.kt).view({K, N}));
      }
      for (int64_t co = 0; co < g.Cout; ++co) transform_output(t, co);
    }
  }
};

// Tile rows per unit: about 128 tiles (an efficient GEMM N), and a unit count that keeps every
// thread busy (a multiple of the thread count, or many units).
int64_t choose_block_rows(const Tiling& t, int64_t batch, int64_t threads) {
  const int64_t want = std::max<int64_t>(1, (128 + t.cols - 1) / t.cols);
  int64_t nblocks = (t.rows + want - 1) / want;
  while (nblocks < t.rows && (batch * nblocks) % threads != 0 && batch * nblocks < 4 * threads) ++nblocks;
  return (t.rows + nblocks - 1) / nblocks;
}

template <typename scalar_t>
void winograd_forward(const Geometry& g, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                      const OptTensor& cache, const OptTensor& norm_weight, double eps, bool pro_silu, bool epi_silu,
                      const OptTensor& residual, Tensor& y) {
  const Tiling tiling = make_tiling(g.Ho, g.Wo, kM);
  Tensor nw = norm_weight ? norm_weight->to(at::kFloat).contiguous() : Tensor();
  Tensor bf = bias ? bias->to(at::kFloat).contiguous() : Tensor();
  Tensor res = residual ? residual->contiguous() : Tensor();
  const Problem<scalar_t> pb{g, tiling, x.data_ptr<scalar_t>(), cache ? cache->data_ptr<scalar_t>() : nullptr,
                             nw.defined() ? nw.data_ptr<float>() : nullptr, static_cast<float>(eps), pro_silu,
                             epi_silu, bf.defined() ? bf.data_ptr<float>() : nullptr,
                             res.defined() ? res.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                             transform_weight(weight), choose_block_rows(tiling, g.B, at::get_num_threads())};
  const int64_t blocks = (tiling.rows + pb.block_rows - 1) / pb.block_rows;
  // One parallel region per call: each unit runs start to end on one thread (few barriers, which
  // matters on a shared machine where a descheduled thread stalls every barrier).
  parallel_units(g.B * blocks, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) Unit<scalar_t>(pb, u / blocks, (u % blocks) * pb.block_rows).run();
  });
}

// ---- CPU implicit-GEMM path (any odd kernel, any stride) -----------------------------------------
// The same GEMM view and index logic as the CUDA kernel (im2col_tap), so the CPU tests exercise
// it: blocks of output rows are gathered into a K x N matrix (prologue applied, zero padding),
// multiplied by weight viewed as (Cout x K) with at::mm_out, and the epilogue applied.

template <typename scalar_t>
void implicit_gemm_forward(const Geometry& g, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                           const OptTensor& cache, const OptTensor& norm_weight, double eps, bool pro_silu,
                           bool epi_silu, const OptTensor& residual, Tensor& y) {
  const int64_t K = g.gemm_k(), P = g.padded_frames(), HW = g.H * g.W;
  const Tensor wf = weight.detach().to(at::kFloat).contiguous().view({g.Cout, K});
  const Tensor nw = norm_weight ? norm_weight->to(at::kFloat).contiguous() : Tensor();
  const Tensor bf = bias ? bias->to(at::kFloat).contiguous() : Tensor();
  const Tensor res = residual ? residual->contiguous() : Tensor();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* cp = cache ? cache->data_ptr<scalar_t>() : nullptr;
  auto frame = [&](const FrameRef& f, int64_t b, int64_t c) {
    if (f.source == FrameSource::kChunk) return xp + offset5(b, c, f.index, 0, 0, g.Cin, g.T, g.H, g.W);
    return cp + offset5(b, c, f.index, 0, 0, g.Cin, g.kt - 1, g.H, g.W);
  };
  // 1 / rms over channels of every padded frame that holds data: (B, P, H, W).
  std::vector<float> inv_rms;
  if (nw.defined()) {
    inv_rms.assign(g.B * P * HW, 0.f);
    at::parallel_for(0, g.B * P, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const FrameRef f = padded_frame(i % P, g.kt, g.has_cache);
        if (f.source == FrameSource::kZero) continue;
        float* o = inv_rms.data() + i * HW;
        for (int64_t c = 0; c < g.Cin; ++c) {
          const scalar_t* s = frame(f, i / P, c);
          for (int64_t j = 0; j < HW; ++j) o[j] += static_cast<float>(s[j]) * static_cast<float>(s[j]);
        }
        for (int64_t j = 0; j < HW; ++j) o[j] = 1.f / std::sqrt(o[j] / static_cast<float>(g.Cin) + static_cast<float>(eps));
      }
    });
  }
  const int64_t rows = g.B * g.To * g.Ho;  // output rows (b, t, oh); N index = row * Wo + ow
  const int64_t rows_per_block = std::max<int64_t>(1, 256 / g.Wo);
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  const float* nwp = nw.defined() ? nw.data_ptr<float>() : nullptr;
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  const scalar_t* rp = res.defined() ? res.data_ptr<scalar_t>() : nullptr;
  scalar_t* yp = y.data_ptr<scalar_t>();
  parallel_units(blocks, [&](int64_t b0, int64_t b1) {
    const int64_t Nb = rows_per_block * g.Wo;
    Tensor col = at::zeros({K, Nb}, wf.options()), out = at::empty({g.Cout, Nb}, wf.options());
    float* cl = col.data_ptr<float>();
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * rows_per_block, nr = std::min(rows_per_block, rows - r0);
      for (int64_t k = 0; k < K; ++k) {
        const KIndex ki = split_k(g, k);
        for (int64_t r = 0; r < nr; ++r) {
          float* dst = cl + k * Nb + r * g.Wo;
          const NIndex ni = split_n(g, (r0 + r) * g.Wo);  // ow = 0; tap.iw moves by sw per ow
          const Tap tap = im2col_tap(g, ki, ni);
          const bool row_valid = tap.frame.source != FrameSource::kZero && in_range(tap.ih, g.H);
          const scalar_t* src = row_valid ? frame(tap.frame, ni.b, ki.ci) + tap.ih * g.W : nullptr;
          const float* ir = row_valid && nwp ? inv_rms.data() + ((ni.b * P + input_frame(ni.t, ki.dt, g.st)) * g.H + tap.ih) * g.W : nullptr;
          const float scale = nwp ? nwp[ki.ci] : 1.f;
          for (int64_t ow = 0; ow < g.Wo; ++ow) {
            const int64_t iw = tap.iw + ow * g.sw;
            float v = 0.f;
            if (row_valid && in_range(iw, g.W)) {
              v = static_cast<float>(src[iw]);
              if (ir) v *= ir[iw] * scale;
              if (pro_silu) v = silu(v);
            }
            dst[ow] = v;
          }
        }
      }
      at::mm_out(out, wf, col);
      const float* op = out.data_ptr<float>();
      for (int64_t co = 0; co < g.Cout; ++co)
        for (int64_t r = 0; r < nr; ++r) {
          const NIndex ni = split_n(g, (r0 + r) * g.Wo);
          const int64_t off = offset5(ni.b, co, ni.t, ni.oh, 0, g.Cout, g.To, g.Ho, g.Wo);
          const float* s = op + co * Nb + r * g.Wo;
          for (int64_t ow = 0; ow < g.Wo; ++ow) {
            float v = s[ow] + (bp ? bp[co] : 0.f);
            if (epi_silu) v = silu(v);
            if (rp) v += static_cast<float>(rp[off + ow]);
            yp[off + ow] = static_cast<scalar_t>(v);
          }
        }
    }
  });
}

bool winograd_applies(const Geometry& g) {
  return g.kh == 3 && g.kw == 3 && g.sh == 1 && g.sw == 1;  // any temporal stride
}

}  // namespace

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "causal_conv3d_cpu", [&] {
    if (winograd_applies(g))
      winograd_forward<scalar_t>(g, xc, weight, bias, cc, norm_weight, eps, prologue_silu, epilogue_silu, residual, y);
    else
      implicit_gemm_forward<scalar_t>(g, xc, weight, bias, cc, norm_weight, eps, prologue_silu, epilogue_silu,
                                      residual, y);
  });
  return {y, make_new_cache(x, cache, g.kt)};
}

}  // namespace decovae::conv3d

TORCH_LIBRARY_IMPL(decovae, CPU, m) {
  m.impl("causal_conv3d", &decovae::conv3d::causal_conv3d_cpu);
  m.impl("causal_conv3d_backward", &decovae::conv3d::causal_conv3d_backward_composite);
}
