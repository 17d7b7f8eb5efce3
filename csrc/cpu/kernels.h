// The CPU kernels that are compiled once per instruction set and chosen at run time: each of
// kernels_default.cpp, kernels_avx2.cpp and kernels_avx512.cpp compiles the kernel headers below
// under its own target and fills one table. The op files (warp.cpp, gaussian_volume.cpp,
// causal_conv3d.cpp) check arguments, allocate, and call kernels(). Everything is included here,
// before any file switches targets, so code from torch and the standard library is compiled for
// the portable baseline only (no ISA-specific copy of an inline function can reach the linker).
#pragma once

// GCC 12's AVX-512 intrinsic headers trip -W(maybe-)uninitialized when inlined (their
// _mm512_undefined_* self-initialise); the pragma must precede their inclusion through torch.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// GCC notes that 32-byte vectors (warp_backward.h) would be passed differently with and without
// AVX; they never cross a function boundary (the helpers are inlined into the kernels).
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "causal_conv3d_common.h"
#include "cpu/capability.h"

namespace decovae::cpu {

// Arguments of the fused convolution's fast forward (causal_conv3d.cpp checks them).
struct ConvArgs {
  conv3d::Geometry g;
  const at::Tensor& x;
  const at::Tensor& weight;
  const std::optional<at::Tensor>& bias;
  const std::optional<at::Tensor>& cache;
  const std::optional<at::Tensor>& norm_weight;
  double eps;
  bool prologue_silu, epilogue_silu;
  const std::optional<at::Tensor>& residual;
};

struct Kernels {
  // out = frames -/+ sample(volume, motion) (add false/true); contiguous inputs, out preallocated.
  void (*warp_forward)(const at::Tensor& volume, const at::Tensor& motion, const at::Tensor& frames, at::Tensor& out,
                       bool add);
  // Writes grad_volume and grad_motion (each only if defined; contiguous, preallocated).
  void (*warp_backward)(const at::Tensor& grad, const at::Tensor& volume, const at::Tensor& motion,
                        at::Tensor& grad_volume, at::Tensor& grad_motion);
  void (*gaussian_volume)(const at::Tensor& x0, at::Tensor& out, int64_t levels, double sigma0);
  void (*gaussian_volume_backward)(const at::Tensor& grad, at::Tensor& grad_x, int64_t levels, double sigma0);
  // The 3x3 Winograd path (when conv3d::winograd_applies) or the implicit GEMM; y preallocated.
  void (*conv3d_forward)(const ConvArgs& a, at::Tensor& y);
};

extern const Kernels kernels_default, kernels_avx2, kernels_avx512;

// The table of the capability in use.
inline const Kernels& kernels() {
  switch (capability()) {
    case Capability::kAVX512: return kernels_avx512;
    case Capability::kAVX2: return kernels_avx2;
    default: return kernels_default;
  }
}

}  // namespace decovae::cpu
