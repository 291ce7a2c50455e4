// The Python module znorm_kernels._C and the ops' schemas. Importing the module loads the shared library,
// whose static initializers register the schemas here and the kernels in cpu_znorm.cpp and cpu_optim.cpp (CPU)
// and, in a CUDA build, cuda_znorm.cu and cuda_optim.cu (CUDA; cuda_table_cache.cpp adds table_cache_stats);
// grad_watch.cpp adds the custom class torch.classes.znorm_kernels_C.GradWatch (the hook's steady step), and
// step_counters.cpp the ops that read and advance Adam's step counters.
// Python calls the op as torch.ops.znorm_kernels_C.znorm_; the module itself exports nothing, so it needs no
// pybind11 and builds against the limited Python API.
#include <Python.h>
#include <torch/library.h>

#include "znorm.h"

TORCH_LIBRARY(znorm_kernels_C, m) {
  // Tensor(a!)[]: the list is mutated in place, so functionalization and torch.compile treat the op as an
  // opaque in-place op (its fake implementation is registered from Python, by the native backend).
  m.def(znorm::kSchema);
  // The fused optimizer steps: CPU kernels (cpu_optim.cpp) and, in a CUDA build, CUDA kernels (cuda_optim.cu).
  m.def(znorm::kSgdSchema);
  m.def(znorm::kAdamSchema);
}

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "ZNorm native kernels; the op is torch.ops.znorm_kernels_C.znorm_",
      -1,    // no per-module state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
