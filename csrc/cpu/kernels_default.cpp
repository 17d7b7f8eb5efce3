// The CPU kernels for the portable baseline (the build's -march, x86-64-v2 by default): what runs
// on a CPU without AVX2 + FMA, or with DECOVAE_CPU_CAPABILITY=default.
#include "cpu/kernels.h"

#define DECOVAE_ISA default_isa
#define DECOVAE_ISA_LEVEL 0
#define DECOVAE_KERNELS_TABLE kernels_default
#include "cpu/kernels_impl.h"
