// Python bindings of the ptuning_fast extension (module ptuning_fast._C).
// One bindings file; each op lives in its own <op>.cpp (CPU) and <op>_cuda.cu (CUDA) pair.
#include <torch/extension.h>

namespace ptuning_fast {
bool with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace ptuning_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ptuning_fast C++/CUDA kernels";
  m.def("with_cuda", &ptuning_fast::with_cuda, "True when the CUDA kernels were compiled in");
}
