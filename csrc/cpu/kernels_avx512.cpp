// The CPU kernels compiled for x86-64-v4 (AVX-512 F, BW, DQ, VL on top of x86-64-v3), chosen when
// the CPU runs it, or with DECOVAE_CPU_CAPABILITY=avx512. See kernels_avx2.cpp.
#include "cpu/kernels.h"

#if defined(__x86_64__)
#pragma GCC target("arch=x86-64-v4")
#define DECOVAE_ISA_LEVEL 2
#else
#define DECOVAE_ISA_LEVEL 0
#endif
#define DECOVAE_ISA avx512
#define DECOVAE_KERNELS_TABLE kernels_avx512
#include "cpu/kernels_impl.h"
