// What the warp's op file (warp.cpp) and its per-ISA kernels (warp_forward.h, warp_backward.h)
// share: the op's dimensions, the packed layout and the buffer pool. Compiled for the portable
// baseline (included before any target switch), so it holds no template: one instantiated by the
// ISA kernels could be compiled for their ISA, and the linker could keep that copy for every caller
// (tests/ops/test_cpu_capability.py checks the built library for such copies).
#pragma once

#include "cpu/kernels.h"

namespace decovae::cpu::warp {

struct Dims {
  int64_t B, C, T, D, H, W;
};

inline Dims dims_of(const at::Tensor& volume, const at::Tensor& frames) {
  return Dims{frames.size(0), frames.size(1), frames.size(2), volume.size(2), frames.size(3), frames.size(4)};
}

// The forward reads the volume repacked as (B, D, H, W+1, Cp) in acc_t: the channels of a pixel
// (Cp = C rounded up to 4) are contiguous and each row carries a copy of its last column, so the
// two x-neighbours of a corner row are one contiguous run of 2*Cp values, read without a gather,
// even at the right border (x1 = x0). The fast forward packs rows in this layout into a ring.
constexpr int kLanes = 4;

// Large buffers (the packed volume, big outputs) and the row rings come from a small pool and ask
// for transparent huge pages. Packed rows are read at scattered rows of several levels, and 4 KiB
// pages make that miss the TLB (measured: ~20% of the 256^2 forward with the whole volume packed,
// ~5% with a ring of rows). A fresh multi-MiB buffer is page-faulted (and zeroed by the kernel) on
// every call: glibc maps buffers of 32 MiB or more anew each time, which cost 6 ms of a 30 ms call
// at 512^2 for the packed volume, and ~2 ms per 50 MiB output even with huge pages. Freed buffers
// are kept for the next call, up to 128 MiB in all (warp.cpp).
constexpr size_t kHuge = size_t(1) << 21;

class BufferPool {
 public:
  // An uninitialised contiguous CPU tensor. From `pooled_from` bytes up it lies on a pooled buffer
  // of at least its size (whole huge pages), which goes back to the pool when the tensor is freed;
  // smaller ones come from the CPU allocator (their page faults are cheap, and glibc reuses such
  // memory).
  at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype, size_t pooled_from = kHuge);

 private:
  void* take(size_t cap);
  void give(void* mem, size_t cap);
  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> kept_;
  size_t kept_bytes_ = 0;
};

BufferPool& pool();

// Last-level cache size from sysfs (32 MiB if unknown): glibc's sysconf(_SC_LEVEL3_CACHE_SIZE)
// says 320 MiB on the dev VM, whose L3 is 32 MiB.
int64_t last_level_cache_bytes();

// Bytes the backward's partial volume gradients may take in all (warp.cpp).
int64_t grad_parts_budget();

}  // namespace decovae::cpu::warp
