// CUDA kernels of the prompt-aware attention mask and position ids (CPU twin: prompt_mask.cpp).
//
// Mask: the output (B, 1, S, W = P + K) is written as one flat array in 16-byte chunks, one chunk
// per thread and step of a grid-stride loop, so every store is a full vector store whatever W is
// (a row may end inside a chunk). The build is bound by these writes; the inputs are a (B, K)
// bool mask and B lengths that stay in cache.
// Positions: one block per batch row scans the row's text mask in blocks of 256 columns.
// Packed layout: one block per batch row too: it counts the row's real tokens, scans its mask
// once more to place each input column, then writes the row's layout columns (no scan needed:
// the live block is one contiguous range).
#include "prompt_mask.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <limits>
#include <type_traits>

namespace ptuning_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kChunkBytes = 16;

struct MaskArgs {
  const bool* mask;  // (B, K), strides below
  int64_t mask_s0, mask_s1;
  const int64_t* lengths;  // (B,) or nullptr: every row has P prompt tokens
  int64_t S, K, P, past_length, window;
  bool causal;
};

// What one output row needs: its batch row, first live prompt column, visible column range.
struct Row {
  int64_t b, first_prompt, lo, hi;
};

__device__ __forceinline__ Row row_geometry(const MaskArgs& a, int64_t b, int64_t i) {
  Row r;
  r.b = b;
  const int64_t q = a.P + a.past_length + i;  // absolute key index of query i
  const int64_t width = a.P + a.K;
  int64_t n = a.lengths == nullptr ? a.P : a.lengths[b];
  n = n < 0 ? 0 : (n > a.P ? a.P : n);  // clamped: a bad length cannot leave [0, P]
  r.first_prompt = a.P - n;
  if (a.causal) {
    r.hi = q;
    r.lo = a.window > 0 ? max(q - a.window + 1, int64_t(0)) : 0;  // kv > q - window
  } else if (a.window > 0) {
    r.lo = max(q - a.window, int64_t(0));  // |q - kv| <= window
    r.hi = min(q + a.window, width - 1);
  } else {
    r.lo = 0;
    r.hi = width - 1;
  }
  return r;
}

__device__ __forceinline__ bool visible(const MaskArgs& a, const Row& r, int64_t col) {
  if (col < r.lo || col > r.hi) return false;
  if (col < a.P) return col >= r.first_prompt;
  return a.mask[r.b * a.mask_s0 + (col - a.P) * a.mask_s1];
}

// index_t is int32_t when the output has fewer than 2^31 elements (cheaper divisions), else int64_t.
template <typename scalar_t, typename index_t>
__global__ void prompt_mask_kernel(MaskArgs a, scalar_t attend, scalar_t hidden, scalar_t* out,
                                   index_t total) {
  constexpr int kVec = kChunkBytes / sizeof(scalar_t);
  const index_t width = index_t(a.P + a.K), S = index_t(a.S);
  const index_t chunks = (total + kVec - 1) / kVec;
  for (index_t c = index_t(blockIdx.x) * blockDim.x + threadIdx.x; c < chunks;
       c += index_t(gridDim.x) * blockDim.x) {
    const index_t first = c * kVec;
    index_t row = first / width, col = first - row * width;
    index_t b = row / S, i = row - b * S;
    Row r = row_geometry(a, b, i);
    alignas(kChunkBytes) scalar_t vals[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (col == width) {  // the chunk crosses into the next row
        col = 0;
        ++row;
        if (++i == S) {
          i = 0;
          ++b;
        }
        if (row * width < total) r = row_geometry(a, b, i);  // else: past the end, not stored
      }
      vals[k] = visible(a, r, col) ? attend : hidden;
      ++col;
    }
    if (first + kVec <= total) {
      *reinterpret_cast<uint4*>(out + first) = *reinterpret_cast<const uint4*>(vals);
    } else {  // last, partial chunk
      for (int k = 0; first + k < total; ++k) out[first + k] = vals[k];
    }
  }
}

// Inclusive prefix sum over the block (blockDim.x == kThreads); `warp_totals` has kThreads/32.
__device__ __forceinline__ int block_inclusive_scan(int value, int* warp_totals) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int other = __shfl_up_sync(0xffffffffu, value, d);
    if (lane >= d) value += other;
  }
  if (lane == 31) warp_totals[warp] = value;
  __syncthreads();
  if (warp == 0) {
    int total = lane < kThreads / 32 ? warp_totals[lane] : 0;
#pragma unroll
    for (int d = 1; d < kThreads / 32; d <<= 1) {
      const int other = __shfl_up_sync(0xffffffffu, total, d);
      if (lane >= d) total += other;
    }
    if (lane < kThreads / 32) warp_totals[lane] = total;  // inclusive over warps
  }
  __syncthreads();
  const int before = warp > 0 ? warp_totals[warp - 1] : 0;
  return value + before;
}

__global__ void prompt_positions_kernel(MaskArgs a, bool after_prompt, int64_t* out) {
  __shared__ int warp_totals[kThreads / 32];
  const int64_t b = blockIdx.x;
  int64_t n = a.lengths == nullptr ? a.P : a.lengths[b];
  n = n < 0 ? 0 : (n > a.P ? a.P : n);
  const int64_t offset = after_prompt ? n : 0;
  int64_t seen_before = 0;  // real tokens in the earlier blocks of columns
  for (int64_t start = 0; start < a.K; start += kThreads) {
    const int64_t t = start + threadIdx.x;
    const int real = t < a.K ? int(a.mask[b * a.mask_s0 + t * a.mask_s1]) : 0;
    const int seen = block_inclusive_scan(real, warp_totals);
    if (t < a.K && t >= a.past_length) {
      out[b * a.S + (t - a.past_length)] = real ? offset + seen_before + seen - 1 : 0;
    }
    seen_before += warp_totals[kThreads / 32 - 1];  // the block's total
    __syncthreads();  // warp_totals is reused by the next block of columns
  }
}

template <typename mask_t>
struct PackedArgs {
  const mask_t* mask;  // (B, K), strides below; nonzero = real token
  int64_t mask_s0, mask_s1;
  const int64_t* lengths;        // (B,) or nullptr: every row has `longest` prompt tokens
  const int64_t* cache_lengths;  // (B,) or nullptr: every row has `cache_length`
  int64_t cache_length, K, longest;
  bool pad_left, restart;
  int64_t *layout_mask, *text_columns, *prompt_index, *positions;  // (B, W), (B, K), (B, W), (B, W)
};

template <typename mask_t>
__global__ void packed_layout_kernel(PackedArgs<mask_t> a) {
  __shared__ int warp_totals[kThreads / 32];
  const int64_t b = blockIdx.x, W = a.K + a.longest;
  const mask_t* row = a.mask + b * a.mask_s0;
  const mask_t pad = mask_t(0);

  int count = 0;  // this thread's share of the row's real tokens
  for (int64_t t = threadIdx.x; t < a.K; t += kThreads) count += int(row[t * a.mask_s1] != pad);
  block_inclusive_scan(count, warp_totals);
  const int64_t real = warp_totals[kThreads / 32 - 1];
  __syncthreads();  // warp_totals is reused below

  int64_t n = a.lengths == nullptr ? a.longest : a.lengths[b];
  n = n < 0 ? 0 : (n > a.longest ? a.longest : n);  // clamped: every column stays in [0, W)
  const int64_t cached = a.cache_lengths == nullptr ? a.cache_length : a.cache_lengths[b];
  const int64_t live = real + n;  // the row's live block: its prompt, then its real tokens
  const int64_t first = a.pad_left ? W - live : 0;

  // Real tokens in order after the prompt; padding in order outside the live block.
  const int64_t first_pad = a.pad_left ? 0 : live;
  int64_t real_before = 0;  // real tokens in the earlier blocks of columns
  for (int64_t start = 0; start < a.K; start += kThreads) {
    const int64_t t = start + threadIdx.x;
    const int is_real = t < a.K ? int(row[t * a.mask_s1] != pad) : 0;
    const int seen = block_inclusive_scan(is_real, warp_totals);  // real tokens in [start, t]
    if (t < a.K) {
      const int64_t pads_before = (start - real_before) + (int64_t(threadIdx.x) + 1 - seen) - 1;
      a.text_columns[b * a.K + t] =
          is_real ? first + n + real_before + seen - 1 : first_pad + pads_before;
    }
    real_before += warp_totals[kThreads / 32 - 1];
    __syncthreads();
  }

  for (int64_t j = threadIdx.x; j < W; j += kThreads) {
    const int64_t offset = j - first;  // the column's place in the live block
    const bool in_live = offset >= 0 && offset < live, in_prompt = offset >= 0 && offset < n;
    a.layout_mask[b * W + j] = in_live;
    a.prompt_index[b * W + j] = in_prompt ? offset : -1;
    const int64_t text_position = a.restart ? offset - n : cached + offset;
    a.positions[b * W + j] = !in_live ? 0 : (a.restart && in_prompt) ? offset : text_position;
  }
}

MaskArgs make_args(const at::Tensor& mask, const at::Tensor& lengths, int64_t P,
                   int64_t past_length, bool causal, int64_t window) {
  MaskArgs a;
  a.mask = mask.data_ptr<bool>();
  a.mask_s0 = mask.stride(0);
  a.mask_s1 = mask.stride(1);
  a.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  a.K = mask.size(1);
  a.S = a.K - past_length;
  a.P = P;
  a.past_length = past_length;
  a.window = window;
  a.causal = causal;
  return a;
}

}  // namespace

void prompt_attention_mask_cuda(const at::Tensor& mask, const at::Tensor& lengths, int64_t P,
                                int64_t past_length, bool causal, int64_t sliding_window,
                                at::Tensor& out) {
  const int64_t total = out.numel();
  if (total == 0) return;
  const c10::cuda::CUDAGuard guard(mask.device());
  const MaskArgs args = make_args(mask, lengths, P, past_length, causal, sliding_window);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, mask.device().index()));
  AT_DISPATCH_FLOATING_TYPES_AND3(
      at::kHalf, at::kBFloat16, at::kBool, out.scalar_type(), "prompt_attention_mask_cuda", [&] {
        constexpr int64_t vec = kChunkBytes / sizeof(scalar_t);
        const int64_t chunks = (total + vec - 1) / vec;
        // Enough blocks to fill every SM several times; the grid-stride loop covers the rest.
        const int64_t blocks = std::min<int64_t>((chunks + kThreads - 1) / kThreads, int64_t(sms) * 32);
        const bool is_bool = std::is_same<scalar_t, bool>::value;
        const scalar_t attend = is_bool ? scalar_t(1) : scalar_t(0);
        const scalar_t hidden = is_bool ? scalar_t(0) : std::numeric_limits<scalar_t>::lowest();
        if (total <= std::numeric_limits<int32_t>::max() - kChunkBytes) {
          prompt_mask_kernel<scalar_t, int32_t><<<blocks, kThreads, 0, stream>>>(
              args, attend, hidden, out.data_ptr<scalar_t>(), int32_t(total));
        } else {
          prompt_mask_kernel<scalar_t, int64_t><<<blocks, kThreads, 0, stream>>>(
              args, attend, hidden, out.data_ptr<scalar_t>(), total);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void prompt_position_ids_cuda(const at::Tensor& mask, const at::Tensor& lengths, int64_t P,
                              int64_t past_length, bool after_prompt, at::Tensor& out) {
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(mask.device());
  const MaskArgs args = make_args(mask, lengths, P, past_length, /*causal=*/true, /*window=*/0);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  prompt_positions_kernel<<<mask.size(0), kThreads, 0, stream>>>(args, after_prompt,
                                                                 out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void packed_prompt_layout_cuda(const at::Tensor& mask, const at::Tensor& lengths, int64_t longest,
                               const at::Tensor& cache_lengths, int64_t cache_length, bool pad_left,
                               bool restart, PackedLayout& out) {
  const c10::cuda::CUDAGuard guard(mask.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_ALL_TYPES_AND3(
      at::kBool, at::kHalf, at::kBFloat16, mask.scalar_type(), "packed_prompt_layout_cuda", [&] {
        PackedArgs<scalar_t> a;
        a.mask = mask.data_ptr<scalar_t>();
        a.mask_s0 = mask.stride(0);
        a.mask_s1 = mask.stride(1);
        a.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
        a.cache_lengths = cache_lengths.defined() ? cache_lengths.data_ptr<int64_t>() : nullptr;
        a.cache_length = cache_length;
        a.K = mask.size(1);
        a.longest = longest;
        a.pad_left = pad_left;
        a.restart = restart;
        a.layout_mask = out.layout_mask.data_ptr<int64_t>();
        a.text_columns = out.text_columns.data_ptr<int64_t>();
        a.prompt_index = out.prompt_index.data_ptr<int64_t>();
        a.positions = out.position_ids.data_ptr<int64_t>();
        packed_layout_kernel<scalar_t><<<mask.size(0), kThreads, 0, stream>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace ptuning_fast
