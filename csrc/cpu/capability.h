// The instruction set the CPU kernels run with. The hot kernels are compiled three times
// (kernels_default.cpp, kernels_avx2.cpp, kernels_avx512.cpp); one of them is chosen at run time from
// the CPU's features, or forced with DECOVAE_CPU_CAPABILITY=default|avx2|avx512.
#pragma once

#include <string>
#include <vector>

namespace decovae::cpu {

enum class Capability { kDefault = 0, kAVX2 = 1, kAVX512 = 2 };

// The capability in use (chosen on first use; a forced one the CPU lacks is a c10::Error).
Capability capability();
// Why it was chosen, one line: "avx512 (the best this CPU runs; DECOVAE_CPU_CAPABILITY unset)".
std::string capability_reason();
// Forces one by name for the rest of the process (tests, benchmarks); errors as above.
void set_capability(const std::string& name);
// Names of the capabilities this CPU runs, portable first.
std::vector<std::string> supported_capabilities();
const char* capability_name(Capability c);

}  // namespace decovae::cpu
