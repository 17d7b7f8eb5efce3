// causal_conv3d's fast CPU forward for one ISA, included by kernels_<isa>.cpp: the Winograd
// F(4x4, 3x3) path and the implicit GEMM (see causal_conv3d.cpp for the design). The GEMMs are
// at::mm_out (MKL picks its own ISA); the transforms, prologue and epilogue loops here are compiled
// for the ISA.
#pragma once

#include "cpu/kernels.h"

namespace decovae::cpu::DECOVAE_ISA::conv3d {
using namespace ::decovae::conv3d;
using at::Tensor;
using OptTensor = std::optional<Tensor>;


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

// Tile rows per unit: about 128 tiles (an efficient GEMM N), and at least two units per frame so
// that small frames still spread over threads. A function of the frame size alone, never
// of the batch or thread count: a unit's GEMM shape fixes its rounding, so an output is
// bit-identical however the clip is batched or threaded (tests/ops/test_kernel_invariance.py).
int64_t choose_block_rows(const Tiling& t) {
  const int64_t want = std::max<int64_t>(1, (128 + t.cols - 1) / t.cols);
  const int64_t nblocks = std::max<int64_t>((t.rows + want - 1) / want, std::min<int64_t>(t.rows, 2));
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
                             transform_weight(weight), choose_block_rows(tiling)};
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

// Kernels::conv3d_forward: x and cache contiguous, y preallocated (B, Cout, To, Ho, Wo).
inline void conv3d_forward(const ConvArgs& a, Tensor& y) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "causal_conv3d_cpu", [&] {
    if (winograd_applies(a.g))
      winograd_forward<scalar_t>(a.g, a.x, a.weight, a.bias, a.cache, a.norm_weight, a.eps, a.prologue_silu,
                                 a.epilogue_silu, a.residual, y);
    else
      implicit_gemm_forward<scalar_t>(a.g, a.x, a.weight, a.bias, a.cache, a.norm_weight, a.eps, a.prologue_silu,
                                      a.epilogue_silu, a.residual, y);
  });
}

}  // namespace decovae::cpu::DECOVAE_ISA::conv3d
