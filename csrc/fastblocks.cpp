// The Python module fastblocks._C. The kernels register themselves with the dispatcher as
// torch.ops.fastblocks_ext.* (one TORCH_LIBRARY_FRAGMENT per op directory); this file only
// records how the extension was built, so that fastblocks._ext can detect a stale build (and the
// benchmarks can report the C++ kernels' vector width).
#include <Python.h>

#include "cpu_simd.h"  // FB_SIMD_BYTES

#ifndef FASTBLOCKS_TORCH_VERSION
#define FASTBLOCKS_TORCH_VERSION "unknown"
#endif

#ifdef FASTBLOCKS_WITH_CUDA
static const int kWithCuda = 1;
#else
static const int kWithCuda = 0;
#endif

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastblocks compiled kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "torch_version", FASTBLOCKS_TORCH_VERSION);
  PyModule_AddIntConstant(m, "with_cuda", kWithCuda);
  PyModule_AddIntConstant(m, "simd_bytes", FB_SIMD_BYTES);
  return m;
}
