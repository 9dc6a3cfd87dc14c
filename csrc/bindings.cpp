// Python bindings of the ptuning_fast extension (module ptuning_fast._C), and the kernels of the
// dispatcher operators ptuning_fast::* (their schemas and fake implementations are defined in
// ptuning_fast/ops/mask.py, so that they exist without the extension). Kernels registered here are
// called by the dispatcher directly: no Python frame per call (torch.compile's graphs call them).
// One bindings file; each op lives in its own <op>.cpp (CPU) and <op>_cuda.cu (CUDA) pair.
#include <torch/extension.h>
#include <torch/library.h>

#include "prompt_mask.h"

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
  m.def("prompt_attention_mask", &ptuning_fast::prompt_attention_mask,
        "4D prompt-aware attention mask (B, 1, S, P + K), bool or additive",
        py::arg("attention_mask"), py::arg("prompt_lengths"), py::arg("num_prompt_columns"),
        py::arg("past_length"), py::arg("causal"), py::arg("sliding_window"), py::arg("out_dtype"));
  m.def("prompt_position_ids", &ptuning_fast::prompt_position_ids,
        "Position ids (B, S) of the query tokens after a prompt, left-padding aware",
        py::arg("attention_mask"), py::arg("prompt_lengths"), py::arg("num_prompt_columns"),
        py::arg("past_length"), py::arg("after_prompt"));
  m.def("packed_prompt_layout", &ptuning_fast::packed_prompt_layout,
        "Packed layout of a batch: (layout_mask, text_columns, prompt_index, position_ids), int64",
        py::arg("attention_mask"), py::arg("prompt_lengths"), py::arg("longest"),
        py::arg("cache_prompt_lengths"), py::arg("cache_prompt_length"), py::arg("pad_left"),
        py::arg("restart"));
}

// One kernel per device: the entry points check their arguments and dispatch by device themselves.
#define PTUNING_FAST_REGISTER_KERNELS(m)                                     \
  m.impl("prompt_attention_mask", &ptuning_fast::prompt_attention_mask);     \
  m.impl("prompt_position_ids", &ptuning_fast::prompt_position_ids);         \
  m.impl("packed_prompt_layout", &ptuning_fast::packed_prompt_layout)

TORCH_LIBRARY_IMPL(ptuning_fast, CPU, m) { PTUNING_FAST_REGISTER_KERNELS(m); }
#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(ptuning_fast, CUDA, m) { PTUNING_FAST_REGISTER_KERNELS(m); }
#endif
