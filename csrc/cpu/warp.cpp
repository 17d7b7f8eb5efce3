// CPU kernels of the scale-space warp (DESIGN.md ops 2-4): warp_residual, warp_add and their shared
// backward warp_sample_backward. Semantics are those of decovae_fast/ops/reference.py.
//
// Per output row (b, t, y) the kernels first turn the row's motion into corner offsets and weights
// (one vectorisable pass), then trilinearly sample the volume, so the frames/residual and motion
// are streamed once. The forward samples a channel-interleaved copy of the volume; the backward
// reads the volume as it is. With AVX-512 (fp32 math, C <= 4, H >= 2) the forward works on 16
// pixels at a time (forward_row_avx512) and packs the volume rows as it needs them (RowRing);
// otherwise it packs the whole volume first (pack_volume) and uses the portable loops below.
// Large buffers (packed volume, rings, outputs) come from a small pool (BufferPool) to skip page
// faults. The SIMD forward writes an fp32 output that cannot stay cached with non-temporal stores.
// Math is in fp32 (fp64 for fp64 inputs). The backward scatters into one fp32 partial volume
// gradient per work chunk; chunks are a fixed split of the rows and are summed in chunk order, so
// the result is bitwise reproducible for a given chunk count (no atomics). There is one chunk per
// thread, as far as the partial gradients fit a memory budget (grad_parts_budget).
// GCC 12's AVX-512 intrinsic headers trip -W(maybe-)uninitialized when inlined (their
// _mm512_undefined_* self-initialise); the pragma must precede their inclusion through torch.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <c10/core/CPUAllocator.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <type_traits>
#include <limits>
#include <mutex>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define DECOVAE_WARP_AVX512 1
#endif

namespace {

struct Dims {
  int64_t B, C, T, D, H, W;
};

Dims check_warp_args(const at::Tensor& volume, const at::Tensor& motion, const at::Tensor& frames,
                     const char* frames_name) {
  TORCH_CHECK(volume.dim() == 5, "volume must be (B, C, L+1, H, W), got shape ", volume.sizes());
  TORCH_CHECK(motion.dim() == 5, "motion must be (B, 3, T, H, W), got shape ", motion.sizes());
  TORCH_CHECK(frames.dim() == 5, frames_name, " must be (B, C, T, H, W), got shape ", frames.sizes());
  Dims d{frames.size(0), frames.size(1), frames.size(2), volume.size(2), frames.size(3), frames.size(4)};
  TORCH_CHECK(volume.size(0) == d.B && volume.size(1) == d.C && volume.size(3) == d.H && volume.size(4) == d.W,
              "volume shape ", volume.sizes(), " does not match ", frames_name, " shape ", frames.sizes());
  TORCH_CHECK(motion.size(0) == d.B && motion.size(1) == 3 && motion.size(2) == d.T && motion.size(3) == d.H &&
                  motion.size(4) == d.W,
              "motion must have shape (B, 3, T, H, W) matching ", frames_name, ", got ", motion.sizes());
  TORCH_CHECK(d.D >= 1, "volume must have at least one level, got shape ", volume.sizes());
  TORCH_CHECK(volume.scalar_type() == frames.scalar_type(), "volume dtype ", volume.scalar_type(),
              " differs from ", frames_name, " dtype ", frames.scalar_type());
  TORCH_CHECK(at::isFloatingType(volume.scalar_type()) && at::isFloatingType(motion.scalar_type()),
              "volume and motion must be floating point");
  TORCH_CHECK(volume.device().is_cpu() && motion.device().is_cpu() && frames.device().is_cpu(),
              "the CPU warp kernels need CPU tensors");
  TORCH_CHECK(d.D * d.H * (d.W + 1) < std::numeric_limits<int32_t>::max(),
              "volume planes of more than 2^31 elements are not supported, got shape ", volume.sizes());
  return d;
}

// Motion is read either in the volume's dtype or in fp32 (fp32 flow beside fp16/bf16 frames).
at::Tensor motion_operand(const at::Tensor& motion, const at::Tensor& volume) {
  if (motion.scalar_type() == volume.scalar_type() || motion.scalar_type() == at::kFloat) {
    return motion.contiguous();
  }
  return motion.to(volume.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

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

// Corner offsets and weights of one row of sample points, for a volume with the given row and
// plane strides (in pixels). For corner (s, y) the offset is base[s*2+y][x]; x1 = x0 + dx[x].
template <typename acc_t>
struct RowTaps {
  std::vector<int32_t> base[4], dx;
  std::vector<acc_t> wx, wy, ws, px, py, ps;
  explicit RowTaps(int64_t W) : dx(W), wx(W), wy(W), ws(W), px(W), py(W), ps(W) {
    for (auto& b : base) b.resize(W);
  }

  template <typename motion_t>
  void fill(const motion_t* __restrict mu, const motion_t* __restrict mv, const motion_t* __restrict ms, int y,
            int D, int H, int W, int32_t row_stride, int32_t plane_stride) {
    int32_t* __restrict b00 = base[0].data();
    int32_t* __restrict b01 = base[1].data();
    int32_t* __restrict b10 = base[2].data();
    int32_t* __restrict b11 = base[3].data();
    int32_t* __restrict dxp = dx.data();
    acc_t* __restrict wxp = wx.data();
    acc_t* __restrict wyp = wy.data();
    acc_t* __restrict wsp = ws.data();
    acc_t* __restrict pxp = px.data();
    acc_t* __restrict pyp = py.data();
    acc_t* __restrict psp = ps.data();
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
};

template <typename acc_t>
inline acc_t lerp(acc_t a, acc_t b, acc_t w) {
  return a + w * (b - a);
}

// The forward reads the volume repacked as (B, D, H, W+1, Cp) in acc_t: the channels of a pixel
// (Cp = C rounded up to 4) are contiguous and each row carries a copy of its last column, so the
// two x-neighbours of a corner row are one contiguous run of 2*Cp values, read without a gather,
// even at the right border (x1 = x0). The SIMD forward packs rows in this layout into a ring.
constexpr int kLanes = 4;
typedef float v4f __attribute__((vector_size(16)));  // GCC/Clang vector extension, any ISA

// Large buffers (the packed volume, big outputs) and the row rings come from a small pool and ask
// for transparent huge pages. Packed rows are read at scattered rows of several levels, and 4 KiB
// pages make that miss the TLB (measured: ~20% of the 256^2 forward with the whole volume packed,
// ~5% with a ring of rows). A fresh multi-MiB buffer is page-faulted
// (and zeroed by the kernel) on every call: glibc maps buffers of 32 MiB or more anew each time,
// which cost 6 ms of a 30 ms call at 512^2 for the packed volume, and ~2 ms per 50 MiB output
// even with huge pages. Freed buffers are kept for the next call, up to kPoolBytes in all.
constexpr size_t kHuge = size_t(1) << 21;
constexpr size_t kPoolBytes = size_t(128) << 20;

class BufferPool {
 public:
  // An uninitialised contiguous CPU tensor. From `pooled_from` bytes up it lies on a pooled buffer
  // of at least its size (whole huge pages), which goes back to the pool when the tensor is freed;
  // smaller ones come from the CPU allocator (their page faults are cheap, and glibc reuses such
  // memory).
  at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype, size_t pooled_from = kHuge) {
    const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(dtype);
    if (bytes < pooled_from) return at::empty(sizes, at::TensorOptions().dtype(dtype));
    const size_t cap = (bytes + kHuge - 1) / kHuge * kHuge;
    void* mem = take(cap);
    if (!mem) {
      mem = std::aligned_alloc(kHuge, cap);
      TORCH_CHECK(mem, "warp: cannot allocate ", cap, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      madvise(mem, cap, MADV_HUGEPAGE);  // advisory: a failure only costs speed
#endif
    }
    // Resizable like any CPU tensor: growing it moves the data to the CPU allocator's memory
    // and returns this buffer to the pool.
    return at::for_blob(mem, sizes)
        .deleter([this, cap](void* q) { give(q, cap); })
        .options(at::TensorOptions().dtype(dtype))
        .resizeable_storage()
        .allocator(c10::GetCPUAllocator())
        .make_tensor();
  }

 private:
  void* take(size_t cap) {  // the smallest kept buffer that fits without wasting more than half
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = kept_.end();
    for (auto it = kept_.begin(); it != kept_.end(); ++it) {
      if (it->second >= cap && it->second <= 2 * cap && (best == kept_.end() || it->second < best->second)) best = it;
    }
    if (best == kept_.end()) return nullptr;
    void* mem = best->first;
    kept_bytes_ -= best->second;
    kept_.erase(best);
    return mem;
  }
  void give(void* mem, size_t cap) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (kept_bytes_ + cap <= kPoolBytes) {
        kept_.emplace_back(mem, cap);
        kept_bytes_ += cap;
        return;
      }
    }
    std::free(mem);
  }
  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> kept_;
  size_t kept_bytes_ = 0;
};
// Never destroyed: tensors on pooled buffers may be freed during interpreter shutdown, after the
// library's static destructors have run.
BufferPool& pool = *new BufferPool;

#ifdef DECOVAE_WARP_AVX512
// 16 values of a tensor dtype as fp32 (lanes outside k read as 0), and back with the rounding of
// static_cast (round to nearest even; NaN stays NaN).
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
void pack_row_avx512(const scalar_t* src, int64_t cstride, int C, int W, float* dst) {
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
#endif

template <typename scalar_t, typename acc_t>
at::Tensor pack_volume(const scalar_t* vol, const Dims& d, int64_t Cp) {
  const int64_t W1 = d.W + 1, HW = d.H * d.W;
  at::Tensor packed = pool.empty({d.B, d.D, d.H, W1, Cp}, c10::CppTypeToScalarType<acc_t>::value);
  acc_t* pk = packed.mutable_data_ptr<acc_t>();
  at::parallel_for(0, d.B * d.D * d.H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (d.D * d.H), sy = row % (d.D * d.H);  // sy = s * H + y
      acc_t* dst = pk + row * W1 * Cp;
#ifdef DECOVAE_WARP_AVX512
      if constexpr (std::is_same_v<acc_t, float>) {
        if (Cp == kLanes) {
          pack_row_avx512(vol + b * d.C * d.D * HW + sy * d.W, d.D * HW, static_cast<int>(d.C), d.W, dst);
          continue;
        }
      }
#endif
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

#ifdef DECOVAE_WARP_AVX512
// AVX-512 forward for fp32 math, C <= 4 (Cp = 4) and H >= 2: 16 pixels of a row at a time.
// Coordinates, clamps, floors and weights are computed in 16 lanes. Along y and s the lower corner
// is clamped to n - 2 (at the upper border its weight is then 0 and the upper corner's 1), so the
// four corner rows of a pixel are one offset plus fixed row/plane strides: one index per pixel.
// Each corner row is one 8-float load ((x0, x1) x 4 channels of the packed volume) scaled by its
// broadcast weight; two pixels then share one x-weight multiply, four fold their x0/x1 halves into
// one vector, and the 16 pixels' 4-channel predictions are transposed to channel planes with
// permutes. The row tail uses masked loads/stores: masked-off lanes see zero motion, so their
// (unused) samples stay inside the volume.

// Rows are visited in (y, t) order, so consecutive rows are a plane apart and the hardware
// prefetchers miss them: each row prefetches the inputs and output lines of the row kRowsAhead
// later into L2 (two rows ahead into L2 measured 2-8% faster than one row ahead into L1).
constexpr int64_t kRowsAhead = 2;

// An fp32 output goes around the cache (non-temporal stores) when the op's frames, motion and output
// exceed the last-level cache: they cannot stay cached anyway, and such stores skip reading each
// output line before writing it (16x256^2 and 16x512^2 on the dev VM: 5-7% faster when it was quiet,
// 15-25% while its neighbours loaded the memory).
// Smaller calls keep plain stores, so whatever consumes the output finds it in cache. The cache
// size is sysfs's (32 MiB if unknown): glibc's sysconf(_SC_LEVEL3_CACHE_SIZE) says 320 MiB on the
// dev VM, whose L3 is 32 MiB.
inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t kib = 0;
    if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
      long v = 0;
      char unit = 0;
      if (std::fscanf(f, "%ld%c", &v, &unit) == 2 && v > 0) kib = unit == 'M' ? v * 1024 : v;
      std::fclose(f);
    }
    return kib > 0 ? kib << 10 : int64_t(32) << 20;
  }();
  return bytes;
}

template <typename scalar_t, typename motion_t>
// What a row prefetches: the inputs and output of row + kRowsAhead (frames == nullptr: none) and,
// on the last frame of an image row, the volume row the ring packs next.
struct NextRow {
  const motion_t* motion;
  int64_t mstride;
  const scalar_t* frames;
  scalar_t* out;
  const scalar_t* pack;  // channel 0, level 0 of the volume row the ring packs next (nullptr: none)
};

#endif  // DECOVAE_WARP_AVX512

// One packed row (Cp = 4, fp32) from C <= 4 channel rows, pixel by pixel (any ISA).
template <typename scalar_t>
void pack_row_portable(const scalar_t* src, int64_t cstride, int C, int W, float* dst) {
  for (int x = 0; x < W; ++x) {
    for (int c = 0; c < kLanes; ++c) dst[kLanes * x + c] = c < C ? static_cast<float>(src[c * cstride + x]) : 0.0f;
  }
  for (int c = 0; c < kLanes; ++c) dst[kLanes * W + c] = dst[kLanes * (W - 1) + c];  // the copied last column
}

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
        buf(pool.empty({floats(d)}, at::kFloat, /*pooled_from=*/0)), data(buf.mutable_data_ptr<float>()) {}

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
#ifdef DECOVAE_WARP_AVX512
      pack_row_avx512(src, d.D * HW, static_cast<int>(d.C), d.W, dst);
#else
      pack_row_portable(src, d.D * HW, static_cast<int>(d.C), d.W, dst);
#endif
      if (slot == 0) std::memcpy(dst + kRows * row_stride * kLanes, dst, (d.W + 1) * kLanes * sizeof(float));
    }
  }
};

// One output row on any ISA, pixel by pixel: the taps of forward_row_avx512 (lower corners clamped
// to n - 2, one offset per pixel into the ring, far samples packed into the scratch rows), the four
// corner rows read as two 4-channel vectors each (GCC vector extension: SSE/AVX as compiled).
template <typename scalar_t, typename motion_t, bool kAdd, bool kLevels>
void forward_row_ring(const RowRing<scalar_t>& ring, const motion_t* mu, const motion_t* mv, const motion_t* ms,
                      const scalar_t* frames, scalar_t* out, int64_t cstride, int C, int y, int D, int H, int W) {
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

// The whole forward on ring rows, any ISA, in (b, y, t) order (see warp_forward_kernel): memory
// beyond the output is one small ring per work chunk, as on the AVX-512 path.
template <typename scalar_t, typename motion_t, bool kAdd>
void warp_forward_ring(const scalar_t* vol, const motion_t* mot, const scalar_t* frames, scalar_t* out,
                       const Dims& d) {
  const int D = d.D, H = d.H, W = d.W;
  const int64_t HW = d.H * d.W, rows = d.B * d.T * d.H;
  const auto row_fn = D > 1 ? forward_row_ring<scalar_t, motion_t, kAdd, true>
                            : forward_row_ring<scalar_t, motion_t, kAdd, false>;  // L = 0: bilinear
  at::parallel_for(0, rows, 8 * d.T, [&](int64_t begin, int64_t end) {
    RowRing<scalar_t> ring(vol, d);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (d.T * d.H), t = row % d.T;
      const int y = static_cast<int>((row / d.T) % d.H);
      ring.advance(b, y);
      const motion_t* mu = mot + (b * 3 * d.T + t) * HW + static_cast<int64_t>(y) * W;
      const int64_t o = (b * d.C * d.T + t) * HW + static_cast<int64_t>(y) * W;
      row_fn(ring, mu, mu + d.T * HW, mu + 2 * d.T * HW, frames + o, out + o, d.T * HW, static_cast<int>(d.C), y,
             D, H, W);
    }
  });
}

#ifdef DECOVAE_WARP_AVX512
// One output row: out[c][x] = frames[c][x] -/+ sample, sampling the ring's window.
// kLevels false for L = 0 (plain bilinear: two corner rows).
template <typename scalar_t, typename motion_t, bool kAdd, bool kLevels>
void forward_row_avx512(const RowRing<scalar_t>& ring, const motion_t* mu, const motion_t* mv, const motion_t* ms,
                        const scalar_t* frames, scalar_t* out, int64_t cstride, int C, int y, int D, int H, int W,
                        NextRow<scalar_t, motion_t> next, bool stream_out) {
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
    for (unsigned far = tc.far; far; far &= far - 1) {
      const int i = __builtin_ctz(far);
      ring.fill_far(2 * i, tc.x0[i], tc.y0[i], tc.s0[i], kCorners);
      tc.off[i] = (Ring::kScratch * row_stride + 2 * i) * 4;
    }
    const int32_t* off = tc.off;
    const auto& wr = tc.wr;
    const __m512 ax = _mm512_load_ps(tc.ax), ax1 = _mm512_sub_ps(one, ax);
    asm volatile("" : : "r"(buf) : "memory");  // lanes are read back as scalars, not extracted
    if (next.pack) {  // volume planes: level stride H * W, channel stride D * H * W
      const int64_t HW = static_cast<int64_t>(H) * W;
      for (int c = 0; c < C; ++c)
        for (int sl = 0; sl < D; ++sl)
          _mm_prefetch(reinterpret_cast<const char*>(next.pack + (c * D + sl) * HW + x), _MM_HINT_T1);
    }
    if (next.frames) {
      for (int j = 0; j < 3; ++j) _mm_prefetch(reinterpret_cast<const char*>(next.motion + j * next.mstride + x), _MM_HINT_T1);
      for (int c = 0; c < C; ++c) {
        _mm_prefetch(reinterpret_cast<const char*>(next.frames + c * cstride + x), _MM_HINT_T1);
        if (!stream_out) _mm_prefetch(reinterpret_cast<const char*>(next.out + c * cstride + x), _MM_HINT_T1);
      }
    }
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

// The whole forward on the SIMD rows, in (b, y, t) order (see warp_forward_kernel); each work
// chunk packs the volume rows it samples into its own ring.
template <typename scalar_t, typename motion_t, bool kAdd>
void warp_forward_avx512(const scalar_t* vol, const motion_t* mot, const scalar_t* frames, scalar_t* out,
                         const Dims& d) {
  const int D = d.D, H = d.H, W = d.W;
  const int64_t HW = d.H * d.W, rows = d.B * d.T * d.H;
  const auto row_fn = D > 1 ? forward_row_avx512<scalar_t, motion_t, kAdd, true>
                            : forward_row_avx512<scalar_t, motion_t, kAdd, false>;  // L = 0: bilinear
  const int64_t traffic = d.B * d.T * HW * (d.C * 2 * static_cast<int64_t>(sizeof(scalar_t)) + 3 * sizeof(motion_t));
  const bool stream_out = std::is_same_v<scalar_t, float> && traffic > last_level_cache_bytes();
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
      if (row + kRowsAhead < end) {
        const Row n = locate(row + kRowsAhead);
        next.motion = mot + n.motion;
        next.frames = frames + n.data;
        next.out = out + n.data;
      }
      ring.advance(r.b, r.y);
      // the last frame of this image row fetches the volume row the ring packs next (measured 2-7%)
      const int64_t pr = ring.hi + 1;
      if (static_cast<int64_t>(row % d.T) == d.T - 1 && row + 1 < end && pr < H)
        next.pack = vol + r.b * d.C * d.D * HW + pr * W;
      const motion_t* mu = mot + r.motion;
      row_fn(ring, mu, mu + d.T * HW, mu + 2 * d.T * HW, frames + r.data, out + r.data, d.T * HW,
             static_cast<int>(d.C), r.y, D, H, W, next, stream_out);
    }
    if (stream_out) _mm_sfence();  // the streamed stores are visible before the op returns
  });
}
#endif

// out = frames - sample (kAdd false) or residual + sample (kAdd true).
template <typename scalar_t, typename motion_t, bool kAdd>
void warp_forward_kernel(const scalar_t* vol, const motion_t* mot, const scalar_t* frames, scalar_t* out,
                         const Dims& d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = d.H * d.W, rows = d.B * d.T * d.H;
  const int D = d.D, H = d.H, W = d.W;
  const int64_t Cp = (d.C + kLanes - 1) / kLanes * kLanes;
  if constexpr (std::is_same_v<acc_t, float> && !std::is_same_v<motion_t, double>) {
    // The ring addresses a few packed rows of all levels with int32 float offsets.
    if (Cp == kLanes && H >= 2 && RowRing<scalar_t>::floats(d) < std::numeric_limits<int32_t>::max()) {
#ifdef DECOVAE_WARP_AVX512
      return warp_forward_avx512<scalar_t, motion_t, kAdd>(vol, mot, frames, out, d);
#else
      return warp_forward_ring<scalar_t, motion_t, kAdd>(vol, mot, frames, out, d);
#endif
    }
  }
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
      taps.fill(mu, mu + d.T * HW, mu + 2 * d.T * HW, y, D, H, W, row_stride, plane_stride);
      for (int x = 0; x < W; ++x) {
        const acc_t fx = taps.wx[x], fy = taps.wy[x], fs = taps.ws[x];
        const acc_t wr[4] = {(1 - fs) * (1 - fy), (1 - fs) * fy, fs * (1 - fy), fs * fy};
        const acc_t* p[4];
        for (int r = 0; r < 4; ++r) p[r] = pk + static_cast<int64_t>(taps.base[r][x]) * Cp;
        if constexpr (std::is_same_v<acc_t, float>) {
          if (Cp == kLanes) {  // C <= 4 in fp32 math: one 4-lane vector per x-neighbour
            v4f lo = {0, 0, 0, 0}, hi = {0, 0, 0, 0};
            for (int r = 0; r < corners; ++r) {
              v4f q0, q1;
              std::memcpy(&q0, p[r], sizeof(v4f));
              std::memcpy(&q1, p[r] + kLanes, sizeof(v4f));
              lo += (wr[r] * (1 - fx)) * q0;
              hi += (wr[r] * fx) * q1;
            }
            const v4f pred = lo + hi;
            for (int j = 0; j < d.C; ++j) {
              const int64_t i = o + j * cstride + x;
              const acc_t fv = static_cast<acc_t>(frames[i]);
              out[i] = static_cast<scalar_t>(kAdd ? fv + pred[j] : fv - pred[j]);
            }
            continue;
          }
        }
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

template <bool kAdd>
at::Tensor warp_forward(const at::Tensor& volume_in, const at::Tensor& motion_in, const at::Tensor& frames_in,
                        const char* frames_name) {
  const Dims d = check_warp_args(volume_in, motion_in, frames_in, frames_name);
  const at::Tensor volume = volume_in.contiguous();
  const at::Tensor frames = frames_in.contiguous();
  const at::Tensor motion = motion_operand(motion_in, volume);
  // From the buffer pool: whether glibc hands out fresh (faulting) pages for a multi-MiB output
  // depends on what the process allocated before (always, from 32 MiB up).
  at::Tensor out = pool.empty(frames.sizes(), frames.scalar_type());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, volume.scalar_type(), "warp_forward", [&] {
    if (motion.scalar_type() == volume.scalar_type()) {
      warp_forward_kernel<scalar_t, scalar_t, kAdd>(volume.const_data_ptr<scalar_t>(),
                                                    motion.const_data_ptr<scalar_t>(),
                                                    frames.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), d);
    } else {
      warp_forward_kernel<scalar_t, float, kAdd>(volume.const_data_ptr<scalar_t>(), motion.const_data_ptr<float>(),
                                                 frames.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), d);
    }
  });
  return out;
}

at::Tensor warp_residual_cpu(const at::Tensor& volume, const at::Tensor& motion, const at::Tensor& frames) {
  return warp_forward<false>(volume, motion, frames, "frames");
}

at::Tensor warp_add_cpu(const at::Tensor& volume, const at::Tensor& motion, const at::Tensor& residual) {
  return warp_forward<true>(volume, motion, residual, "residual");
}

// Gradients of sum(g * sample(volume, motion)). grad_vol_parts holds `chunks` partial volume
// gradients (acc_t, each B*C*D*H*W); chunk k covers rows [k*rows/chunks, (k+1)*rows/chunks).
template <typename scalar_t, typename motion_t>
void warp_backward_kernel(const scalar_t* grad, const scalar_t* vol, const motion_t* mot,
                          at::opmath_type<scalar_t>* grad_vol_parts, motion_t* grad_mot, int64_t chunks,
                          const Dims& d) {
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
        taps.fill(mot + mo, mot + mo + d.T * HW, mot + mo + 2 * d.T * HW, y, D, H, W, W, H * W);
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

// grad_volume = sum of the partial gradients, in chunk order.
template <typename scalar_t>
void reduce_parts(const at::opmath_type<scalar_t>* parts, int64_t chunks, int64_t n, scalar_t* out) {
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      at::opmath_type<scalar_t> s = parts[i];
      for (int64_t k = 1; k < chunks; ++k) s += parts[k * n + i];
      out[i] = static_cast<scalar_t>(s);
    }
  });
}

// Bytes the backward's partial volume gradients may take in all: DECOVAE_WARP_GRAD_MIB MiB
// (default 1024). Each is a whole fp32 volume (149 MB at 1080p with L = 5), so one per thread
// would grow with the host (9.5 GB on 64 threads); past the budget fewer chunks, and so fewer
// threads, scatter. One chunk is always allowed.
int64_t grad_parts_budget() {
  const char* env = std::getenv("DECOVAE_WARP_GRAD_MIB");
  if (!env || !*env) return int64_t(1024) << 20;
  char* end = nullptr;
  const long long mib = std::strtoll(env, &end, 10);
  TORCH_CHECK(end && *end == 0 && mib >= 0, "DECOVAE_WARP_GRAD_MIB must be a whole number of MiB, got '", env, "'");
  return static_cast<int64_t>(mib) << 20;
}

std::tuple<at::Tensor, at::Tensor> warp_sample_backward_cpu(const at::Tensor& grad_prediction,
                                                            const at::Tensor& volume_in, const at::Tensor& motion_in,
                                                            bool volume_grad, bool motion_grad) {
  const Dims d = check_warp_args(volume_in, motion_in, grad_prediction, "grad_prediction");
  const at::Tensor volume = volume_in.contiguous();
  const at::Tensor grad = grad_prediction.contiguous();
  const at::Tensor motion = motion_operand(motion_in, volume);
  const auto contig = at::MemoryFormat::Contiguous;
  const int64_t rows = d.B * d.T * d.H;
  const bool empty = grad.numel() == 0;
  // Gradients not asked for are returned as zeros (the schema always returns two tensors).
  at::Tensor grad_volume = (volume_grad && !empty) ? at::empty(volume.sizes(), volume.options().memory_format(contig))
                                                   : at::zeros(volume.sizes(), volume.options().memory_format(contig));
  at::Tensor grad_motion = (motion_grad && !empty) ? at::empty(motion.sizes(), motion.options().memory_format(contig))
                                                   : at::zeros(motion.sizes(), motion.options().memory_format(contig));
  if (empty || !(volume_grad || motion_grad)) {
    return {grad_volume, grad_motion.to(motion_in.scalar_type())};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, volume.scalar_type(), "warp_sample_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    // One chunk of rows per thread (each with its own partial volume gradient, summed in a fixed
    // order), as far as the partial gradients fit the budget.
    int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
    at::Tensor parts;
    acc_t* parts_ptr = nullptr;
    if (volume_grad) {
      const int64_t part_bytes = volume.numel() * static_cast<int64_t>(sizeof(acc_t));
      chunks = std::max<int64_t>(1, std::min(chunks, grad_parts_budget() / part_bytes));
      parts = at::zeros({chunks, volume.numel()}, volume.options().dtype(acc_type));
      parts_ptr = parts.mutable_data_ptr<acc_t>();
    }
    if (motion.scalar_type() == volume.scalar_type()) {
      warp_backward_kernel<scalar_t, scalar_t>(grad.const_data_ptr<scalar_t>(), volume.const_data_ptr<scalar_t>(),
                                               motion.const_data_ptr<scalar_t>(), parts_ptr,
                                               motion_grad ? grad_motion.mutable_data_ptr<scalar_t>() : nullptr,
                                               chunks, d);
    } else {
      warp_backward_kernel<scalar_t, float>(grad.const_data_ptr<scalar_t>(), volume.const_data_ptr<scalar_t>(),
                                            motion.const_data_ptr<float>(), parts_ptr,
                                            motion_grad ? grad_motion.mutable_data_ptr<float>() : nullptr, chunks, d);
    }
    if (volume_grad) {
      reduce_parts<scalar_t>(parts_ptr, chunks, volume.numel(), grad_volume.mutable_data_ptr<scalar_t>());
    }
  });
  return {grad_volume, grad_motion.to(motion_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(decovae, CPU, m) {
  m.impl("warp_residual", &warp_residual_cpu);
  m.impl("warp_add", &warp_add_cpu);
  m.impl("warp_sample_backward", &warp_sample_backward_cpu);
}
