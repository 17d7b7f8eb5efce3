// The Gaussian scale-space ops on the CPU (docs/ops.md, op 1): level 0 is x0, level i >= 1 a
// separable Gaussian blur with sigma0 * 2^(i-1), radius ceil(3 sigma), replicate border, as
// reference.gaussian_volume; the backward is the transpose of that linear map. This file checks
// and allocates; the kernels, compiled per ISA, are in gaussian_volume_kernels.h.
#include "cpu/kernels.h"

namespace {

void check_levels(int64_t levels, double sigma0) {
  TORCH_CHECK(levels >= 0, "levels must be >= 0, got ", levels);
  TORCH_CHECK(sigma0 > 0 && std::isfinite(sigma0), "sigma0 must be a positive finite number, got ", sigma0);
}

at::Tensor gaussian_volume_cpu(const at::Tensor& x0_in, int64_t levels, double sigma0) {
  TORCH_CHECK(x0_in.dim() == 4, "x0 must be (B, C, H, W), got shape ", x0_in.sizes());
  TORCH_CHECK(at::isFloatingType(x0_in.scalar_type()), "x0 must be floating point, got ", x0_in.scalar_type());
  check_levels(levels, sigma0);
  const at::Tensor x0 = x0_in.contiguous();
  at::Tensor out = at::empty({x0.size(0), x0.size(1), levels + 1, x0.size(2), x0.size(3)}, x0.options());
  if (out.numel() == 0) return out;
  decovae::cpu::kernels().gaussian_volume(x0, out, levels, sigma0);
  return out;
}

at::Tensor gaussian_volume_backward_cpu(const at::Tensor& grad_in, int64_t levels, double sigma0) {
  TORCH_CHECK(grad_in.dim() == 5 && grad_in.size(2) == levels + 1,
              "grad_volume must be (B, C, levels+1, H, W) with levels=", levels, ", got shape ", grad_in.sizes());
  TORCH_CHECK(at::isFloatingType(grad_in.scalar_type()), "grad_volume must be floating point");
  check_levels(levels, sigma0);
  const at::Tensor g = grad_in.contiguous();
  at::Tensor grad_x = at::empty({g.size(0), g.size(1), g.size(3), g.size(4)}, g.options());
  if (grad_x.numel() == 0) return grad_x;
  decovae::cpu::kernels().gaussian_volume_backward(g, grad_x, levels, sigma0);
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(decovae, CPU, m) {
  m.impl("gaussian_volume", &gaussian_volume_cpu);
  m.impl("gaussian_volume_backward", &gaussian_volume_backward_cpu);
}
