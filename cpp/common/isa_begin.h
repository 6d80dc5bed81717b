// Opens an instruction-set region (see isa.h): every function defined until isa_end.h is compiled
// for the variant RK_ISA_LEVEL names (2 avx512, 1 avx2, 0 base), and RK_ISA_NS / RK_ISA_WIDTH say
// which namespace and how many floats a hardware vector holds. Include every standard or project
// header the region needs before this one: only what is defined inside gets the variant's target.
// No include guard: each variant translation unit opens exactly one region.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "common/isa.h"
#include "common/scratch.h"

#if !defined(RK_ISA_LEVEL)
#error "an instruction-set region needs RK_ISA_LEVEL (2 avx512, 1 avx2, 0 base)"
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if RK_ISA_LEVEL == 2 && defined(RK_X86_VARIANTS)
#define RK_ISA_NS avx512
#define RK_ISA_WIDTH 16
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx2,fma")
#endif
#elif RK_ISA_LEVEL == 1 && defined(RK_X86_VARIANTS)
#define RK_ISA_NS avx2
#define RK_ISA_WIDTH 8
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#elif RK_ISA_LEVEL == 0
// SSE2 on x86-64, NEON on aarch64: 128-bit vectors either way.
#define RK_ISA_NS base
#define RK_ISA_WIDTH 4
#else
#error \
    "this instruction-set variant does not exist on this target (wrap its translation unit in #ifdef RK_X86_VARIANTS)"
#endif
