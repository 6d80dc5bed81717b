// Positions of a packed batch that no sequence covers. Kernels that write an output only inside the
// sequences take it from the output pool (not zeroed) and write zeros at these positions after.
//
// Included inside an instruction-set region (isa_begin.h), once per variant translation unit; it
// defines everything in rk::RK_ISA_NS.
#if !defined(RK_ISA_NS)
#error "uncovered.h belongs inside an instruction-set region (common/isa_begin.h)"
#endif

namespace rk {
namespace RK_ISA_NS {

// Calls at(t) for every position t of a packed row (batch 1) that no sequence covers; nothing when
// the batch is not packed. Args: an op's contract (T, nseq, segments, packed).
template <class Args, class At> void forUncovered(const Args& a, At at) {
  if (!a.packed) return;
  std::vector<char> covered(static_cast<size_t>(a.T), 0);
  for (int64_t s = 0; s < a.nseq; ++s)
    std::fill_n(covered.begin() + a.segments[s].start, a.segments[s].length, char(1));
  for (int64_t t = 0; t < a.T; ++t)
    if (!covered[size_t(t)]) at(t);
}

// Zeros at those positions in an output of perPosition elements per position ([1, T, perPosition];
// out nullable).
template <class Args, typename S> void zeroUncovered(const Args& a, S* out, int64_t perPosition) {
  if (!out) return;
  forUncovered(a, [&](int64_t t) { std::fill_n(out + t * perPosition, perPosition, Storage<S>::store(0.0f)); });
}

}  // namespace RK_ISA_NS
}  // namespace rk
