// The body of kernels_default.cpp, kernels_avx2.cpp and kernels_avx512.cpp: the kernel headers,
// compiled under the including file's target in namespace decovae::cpu::DECOVAE_ISA, and the
// table that kernels() returns for that ISA. Include only from those files, after kernels.h and
// the target switch, with DECOVAE_ISA, DECOVAE_ISA_LEVEL and DECOVAE_KERNELS_TABLE defined.
#if !defined(DECOVAE_ISA) || !defined(DECOVAE_ISA_LEVEL) || !defined(DECOVAE_KERNELS_TABLE)
#error "kernels_impl.h is included by kernels_<isa>.cpp only"
#endif

#include "cpu/causal_conv3d_kernels.h"
#include "cpu/gaussian_volume_kernels.h"
#include "cpu/warp_backward.h"
#include "cpu/warp_forward.h"

namespace decovae::cpu {

// Constant-initialised (function addresses only): nothing of this ISA runs while the library loads.
const Kernels DECOVAE_KERNELS_TABLE = {
    &DECOVAE_ISA::warp::warp_forward,
    &DECOVAE_ISA::warp::warp_backward,
    &DECOVAE_ISA::gaussian::gaussian_volume,
    &DECOVAE_ISA::gaussian::gaussian_volume_backward,
    &DECOVAE_ISA::conv3d::conv3d_forward,
};

}  // namespace decovae::cpu
