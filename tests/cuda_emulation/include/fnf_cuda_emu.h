// CUDA on CPU: enough of the CUDA language and runtime to run the .cu sources of csrc/cuda, compiled as
// host C++ (g++/clang++ -x c++), under AddressSanitizer/UBSan. Used by tests/test_cuda_emulation.py.
//
// Execution model: blocks run one after another; inside a block every CUDA thread is a fiber with its own
// stack (a 14-instruction stack switch on x86-64, ucontext elsewhere), scheduled cooperatively by this header. A fiber runs until it reaches a barrier
// (__syncthreads, a warp shuffle/vote, __syncwarp) or returns. The order in which ready fibers run is
// adversarial and changes per block (lowest index first, highest first, seeded random; FNF_EMU_SCHEDULE=
// low|high|random|mixed, default mixed), so a missing barrier shows up as a wrong result.
// blockIdx/threadIdx/blockDim/gridDim are thread-locals that the scheduler sets before a fiber resumes.
// Errors (deadlock: a barrier that can never fill; a thread that exits while others wait; a shuffle with a
// partial mask, with lanes that exited or that disagree on the operation; a timeout) print "fnf_emu: ..."
// and abort. A bad launch configuration (empty grid or block, grid y/z > 65535, x > 2^31 - 1, block > 1024
// threads, z > 64, shared memory > 48 KiB) is what CUDA does: the kernel does not run and cudaGetLastError()
// returns cudaErrorInvalidConfiguration. __shared__ variables are function statics: one block runs at a time.
// __half and __nv_bfloat16 are 16-bit types with round-to-nearest-even conversions (NaN, Inf, subnormals).
#pragma once
#ifdef __CUDACC__
#error "fnf_cuda_emu.h is for host compilers; nvcc uses the real CUDA headers"
#endif

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define FNF_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FNF_EMU_ASAN 1
#endif
#endif
#ifdef FNF_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// ---- language ---------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static
#define __constant__ static
#define __restrict__ __restrict

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

// ---- runtime ----------------------------------------------------------------------------------------------
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9,
                   cudaErrorLaunchFailure = 719 };
typedef struct CUstream_st* cudaStream_t;

namespace fnf_emu {
inline thread_local cudaError_t last_error = cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
  cudaError_t e = fnf_emu::last_error;
  fnf_emu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return fnf_emu::last_error; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unspecified launch failure";
  }
}

// ---- bit casts and math -------------------------------------------------------------------------------------
template <typename To, typename From>
inline To fnf_emu_bits(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit cast of different sizes");
  To t;
  std::memcpy(&t, &v, sizeof(To));
  return t;
}
inline float __int_as_float(int v) { return fnf_emu_bits<float>(v); }
inline int __float_as_int(float v) { return fnf_emu_bits<int>(v); }
inline float __uint_as_float(unsigned v) { return fnf_emu_bits<float>(v); }
inline unsigned __float_as_uint(float v) { return fnf_emu_bits<unsigned>(v); }
inline double __longlong_as_double(long long v) { return fnf_emu_bits<double>(v); }
inline long long __double_as_longlong(double v) { return fnf_emu_bits<long long>(v); }

// ---- half and bfloat16 -----------------------------------------------------------------------------------
namespace fnf_emu {

// float -> IEEE binary16, round to nearest even; NaN stays NaN (quiet), overflow gives Inf.
inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = fnf_emu_bits<uint32_t>(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));  // NaN (payload kept, quiet)
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 (or Inf): Inf
  if (ax < 0x38800000u) {  // below 2^-14: a half subnormal (or zero); |f| * 2^24 is exact, round it to even
    const float scaled = std::ldexp(fnf_emu_bits<float>(ax), 24);
    return uint16_t(sign | uint16_t(std::nearbyint(scaled)));
  }
  const uint32_t rebased = ax - ((127u - 15u) << 23);
  const uint32_t rest = rebased & 0x1fffu;
  uint32_t h = rebased >> 13;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // carries into the exponent correctly
  return uint16_t(sign | h);
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = std::ldexp(float(m), -24);
    return sign ? -v : v;
  }
  if (e == 31) return fnf_emu_bits<float>(sign | 0x7f800000u | (m << 13));
  return fnf_emu_bits<float>(sign | ((e + 112u) << 23) | (m << 13));
}

// float -> bfloat16, round to nearest even; NaN stays NaN (quiet).
inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = fnf_emu_bits<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x0040u);
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float bf16_bits_to_float(uint16_t b) { return fnf_emu_bits<float>(uint32_t(b) << 16); }

}  // namespace fnf_emu

struct __half {
  uint16_t __x;
  __half() = default;
  explicit __half(float f) : __x(fnf_emu::float_to_half_bits(f)) {}
  explicit operator float() const { return fnf_emu::half_bits_to_float(__x); }
};
struct __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
  explicit __nv_bfloat16(float f) : __x(fnf_emu::float_to_bf16_bits(f)) {}
  explicit operator float() const { return fnf_emu::bf16_bits_to_float(__x); }
};
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "16-bit types");

inline float __half2float(__half h) { return fnf_emu::half_bits_to_float(h.__x); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __float2half(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return fnf_emu::bf16_bits_to_float(b.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }

// ---- the block scheduler -------------------------------------------------------------------------------------
namespace fnf_emu {

[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

#if defined(__x86_64__) && !defined(FNF_EMU_UCONTEXT)
#define FNF_EMU_FAST_SWITCH 1
// Saves the callee-saved registers on the current stack, stores its pointer in *save, continues on `to`.
extern "C" void fnf_emu_switch(void** save, void* to);
asm(R"(
  .text
  .weak fnf_emu_switch
  .type fnf_emu_switch, @function
fnf_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fnf_emu_switch, .-fnf_emu_switch
)");
#endif

struct Fiber {
#ifdef FNF_EMU_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  char* stack = nullptr;
  uint3 tid{0, 0, 0};
  enum State { Ready, AtBlockBarrier, AtWarpBarrier, Done } state = Ready;
  unsigned exchanges = 0;  // warp exchanges this thread has made: picks the slot buffer
};

// One warp's exchange: lanes write their slot, wait until every lane of the warp has, read. Two slot buffers
// used alternately: a lane can only write the buffer of exchange k + 2 after every lane has arrived at
// exchange k + 1, that is after every lane has read exchange k.
struct Warp {
  int lanes = 0;          // threads of this warp that exist (the last warp of a block may be partial)
  int arrived = 0;
  int exited = 0;         // lanes that have returned
  const char* op = nullptr;
  unsigned long long slot[2][32];
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int threads = 0;
  int block_arrived = 0;
  int done = 0;
  int current = -1;
  const char* kernel = "?";
  unsigned long long seed = 0;
  int policy = 0;          // 0: lowest ready first, 1: highest first, 2: random
  unsigned long long rng = 0;
  uint64_t ready[16] = {};  // bit i: fiber i is Ready (runnable, or running)

  void set_state(int i, Fiber::State st) {
    fibers[size_t(i)].state = st;
    const uint64_t bit = uint64_t(1) << (i & 63);
    ready[i >> 6] = st == Fiber::Ready ? (ready[i >> 6] | bit) : (ready[i >> 6] & ~bit);
  }
};

inline thread_local Block* block = nullptr;
#ifdef FNF_EMU_FAST_SWITCH
inline thread_local void* scheduler_sp = nullptr;
#else
inline thread_local ucontext_t scheduler_ctx;
#endif
inline thread_local void* scheduler_fake_stack = nullptr;
inline thread_local const void* scheduler_stack_bottom = nullptr;
inline thread_local size_t scheduler_stack_size = 0;
inline thread_local void (*fiber_entry)() = nullptr;
inline thread_local unsigned long long launches = 0;

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kStackReused = 32 * 1024;  // the part of a stack that a fiber may have poisoned

inline void where(char* buf, size_t n) {
  std::snprintf(buf, n, "kernel %s, block (%u,%u,%u)", block ? block->kernel : "?", blockIdx.x, blockIdx.y,
                blockIdx.z);
}

inline void fail(const char* fmt, ...) {
  char at[256];
  where(at, sizeof at);
  std::fprintf(stderr, "fnf_emu: error in %s, thread (%u,%u,%u): ", at, threadIdx.x, threadIdx.y, threadIdx.z);
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::abort();
}

inline std::vector<char*>& stack_pool() {
  static std::vector<char*> pool;
  return pool;
}

inline char* get_stack(size_t i) {
  auto& pool = stack_pool();
  while (pool.size() <= i) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) fail("cannot map a fiber stack");
    pool.push_back(static_cast<char*>(p));
  }
#ifdef FNF_EMU_ASAN
  // A finished fiber leaves the shadow of its last frames (near the top) poisoned; clear it for the next.
  __asan_unpoison_memory_region(pool[i] + kStackBytes - kStackReused, kStackReused);
#endif
  return pool[i];
}

inline unsigned long long next_random() {
  unsigned long long& s = block->rng;  // splitmix64
  s += 0x9e3779b97f4a7c15ull;
  unsigned long long z = s;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// The ready fiber to run next under the block's policy, or -1.
inline int pick_ready() {
  Block& b = *block;
  const int n = b.threads;
  const int words = (n + 63) / 64;
  if (b.policy == 0) {
    for (int w = 0; w < words; ++w)
      if (b.ready[w]) return w * 64 + __builtin_ctzll(b.ready[w]);
  } else if (b.policy == 1) {
    for (int w = words - 1; w >= 0; --w)
      if (b.ready[w]) return w * 64 + 63 - __builtin_clzll(b.ready[w]);
  } else {  // the first ready fiber at or after a random one (cyclically)
    const int start = int(next_random() % unsigned(n));
    for (int k = 0; k <= words; ++k) {
      const int w = (start / 64 + k) % words;
      uint64_t bits = b.ready[w];
      if (k == 0) bits &= ~uint64_t(0) << (start & 63);
      if (bits) return w * 64 + __builtin_ctzll(bits);
    }
  }
  return -1;
}

inline thread_local bool from_scheduler = false;  // the switch in progress leaves the scheduler's stack

// Switch from `from` to `to` (-1: the scheduler's context). `from` == -2: a fiber that has finished.
inline void switch_context(int from, int to) {
  Block& b = *block;
  if (to >= 0) {
    b.current = to;
    threadIdx = b.fibers[size_t(to)].tid;
  }
#ifdef FNF_EMU_ASAN
  void* fake = nullptr;
  void** fake_save = from == -2 ? nullptr : (from == -1 ? &scheduler_fake_stack : &fake);
  if (to >= 0) {
    __sanitizer_start_switch_fiber(fake_save, b.fibers[size_t(to)].stack, kStackBytes);
  } else {
    __sanitizer_start_switch_fiber(fake_save, scheduler_stack_bottom, scheduler_stack_size);
  }
#endif
  from_scheduler = from == -1;
#ifdef FNF_EMU_FAST_SWITCH
  static thread_local void* dead_sp = nullptr;
  void** save = from >= 0 ? &b.fibers[size_t(from)].sp : (from == -1 ? &scheduler_sp : &dead_sp);
  fnf_emu_switch(save, to >= 0 ? b.fibers[size_t(to)].sp : scheduler_sp);
#else
  static thread_local ucontext_t dead_ctx;
  ucontext_t* save = from >= 0 ? &b.fibers[size_t(from)].ctx : (from == -1 ? &scheduler_ctx : &dead_ctx);
  swapcontext(save, to >= 0 ? &b.fibers[size_t(to)].ctx : &scheduler_ctx);
#endif
#ifdef FNF_EMU_ASAN
  __sanitizer_finish_switch_fiber(from == -1 ? scheduler_fake_stack : fake, nullptr, nullptr);
#endif
}

// The current fiber blocks (or has finished: dying): run the next ready fiber directly, or go back to the
// scheduler when there is none (all done, or a deadlock that the scheduler reports).
inline void yield_current(bool dying) {
  const int from = block->current;
  switch_context(dying ? -2 : from, pick_ready());
}

inline void fiber_main() {
#ifdef FNF_EMU_ASAN
  const void* bottom = nullptr;
  size_t size = 0;
  __sanitizer_finish_switch_fiber(nullptr, &bottom, &size);
  if (from_scheduler) {
    scheduler_stack_bottom = bottom;
    scheduler_stack_size = size;
  }
#endif
  fiber_entry();
  Block& b = *block;
  b.set_state(b.current, Fiber::Done);
  ++b.done;
  if (b.block_arrived > 0) {
    fail("exited while %d thread(s) wait at __syncthreads (a barrier in divergent code, or an early return "
         "before it)", b.block_arrived);
  }
  const int w = b.current / 32;
  ++b.warps[size_t(w)].exited;
  if (b.warps[size_t(w)].arrived > 0) {
    fail("exited while %d lane(s) of warp %d wait in %s for it", b.warps[size_t(w)].arrived, w, b.warps[size_t(w)].op);
  }
  yield_current(true);
  __builtin_unreachable();
}

[[noreturn]] inline void report_deadlock() {
  Block& b = *block;
  int at_block = 0, at_warp = 0;
  for (const Fiber& f : b.fibers) {
    at_block += f.state == Fiber::AtBlockBarrier;
    at_warp += f.state == Fiber::AtWarpBarrier;
  }
  std::string detail;
  for (size_t w = 0; w < b.warps.size(); ++w) {
    if (b.warps[w].arrived > 0) {
      char line[160];
      std::snprintf(line, sizeof line, "; warp %zu: %d of %d lanes in %s", w, b.warps[w].arrived, b.warps[w].lanes,
                    b.warps[w].op ? b.warps[w].op : "?");
      detail += line;
    }
  }
  threadIdx = uint3{0, 0, 0};
  fail("deadlock: a barrier can never fill: %d of %d threads wait at __syncthreads, %d in warp exchanges, "
       "%d exited%s", at_block, b.threads, at_warp, b.done, detail.c_str());
}

// Block barrier (__syncthreads).
inline void block_barrier() {
  Block& b = *block;
  if (b.done > 0) fail("__syncthreads after %d thread(s) of the block exited", b.done);
  if (++b.block_arrived == b.threads) {
    b.block_arrived = 0;
    for (Fiber& g : b.fibers)
      if (g.state == Fiber::AtBlockBarrier) b.set_state(int(&g - b.fibers.data()), Fiber::Ready);
    return;  // the last to arrive goes on; the others run when the scheduler picks them
  }
  b.set_state(b.current, Fiber::AtBlockBarrier);
  yield_current(false);
}

inline unsigned full_mask(const Warp& w) { return w.lanes == 32 ? 0xffffffffu : ((1u << w.lanes) - 1u); }

// Waits until every lane of the current warp has called it with the same op. Two counters: `arrived`
// gathers the lanes, then all are released together.
inline void warp_wait(Warp& w, const char* op, unsigned mask) {
  Block& b = *block;
  const int lane = b.current % 32, warp = b.current / 32;
  if (mask != full_mask(w)) {
    fail("%s with mask 0x%08x in warp %d, whose lanes are 0x%08x: partial masks (and masks naming lanes the block "
         "does not have) are refused; every lane of the warp must take part", op, mask, warp, full_mask(w));
  }
  if (w.arrived == 0) {
    w.op = op;
  } else if (w.op != op && std::strcmp(w.op, op) != 0) {
    fail("lane %d calls %s while other lanes of warp %d wait in %s (divergent warp exchange)", lane, op, warp, w.op);
  }
  if (w.exited > 0) {
    for (int i = warp * 32; i < warp * 32 + w.lanes; ++i) {
      if (b.fibers[size_t(i)].state == Fiber::Done) fail("%s in warp %d: lane %d already exited", op, warp, i % 32);
    }
  }
  if (++w.arrived == w.lanes) {
    w.arrived = 0;
    for (int i = warp * 32; i < warp * 32 + w.lanes; ++i)
      if (b.fibers[size_t(i)].state == Fiber::AtWarpBarrier) b.set_state(i, Fiber::Ready);
    return;
  }
  b.set_state(b.current, Fiber::AtWarpBarrier);
  yield_current(false);
}

// Every lane of the warp publishes one 64-bit value; returns the warp's slots (valid until this lane's next
// exchange).
inline const unsigned long long* exchange_all(const char* op, unsigned mask, unsigned long long value) {
  Block& b = *block;
  Warp& w = b.warps[size_t(b.current / 32)];
  Fiber& f = b.fibers[size_t(b.current)];
  unsigned long long* slots = w.slot[f.exchanges++ & 1u];
  slots[b.current % 32] = value;
  warp_wait(w, op, mask);
  return slots;
}

// Returns the value of lane `src` (its own value when src is out of range), as the shuffle instructions do.
inline unsigned long long exchange(const char* op, unsigned mask, unsigned long long value, int src_of_lane) {
  const int lanes = block->warps[size_t(block->current / 32)].lanes;
  const unsigned long long* slots = exchange_all(op, mask, value);
  return (src_of_lane >= 0 && src_of_lane < lanes) ? slots[src_of_lane] : value;
}

template <typename T>
inline unsigned long long to_slot(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type above 8 bytes");
  unsigned long long s = 0;
  std::memcpy(&s, &v, sizeof(T));
  return s;
}
template <typename T>
inline T from_slot(unsigned long long s) {
  T v;
  std::memcpy(&v, &s, sizeof(T));
  return v;
}

inline int lane_id() { return block->current % 32; }

inline void check_width(int width) {
  if (width < 1 || width > 32 || (width & (width - 1))) fail("shuffle width %d is not a power of 2 in [1, 32]", width);
}

}  // namespace fnf_emu

inline void __syncthreads() { fnf_emu::block_barrier(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  fnf_emu::Warp& w = fnf_emu::block->warps[size_t(fnf_emu::block->current / 32)];
  fnf_emu::warp_wait(w, "__syncwarp", mask);
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  fnf_emu::check_width(width);
  const int lane = fnf_emu::lane_id(), base = lane & ~(width - 1);
  const int src = (lane - base) + int(delta) < width ? lane + int(delta) : lane;
  return fnf_emu::from_slot<T>(fnf_emu::exchange("__shfl_down_sync", mask, fnf_emu::to_slot(var), src));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  fnf_emu::check_width(width);
  const int lane = fnf_emu::lane_id(), base = lane & ~(width - 1);
  const int src = (lane - base) >= int(delta) ? lane - int(delta) : lane;
  return fnf_emu::from_slot<T>(fnf_emu::exchange("__shfl_up_sync", mask, fnf_emu::to_slot(var), src));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  fnf_emu::check_width(width);
  const int lane = fnf_emu::lane_id(), base = lane & ~(width - 1);
  const int src = ((lane ^ lane_mask) - base) < width && (lane ^ lane_mask) >= base ? (lane ^ lane_mask) : lane;
  return fnf_emu::from_slot<T>(fnf_emu::exchange("__shfl_xor_sync", mask, fnf_emu::to_slot(var), src));
}
template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  fnf_emu::check_width(width);
  const int lane = fnf_emu::lane_id(), base = lane & ~(width - 1);
  const int src = base + (((src_lane % width) + width) % width);
  return fnf_emu::from_slot<T>(fnf_emu::exchange("__shfl_sync", mask, fnf_emu::to_slot(var), src));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  const int lanes = fnf_emu::block->warps[size_t(fnf_emu::block->current / 32)].lanes;
  const unsigned long long* slots = fnf_emu::exchange_all("__ballot_sync", mask, predicate != 0);
  unsigned bits = 0;
  for (int src = 0; src < lanes; ++src) bits |= unsigned(slots[src] != 0) << src;
  return bits;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
  const int lanes = fnf_emu::block->warps[size_t(fnf_emu::block->current / 32)].lanes;
  const unsigned all = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  return __ballot_sync(mask, predicate) == all;
}

// ---- launch -----------------------------------------------------------------------------------------------
namespace fnf_emu {

inline int policy_for(unsigned long long block_index) {
  static const char* s = std::getenv("FNF_EMU_SCHEDULE");
  if (s && std::strcmp(s, "low") == 0) return 0;
  if (s && std::strcmp(s, "high") == 0) return 1;
  if (s && std::strcmp(s, "random") == 0) return 2;
  return int(block_index % 3);
}

inline void on_timeout(int) {
  char at[256];
  where(at, sizeof at);
  char msg[400];
  const int n = std::snprintf(msg, sizeof msg, "fnf_emu: error: timeout (FNF_EMU_TIMEOUT) in %s: a barrier or "
                              "loop that never finishes\n", at);
  if (n > 0) (void)!write(2, msg, size_t(n));
  _exit(124);
}

inline bool config_ok(const char* name, dim3 grid, dim3 blk, size_t smem) {
  const unsigned long long threads = 1ull * blk.x * blk.y * blk.z;
  const char* why = nullptr;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) why = "empty grid";
  else if (grid.x > 2147483647u) why = "grid x above 2^31 - 1";
  else if (grid.y > 65535u || grid.z > 65535u) why = "grid y or z above 65535";
  else if (threads == 0) why = "empty block";
  else if (threads > 1024 || blk.x > 1024 || blk.y > 1024) why = "block above 1024 threads";
  else if (blk.z > 64) why = "block z above 64";
  else if (smem > 48 * 1024) why = "dynamic shared memory above 48 KiB";
  if (why == nullptr) return true;
  std::fprintf(stderr, "fnf_emu: launch of %s refused (%s): grid (%u,%u,%u), block (%u,%u,%u), smem %zu\n", name,
               why, grid.x, grid.y, grid.z, blk.x, blk.y, blk.z, smem);
  return false;
}

// Out of line: getcontext returns twice, which would make the caller's locals "clobbered".
__attribute__((noinline)) inline void init_fiber(Fiber& f, char* stack) {
  f.stack = stack;
  f.exchanges = 0;
#ifdef FNF_EMU_FAST_SWITCH
  // The first switch to the fiber pops six zero registers and "returns" into fiber_main, entered as if
  // called (rsp % 16 == 8) with a null return address above it.
  void** top = reinterpret_cast<void**>((reinterpret_cast<uintptr_t>(stack) + kStackBytes) & ~uintptr_t(15));
  top[-1] = nullptr;
  top[-2] = reinterpret_cast<void*>(&fiber_main);
  for (int k = 3; k <= 8; ++k) top[-k] = nullptr;
  f.sp = top - 8;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = &scheduler_ctx;
  makecontext(&f.ctx, fiber_main, 0);
#endif
}

template <typename F, typename... Args>
void run_grid(const char* name, F kernel, dim3 grid, dim3 blk, std::tuple<Args...> args) {
  const int threads = int(blk.x * blk.y * blk.z);
  if (std::getenv("FNF_EMU_TRACE")) {
    std::fprintf(stderr, "fnf_emu: launch %s grid (%u,%u,%u) block (%u,%u,%u)\n", name, grid.x, grid.y, grid.z, blk.x,
                 blk.y, blk.z);
  }
  static thread_local std::tuple<Args...>* current_args = nullptr;
  static thread_local F current_kernel;
  current_args = &args;
  current_kernel = kernel;
  fiber_entry = [] {
    std::tuple<Args...> copy = *current_args;  // kernel parameters are per-thread copies
    std::apply(current_kernel, copy);
  };
  const char* timeout = std::getenv("FNF_EMU_TIMEOUT");
  signal(SIGALRM, on_timeout);
  alarm(unsigned(timeout ? std::atoi(timeout) : 120));
  Block b;
  b.kernel = name;
  b.threads = threads;
  b.fibers.resize(size_t(threads));
  b.warps.resize(size_t((threads + 31) / 32));
  for (size_t w = 0; w < b.warps.size(); ++w) b.warps[w].lanes = threads - int(w) * 32 < 32 ? threads - int(w) * 32 : 32;
  block = &b;
  gridDim = grid;
  blockDim = blk;
  unsigned long long index = 0;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx, ++index) {
        blockIdx = uint3{bx, by, bz};
        b.policy = policy_for(index);
        b.rng = 0x5eedull * (launches + 1) + index;
        b.done = 0;
        b.block_arrived = 0;
        for (Warp& w : b.warps) w.arrived = w.exited = 0;
        for (int t = 0; t < threads; ++t) {
          Fiber& f = b.fibers[size_t(t)];
          b.set_state(t, Fiber::Ready);
          f.tid = uint3{unsigned(t) % blk.x, (unsigned(t) / blk.x) % blk.y, unsigned(t) / (blk.x * blk.y)};
          init_fiber(f, get_stack(size_t(t)));
        }
        while (b.done < threads) {  // fibers switch among themselves; back here when none is ready
          const int i = pick_ready();
          if (i < 0) report_deadlock();
          switch_context(-1, i);
        }
      }
    }
  }
  alarm(0);
  block = nullptr;
  threadIdx = uint3{0, 0, 0};
  ++launches;
}

template <typename F>
struct Launch {
  const char* name;
  F kernel;
  dim3 grid, blk;
  size_t smem;
  template <typename... Args>
  void operator()(Args&&... args) const {
    if (!config_ok(name, grid, blk, smem)) {
      last_error = cudaErrorInvalidConfiguration;
      return;
    }
    run_grid(name, kernel, grid, blk, std::make_tuple(std::forward<Args>(args)...));
  }
};

template <typename F>
Launch<F> launch(F kernel, dim3 grid, dim3 blk, size_t smem, cudaStream_t, const char* name) {
  return Launch<F>{name, kernel, grid, blk, smem};
}

}  // namespace fnf_emu

#define FNF_EMU_LAUNCH(kernel, grid, block, smem, stream) \
  ::fnf_emu::launch(kernel, dim3(grid), dim3(block), size_t(smem), stream, #kernel)
