// A CUDA emulator for fastblocks' kernels: enough of the CUDA programming model to run the kernels
// of csrc/*/*.cu on the CPU, one thread block at a time, every CUDA thread a fiber. Force-included
// (g++ -include) into the .cu sources after tests/cuda_emu/build.py has rewritten their launches
// (kernel<<<grid, block, smem, stream>>>(args) -> cuda_emu::launch(...)) and their dynamic shared
// memory declarations.
//
// What it checks beyond the results: the launch configuration (no empty grid, block and grid limits,
// shared memory size), __syncthreads reached by every live thread of the block and a full-warp
// shuffle by all 32 lanes (a divergent barrier is reported as a deadlock, not hung), and ordering
// bugs between barriers: threads run in ascending order in some blocks and descending in others, so
// a read of shared memory that another thread writes without a barrier in between gives a wrong
// result in one of the two. Dynamic shared memory starts as NaN bytes in every block.
// What it does not model: timing, the weak memory model, warp-synchronous code without __syncwarp.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned int x, y, z;
};

extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one block runs at a time, and every fiber of it sees the same static

namespace cuda_emu {

using Body = void (*)(void*);
// Runs body(arg) as every thread of every block of the grid; throws std::runtime_error on a bad
// configuration, a deadlock at a barrier or an exception inside a thread.
void run_grid(dim3 grid, dim3 block, size_t dynamic_smem, Body body, void* arg);
unsigned char* dynamic_shared();
void sync_block();  // __syncthreads
void sync_warp();   // all 32 lanes of the calling thread's warp (full-mask shuffles)
unsigned int linear_thread();
void* warp_slot(unsigned int linear_thread);  // 8 bytes per thread for shuffles

template <typename F, typename Stream = int>
void launch(F&& kernel_call, dim3 grid, dim3 block, size_t dynamic_smem = 0, const Stream& = Stream()) {
  using Fn = std::remove_reference_t<F>;
  run_grid(grid, block, dynamic_smem, [](void* f) { (*static_cast<Fn*>(f))(); }, &kernel_call);
}

}  // namespace cuda_emu

inline void __syncthreads() { cuda_emu::sync_block(); }

template <typename T>
T __shfl_xor_sync(unsigned int mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "cuda_emu: shuffle of an 8-byte value at most");
  if (mask != 0xffffffffu || width != 32) throw std::logic_error("cuda_emu: only full-warp shuffles are emulated");
  const unsigned int me = cuda_emu::linear_thread();
  std::memcpy(cuda_emu::warp_slot(me), &v, sizeof(T));
  cuda_emu::sync_warp();
  T r;
  std::memcpy(&r, cuda_emu::warp_slot((me & ~31u) | ((me & 31u) ^ static_cast<unsigned int>(lane_mask & 31))), sizeof(T));
  cuda_emu::sync_warp();  // nobody overwrites a slot before every lane has read it
  return r;
}

// Blocks run one at a time on one OS thread, so read-modify-write is atomic.
template <typename T>
T atomicAdd(T* address, T v) {
  const T old = *address;
  *address = old + v;
  return old;
}

// CUDA's global integer/float min and max overloads.
#define CUDA_EMU_MINMAX(T)                                   \
  inline T min(T a, T b) { return a < b ? a : b; }          \
  inline T max(T a, T b) { return a < b ? b : a; }
CUDA_EMU_MINMAX(int)
CUDA_EMU_MINMAX(unsigned int)
CUDA_EMU_MINMAX(long)
CUDA_EMU_MINMAX(unsigned long)
CUDA_EMU_MINMAX(long long)
CUDA_EMU_MINMAX(unsigned long long)
CUDA_EMU_MINMAX(float)
CUDA_EMU_MINMAX(double)
#undef CUDA_EMU_MINMAX
