// The CUDA kernel of znorm_kernels_C::znorm_: ZNorm of a whole list of tensors in three launches per dtype.
//
// Multi-tensor apply in the manner of apex: the tensors' addresses, sizes and first chunk numbers travel in
// one int64 table (filled in pinned host memory, copied to the device without blocking), and every block
// finds its tensor by a binary search over the chunk numbers, so the table is O(tensors), not O(chunks).
//   1. stats:     one block per chunk of kChunk elements writes (count, mean, M2, min, max) of its chunk to its
//                 own slot: two passes over a chunk that stays in L1/L2 (sum, min, max; then sum(x - m) and
//                 sum((x - m)^2) in double around its rounded mean m; run_moments in znorm.h), no shift by
//                 any element; chunks beyond float's safe range take double throughout;
//   2. finalize:  one block per tensor merges that tensor's partials in double, in a fixed tree, and
//                 publishes (mean, multiplier, wide) (finalize in znorm.h: min == max means constant -> 0);
//   3. normalize: one block per chunk writes ((x - hi) - lo) * multiplier, the mean as a float pair hi + lo
//                 (double arithmetic for "wide" tensors).
// Every thread's share of the work and every reduction order are fixed by the sizes alone, so results are
// bitwise reproducible. Element indices are 64-bit. No host-device synchronization: the GradScaler scale is
// read on the device, and the table copy is stream-ordered from pinned memory.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <mutex>
#include <optional>
#include <vector>

#include "znorm.h"

namespace znorm {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;       // independent accumulators per thread: loads in flight, not a serial add chain
constexpr int64_t kChunk = 8192;  // elements per block in stages 1 and 3: 32 per thread

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// The table: ptr[t], numel[t], first_chunk[t] for t < ntensors, then first_chunk[ntensors] = total chunks.
struct TableView {
  const int64_t* base;
  int64_t ntensors;
  __device__ int64_t ptr(int64_t t) const { return base[t]; }
  __device__ int64_t numel(int64_t t) const { return base[ntensors + t]; }
  __device__ int64_t first_chunk(int64_t t) const { return base[2 * ntensors + t]; }
  // The tensor that owns chunk c: the last t with first_chunk(t) <= c.
  __device__ int64_t owner(int64_t c) const {
    int64_t lo = 0, hi = ntensors - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (first_chunk(mid) <= c) lo = mid; else hi = mid - 1;
    }
    return lo;
  }
};

// Reduction over the block in a fixed order (shuffle tree per warp, then the warp results by warp 0); every
// thread gets the result. Op: 0 sum, 1 min, 2 max (min and max skip NaN, as the CPU loops do).
template <int Op, typename A>
__device__ __forceinline__ A combine(A a, A b) {
  if constexpr (Op == 0) return a + b;
  if constexpr (Op == 1) return b < a ? b : a;
  return b > a ? b : a;
}

template <int Op, typename A>
__device__ A block_reduce(A v) {
  __shared__ A warp_vals[kThreads / 32 + 1];
  for (int offset = 16; offset > 0; offset >>= 1) v = combine<Op>(v, __shfl_down_sync(0xffffffffu, v, offset));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_vals[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_vals[lane] : warp_vals[0];  // warp_vals[0] is neutral for min and max
    if (Op == 0 && lane >= kThreads / 32) v = A(0);
    for (int offset = 16; offset > 0; offset >>= 1) v = combine<Op>(v, __shfl_down_sync(0xffffffffu, v, offset));
    if (lane == 0) warp_vals[kThreads / 32] = v;
  }
  __syncthreads();
  const A total = warp_vals[kThreads / 32];
  __syncthreads();  // the next call may overwrite warp_vals
  return total;
}

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T v) {
  return static_cast<acc_t<T>>(v);
}

// Pass 2 of a chunk: sum(x - m) and sum((x - m)^2), in double, over the block; B is the arithmetic type of
// x - m (the chunk's accumulation type, or double for chunks beyond float's safe range).
template <typename B, typename T>
__device__ void centred_sums(const T* __restrict__ x, int64_t begin, int64_t end, B m, double& s1, double& q) {
  double acc[kUnroll] = {}, sq[kUnroll] = {};
  for (int64_t base = begin + threadIdx.x; base < end; base += kUnroll * kThreads) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < end) {
        const double d = static_cast<double>(static_cast<B>(to_acc(x[i])) - m);
        acc[u] += d;
        sq[u] += d * d;
      }
    }
  }
  s1 = block_reduce<0, double>((acc[0] + acc[1]) + (acc[2] + acc[3]));
  q = block_reduce<0, double>((sq[0] + sq[1]) + (sq[2] + sq[3]));
}

// The block's sum in type B (pass 1 again, in double, for chunks beyond float's safe range).
template <typename B, typename T>
__device__ B chunk_sum(const T* __restrict__ x, int64_t begin, int64_t end) {
  B acc[kUnroll] = {};
  for (int64_t base = begin + threadIdx.x; base < end; base += kUnroll * kThreads) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < end) acc[u] += static_cast<B>(to_acc(x[i]));
    }
  }
  return block_reduce<0, B>((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) stats_kernel(TableView table, double* __restrict__ partials) {
  using A = acc_t<T>;
  const int64_t chunk = blockIdx.x;
  const int64_t t = table.owner(chunk);
  const T* __restrict__ x = reinterpret_cast<const T*>(table.ptr(t));
  const int64_t begin = (chunk - table.first_chunk(t)) * kChunk;
  const int64_t n = table.numel(t);
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;  // 64-bit throughout

  // Pass 1: sum (in A), min and max.
  A acc[kUnroll] = {};
  A mn = std::numeric_limits<A>::infinity(), mx = -std::numeric_limits<A>::infinity();
  for (int64_t base = begin + threadIdx.x; base < end; base += kUnroll * kThreads) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < end) {
        const A v = to_acc(x[i]);
        acc[u] += v;
        mn = v < mn ? v : mn;
        mx = v > mx ? v : mx;
      }
    }
  }
  const A sum = block_reduce<0, A>((acc[0] + acc[1]) + (acc[2] + acc[3]));
  const double lo = block_reduce<1, A>(mn), hi = block_reduce<2, A>(mx);
  const double len = static_cast<double>(end - begin);
  double s1, q;
  Moments m;
  if (std::is_same_v<A, double> || float_safe(lo, hi)) {
    const A mean = sum / static_cast<A>(end - begin);
    centred_sums<A>(x, begin, end, mean, s1, q);
    m = run_moments(len, mean, s1, q, lo, hi);
  } else {
    const double mean = chunk_sum<double>(x, begin, end) / len;
    centred_sums<double>(x, begin, end, mean, s1, q);
    m = run_moments(len, mean, s1, q, lo, hi);
  }
  if (threadIdx.x == 0) {
    double* slot = partials + 5 * chunk;
    slot[0] = m.n;
    slot[1] = m.mean;
    slot[2] = m.m2;
    slot[3] = m.lo;
    slot[4] = m.hi;
  }
}

__global__ void __launch_bounds__(kThreads)
    finalize_kernel(TableView table, const double* __restrict__ partials, double* __restrict__ finals, double eps,
                    double correction, const double* __restrict__ scale) {
  __shared__ Moments s_m[kThreads];
  const int64_t t = blockIdx.x;
  const int64_t first = table.first_chunk(t), last = table.first_chunk(t + 1);
  // Thread j merges chunks j, j + kThreads, ... in order; then a fixed pairwise tree over the threads.
  Moments m;
  for (int64_t c = first + threadIdx.x; c < last; c += kThreads) {
    const double* slot = partials + 5 * c;
    m = merge(m, Moments{slot[0], slot[1], slot[2], slot[3], slot[4]});
  }
  s_m[threadIdx.x] = m;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width >>= 1) {
    if (threadIdx.x < width) s_m[threadIdx.x] = merge(s_m[threadIdx.x], s_m[threadIdx.x + width]);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const Final f = finalize(s_m[0], eps, correction, scale);
    finals[3 * t] = f.mean;
    finals[3 * t + 1] = f.inv;
    finals[3 * t + 2] = f.wide ? 1.0 : 0.0;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) normalize_kernel(TableView table, const double* __restrict__ finals) {
  using A = acc_t<T>;
  const int64_t chunk = blockIdx.x;
  const int64_t t = table.owner(chunk);
  T* __restrict__ x = reinterpret_cast<T*>(table.ptr(t));
  const int64_t begin = (chunk - table.first_chunk(t)) * kChunk;
  const int64_t n = table.numel(t);
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;  // 64-bit throughout
  const double mean = finals[3 * t], inv = finals[3 * t + 1];
  if (!std::is_same_v<A, double> && finals[3 * t + 2] != 0.0) {
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      x[i] = static_cast<T>(static_cast<A>((static_cast<double>(to_acc(x[i])) - mean) * inv));
    }
    return;
  }
  // The mean as a pair hi + lo of A values: x - hi is exact near the mean, so the pair keeps its precision.
  const A hi = static_cast<A>(mean);
  const A lo = static_cast<A>(mean - static_cast<double>(hi));
  const A mult = static_cast<A>(inv);
  for (int64_t base = begin + threadIdx.x; base < end; base += kUnroll * kThreads) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < end) x[i] = static_cast<T>(((to_acc(x[i]) - hi) - lo) * mult);
    }
  }
}

template <typename T>
void launch(std::vector<Span>& spans, double eps, double correction, const double* scale, c10::Device device) {
  const auto ntensors = static_cast<int64_t>(spans.size());
  at::Tensor host = at::empty({3 * ntensors + 1}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  int64_t chunks = 0;
  for (int64_t t = 0; t < ntensors; ++t) {
    h[t] = reinterpret_cast<int64_t>(spans[t].data);
    h[ntensors + t] = spans[t].numel;
    h[2 * ntensors + t] = chunks;
    chunks += (spans[t].numel + kChunk - 1) / kChunk;
  }
  h[3 * ntensors] = chunks;
  TORCH_CHECK(chunks <= std::numeric_limits<int32_t>::max() && ntensors <= std::numeric_limits<int32_t>::max(),
              "znorm_: too many elements for one call (", chunks, " chunks)");
  // Stream-ordered copy from pinned memory: no synchronization, and the caching host allocator keeps the
  // pinned block alive until the copy has run.
  const at::Tensor table = host.to(device, /*non_blocking=*/true);
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    // A captured CUDA graph replays this copy from this very host buffer: it must never be reused, so it is
    // kept for the life of the process (one small table per capture).
    static std::mutex mutex;
    static std::vector<at::Tensor> kept;
    const std::lock_guard<std::mutex> lock(mutex);
    kept.push_back(host);
  }
  const at::Tensor partials = at::empty({5 * chunks}, at::TensorOptions().dtype(at::kDouble).device(device));
  const at::Tensor finals = at::empty({3 * ntensors}, at::TensorOptions().dtype(at::kDouble).device(device));
  const TableView view{table.data_ptr<int64_t>(), ntensors};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());

  stats_kernel<T><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(view, partials.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize_kernel<<<static_cast<unsigned>(ntensors), kThreads, 0, stream>>>(
      view, partials.data_ptr<double>(), finals.data_ptr<double>(), eps, correction, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  normalize_kernel<T><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(view, finals.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void znorm_cuda(at::TensorList tensors, double eps, double correction, const std::optional<at::Tensor>& grad_scale) {
  if (tensors.empty()) return;
  const c10::Device device = tensors[0].device();
  const c10::cuda::CUDAGuard guard(device);

  // The scale as a double on the device: converted there, read by the finalize kernel (no .item()).
  at::Tensor scale;
  if (grad_scale.has_value() && grad_scale->defined()) {
    TORCH_CHECK(grad_scale->numel() == 1, "znorm_: grad_scale must hold one value, got ", grad_scale->numel());
    scale = grad_scale->to(device, at::kDouble, /*non_blocking=*/true).reshape({1});
  }
  const double* scale_ptr = scale.defined() ? scale.data_ptr<double>() : nullptr;

  auto by_dtype = spans_by_dtype(tensors, device);
  for (int k = 0; k < 4; ++k) {
    if (by_dtype[k].empty()) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, kDtypes[k], "znorm_cuda", [&] {
      launch<scalar_t>(by_dtype[k], eps, correction, scale_ptr, device);
    });
    for (Span& s : by_dtype[k]) s.finish();
  }
}

}  // namespace
}  // namespace znorm

TORCH_LIBRARY_IMPL(znorm_kernels_C, CUDA, m) {
  m.impl("znorm_", &znorm::znorm_cuda);
}
