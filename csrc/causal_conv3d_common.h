// Index logic of causal_conv3d shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels, written as
// plain host+device code so that the CPU tests exercise what the GPU kernels run.
//
// Frames: the op convolves the "padded" sequence [history, x] of P = (kt-1) + T frames, where the
// history is `cache` (kt-1 raw frames) or, without a cache, kt-1 zero frames. Output frame t reads
// padded frames t*st .. t*st+kt-1. Space: zero "same" padding (odd kh, kw), stride s gives
// ceil(H/s) outputs; output row o, tap dy reads input row o*s + dy - kh/2.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DECOVAE_HOST_DEVICE __host__ __device__
#else
#define DECOVAE_HOST_DEVICE
#endif

namespace decovae::conv3d {

// Output length along one axis: causal in time and "same" in space both give ceil(n / stride).
DECOVAE_HOST_DEVICE inline int64_t out_size(int64_t n, int64_t stride) { return (n - 1) / stride + 1; }

// Where a padded frame lives.
enum class FrameSource : int { kZero = 0, kCache = 1, kChunk = 2 };

struct FrameRef {
  FrameSource source;
  int64_t index;  // frame index inside cache or chunk (0 for kZero)
};

// Padded frame p (0 <= p < kt-1+T) of [history, x].
DECOVAE_HOST_DEVICE inline FrameRef padded_frame(int64_t p, int64_t kt, bool has_cache) {
  const int64_t history = kt - 1;
  if (p >= history) return {FrameSource::kChunk, p - history};
  if (has_cache) return {FrameSource::kCache, p};
  return {FrameSource::kZero, 0};
}

// The padded frame that output frame t reads at temporal tap dt.
DECOVAE_HOST_DEVICE inline int64_t input_frame(int64_t t, int64_t dt, int64_t stride_t) { return t * stride_t + dt; }

// Frame i (0 <= i < kt-1) of the returned cache: the last kt-1 raw frames of [history, x].
DECOVAE_HOST_DEVICE inline FrameRef new_cache_frame(int64_t i, int64_t kt, int64_t T, bool has_cache) {
  return padded_frame(T + i, kt, has_cache);
}

// Input row (or column) read by output row o at tap d of a "same"-padded kernel of odd size k;
// negative or >= n means zero padding.
DECOVAE_HOST_DEVICE inline int64_t input_coord(int64_t o, int64_t d, int64_t stride, int64_t k) {
  return o * stride + d - k / 2;
}

DECOVAE_HOST_DEVICE inline bool in_range(int64_t i, int64_t n) { return i >= 0 && i < n; }

// Problem sizes, filled once on the host and passed by value to kernels.
struct Geometry {
  int64_t B, Cin, Cout, T, H, W;   // input x is (B, Cin, T, H, W)
  int64_t kt, kh, kw;              // weight is (Cout, Cin, kt, kh, kw)
  int64_t st, sh, sw;              // strides
  int64_t To, Ho, Wo;              // output (B, Cout, To, Ho, Wo)
  bool has_cache;

  DECOVAE_HOST_DEVICE int64_t padded_frames() const { return kt - 1 + T; }
  // GEMM view of the convolution: M = Cout, N = output positions, K = Cin * kt * kh * kw (the
  // order of weight's own memory layout, so weight viewed as (Cout, K) is the A matrix).
  DECOVAE_HOST_DEVICE int64_t gemm_n() const { return B * To * Ho * Wo; }
  DECOVAE_HOST_DEVICE int64_t gemm_k() const { return Cin * kt * kh * kw; }
};

DECOVAE_HOST_DEVICE inline Geometry make_geometry(int64_t B, int64_t Cin, int64_t Cout, int64_t T, int64_t H,
                                                  int64_t W, int64_t kt, int64_t kh, int64_t kw, int64_t st,
                                                  int64_t sh, int64_t sw, bool has_cache) {
  return {B, Cin, Cout, T, H, W, kt, kh, kw, st, sh, sw,
          out_size(T, st), out_size(H, sh), out_size(W, sw), has_cache};
}

// Implicit-GEMM coordinates: a K index is (ci, dt, dy, dx), an N index is (b, t, oh, ow).
struct KIndex {
  int64_t ci, dt, dy, dx;
};
struct NIndex {
  int64_t b, t, oh, ow;
};

DECOVAE_HOST_DEVICE inline KIndex split_k(const Geometry& g, int64_t k) {
  KIndex r;
  r.dx = k % g.kw;
  k /= g.kw;
  r.dy = k % g.kh;
  k /= g.kh;
  r.dt = k % g.kt;
  r.ci = k / g.kt;
  return r;
}

DECOVAE_HOST_DEVICE inline NIndex split_n(const Geometry& g, int64_t n) {
  NIndex r;
  r.ow = n % g.Wo;
  n /= g.Wo;
  r.oh = n % g.Ho;
  n /= g.Ho;
  r.t = n % g.To;
  r.b = n / g.To;
  return r;
}

// Where element (k, n) of the implicit im2col matrix comes from: the padded frame and spatial
// position, or `valid == false` for zero padding (spatial border or zero history).
struct Tap {
  FrameRef frame;
  int64_t ci, ih, iw;
  bool valid;
};

DECOVAE_HOST_DEVICE inline Tap im2col_tap(const Geometry& g, const KIndex& k, const NIndex& n) {
  Tap r;
  r.ci = k.ci;
  r.frame = padded_frame(input_frame(n.t, k.dt, g.st), g.kt, g.has_cache);
  r.ih = input_coord(n.oh, k.dy, g.sh, g.kh);
  r.iw = input_coord(n.ow, k.dx, g.sw, g.kw);
  r.valid = r.frame.source != FrameSource::kZero && in_range(r.ih, g.H) && in_range(r.iw, g.W);
  return r;
}

// Element offset of (b, c, f, h, w) in a contiguous (B, C, F, H, W) tensor.
DECOVAE_HOST_DEVICE inline int64_t offset5(int64_t b, int64_t c, int64_t f, int64_t h, int64_t w, int64_t C,
                                           int64_t F, int64_t H, int64_t W) {
  return (((b * C + c) * F + f) * H + h) * W + w;
}

// Spatial tiling of an output plane into m x m tiles (Winograd F(m x m, 3 x 3) on the CPU, output
// tiles on the GPU): tile (i, j) covers output rows i*m .. i*m+m-1 (clipped to the plane) and
// reads input rows i*m - 1 .. i*m + m (3x3 kernel, stride 1, "same" padding).
struct Tiling {
  int64_t m;             // outputs per tile side
  int64_t rows, cols;    // tiles per plane
  DECOVAE_HOST_DEVICE int64_t count() const { return rows * cols; }
};

DECOVAE_HOST_DEVICE inline Tiling make_tiling(int64_t Ho, int64_t Wo, int64_t m) {
  return {m, (Ho + m - 1) / m, (Wo + m - 1) / m};
}

// First input row (column) a tile reads, in unpadded coordinates (may be -1: zero padding).
DECOVAE_HOST_DEVICE inline int64_t tile_input_origin(int64_t tile_index, int64_t m, int64_t k) {
  return tile_index * m - k / 2;
}

// Number of valid outputs of a tile along one axis (the last tile may be partial).
DECOVAE_HOST_DEVICE inline int64_t tile_extent(int64_t tile_index, int64_t m, int64_t n) {
  const int64_t left = n - tile_index * m;
  return left < m ? left : m;
}

}  // namespace decovae::conv3d
