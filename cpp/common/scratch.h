// Working memory of the CPU kernels' calls, kept per thread from one call to the next.
//
// A kernel's scratch (a few hundred KB to a few MB per thread: adjoints, block states, staged rows)
// lives for one call. Taken from malloc every time, blocks of that size come as fresh pages, and the
// page faults (a 2 MB page zeroed on each, with transparent huge pages) cost several percent of a
// call. So each thread keeps the blocks it released, up to kScratchCacheBytes in all and none over
// kScratchMaxBlock (larger ones go straight back to the system), and hands them out again for
// requests of up to their size and at least half of it. Threads are the pool's persistent workers
// and the callers' own, so the cache lives as long as they do.
#pragma once
#include <cstddef>

namespace rk {

constexpr size_t kScratchMaxBlock = size_t(16) << 20;
constexpr size_t kScratchCacheBytes = size_t(48) << 20;

struct ScratchBlock {
  void* p = nullptr;
  size_t bytes = 0;  // the block's size, at least the size asked for
};

// A 64-byte aligned block of at least `bytes` bytes (contents unspecified); throws std::bad_alloc.
ScratchBlock scratchAcquire(size_t bytes);
// Gives a block back, on the thread that acquired it.
void scratchRelease(ScratchBlock b) noexcept;

}  // namespace rk
