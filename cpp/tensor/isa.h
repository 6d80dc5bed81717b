// Run-time choice of the instruction set for the CPU kernels' hot loops. A kernel writes its loops
// once (RK_ALWAYS_INLINE bodies), compiles them per instruction set with RK_ISA_TARGET_AVX2 /
// RK_ISA_TARGET_AVX512 function attributes (x86-64 with GCC or Clang: RK_X86_MULTIVERSION), and
// calls the variant that isa() picks for the machine it runs on. Elsewhere only the baseline
// variant exists and isa() is Isa::Base.
#pragma once

#if defined(__GNUC__) || defined(__clang__)
#define RK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define RK_ALWAYS_INLINE inline
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define RK_X86_MULTIVERSION 1
#define RK_ISA_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define RK_ISA_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,fma")))
#endif

namespace rk {

enum class Isa { Base, Avx2, Avx512 };

inline Isa detectIsa() {
#ifdef RK_X86_MULTIVERSION
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
#endif
  return Isa::Base;
}

// The instruction set the variants are picked for (detected once).
inline Isa isa() {
  static const Isa chosen = detectIsa();
  return chosen;
}

}  // namespace rk

// Defines `void NAME PARAMS` calling NAME##Avx512, NAME##Avx2 or NAME##Base with ARGS, whichever
// isa() picks (only NAME##Base where there is no multiversioning).
#ifdef RK_X86_MULTIVERSION
#define RK_DISPATCH(NAME, PARAMS, ARGS)          \
  void NAME PARAMS {                             \
    switch (::rk::isa()) {                       \
      case ::rk::Isa::Avx512: return NAME##Avx512 ARGS; \
      case ::rk::Isa::Avx2: return NAME##Avx2 ARGS;     \
      default: return NAME##Base ARGS;           \
    }                                            \
  }
#else
#define RK_DISPATCH(NAME, PARAMS, ARGS) \
  void NAME PARAMS { NAME##Base ARGS; }
#endif
