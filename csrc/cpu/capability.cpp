// Run-time choice of the CPU kernels' instruction set (capability.h). The levels are the x86-64
// microarchitecture levels: avx2 = x86-64-v3 (AVX2, FMA, F16C, BMI2), avx512 = x86-64-v4 (AVX-512
// F/BW/DQ/VL). __builtin_cpu_supports also checks that the OS saves the vector registers.
#include "cpu/capability.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <mutex>

namespace decovae::cpu {
namespace {

constexpr Capability kAll[] = {Capability::kDefault, Capability::kAVX2, Capability::kAVX512};

bool parse(const std::string& name, Capability& out) {
  for (Capability c : kAll) {
    if (name == capability_name(c)) {
      out = c;
      return true;
    }
  }
  return false;
}

// The best level the CPU runs. DECOVAE_CPU_PRETEND=<name> caps it, so that tests can check on any
// host how a CPU without AVX-512 (or AVX2) is treated.
Capability best_supported() {
  Capability best = Capability::kDefault;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v3")) best = Capability::kAVX2;
  if (__builtin_cpu_supports("x86-64-v4")) best = Capability::kAVX512;
#endif
  Capability cap;
  const char* pretend = std::getenv("DECOVAE_CPU_PRETEND");
  if (pretend && *pretend && parse(pretend, cap) && cap < best) best = cap;
  return best;
}

std::string list_supported() {
  std::string s;
  for (const auto& n : supported_capabilities()) s += (s.empty() ? "" : ", ") + n;
  return s;
}

// Checks a requested capability: known, and runnable here.
Capability checked(const std::string& name, const char* source) {
  Capability c;
  TORCH_CHECK(parse(name, c), source, "='", name, "' is not a CPU capability; use one of: default, avx2, avx512");
  TORCH_CHECK(c <= best_supported(), source, "=", name, " but this CPU does not run it (it runs: ", list_supported(),
              ")");
  return c;
}

std::mutex mutex;
std::atomic<int> chosen{-1};
std::string reason;

void choose_once() {
  std::lock_guard<std::mutex> lock(mutex);
  if (chosen.load() >= 0) return;
  const char* env = std::getenv("DECOVAE_CPU_CAPABILITY");
  Capability c;
  if (env && *env) {
    c = checked(env, "DECOVAE_CPU_CAPABILITY");
    reason = std::string(capability_name(c)) + " (forced by DECOVAE_CPU_CAPABILITY; this CPU runs: " + list_supported() + ")";
  } else {
    c = best_supported();
    reason = std::string(capability_name(c)) + " (the best this CPU runs; DECOVAE_CPU_CAPABILITY unset)";
  }
  chosen.store(static_cast<int>(c));
}

}  // namespace

const char* capability_name(Capability c) {
  switch (c) {
    case Capability::kAVX2: return "avx2";
    case Capability::kAVX512: return "avx512";
    default: return "default";
  }
}

std::vector<std::string> supported_capabilities() {
  std::vector<std::string> out;
  for (Capability c : kAll)
    if (c <= best_supported()) out.emplace_back(capability_name(c));
  return out;
}

Capability capability() {
  int c = chosen.load(std::memory_order_relaxed);
  if (c < 0) {
    choose_once();
    c = chosen.load();
  }
  return static_cast<Capability>(c);
}

std::string capability_reason() {
  capability();
  std::lock_guard<std::mutex> lock(mutex);
  return reason;
}

void set_capability(const std::string& name) {
  const Capability c = checked(name, "set_cpu_capability");
  std::lock_guard<std::mutex> lock(mutex);
  reason = std::string(capability_name(c)) + " (set by set_cpu_capability; this CPU runs: " + list_supported() + ")";
  chosen.store(static_cast<int>(c));
}

}  // namespace decovae::cpu
