// The CUDA kernel of znorm_kernels_C::znorm_: ZNorm of a whole list of tensors in three launches per dtype.
//
// Multi-tensor apply in the manner of apex: the tensors' addresses, sizes and first chunk numbers travel in
// one int64 table (filled in pinned host memory, copied to the device without blocking), and every block
// finds its tensor by a binary search over the chunk numbers, so the table is O(tensors), not O(chunks).
//   1. stats:     one block per chunk of kChunk elements writes (count, mean, M2) of its chunk, shifted by the
//                 tensor's first element, to its own slot (two passes over a chunk that stays in L1/L2);
//   2. finalize:  one block per tensor merges that tensor's partials in double, in a fixed tree, and
//                 publishes (shift, mean, multiplier) — the shift too, since stage 3 overwrites element 0;
//   3. normalize: one block per chunk writes ((x - shift) - mean) * multiplier.
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

// Sum over the block in a fixed order (shuffle tree per warp, then the warp sums by warp 0); every thread
// gets the total.
template <typename A>
__device__ A block_sum(A v) {
  __shared__ A warp_sums[kThreads / 32 + 1];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_sums[lane] : A(0);
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) warp_sums[kThreads / 32] = v;
  }
  __syncthreads();
  const A total = warp_sums[kThreads / 32];
  __syncthreads();  // the next call may overwrite warp_sums
  return total;
}

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T v) {
  return static_cast<acc_t<T>>(v);
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
  const A shift = to_acc(x[0]);

  A acc[kUnroll] = {};
  for (int64_t base = begin + threadIdx.x; base < end; base += kUnroll * kThreads) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < end) acc[u] += to_acc(x[i]) - shift;
    }
  }
  const A len = static_cast<A>(end - begin);
  const A mean = block_sum<A>((acc[0] + acc[1]) + (acc[2] + acc[3])) / len;

  A sq[kUnroll] = {};
  for (int64_t base = begin + threadIdx.x; base < end; base += kUnroll * kThreads) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < end) {
        const A d = (to_acc(x[i]) - shift) - mean;
        sq[u] += d * d;
      }
    }
  }
  const A m2 = block_sum<A>((sq[0] + sq[1]) + (sq[2] + sq[3]));
  if (threadIdx.x == 0) {
    partials[3 * chunk] = static_cast<double>(end - begin);
    partials[3 * chunk + 1] = static_cast<double>(mean);
    partials[3 * chunk + 2] = static_cast<double>(m2);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(TableView table, const double* __restrict__ partials, double* __restrict__ finals, double eps,
                    double correction, const double* __restrict__ scale) {
  __shared__ double s_n[kThreads], s_mean[kThreads], s_m2[kThreads];
  const int64_t t = blockIdx.x;
  const int64_t first = table.first_chunk(t), last = table.first_chunk(t + 1);
  // Thread j merges chunks j, j + kThreads, ... in order; then a fixed pairwise tree over the threads.
  Moments m;
  for (int64_t c = first + threadIdx.x; c < last; c += kThreads) {
    m = merge(m, Moments{partials[3 * c], partials[3 * c + 1], partials[3 * c + 2]});
  }
  s_n[threadIdx.x] = m.n;
  s_mean[threadIdx.x] = m.mean;
  s_m2[threadIdx.x] = m.m2;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width >>= 1) {
    if (threadIdx.x < width) {
      const Moments a{s_n[threadIdx.x], s_mean[threadIdx.x], s_m2[threadIdx.x]};
      const Moments b{s_n[threadIdx.x + width], s_mean[threadIdx.x + width], s_m2[threadIdx.x + width]};
      const Moments r = merge(a, b);
      s_n[threadIdx.x] = r.n;
      s_mean[threadIdx.x] = r.mean;
      s_m2[threadIdx.x] = r.m2;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const Moments total{s_n[0], s_mean[0], s_m2[0]};
    const T* x = reinterpret_cast<const T*>(table.ptr(t));
    finals[3 * t] = static_cast<double>(to_acc(x[0]));
    finals[3 * t + 1] = total.mean;
    finals[3 * t + 2] = multiplier(total, eps, correction, scale);
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
  const A shift = static_cast<A>(finals[3 * t]);
  const A mean = static_cast<A>(finals[3 * t + 1]);
  const A mult = static_cast<A>(finals[3 * t + 2]);
  for (int64_t base = begin + threadIdx.x; base < end; base += kUnroll * kThreads) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < end) x[i] = static_cast<T>(((to_acc(x[i]) - shift) - mean) * mult);
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
  const at::Tensor partials = at::empty({3 * chunks}, at::TensorOptions().dtype(at::kDouble).device(device));
  const at::Tensor finals = at::empty({3 * ntensors}, at::TensorOptions().dtype(at::kDouble).device(device));
  const TableView view{table.data_ptr<int64_t>(), ntensors};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());

  stats_kernel<T><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(view, partials.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize_kernel<T><<<static_cast<unsigned>(ntensors), kThreads, 0, stream>>>(
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
