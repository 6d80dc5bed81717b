// A small SIMT emulator that runs the CUDA kernels of cuda/ on the CPU, so that their unmodified
// source can be tested without a GPU: a test driver includes this header first, then the .cu
// files, and compiles the whole as one C++17 translation unit with a host compiler (it defines
// the runtime functions below) against the CUDA toolkit headers. See linear_scan_test.cpp.
//
// Model. Blocks run one after another. Each CUDA thread of a block is a cooperative fiber with its
// own stack; a fiber runs until it reaches a collective operation (a warp
// shuffle, __syncwarp, __syncthreads), then another ready fiber runs. So threads only interleave
// at collectives, which is exactly what kernels that communicate through shuffles and
// __syncthreads-separated shared memory may rely on. A collective that is never completed (a
// divergent barrier, a lane that exited early) is reported as a deadlock and aborts.
// Schedules (RK_EMU_SCHEDULE, seeded by RK_EMU_SEED): `ordered` (the default) resumes fibers in
// thread order; `random` resumes a random ready fiber at every collective and runs the blocks of a
// launch in a random order; `starve` also shuffles the blocks, and runs one random warp of each
// block only when no other thread of the block can run. A result that depends on one order fails
// under another one.
// Global memory is host memory. __shared__ variables become function statics: shared by all the
// blocks too (checks.h poisons them per block).
// Cooperative launches (rkcuda::launchCooperative) schedule the fibers of every block of the grid
// together, each block with its own __syncthreads barrier and its own dynamic shared memory, so that
// blocks may wait for one another (common/group_sync.cuh: atomicAdd on unsigned counts as progress,
// __nanosleep lets the other fibers run, and a wait that nobody can end is reported as a deadlock).
// A kernel launched that way must use dynamic shared memory only (the function statics would be
// shared by its concurrent blocks). The grid must fit smCount x blocksPerSm, as on a device.
//
// Seams with cuda/ (see cuda/common/launch.cuh): rkcuda::launch runs a grid here instead of
// `<<<...>>>`, and rkcuda::tunable returns the value a test pinned with emu::setTunable, so a test
// can force each configuration a launcher might choose. emu::launchLog records every launch.
//
// Supported: 1-D grids and blocks of a multiple of 32 threads (up to 1024), full-warp
// __shfl_sync / __shfl_up_sync / __shfl_down_sync / __shfl_xor_sync of 4-byte values, __syncwarp,
// __syncthreads, __ldg (which checks alignment), atomicAdd on float and unsigned (a plain add:
// threads run one at a time), __threadfence (nothing to do), __nanosleep (a yield), dynamic shared
// memory through rkcuda::dynamicShared (NaN-filled at every block start;
// a launch above 48 KiB fails unless rkcuda::allowDynamicShared raised the kernel's limit, as on a
// device; 227 KiB at most, also the answer to cudaDevAttrMaxSharedMemoryPerBlockOptin), and the few
// runtime calls that the launchers make
// (stream-ordered allocations are counted, so a test can check that every one is freed). Add what
// new kernels need, in the same style. cp.async copies (cuda/common/async_copy.cuh) are deferred:
// their destination reads as NaN until the issuing thread's wait.
// Hazards (races, reads of uninitialised or pending memory, out-of-bounds and misaligned accesses,
// unsynchronised inter-block communication) are found by the checks of checks.h, compiled in when
// the driver is built with -fsanitize=thread (see that file).
//
// Compile with -fno-strict-aliasing: kernels read element storage as raw bits and 16-byte
// vectors, which nvcc allows and an optimising host compiler otherwise need not.
#pragma once

#define RK_CUDA_EMULATOR 1
// Before the CUDA headers: in host compilation they leave a defined __shared__ alone and do not
// define __launch_bounds__.
#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>  // fmaf and the other math functions kernels call unqualified
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include "common/api.h"
#include "common/check.cuh"

namespace emu {

[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "cuda emulator: %s\n", what.c_str());
  std::abort();
}

// ---- fibers ----

constexpr size_t kStackBytes = 256 * 1024;  // per fiber; touched lazily and reused across blocks
constexpr size_t kSharedGuard = 16;         // float4s between the blocks' dynamic shared memory

// ---- context switches ----
// On x86-64 a switch pushes the callee-saved registers, MXCSR and the x87 control word on the stack
// it leaves and swaps stack pointers: no system call (ucontext's swapcontext makes one per switch,
// for the signal mask, which took most of the emulator's time). Elsewhere ucontext.
#if defined(__x86_64__)
struct Context {
  void* sp = nullptr;
};
extern "C" void rkEmuSwitchContext(void** save, void* load);
asm(R"(
  .text
  .globl rkEmuSwitchContext
  .type rkEmuSwitchContext, @function
rkEmuSwitchContext:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size rkEmuSwitchContext, .-rkEmuSwitchContext
)");
// A context that starts entry (which must never return) on the given stack.
inline void makeContext(Context& c, char* stack, size_t bytes, void (*entry)()) {
  auto* sp = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t{15});
  *--sp = 0;                                   // entry's return address (it never returns)
  *--sp = reinterpret_cast<uint64_t>(entry);   // where the first switch to it returns to
  for (int i = 0; i < 6; ++i) *--sp = 0;       // rbp, rbx, r12-r15
  *--sp = 0x1f80u | (uint64_t{0x037f} << 32);  // default MXCSR and x87 control word
  c.sp = sp;
}
inline void switchContext(Context& from, Context& to) { rkEmuSwitchContext(&from.sp, to.sp); }
[[noreturn]] inline void jumpToContext(Context& to) {
  void* abandoned;
  rkEmuSwitchContext(&abandoned, to.sp);
  __builtin_unreachable();
}
#else
struct Context {
  ucontext_t uc;
};
inline void makeContext(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
inline void switchContext(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
[[noreturn]] inline void jumpToContext(Context& to) {
  setcontext(&to.uc);
  std::abort();
}
#endif

struct Fiber;
struct Barrier {
  unsigned expected = 0, arrived = 0, generation = 0;
  std::vector<Fiber*> waiters;  // the fibers that arrived and wait for the rest
};

// A cp.async copy issued and not yet waited for: its 16 bytes land in dst at the wait.
struct PendingCopy {
  void* dst;
  unsigned char bytes[16];
};

struct Fiber {
  Context context;
  uint3 tid;
  uint3 blockIndex;                // blockIdx of the fiber's block
  Barrier* syncBarrier = nullptr;  // its block's __syncthreads barrier
  unsigned warp = 0;               // its warp's index in Block::warps
  float4* shared = nullptr;        // its block's dynamic shared memory
  const char* stack = nullptr;     // its stack's lowest address
  bool finished = false;
  bool starved = false;    // in the warp that the `starve` schedule holds back
  unsigned exchanges = 0;  // warp exchanges done so far; its parity picks the slot buffer
  // Collectives passed so far, for the checks: block barriers, and warp collectives (block
  // barriers included). They order this thread's memory accesses with the other threads'.
  uint32_t barriers = 0, warpSyncs = 0;
  std::vector<PendingCopy> pendingCopies;
};

struct Warp {
  Barrier barrier;
  uint32_t slots[2][32];  // double-buffered, so one barrier per exchange suffices
};

// The block being run (or, in a cooperative launch, every block of the grid).
struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<Barrier> barriers;  // one per block being run
  Fiber* current = nullptr;
  // Fibers that can run (not finished, not waiting at a barrier), in the order they run; the
  // `starve` schedule keeps its held-back warps apart.
  std::deque<Fiber*> ready, starvedReady;
  unsigned unfinished = 0;
  unsigned idleSwitches = 0;     // spins (__nanosleep) since a fiber last arrived at a barrier or finished
  const void* kernel = nullptr;  // of the launch being run
  std::function<void()> body;
  Context launcher;  // where the launch waits until every fiber has finished
  uint3 blockIndex;  // of the first block being run
  dim3 blockDims, gridDims;
  float4* dynamicShared = nullptr;   // the launch's sharedBytes, rounded up to 16, per block being run
  size_t dynamicSharedCapacity = 0;  // float4s
  size_t dynamicSharedBytes = 0;
};
inline Block block;

}  // namespace emu

#include "checks.h"

namespace emu {

// Stacks, kept for the whole run (fiber i of every block uses stack i), each above an
// inaccessible page so that an overflow faults instead of corrupting a neighbour.
inline char* stackFor(size_t i) {
  static std::vector<char*> stacks;
  static const size_t guard = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  while (stacks.size() <= i) {
    void* p = mmap(nullptr, guard + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED || mprotect(p, guard, PROT_NONE) != 0) fail("cannot allocate a fiber stack");
    stacks.push_back(static_cast<char*>(p) + guard);
  }
  return stacks[i];
}

// ---- schedules ----

enum class Schedule { Ordered, Random, Starve };
struct Options {
  Schedule schedule = Schedule::Ordered;
  uint64_t seed = 1;
};
inline Options readOptions() {
  Options o;
  const char* name = std::getenv("RK_EMU_SCHEDULE");
  const std::string n = name != nullptr ? name : "ordered";
  if (n == "random") {
    o.schedule = Schedule::Random;
  } else if (n == "starve") {
    o.schedule = Schedule::Starve;
  } else if (n != "ordered") {
    std::fprintf(stderr, "cuda emulator: RK_EMU_SCHEDULE must be ordered, random or starve\n");
    std::exit(2);
  }
  if (const char* seed = std::getenv("RK_EMU_SEED")) o.seed = std::strtoull(seed, nullptr, 10);
  return o;
}
inline const Options& options() {
  static const Options o = readOptions();
  return o;
}
inline uint64_t nextRandom() {  // splitmix64
  static uint64_t state = options().seed * 0x9e3779b97f4a7c15ull + 1;
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

inline void makeReady(Fiber* f) { (f->starved ? block.starvedReady : block.ready).push_back(f); }

// The fiber to run next, taken off the ready queues; nullptr when none can run. `starve` picks a
// held-back fiber only when no other is ready, or when the others have spun a whole round.
inline Fiber* takeReady() {
  std::deque<Fiber*>* q = &block.ready;
  if (q->empty() || (block.idleSwitches > q->size() && !block.starvedReady.empty())) q = &block.starvedReady;
  if (q->empty()) return nullptr;
  if (options().schedule == Schedule::Random) std::swap(q->front(), (*q)[nextRandom() % q->size()]);
  Fiber* f = q->front();
  q->pop_front();
  return f;
}

[[noreturn]] inline void deadlock() {
  fail("synccheck: deadlock in block " + std::to_string(block.current->blockIndex.x) +
       ": a barrier or warp collective that not every thread reaches (a divergent barrier, or lanes that exited)");
}

inline void switchTo(Fiber* from, Fiber* to) {
  if (to == from) return;
  block.current = to;
  switchContext(from->context, to->context);
}

// Lets the other fibers run; the current one stays ready (a thread that waits for another block).
inline void yield() {
  // Many spins in which nobody arrived anywhere: everyone is waiting for good.
  if (++block.idleSwitches > 4 * block.unfinished + 64) deadlock();
  Fiber* self = block.current;
  makeReady(self);
  switchTo(self, takeReady());
}

inline void arriveAndWait(Barrier& b) {
  block.idleSwitches = 0;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    for (Fiber* f : b.waiters) makeReady(f);
    b.waiters.clear();
    return;
  }
  Fiber* self = block.current;
  b.waiters.push_back(self);
  Fiber* next = takeReady();
  if (next == nullptr) deadlock();
  switchTo(self, next);
}

inline void fiberMain() {
  block.body();
  Fiber* self = block.current;
  if (!self->pendingCopies.empty()) fail("a thread exited with cp.async copies it never waited for");
  self->finished = true;
  --block.unfinished;
  block.idleSwitches = 0;
  Fiber* to = takeReady();
  if (to == nullptr && block.unfinished > 0) deadlock();
  block.current = to;
  jumpToContext(to != nullptr ? to->context : block.launcher);
}

// Runs blocks first .. first + count - 1 together (count 1 but for cooperative launches).
inline void runBlocks(unsigned first, unsigned count) {
  const unsigned threads = block.blockDims.x;
  const size_t sharedPerBlock = (block.dynamicSharedBytes + 15) / 16;
  const size_t sharedStride = sharedPerBlock + kSharedGuard;
  block.blockIndex = make_uint3(first, 0, 0);
  block.fibers.assign(static_cast<size_t>(count) * threads, Fiber{});
  block.ready.clear();
  block.starvedReady.clear();
  block.warps.assign(static_cast<size_t>(count) * threads / 32, Warp{});
  for (Warp& w : block.warps) w.barrier.expected = 32;
  std::vector<unsigned> starvedWarp(count, ~0u);
  if (options().schedule == Schedule::Starve) {
    for (unsigned& w : starvedWarp) w = static_cast<unsigned>(nextRandom() % (threads / 32));
  }
  block.barriers.assign(count, Barrier{});
  for (Barrier& b : block.barriers) b.expected = threads;
  if (block.dynamicSharedCapacity < count * sharedStride) {
    if (block.dynamicShared != nullptr) checks::deviceFree(block.dynamicShared, block.dynamicSharedCapacity * 16);
    block.dynamicSharedCapacity = count * sharedStride;
    block.dynamicShared = static_cast<float4*>(checks::deviceAllocate(block.dynamicSharedCapacity * 16));
  }
  for (unsigned t = 0; t < count * threads; ++t) {
    Fiber& f = block.fibers[t];
    f.tid = make_uint3(t % threads, 0, 0);
    f.blockIndex = make_uint3(first + t / threads, 0, 0);
    f.syncBarrier = &block.barriers[t / threads];
    f.warp = t / 32;
    f.shared = block.dynamicShared + (t / threads) * sharedStride;
    f.starved = (t % threads) / 32 == starvedWarp[t / threads];
    f.stack = stackFor(t);
    makeContext(f.context, stackFor(t), kStackBytes, fiberMain);
  }
  std::memset(block.dynamicShared, 0xff, count * sharedStride * sizeof(float4));
  block.unfinished = count * threads;
  block.idleSwitches = 0;
  for (Fiber& f : block.fibers) makeReady(&f);
  block.current = takeReady();
  checks::blocksStart(first, count);
  switchContext(block.launcher, block.current->context);
  checks::blocksEnd();
}

// ---- what tests can set and inspect ----

struct LaunchRecord {
  const void* kernel;
  dim3 grid, block;
};
inline std::vector<LaunchRecord> launchLog;

inline std::map<std::string, int>& tunings() {
  static std::map<std::string, int> values;
  return values;
}
// Pins rkcuda::tunable(name, ...) to value; 0 restores the launcher's own choice.
inline void setTunable(const std::string& name, int value) {
  if (value == 0) {
    tunings().erase(name);
  } else {
    tunings()[name] = value;
  }
}

template <class Kernel> const void* kernelId(Kernel* kernel) { return reinterpret_cast<const void*>(kernel); }

// Dynamic shared memory limits raised by rkcuda::allowDynamicShared, per kernel.
inline std::map<const void*, size_t> dynamicSharedLimits;
constexpr size_t kDefaultDynamicShared = 48 * 1024, kMaxDynamicShared = 227 * 1024;

inline int smCount = 132;    // cudaDevAttrMultiProcessorCount
inline int blocksPerSm = 4;  // the answer to every occupancy query
// Refuse every cooperative launch (cudaErrorCooperativeLaunchTooLarge), as a device whose SMs another
// process holds may.
inline bool refuseCooperative = false;

// Stream-ordered allocations (cudaMallocAsync) not yet freed, and how many were made in all.
inline std::map<void*, size_t> liveAllocations;
constexpr size_t kAllocationGuard = 256;  // bytes on each side of a cudaMallocAsync allocation
inline long allocationCount = 0;

}  // namespace emu

// ---- built-in variables and device functions ----

#if defined(RK_EMU_CHECKS) && defined(__x86_64__)
namespace emu {
// With the checks, every memory access of a kernel calls a hook: the built-in variables, read all
// the time, are loaded by asm, which the instrumentation does not see.
template <class T> inline T loadUnchecked(const T& v) {
  static_assert(sizeof(T) == 8 || sizeof(T) == 12, "pointers and dim3/uint3");
  T out;
  if constexpr (sizeof(T) == 8) {
    asm("movq %1, %0" : "=r"(out) : "m"(v));
  } else {
    uint64_t lo;
    uint32_t hi;
    const char* bytes = reinterpret_cast<const char*>(&v);
    asm("movq %1, %0" : "=r"(lo) : "m"(*reinterpret_cast<const uint64_t*>(bytes)));
    asm("movl %1, %0" : "=r"(hi) : "m"(*reinterpret_cast<const uint32_t*>(bytes + 8)));
    std::memcpy(&out, &lo, 8);
    std::memcpy(reinterpret_cast<char*>(&out) + 8, &hi, 4);
  }
  return out;
}
}  // namespace emu
#define threadIdx (::emu::loadUnchecked(::emu::loadUnchecked(::emu::block.current)->tid))
#define blockIdx (::emu::loadUnchecked(::emu::loadUnchecked(::emu::block.current)->blockIndex))
#define blockDim (::emu::loadUnchecked(::emu::block.blockDims))
#define gridDim (::emu::loadUnchecked(::emu::block.gridDims))
#else
#define threadIdx (::emu::block.current->tid)
#define blockIdx (::emu::block.current->blockIndex)
#define blockDim (::emu::block.blockDims)
#define gridDim (::emu::block.gridDims)
#endif

inline void __syncthreads() {
  emu::arriveAndWait(*emu::block.current->syncBarrier);
  ++emu::block.current->barriers;
  ++emu::block.current->warpSyncs;
}

namespace emu {
// synccheck: a warp collective's mask must include the calling lane; partial masks are otherwise
// not emulated (a full warp is what every kernel here uses).
inline void checkMask(unsigned mask, const char* what) {
  const unsigned lane = block.current->tid.x % 32;
  if ((mask >> lane & 1u) == 0) {
    fail(std::string("synccheck: ") + what + " with a mask that leaves out the calling lane " + std::to_string(lane) +
         " (block " + std::to_string(block.current->blockIndex.x) + ")");
  }
  if (mask != 0xffffffffu) fail(std::string("only full-warp masks are emulated (") + what + ")");
}

// Every lane of the current fiber's warp publishes value. Lanes form segments of `width`; returns
// the value of lane source(i) of this lane's segment, i being this lane's index in it, or this
// lane's own value when source returns -1.
template <class T, class Source> T warpExchange(unsigned mask, T value, int width, Source source) {
  static_assert(sizeof(T) == 4 && std::is_trivially_copyable_v<T>, "shuffles of 4-byte values only");
  checkMask(mask, "shuffle");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) fail("shuffle width must be a power of two <= 32");
  Fiber& self = *block.current;
  Warp& warp = block.warps[self.warp];
  const int lane = static_cast<int>(self.tid.x % 32);
  uint32_t* slots = warp.slots[self.exchanges++ & 1];
  std::memcpy(&slots[lane], &value, sizeof value);
  arriveAndWait(warp.barrier);
  ++self.warpSyncs;
  const int segment = lane & ~(width - 1);
  const int src = source(lane - segment);
  if (src >= 0) std::memcpy(&value, &slots[segment + src], sizeof value);
  return value;
}
}  // namespace emu

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  emu::checkMask(mask, "__syncwarp");
  emu::arriveAndWait(emu::block.warps[emu::block.current->warp].barrier);
  ++emu::block.current->warpSyncs;
}

template <class T> T __shfl_sync(unsigned mask, T value, int srcLane, int width = 32) {
  return emu::warpExchange(mask, value, width, [&](int) { return srcLane & (width - 1); });
}

template <class T> T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  const int d = static_cast<int>(delta);
  return emu::warpExchange(mask, value, width, [&](int i) { return i >= d ? i - d : -1; });
}

template <class T> T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  const int d = static_cast<int>(delta);
  return emu::warpExchange(mask, value, width, [&](int i) { return i + d < width ? i + d : -1; });
}

template <class T> T __shfl_xor_sync(unsigned mask, T value, int laneMask, int width = 32) {
  return emu::warpExchange(mask, value, width, [&](int i) { return (i ^ laneMask) & (width - 1); });
}

RK_EMU_CALLSITE inline float atomicAdd(float* address, float value) {
  emu::checks::atomic(address, sizeof *address, false, __builtin_return_address(0));
  const float old = *address;
  *address = old + value;
  return old;
}

// A counter update: progress for the deadlock detection (another block may be waiting for it),
// and for the checks a release when the thread fenced before it.
RK_EMU_CALLSITE inline unsigned atomicAdd(unsigned* address, unsigned value) {
  emu::block.idleSwitches = 0;
  emu::checks::atomic(address, sizeof *address, true, __builtin_return_address(0));
  const unsigned old = *address;
  *address = old + value;
  return old;
}

inline void __threadfence() { emu::checks::fence(); }

// A thread that waits for another block: lets the other fibers run.
inline void __nanosleep(unsigned) { emu::yield(); }

template <class T> T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) emu::fail("misaligned __ldg");
  return *p;
}

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// ---- the emulator's side of cuda/common/async_copy.cuh and group_sync.cuh ----

namespace emu {
// cp.async: the source is read now, the destination written at the issuing thread's wait; until
// then it reads as NaN (and the checks report a read of it).
RK_EMU_CALLSITE inline void copyAsync16(void* dst, const void* src, int srcBytes) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    fail("misaligned cp.async");
  }
  PendingCopy copy{dst, {}};
  const int n = srcBytes < 0 ? 0 : srcBytes < 16 ? srcBytes : 16;
  checks::copyIssued(dst, src, n, __builtin_return_address(0));
  if (n > 0) std::memcpy(copy.bytes, src, static_cast<size_t>(n));
  std::memset(dst, 0xff, 16);
  block.current->pendingCopies.push_back(copy);
}
RK_EMU_CALLSITE inline void waitAsyncCopies() {
  for (const PendingCopy& c : block.current->pendingCopies) {
    std::memcpy(c.dst, c.bytes, 16);
    checks::copyLanded(c.dst, __builtin_return_address(0));
  }
  block.current->pendingCopies.clear();
}
// ld.acquire.gpu of a flag another block releases.
RK_EMU_CALLSITE inline unsigned loadAcquire(const unsigned* p) {
  checks::acquire(p, __builtin_return_address(0));
  return *const_cast<const volatile unsigned*>(p);
}
}  // namespace emu

// ---- runtime: the calls the launchers make (host memory stands for device memory) ----

extern "C" {
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) {
    *value = static_cast<int>(emu::kMaxDynamicShared);
    return cudaSuccess;
  }
  if (attr == cudaDevAttrCooperativeLaunch) {
    *value = 1;
    return cudaSuccess;
  }
  if (attr != cudaDevAttrMultiProcessorCount) {
    emu::fail("cudaDeviceGetAttribute(" + std::to_string(static_cast<int>(attr)) + ") is not emulated");
  }
  *value = emu::smCount;
  return cudaSuccess;
}
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, const void*, int, size_t, unsigned) {
  *blocks = emu::blocksPerSm;
  return cudaSuccess;
}
cudaError_t cudaGetLastError() { return cudaSuccess; }
const char* cudaGetErrorName(cudaError_t) { return "cudaErrorEmulated"; }
const char* cudaGetErrorString(cudaError_t) { return "error in the CUDA emulator"; }
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memcpy(dst, src, bytes);
  emu::checks::hostWrote(dst, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t) {
  std::memset(dst, value, bytes);
  emu::checks::hostWrote(dst, bytes);
  return cudaSuccess;
}
cudaError_t cudaMallocAsync(void** ptr, size_t bytes, cudaStream_t) {
  // Uninitialised like device memory: filled with a pattern that reads as NaN in every dtype.
  // Guard zones on each side, where any access is out of bounds for the checks.
  char* base = static_cast<char*>(emu::checks::deviceAllocate(bytes + 2 * emu::kAllocationGuard));
  if (base == nullptr) return cudaErrorMemoryAllocation;
  void* p = base + emu::kAllocationGuard;
  std::memset(p, 0xff, bytes);
  emu::checks::deviceArray(p, bytes, emu::kAllocationGuard, false);
  emu::liveAllocations[p] = bytes;
  ++emu::allocationCount;
  *ptr = p;
  return cudaSuccess;
}
cudaError_t cudaFreeAsync(void* ptr, cudaStream_t) {
  if (ptr == nullptr) return cudaSuccess;
  if (emu::liveAllocations.count(ptr) == 0) emu::fail("cudaFreeAsync of a pointer not from cudaMallocAsync");
  emu::checks::deviceArrayGone(ptr);
  const size_t bytes = emu::liveAllocations[ptr];
  emu::liveAllocations.erase(ptr);
  emu::checks::deviceFree(static_cast<char*>(ptr) - emu::kAllocationGuard, bytes + 2 * emu::kAllocationGuard);
  return cudaSuccess;
}
}

// ---- the seams of cuda/common/launch.cuh ----

namespace rkcuda {

// The checks of a launch; sets up the emulator's launch state when they pass.
template <class... KArgs> Status prepareLaunch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t sharedBytes) {
  if (grid.x == 0 || grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1) {
    return statusError("emulator: grid and block must be 1-D and non-empty");
  }
  if (block.x == 0 || block.x % 32 != 0 || block.x > 1024) {
    return statusError("emulator: block size must be a multiple of 32, at most 1024");
  }
  {
    const auto it = emu::dynamicSharedLimits.find(emu::kernelId(kernel));
    const size_t limit = it != emu::dynamicSharedLimits.end() ? it->second : emu::kDefaultDynamicShared;
    if (sharedBytes > limit) {
      return statusError("emulator: " + std::to_string(sharedBytes) +
                         " bytes of dynamic shared memory, over the kernel's limit of " + std::to_string(limit) +
                         " (see allowDynamicShared)");
    }
  }
  emu::block.dynamicSharedBytes = sharedBytes;
  emu::block.kernel = emu::kernelId(kernel);
  emu::launchLog.push_back(emu::LaunchRecord{emu::kernelId(kernel), grid, block});
  emu::block.gridDims = grid;
  emu::block.blockDims = block;
  return Status{};
}

template <class... KArgs, class... Args>
Status launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t sharedBytes, Args... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "launch: wrong number of kernel arguments");
  if (Status st = prepareLaunch(kernel, grid, block, sharedBytes); !st.ok()) return st;
  emu::block.body = [&] { kernel(static_cast<KArgs>(args)...); };
  // Blocks are independent: any order is one a device may run them in.
  std::vector<unsigned> order(grid.x);
  for (unsigned b = 0; b < grid.x; ++b) order[b] = b;
  if (emu::options().schedule != emu::Schedule::Ordered) {
    for (unsigned b = grid.x; b > 1; --b) std::swap(order[b - 1], order[emu::nextRandom() % b]);
  }
  emu::checks::launchStart(false, grid.x, block.x);
  for (unsigned b : order) emu::runBlocks(b, 1);
  emu::checks::launchEnd();
  emu::block.body = nullptr;
  return Status{};
}

// Every block's threads at once; refused, as on a device, when the grid exceeds what can be resident.
template <class... KArgs, class... Args>
Status launchCooperative(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t sharedBytes, Args... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "launchCooperative: wrong number of kernel arguments");
  if (emu::refuseCooperative || static_cast<int64_t>(grid.x) > static_cast<int64_t>(emu::smCount) * emu::blocksPerSm) {
    Status refused;
    refused.code = static_cast<int>(cudaErrorCooperativeLaunchTooLarge);
    refused.message = "emulator: cooperative launch of " + std::to_string(grid.x) + " blocks refused";
    return refused;
  }
  if (Status st = prepareLaunch(kernel, grid, block, sharedBytes); !st.ok()) return st;
  emu::block.body = [&] { kernel(static_cast<KArgs>(args)...); };
  emu::checks::launchStart(true, grid.x, block.x);
  emu::runBlocks(0, grid.x);
  emu::checks::launchEnd();
  emu::block.body = nullptr;
  return Status{};
}

template <class T> T* dynamicShared() { return reinterpret_cast<T*>(emu::block.current->shared); }

template <class... KArgs> Status allowDynamicShared(void (*kernel)(KArgs...), size_t bytes) {
  if (bytes > emu::kMaxDynamicShared) return statusError("emulator: more dynamic shared memory than a device allows");
  emu::dynamicSharedLimits[emu::kernelId(kernel)] = bytes;
  return Status{};
}

inline int tunable(const char* name, int chosen) {
  const auto it = emu::tunings().find(name);
  return it != emu::tunings().end() ? it->second : chosen;
}

}  // namespace rkcuda
