// What csrc/cpu/causal_conv3d.cpp defines and csrc/cuda/causal_conv3d.cu also uses: the argument
// checks and the device-agnostic composite forward/backward (the CUDA key's fallback and backward).
// Declared once here, so a signature drift fails at compile time, not at link time.
#pragma once

#include <torch/extension.h>

#include <array>
#include <optional>
#include <tuple>

namespace decovae::conv3d {

void check_causal_conv3d_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, const std::optional<at::Tensor>& cache,
                              const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& residual);
// The last kt-1 raw frames of [cache, x].
at::Tensor make_new_cache(const at::Tensor& x, const std::optional<at::Tensor>& cache, int64_t kt);
std::tuple<at::Tensor, at::Tensor> causal_conv3d_composite(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    const std::optional<at::Tensor>& cache, const std::optional<at::Tensor>& norm_weight, double eps,
    bool prologue_silu, bool epilogue_silu, const std::optional<at::Tensor>& residual);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv3d_backward_composite(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, const std::optional<at::Tensor>& cache, const std::optional<at::Tensor>& norm_weight,
    double eps, bool prologue_silu, bool epilogue_silu, std::array<bool, 5> mask);

}  // namespace decovae::conv3d
