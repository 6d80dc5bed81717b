// The emulator's hazard checks, the CPU's counterpart of compute-sanitizer. Built in when a driver
// is compiled with -fsanitize=thread,alignment (and --param tsan-instrument-func-entry-exit=0) and
// linked without those runtimes, with -no-pie -g1: the compiler then calls the __tsan_read/write
// hooks below on every memory access of the program (and the alignment hook on a misaligned typed
// access), and they check the accesses that kernels make to shared memory and to device arrays.
// Without -fsanitize=thread every hook here is an empty inline.
//
//   * racecheck: two accesses to the same bytes from different threads of a block, at least one a
//     write and not both atomics, with no __syncthreads between them, nor (same warp) a __syncwarp
//     or, unless RK_EMU_STRICT_WARP=1 (as the tests run the checks), a warp shuffle. The fiber
//     scheduler's order plays no part: each access is stamped with the collectives its thread had
//     passed (emu::Fiber::barriers, warpSyncs). Accesses to a device array from different blocks
//     conflict unless a release (__threadfence, then an atomicAdd on a counter) by one block was
//     acquired (rkcuda::loadAcquireGpu) by the other after it: the cooperative kernels' group
//     barrier (cuda/common/group_sync.cuh). Blocks are the unit of that model: a block's release
//     covers all of its earlier accesses, and an acquire by one thread the whole block's later ones
//     (the barrier protocol adds the __syncthreads that make it so).
//   * initcheck: reads of shared memory not written earlier in the block (static __shared__
//     arrays are poisoned per block on first use; dynamic shared memory per block), of
//     cudaMallocAsync memory nothing wrote, and of a cp.async destination before the copy's wait.
//   * memcheck: accesses in the guard zones of device arrays (cudaMallocAsync allocations, the
//     drivers' Buf sentinels) and of dynamic shared memory, or past the end of a static __shared__
//     array (one that straddles its end: an index that lands wholly inside a neighbouring array is
//     not seen), and accesses to device or shared memory not aligned to their size.
//   * synccheck lives in emu.h: barriers and warp collectives that not every thread reaches
//     (deadlock), partial masks, threads that exit with cp.async copies never waited for.
// Each distinct hazard (kind and source locations) is printed once at exit, with both accesses'
// file:line, threads and address, and the program then exits with status 3.
#pragma once

#include <algorithm>
#include <memory>
#include <set>
#include <tuple>

#if defined(__SANITIZE_THREAD__)
#define RK_EMU_CHECKS 1
#define RK_EMU_UNCHECKED __attribute__((no_sanitize_thread))
// Not inlined either: __builtin_return_address(0) in it is the kernel's code address.
#define RK_EMU_CALLSITE __attribute__((no_sanitize_thread, noinline))
#else
#define RK_EMU_UNCHECKED
#define RK_EMU_CALLSITE
#endif

namespace emu::checks {

#if !defined(RK_EMU_CHECKS)

inline void blocksStart(unsigned, unsigned) {}
inline void blocksEnd() {}
inline void launchStart(bool, unsigned, unsigned) {}
inline void launchEnd() {}
inline void atomic(const void*, size_t, bool, const void*) {}
inline void fence() {}
inline void acquire(const void*, const void*) {}
inline void copyIssued(const void*, const void*, int, const void*) {}
inline void copyLanded(const void*, const void*) {}
inline void hostWrote(const void*, size_t) {}
inline void deviceArray(const void*, size_t, size_t, bool) {}
inline void deviceArrayGone(const void*) {}
inline void* deviceAllocate(size_t bytes) { return std::malloc(bytes > 0 ? bytes : 1); }
inline void deviceFree(void* p, size_t) { std::free(p); }

#else

constexpr uint32_t kAtomicBit = 0x80000000u;  // in Stamp::pc (code addresses fit 31 bits with -no-pie)

// Who accessed, and where that thread stood. All zero: nobody.
struct Stamp {
  uint32_t thread = 0;  // 1 + blockIdx.x * blockDim.x + threadIdx.x
  uint32_t barriers = 0, warpSyncs = 0;
  uint32_t releases = 0;  // of the thread's block, before this access
  uint32_t pc = 0;        // the access's code address, | kAtomicBit for atomics
};

enum : uint8_t { kUninitialised = 0, kWritten = 1, kPending = 2 };

// The shadow of one 2-byte granule (kernels access nothing narrower than 2 bytes). All zero: never
// accessed.
struct Cell {
  Stamp write, read, read2;  // the last write, and two reads from different threads since then
  uint8_t state = kUninitialised;
};
constexpr uintptr_t kGranule = 2;

// A value per 64 KiB page of the address space, in leaves of 4 GiB allocated on first use.
template <class V> struct PageTable {
  static constexpr int kPageBits = 16;
  V* leaves[size_t{1} << 15] = {};  // by address bits 47..32
  RK_EMU_UNCHECKED V get(uintptr_t a) const {
    const V* leaf = leaves[(a >> 32) & 0x7fff];
    return leaf != nullptr ? leaf[(a >> kPageBits) & 0xffff] : V{};
  }
  RK_EMU_UNCHECKED V& at(uintptr_t a) {
    V*& leaf = leaves[(a >> 32) & 0x7fff];
    if (leaf == nullptr) leaf = static_cast<V*>(std::calloc(size_t{1} << 16, sizeof(V)));
    return leaf[(a >> kPageBits) & 0xffff];
  }
};
constexpr uintptr_t kPageBytes = uintptr_t{1} << 16;

// The cells of the pages touched so far (zeroed memory from calloc: all cells empty).
struct Shadow {
  PageTable<Cell*> table;
  std::vector<uintptr_t> touched;
  RK_EMU_UNCHECKED Cell& at(uintptr_t address) {
    Cell*& page = table.at(address);
    if (page == nullptr) {
      page = static_cast<Cell*>(std::calloc(kPageBytes / kGranule, sizeof(Cell)));
      touched.push_back(address);
    }
    return page[(address % kPageBytes) / kGranule];
  }
  void clear() {
    for (uintptr_t a : touched) {
      Cell*& page = table.at(a);
      std::free(page);
      page = nullptr;
    }
    touched.clear();
  }
};

struct DeviceArray {
  uintptr_t begin, end;  // valid bytes
  size_t guard;          // bytes on each side
  bool initialised;      // written by the host (the drivers' Buf); else per-byte state below
  std::vector<uint8_t> written;
};

struct StaticShared {
  uintptr_t begin, end;
  uint64_t poisonedFor = 0;  // the block run in which it was last poisoned
};

enum Kind { kRace, kUninitialisedRead, kPendingRead, kOutOfBounds, kMisaligned, kUnsynchronisedBlocks, kKinds };
inline const char* kindName(int k) {
  static const char* names[] = {"racecheck: data race",
                                "initcheck: read of uninitialised memory",
                                "initcheck: read of a cp.async destination before its wait",
                                "memcheck: out-of-bounds access",
                                "memcheck: misaligned access",
                                "racecheck: blocks access the same bytes without a release and acquire"};
  return names[k];
}

struct Hazard {
  int kind;
  uint32_t pc, otherPc;
  uint32_t thread, otherThread;
  uintptr_t address;
  size_t size;
  bool write, otherWrite;
  const void* kernel;
  unsigned blockThreads;
  long count = 0;
};

struct State {
  // Which pages hold device memory (the arena below) or static shared memory: the hooks' fast test,
  // two loads for an address that needs no check.
  PageTable<uint8_t> pages;
  PageTable<DeviceArray*> arrayOfPage;
  bool active = false;  // a launch's threads are running
  bool busy = false;    // in a check: the library code it calls is instrumented too
  bool cooperative = false;
  unsigned blockThreads = 0, gridBlocks = 0;
  uint64_t blockRun = 0;  // increases at every runBlocks
  uintptr_t sharedLo = 0, sharedHi = 0, sharedStride = 0, sharedBytes = 0;
  unsigned firstBlock = 0;
  Shadow shared, global;
  std::map<uintptr_t, std::unique_ptr<DeviceArray> > arrays;  // by guard start
  std::vector<StaticShared> statics;                          // sorted
  uintptr_t staticsLo = 0, staticsHi = 0;
  std::vector<uint32_t> staticOfGranule;  // 1 + the index in statics of the array holding each granule
  // Inter-block ordering, per block of the launch: releases made, and the releases of every block
  // that it acquired (acquired[b * gridBlocks + a]).
  std::vector<uint32_t> releases, acquired;
  std::map<uintptr_t, std::vector<uint32_t> > syncObjects;  // per released address: what it publishes
  std::vector<uint8_t> fenced;                              // per thread of the launch, since its last atomic
  std::map<std::tuple<int, uint32_t, uint32_t>, Hazard> hazards;
  long hazardCount[kKinds] = {};
};
// A plain global (no function static: the hooks run before and during its construction, when
// `active`, zero-initialised, is still false).
inline State theState;
RK_EMU_UNCHECKED inline State& state() { return theState; }

// ---- reporting ----

inline std::string where(uint32_t pc) {
  if (pc == 0) return "?";
  char command[256];
  std::snprintf(command, sizeof command, "addr2line -C -f -i -e /proc/%d/exe 0x%x 2>/dev/null", getpid(),
                (pc & ~kAtomicBit) - 1);
  std::string out;
  if (FILE* f = popen(command, "r")) {
    char line[1024];
    std::vector<std::string> lines;
    while (std::fgets(line, sizeof line, f) != nullptr) {
      std::string l = line;
      while (!l.empty() && l.back() == '\n') l.pop_back();
      lines.push_back(l);
    }
    pclose(f);
    // function / file:line pairs, innermost first: "file:line (function) <- ..."
    for (size_t i = 0; i + 1 < lines.size(); i += 2) {
      std::string fn = lines[i];
      if (fn.size() > 90) fn = fn.substr(0, 87) + "...";
      std::string file = lines[i + 1];
      const size_t slash = file.find("/cuda/");
      if (slash != std::string::npos) file = file.substr(slash + 1);
      const size_t tests = file.find("/tests/");
      if (tests != std::string::npos) file = file.substr(tests + 1);
      out += (i > 0 ? "  <- " : "") + file + " (" + fn + ")";
    }
  }
  return out.empty() ? "?" : out;
}

inline std::string describeThread(uint32_t thread1, unsigned blockThreads) {
  if (thread1 == 0 || blockThreads == 0) return "(none)";
  const uint32_t thread = thread1 - 1;
  return "block " + std::to_string(thread / blockThreads) + " thread " + std::to_string(thread % blockThreads);
}

inline void report() {
  State& s = state();
  long total = 0;
  for (long c : s.hazardCount) total += c;
  std::string counts;
  for (int k = 0; k < kKinds; ++k) {
    if (s.hazardCount[k] > 0)
      counts += std::string(counts.empty() ? "" : ", ") + std::to_string(s.hazardCount[k]) + " " + kindName(k);
  }
  int shown = 0;
  for (const auto& [key, h] : s.hazards) {
    if (++shown > 12) break;
    std::fprintf(stderr, "HAZARD %s (%ld times), kernel %s\n  %s %zu bytes at %#lx by %s: %s\n", kindName(h.kind),
                 h.count, where(static_cast<uint32_t>(reinterpret_cast<uintptr_t>(h.kernel)) + 1).c_str(),
                 h.write ? "write of" : "read of", h.size, static_cast<unsigned long>(h.address),
                 describeThread(h.thread, h.blockThreads).c_str(), where(h.pc).c_str());
    if (h.otherThread != 0) {
      std::fprintf(stderr, "  conflicting %s by %s: %s\n", h.otherWrite ? "write" : "read",
                   describeThread(h.otherThread, h.blockThreads).c_str(), where(h.otherPc).c_str());
    }
  }
  std::printf("cuda emulator checks (racecheck, initcheck, memcheck, synccheck): %ld hazards%s%s\n", total,
              counts.empty() ? "" : ": ", counts.c_str());
  std::fflush(stdout);
  if (total > 0) _exit(3);
}

RK_EMU_UNCHECKED inline void hazard(int kind, uintptr_t address, size_t size, bool write, uint32_t pc,
                                    const Stamp* other, bool otherWrite) {
  State& s = state();
  ++s.hazardCount[kind];
  const uint32_t otherPc = other != nullptr ? other->pc & ~kAtomicBit : 0;
  Hazard& h = s.hazards[{kind, pc & ~kAtomicBit, otherPc}];
  if (h.count++ == 0) {
    h = Hazard{kind,
               pc & ~kAtomicBit,
               otherPc,
               1 + block.current->tid.x + block.current->blockIndex.x * s.blockThreads,
               other != nullptr ? other->thread : 0,
               address,
               size,
               write,
               otherWrite,
               block.kernel,
               s.blockThreads,
               1};
  }
}

// ---- the ordering model ----

RK_EMU_UNCHECKED inline Stamp stampNow(uint32_t pc) {
  const State& s = state();
  const Fiber& f = *block.current;
  const uint32_t b = f.blockIndex.x;
  return Stamp{1 + b * s.blockThreads + f.tid.x, f.barriers, f.warpSyncs, s.releases.empty() ? 0u : s.releases[b], pc};
}

// Is `before` (an earlier access) ordered before the current thread's access `now`?
RK_EMU_UNCHECKED inline bool ordered(const Stamp& before, const Stamp& now) {
  if (before.thread == 0 || before.thread == now.thread) return true;
  const State& s = state();
  const uint32_t a = (before.thread - 1) / s.blockThreads, b = (now.thread - 1) / s.blockThreads;
  if (a == b) {
    return now.barriers > before.barriers ||
           ((before.thread - 1) / 32 == (now.thread - 1) / 32 && now.warpSyncs > before.warpSyncs);
  }
  return !s.acquired.empty() && s.acquired[static_cast<size_t>(b) * s.gridBlocks + a] > before.releases;
}

RK_EMU_UNCHECKED inline void onCell(Cell& c, uintptr_t address, size_t size, bool write, bool atomic, const Stamp& now,
                                    bool checkInit) {
  auto conflict = [&](const Stamp& other, bool otherWrite) {
    if (ordered(other, now) || (atomic && (other.pc & kAtomicBit) != 0)) return false;
    const State& s = state();
    const bool sameBlock = (other.thread - 1) / s.blockThreads == (now.thread - 1) / s.blockThreads;
    hazard(sameBlock ? kRace : kUnsynchronisedBlocks, address, size, write, now.pc, &other, otherWrite);
    return true;
  };
  // The same thread again in the same interval, with nothing in between: the checks would repeat.
  auto same = [&](const Stamp& o) {
    return o.thread == now.thread && o.barriers == now.barriers && o.warpSyncs == now.warpSyncs &&
           o.releases == now.releases && ((o.pc ^ now.pc) & kAtomicBit) == 0;
  };
  if (c.state == kWritten && (write ? same(c.write) && c.read.thread == 0 : same(c.read))) return;
  if (c.state == kPending) {
    hazard(kPendingRead, address, size, write, now.pc, nullptr, false);
  } else if ((!write || atomic) && checkInit && c.state == kUninitialised) {
    hazard(kUninitialisedRead, address, size, write, now.pc, nullptr, false);
  }
  if (write) {
    if (!conflict(c.write, true) && !conflict(c.read, false)) conflict(c.read2, false);
    c.write = now;
    c.read = c.read2 = Stamp{};
    c.state = kWritten;
  } else {
    conflict(c.write, true);
    if (c.read.thread == 0 || c.read.thread == now.thread || ordered(c.read, now)) {
      c.read = now;
    } else {
      c.read2 = c.read;
      c.read = now;
    }
  }
}

// ---- classification of addresses ----

RK_EMU_UNCHECKED inline StaticShared* staticAt(uintptr_t a) {
  State& s = state();
  if (a < s.staticsLo || a >= s.staticsHi) return nullptr;
  const uint32_t i = s.staticOfGranule[(a - s.staticsLo) / kGranule];
  return i != 0 ? &s.statics[i - 1] : nullptr;
}

RK_EMU_UNCHECKED inline DeviceArray* arrayAt(uintptr_t a) {
  DeviceArray* d = state().arrayOfPage.get(a);
  return d != nullptr && a >= d->begin - d->guard && a < d->end + d->guard ? d : nullptr;
}

enum class Access { Read, AtomicRead, Write, AtomicWrite, PendingWrite, Landed };

// Marks the checks busy while it lives: accesses made by the checks themselves are not checked.
struct Busy {
  RK_EMU_UNCHECKED Busy() { state().busy = true; }
  RK_EMU_UNCHECKED ~Busy() { state().busy = false; }
};
RK_EMU_UNCHECKED inline bool idle() { return !state().active || state().busy || block.current == nullptr; }
// Worth a look: an access of a kernel thread that may touch shared memory or a device array.
RK_EMU_UNCHECKED inline bool watched(const void* p) {
  return theState.active && theState.pages.get(reinterpret_cast<uintptr_t>(p)) != 0;
}

// Every access of a kernel thread to memory: shared memory and device arrays are checked, the rest
// (the thread's stack, the emulator's own state) passes. The caller holds a Busy.
RK_EMU_UNCHECKED inline void record(const void* p, size_t size, Access how, const void* codeAddress, bool aligned) {
  State& s = state();
  if (size == 0) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const bool write = how != Access::Read && how != Access::AtomicRead;
  const bool atomic = how == Access::AtomicWrite || how == Access::AtomicRead;
  const uint32_t pc = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(codeAddress)) | (atomic ? kAtomicBit : 0);
  Shadow* shadow = nullptr;
  bool checkInit = true;
  DeviceArray* array = nullptr;
  if (a >= s.sharedLo && a < s.sharedHi) {
    const uintptr_t own = s.sharedLo + (block.current->blockIndex.x - s.firstBlock) * s.sharedStride;
    if (a < own || a + size > own + s.sharedBytes) {
      hazard(kOutOfBounds, a, size, write, pc, nullptr, false);
      return;
    }
    shadow = &s.shared;
  } else if (StaticShared* st = staticAt(a)) {
    if (s.cooperative) fail("a cooperative launch uses static __shared__ memory (the emulator gives it one copy)");
    if (a + size > st->end) {
      hazard(kOutOfBounds, a, size, write, pc, nullptr, false);
      return;
    }
    if (st->poisonedFor != s.blockRun) {
      std::memset(reinterpret_cast<void*>(st->begin), 0xff, st->end - st->begin);
      st->poisonedFor = s.blockRun;
    }
    shadow = &s.shared;
  } else if ((array = arrayAt(a)) != nullptr) {
    if (a < array->begin || a + size > array->end) {
      hazard(kOutOfBounds, a, size, write, pc, nullptr, false);
      return;
    }
    shadow = &s.global;
    checkInit = false;
    if (!array->initialised) {
      bool reported = false;
      for (uintptr_t b = a; b < a + size; ++b) {
        uint8_t& w = array->written[b - array->begin];
        if (w == 0 && (!write || atomic) && !reported) {
          hazard(kUninitialisedRead, a, size, write, pc, nullptr, false);
          reported = true;
        }
        if (write) w = 1;
      }
    }
  } else {
    return;
  }
  if (aligned && a % size != 0) hazard(kMisaligned, a, size, write, pc, nullptr, false);
  if (how == Access::PendingWrite) {
    for (uintptr_t g = a / kGranule * kGranule; g < a + size; g += kGranule) shadow->at(g).state = kPending;
    return;
  }
  if (how == Access::Landed) {
    for (uintptr_t g = a / kGranule * kGranule; g < a + size; g += kGranule) shadow->at(g).state = kWritten;
  }
  const Stamp now = stampNow(pc);
  for (uintptr_t g = a / kGranule * kGranule; g < a + size; g += kGranule) {
    onCell(shadow->at(g), a, size, write, atomic, now, checkInit);
  }
}

RK_EMU_UNCHECKED inline void access(const void* p, size_t size, Access how, const void* codeAddress, bool aligned) {
  if (idle()) return;
  // The thread's own stack (its registers and local arrays): nothing to check.
  if (static_cast<size_t>(static_cast<const char*>(p) - block.current->stack) < kStackBytes) return;
  Busy busy;
  record(p, size, how, codeAddress, aligned);
}

// ---- static __shared__ arrays, from the program's symbol table ----

// Function statics in .bss without a guard variable, but the emulator's own: zero-initialised and
// never constructed at run time, which is what __shared__ variables become here (a host static of
// the launchers has an initialiser, so a guard or a place in .data). Only kernel threads' accesses
// are checked, so a host static that is not shared memory is never poisoned.
inline void findStaticShared() {
  State& s = state();
  std::set<std::string> guarded;
  for (const Symbol& sym : programSymbols()) {
    if (sym.name.rfind("_ZGVZ", 0) == 0) guarded.insert(sym.name.substr(4));
  }
  for (const Symbol& sym : programSymbols()) {
    if (sym.name.rfind("_ZZ", 0) == 0 && sym.name.rfind("_ZZN3emu", 0) != 0 && sym.object && sym.bss && sym.size > 0 &&
        guarded.count(sym.name.substr(2)) == 0) {
      s.statics.push_back(StaticShared{sym.address, sym.address + sym.size});
    }
  }
  std::sort(s.statics.begin(), s.statics.end(),
            [](const StaticShared& x, const StaticShared& y) { return x.begin < y.begin; });
  if (!s.statics.empty()) {
    s.staticsLo = s.statics.front().begin;
    s.staticsHi = s.statics.back().end;
    for (uintptr_t a = s.staticsLo / kPageBytes * kPageBytes; a < s.staticsHi; a += kPageBytes) s.pages.at(a) = 1;
    s.staticOfGranule.assign((s.staticsHi - s.staticsLo + kGranule - 1) / kGranule, 0);
    for (size_t i = 0; i < s.statics.size(); ++i) {
      for (uintptr_t a = s.statics[i].begin; a < s.statics[i].end; a += kGranule) {
        s.staticOfGranule[(a - s.staticsLo) / kGranule] = static_cast<uint32_t>(i + 1);
      }
    }
  }
}

inline void init() {
  static bool done = false;
  if (done) return;
  done = true;
  findStaticShared();
  std::atexit(report);
}

// ---- device memory ----

// Device arrays (cudaMallocAsync, the drivers' Buf) and dynamic shared memory live in one reserved
// region of their own, so that the hooks' page test rejects every host access (the emulator's own
// bookkeeping included) at once. Blocks are 64 KiB-aligned; freed ones return their pages to the
// system and become inaccessible, and their addresses are not reused.
constexpr size_t kArenaBytes = size_t{1} << 40, kArenaAlign = size_t{1} << 16;
struct Arena {
  char* base = nullptr;
  size_t used = 0;
};
inline Arena arena;
inline void* deviceAllocate(size_t bytes) {
  if (arena.base == nullptr) {
    // Address space only: each allocation is made accessible when handed out.
    void* p = mmap(nullptr, kArenaBytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) fail("checks: cannot reserve the device memory region");
    arena.base = static_cast<char*>(p);
  }
  const size_t rounded = (std::max<size_t>(bytes, 1) + kArenaAlign - 1) / kArenaAlign * kArenaAlign;
  if (arena.used + rounded > kArenaBytes) fail("checks: the device memory region is exhausted");
  char* p = arena.base + arena.used;
  arena.used += rounded;
  if (mprotect(p, rounded, PROT_READ | PROT_WRITE) != 0) fail("checks: out of memory for device arrays");
  for (size_t i = 0; i < rounded; i += kPageBytes) state().pages.at(reinterpret_cast<uintptr_t>(p) + i) = 1;
  return p;
}
inline void deviceFree(void* p, size_t bytes) {
  const size_t rounded = (std::max<size_t>(bytes, 1) + kArenaAlign - 1) / kArenaAlign * kArenaAlign;
  madvise(p, rounded, MADV_DONTNEED);
  mprotect(p, rounded, PROT_NONE);  // a use after free faults
}

// ---- the emulator's calls ----

inline void launchStart(bool cooperative, unsigned gridBlocks, unsigned blockThreads) {
  init();
  State& s = state();
  s.cooperative = cooperative;
  s.gridBlocks = gridBlocks;
  s.blockThreads = blockThreads;
  s.releases.assign(cooperative ? gridBlocks : 0, 0);
  s.acquired.assign(cooperative ? static_cast<size_t>(gridBlocks) * gridBlocks : 0, 0);
  s.fenced.assign(cooperative ? static_cast<size_t>(gridBlocks) * blockThreads : 0, 0);
  s.syncObjects.clear();
  s.global.clear();
}
inline void launchEnd() {
  State& s = state();
  s.global.clear();
  s.syncObjects.clear();
}
inline void blocksStart(unsigned first, unsigned count) {
  State& s = state();
  ++s.blockRun;
  s.firstBlock = first;
  s.shared.clear();
  s.sharedStride = (block.dynamicSharedBytes + 15) / 16 * 16 + kSharedGuard * 16;
  s.sharedBytes = block.dynamicSharedBytes;
  s.sharedLo = reinterpret_cast<uintptr_t>(block.dynamicShared);
  s.sharedHi = s.sharedLo + static_cast<uintptr_t>(count) * s.sharedStride;
  s.active = true;
}
RK_EMU_UNCHECKED inline void blocksEnd() { state().active = false; }

RK_EMU_UNCHECKED inline void atomic(const void* p, size_t size, bool counter, const void* pc) {
  State& s = state();
  if (idle()) return;
  Busy busy;
  record(p, size, Access::AtomicWrite, pc, true);  // a read-modify-write
  if (!counter || !s.cooperative) return;
  const Fiber& f = *block.current;
  const size_t t = static_cast<size_t>(f.blockIndex.x) * s.blockThreads + f.tid.x;
  if (!s.fenced[t]) return;  // relaxed: publishes nothing
  s.fenced[t] = 0;
  // A release: everything the block did so far, and everything it had acquired.
  const unsigned b = f.blockIndex.x;
  std::vector<uint32_t>& obj = s.syncObjects[reinterpret_cast<uintptr_t>(p)];
  obj.resize(s.gridBlocks, 0);
  for (unsigned a = 0; a < s.gridBlocks; ++a)
    obj[a] = std::max(obj[a], s.acquired[static_cast<size_t>(b) * s.gridBlocks + a]);
  obj[b] = std::max(obj[b], s.releases[b] + 1);
  ++s.releases[b];
}

RK_EMU_UNCHECKED inline void fence() {
  State& s = state();
  if (idle() || !s.cooperative) return;
  const Fiber& f = *block.current;
  s.fenced[static_cast<size_t>(f.blockIndex.x) * s.blockThreads + f.tid.x] = 1;
}

RK_EMU_UNCHECKED inline void acquire(const void* p, const void* pc) {
  State& s = state();
  if (idle()) return;
  Busy busy;
  record(p, 4, Access::AtomicRead, pc, true);
  if (!s.cooperative) return;
  const auto it = s.syncObjects.find(reinterpret_cast<uintptr_t>(p));
  if (it == s.syncObjects.end()) return;
  const unsigned b = block.current->blockIndex.x;
  for (unsigned a = 0; a < s.gridBlocks; ++a) {
    uint32_t& mine = s.acquired[static_cast<size_t>(b) * s.gridBlocks + a];
    mine = std::max(mine, it->second[a]);
  }
}

RK_EMU_UNCHECKED inline void copyIssued(const void* dst, const void* src, int bytes, const void* pc) {
  if (idle()) return;
  Busy busy;
  if (bytes > 0) record(src, static_cast<size_t>(bytes), Access::Read, pc, false);
  record(dst, 16, Access::PendingWrite, pc, true);
}
RK_EMU_UNCHECKED inline void copyLanded(const void* dst, const void* pc) {
  if (idle()) return;
  Busy busy;
  record(dst, 16, Access::Landed, pc, true);
}

inline void deviceArray(const void* p, size_t bytes, size_t guard, bool initialised) {
  init();
  State& s = state();
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto d = std::make_unique<DeviceArray>(DeviceArray{a, a + bytes, guard, initialised, {}});
  if (!initialised) d->written.assign(bytes, 0);
  for (uintptr_t q = (a - guard) / kPageBytes * kPageBytes; q < a + bytes + guard; q += kPageBytes) {
    s.arrayOfPage.at(q) = d.get();
  }
  s.arrays[a - guard] = std::move(d);
}
inline void deviceArrayGone(const void* p) {
  State& s = state();
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  DeviceArray* d = arrayAt(a);
  if (d == nullptr || d->begin != a) return;
  for (uintptr_t q = (a - d->guard) / kPageBytes * kPageBytes; q < d->end + d->guard; q += kPageBytes) {
    s.arrayOfPage.at(q) = nullptr;
  }
  s.arrays.erase(a - d->guard);
}
inline void hostWrote(const void* p, size_t bytes) {
  DeviceArray* d = arrayAt(reinterpret_cast<uintptr_t>(p));
  if (d == nullptr || d->initialised) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (size_t i = 0; i < bytes && a + i < d->end; ++i) {
    if (a + i >= d->begin) d->written[a + i - d->begin] = 1;
  }
}

#endif  // RK_EMU_CHECKS

}  // namespace emu::checks

#if defined(RK_EMU_CHECKS)
// The hooks the compiler calls for -fsanitize=thread (no runtime library is linked).
extern "C" {
#define RK_EMU_HOOK extern "C" __attribute__((no_sanitize_thread, used))
#define RK_EMU_ACCESS(size)                                                                         \
  RK_EMU_HOOK void __tsan_read##size(void* p) {                                                     \
    if (emu::checks::watched(p))                                                                    \
      emu::checks::access(p, size, emu::checks::Access::Read, __builtin_return_address(0), true);   \
  }                                                                                                 \
  RK_EMU_HOOK void __tsan_write##size(void* p) {                                                    \
    if (emu::checks::watched(p))                                                                    \
      emu::checks::access(p, size, emu::checks::Access::Write, __builtin_return_address(0), true);  \
  }                                                                                                 \
  RK_EMU_HOOK void __tsan_unaligned_read##size(void* p) {                                           \
    if (emu::checks::watched(p))                                                                    \
      emu::checks::access(p, size, emu::checks::Access::Read, __builtin_return_address(0), false);  \
  }                                                                                                 \
  RK_EMU_HOOK void __tsan_unaligned_write##size(void* p) {                                          \
    if (emu::checks::watched(p))                                                                    \
      emu::checks::access(p, size, emu::checks::Access::Write, __builtin_return_address(0), false); \
  }
RK_EMU_ACCESS(1)
RK_EMU_ACCESS(2)
RK_EMU_ACCESS(4)
RK_EMU_ACCESS(8)
RK_EMU_ACCESS(16)
RK_EMU_HOOK void __tsan_read_range(void* p, unsigned long size) {
  if (emu::checks::watched(p) || emu::checks::watched(static_cast<char*>(p) + size - 1))
    emu::checks::access(p, size, emu::checks::Access::Read, __builtin_return_address(0), false);
}
RK_EMU_HOOK void __tsan_write_range(void* p, unsigned long size) {
  if (emu::checks::watched(p) || emu::checks::watched(static_cast<char*>(p) + size - 1))
    emu::checks::access(p, size, emu::checks::Access::Write, __builtin_return_address(0), false);
}
// -fsanitize=alignment: a typed access (a float4 load, say) through a pointer not aligned to its
// type, which the compiler may have split into narrower accesses the hooks above see as aligned.
struct UbsanTypeMismatch {
  const char* file;
  uint32_t line, column;
  const void* type;
  unsigned char logAlignment, checkKind;
};
RK_EMU_HOOK void __ubsan_handle_type_mismatch_v1(UbsanTypeMismatch* d, uintptr_t p) {
  const uintptr_t alignment = uintptr_t{1} << d->logAlignment;
  if (p == 0 || p % alignment == 0 || !emu::checks::watched(reinterpret_cast<void*>(p)) || emu::checks::idle()) return;
  emu::checks::Busy busy;
  emu::checks::hazard(emu::checks::kMisaligned, p, alignment, false,
                      static_cast<uint32_t>(reinterpret_cast<uintptr_t>(__builtin_return_address(0))), nullptr, false);
}
RK_EMU_HOOK void __tsan_init() {}
RK_EMU_HOOK void __tsan_func_entry(void*) {}
RK_EMU_HOOK void __tsan_func_exit() {}
RK_EMU_HOOK void __tsan_vptr_update(void**, void*) {}
RK_EMU_HOOK void __tsan_vptr_read(void**) {}
// Atomics of host code (the library's reference counts and the like); kernels use atomicAdd.
RK_EMU_HOOK uint8_t __tsan_atomic8_load(const volatile uint8_t* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); }
RK_EMU_HOOK uint32_t __tsan_atomic32_load(const volatile uint32_t* a, int) {
  return __atomic_load_n(a, __ATOMIC_SEQ_CST);
}
RK_EMU_HOOK uint64_t __tsan_atomic64_load(const volatile uint64_t* a, int) {
  return __atomic_load_n(a, __ATOMIC_SEQ_CST);
}
RK_EMU_HOOK void __tsan_atomic8_store(volatile uint8_t* a, uint8_t v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); }
RK_EMU_HOOK void __tsan_atomic32_store(volatile uint32_t* a, uint32_t v, int) {
  __atomic_store_n(a, v, __ATOMIC_SEQ_CST);
}
RK_EMU_HOOK void __tsan_atomic64_store(volatile uint64_t* a, uint64_t v, int) {
  __atomic_store_n(a, v, __ATOMIC_SEQ_CST);
}
RK_EMU_HOOK uint32_t __tsan_atomic32_fetch_add(volatile uint32_t* a, uint32_t v, int) {
  return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);
}
RK_EMU_HOOK uint64_t __tsan_atomic64_fetch_add(volatile uint64_t* a, uint64_t v, int) {
  return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);
}
RK_EMU_HOOK uint32_t __tsan_atomic32_fetch_sub(volatile uint32_t* a, uint32_t v, int) {
  return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);
}
RK_EMU_HOOK uint64_t __tsan_atomic64_fetch_sub(volatile uint64_t* a, uint64_t v, int) {
  return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);
}
RK_EMU_HOOK void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
RK_EMU_HOOK void __tsan_atomic_signal_fence(int) {}
#undef RK_EMU_ACCESS
#undef RK_EMU_HOOK
}
#endif
