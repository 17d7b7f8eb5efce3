// The CPU kernels compiled for x86-64-v3 (AVX2, FMA, F16C, BMI2), chosen when the CPU runs it and
// not AVX-512, or with DECOVAE_CPU_CAPABILITY=avx2. kernels.h has included every library header
// before the target switch, so only the kernels below are compiled for this ISA. Elsewhere than
// x86-64 this is the portable code again (never chosen there).
#include "cpu/kernels.h"

#if defined(__x86_64__)
#pragma GCC target("arch=x86-64-v3")
#define DECOVAE_ISA_LEVEL 1
#else
#define DECOVAE_ISA_LEVEL 0
#endif
#define DECOVAE_ISA avx2
#define DECOVAE_KERNELS_TABLE kernels_avx2
#include "cpu/kernels_impl.h"
