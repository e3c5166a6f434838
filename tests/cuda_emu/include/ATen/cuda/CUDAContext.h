// cuda_emu stand-in for ATen's CUDA context: the current stream and device properties (an H100's).
#pragma once

#include <ATen/ATen.h>

typedef struct CUstream_st* cudaStream_t;

struct cudaDeviceProp {
  int multiProcessorCount = 132;
  int maxThreadsPerBlock = 1024;
  int warpSize = 32;
  size_t sharedMemPerBlock = 48 * 1024;
};

namespace at {
namespace cuda {

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }

inline cudaDeviceProp* getCurrentDeviceProperties() {
  static cudaDeviceProp prop;
  return &prop;
}

}  // namespace cuda
}  // namespace at
