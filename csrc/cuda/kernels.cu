// CUDA kernels of the three backend entry points. Memory-bound: the floor is one read of
// the logits and one write of their gradient, so every byte is moved in 16-byte vectors
// (8 bf16/fp16 or 4 fp32 logits per load) and each row's statistics are float32 online
// softmax accumulators (common/token_loss.h) reduced over warps, then over the block.
//
// Two shapes of launch:
// - fused (policy loss with gradient, T large enough to fill the GPU): one block per row
//   reads it once for the statistics, computes the per-token loss, then re-reads it last
//   to first and writes the gradient, in place when grad == logits. The re-read starts
//   with the entries read last, the likeliest still in L2.
// - chunked (small T, and every forward-only call): blocks of `chunk_size` logits of a
//   row each write their partial statistics; a second launch merges a row's partials (a
//   few dozen floats) and, when a gradient is asked for, each of its blocks re-reads its
//   chunk and writes the gradient. The logits are read at most twice either way.
//
// Gradient of one row: the formula of logits_gradient in kernels/reference.py (derived
// there), with c = d loss / d logp and e = d loss / dH arranged as
//   d loss / dz_j = p_j (k1 + k2 (log p_j + H)) + [j = y] c / tau,  k1 = -c / tau, k2 = -e / tau.

#include <cfloat>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/token_loss.h"
#include "kernels.cuh"

namespace siri::cuda {
namespace {

// 8 warps per block: a bf16 row of V = 151,936 is 18,992 16-byte vectors, ~74 per thread.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kVecBytes = 16;
// Smallest chunk of a row given to a block: 16 logits per thread, so a block's fixed cost
// (its reductions, the merge) stays small next to its loads.
constexpr int64_t kMinChunk = 16 * kThreads;
// Resident blocks per SM the split aims for: 4 x 8 warps keeps 32 warps of loads in
// flight per SM, enough to cover HBM latency.
constexpr int kBlocksPerSm = 4;

template <typename T>
constexpr int kPack = kVecBytes / sizeof(T);

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// u = x / tau as a rounded product that nvcc never contracts into an FMA (__fmul_rn): the
// row's max and lse come from these rounded values, so u - m and u - lse are <= 0 exactly,
// where an FMA's unrounded product would give the argmax a positive log-prob of the order of
// ulp(m), which grows as 1 / tau.
__device__ __forceinline__ float scaled(float x, float inv_t) { return __fmul_rn(x, inv_t); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Plain (coherent) 16-byte loads: the fused kernel writes the gradient over the logits it
// read, so the read-only path (ld.global.nc) is not allowed.
template <typename T>
__device__ __forceinline__ void load_pack(const T* p, float (&v)[kPack<T>]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int k = 0; k < kPack<T>; ++k) v[k] = to_float(elems[k]);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const float (&v)[kPack<T>]) {
  uint4 raw;
  T* elems = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int k = 0; k < kPack<T>; ++k) elems[k] = from_float<T>(v[k]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// [begin, end) of a row cut into a scalar head up to the first 16-byte boundary, whole
// packs, and a scalar tail. `out` (the gradient row, or null) must share the input's
// offset from a 16-byte boundary for packs to be used; otherwise all of it is "head".
struct RangeSplit {
  int64_t body_begin, num_packs, tail_begin;
};

template <typename T>
__device__ __forceinline__ RangeSplit split_range(const T* in, const T* out, int64_t begin, int64_t end) {
  const auto address = reinterpret_cast<uintptr_t>(in + begin);
  const bool packs_ok = out == nullptr || (address - reinterpret_cast<uintptr_t>(out + begin)) % kVecBytes == 0;
  int64_t head = end - begin;
  if (packs_ok) {
    const int64_t to_boundary = ((kVecBytes - address % kVecBytes) % kVecBytes) / sizeof(T);
    head = to_boundary < head ? to_boundary : head;
  }
  const int64_t num_packs = (end - begin - head) / kPack<T>;
  return {begin + head, num_packs, begin + head + num_packs * kPack<T>};
}

// Adds n values of u to a thread's statistics: one rescale per pack, when its max grows.
// Clamping u - m at -FLT_MAX keeps exp(u - m) (u - m) at 0, not 0 * -inf, for -inf logits.
template <int N>
__device__ __forceinline__ void add_to_stats(SoftmaxStats& st, const float (&u)[N]) {
  float pack_max = u[0];
#pragma unroll
  for (int k = 1; k < N; ++k) pack_max = fmaxf(pack_max, u[k]);
  if (pack_max > st.m) {
    const float shift = rescale_shift(st.m, pack_max), r = __expf(shift);
    st.a = fmaf(r * shift, st.s, r * st.a);
    st.s *= r;
    st.m = pack_max;
  }
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const float d = fmaxf(u[k] - st.m, kLowest);
    const float e = __expf(d);
    st.s += e;
    st.a = fmaf(e, d, st.a);
  }
}

template <typename T>
__device__ SoftmaxStats thread_stats(const T* row, int64_t begin, int64_t end, float inv_t) {
  SoftmaxStats st = empty_stats();
  const RangeSplit split = split_range<T>(row, nullptr, begin, end);
  const auto add_one = [&](int64_t j) {
    const float u[1] = {scaled(to_float(row[j]), inv_t)};
    add_to_stats(st, u);
  };
  for (int64_t j = begin + threadIdx.x; j < split.body_begin; j += kThreads) add_one(j);
  for (int64_t i = threadIdx.x; i < split.num_packs; i += kThreads) {
    float u[kPack<T>];
    load_pack(row + split.body_begin + i * kPack<T>, u);
#pragma unroll
    for (int k = 0; k < kPack<T>; ++k) u[k] = scaled(u[k], inv_t);
    add_to_stats(st, u);
  }
  for (int64_t j = split.tail_begin + threadIdx.x; j < end; j += kThreads) add_one(j);
  return st;
}

__device__ __forceinline__ SoftmaxStats warp_merge(SoftmaxStats st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const SoftmaxStats other{__shfl_xor_sync(kFullMask, st.m, offset), __shfl_xor_sync(kFullMask, st.s, offset),
                             __shfl_xor_sync(kFullMask, st.a, offset)};
    st = merge_stats(st, other);
  }
  return st;
}

// Merges every thread's statistics; every thread gets the result. Called once per kernel
// (its shared buffer is not reused).
__device__ SoftmaxStats block_merge(SoftmaxStats st) {
  __shared__ SoftmaxStats per_warp[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  st = warp_merge(st);
  if (lane == 0) per_warp[warp] = st;
  __syncthreads();
  return warp_merge(lane < kWarps ? per_warp[lane] : empty_stats());
}

// A row's chunk statistics merged by one warp: each lane merges every 32nd chunk.
__device__ SoftmaxStats merge_chunks(const SoftmaxStats* partials, int chunks) {
  SoftmaxStats st = empty_stats();
  for (int k = threadIdx.x % 32; k < chunks; k += 32) st = merge_stats(st, partials[k]);
  return warp_merge(st);
}

// What the gradient pass needs of a row (see the derivation at the top). The log-sum-exp
// comes in two parts, lse_hi + lse_lo (the row's max and log s where the statistics are at
// hand): log p = (u - lse_hi) - lse_lo keeps the digits of log s that one float would round
// away at large |u| (stats_logprob in token_loss.h).
struct RowGrad {
  float lse_hi, lse_lo, entropy, k1, k2, target_add;
  int64_t target;
  bool zero;  // weight-0 row: a zero gradient, logits not read
};

__device__ __forceinline__ RowGrad make_row_grad(float lse_hi, float lse_lo, float entropy, float c, float e,
                                                 int64_t target, float inv_t) {
  return {lse_hi, lse_lo, entropy, -c * inv_t, -e * inv_t, c * inv_t, target, false};
}

__device__ __forceinline__ float grad_entry(float x, int64_t j, const RowGrad& g, float inv_t) {
  const float log_p = (scaled(x, inv_t) - g.lse_hi) - g.lse_lo;
  const float p = __expf(log_p);
  // An entry of probability 0 takes no entropy term (0 log 0 = 0); otherwise IEEE arithmetic
  // holds (an infinite or NaN k1 gives NaN), as in reference.logits_gradient.
  const float grad = p * fmaf(g.k2, p > 0.0f ? log_p + g.entropy : 0.0f, g.k1);
  return j == g.target ? grad + g.target_add : grad;
}

// Writes the gradient of [begin, end) of a row. Each entry is read and written by the same
// thread, so in place is safe; `reverse` walks the packs last to first.
template <typename T>
__device__ void write_gradient(const T* row, T* grad_row, int64_t begin, int64_t end, const RowGrad& g,
                               float inv_t, bool reverse) {
  const RangeSplit split = split_range<T>(row, grad_row, begin, end);
  const auto one = [&](int64_t j) {
    grad_row[j] = from_float<T>(g.zero ? 0.0f : grad_entry(to_float(row[j]), j, g, inv_t));
  };
  for (int64_t j = begin + threadIdx.x; j < split.body_begin; j += kThreads) one(j);
  for (int64_t i = threadIdx.x; i < split.num_packs; i += kThreads) {
    const int64_t j0 = split.body_begin + (reverse ? split.num_packs - 1 - i : i) * kPack<T>;
    float v[kPack<T>];
    if (g.zero) {
#pragma unroll
      for (int k = 0; k < kPack<T>; ++k) v[k] = 0.0f;
    } else {
      load_pack(row + j0, v);
#pragma unroll
      for (int k = 0; k < kPack<T>; ++k) v[k] = grad_entry(v[k], j0 + k, g, inv_t);
    }
    store_pack(grad_row + j0, v);
  }
  for (int64_t j = split.tail_begin + threadIdx.x; j < end; j += kThreads) one(j);
}

template <typename T>
__device__ __forceinline__ const T* logits_row(const RowsView& rows, int64_t t) {
  return static_cast<const T*>(rows.logits) + t * rows.logits_stride;
}

template <typename T>
__device__ __forceinline__ T* grad_row(const RowsView& rows, int64_t t) {
  return rows.grad == nullptr ? nullptr : static_cast<T*>(rows.grad) + t * rows.grad_stride;
}

// Per-row outputs of the policy loss from the row's statistics and its target's u; the
// RowGrad for its gradient. `write` is false for the blocks of a row that only need the
// RowGrad (all but chunk 0).
__device__ RowGrad finish_policy_row(const PolicyLossArgs& args, int64_t t, SoftmaxStats st, float u_target,
                                     int64_t target, bool write) {
  const float entropy = stats_entropy(st);
  const float logp = stats_logprob(st, u_target);
  const TokenLoss token = token_loss(logp, entropy, t, args.in, args.settings);
  if (write) {
    args.out.logprobs[t] = logp;
    args.out.entropy[t] = entropy;
    args.out.loss[t] = token.loss;
    args.out.kl[t] = token.kl;
    args.out.clipped[t] = token.clip_code;
  }
  return make_row_grad(st.m, logf(st.s), entropy, token.grad_logp, token.grad_entropy, target,
                       args.settings.inv_temperature);
}

__device__ void write_zero_policy_row(const PolicyLossArgs& args, int64_t t) {
  args.out.logprobs[t] = args.out.entropy[t] = args.out.loss[t] = args.out.kl[t] = args.out.clipped[t] = 0.0f;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) policy_loss_fused_kernel(PolicyLossArgs args) {
  const int64_t t = blockIdx.x;
  const RowsView& rows = args.rows;
  const float inv_t = args.settings.inv_temperature;
  const T* row = logits_row<T>(rows, t);
  __shared__ RowGrad shared_grad;
  if (args.in.weights[t] == 0.0f) {
    // Contributes nothing: zeros out, a zero gradient row, and the target is never read.
    if (threadIdx.x == 0) write_zero_policy_row(args, t);
    write_gradient(row, grad_row<T>(rows, t), 0, rows.vocab, RowGrad{0, 0, 0, 0, 0, 0, -1, true}, inv_t, false);
    return;
  }
  const SoftmaxStats st = block_merge(thread_stats(row, 0, rows.vocab, inv_t));
  if (threadIdx.x == 0) {
    // Read before the barrier below, after which the gradient may overwrite it in place.
    const int64_t target = load_target(rows, t);
    shared_grad = finish_policy_row(args, t, st, scaled(to_float(row[target]), inv_t), target, true);
  }
  __syncthreads();
  write_gradient(row, grad_row<T>(rows, t), 0, rows.vocab, shared_grad, inv_t, true);
}

// Chunk statistics; the block holding the target also records its u, so that the second
// launch never reads a logit that a gradient block may be overwriting.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    chunk_stats_kernel(RowsView rows, float inv_t, const float* weights, int64_t chunk_size, SoftmaxStats* partials,
                       float* u_target) {
  const int64_t t = blockIdx.x;
  if (weights != nullptr && weights[t] == 0.0f) return;
  const int64_t begin = blockIdx.y * chunk_size;
  const int64_t end = begin + chunk_size < rows.vocab ? begin + chunk_size : rows.vocab;
  const T* row = logits_row<T>(rows, t);
  if (threadIdx.x == 0) {
    const int64_t target = load_target(rows, t);
    if (target >= begin && target < end) u_target[t] = scaled(to_float(row[target]), inv_t);
  }
  const SoftmaxStats st = block_merge(thread_stats(row, begin, end, inv_t));
  if (threadIdx.x == 0) partials[t * gridDim.y + blockIdx.y] = st;
}

// Grid (T, chunks with a gradient, else 1): merges the row's partials (warp 0), writes the
// per-row outputs (chunk 0), then the gradient of this block's chunk.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    policy_loss_chunk_kernel(PolicyLossArgs args, int64_t chunk_size, int chunks, const SoftmaxStats* partials,
                             const float* u_target) {
  const int64_t t = blockIdx.x;
  const RowsView& rows = args.rows;
  const bool active = args.in.weights[t] != 0.0f;
  const bool first = blockIdx.y == 0;
  __shared__ RowGrad shared_grad;
  if (threadIdx.x < 32) {
    const SoftmaxStats st = active ? merge_chunks(partials + t * chunks, chunks) : empty_stats();
    if (threadIdx.x == 0) {
      if (active) {
        const int64_t target = load_target(rows, t);
        shared_grad = finish_policy_row(args, t, st, u_target[t], target, first);
      } else {
        if (first) write_zero_policy_row(args, t);
        shared_grad = RowGrad{0, 0, 0, 0, 0, 0, -1, true};
      }
    }
  }
  __syncthreads();
  if (rows.grad != nullptr) {
    const int64_t begin = blockIdx.y * chunk_size;
    const int64_t end = begin + chunk_size < rows.vocab ? begin + chunk_size : rows.vocab;
    write_gradient(logits_row<T>(rows, t), grad_row<T>(rows, t), begin, end, shared_grad,
                   args.settings.inv_temperature, false);
  }
}

// One warp per row: merges the row's partials into its log-prob, lse and entropy.
__global__ void __launch_bounds__(kThreads)
    logprob_finish_kernel(LogprobArgs args, int chunks, const SoftmaxStats* partials, const float* u_target) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (t >= args.rows.num_rows) return;
  const SoftmaxStats st = merge_chunks(partials + t * chunks, chunks);
  if (threadIdx.x % 32 == 0) {
    args.lse[2 * t] = st.m;  // the log-sum-exp in two parts (RowGrad)
    args.lse[2 * t + 1] = logf(st.s);
    args.logprobs[t] = stats_logprob(st, u_target[t]);
    if (args.entropy != nullptr) args.entropy[t] = stats_entropy(st);
  }
}

// A row with a negative target (none in these columns, kernels/backends.py) matches no j of
// grad_entry: no one-hot term.
template <typename T>
__global__ void __launch_bounds__(kThreads) logprob_backward_kernel(LogprobBackwardArgs args, int64_t chunk_size) {
  const int64_t t = blockIdx.x;
  const RowsView& rows = args.rows;
  const bool entropy_term = args.grad_entropy != nullptr;
  const RowGrad g = make_row_grad(args.lse[2 * t], args.lse[2 * t + 1], entropy_term ? args.entropy[t] : 0.0f, args.grad_logprobs[t],
                                  entropy_term ? args.grad_entropy[t] : 0.0f, load_target_or_absent(rows, t),
                                  args.inv_temperature);
  const int64_t begin = blockIdx.y * chunk_size;
  const int64_t end = begin + chunk_size < rows.vocab ? begin + chunk_size : rows.vocab;
  write_gradient(logits_row<T>(rows, t), grad_row<T>(rows, t), begin, end, g, args.inv_temperature, false);
}

// Calls fn(T{}) with T the CUDA type of a logits dtype.
template <typename Fn>
void with_logits_type(Dtype dtype, Fn&& fn) {
  switch (dtype) {
    case Dtype::kFloat32:
      return fn(float{});
    case Dtype::kBFloat16:
      return fn(__nv_bfloat16{});
    case Dtype::kFloat16:
      return fn(__half{});
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Workspace layout: SoftmaxStats partials[T][chunks], then float u_target[T].
SoftmaxStats* partials_of(float* workspace) { return reinterpret_cast<SoftmaxStats*>(workspace); }
float* u_target_of(float* workspace, int64_t num_rows, RowSplit split) {
  return workspace + num_rows * split.chunks * (sizeof(SoftmaxStats) / sizeof(float));
}

template <typename T>
void launch_chunk_stats(const RowsView& rows, float inv_t, const float* weights, RowSplit split, float* workspace,
                        cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows.num_rows), static_cast<unsigned>(split.chunks));
  chunk_stats_kernel<T><<<grid, kThreads, 0, stream>>>(rows, inv_t, weights, split.chunk_size, partials_of(workspace),
                                                       u_target_of(workspace, rows.num_rows, split));
}

bool use_fused(RowSplit split, bool with_grad) { return with_grad && split.chunks == 1; }

}  // namespace

RowSplit plan_row_split(int64_t num_rows, int64_t vocab, int sm_count) {
  const int64_t want_blocks = static_cast<int64_t>(kBlocksPerSm) * sm_count;
  int64_t chunks = 1;
  if (num_rows > 0 && num_rows < want_blocks) {
    const int64_t most = vocab / kMinChunk > 1 ? vocab / kMinChunk : 1;
    chunks = ceil_div(want_blocks, num_rows) < most ? ceil_div(want_blocks, num_rows) : most;
  }
  // Chunk edges at multiples of 8 logits (16 bytes of bf16/fp16, two packs of fp32) keep
  // every chunk at the row's own 16-byte alignment.
  const int64_t chunk_size = ceil_div(ceil_div(vocab > 0 ? vocab : 1, chunks), 8) * 8;
  return {static_cast<int>(ceil_div(vocab > 0 ? vocab : 1, chunk_size)), chunk_size};
}

int64_t policy_loss_workspace(int64_t num_rows, RowSplit split, bool with_grad) {
  return use_fused(split, with_grad) ? 0 : logprob_workspace(num_rows, split);
}

int64_t logprob_workspace(int64_t num_rows, RowSplit split) {
  return num_rows * split.chunks * static_cast<int64_t>(sizeof(SoftmaxStats) / sizeof(float)) + num_rows;
}

cudaError_t launch_policy_loss_rows(const PolicyLossArgs& args, RowSplit split, float* workspace,
                                    cudaStream_t stream) {
  const RowsView& rows = args.rows;
  if (rows.num_rows == 0) return cudaSuccess;
  const bool with_grad = rows.grad != nullptr;
  with_logits_type(rows.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (use_fused(split, with_grad)) {
      policy_loss_fused_kernel<T><<<static_cast<unsigned>(rows.num_rows), kThreads, 0, stream>>>(args);
      return;
    }
    launch_chunk_stats<T>(rows, args.settings.inv_temperature, args.in.weights, split, workspace, stream);
    const dim3 grid(static_cast<unsigned>(rows.num_rows), with_grad ? static_cast<unsigned>(split.chunks) : 1u);
    policy_loss_chunk_kernel<T><<<grid, kThreads, 0, stream>>>(args, split.chunk_size, split.chunks,
                                                               partials_of(workspace),
                                                               u_target_of(workspace, rows.num_rows, split));
  });
  return cudaGetLastError();
}

cudaError_t launch_logprob_rows(const LogprobArgs& args, RowSplit split, float* workspace, cudaStream_t stream) {
  const RowsView& rows = args.rows;
  if (rows.num_rows == 0) return cudaSuccess;
  with_logits_type(rows.dtype, [&](auto tag) {
    launch_chunk_stats<decltype(tag)>(rows, args.inv_temperature, nullptr, split, workspace, stream);
  });
  logprob_finish_kernel<<<static_cast<unsigned>(ceil_div(rows.num_rows, kWarps)), kThreads, 0, stream>>>(
      args, split.chunks, partials_of(workspace), u_target_of(workspace, rows.num_rows, split));
  return cudaGetLastError();
}

cudaError_t launch_logprob_backward(const LogprobBackwardArgs& args, RowSplit split, cudaStream_t stream) {
  const RowsView& rows = args.rows;
  if (rows.num_rows == 0) return cudaSuccess;
  with_logits_type(rows.dtype, [&](auto tag) {
    const dim3 grid(static_cast<unsigned>(rows.num_rows), static_cast<unsigned>(split.chunks));
    logprob_backward_kernel<decltype(tag)><<<grid, kThreads, 0, stream>>>(args, split.chunk_size);
  });
  return cudaGetLastError();
}

}  // namespace siri::cuda
