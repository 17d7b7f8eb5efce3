// The one place where the `decovae` op schemas live. Kernel files only add implementations
// (TORCH_LIBRARY_IMPL(decovae, CPU|CUDA, m)); fake kernels and autograd are registered from Python
// in decovae_fast/ops/_library.py.
#include <torch/extension.h>

#include "cpu/capability.h"

#ifdef _OPENMP
#include <omp.h>
#endif

TORCH_LIBRARY(decovae, m) {
  // (B,C,H,W) -> (B,C,L+1,H,W): level 0 is x0, level i a separable Gaussian blur with
  // sigma0 * 2^(i-1), radius ceil(3 sigma), replicate border.
  m.def("gaussian_volume(Tensor x0, int levels, float sigma0) -> Tensor");
  m.def("gaussian_volume_backward(Tensor grad_volume, int levels, float sigma0) -> Tensor");

  // Scale-space warp: sample volume (B,C,L+1,H,W) at (x+u, y+v, s) for motion (B,3,T,H,W).
  m.def("warp_residual(Tensor volume, Tensor motion, Tensor frames) -> Tensor");
  m.def("warp_add(Tensor volume, Tensor motion, Tensor residual) -> Tensor");
  // Shared backward of both warps: gradients of sum(grad_prediction * sample(volume, motion)).
  m.def(
      "warp_sample_backward(Tensor grad_prediction, Tensor volume, Tensor motion, "
      "bool volume_grad, bool motion_grad) -> (Tensor, Tensor)");

  // Causal in time (kt-1 frames of history from `cache`, zeros when None), zero "same" padding in
  // space. Prologue: optional per-position RMSNorm over channels (norm_weight) and SiLU.
  // Epilogue: bias, optional SiLU, optional residual add. Returns (y, new_cache), new_cache being
  // the last kt-1 input frames of [cache, x] (raw, before the prologue).
  m.def(
      "causal_conv3d(Tensor x, Tensor weight, Tensor? bias, int[3] stride, Tensor? cache, "
      "Tensor? norm_weight, float eps, bool prologue_silu, bool epilogue_silu, Tensor? residual) "
      "-> (Tensor, Tensor)");
  // Returns grads of (x, weight, bias, cache, norm_weight); an undefined tensor where not asked.
  m.def(
      "causal_conv3d_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, int[3] stride, "
      "Tensor? cache, Tensor? norm_weight, float eps, bool prologue_silu, bool epilogue_silu, "
      "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

#ifndef DECOVAE_BUILD_MARCH
#define DECOVAE_BUILD_MARCH "unknown"
#endif

namespace {
bool cuda_compiled() {
#ifdef DECOVAE_WITH_CUDA
  return true;
#else
  return false;
#endif
}
int openmp_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cuda_compiled", &cuda_compiled, "whether the CUDA kernels were compiled in");
  m.def("openmp_threads", &openmp_threads, "OpenMP threads available to the CPU kernels");
  // The CPU kernels' instruction set (csrc/cpu/capability.h).
  m.def("cpu_capability", [] { return std::string(decovae::cpu::capability_name(decovae::cpu::capability())); },
        "the instruction set the CPU kernels run with: default, avx2 or avx512");
  m.def("cpu_capability_reason", &decovae::cpu::capability_reason, "why that instruction set was chosen");
  m.def("set_cpu_capability", &decovae::cpu::set_capability, "force the CPU kernels' instruction set");
  m.def("build_march", [] { return std::string(DECOVAE_BUILD_MARCH); }, "the -march of the portable code");
  m.def("supported_cpu_capabilities", &decovae::cpu::supported_capabilities,
        "the instruction sets this CPU runs, portable first");
}
