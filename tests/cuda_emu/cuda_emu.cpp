// The emulator's scheduler: each thread block runs on the calling OS thread, each CUDA thread of it
// a fiber that runs until it reaches a barrier or returns. A barrier opens when every
// thread it waits for has reached it: __syncthreads every live thread of the block, a warp
// barrier the 32 lanes of one warp. When no thread can run and no barrier can open, the kernel has
// a divergent barrier and the launch fails with a description instead of hanging.
#include "cuda_emu.h"

#include <sys/mman.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#include <exception>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

#if !defined(__x86_64__)
#error "cuda_emu switches fibers with x86-64 assembly"
#endif

// cuda_emu_switch_fiber(&from_sp, to_sp): saves the callee-saved registers on the current stack, stores the
// stack pointer in *from_sp and resumes the fiber whose stack pointer is to_sp. A few nanoseconds,
// where swapcontext's signal-mask system calls took most of a microsecond: kernels with a block
// reduction per tap switch tens of millions of times.
extern "C" void cuda_emu_switch_fiber(void** from_sp, void* to_sp);
extern "C" __attribute__((visibility("hidden"))) void cuda_emu_fiber_main();  // called directly from asm
asm(R"(
  .text
  .globl cuda_emu_switch_fiber
  .hidden cuda_emu_switch_fiber
  .type cuda_emu_switch_fiber, @function
cuda_emu_switch_fiber:
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
  .size cuda_emu_switch_fiber, .-cuda_emu_switch_fiber

  .globl cuda_emu_fiber_start
  .hidden cuda_emu_fiber_start
  .type cuda_emu_fiber_start, @function
cuda_emu_fiber_start:  # the bottom frame of every fiber: unwinders stop here
  .cfi_startproc
  .cfi_undefined rip
  call cuda_emu_fiber_main
  ud2
  .cfi_endproc
  .size cuda_emu_fiber_start, .-cuda_emu_fiber_start
)");
extern "C" void cuda_emu_fiber_start();

namespace cuda_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;  // c10::Error's backtrace needs more than a kernel does
constexpr size_t kMaxThreads = 1024, kMaxDynamicSmem = 227 * 1024;  // sm_90 limits

enum class State { Runnable, AtBlockBarrier, AtWarpBarrier, Done };

struct Fiber {
  void* sp;
  State state;
};

struct Scheduler {
  std::vector<Fiber> fibers;
  std::vector<uint64_t> slots;  // shuffle exchange, one per thread
  unsigned char* stacks = nullptr;
  void* main_sp = nullptr;
  const void* main_stack_bottom = nullptr;  // for AddressSanitizer
  size_t main_stack_size = 0;
  unsigned int current = 0;
  Body body = nullptr;
  void* arg = nullptr;
  std::exception_ptr error;
  uint64_t blocks_run = 0;
  alignas(16) unsigned char smem[kMaxDynamicSmem];

  Scheduler() {
    void* p = mmap(nullptr, kStackBytes * kMaxThreads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot map fiber stacks");
    stacks = static_cast<unsigned char*>(p);
    fibers.resize(kMaxThreads);
    slots.resize(kMaxThreads);
  }
};

Scheduler& sched() {
  static Scheduler* s = new Scheduler();  // never freed: fibers may still reference it at exit
  return *s;
}

// cuda_emu_switch_fiber, announced to AddressSanitizer when it is on (else it takes the other stack's
// frames for overflows). `leaving_for_good`: the current fiber never resumes.
void switch_stack(void** from_sp, void* to_sp, const void* to_bottom, size_t to_size, bool leaving_for_good = false) {
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(leaving_for_good ? nullptr : &fake_stack, to_bottom, to_size);
#endif
  cuda_emu_switch_fiber(from_sp, to_sp);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
}

void wait_at(State barrier) {
  Scheduler& s = sched();
  s.fibers[s.current].state = barrier;
  switch_stack(&s.fibers[s.current].sp, s.main_sp, s.main_stack_bottom, s.main_stack_size);
}

// A fresh fiber's stack: the registers cuda_emu_switch_fiber pops, then its return address, the
// start routine, at a 16-byte aligned top so that the start routine's call sees the ABI's alignment.
void* fresh_stack(unsigned char* base) {
#if defined(__SANITIZE_ADDRESS__)
  ASAN_UNPOISON_MEMORY_REGION(base, kStackBytes);  // the frames of the fiber that used it last
#endif
  void** sp = reinterpret_cast<void**>((reinterpret_cast<uintptr_t>(base) + kStackBytes) & ~uintptr_t(15));
  *--sp = reinterpret_cast<void*>(&cuda_emu_fiber_start);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp, rbx, r12-r15
  return sp;
}

void set_thread_index(unsigned int t) {
  threadIdx.x = t % blockDim.x;
  threadIdx.y = (t / blockDim.x) % blockDim.y;
  threadIdx.z = t / (blockDim.x * blockDim.y);
}

std::string describe(const std::vector<Fiber>& f, unsigned int n) {
  unsigned int counts[4] = {0, 0, 0, 0};
  for (unsigned int t = 0; t < n; ++t) counts[static_cast<int>(f[t].state)]++;
  std::ostringstream os;
  os << counts[1] << " threads at __syncthreads, " << counts[2] << " at a warp shuffle, " << counts[3]
     << " returned (block " << blockIdx.x << "," << blockIdx.y << "," << blockIdx.z << " of a " << blockDim.x << "x"
     << blockDim.y << "x" << blockDim.z << " block)";
  return os.str();
}

// Opens every barrier whose threads have all arrived; false when none can open.
bool open_barriers(Scheduler& s, unsigned int n) {
  bool opened = false;
  for (unsigned int w = 0; w < n; w += 32) {
    const unsigned int end = std::min(n, w + 32);
    unsigned int waiting = 0, done = 0;
    for (unsigned int t = w; t < end; ++t) {
      waiting += s.fibers[t].state == State::AtWarpBarrier;
      done += s.fibers[t].state == State::Done;
    }
    if (waiting == 0) continue;
    if (done > 0 || end - w < 32)
      throw std::runtime_error("cuda_emu: full-warp shuffle in a warp with returned or missing lanes: " + describe(s.fibers, n));
    if (waiting == end - w) {
      for (unsigned int t = w; t < end; ++t) s.fibers[t].state = State::Runnable;
      opened = true;
    }
  }
  if (opened) return true;
  bool all_at_block_barrier = true, any = false;
  for (unsigned int t = 0; t < n; ++t) {
    if (s.fibers[t].state == State::Done) continue;
    any = true;
    all_at_block_barrier &= s.fibers[t].state == State::AtBlockBarrier;
  }
  if (!any || !all_at_block_barrier) return false;
  for (unsigned int t = 0; t < n; ++t)
    if (s.fibers[t].state == State::AtBlockBarrier) s.fibers[t].state = State::Runnable;
  return true;
}

void run_block(Scheduler& s, unsigned int n, size_t dynamic_smem, bool descending) {
  std::memset(s.smem, 0xff, dynamic_smem);  // NaN in every float type: reads before writes show
  for (unsigned int t = 0; t < n; ++t) {
    s.fibers[t].sp = fresh_stack(s.stacks + t * kStackBytes);
    s.fibers[t].state = State::Runnable;
  }
  for (;;) {
    for (unsigned int k = 0; k < n; ++k) {
      const unsigned int t = descending ? n - 1 - k : k;
      if (s.fibers[t].state != State::Runnable) continue;
      s.current = t;
      set_thread_index(t);
      switch_stack(&s.main_sp, s.fibers[t].sp, s.stacks + t * kStackBytes, kStackBytes);
    }
    bool all_done = true;
    for (unsigned int t = 0; t < n; ++t) all_done &= s.fibers[t].state == State::Done;
    if (all_done) return;
    if (!open_barriers(s, n))
      throw std::runtime_error("cuda_emu: deadlock, a barrier that not every thread reaches: " + describe(s.fibers, n));
  }
}

void check_config(dim3 grid, dim3 block, size_t dynamic_smem) {
  std::ostringstream os;
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) os << "empty grid";
  else if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) os << "grid too large";
  else if (threads == 0 || threads > kMaxThreads || block.x > 1024 || block.y > 1024 || block.z > 64) os << "bad block size";
  else if (dynamic_smem > 48 * 1024) os << "dynamic shared memory over 48 KiB needs cudaFuncSetAttribute";
  else return;
  os << ": grid " << grid.x << "x" << grid.y << "x" << grid.z << ", block " << block.x << "x" << block.y << "x"
     << block.z << ", " << dynamic_smem << " bytes of dynamic shared memory";
  throw std::runtime_error("cuda_emu: invalid launch configuration (" + os.str() + ")");
}

}  // namespace

void run_grid(dim3 grid, dim3 block, size_t dynamic_smem, Body body, void* arg) {
  check_config(grid, block, dynamic_smem);
  static std::mutex one_grid_at_a_time;  // threadIdx & co. and the fibers are process-wide
  const std::lock_guard<std::mutex> lock(one_grid_at_a_time);
  Scheduler& s = sched();
  s.body = body;
  s.arg = arg;
  s.error = nullptr;
  gridDim = grid;
  blockDim = block;
  const unsigned int n = block.x * block.y * block.z;
  for (unsigned int z = 0; z < grid.z; ++z)
    for (unsigned int y = 0; y < grid.y; ++y)
      for (unsigned int x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        run_block(s, n, dynamic_smem, (s.blocks_run++ & 1) != 0);
        if (s.error) std::rethrow_exception(s.error);
      }
}

unsigned char* dynamic_shared() { return sched().smem; }

void sync_block() { wait_at(State::AtBlockBarrier); }

void sync_warp() { wait_at(State::AtWarpBarrier); }

unsigned int linear_thread() { return sched().current; }

void* warp_slot(unsigned int t) { return &sched().slots[t]; }

}  // namespace cuda_emu

// Runs the current thread's body, then returns to the scheduler for good.
extern "C" void cuda_emu_fiber_main() {
  cuda_emu::Scheduler& s = cuda_emu::sched();
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &s.main_stack_bottom, &s.main_stack_size);
#endif
  try {
    s.body(s.arg);
  } catch (...) {
    if (!s.error) s.error = std::current_exception();
  }
  s.fibers[s.current].state = cuda_emu::State::Done;
  void* unused;
  cuda_emu::switch_stack(&unused, s.main_sp, s.main_stack_bottom, s.main_stack_size, true);
  __builtin_unreachable();
}
