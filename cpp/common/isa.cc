#include "common/isa.h"

#include <atomic>
#include <cstdlib>

namespace rk {
namespace {

Isa detectBest() {
#ifdef RK_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
#endif
  return Isa::Base;
}

Isa best() {
  static const Isa b = detectBest();
  return b;
}

// The initial choice: RK_CPU_ISA when it names a variant this machine supports, else the best.
// (An unknown or unsupported RK_CPU_ISA is reported by the JavaScript layer when it loads.)
int initialChoice() {
  Isa isa = best();
  if (const char* env = std::getenv("RK_CPU_ISA")) {
    Isa want;
    if (parseIsa(env, &want) && isaSupported(want)) isa = want;
  }
  return int(isa);
}

std::atomic<int>& chosen() {
  static std::atomic<int> c{initialChoice()};
  return c;
}

std::atomic<uint64_t> runs[kIsaCount];

}  // namespace

const char* isaName(Isa isa) {
  switch (isa) {
    case Isa::Avx512:
      return "avx512";
    case Isa::Avx2:
      return "avx2";
    default:
      return "base";
  }
}

bool parseIsa(const std::string& name, Isa* out) {
  for (Isa i : {Isa::Avx512, Isa::Avx2, Isa::Base})
    if (name == isaName(i)) {
      *out = i;
      return true;
    }
  return false;
}

bool isaSupported(Isa isa) { return int(isa) <= int(best()); }

std::vector<Isa> supportedIsas() {
  std::vector<Isa> v;
  for (int i = int(best()); i >= 0; --i) v.push_back(Isa(i));
  return v;
}

Isa activeIsa() { return Isa(chosen().load(std::memory_order_relaxed)); }
void setActiveIsa(Isa isa) { chosen().store(int(isa), std::memory_order_relaxed); }
uint64_t isaRuns(Isa isa) { return runs[int(isa)].load(std::memory_order_relaxed); }

Isa isaForCall() {
  const Isa isa = activeIsa();
  runs[int(isa)].fetch_add(1, std::memory_order_relaxed);
  return isa;
}

}  // namespace rk
