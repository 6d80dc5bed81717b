#include "common/scratch.h"

#include <cstdlib>
#include <new>
#include <vector>

namespace rk {
namespace {

struct Cache {
  std::vector<ScratchBlock> blocks;
  size_t bytes = 0;
  ~Cache() {
    for (const ScratchBlock& b : blocks) std::free(b.p);
  }
};
thread_local Cache cache;

}  // namespace

ScratchBlock scratchAcquire(size_t bytes) {
  bytes = (bytes + 63) / 64 * 64;
  if (bytes == 0) bytes = 64;
  // The smallest cached block that fits and is not more than twice the size asked for.
  size_t best = cache.blocks.size();
  for (size_t i = 0; i < cache.blocks.size(); ++i) {
    const size_t have = cache.blocks[i].bytes;
    if (have >= bytes && have / 2 <= bytes && (best == cache.blocks.size() || have < cache.blocks[best].bytes))
      best = i;
  }
  if (best < cache.blocks.size()) {
    const ScratchBlock b = cache.blocks[best];
    cache.blocks[best] = cache.blocks.back();
    cache.blocks.pop_back();
    cache.bytes -= b.bytes;
    return b;
  }
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  return {p, bytes};
}

void scratchRelease(ScratchBlock b) noexcept {
  if (!b.p) return;
  if (b.bytes <= kScratchMaxBlock) {
    // Room is made by dropping the oldest blocks: what a thread's recent calls used stays.
    while (!cache.blocks.empty() && cache.bytes + b.bytes > kScratchCacheBytes) {
      std::free(cache.blocks.front().p);
      cache.bytes -= cache.blocks.front().bytes;
      cache.blocks.erase(cache.blocks.begin());
    }
    try {
      cache.blocks.push_back(b);
      cache.bytes += b.bytes;
      return;
    } catch (...) {
    }
  }
  std::free(b.p);
}

}  // namespace rk
