// Closes the region isa_begin.h opened.
#if RK_ISA_LEVEL > 0
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#undef RK_ISA_NS
#undef RK_ISA_WIDTH
