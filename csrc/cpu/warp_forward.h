// The warp's forward (warp_residual, warp_add) for one ISA: included by kernels_<isa>.cpp with
// DECOVAE_ISA (namespace) and DECOVAE_ISA_LEVEL (0 portable, 1 AVX2 + FMA + F16C, 2 AVX-512).
// Semantics are those of decovae_fast/ops/reference.py.
//
// Fast path (fp32 math, C <= 4, H >= 2, every ISA): output rows are visited in (b, y, t) order and
// each work chunk packs the volume rows it samples into a small ring (RowRing) in the packed
// layout of warp_common.h, right before they are sampled. forward_row computes one output row; it
// is written once per ISA: 16 pixels at a time with AVX-512, 8 with AVX2, one at a time portably;
// the driver (forward_rows) is shared. Other cases (C > 4, fp64, H = 1) pack the whole volume first
// (forward_packed) and use portable loops, compiled (and vectorised) for the ISA.
#pragma once

#include "cpu/warp_taps.h"

namespace decovae::cpu::DECOVAE_ISA::warp {

typedef float v4f __attribute__((vector_size(16)));  // GCC/Clang vector extension, any ISA


// What a row prefetches: the inputs and output of row + kRowsAhead (frames == nullptr: none) and,
// on the last frame of an image row, the volume row the ring packs next.
template <typename scalar_t, typename motion_t>
struct NextRow {
  const motion_t* motion;
  int64_t mstride;
  const scalar_t* frames;
  scalar_t* out;
  const scalar_t* pack;  // channel 0, level 0 of the volume row the ring packs next (nullptr: none)
};


#if DECOVAE_ISA_LEVEL >= 2
// ---- AVX-512: 16 values of a tensor dtype as fp32 (lanes outside k read as 0), and back with the
// rounding of static_cast (round to nearest even; NaN stays NaN).
constexpr int kVec = 16;
inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 load16(const c10::Half* p, __mmask16 k) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 k) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}
inline void store16(float* p, __m512 v, __mmask16 k) { _mm512_mask_storeu_ps(p, k, v); }
inline void store16(c10::Half* p, __m512 v, __mmask16 k) {
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store16(c10::BFloat16* p, __m512 v, __mmask16 k) {  // as c10::round_to_nearest_even
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(r));
}
// As store16; with `stream`, a whole block that is one aligned line goes around the cache. fp32
// only: fp16/bf16 blocks are half lines, and streaming them measured no faster.
inline void store16(float* p, __m512 v, __mmask16 k, bool stream) {
  if (stream && k == 0xFFFF && reinterpret_cast<uintptr_t>(p) % 64 == 0) {
    _mm512_stream_ps(p, v);
  } else {
    store16(p, v, k);
  }
}
template <typename scalar_t>
inline void store16(scalar_t* p, __m512 v, __mmask16 k, bool) { store16(p, v, k); }

// One packed row (Cp = 4, fp32) from C <= 4 channel rows: 16 pixels at a time, the channel
// vectors interleaved with two rounds of permutes (channels beyond C are 0).
template <typename scalar_t>
void pack_row(const scalar_t* src, int64_t cstride, int C, int W, float* dst) {
  const __m512i pair_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i pair_hi = _mm512_add_epi32(pair_lo, _mm512_set1_epi32(8));
  const __m512i quad = _mm512_setr_epi32(0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23);
  const __m512i eight = _mm512_set1_epi32(8);
  for (int x = 0; x < W; x += 16) {
    const int n = std::min(16, W - x);
    const __mmask16 k = __mmask16((1u << n) - 1);
    __m512 ch[4];
    for (int c = 0; c < 4; ++c) ch[c] = c < C ? load16(src + c * cstride + x, k) : _mm512_setzero_ps();
    // (c0, c1) and (c2, c3) pairs of pixels 0-7 and 8-15, then the 4 channels of 4 pixels each.
    const __m512 a0 = _mm512_permutex2var_ps(ch[0], pair_lo, ch[1]), a1 = _mm512_permutex2var_ps(ch[0], pair_hi, ch[1]);
    const __m512 b0 = _mm512_permutex2var_ps(ch[2], pair_lo, ch[3]), b1 = _mm512_permutex2var_ps(ch[2], pair_hi, ch[3]);
    const __m512 q[4] = {_mm512_permutex2var_ps(a0, quad, b0),
                         _mm512_permutex2var_ps(a0, _mm512_add_epi32(quad, eight), b0),
                         _mm512_permutex2var_ps(a1, quad, b1),
                         _mm512_permutex2var_ps(a1, _mm512_add_epi32(quad, eight), b1)};
    for (int j = 0; j < 4 && 4 * j < n; ++j) {
      const int floats = std::min(16, 4 * (n - 4 * j));
      _mm512_mask_storeu_ps(dst + 4 * (x + 4 * j), __mmask16((1u << floats) - 1), q[j]);
    }
  }
  for (int c = 0; c < 4; ++c) dst[4 * W + c] = dst[4 * (W - 1) + c];  // the copied last column
}

#elif DECOVAE_ISA_LEVEL == 1
// ---- AVX2: 8 values of a tensor dtype as fp32, and back (round to nearest even, NaN stays NaN).
// Tails (n < 8) go through a small buffer: AVX2 has no masked 16-bit loads.
constexpr int kVec = 8;
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
template <typename scalar_t>
inline __m256 load8(const scalar_t* p, int n) {
  if (n >= 8) return load8(p);
  scalar_t tmp[8];
  for (int i = 0; i < 8; ++i) tmp[i] = i < n ? p[i] : scalar_t(0);
  return load8(tmp);
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store8(c10::BFloat16* p, __m256 v) {  // as c10::round_to_nearest_even
  const __m256i u = _mm256_castps_si256(v);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7FFF));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
// n < 8: the first n lanes only. `stream`: an fp32 block on a 32-byte boundary goes around the cache.
template <typename scalar_t>
inline void store8(scalar_t* p, __m256 v, int n, bool stream) {
  if (n >= 8) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (stream && reinterpret_cast<uintptr_t>(p) % 32 == 0) return _mm256_stream_ps(p, v);
    }
    return store8(p, v);
  }
  scalar_t tmp[8];
  store8(tmp, v);
  for (int i = 0; i < n; ++i) p[i] = tmp[i];
}

// One packed row (Cp = 4, fp32) from C <= 4 channel rows: 8 pixels at a time, a 4x8 transpose
// (unpack, shuffle, then lane swaps); channels beyond C are 0.
template <typename scalar_t>
void pack_row(const scalar_t* src, int64_t cstride, int C, int W, float* dst) {
  int x = 0;
  for (; x + 8 <= W; x += 8) {
    __m256 ch[4];
    for (int c = 0; c < 4; ++c) ch[c] = c < C ? load8(src + c * cstride + x) : _mm256_setzero_ps();
    const __m256 t0 = _mm256_unpacklo_ps(ch[0], ch[1]), t1 = _mm256_unpackhi_ps(ch[0], ch[1]);
    const __m256 t2 = _mm256_unpacklo_ps(ch[2], ch[3]), t3 = _mm256_unpackhi_ps(ch[2], ch[3]);
    // q0 = pixels (0 | 4), q1 = (1 | 5), q2 = (2 | 6), q3 = (3 | 7), 4 channels each
    const __m256 q0 = _mm256_shuffle_ps(t0, t2, 0x44), q1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 q2 = _mm256_shuffle_ps(t1, t3, 0x44), q3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    float* d = dst + 4 * x;
    _mm256_storeu_ps(d, _mm256_permute2f128_ps(q0, q1, 0x20));
    _mm256_storeu_ps(d + 8, _mm256_permute2f128_ps(q2, q3, 0x20));
    _mm256_storeu_ps(d + 16, _mm256_permute2f128_ps(q0, q1, 0x31));
    _mm256_storeu_ps(d + 24, _mm256_permute2f128_ps(q2, q3, 0x31));
  }
  for (; x < W; ++x) {
    for (int c = 0; c < kLanes; ++c) dst[kLanes * x + c] = c < C ? static_cast<float>(src[c * cstride + x]) : 0.0f;
  }
  for (int c = 0; c < kLanes; ++c) dst[kLanes * W + c] = dst[kLanes * (W - 1) + c];  // the copied last column
}

#else
// ---- Portable: one packed row (Cp = 4, fp32) from C <= 4 channel rows, pixel by pixel.
constexpr int kVec = 1;
template <typename scalar_t>
void pack_row(const scalar_t* src, int64_t cstride, int C, int W, float* dst) {
  for (int x = 0; x < W; ++x) {
    for (int c = 0; c < kLanes; ++c) dst[kLanes * x + c] = c < C ? static_cast<float>(src[c * cstride + x]) : 0.0f;
  }
  for (int c = 0; c < kLanes; ++c) dst[kLanes * W + c] = dst[kLanes * (W - 1) + c];  // the copied last column
}
#endif

// The rows of the packed volume that one thread's output rows sample. Rows are visited in (b, y, t)
// order, so the rows an output row y samples are mostly within y - kReach .. y + kReach + 1; a
// ring of kRows packed rows (all levels) holds that window and is refilled as y advances. The
// rows are packed right before they are sampled, so they are read back from L2 instead of being
// written to and re-read from memory in a separate pass (measured: the pass cost ~20% at 256^2).
// A sample outside the window (flow of more than kReach pixels along y) is packed on the spot
// into scratch rows (fill_far). Slot kRows repeats slot 0, so a window row's lower neighbour is
// always the next slot.
template <typename scalar_t>
struct RowRing {
  static constexpr int kRows = 16, kReach = kRows / 2 - 1;
  static constexpr int kScratch = kRows + 1, kSlots = kRows + 3;

  // Packed pixels per ring row (scratch columns 2i, 2i + 1 of lanes i < 16 need 32) and floats
  // in the whole ring.
  static int64_t row_pixels(int64_t W) { return std::max<int64_t>(W + 1, 32); }
  static int64_t floats(const Dims& d) { return d.D * kSlots * row_pixels(d.W) * kLanes; }

  RowRing(const scalar_t* vol, const Dims& d)
      : vol(vol), d(d), row_stride(static_cast<int32_t>(row_pixels(d.W))), plane_stride(kSlots * row_stride),
        buf(pool().empty({floats(d)}, at::kFloat, /*pooled_from=*/0)), data(buf.mutable_data_ptr<float>()) {}

  // Makes the window around output row y of batch b resident. Within a batch, y never decreases.
  void advance(int64_t batch, int y) {
    const int want_lo = std::max(0, y - kReach), want_hi = std::min<int>(d.H - 1, y + kReach + 1);
    if (batch != b || want_lo > hi) {
      b = batch;
      hi = want_lo - 1;
    }
    for (int r = hi + 1; r <= want_hi; ++r) pack(r);
    lo = want_lo;
    hi = want_hi;
  }

  // Packs the four corner rows of a sample outside the window, (x0, x1) x channels each, into
  // the scratch rows at column xs: the sample then reads them with the window's strides.
  void fill_far(int xs, int x0, int y0, int s0, int corners) const {
    const int64_t HW = d.H * d.W, x1 = std::min<int64_t>(x0 + 1, d.W - 1);
    const scalar_t* vb = vol + b * d.C * d.D * HW;
    for (int r = 0; r < corners; ++r) {
      const int64_t s = s0 + (r >> 1), y = y0 + (r & 1);
      float* dst = data + (static_cast<int64_t>(r >> 1) * plane_stride + (kScratch + (r & 1)) * row_stride + xs) * kLanes;
      for (int c = 0; c < kLanes; ++c) {
        const scalar_t* src = vb + (c * d.D + s) * HW + y * d.W;
        dst[c] = c < d.C ? static_cast<float>(src[x0]) : 0.0f;
        dst[kLanes + c] = c < d.C ? static_cast<float>(src[x1]) : 0.0f;
      }
    }
  }

  const scalar_t* vol;
  const Dims& d;
  const int32_t row_stride, plane_stride;  // in packed pixels
  at::Tensor buf;
  float* data;
  int64_t b = -1;
  int lo = 0, hi = -1;  // rows resident: lo .. hi

 private:
  void pack(int r) {
    const int64_t HW = d.H * d.W;
    const int slot = r & (kRows - 1);
    for (int64_t s = 0; s < d.D; ++s) {
      float* dst = data + (s * plane_stride + static_cast<int64_t>(slot) * row_stride) * kLanes;
      const scalar_t* src = vol + (b * d.C * d.D + s) * HW + static_cast<int64_t>(r) * d.W;
      pack_row(src, d.D * HW, static_cast<int>(d.C), d.W, dst);
      if (slot == 0) std::memcpy(dst + kRows * row_stride * kLanes, dst, (d.W + 1) * kLanes * sizeof(float));
    }
  }
};

// What both SIMD rows do per block: pack the samples outside the ring's window (lanes set in
// `far`) into the scratch rows and point their offsets there; prefetch into L2 the lines at column
// x of row + kRowsAhead (inputs, and the output unless it is streamed) and of the volume row the
// ring packs next.
template <typename scalar_t, typename Taps>
inline void fill_far_lanes(const RowRing<scalar_t>& ring, Taps& tp, unsigned far, int corners) {
  for (; far; far &= far - 1) {
    const int i = __builtin_ctz(far);
    ring.fill_far(2 * i, tp.x0[i], tp.y0[i], tp.s0[i], corners);
    tp.off[i] = (RowRing<scalar_t>::kScratch * ring.row_stride + 2 * i) * 4;
  }
}

template <typename scalar_t, typename motion_t>
__attribute__((always_inline)) inline void prefetch_next(const NextRow<scalar_t, motion_t>& next, int C, int D, int64_t HW, int64_t cstride, int x,
                          bool stream_out) {
  if (next.pack) {  // volume planes: level stride H * W, channel stride D * H * W
    for (int c = 0; c < C; ++c)
      for (int sl = 0; sl < D; ++sl) prefetch_l2(next.pack + (c * D + sl) * HW + x);
  }
  if (next.frames) {
    for (int j = 0; j < 3; ++j) prefetch_l2(next.motion + j * next.mstride + x);
    for (int c = 0; c < C; ++c) {
      prefetch_l2(next.frames + c * cstride + x);
      if (!stream_out) prefetch_l2(next.out + c * cstride + x);
    }
  }
}

// ---- forward_row: out[c][x] = frames[c][x] -/+ sample for one output row, sampling the ring's
// window; kLevels false for L = 0 (plain bilinear: two corner rows). Every ISA takes the same taps:
// along y and s the lower corner is clamped to n - 2 (at the upper border its weight is then 0 and
// the upper corner's 1), so the four corner rows of a pixel are one offset plus fixed row/plane
// strides: one index per pixel. Each corner row is one 8-float read ((x0, x1) x 4 channels of the
// packed volume) scaled by its weight; x0 and x1 halves are then weighted and folded.

#if DECOVAE_ISA_LEVEL >= 2
// AVX-512: coordinates, clamps, floors and weights in 16 lanes; two pixels share one x-weight
// multiply, four fold their x0/x1 halves into one vector, and the 16 pixels' 4-channel predictions
// are transposed to channel planes with permutes. The row tail uses masked loads/stores: masked-off
// lanes see zero motion, so their (unused) samples stay inside the volume. The next block's taps
// are computed (and stored) while the current block's are read back.
template <typename scalar_t, typename motion_t, bool kAdd, bool kLevels>
void forward_row(const RowRing<scalar_t>& ring, const motion_t* mu, const motion_t* mv, const motion_t* ms,
                 const scalar_t* frames, scalar_t* out, int64_t cstride, int C, int y, int D, int H, int W,
                 const NextRow<scalar_t, motion_t>& next, bool stream_out) {
  using Ring = RowRing<scalar_t>;
  constexpr int kCorners = kLevels ? 4 : 2;
  struct Taps {
    alignas(64) int32_t off[16];
    alignas(64) float wr[kCorners][16];
    alignas(64) float ax[16];
    alignas(64) int32_t x0[16], y0[16], s0[16];  // of samples outside the window (far)
    __mmask16 far;
  } buf[2];
  const int32_t row_stride = ring.row_stride, plane_stride = ring.plane_stride;
  const float* pk = ring.data;
  const float* base[4] = {pk, pk + 4 * row_stride, pk + 4 * plane_stride, pk + 4 * (plane_stride + row_stride)};
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i rs4 = _mm512_set1_epi32(row_stride * 4), ps4 = _mm512_set1_epi32(plane_stride * 4);
  const __m512i slot_mask = _mm512_set1_epi32(Ring::kRows - 1);
  const __m512i win_lo = _mm512_set1_epi32(ring.lo), win_hi1 = _mm512_set1_epi32(ring.hi - 1);
  const __m512 fy = _mm512_set1_ps(static_cast<float>(y)), one = _mm512_set1_ps(1.0f);
  const auto taps = [&](int x, Taps& tp) {
    const __mmask16 k = W - x >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (W - x)) - 1);
    const __m512 xs = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_set1_epi32(x), lane));
    const __m512 cx = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(xs, load16(mu + x, k)), _mm512_setzero_ps()),
                                    _mm512_set1_ps(float(W - 1)));
    const __m512i x0 = _mm512_cvttps_epi32(cx);
    _mm512_store_ps(tp.ax, _mm512_sub_ps(cx, _mm512_cvtepi32_ps(x0)));
    const __m512 cy = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(fy, load16(mv + x, k)), _mm512_setzero_ps()),
                                    _mm512_set1_ps(float(H - 1)));
    const __m512i y0 = _mm512_min_epi32(_mm512_cvttps_epi32(cy), _mm512_set1_epi32(H - 2));
    const __m512 ay = _mm512_sub_ps(cy, _mm512_cvtepi32_ps(y0)), ay1 = _mm512_sub_ps(one, ay);
    __m512i r0 = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_and_si512(y0, slot_mask), rs4), _mm512_slli_epi32(x0, 2));
    __m512i s0 = _mm512_setzero_si512();
    if constexpr (kLevels) {
      const __m512 cs = _mm512_min_ps(_mm512_max_ps(load16(ms + x, k), _mm512_setzero_ps()), _mm512_set1_ps(float(D - 1)));
      s0 = _mm512_min_epi32(_mm512_cvttps_epi32(cs), _mm512_set1_epi32(D - 2));
      const __m512 as = _mm512_sub_ps(cs, _mm512_cvtepi32_ps(s0)), as1 = _mm512_sub_ps(one, as);
      r0 = _mm512_add_epi32(r0, _mm512_mullo_epi32(s0, ps4));
      _mm512_store_ps(tp.wr[0], _mm512_mul_ps(as1, ay1));
      _mm512_store_ps(tp.wr[1], _mm512_mul_ps(as1, ay));
      _mm512_store_ps(tp.wr[2], _mm512_mul_ps(as, ay1));
      _mm512_store_ps(tp.wr[3], _mm512_mul_ps(as, ay));
    } else {
      _mm512_store_ps(tp.wr[0], ay1);
      _mm512_store_ps(tp.wr[1], ay);
    }
    _mm512_store_si512(tp.off, r0);
    // far: corner rows y0, y0 + 1 not both in the window lo .. hi
    tp.far = _mm512_mask_cmplt_epi32_mask(k, y0, win_lo) | _mm512_mask_cmpgt_epi32_mask(k, y0, win_hi1);
    if (tp.far) {
      _mm512_store_si512(tp.x0, x0);
      _mm512_store_si512(tp.y0, y0);
      _mm512_store_si512(tp.s0, s0);
    }
  };
  taps(0, buf[0]);
  for (int x = 0, cur = 0; x < W; x += 16, cur ^= 1) {
    const __mmask16 k = W - x >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (W - x)) - 1);
    if (x + 16 < W) taps(x + 16, buf[cur ^ 1]);  // the next block's taps, stored well before they are read
    Taps& tc = buf[cur];
    fill_far_lanes(ring, tc, tc.far, kCorners);
    const int32_t* off = tc.off;
    const auto& wr = tc.wr;
    const __m512 ax = _mm512_load_ps(tc.ax), ax1 = _mm512_sub_ps(one, ax);
    asm volatile("" : : "r"(buf) : "memory");  // lanes are read back as scalars, not extracted
    prefetch_next(next, C, D, static_cast<int64_t>(H) * W, cstride, x, stream_out);
    // a(i) = sum over corner rows of w * (x0 channels, x1 channels); two pixels share one x-weight
    // multiply; four pixels fold their x0 and x1 halves into the prediction vector p[i / 4].
    __m512 p[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      __m512 z[2];
#pragma GCC unroll 2
      for (int q = 0; q < 2; ++q) {
        __m256 a[2];
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          const int i = 4 * j + 2 * q + h;
          const int64_t o = off[i];
          a[h] = _mm256_mul_ps(_mm256_set1_ps(wr[0][i]), _mm256_loadu_ps(base[0] + o));
#pragma GCC unroll 4
          for (int r = 1; r < kCorners; ++r) a[h] = _mm256_fmadd_ps(_mm256_set1_ps(wr[r][i]), _mm256_loadu_ps(base[r] + o), a[h]);
        }
        const int i = 4 * j + 2 * q;
        const __m512i pair = _mm512_setr_epi32(i, i, i, i, 16 + i, 16 + i, 16 + i, 16 + i, i + 1, i + 1, i + 1, i + 1,
                                               17 + i, 17 + i, 17 + i, 17 + i);
        z[q] = _mm512_mul_ps(_mm512_insertf32x8(_mm512_castps256_ps512(a[0]), a[1], 1),
                             _mm512_permutex2var_ps(ax1, pair, ax));
      }
      p[j] = _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
    }
    for (int c = 0; c < C; ++c) {
      const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(c), _mm512_slli_epi32(lane, 2));
      const __m512 plane = _mm512_shuffle_f32x4(_mm512_permutex2var_ps(p[0], idx, p[1]),
                                                _mm512_permutex2var_ps(p[2], idx, p[3]), _MM_SHUFFLE(1, 0, 1, 0));
      const __m512 f = load16(frames + c * cstride + x, k);
      store16(out + c * cstride + x, kAdd ? _mm512_add_ps(f, plane) : _mm512_sub_ps(f, plane), k, stream_out);
    }
  }
}

#elif DECOVAE_ISA_LEVEL == 1
// AVX2: coordinates, clamps, floors and weights in 8 lanes (tail lanes see zero motion, so their
// unused samples stay inside the volume); as with AVX-512 the next block's taps are stored while
// the current block's are read back. Pixel i's corner rows sum to a(i) = (x0 | x1) channels,
// weighted by (1 - ax | ax); pixels i and i + 4 then fold into one vector (i | i + 4), and a 4x8
// transpose turns the four such vectors into channel planes.
template <typename scalar_t, typename motion_t, bool kAdd, bool kLevels>
void forward_row(const RowRing<scalar_t>& ring, const motion_t* mu, const motion_t* mv, const motion_t* ms,
                 const scalar_t* frames, scalar_t* out, int64_t cstride, int C, int y, int D, int H, int W,
                 const NextRow<scalar_t, motion_t>& next, bool stream_out) {
  using Ring = RowRing<scalar_t>;
  constexpr int kCorners = kLevels ? 4 : 2;
  struct Taps {
    alignas(32) int32_t off[8];
    alignas(32) float wr[kCorners][8];
    alignas(32) float ax[8], ax1[8];
    alignas(32) int32_t x0[8], y0[8], s0[8];  // of samples outside the window (far)
    unsigned far;
  } buf[2];
  const int32_t row_stride = ring.row_stride, plane_stride = ring.plane_stride;
  const float* pk = ring.data;
  const float* base[4] = {pk, pk + 4 * row_stride, pk + 4 * plane_stride, pk + 4 * (plane_stride + row_stride)};
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i rs4 = _mm256_set1_epi32(row_stride * 4), ps4 = _mm256_set1_epi32(plane_stride * 4);
  const __m256i slot_mask = _mm256_set1_epi32(Ring::kRows - 1);
  const __m256i win_lo = _mm256_set1_epi32(ring.lo), win_hi1 = _mm256_set1_epi32(ring.hi - 1);
  const __m256 fy = _mm256_set1_ps(static_cast<float>(y)), one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  const int64_t HW = static_cast<int64_t>(H) * W;
  const auto taps = [&](int x, Taps& tp) {
    const int n = std::min(8, W - x);
    const __m256 xs = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_set1_epi32(x), lane));
    const __m256 cx = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(xs, load8(mu + x, n)), zero), _mm256_set1_ps(float(W - 1)));
    const __m256i x0 = _mm256_cvttps_epi32(cx);
    const __m256 ax = _mm256_sub_ps(cx, _mm256_cvtepi32_ps(x0));
    _mm256_store_ps(tp.ax, ax);
    _mm256_store_ps(tp.ax1, _mm256_sub_ps(one, ax));
    const __m256 cy = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(fy, load8(mv + x, n)), zero), _mm256_set1_ps(float(H - 1)));
    const __m256i y0 = _mm256_min_epi32(_mm256_cvttps_epi32(cy), _mm256_set1_epi32(H - 2));
    const __m256 ay = _mm256_sub_ps(cy, _mm256_cvtepi32_ps(y0)), ay1 = _mm256_sub_ps(one, ay);
    __m256i r0 = _mm256_add_epi32(_mm256_mullo_epi32(_mm256_and_si256(y0, slot_mask), rs4), _mm256_slli_epi32(x0, 2));
    __m256i s0 = _mm256_setzero_si256();
    if constexpr (kLevels) {
      const __m256 cs = _mm256_min_ps(_mm256_max_ps(load8(ms + x, n), zero), _mm256_set1_ps(float(D - 1)));
      s0 = _mm256_min_epi32(_mm256_cvttps_epi32(cs), _mm256_set1_epi32(D - 2));
      const __m256 as = _mm256_sub_ps(cs, _mm256_cvtepi32_ps(s0)), as1 = _mm256_sub_ps(one, as);
      r0 = _mm256_add_epi32(r0, _mm256_mullo_epi32(s0, ps4));
      _mm256_store_ps(tp.wr[0], _mm256_mul_ps(as1, ay1));
      _mm256_store_ps(tp.wr[1], _mm256_mul_ps(as1, ay));
      _mm256_store_ps(tp.wr[2], _mm256_mul_ps(as, ay1));
      _mm256_store_ps(tp.wr[3], _mm256_mul_ps(as, ay));
    } else {
      _mm256_store_ps(tp.wr[0], ay1);
      _mm256_store_ps(tp.wr[1], ay);
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(tp.off), r0);
    // far: corner rows y0, y0 + 1 not both in the window lo .. hi
    const __m256i outside = _mm256_or_si256(_mm256_cmpgt_epi32(win_lo, y0), _mm256_cmpgt_epi32(y0, win_hi1));
    tp.far = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(outside))) & ((1u << n) - 1);
    if (tp.far) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(tp.x0), x0);
      _mm256_store_si256(reinterpret_cast<__m256i*>(tp.y0), y0);
      _mm256_store_si256(reinterpret_cast<__m256i*>(tp.s0), s0);
    }
  };
  taps(0, buf[0]);
  for (int x = 0, cur = 0; x < W; x += 8, cur ^= 1) {
    const int n = std::min(8, W - x);
    if (x + 8 < W) taps(x + 8, buf[cur ^ 1]);  // the next block's taps, stored well before they are read
    Taps& tp = buf[cur];
    fill_far_lanes(ring, tp, tp.far, kCorners);
    asm volatile("" : : "r"(buf) : "memory");  // lanes are read back as scalars, not extracted
    if (x % 16 == 0) prefetch_next(next, C, D, HW, cstride, x, stream_out);  // one fp32 line per 16 pixels
    __m256 z[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const int64_t o = tp.off[i];
      __m256 a = _mm256_mul_ps(_mm256_broadcast_ss(&tp.wr[0][i]), _mm256_loadu_ps(base[0] + o));
#pragma GCC unroll 4
      for (int r = 1; r < kCorners; ++r) a = _mm256_fmadd_ps(_mm256_broadcast_ss(&tp.wr[r][i]), _mm256_loadu_ps(base[r] + o), a);
      z[i] = _mm256_mul_ps(a, _mm256_blend_ps(_mm256_broadcast_ss(&tp.ax1[i]), _mm256_broadcast_ss(&tp.ax[i]), 0xF0));
    }
    __m256 P[4];  // P[j] = predictions of pixels (j | j + 4), 4 channels each
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j)
      P[j] = _mm256_add_ps(_mm256_permute2f128_ps(z[j], z[j + 4], 0x20), _mm256_permute2f128_ps(z[j], z[j + 4], 0x31));
    const __m256 t0 = _mm256_unpacklo_ps(P[0], P[1]), t1 = _mm256_unpackhi_ps(P[0], P[1]);
    const __m256 t2 = _mm256_unpacklo_ps(P[2], P[3]), t3 = _mm256_unpackhi_ps(P[2], P[3]);
    const __m256 plane[4] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE),
                             _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE)};
    for (int c = 0; c < C; ++c) {
      const __m256 f = load8(frames + c * cstride + x, n);
      store8(out + c * cstride + x, kAdd ? _mm256_add_ps(f, plane[c]) : _mm256_sub_ps(f, plane[c]), n, stream_out);
    }
  }
}

#else
// Portable, pixel by pixel: the same taps, the four corner rows read as two 4-channel vectors each
// (GCC vector extension: SSE as compiled).
template <typename scalar_t, typename motion_t, bool kAdd, bool kLevels>
void forward_row(const RowRing<scalar_t>& ring, const motion_t* mu, const motion_t* mv, const motion_t* ms,
                 const scalar_t* frames, scalar_t* out, int64_t cstride, int C, int y, int D, int H, int W,
                 const NextRow<scalar_t, motion_t>&, bool) {
  using Ring = RowRing<scalar_t>;
  constexpr int kCorners = kLevels ? 4 : 2;
  const int64_t rs = ring.row_stride, ps = ring.plane_stride;
  const int64_t step[4] = {0, kLanes * rs, kLanes * ps, kLanes * (ps + rs)};
  const float fy = static_cast<float>(y), top_x = float(W - 1), top_y = float(H - 1), top_s = float(D - 1);
  for (int x = 0; x < W; ++x) {
    float cx = static_cast<float>(x) + static_cast<float>(mu[x]);
    cx = cx > 0.0f ? cx : 0.0f;  // NaN -> 0, as axis()
    cx = cx < top_x ? cx : top_x;
    const int x0 = static_cast<int>(cx);
    const float ax = cx - static_cast<float>(x0);
    float cy = fy + static_cast<float>(mv[x]);
    cy = cy > 0.0f ? cy : 0.0f;
    cy = cy < top_y ? cy : top_y;
    const int y0 = std::min(static_cast<int>(cy), H - 2);
    const float ay = cy - static_cast<float>(y0);
    int s0 = 0;
    float as = 0.0f;
    if constexpr (kLevels) {
      float cs = static_cast<float>(ms[x]);
      cs = cs > 0.0f ? cs : 0.0f;
      cs = cs < top_s ? cs : top_s;
      s0 = std::min(static_cast<int>(cs), D - 2);
      as = cs - static_cast<float>(s0);
    }
    const float wr[4] = {(1 - as) * (1 - ay), (1 - as) * ay, as * (1 - ay), as * ay};
    int64_t off;
    if (y0 < ring.lo || y0 > ring.hi - 1) {
      ring.fill_far(0, x0, y0, s0, kCorners);
      off = static_cast<int64_t>(Ring::kScratch) * rs * kLanes;
    } else {
      off = (s0 * ps + static_cast<int64_t>(y0 & (Ring::kRows - 1)) * rs + x0) * kLanes;
    }
    v4f lo = {0, 0, 0, 0}, hi = {0, 0, 0, 0};
    for (int r = 0; r < kCorners; ++r) {
      v4f q0, q1;
      std::memcpy(&q0, ring.data + off + step[r], sizeof(v4f));
      std::memcpy(&q1, ring.data + off + step[r] + kLanes, sizeof(v4f));
      lo += (wr[r] * (1 - ax)) * q0;
      hi += (wr[r] * ax) * q1;
    }
    const v4f pred = lo + hi;
    for (int c = 0; c < C; ++c) {
      const float f = static_cast<float>(frames[c * cstride + x]);
      out[c * cstride + x] = static_cast<scalar_t>(kAdd ? f + pred[c] : f - pred[c]);
    }
  }
}
#endif

// The whole fast forward in (b, y, t) order: each work chunk packs the volume rows it samples into
// its own ring, so memory beyond the output is one small ring per chunk on every ISA.
//
// With SIMD, an fp32 output goes around the cache (non-temporal stores) when the op's frames,
// motion and output exceed the last-level cache: they cannot stay cached anyway, and such stores
// skip reading each output line before writing it (16x256^2 and 16x512^2 on the dev VM: 5-7%
// faster when it was quiet, 15-25% while its neighbours loaded the memory). Smaller calls keep
// plain stores, so whatever consumes the output finds it in cache.
template <typename scalar_t, typename motion_t, bool kAdd>
void forward_rows(const scalar_t* vol, const motion_t* mot, const scalar_t* frames, scalar_t* out, const Dims& d) {
  const int D = d.D, H = d.H, W = d.W;
  const int64_t HW = d.H * d.W, rows = d.B * d.T * d.H;
  const auto row_fn = D > 1 ? forward_row<scalar_t, motion_t, kAdd, true>
                            : forward_row<scalar_t, motion_t, kAdd, false>;  // L = 0: bilinear
  const int64_t traffic = d.B * d.T * HW * (d.C * 2 * static_cast<int64_t>(sizeof(scalar_t)) + 3 * sizeof(motion_t));
  const bool stream_out = kVec > 1 && std::is_same_v<scalar_t, float> && traffic > last_level_cache_bytes();
  struct Row {
    int64_t b, motion, data;  // batch; offsets of the row in motion and in frames/out
    int y;
  };
  const auto locate = [&](int64_t row) {
    const int64_t b = row / (d.T * d.H), t = row % d.T, y = (row / d.T) % d.H;
    return Row{b, (b * 3 * d.T + t) * HW + y * W, (b * d.C * d.T + t) * HW + y * W, static_cast<int>(y)};
  };
  // A chunk repacks up to kRows - 1 rows beyond the ones it owns: at least 8 image rows per chunk
  // keep that under ~2x the packing of one pass over the volume.
  at::parallel_for(0, rows, 8 * d.T, [&](int64_t begin, int64_t end) {
    RowRing<scalar_t> ring(vol, d);
    for (int64_t row = begin; row < end; ++row) {
      const Row r = locate(row);
      NextRow<scalar_t, motion_t> next{nullptr, d.T * HW, nullptr, nullptr, nullptr};
      if (kVec > 1 && row + kRowsAhead < end) {
        const Row n = locate(row + kRowsAhead);
        next.motion = mot + n.motion;
        next.frames = frames + n.data;
        next.out = out + n.data;
      }
      ring.advance(r.b, r.y);
      // the last frame of this image row fetches the volume row the ring packs next (measured 2-7%)
      const int64_t pr = ring.hi + 1;
      if (kVec > 1 && static_cast<int64_t>(row % d.T) == d.T - 1 && row + 1 < end && pr < H)
        next.pack = vol + r.b * d.C * d.D * HW + pr * W;
      const motion_t* mu = mot + r.motion;
      row_fn(ring, mu, mu + d.T * HW, mu + 2 * d.T * HW, frames + r.data, out + r.data, d.T * HW,
             static_cast<int>(d.C), r.y, D, H, W, next, stream_out);
    }
#if DECOVAE_ISA_LEVEL >= 1
    if (stream_out) _mm_sfence();  // the streamed stores are visible before the op returns
#endif
  });
}

// ---- The general case (C > 4, fp64, H = 1): the whole volume packed as (B, D, H, W+1, Cp) first.
template <typename scalar_t, typename acc_t>
at::Tensor pack_volume(const scalar_t* vol, const Dims& d, int64_t Cp) {
  const int64_t W1 = d.W + 1, HW = d.H * d.W;
  at::Tensor packed = pool().empty({d.B, d.D, d.H, W1, Cp}, c10::CppTypeToScalarType<acc_t>::value);
  acc_t* pk = packed.mutable_data_ptr<acc_t>();
  at::parallel_for(0, d.B * d.D * d.H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (d.D * d.H), sy = row % (d.D * d.H);  // sy = s * H + y
      acc_t* dst = pk + row * W1 * Cp;
      for (int64_t c = 0; c < Cp; ++c) {
        if (c < d.C) {
          const scalar_t* src = vol + (b * d.C + c) * d.D * HW + sy * d.W;
          for (int64_t x = 0; x < d.W; ++x) dst[x * Cp + c] = static_cast<acc_t>(src[x]);
          dst[d.W * Cp + c] = static_cast<acc_t>(src[d.W - 1]);
        } else {
          for (int64_t x = 0; x < W1; ++x) dst[x * Cp + c] = acc_t(0);
        }
      }
    }
  });
  return packed;
}

template <typename scalar_t, typename motion_t, bool kAdd>
void forward_packed(const scalar_t* vol, const motion_t* mot, const scalar_t* frames, scalar_t* out, const Dims& d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = d.H * d.W, rows = d.B * d.T * d.H;
  const int D = d.D, H = d.H, W = d.W;
  const int64_t Cp = (d.C + kLanes - 1) / kLanes * kLanes;
  const at::Tensor packed = pack_volume<scalar_t, acc_t>(vol, d, Cp);
  const acc_t* pk_all = packed.const_data_ptr<acc_t>();
  const int32_t row_stride = W + 1, plane_stride = H * (W + 1);
  const int corners = D == 1 ? 2 : 4;  // L = 0: plain bilinear
  // Rows in (b, y, t) order: the T frames of one image row sample nearby volume rows, which then
  // stay in cache (a (b, t, y) order sweeps the whole volume once per frame).
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    RowTaps<acc_t> taps(W);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (d.T * d.H), t = row % d.T;
      const int y = static_cast<int>((row / d.T) % d.H);
      const motion_t* mu = mot + (b * 3 * d.T + t) * HW + y * W;
      const acc_t* pk = pk_all + b * D * plane_stride * Cp;
      const int64_t o = (b * d.C * d.T + t) * HW + y * W;  // channel 0 of this row
      const int64_t cstride = d.T * HW;
      fill_taps(taps, mu, mu + d.T * HW, mu + 2 * d.T * HW, y, D, H, W, row_stride, plane_stride);
      for (int x = 0; x < W; ++x) {
        const acc_t fx = taps.wx[x], fy = taps.wy[x], fs = taps.ws[x];
        const acc_t wr[4] = {(1 - fs) * (1 - fy), (1 - fs) * fy, fs * (1 - fy), fs * fy};
        const acc_t* p[4];
        for (int r = 0; r < 4; ++r) p[r] = pk + static_cast<int64_t>(taps.base[r][x]) * Cp;
        for (int64_t g = 0; g < Cp; g += kLanes) {
          acc_t lo[kLanes] = {}, hi[kLanes] = {};
          for (int r = 0; r < corners; ++r) {
            const acc_t a = wr[r] * (1 - fx), bw = wr[r] * fx;
            const acc_t* q = p[r] + g;
#pragma GCC unroll 4
            for (int j = 0; j < kLanes; ++j) {
              lo[j] += a * q[j];
              hi[j] += bw * q[Cp + j];
            }
          }
          for (int j = 0; j < kLanes && g + j < d.C; ++j) {
            const int64_t i = o + (g + j) * cstride + x;
            const acc_t fv = static_cast<acc_t>(frames[i]);
            const acc_t pred = lo[j] + hi[j];
            out[i] = static_cast<scalar_t>(kAdd ? fv + pred : fv - pred);
          }
        }
      }
    }
  });
}

// out = frames - sample (kAdd false) or residual + sample (kAdd true).
template <typename scalar_t, typename motion_t, bool kAdd>
void forward_kernel(const scalar_t* vol, const motion_t* mot, const scalar_t* frames, scalar_t* out, const Dims& d) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<acc_t, float> && !std::is_same_v<motion_t, double>) {
    // The ring addresses a few packed rows of all levels with int32 float offsets.
    if (d.C <= kLanes && d.H >= 2 && RowRing<scalar_t>::floats(d) < std::numeric_limits<int32_t>::max()) {
      return forward_rows<scalar_t, motion_t, kAdd>(vol, mot, frames, out, d);
    }
  }
  forward_packed<scalar_t, motion_t, kAdd>(vol, mot, frames, out, d);
}

// Kernels::warp_forward: contiguous volume and frames; motion in the volume's dtype or fp32.
inline void warp_forward(const at::Tensor& volume, const at::Tensor& motion, const at::Tensor& frames, at::Tensor& out,
                         bool add) {
  const Dims d = dims_of(volume, frames);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, volume.scalar_type(), "warp_forward", [&] {
    const scalar_t* v = volume.const_data_ptr<scalar_t>();
    const scalar_t* f = frames.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const auto run = [&](const auto* m) {
      using motion_t = std::remove_cv_t<std::remove_pointer_t<decltype(m)>>;
      if (add) forward_kernel<scalar_t, motion_t, true>(v, m, f, o, d);
      else forward_kernel<scalar_t, motion_t, false>(v, m, f, o, d);
    };
    if (motion.scalar_type() == volume.scalar_type()) run(motion.const_data_ptr<scalar_t>());
    else run(motion.const_data_ptr<float>());
  });
}

}  // namespace decovae::cpu::DECOVAE_ISA::warp
