// Prompt-aware attention mask and position ids (see ptuning_fast/reference/mask.py for the
// definition in PyTorch). The key axis is [P prompt columns][K text columns]; row b's prompt is
// the LAST n_b of the P prompt columns, the first P - n_b are hidden. The text mask (B, K) covers
// the past_length text tokens already in the cache and the S = K - past_length query tokens.
#pragma once

#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace ptuning_fast {

// Entry points bound to Python: check the arguments, then run the CPU or CUDA kernel.
//   attention_mask  (B, K) bool, any strides (nonzero = real token; other dtypes are compared != 0)
//   prompt_lengths  (B,) int64 n_b in [0, P], or none: every row has P prompt tokens
//   sliding_window  <= 0: none
//   out_dtype       kBool (True = attend) or a floating type (0 = attend, lowest() = hidden)
// Returns (B, 1, K - past_length, P + K).
at::Tensor prompt_attention_mask(const at::Tensor& attention_mask,
                                 const std::optional<at::Tensor>& prompt_lengths,
                                 int64_t num_prompt_columns, int64_t past_length, bool causal,
                                 int64_t sliding_window, at::ScalarType out_dtype);

// Position ids (B, K - past_length) int64 of the query tokens: the count of real text tokens up to
// and including the token, minus one, plus n_b when after_prompt; padding tokens get 0.
at::Tensor prompt_position_ids(const at::Tensor& attention_mask,
                               const std::optional<at::Tensor>& prompt_lengths,
                               int64_t num_prompt_columns, int64_t past_length, bool after_prompt);

// The packed layout of a batch of P-tuning rows (reference: packed_prompt_layout_reference in
// ptuning_fast/reference/mask.py). Row b's n_b virtual tokens and its real text tokens fill one
// block of live columns of the W = K + longest layout columns (the right end when pad_left, else
// from column 0); its padding fills the other columns in order.
//   attention_mask        (B, K) of any dtype and strides, read as it is: nonzero = real token
//   prompt_lengths        (B,) int64 n_b in [0, longest], or none: every row has `longest`
//   cache_prompt_lengths  (B,) int64 deep-prompt tokens already cached, or none: `cache_prompt_length`
//   restart               positions of the prompt and of the text each from 0 (else counted on
//                         after the cached prefix)
// Returns int64 (layout_mask (B, W), text_columns (B, K), prompt_index (B, W), position_ids (B, W)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> packed_prompt_layout(
    const at::Tensor& attention_mask, const std::optional<at::Tensor>& prompt_lengths, int64_t longest,
    const std::optional<at::Tensor>& cache_prompt_lengths, int64_t cache_prompt_length, bool pad_left,
    bool restart);

// Kernels on already-checked arguments: mask is (B, K) of any dtype on CPU, bool on CUDA (the
// packed layout's CUDA kernel: any dtype); lengths is (B,) int64 or undefined.
void prompt_attention_mask_cpu(const at::Tensor& mask, const at::Tensor& lengths, int64_t P,
                               int64_t past_length, bool causal, int64_t sliding_window,
                               at::Tensor& out);
void prompt_position_ids_cpu(const at::Tensor& mask, const at::Tensor& lengths, int64_t P,
                             int64_t past_length, bool after_prompt, at::Tensor& out);
// Outputs of packed_prompt_layout, written by its kernels.
struct PackedLayout {
  at::Tensor layout_mask, text_columns, prompt_index, position_ids;
};
void packed_prompt_layout_cpu(const at::Tensor& mask, const at::Tensor& lengths, int64_t longest,
                              const at::Tensor& cache_lengths, int64_t cache_length, bool pad_left,
                              bool restart, PackedLayout& out);
#ifdef WITH_CUDA
void prompt_attention_mask_cuda(const at::Tensor& mask, const at::Tensor& lengths, int64_t P,
                                int64_t past_length, bool causal, int64_t sliding_window,
                                at::Tensor& out);
void prompt_position_ids_cuda(const at::Tensor& mask, const at::Tensor& lengths, int64_t P,
                              int64_t past_length, bool after_prompt, at::Tensor& out);
void packed_prompt_layout_cuda(const at::Tensor& mask, const at::Tensor& lengths, int64_t longest,
                               const at::Tensor& cache_lengths, int64_t cache_length, bool pad_left,
                               bool restart, PackedLayout& out);
#endif

}  // namespace ptuning_fast
