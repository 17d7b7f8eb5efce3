// Per-ISA part shared by the warp's forward and backward kernels (included by warp_forward.h and
// warp_backward.h inside one kernels_<isa>.cpp): the reference's axis interpolation and the row
// taps with their fill, a vectorisable pass compiled for the ISA of the kernels that call it.
#pragma once

#include "cpu/warp_common.h"

namespace decovae::cpu::DECOVAE_ISA::warp {
using namespace ::decovae::cpu::warp;

// Border-clamped linear interpolation along one axis, as reference._axis: c = clamp(coord, 0, n-1),
// lo = floor(c), hi = min(lo+1, n-1), w = c - lo. NaN maps to 0 so indices always stay in range.
// `pass` is the reference's gradient mask: torch.clamp with scalar bounds gives a zero gradient
// where coord equals a bound, not only beyond it.
template <typename acc_t>
inline void axis(acc_t coord, int n, int& lo, int& step, acc_t& w, acc_t& pass) {
  const acc_t top = acc_t(n - 1);
  pass = (coord > acc_t(0) && coord < top) ? acc_t(1) : acc_t(0);
  acc_t c = coord > acc_t(0) ? coord : acc_t(0);
  c = c < top ? c : top;
  lo = static_cast<int>(c);  // c >= 0: truncation is floor
  w = c - static_cast<acc_t>(lo);
  step = lo + 1 < n ? 1 : 0;  // hi = lo + step
}

// Output rows are visited in (b, y, t) order (forward and backward), so consecutive rows are a plane apart and the hardware
// prefetchers miss them: each row prefetches the inputs and output lines of the row kRowsAhead
// later into L2 (two rows ahead into L2 measured 2-8% faster than one row ahead into L1).
constexpr int64_t kRowsAhead = 2;

// always_inline, as prefetch_next (warp_forward.h): GCC takes a function that only prefetches for
// one without side effects and deletes the calls to it unless it was inlined first (measured: a
// non-inlined prefetch_next left no prefetch in the library, and the SIMD forward ran ~2x slower).
__attribute__((always_inline)) inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }
__attribute__((always_inline)) inline void prefetch_l2_for_write(void* p) { __builtin_prefetch(p, 1, 2); }

template <typename acc_t>
inline acc_t lerp(acc_t a, acc_t b, acc_t w) {
  return a + w * (b - a);
}

// Corner offsets and weights of one row of sample points, for a volume with the given row and
// plane strides (in pixels). For corner (s, y) the offset is base[s*2+y][x]; x1 = x0 + dx[x].
template <typename acc_t>
struct RowTaps {
  std::vector<int32_t> base[4], dx;
  std::vector<acc_t> wx, wy, ws, px, py, ps;
  explicit RowTaps(int64_t W) : dx(W), wx(W), wy(W), ws(W), px(W), py(W), ps(W) {
    for (auto& b : base) b.resize(W);
  }
};

template <typename acc_t, typename motion_t>
void fill_taps(RowTaps<acc_t>& t, const motion_t* __restrict mu, const motion_t* __restrict mv,
               const motion_t* __restrict ms, int y, int D, int H, int W, int32_t row_stride, int32_t plane_stride) {
  int32_t* __restrict b00 = t.base[0].data();
  int32_t* __restrict b01 = t.base[1].data();
  int32_t* __restrict b10 = t.base[2].data();
  int32_t* __restrict b11 = t.base[3].data();
  int32_t* __restrict dxp = t.dx.data();
  acc_t* __restrict wxp = t.wx.data();
  acc_t* __restrict wyp = t.wy.data();
  acc_t* __restrict wsp = t.ws.data();
  acc_t* __restrict pxp = t.px.data();
  acc_t* __restrict pyp = t.py.data();
  acc_t* __restrict psp = t.ps.data();
  const acc_t fy = static_cast<acc_t>(y);
#pragma omp simd
  for (int x = 0; x < W; ++x) {
    int x0, sx, y0, sy, s0, ss;
    acc_t ax, ay, as, qx, qy, qs;
    axis<acc_t>(static_cast<acc_t>(x) + static_cast<acc_t>(mu[x]), W, x0, sx, ax, qx);
    axis<acc_t>(fy + static_cast<acc_t>(mv[x]), H, y0, sy, ay, qy);
    axis<acc_t>(static_cast<acc_t>(ms[x]), D, s0, ss, as, qs);
    const int32_t r0 = s0 * plane_stride + y0 * row_stride + x0;
    b00[x] = r0;
    b01[x] = r0 + sy * row_stride;
    b10[x] = r0 + ss * plane_stride;
    b11[x] = r0 + ss * plane_stride + sy * row_stride;
    dxp[x] = sx;
    wxp[x] = ax;
    wyp[x] = ay;
    wsp[x] = as;
    pxp[x] = qx;
    pyp[x] = qy;
    psp[x] = qs;
  }
}

}  // namespace decovae::cpu::DECOVAE_ISA::warp
