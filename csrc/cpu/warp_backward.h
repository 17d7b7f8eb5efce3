// The warp's backward (warp_sample_backward) for one ISA, included by kernels_<isa>.cpp: gradients
// of sum(g * sample(volume, motion)), semantics of decovae_fast/ops/reference.py.
//
// Layout: the volume (read for the motion gradient) and the volume gradient (scattered into) are
// packed as (B, D, H, W+1, Cp) in acc_t, Cp = C rounded up to 4, each row carrying a copy of its
// last column (warp_common.h). A pixel's channels are then contiguous and its two x-neighbours
// are two runs of Cp values at fixed distance, so each corner is read and updated 4 channels at a
// time with vector ops (GCC vector extensions, compiled for the ISA of the including file: SSE,
// AVX2 or AVX-512 encodings), instead of 8 scalar reads and 8 scalar read-modify-writes per
// channel in the planar layout. At the right border (x0 = W-1, weight 0 on x1) the x1 update
// lands in the copy column, which is folded back into column W-1 when the gradient is unpacked.
//
// Output rows are visited in (b, y, t) order, as in the forward: the T frames of one image row
// sample (and scatter into) nearly the same volume rows, which then stay in L2.
//
// The scatter is sequential within a work chunk (two pixels can hit the same corner). Chunks are
// a fixed split of the rows, each with its own partial packed gradient, summed in chunk order, so
// the result is bitwise reproducible for a given chunk count (no atomics).
#pragma once

#include "cpu/warp_forward.h"  // pack_row: one packed fp32 row (Cp = 4), per ISA

namespace decovae::cpu::DECOVAE_ISA::warp {

// Four and eight lanes of acc_t (float or double).
template <typename acc_t>
struct Lanes {
  typedef acc_t v4 __attribute__((vector_size(4 * sizeof(acc_t))));
  typedef acc_t v8 __attribute__((vector_size(8 * sizeof(acc_t))));
};

template <typename V, typename T>
__attribute__((always_inline)) inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T, typename V>
__attribute__((always_inline)) inline void store(T* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

// [sum(a), sum(b), sum(c), 0] with a 4x4 transpose (6 shuffles, 3 adds for three sums).
template <typename V>
__attribute__((always_inline)) inline V sum3(const V& a, const V& b, const V& c) {
  const V z = {};
  const V ab = __builtin_shufflevector(a, b, 0, 4, 1, 5) + __builtin_shufflevector(a, b, 2, 6, 3, 7);
  const V cz = __builtin_shufflevector(c, z, 0, 4, 1, 5) + __builtin_shufflevector(c, z, 2, 6, 3, 7);
  return __builtin_shufflevector(ab, cz, 0, 1, 4, 5) + __builtin_shufflevector(ab, cz, 2, 3, 6, 7);
}

// Per-thread buffers for one output row.
template <typename acc_t>
struct BackwardRow {
  BackwardRow(int64_t W, int64_t Cp) : taps(W), g((W + 1) * Cp), h(4 * W) {}
  RowTaps<acc_t> taps;
  std::vector<acc_t> g;  // the incoming gradient of the row, packed (W+1, Cp)
  std::vector<acc_t> h;  // per pixel: d loss / d (sample x, y, s), before the clamp masks, and 0
};

// One output row: scatters g * corner weights into gvol (a packed partial gradient, or nullptr)
// and sums the motion gradient from vol (the packed volume, or nullptr). kCorners is 4, or 2 when
// D = 1 (the level weight is then 0 and both level corners are the same rows). kGroups is Cp / 4
// when known at compile time, else 0 and `groups` gives it. With one group (C <= 4) a corner's
// (x0, x1) x 4 channels are 8 contiguous values, read and updated as one 8-lane vector (one
// 256-bit operation with AVX2 and AVX-512, two 128-bit ones on the baseline).
template <typename acc_t, int kCorners, int kGroups>
void backward_row(BackwardRow<acc_t>& r, const acc_t* vol, acc_t* gvol, int W, int64_t groups) {
  using V = typename Lanes<acc_t>::v4;
  using V8 = typename Lanes<acc_t>::v8;
  const RowTaps<acc_t>& t = r.taps;
  const acc_t one = 1;
  const int64_t G = kGroups ? kGroups : groups, Cp = 4 * G;
  for (int x = 0; x < W; ++x) {
    const acc_t fx = t.wx[x], fy = t.wy[x], fs = kCorners == 4 ? t.ws[x] : acc_t(0);
    const acc_t w[4] = {(one - fs) * (one - fy), (one - fs) * fy, fs * (one - fy), fs * fy};
    int64_t off[kCorners];
    for (int k = 0; k < kCorners; ++k) off[k] = static_cast<int64_t>(t.base[k][x]) * Cp;
    V su = {}, sv = {}, ss = {};
    for (int64_t c = 0; c < Cp; c += 4) {
      const V g = load<V>(r.g.data() + x * Cp + c);
      if (gvol) {
        const V g0 = g * (one - fx), g1 = g * fx;
        for (int k = 0; k < kCorners; ++k) {
          acc_t* p = gvol + off[k] + c;
          store(p, load<V>(p) + g0 * w[k]);
          store(p + Cp, load<V>(p + Cp) + g1 * w[k]);
        }
      }
      if (vol) {
        V a[kCorners], dx = {};
        for (int k = 0; k < kCorners; ++k) {
          V lo, hi;
          if constexpr (kGroups == 1) {
            const V8 p = load<V8>(vol + off[k]);
            lo = __builtin_shufflevector(p, p, 0, 1, 2, 3);
            hi = __builtin_shufflevector(p, p, 4, 5, 6, 7);
          } else {
            lo = load<V>(vol + off[k] + c);
            hi = load<V>(vol + off[k] + Cp + c);
          }
          const V d = hi - lo;
          a[k] = lo + fx * d;
          dx += w[k] * d;
        }
        su += g * dx;
        if constexpr (kCorners == 4) {
          sv += g * ((one - fs) * (a[1] - a[0]) + fs * (a[3] - a[2]));
          ss += g * ((one - fy) * (a[2] - a[0]) + fy * (a[3] - a[1]));
        } else {
          sv += g * (a[1] - a[0]);
        }
      }
    }
    if (vol) store(r.h.data() + 4 * x, sum3(su, sv, ss));
  }
}

template <typename acc_t>
void backward_row(BackwardRow<acc_t>& r, const acc_t* vol, acc_t* gvol, int W, int64_t groups, int corners) {
  if (corners == 4) {
    if (groups == 1) backward_row<acc_t, 4, 1>(r, vol, gvol, W, 1);
    else backward_row<acc_t, 4, 0>(r, vol, gvol, W, groups);
  } else {
    if (groups == 1) backward_row<acc_t, 2, 1>(r, vol, gvol, W, 1);
    else backward_row<acc_t, 2, 0>(r, vol, gvol, W, groups);
  }
}

// One packed row (W+1, Cp) from C channel rows (channel stride cstride); lanes >= C are 0. The
// forward's SIMD pack_row where it applies (fp32 math, C <= 4).
template <typename acc_t, typename scalar_t>
void pack_channels(const scalar_t* src, int64_t cstride, int64_t C, int64_t Cp, int W, acc_t* dst) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (Cp == kLanes) return pack_row(src, cstride, static_cast<int>(C), W, dst);
  }
  for (int x = 0; x < W; ++x) {
    for (int64_t c = 0; c < Cp; ++c) dst[x * Cp + c] = c < C ? static_cast<acc_t>(src[c * cstride + x]) : acc_t(0);
  }
  for (int64_t c = 0; c < Cp; ++c) dst[W * Cp + c] = dst[(W - 1) * Cp + c];
}

template <typename scalar_t, typename motion_t>
void backward_kernel(const scalar_t* grad, const scalar_t* vol, const motion_t* mot, scalar_t* grad_vol,
                     motion_t* grad_mot, const Dims& d) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t HW = d.H * d.W, Cp = (d.C + 3) / 4 * 4, Wp = d.W + 1;
  const int64_t plane = d.H * Wp, item = d.D * plane * Cp;  // packed: pixels per level, values per batch item
  const int64_t part = d.B * item, rows = d.B * d.T * d.H;
  const int D = static_cast<int>(d.D), H = static_cast<int>(d.H), W = static_cast<int>(d.W);
  const int corners = D > 1 ? 4 : 2;

  // One chunk of rows per thread (each with its own partial gradient, summed in a fixed order), as
  // far as the partial gradients fit the budget (grad_parts_budget, warp.cpp).
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  if (grad_vol) {
    const int64_t part_bytes = part * static_cast<int64_t>(sizeof(acc_t));
    chunks = std::max<int64_t>(1, std::min(chunks, grad_parts_budget() / part_bytes));
  }
  at::Tensor packed, parts;
  if (grad_mot) {
    packed = pool().empty({part}, acc_type);
    acc_t* pv = packed.mutable_data_ptr<acc_t>();
    at::parallel_for(0, d.B * d.D * d.H, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {  // i = (b * D + s) * H + y
        const int64_t b = i / (d.D * d.H), sy = i % (d.D * d.H);
        pack_channels(vol + b * d.C * d.D * HW + sy * d.W, d.D * HW, d.C, Cp, W, pv + i * Wp * Cp);
      }
    });
  }
  // The partials start 2112 bytes past a huge page, the packed volume on one: with the same layout,
  // a read of the volume and an update of the gradient at the same offset would otherwise share
  // their low address bits, which the CPU's store-to-load disambiguation takes for a dependence
  // ("4K aliasing"; measured ~15% of the call at 256^2).
  constexpr int64_t kSkew = 528;
  if (grad_vol) parts = pool().empty({chunks * part + kSkew}, acc_type);
  const acc_t* pv = grad_mot ? packed.const_data_ptr<acc_t>() : nullptr;
  acc_t* pg = grad_vol ? parts.mutable_data_ptr<acc_t>() + kSkew : nullptr;

  at::parallel_for(0, chunks, 1, [&](int64_t kbegin, int64_t kend) {
    BackwardRow<acc_t> r(W, Cp);
    for (int64_t k = kbegin; k < kend; ++k) {
      acc_t* gpart = pg ? pg + k * part : nullptr;
      if (gpart) std::fill(gpart, gpart + part, acc_t(0));
      const int64_t first = k * rows / chunks, last = (k + 1) * rows / chunks;
      for (int64_t row = first; row < last; ++row) {
        const int64_t b = row / (d.H * d.T), t = row % d.T;
        const int y = static_cast<int>((row / d.T) % d.H);
        const int64_t mo = (b * 3 * d.T + t) * HW + y * d.W;
        const scalar_t* g = grad + (b * d.C * d.T + t) * HW + y * d.W;
        if (row + kRowsAhead < last) {  // rows a plane apart: the hardware prefetchers miss them
          const int64_t nb = (row + kRowsAhead) / (d.H * d.T), nt = (row + kRowsAhead) % d.T;
          const int64_t ny = ((row + kRowsAhead) / d.T) % d.H, nmo = (nb * 3 * d.T + nt) * HW + ny * d.W;
          const scalar_t* ng = grad + (nb * d.C * d.T + nt) * HW + ny * d.W;
          for (int x = 0; x < W; x += 64 / static_cast<int>(sizeof(float))) {
            for (int64_t c = 0; c < d.C; ++c) prefetch_l2(ng + c * d.T * HW + x);
            for (int j = 0; j < 3; ++j) {
              prefetch_l2(mot + nmo + j * d.T * HW + x);
              if (grad_mot) prefetch_l2_for_write(grad_mot + nmo + j * d.T * HW + x);
            }
          }
        }
        fill_taps(r.taps, mot + mo, mot + mo + d.T * HW, mot + mo + 2 * d.T * HW, y, D, H, W,
                  static_cast<int32_t>(Wp), static_cast<int32_t>(plane));
        pack_channels(g, d.T * HW, d.C, Cp, W, r.g.data());
        backward_row(r, pv ? pv + b * item : nullptr, gpart ? gpart + b * item : nullptr, W, Cp / 4, corners);
        if (grad_mot) {
          motion_t* __restrict du = grad_mot + mo;
          motion_t* __restrict dv = du + d.T * HW;
          motion_t* __restrict ds = dv + d.T * HW;
          const acc_t* __restrict h = r.h.data();
          for (int x = 0; x < W; ++x) {
            du[x] = static_cast<motion_t>(h[4 * x] * r.taps.px[x]);
            dv[x] = static_cast<motion_t>(h[4 * x + 1] * r.taps.py[x]);
            ds[x] = static_cast<motion_t>(h[4 * x + 2] * r.taps.ps[x]);
          }
        }
      }
    }
  });

  if (grad_vol) {  // sum the partials in chunk order, fold the copy column, unpack to (B, C, D, H, W)
    at::parallel_for(0, d.B * d.D * d.H, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(Wp * Cp);
      for (int64_t i = begin; i < end; ++i) {  // i = (b * D + s) * H + y
        const acc_t* src = pg + i * Wp * Cp;
        std::copy(src, src + Wp * Cp, sum.begin());
        for (int64_t k = 1; k < chunks; ++k) {
          const acc_t* pk = src + k * part;
          for (int64_t j = 0; j < Wp * Cp; ++j) sum[j] += pk[j];
        }
        for (int64_t c = 0; c < Cp; ++c) sum[(W - 1) * Cp + c] += sum[W * Cp + c];
        const int64_t b = i / (d.D * d.H), sy = i % (d.D * d.H);
        scalar_t* out = grad_vol + b * d.C * d.D * HW + sy * d.W;
        for (int64_t c = 0; c < d.C; ++c) {
          for (int x = 0; x < W; ++x) out[c * d.D * HW + x] = static_cast<scalar_t>(sum[x * Cp + c]);
        }
      }
    });
  }
}

// Kernels::warp_backward: contiguous grad and volume; motion in the volume's dtype or fp32;
// grad_volume and grad_motion (each computed only if defined) contiguous, in the volume's and the
// motion's dtype.
inline void warp_backward(const at::Tensor& grad, const at::Tensor& volume, const at::Tensor& motion,
                          at::Tensor& grad_volume, at::Tensor& grad_motion) {
  const Dims d = dims_of(volume, grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, volume.scalar_type(), "warp_sample_backward", [&] {
    scalar_t* gv = grad_volume.defined() ? grad_volume.mutable_data_ptr<scalar_t>() : nullptr;
    const auto run = [&](const auto* m) {
      using motion_t = std::remove_cv_t<std::remove_pointer_t<decltype(m)>>;
      motion_t* gm = grad_motion.defined() ? grad_motion.mutable_data_ptr<motion_t>() : nullptr;
      backward_kernel<scalar_t, motion_t>(grad.const_data_ptr<scalar_t>(), volume.const_data_ptr<scalar_t>(), m, gv,
                                          gm, d);
    };
    if (motion.scalar_type() == volume.scalar_type()) run(motion.const_data_ptr<scalar_t>());
    else run(motion.const_data_ptr<float>());
  });
}

}  // namespace decovae::cpu::DECOVAE_ISA::warp
