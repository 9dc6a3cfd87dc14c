// Prompt-aware attention mask and position ids, and the packed layout of a batch: argument
// checks, dispatch by device, CPU kernels.
//
// Output row (b, i) of the mask is the query at absolute key index q = P + past_length + i.
// It sees key column j when j lies in the row's window [lo, hi] (causality and sliding window,
// both contiguous ranges) and column j is live for row b (a prompt column among the last n_b,
// or a real text token). So one row is: hidden up to lo, a copy of the live row in [lo, hi],
// hidden after hi. The CPU kernel builds each batch row's live vector once, then writes every
// query row with memset/memcpy (bool) or a select loop (additive).
#include "prompt_mask.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace ptuning_fast {
namespace {

// Range of key columns [lo, hi] that query q may see, before padding; lo > hi when none.
inline void visible_range(int64_t q, int64_t width, bool causal, int64_t window, int64_t& lo,
                          int64_t& hi) {
  if (causal) {
    hi = q;
    lo = window > 0 ? std::max<int64_t>(0, q - window + 1) : 0;  // kv > q - window
  } else if (window > 0) {
    lo = std::max<int64_t>(0, q - window);  // |q - kv| <= window
    hi = std::min<int64_t>(width - 1, q + window);
  } else {
    lo = 0;
    hi = width - 1;
  }
  hi = std::min<int64_t>(hi, width - 1);
}

// Rows of `width` elements per parallel task: small outputs stay on the calling thread, where
// waking the pool would cost more than the work.
inline int64_t rows_per_task(int64_t width) {
  return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(width, 1));
}

// Calls row_fn(b, real) for every row b of the (B, K) mask, rows split over threads in tasks of
// `grain`, where real(t) says whether token t of the row is real (nonzero): the mask is read in
// its own dtype and strides, with no conversion op first.
template <typename RowFn>
void for_each_mask_row(const at::Tensor& mask, int64_t grain, const RowFn& row_fn) {
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, mask.scalar_type(),
                             "attention_mask", [&] {
    const scalar_t* data = mask.data_ptr<scalar_t>();
    const int64_t s0 = mask.stride(0), s1 = mask.stride(1);
    at::parallel_for(0, mask.size(0), grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* row = data + b * s0;
        row_fn(b, [row, s1](int64_t t) { return row[t * s1] != scalar_t(0); });
      }
    });
  });
}

inline int64_t prompt_length(const int64_t* lengths, int64_t b, int64_t P) {
  // Clamped so that a bad length can never move a column out of [0, P]; Python checks the range.
  return lengths == nullptr ? P : std::min<int64_t>(std::max<int64_t>(lengths[b], 0), P);
}

// The mask as a builder's kernel reads it: the CPU kernels read any dtype (nonzero = real, no
// conversion op), the CUDA kernels read bool.
at::Tensor mask_for_kernel(const at::Tensor& attention_mask) {
  return attention_mask.is_cpu() || attention_mask.scalar_type() == at::kBool ? attention_mask
                                                                                : attention_mask.ne(0);
}

void check_lengths(const std::optional<at::Tensor>& lengths, const at::Tensor& attention_mask,
                   const char* name) {
  if (!lengths.has_value()) return;
  TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == attention_mask.size(0), name,
              " must have shape (batch,) = (", attention_mask.size(0), ",)");
  TORCH_CHECK(lengths->scalar_type() == at::kLong, name, " must be int64");
  TORCH_CHECK(lengths->device() == attention_mask.device(), name,
              " must be on the device of attention_mask");
}

void check_common(const at::Tensor& attention_mask, const std::optional<at::Tensor>& prompt_lengths,
                  int64_t num_prompt_columns, int64_t past_length) {
  TORCH_CHECK(attention_mask.dim() == 2, "attention_mask must be 2D (batch, text_length), got ",
              attention_mask.dim(), "D");
  TORCH_CHECK(num_prompt_columns >= 0, "num_prompt_columns must be >= 0, got ", num_prompt_columns);
  TORCH_CHECK(past_length >= 0 && past_length <= attention_mask.size(1),
              "past_length must be in [0, text_length=", attention_mask.size(1), "], got ",
              past_length);
  check_lengths(prompt_lengths, attention_mask, "prompt_lengths");
}

at::Tensor lengths_or_undefined(const std::optional<at::Tensor>& prompt_lengths) {
  return prompt_lengths.has_value() ? prompt_lengths->contiguous() : at::Tensor();
}

// A builder's CUDA kernel, or nullptr in a build without CUDA (its declaration is CUDA-only).
#ifdef WITH_CUDA
#define CUDA_KERNEL(name) (&name)
#else
#define CUDA_KERNEL(name) nullptr
#endif

// Runs a builder's kernel for the device of `mask`: the device checks of every builder in one
// place (a CUDA mask needs the CUDA build; any other device is refused). `cuda` takes the type of
// `cpu` without deducing it, so that it may be nullptr.
template <typename Kernel, typename... Args>
void run_on_mask_device(const at::Tensor& mask, Kernel* cpu, std::enable_if_t<true, Kernel>* cuda,
                        Args&&... args) {
  if (mask.is_cuda()) {
    TORCH_CHECK(cuda != nullptr, "ptuning_fast._C was built without CUDA; rebuild it with nvcc present");
    cuda(std::forward<Args>(args)...);
  } else {
    TORCH_CHECK(mask.device().is_cpu(), "attention_mask must be on CPU or CUDA, got ", mask.device());
    cpu(std::forward<Args>(args)...);
  }
}

template <size_t N> struct UnsignedOfSize;
template <> struct UnsignedOfSize<1> { using type = uint8_t; };
template <> struct UnsignedOfSize<2> { using type = uint16_t; };
template <> struct UnsignedOfSize<4> { using type = uint32_t; };
template <> struct UnsignedOfSize<8> { using type = uint64_t; };

template <typename bits_t, typename scalar_t>
bits_t bits_of(scalar_t value) {
  static_assert(sizeof(bits_t) == sizeof(scalar_t), "same width");
  bits_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// Every output row: hidden before lo, live ? attend : hidden in [lo, hi], hidden after hi.
template <typename bits_t>
void write_mask_rows(const uint8_t* live, int64_t B, int64_t S, int64_t W, int64_t P,
                     int64_t past_length, bool causal, int64_t sliding_window, bits_t attend,
                     bits_t hidden, bits_t* out) {
  // A plain copy of the live row when the output is bool (one byte, 1 = attend, 0 = hidden).
  const bool copy_live = sizeof(bits_t) == 1 && attend == 1 && hidden == 0;
  at::parallel_for(0, B * S, rows_per_task(W), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / S, i = r - b * S;
      int64_t lo, hi;
      visible_range(P + past_length + i, W, causal, sliding_window, lo, hi);
      lo = std::min(lo, W);
      hi = std::max(hi, lo - 1);  // an empty range is lo .. lo - 1
      bits_t* row = out + r * W;
      const uint8_t* live_row = live + b * W;
      std::fill(row, row + lo, hidden);
      if (copy_live) {
        std::memcpy(row + lo, live_row + lo, hi + 1 - lo);
      } else {
        for (int64_t j = lo; j <= hi; ++j) row[j] = live_row[j] ? attend : hidden;
      }
      std::fill(row + hi + 1, row + W, hidden);
    }
  });
}

}  // namespace

void prompt_attention_mask_cpu(const at::Tensor& mask, const at::Tensor& lengths, int64_t P,
                               int64_t past_length, bool causal, int64_t sliding_window,
                               at::Tensor& out) {
  const int64_t B = mask.size(0), K = mask.size(1), S = K - past_length, W = P + K;
  if (out.numel() == 0) return;
  const int64_t* len_data = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;

  // live[b, j]: column j can be seen by row b at all (a live prompt column or a real token).
  std::vector<uint8_t> live(static_cast<size_t>(B * W));
  for_each_mask_row(mask, rows_per_task(W), [&](int64_t b, auto real) {
    uint8_t* row = live.data() + b * W;
    const int64_t first_prompt = P - prompt_length(len_data, b, P);
    for (int64_t j = 0; j < P; ++j) row[j] = j >= first_prompt;
    for (int64_t t = 0; t < K; ++t) row[P + t] = real(t);
  });

  AT_DISPATCH_FLOATING_TYPES_AND3(
      at::kHalf, at::kBFloat16, at::kBool, out.scalar_type(), "prompt_attention_mask_cpu", [&] {
        // Written as raw bits of the same width: integer stores vectorize, c10::BFloat16 ones
        // do not always.
        using bits_t = typename UnsignedOfSize<sizeof(scalar_t)>::type;
        const bool is_bool = std::is_same<scalar_t, bool>::value;
        const scalar_t attend = is_bool ? scalar_t(1) : scalar_t(0);
        const scalar_t hidden = is_bool ? scalar_t(0) : std::numeric_limits<scalar_t>::lowest();
        write_mask_rows<bits_t>(live.data(), B, S, W, P, past_length, causal, sliding_window,
                                bits_of<bits_t>(attend), bits_of<bits_t>(hidden),
                                reinterpret_cast<bits_t*>(out.data_ptr<scalar_t>()));
      });
}

void prompt_position_ids_cpu(const at::Tensor& mask, const at::Tensor& lengths, int64_t P,
                             int64_t past_length, bool after_prompt, at::Tensor& out) {
  const int64_t K = mask.size(1);
  const int64_t* len_data = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  int64_t* out_data = out.data_ptr<int64_t>();
  const int64_t S = K - past_length;
  for_each_mask_row(mask, rows_per_task(K), [&](int64_t b, auto real) {
    int64_t seen = 0;  // real tokens so far
    for (int64_t t = 0; t < past_length; ++t) seen += real(t);
    // position = offset + (real tokens before and including this one) - 1; padding -> 0
    int64_t next = (after_prompt ? prompt_length(len_data, b, P) : 0) + seen;
    int64_t* out_row = out_data + b * S;
    for (int64_t t = past_length; t < K; ++t) {
      const int64_t is_real = real(t);
      out_row[t - past_length] = is_real * next;
      next += is_real;
    }
  });
}

void packed_prompt_layout_cpu(const at::Tensor& mask, const at::Tensor& lengths, int64_t longest,
                              const at::Tensor& cache_lengths, int64_t cache_length, bool pad_left,
                              bool restart, PackedLayout& out) {
  const int64_t* len_data = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  const int64_t* cache_data = cache_lengths.defined() ? cache_lengths.data_ptr<int64_t>() : nullptr;
  const int64_t K = mask.size(1), W = K + longest;
  int64_t* layout_mask = out.layout_mask.data_ptr<int64_t>();
  int64_t* text_columns = out.text_columns.data_ptr<int64_t>();
  int64_t* prompt_index = out.prompt_index.data_ptr<int64_t>();
  int64_t* positions = out.position_ids.data_ptr<int64_t>();
  for_each_mask_row(mask, rows_per_task(W), [&](int64_t b, auto is_real) {
    int64_t real = 0;
    for (int64_t t = 0; t < K; ++t) real += is_real(t);
    const int64_t n = prompt_length(len_data, b, longest);  // clamped: every column stays in [0, W)
    const int64_t cached = cache_data == nullptr ? cache_length : cache_data[b];
    const int64_t live = real + n;  // the row's live block: its prompt, then its real tokens
    const int64_t first = pad_left ? W - live : 0;
    // Real tokens in order after the prompt; padding in order outside the live block.
    int64_t next_real = first + n, next_pad = pad_left ? 0 : live;
    int64_t* columns = text_columns + b * K;
    for (int64_t t = 0; t < K; ++t) columns[t] = is_real(t) ? next_real++ : next_pad++;
    for (int64_t j = 0; j < W; ++j) {
      const int64_t offset = j - first;  // the column's place in the live block
      const bool in_live = offset >= 0 && offset < live, in_prompt = offset >= 0 && offset < n;
      layout_mask[b * W + j] = in_live;
      prompt_index[b * W + j] = in_prompt ? offset : -1;
      const int64_t text_position = restart ? offset - n : cached + offset;
      positions[b * W + j] = !in_live ? 0 : (restart && in_prompt) ? offset : text_position;
    }
  });
}

at::Tensor prompt_attention_mask(const at::Tensor& attention_mask,
                                 const std::optional<at::Tensor>& prompt_lengths,
                                 int64_t num_prompt_columns, int64_t past_length, bool causal,
                                 int64_t sliding_window, at::ScalarType out_dtype) {
  check_common(attention_mask, prompt_lengths, num_prompt_columns, past_length);
  TORCH_CHECK(out_dtype == at::kBool || out_dtype == at::kHalf || out_dtype == at::kBFloat16 ||
                  out_dtype == at::kFloat || out_dtype == at::kDouble,
              "out_dtype must be bool, float16, bfloat16, float32 or float64, got ", out_dtype);
  const at::Tensor mask = mask_for_kernel(attention_mask);
  const at::Tensor lengths = lengths_or_undefined(prompt_lengths);
  const int64_t B = mask.size(0), K = mask.size(1), P = num_prompt_columns;
  at::Tensor out = at::empty({B, 1, K - past_length, P + K}, mask.options().dtype(out_dtype));
  run_on_mask_device(mask, &prompt_attention_mask_cpu, CUDA_KERNEL(prompt_attention_mask_cuda), mask, lengths,
                     P, past_length, causal, sliding_window, out);
  return out;
}

at::Tensor prompt_position_ids(const at::Tensor& attention_mask,
                               const std::optional<at::Tensor>& prompt_lengths,
                               int64_t num_prompt_columns, int64_t past_length, bool after_prompt) {
  check_common(attention_mask, prompt_lengths, num_prompt_columns, past_length);
  const at::Tensor mask = mask_for_kernel(attention_mask);
  const at::Tensor lengths = lengths_or_undefined(prompt_lengths);
  at::Tensor out =
      at::empty({mask.size(0), mask.size(1) - past_length}, mask.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  run_on_mask_device(mask, &prompt_position_ids_cpu, CUDA_KERNEL(prompt_position_ids_cuda), mask, lengths,
                     num_prompt_columns, past_length, after_prompt, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> packed_prompt_layout(
    const at::Tensor& attention_mask, const std::optional<at::Tensor>& prompt_lengths, int64_t longest,
    const std::optional<at::Tensor>& cache_prompt_lengths, int64_t cache_prompt_length, bool pad_left,
    bool restart) {
  TORCH_CHECK(attention_mask.dim() == 2, "attention_mask must be 2D (batch, text_length), got ",
              attention_mask.dim(), "D");
  TORCH_CHECK(longest >= 0, "longest must be >= 0, got ", longest);
  TORCH_CHECK(cache_prompt_length >= 0, "cache_prompt_length must be >= 0, got ", cache_prompt_length);
  check_lengths(prompt_lengths, attention_mask, "prompt_lengths");
  check_lengths(cache_prompt_lengths, attention_mask, "cache_prompt_lengths");
  const at::Tensor& mask = attention_mask;  // read in its own dtype (nonzero = real): no conversion
  const at::Tensor lengths = lengths_or_undefined(prompt_lengths);
  const at::Tensor cache_lengths = lengths_or_undefined(cache_prompt_lengths);
  const int64_t B = mask.size(0), K = mask.size(1), W = K + longest;
  const auto options = mask.options().dtype(at::kLong);
  PackedLayout out{at::empty({B, W}, options), at::empty({B, K}, options), at::empty({B, W}, options),
                   at::empty({B, W}, options)};
  if (B > 0 && W > 0) {
    run_on_mask_device(mask, &packed_prompt_layout_cpu, CUDA_KERNEL(packed_prompt_layout_cuda), mask, lengths,
                       longest, cache_lengths, cache_prompt_length, pad_left, restart, out);
  }
  return {out.layout_mask, out.text_columns, out.prompt_index, out.position_ids};
}

}  // namespace ptuning_fast
