// The warp ops on the CPU (DESIGN: docs/ops.md): warp_residual, warp_add and their shared backward
// warp_sample_backward; semantics are those of decovae_fast/ops/reference.py. This file checks
// arguments, allocates and picks the kernels of the CPU's instruction set (kernels.h); the kernels
// are in warp_forward.h and warp_backward.h, what they share with this file in warp_common.h.
// Math is in fp32 (fp64 for fp64 inputs).
#include "cpu/warp_common.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace decovae::cpu::warp {

// ---- buffer pool (warp_common.h) ----------------------------------------------------------------

constexpr size_t kPoolBytes = size_t(128) << 20;

at::Tensor BufferPool::empty(at::IntArrayRef sizes, at::ScalarType dtype, size_t pooled_from) {
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

void* BufferPool::take(size_t cap) {  // the smallest kept buffer that fits without wasting more than half
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

void BufferPool::give(void* mem, size_t cap) {
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

// Never destroyed: tensors on pooled buffers may be freed during interpreter shutdown, after the
// library's static destructors have run.
BufferPool& pool() {
  static BufferPool* p = new BufferPool;
  return *p;
}

int64_t last_level_cache_bytes() {
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

// Bytes the backward's partial volume gradients may take in all: DECOVAE_WARP_GRAD_MIB MiB
// (default 1024). Each is a whole packed volume (199 MB at 1080p with L = 5, fp32), so one per
// thread would grow with the host (13 GB on 64 threads); past the budget fewer chunks, and so fewer
// threads, scatter. One chunk is always allowed.
int64_t grad_parts_budget() {
  const char* env = std::getenv("DECOVAE_WARP_GRAD_MIB");
  if (!env || !*env) return int64_t(1024) << 20;
  char* end = nullptr;
  const long long mib = std::strtoll(env, &end, 10);
  TORCH_CHECK(end && *end == 0 && mib >= 0, "DECOVAE_WARP_GRAD_MIB must be a whole number of MiB, got '", env, "'");
  return static_cast<int64_t>(mib) << 20;
}

namespace {

// ---- the ops ------------------------------------------------------------------------------------

Dims check_warp_args(const at::Tensor& volume, const at::Tensor& motion, const at::Tensor& frames,
                     const char* frames_name) {
  TORCH_CHECK(volume.dim() == 5, "volume must be (B, C, L+1, H, W), got shape ", volume.sizes());
  TORCH_CHECK(motion.dim() == 5, "motion must be (B, 3, T, H, W), got shape ", motion.sizes());
  TORCH_CHECK(frames.dim() == 5, frames_name, " must be (B, C, T, H, W), got shape ", frames.sizes());
  Dims d = dims_of(volume, frames);
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

template <bool kAdd>
at::Tensor warp_forward(const at::Tensor& volume_in, const at::Tensor& motion_in, const at::Tensor& frames_in,
                        const char* frames_name) {
  check_warp_args(volume_in, motion_in, frames_in, frames_name);
  const at::Tensor volume = volume_in.contiguous();
  const at::Tensor frames = frames_in.contiguous();
  const at::Tensor motion = motion_operand(motion_in, volume);
  // From the buffer pool: whether glibc hands out fresh (faulting) pages for a multi-MiB output
  // depends on what the process allocated before (always, from 32 MiB up).
  at::Tensor out = pool().empty(frames.sizes(), frames.scalar_type());
  if (out.numel() == 0) return out;
  kernels().warp_forward(volume, motion, frames, out, kAdd);
  return out;
}

at::Tensor warp_residual_cpu(const at::Tensor& volume, const at::Tensor& motion, const at::Tensor& frames) {
  return warp_forward<false>(volume, motion, frames, "frames");
}

at::Tensor warp_add_cpu(const at::Tensor& volume, const at::Tensor& motion, const at::Tensor& residual) {
  return warp_forward<true>(volume, motion, residual, "residual");
}

std::tuple<at::Tensor, at::Tensor> warp_sample_backward_cpu(const at::Tensor& grad_prediction,
                                                            const at::Tensor& volume_in, const at::Tensor& motion_in,
                                                            bool volume_grad, bool motion_grad) {
  check_warp_args(volume_in, motion_in, grad_prediction, "grad_prediction");
  const at::Tensor volume = volume_in.contiguous();
  const at::Tensor grad = grad_prediction.contiguous();
  const at::Tensor motion = motion_operand(motion_in, volume);
  const auto contig = at::MemoryFormat::Contiguous;
  const bool empty = grad.numel() == 0;
  // Gradients not asked for are returned as zeros (the schema always returns two tensors).
  at::Tensor grad_volume = (volume_grad && !empty) ? at::empty(volume.sizes(), volume.options().memory_format(contig))
                                                   : at::zeros(volume.sizes(), volume.options().memory_format(contig));
  at::Tensor grad_motion = (motion_grad && !empty) ? at::empty(motion.sizes(), motion.options().memory_format(contig))
                                                   : at::zeros(motion.sizes(), motion.options().memory_format(contig));
  if (!empty && (volume_grad || motion_grad)) {
    at::Tensor none;
    kernels().warp_backward(grad, volume, motion, volume_grad ? grad_volume : none, motion_grad ? grad_motion : none);
  }
  return {grad_volume, grad_motion.to(motion_in.scalar_type())};
}

}  // namespace
}  // namespace decovae::cpu::warp

TORCH_LIBRARY_IMPL(decovae, CPU, m) {
  m.impl("warp_residual", &decovae::cpu::warp::warp_residual_cpu);
  m.impl("warp_add", &decovae::cpu::warp::warp_add_cpu);
  m.impl("warp_sample_backward", &decovae::cpu::warp::warp_sample_backward_cpu);
}
