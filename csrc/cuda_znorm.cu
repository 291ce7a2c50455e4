// The CUDA kernel of znorm_kernels_C::znorm_: ZNorm of a whole list of tensors in three launches per dtype.
//
// Multi-tensor apply in the manner of apex: the tensors' addresses, sizes and first chunk numbers travel in
// one int64 table on the device, and every block finds its tensor by a binary search over the chunk numbers,
// so the table is O(tensors), not O(chunks). Tables are cached (TableCache, cuda_table_cache.h): a call with the
// same tensors as a recent one (an optimizer's gradients, step after step) allocates and copies nothing but its
// two small workspaces.
//   1. stats:     one block per chunk of kChunk elements writes (count, mean, M2, min, max) of its chunk to its
//                 own slot: two passes over a chunk that stays in L1/L2 (sum, min, max; then sum(x - m) and
//                 sum((x - m)^2) in double around its rounded mean m; run_moments in znorm.h), no shift by
//                 any element; chunks beyond float's safe range take double throughout;
//   2. finalize:  one block per tensor merges that tensor's partials in double, in a fixed tree, and
//                 publishes (mean, multiplier, wide) (finalize in znorm.h: min == max means constant -> 0),
//                 and (mean, std) to the op's optional `stats` output when it is given;
//   3. normalize: one block per chunk writes ((x - hi) - lo) * multiplier, the mean as a float pair hi + lo
//                 (double arithmetic for "wide" tensors).
// Tensors whose address is 16-byte aligned are read and written in 128-bit vectors (chunk starts are aligned
// too: kChunk * sizeof(T) is a multiple of 16); others element by element. Both paths give every thread the
// same elements in the same order (see visit_chunk, cuda_common.cuh), so the bits depend on neither alignment
// nor run: every reduction order is fixed by the sizes alone. Element indices are 64-bit (32-bit inside a
// chunk). No host-device synchronization: the GradScaler scale is read on the device, and the table copy is
// stream-ordered from pinned memory.
//
// Stages 1 and 2 also serve the fused optimizer steps (cuda_optim.cu), through launch_stats_finalize
// (cuda_znorm.cuh). The sizes (kThreads, kUnroll, kChunk) are in tiles.h (cuda_tiles).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "cuda_common.cuh"
#include "cuda_table_cache.h"
#include "cuda_znorm.cuh"
#include "tiles.h"
#include "znorm.h"

namespace znorm {
namespace {

// Pass 2 of a chunk: sum(x - m) and sum((x - m)^2), in double, over the block; B is the arithmetic type of
// x - m (the chunk's accumulation type, or double for chunks beyond float's safe range).
template <typename B, typename T>
__device__ void centred_sums(const ChunkRef<T>& c, B m, double& s1, double& q) {
  double acc[kUnroll] = {}, sq[kUnroll] = {};
  visit_chunk<T>(c.x, c.len, c.aligned, [&](int u, T v) {
    const double d = static_cast<double>(static_cast<B>(to_acc(v)) - m);
    acc[u] += d;
    sq[u] += d * d;
  });
  s1 = block_reduce<0, double>((acc[0] + acc[1]) + (acc[2] + acc[3]));
  q = block_reduce<0, double>((sq[0] + sq[1]) + (sq[2] + sq[3]));
}

// The block's sum in type B (pass 1 again, in double, for chunks beyond float's safe range).
template <typename B, typename T>
__device__ B chunk_sum(const ChunkRef<T>& c) {
  B acc[kUnroll] = {};
  visit_chunk<T>(c.x, c.len, c.aligned, [&](int u, T v) { acc[u] += static_cast<B>(to_acc(v)); });
  return block_reduce<0, B>((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

// Pass 2 of a chunk, as stats_kernel's ending: its moments into its slot of `partials`.
__device__ __forceinline__ void store_moments(const Moments& m, double* slot) {
  if (threadIdx.x == 0) {
    slot[0] = m.n;
    slot[1] = m.mean;
    slot[2] = m.m2;
    slot[3] = m.lo;
    slot[4] = m.hi;
  }
}

// Both passes again for a float64 chunk of huge or tiny values (range_factor in znorm.h: rare), on its values
// times `factor`, M2 so scaled. Out of line, the chunk by value: the common path keeps its registers.
__device__ __noinline__ void scaled_chunk(const ChunkRef<double> c, double lo, double hi, double factor,
                                          double* slot) {
  double acc[kUnroll] = {};
  visit_chunk<double>(c.x, c.len, c.aligned, [&](int u, double v) { acc[u] += __dmul_rn(v, factor); });
  const double len = static_cast<double>(c.len);
  const double m = block_reduce<0, double>((acc[0] + acc[1]) + (acc[2] + acc[3])) / len;
  double sums[kUnroll] = {}, sq[kUnroll] = {};
  visit_chunk<double>(c.x, c.len, c.aligned, [&](int u, double v) {
    const double d = __dsub_rn(__dmul_rn(v, factor), m);
    sums[u] += d;
    sq[u] += d * d;
  });
  const double s1 = block_reduce<0, double>((sums[0] + sums[1]) + (sums[2] + sums[3]));
  const double q = block_reduce<0, double>((sq[0] + sq[1]) + (sq[2] + sq[3]));
  store_moments(run_moments(len, m, s1, q, lo, hi, factor), slot);
}

// At least kStatsMinBlocksPerSm blocks per SM: without the bound the float32 kernel takes more registers than
// that many blocks leave room for.
template <typename T>
__global__ void __launch_bounds__(kThreads, cuda_tiles::kStatsMinBlocksPerSm)
    stats_kernel(TableView table, double* __restrict__ partials, const int64_t* __restrict__ flags) {
  using A = acc_t<T>;
  const int64_t chunk = blockIdx.x;
  int64_t t;
  const ChunkRef<T> c = chunk_of<T>(table, chunk, t);
  // The fused optimizer steps' tables also hold tensors without statistics (flags bit 0 clear): their chunks
  // are skipped (uniform over the block). znorm_ passes no flags.
  if (flags != nullptr && (flags[t] & kTreated) == 0) return;

  // Pass 1: sum (in A), min and max.
  A acc[kUnroll] = {};
  A mn = std::numeric_limits<A>::infinity(), mx = -std::numeric_limits<A>::infinity();
  visit_chunk<T>(c.x, c.len, c.aligned, [&](int u, T x) {
    const A v = to_acc(x);
    acc[u] += v;
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  });
  const A sum = block_reduce<0, A>((acc[0] + acc[1]) + (acc[2] + acc[3]));
  const double lo = block_reduce<1, A>(mn), hi = block_reduce<2, A>(mx);
  const double len = static_cast<double>(c.len);
  if constexpr (std::is_same_v<A, double>) {
    const double factor = range_factor(lo, hi);  // uniform over the block, as lo and hi are
    if (factor != 1.0) {
      scaled_chunk(c, lo, hi, factor, partials + 5 * chunk);
      return;
    }
  }
  double s1, q;
  Moments m;
  if (std::is_same_v<A, double> || float_safe(lo, hi)) {
    const A mean = sum / static_cast<A>(c.len);
    centred_sums<A>(c, mean, s1, q);
    m = run_moments(len, mean, s1, q, lo, hi);
  } else {
    const double mean = chunk_sum<double>(c) / len;
    centred_sums<double>(c, mean, s1, q);
    m = run_moments(len, mean, s1, q, lo, hi);
  }
  store_moments(m, partials + 5 * chunk);
}

// `stats` (nullptr: not asked for) receives (mean, std) at row rows[t], or row t when rows is nullptr.
// `flags` (the fused optimizer steps; nullptr for znorm_): a tensor whose bit 0 is clear gets the identity
// (mean 0, multiplier 1: z = g exactly) and a NaN row of `stats`.
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(TableView table, const double* __restrict__ partials, double* __restrict__ finals, double eps,
                    double correction, const double* __restrict__ scale, double* __restrict__ stats,
                    const int64_t* __restrict__ rows, const int64_t* __restrict__ flags) {
  __shared__ Moments s_m[kThreads];
  const int64_t t = blockIdx.x;
  if (flags != nullptr && (flags[t] & kTreated) == 0) {
    if (threadIdx.x == 0) {
      finals[3 * t] = 0.0;
      finals[3 * t + 1] = 1.0;
      finals[3 * t + 2] = 0.0;
      if (stats != nullptr) {
        const int64_t row = rows == nullptr ? t : rows[t];
        stats[2 * row] = stats[2 * row + 1] = __longlong_as_double(0x7ff8000000000000ll);
      }
    }
    return;
  }
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
    finals[3 * t + 2] = f.wide ? f.factor : 0.0;
    if (stats != nullptr) {
      const int64_t row = rows == nullptr ? t : rows[t];
      stats[2 * row] = f.mean;
      stats[2 * row + 1] = f.stdev;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) normalize_kernel(TableView table, const double* __restrict__ finals) {
  using A = acc_t<T>;
  int64_t t;
  const ChunkRef<T> c = chunk_of<T>(table, blockIdx.x, t);
  const double mean = finals[3 * t], inv = finals[3 * t + 1], wide = finals[3 * t + 2];
  if constexpr (std::is_same_v<A, double>) {
    // A float64 tensor whose statistics are scaled: `wide` is its factor, `inv` is stored divided by it.
    if (wide != 0.0 && wide != 1.0) {
      const double mean_w = mean * wide;
      transform_chunk<T>(c.x, c.len, c.aligned, [&](T x) { return (x * wide - mean_w) * inv; });
      return;
    }
  } else if (wide != 0.0) {
    // Beyond float's comfortable range: in double (a float tensor's factor is always 1).
    transform_chunk<T>(c.x, c.len, c.aligned, [&](T x) {
      return static_cast<T>(static_cast<A>((static_cast<double>(to_acc(x)) - mean) * inv));
    });
    return;
  }
  // The mean as a pair hi + lo of A values: x - hi is exact near the mean, so the pair keeps its precision.
  const A hi = static_cast<A>(mean);
  const A lo = static_cast<A>(mean - static_cast<double>(hi));
  const A mult = static_cast<A>(inv);
  transform_chunk<T>(c.x, c.len, c.aligned, [&](T x) { return static_cast<T>(((to_acc(x) - hi) - lo) * mult); });
}

template <typename T>
void launch(const std::vector<Span>& spans, at::ScalarType dtype, double eps, double correction,
            const double* scale, double* stats, c10::Device device) {
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  const Table table = table_cache().get(spans, device, dtype, stream, capturing);
  // Workspaces on the current stream (from the graph's private pool during capture).
  const at::Tensor partials = at::empty({5 * table.chunks}, at::TensorOptions().dtype(at::kDouble).device(device));
  const at::Tensor finals = at::empty({3 * table.ntensors}, at::TensorOptions().dtype(at::kDouble).device(device));
  const TableView view{table.data.data_ptr<int64_t>(), table.ntensors};

  launch_stats_finalize<T>(table, partials.data_ptr<double>(), finals.data_ptr<double>(), eps, correction, scale,
                           stats, nullptr, stream.stream());
  normalize_kernel<T><<<static_cast<unsigned>(table.chunks), kThreads, 0, stream.stream()>>>(
      view, finals.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

constexpr char kDispatch[] = "znorm_cuda";

void znorm_cuda(at::TensorList tensors, double eps, double correction, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& stats_out) {
  const CudaCall call = cuda_call(tensors, stats_out);  // `stats` checked before the guard
  if (!call.device) return;
  const c10::Device device = *call.device;
  double* stats = call.stats;
  const c10::cuda::CUDAGuard guard(device);  // every allocation and launch below runs on the tensors' device

  // The scale as a double on the device: converted there, read by the finalize kernel (no .item()).
  at::Tensor scale;
  if (grad_scale.has_value() && grad_scale->defined()) {
    TORCH_CHECK(grad_scale->numel() == 1, "znorm_: grad_scale must hold one value, got ", grad_scale->numel());
    scale = grad_scale->to(device, at::kDouble, /*non_blocking=*/true).reshape({1});
  }
  const double* scale_ptr = scale.defined() ? scale.data_ptr<double>() : nullptr;

  auto by_dtype = spans_by_dtype(tensors, device);  // the last check: nothing is written before it passes
  // Rows of tensors left unchanged get NaN: one fill of the whole output, only in the lists that have them (the
  // Python dispatcher never passes them); the finalize kernels then write the other rows.
  if (stats != nullptr && call.skipped) stats_out->fill_(std::numeric_limits<double>::quiet_NaN());
  for_each_dtype<kDispatch>(by_dtype, [&]<typename T>(int k) {
    launch<T>(by_dtype[k], kDtypes[k], eps, correction, scale_ptr, stats, device);
    for (Span& s : by_dtype[k]) s.finish();
  });
}

}  // namespace

// Stages 1 and 2, for znorm_ (launch above) and the fused optimizer steps (cuda_optim.cu).
template <typename T>
void launch_stats_finalize(const Table& table, double* partials, double* finals, double eps, double correction,
                           const double* scale, double* stats, const int64_t* flags, cudaStream_t stream) {
  const TableView view{table.data.data_ptr<int64_t>(), table.ntensors};
  stats_kernel<T><<<static_cast<unsigned>(table.chunks), kThreads, 0, stream>>>(view, partials, flags);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize_kernel<<<static_cast<unsigned>(table.ntensors), kThreads, 0, stream>>>(
      view, partials, finals, eps, correction, scale, stats,
      table.has_rows ? view.base + 3 * table.ntensors + 1 : nullptr, flags);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define ZNORM_INSTANTIATE(T)                                                                                     \
  template void launch_stats_finalize<T>(const Table&, double*, double*, double, double, const double*, double*, \
                                         const int64_t*, cudaStream_t);
// In AT_DISPATCH_FLOATING_TYPES_AND2's order, the order in which the kernels were instantiated before the split
// (it fixes the layout of the block reductions' static shared arrays: the same bytes of shared memory).
ZNORM_INSTANTIATE(double)
ZNORM_INSTANTIATE(float)
ZNORM_INSTANTIATE(c10::Half)
ZNORM_INSTANTIATE(c10::BFloat16)
#undef ZNORM_INSTANTIATE

}  // namespace znorm

TORCH_LIBRARY_IMPL(znorm_kernels_C, CUDA, m) {
  m.impl("znorm_", &znorm::znorm_cuda);
}
