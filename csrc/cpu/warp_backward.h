// The warp's backward (warp_sample_backward) for one ISA, included by kernels_<isa>.cpp: gradients
// of sum(g * sample(volume, motion)). Per output row the taps are computed in one vectorisable pass
// (fill_taps), then each pixel's eight corners are read (motion gradient) and scattered into the
// volume gradient. The scatter is scalar on every ISA (two pixels can hit the same corner); the
// taps, the lerps and the reduction are compiled for the ISA. Each work chunk scatters into its own
// fp32 partial volume gradient; chunks are a fixed split of the rows, summed in chunk order, so the
// result is bitwise reproducible for a given chunk count (no atomics).
#pragma once

#include "cpu/warp_taps.h"

namespace decovae::cpu::DECOVAE_ISA::warp {

// grad_vol_parts holds `chunks` partial volume gradients (acc_t, each B*C*D*H*W); chunk k covers
// rows [k*rows/chunks, (k+1)*rows/chunks).
template <typename scalar_t, typename motion_t>
void backward_kernel(const scalar_t* grad, const scalar_t* vol, const motion_t* mot,
                     at::opmath_type<scalar_t>* grad_vol_parts, motion_t* grad_mot, int64_t chunks, const Dims& d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = d.H * d.W, rows = d.B * d.T * d.H, vol_numel = d.B * d.C * d.D * HW;
  const int D = d.D, H = d.H, W = d.W;
  at::parallel_for(0, chunks, 1, [&](int64_t kbegin, int64_t kend) {
    RowTaps<acc_t> taps(W);
    std::vector<acc_t> gu(W), gv(W), gs(W);
    for (int64_t k = kbegin; k < kend; ++k) {
      acc_t* gvol = grad_vol_parts ? grad_vol_parts + k * vol_numel : nullptr;
      for (int64_t row = k * rows / chunks; row < (k + 1) * rows / chunks; ++row) {
        const int64_t b = row / (d.T * d.H), t = (row / d.H) % d.T;
        const int y = static_cast<int>(row % d.H);
        const int64_t mo = (b * 3 * d.T + t) * HW + y * W;
        fill_taps(taps, mot + mo, mot + mo + d.T * HW, mot + mo + 2 * d.T * HW, y, D, H, W, W, H * W);
        std::fill(gu.begin(), gu.end(), acc_t(0));
        std::fill(gv.begin(), gv.end(), acc_t(0));
        std::fill(gs.begin(), gs.end(), acc_t(0));
        for (int64_t c = 0; c < d.C; ++c) {
          const int64_t vo = (b * d.C + c) * D * HW;
          const scalar_t* v = vol + vo;
          const scalar_t* g = grad + ((b * d.C + c) * d.T + t) * HW + y * W;
          acc_t* gvc = gvol ? gvol + vo : nullptr;
          for (int x = 0; x < W; ++x) {
            const int32_t i00 = taps.base[0][x], i01 = taps.base[1][x];
            const int32_t i10 = taps.base[2][x], i11 = taps.base[3][x], dx = taps.dx[x];
            const acc_t fx = taps.wx[x], fy = taps.wy[x], fs = taps.ws[x];
            const acc_t gx = static_cast<acc_t>(g[x]);
            if (grad_mot) {
              const acc_t v000 = v[i00], v001 = v[i00 + dx], v010 = v[i01], v011 = v[i01 + dx];
              const acc_t v100 = v[i10], v101 = v[i10 + dx], v110 = v[i11], v111 = v[i11 + dx];
              const acc_t a0 = lerp(v000, v001, fx), a1 = lerp(v010, v011, fx);
              const acc_t b0 = lerp(v100, v101, fx), b1 = lerp(v110, v111, fx);
              const acc_t dwx = (acc_t(1) - fs) * lerp(v001 - v000, v011 - v010, fy) +
                                fs * lerp(v101 - v100, v111 - v110, fy);
              const acc_t dwy = (acc_t(1) - fs) * (a1 - a0) + fs * (b1 - b0);
              const acc_t dws = lerp(b0, b1, fy) - lerp(a0, a1, fy);
              gu[x] += gx * dwx;
              gv[x] += gx * dwy;
              gs[x] += gx * dws;
            }
            if (gvc) {
              const acc_t g0 = gx * (acc_t(1) - fs), g1 = gx * fs;
              const acc_t g00 = g0 * (acc_t(1) - fy), g01 = g0 * fy, g10 = g1 * (acc_t(1) - fy), g11 = g1 * fy;
              gvc[i00] += g00 * (acc_t(1) - fx);
              gvc[i00 + dx] += g00 * fx;
              gvc[i01] += g01 * (acc_t(1) - fx);
              gvc[i01 + dx] += g01 * fx;
              gvc[i10] += g10 * (acc_t(1) - fx);
              gvc[i10 + dx] += g10 * fx;
              gvc[i11] += g11 * (acc_t(1) - fx);
              gvc[i11 + dx] += g11 * fx;
            }
          }
        }
        if (grad_mot) {
          motion_t* du = grad_mot + mo;
          motion_t* dv = du + d.T * HW;
          motion_t* ds = dv + d.T * HW;
          for (int x = 0; x < W; ++x) {
            du[x] = static_cast<motion_t>(gu[x] * taps.px[x]);
            dv[x] = static_cast<motion_t>(gv[x] * taps.py[x]);
            ds[x] = static_cast<motion_t>(gs[x] * taps.ps[x]);
          }
        }
      }
    }
  });
}

// Kernels::warp_backward: contiguous grad and volume; motion in the volume's dtype or fp32;
// grad_motion (if defined) contiguous in the motion's dtype.
inline void warp_backward(const at::Tensor& grad, const at::Tensor& volume, const at::Tensor& motion,
                          const at::Tensor& grad_volume_parts, int64_t chunks, at::Tensor& grad_motion) {
  const Dims d = dims_of(volume, grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, volume.scalar_type(), "warp_sample_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* parts = grad_volume_parts.defined() ? grad_volume_parts.mutable_data_ptr<acc_t>() : nullptr;
    const auto run = [&](const auto* m) {
      using motion_t = std::remove_cv_t<std::remove_pointer_t<decltype(m)>>;
      motion_t* gm = grad_motion.defined() ? grad_motion.mutable_data_ptr<motion_t>() : nullptr;
      backward_kernel<scalar_t, motion_t>(grad.const_data_ptr<scalar_t>(), volume.const_data_ptr<scalar_t>(), m,
                                          parts, gm, chunks, d);
    };
    if (motion.scalar_type() == volume.scalar_type()) run(motion.const_data_ptr<scalar_t>());
    else run(motion.const_data_ptr<float>());
  });
}

}  // namespace decovae::cpu::DECOVAE_ISA::warp
