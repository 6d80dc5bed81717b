// Which instruction-set variant of the CPU kernels runs.
//
// Every CPU kernel is compiled once per variant: its code (an op's <op>_cpu.inc; a large op's one
// per pass, <op>_cpu_fwd.inc and <op>_cpu_bwd.inc, over a shared <op>_cpu_common.inc) is included
// by one small translation unit per variant (<op>_cpu[_<pass>]_avx512.cc, _avx2.cc, _base.cc),
// which wraps it in isa_begin.h / isa_end.h. That puts it in the namespace rk::<variant> and
// compiles every function of it for that instruction set (a target pragma: code outside the region,
// the standard library's templates included, stays baseline, so no baseline caller can ever reach
// an AVX instruction). simd.h then gives it vectors of that variant's native width. The op's
// <op>_cpu.cc picks the variant per call with RK_ISA_DISPATCH.
//
// Variants: avx512 (x86-64 with AVX-512 F/VL/DQ), avx2 (x86-64 with AVX2 and FMA), base (SSE2 on
// x86-64, NEON on aarch64, plain C++ elsewhere). The choice is process-wide: the best one the
// machine supports, or RK_CPU_ISA, or setActiveIsa() (rk.cpu.setIsa) at run time.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define RK_X86_VARIANTS 1
#endif

#if defined(__GNUC__) || defined(__clang__)
#define RK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define RK_ALWAYS_INLINE inline
#endif

// A function whose products must each be rounded (not fused into multiply-adds, as the instruction
// sets with FMA otherwise allow): RK_NO_FP_CONTRACT before it, RK_NO_FP_CONTRACT_BODY first in it.
#if defined(__clang__)
#define RK_NO_FP_CONTRACT
#define RK_NO_FP_CONTRACT_BODY _Pragma("clang fp contract(off)")
#elif defined(__GNUC__)
#define RK_NO_FP_CONTRACT __attribute__((optimize("fp-contract=off")))
#define RK_NO_FP_CONTRACT_BODY
#else
#define RK_NO_FP_CONTRACT
#define RK_NO_FP_CONTRACT_BODY
#endif

namespace rk {

enum class Isa { Base = 0, Avx2 = 1, Avx512 = 2 };
constexpr int kIsaCount = 3;

const char* isaName(Isa isa);
// Parses "avx512" | "avx2" | "base"; false if the name is none of them.
bool parseIsa(const std::string& name, Isa* out);
bool isaSupported(Isa isa);
// The variants this machine can run, best first.
std::vector<Isa> supportedIsas();
// The variant the kernels run with now.
Isa activeIsa();
// Sets it (the caller has checked isaSupported).
void setActiveIsa(Isa isa);
// How many kernel calls each variant has run (to check that a requested variant is the one that ran).
uint64_t isaRuns(Isa isa);
// Picks the variant for one kernel call and counts it.
Isa isaForCall();

}  // namespace rk

// In an op's dispatching function: calls rk::FAMILY::<variant>::FN ARGS for the active variant.
#ifdef RK_X86_VARIANTS
#define RK_ISA_DISPATCH(FAMILY, FN, ARGS) \
  do {                                    \
    switch (::rk::isaForCall()) {         \
      case ::rk::Isa::Avx512:             \
        ::rk::FAMILY::avx512::FN ARGS;    \
        break;                            \
      case ::rk::Isa::Avx2:               \
        ::rk::FAMILY::avx2::FN ARGS;      \
        break;                            \
      default:                            \
        ::rk::FAMILY::base::FN ARGS;      \
        break;                            \
    }                                     \
  } while (0)
// Expands DECL(avx512) DECL(avx2) DECL(base): declares an op's per-variant entry points.
#define RK_FOR_EACH_ISA(DECL) DECL(avx512) DECL(avx2) DECL(base)
#else
#define RK_ISA_DISPATCH(FAMILY, FN, ARGS) \
  do {                                    \
    (void)::rk::isaForCall();             \
    ::rk::FAMILY::base::FN ARGS;          \
  } while (0)
#define RK_FOR_EACH_ISA(DECL) DECL(base)
#endif
