// The CUDA kernel of znorm_kernels_C::znorm_: ZNorm of a whole list of tensors in three launches per dtype.
//
// Multi-tensor apply in the manner of apex: the tensors' addresses, sizes and first chunk numbers travel in
// one int64 table on the device, and every block finds its tensor by a binary search over the chunk numbers,
// so the table is O(tensors), not O(chunks). Tables are cached (TableCache below): a call with the same
// tensors as a recent one (an optimizer's gradients, step after step) allocates and copies nothing but its
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
// same elements in the same order (see visit_chunk), so the bits depend on neither alignment nor run: every
// reduction order is fixed by the sizes alone. Element indices are 64-bit (32-bit inside a chunk). No
// host-device synchronization: the GradScaler scale is read on the device, and the table copy is
// stream-ordered from pinned memory.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <list>
#include <mutex>
#include <optional>
#include <vector>

#include "znorm.h"

namespace znorm {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;       // independent accumulators per thread: loads in flight, not a serial add chain
constexpr int64_t kChunk = 8192;  // elements per block in stages 1 and 3: 32 per thread
// Bits of a fused optimizer step's per-tensor flags (its table's flags section).
constexpr int64_t kTreated = 1;  // ZNorm applies (treated and at least 2 elements): statistics computed
constexpr int64_t kFirst = 2;    // SGD: the momentum buffer is new and becomes d
constexpr int64_t kAligned = 4;  // every tensor of the entry (grad, param, states) is 16-byte aligned

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Elements per 128-bit vector, and the vector itself (a 16-byte aligned array, loaded and stored whole).
template <typename T>
constexpr int kVec = static_cast<int>(16 / sizeof(T));
template <typename T>
struct alignas(16) Pack {
  T v[kVec<T>];
};
static_assert((kChunk * 2) % 16 == 0, "chunk starts of 16-byte aligned tensors must stay aligned");

// The table: ptr[t], numel[t], first_chunk[t] for t < ntensors, then first_chunk[ntensors] = total chunks;
// then, only when some tensor's position in the op's list differs from t (a mixed-dtype list, or one with
// tensors of fewer than 2 elements), row[t], that position: its row of the `stats` output; then the extra
// section of the fused optimizer steps' tables (Table::extra_offset; see update_kernel).
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

// The chunk a block of stages 1 and 3 works on: its first element, its length (<= kChunk) and whether its
// tensor's address allows 128-bit accesses (decided per tensor, from the pointer, uniform over the block).
template <typename T>
struct ChunkRef {
  T* x;
  int len;
  bool aligned;
};

template <typename T>
__device__ __forceinline__ ChunkRef<T> chunk_of(const TableView& table, int64_t chunk, int64_t& t) {
  t = table.owner(chunk);
  const int64_t begin = (chunk - table.first_chunk(t)) * kChunk;
  const int64_t n = table.numel(t);
  const int64_t addr = table.ptr(t);
  const int len = static_cast<int>(n - begin < kChunk ? n - begin : kChunk);  // 64-bit until here
  T* x = reinterpret_cast<T*>(addr) + begin;
  __builtin_assume(__isGlobal(x));  // tensor memory: global loads and stores (ld.global), not generic ones
  return {x, len, addr % 16 == 0};
}

// This thread's share of a chunk, in a fixed order that does not depend on alignment. Slot s = threadIdx.x +
// kThreads * (u + kUnroll * k) covers elements [kVec * s, kVec * s + kVec); slot u of each round feeds
// accumulator u, element by element in index order. Aligned chunks load a full slot as one 128-bit vector
// (a whole round of kUnroll slots at once when it fits: kUnroll loads in flight); unaligned tensors, and the
// partial slot at a tensor's end, go element by element, in the same order. f(u, value) folds one element.
template <typename T, typename F>
__device__ __forceinline__ void visit_chunk(const T* __restrict__ x, int len, bool aligned, F&& f) {
  constexpr int V = kVec<T>;
  for (int base = V * static_cast<int>(threadIdx.x); base < len; base += V * kUnroll * kThreads) {
    if (aligned && base + (kUnroll - 1) * V * kThreads + V <= len) {
      Pack<T> p[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) p[u] = *reinterpret_cast<const Pack<T>*>(x + base + u * V * kThreads);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int j = 0; j < V; ++j) f(u, p[u].v[j]);
      }
      continue;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * V * kThreads;
      if (aligned && i + V <= len) {
        const Pack<T> p = *reinterpret_cast<const Pack<T>*>(x + i);
#pragma unroll
        for (int j = 0; j < V; ++j) f(u, p.v[j]);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (i + j < len) f(u, x[i + j]);
        }
      }
    }
  }
}

// x[i] = f(x[i]) over this thread's share of a chunk (the same slots as visit_chunk; order is immaterial).
template <typename T, typename F>
__device__ __forceinline__ void transform_chunk(T* __restrict__ x, int len, bool aligned, F&& f) {
  constexpr int V = kVec<T>;
  for (int base = V * static_cast<int>(threadIdx.x); base < len; base += V * kUnroll * kThreads) {
    if (aligned && base + (kUnroll - 1) * V * kThreads + V <= len) {
      Pack<T> p[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) p[u] = *reinterpret_cast<const Pack<T>*>(x + base + u * V * kThreads);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int j = 0; j < V; ++j) p[u].v[j] = f(p[u].v[j]);
        *reinterpret_cast<Pack<T>*>(x + base + u * V * kThreads) = p[u];
      }
      continue;
    }
#pragma unroll 1  // the rare partial round: compact code (f does not depend on u here)
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * V * kThreads;
      if (aligned && i + V <= len) {
        Pack<T> p = *reinterpret_cast<const Pack<T>*>(x + i);
#pragma unroll
        for (int j = 0; j < V; ++j) p.v[j] = f(p.v[j]);
        *reinterpret_cast<Pack<T>*>(x + i) = p;
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (i + j < len) x[i + j] = f(x[i + j]);
        }
      }
    }
  }
}
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

// At least 5 blocks per SM (48 registers, no spills, sm_90): without the bound the float32 kernel takes 58
// registers, which leaves room for 4.
template <typename T>
__global__ void __launch_bounds__(kThreads, 5)
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
  if (threadIdx.x == 0) {
    double* slot = partials + 5 * chunk;
    slot[0] = m.n;
    slot[1] = m.mean;
    slot[2] = m.m2;
    slot[3] = m.lo;
    slot[4] = m.hi;
  }
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
    finals[3 * t + 2] = f.wide ? 1.0 : 0.0;
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
  const double mean = finals[3 * t], inv = finals[3 * t + 1];
  if (!std::is_same_v<A, double> && finals[3 * t + 2] != 0.0) {
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

// ---------------------------------------------------------------------------------------------------------
// The table cache.
//
// A table depends only on its tensors' addresses and sizes (and, in the rare lists that need them, their
// positions in the list: the rows of `stats`), so it is cached under (device, dtype, addresses, sizes, rows),
// the least recently used of kTableCacheSize entries out first: a call with the same tensors as a
// recent one allocates no pinned memory and copies nothing. A cached table is read-only device memory.
//
// Streams: a table is allocated and filled on the stream current when it is built; it may then be read on
// other streams. Its first use on each other stream records that stream on its storage
// (CUDACachingAllocator::recordStream), so once evicted its memory is not reused before the work queued on
// every stream that read it has run. (The fill itself precedes any use on another stream through the data:
// the call that builds a table writes every tensor in it, so a correct program orders a later call on the
// same tensors after that one.) The per-call workspaces (partials, finals) are allocated on the current
// stream and freed at the end of the call, which the caching allocator makes safe by itself.
//
// CUDA-graph capture: a captured kernel reads its table at every replay, for as long as the graph may be
// replayed, so a table used during capture is never freed nor changed: graph_tables_ holds it for the life of
// the process (a few KB each). A cached table is filled already (its copy ran eagerly) and is simply kept.
// A table not cached is built for that capture alone: its pinned host buffer is never freed either (the
// captured memcpy reads it at every replay; cudaHostAlloc outside the caching host allocator, so no event
// or reuse can touch it), the copy is captured on the capturing stream, and the device memory comes from the
// graph's private pool, like the per-call workspaces allocated during capture (which the graph owns and
// reuses correctly on each replay). Such a table never enters the cache: its captured copy runs only when
// the graph replays, so until then the device memory holds nothing another call could read.

constexpr size_t kTableCacheSize = 16;

struct TableKey {
  c10::DeviceIndex device = 0;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> ptrs, numels;
  std::vector<int64_t> rows;  // each tensor's position in the op's list; empty when it is its index here
  std::vector<int64_t> extra;  // appended after the rows (the fused optimizer steps' pointers and flags)
  uint64_t hash = 0;

  bool operator==(const TableKey& o) const {
    return hash == o.hash && device == o.device && dtype == o.dtype && ptrs == o.ptrs && numels == o.numels &&
           rows == o.rows && extra == o.extra;
  }
};

TableKey key_of(const std::vector<Span>& spans, c10::Device device, at::ScalarType dtype,
                std::vector<int64_t> extra) {
  TableKey key;
  key.device = device.index();
  key.dtype = dtype;
  key.ptrs.reserve(spans.size());
  key.numels.reserve(spans.size());
  uint64_t h = 0x9e3779b97f4a7c15ull ^ (static_cast<uint64_t>(key.device) << 8) ^ static_cast<uint64_t>(dtype);
  const auto mix = [&h](uint64_t v) {
    h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  };
  for (const Span& s : spans) {
    key.ptrs.push_back(reinterpret_cast<int64_t>(s.data));
    key.numels.push_back(s.numel);
    mix(static_cast<uint64_t>(key.ptrs.back()));
    mix(static_cast<uint64_t>(s.numel));
  }
  const auto n = static_cast<int64_t>(spans.size());
  bool identity = true;
  for (int64_t t = 0; t < n && identity; ++t) identity = spans[t].index == t;
  if (!identity) {
    key.rows.reserve(spans.size());
    for (const Span& s : spans) {
      key.rows.push_back(s.index);
      mix(static_cast<uint64_t>(s.index));
    }
  }
  for (const int64_t v : extra) mix(static_cast<uint64_t>(v));
  mix(static_cast<uint64_t>(extra.size()));
  key.extra = std::move(extra);
  key.hash = h;
  return key;
}

// What a launch needs of a table.
struct Table {
  at::Tensor data;  // int64 on the device: 3 * ntensors + 1 values (TableView), then the rows if has_rows
  int64_t ntensors = 0;
  int64_t chunks = 0;
  bool has_rows = false;
  int64_t extra_offset = 0;  // where the extra section starts (3 * ntensors + 1, + ntensors with rows)
};

int64_t count_chunks(const std::vector<Span>& spans) {
  int64_t chunks = 0;
  for (const Span& s : spans) chunks += (s.numel + kChunk - 1) / kChunk;
  TORCH_CHECK(chunks <= std::numeric_limits<int32_t>::max(), "znorm_: too many elements for one call (", chunks,
              " chunks)");
  return chunks;
}

void fill_table(int64_t* h, const std::vector<Span>& spans, bool has_rows, const std::vector<int64_t>& extra) {
  const auto n = static_cast<int64_t>(spans.size());
  int64_t chunks = 0;
  for (int64_t t = 0; t < n; ++t) {
    h[t] = reinterpret_cast<int64_t>(spans[t].data);
    h[n + t] = spans[t].numel;
    h[2 * n + t] = chunks;
    chunks += (spans[t].numel + kChunk - 1) / kChunk;
  }
  h[3 * n] = chunks;
  if (has_rows) {
    for (int64_t t = 0; t < n; ++t) h[3 * n + 1 + t] = spans[t].index;
  }
  std::copy(extra.begin(), extra.end(), h + 3 * n + 1 + (has_rows ? n : 0));
}

class TableCache {
 public:
  // The table for `spans` on `device` (the current device, under the caller's guard), usable on `stream`.
  // `extra`: values appended to the table (part of the key), at Table::extra_offset.
  Table get(const std::vector<Span>& spans, c10::Device device, at::ScalarType dtype,
            const c10::cuda::CUDAStream& stream, bool capturing, std::vector<int64_t> extra = {}) {
    TableKey key = key_of(spans, device, dtype, std::move(extra));
    const std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = lru_.begin(); it != lru_.end(); ++it) {
      if (!(it->key == key)) continue;
      lru_.splice(lru_.begin(), lru_, it);  // most recently used first
      Entry& e = lru_.front();
      ++hits_;
      if (capturing) {
        if (!e.for_graphs) {
          graph_tables_.push_back(e.table.data);
          e.for_graphs = true;
        }
      } else if (!e.for_graphs && stream.id() != e.home &&
                 std::find(e.streams.begin(), e.streams.end(), stream.id()) == e.streams.end()) {
        c10::cuda::CUDACachingAllocator::recordStream(e.table.data.storage().data_ptr(), stream);
        e.streams.push_back(stream.id());
        ++stream_records_;
      }
      return e.table;
    }
    const auto n = static_cast<int64_t>(spans.size());
    TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "znorm_: too many tensors for one call (", n, ")");
    const bool has_rows = !key.rows.empty();
    Table table{at::Tensor(), n, count_chunks(spans), has_rows, 3 * n + 1 + (has_rows ? n : 0)};
    const int64_t len = table.extra_offset + static_cast<int64_t>(key.extra.size());
    const size_t bytes = static_cast<size_t>(len) * sizeof(int64_t);
    if (capturing) {
      // Never freed: the captured copy reads this buffer at every replay (see above). Relaxed capture mode,
      // since cudaHostAlloc counts as unsafe in the default (global) one.
      void* host = nullptr;
      {
        const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
        C10_CUDA_CHECK(cudaHostAlloc(&host, bytes, cudaHostAllocPortable));
      }
      fill_table(static_cast<int64_t*>(host), spans, has_rows, key.extra);
      table.data = at::empty({len}, at::TensorOptions().dtype(at::kLong).device(device));  // graph's pool
      C10_CUDA_CHECK(cudaMemcpyAsync(table.data.data_ptr(), host, bytes, cudaMemcpyHostToDevice, stream.stream()));
      graph_tables_.push_back(table.data);
      graph_host_.push_back(host);
      ++graph_builds_;
      return table;
    }
    // Stream-ordered copy from pinned memory: no synchronization, and the caching host allocator keeps the
    // pinned block alive until the copy has run.
    at::Tensor host = at::empty({len}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    fill_table(host.data_ptr<int64_t>(), spans, has_rows, key.extra);
    table.data = host.to(device, /*non_blocking=*/true);
    ++builds_;
    lru_.push_front(Entry{std::move(key), table, stream.id(), {}, false});
    if (lru_.size() > kTableCacheSize) {
      lru_.pop_back();  // its memory returns to the allocator, reused only once every stream that read it is past
      ++evictions_;
    }
    return table;
  }

  // A per-call array of host values (the fused Adam step's per-tensor step sizes) as a float64 tensor on
  // `device`, copied on `stream` without synchronization. Outside capture from a pinned block of the caching
  // host allocator (kept until the copy has run); during capture from a pinned buffer that is never freed,
  // since the captured copy reads it at every replay (the values are those of the captured call, as a kernel
  // argument's would be), into the graph's pool.
  at::Tensor upload(const std::vector<double>& values, c10::Device device, const c10::cuda::CUDAStream& stream,
                    bool capturing) {
    const auto len = static_cast<int64_t>(values.size());
    if (!capturing) {
      at::Tensor host = at::empty({len}, at::TensorOptions().dtype(at::kDouble).pinned_memory(true));
      std::copy(values.begin(), values.end(), host.data_ptr<double>());
      return host.to(device, /*non_blocking=*/true);
    }
    const size_t bytes = values.size() * sizeof(double);
    void* host = nullptr;
    {
      const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
      C10_CUDA_CHECK(cudaHostAlloc(&host, bytes, cudaHostAllocPortable));
    }
    std::memcpy(host, values.data(), bytes);
    at::Tensor out = at::empty({len}, at::TensorOptions().dtype(at::kDouble).device(device));
    C10_CUDA_CHECK(cudaMemcpyAsync(out.data_ptr(), host, bytes, cudaMemcpyHostToDevice, stream.stream()));
    const std::lock_guard<std::mutex> lock(mutex_);
    graph_host_.push_back(host);
    return out;
  }

  // hits, eager builds, evictions, cached entries, builds during capture, tables kept for graphs, streams
  // recorded on cached tables.
  std::vector<int64_t> stats() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return {hits_,
            builds_,
            evictions_,
            static_cast<int64_t>(lru_.size()),
            graph_builds_,
            static_cast<int64_t>(graph_tables_.size()),
            stream_records_};
  }

 private:
  struct Entry {
    TableKey key;
    Table table;
    c10::StreamId home;                  // the stream its memory was allocated (and filled) on
    std::vector<c10::StreamId> streams;  // other streams recorded on its storage
    bool for_graphs;                     // also held in graph_tables_: never freed
  };

  std::mutex mutex_;
  std::list<Entry> lru_;
  std::vector<at::Tensor> graph_tables_;  // device tables read by captured graphs: never freed
  std::vector<void*> graph_host_;         // their pinned host buffers built during capture: never freed
  int64_t hits_ = 0, builds_ = 0, evictions_ = 0, graph_builds_ = 0, stream_records_ = 0;
};

// Never destroyed: tables may be read by work still queued (or by graphs) when the process exits, and freeing
// device memory after CUDA has shut down fails.
TableCache& table_cache() {
  static TableCache* cache = new TableCache();
  return *cache;
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

  stats_kernel<T><<<static_cast<unsigned>(table.chunks), kThreads, 0, stream.stream()>>>(
      view, partials.data_ptr<double>(), nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize_kernel<<<static_cast<unsigned>(table.ntensors), kThreads, 0, stream.stream()>>>(
      view, partials.data_ptr<double>(), finals.data_ptr<double>(), eps, correction, scale, stats,
      table.has_rows ? view.base + 3 * table.ntensors + 1 : nullptr, nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  normalize_kernel<T><<<static_cast<unsigned>(table.chunks), kThreads, 0, stream.stream()>>>(
      view, finals.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void znorm_cuda(at::TensorList tensors, double eps, double correction, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& stats_out) {
  bool skipped = false;
  if (tensors.empty()) {
    if (stats_out.has_value() && stats_out->defined()) check_stats(stats_out, tensors, stats_out->device(), skipped);
    return;
  }
  const c10::Device device = tensors[0].device();
  // Before the guard: a CUDA stats tensor with CPU tensors lands here, and must get this error, not the guard's.
  double* stats = check_stats(stats_out, tensors, device, skipped);
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
  if (stats != nullptr && skipped) stats_out->fill_(std::numeric_limits<double>::quiet_NaN());
  for (int k = 0; k < 4; ++k) {
    if (by_dtype[k].empty()) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, kDtypes[k], "znorm_cuda", [&] {
      launch<scalar_t>(by_dtype[k], kDtypes[k], eps, correction, scale_ptr, stats, device);
    });
    for (Span& s : by_dtype[k]) s.finish();
  }
}

// ---------------------------------------------------------------------------------------------------------
// The fused optimizer steps, znorm_sgd_step_ and znorm_adam_step_ (schemas in znorm.h), on CUDA.
//
// Per dtype, three launches on the current stream: stats_kernel and finalize_kernel, the very kernels of
// znorm_ (so mean and multiplier, hence z, are bitwise what the "cuda" backend's znorm_ writes), over a
// cached table of every tensor of at least one element; tensors without statistics (untreated, one element)
// are flagged, their chunks skipped and their finals the identity (z = g). Then update_kernel, one block per
// chunk: z as normalize_kernel computes it, then torch.optim's update in A (float32; float64 for float64
// tensors), operation by operation as the CPU kernels (cpu_optim_kernels.h): every operation correctly
// rounded on its own (__f*_rn / __d*_rn intrinsics: no FMA contraction whatever the compiler flags, division
// and square root correctly rounded), each stored value rounded once to T and read back from it.
//
// The table's extra section (cached with it: the same params, grads and states step after step hit the
// cache): p[n], s0[n], s1[n], s2[n], flags[n] (kTreated, kFirst, kAligned). Adam's per-tensor step_size and
// bias_correction2_sqrt: kernel arguments when every tensor of the call has the same (the common case), else
// a per-call float64 array uploaded by TableCache::upload (graph-capturable, the values of the captured call).

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }

// x rounded to T, in A (the value a store of x into a T tensor reads back).
template <typename T, typename A>
__device__ __forceinline__ A round_to(A x) {
  return static_cast<A>(to_acc(static_cast<T>(x)));
}

// The per-call scalars in A (Python floats rounded once to A on the host, as the CPU kernels take them).
template <typename A>
struct OptArgs {
  // SGD
  A lr, momentum, one_minus_dampening, weight_decay, sign;
  bool nesterov;
  // Adam (weight_decay and sign above too)
  A weight, one_minus_weight, beta2, one_minus_beta2, decay_factor, eps;
  bool small_weight;
  A step_size, bc2_sqrt;        // when per_tensor is nullptr: every tensor's
  const double* per_tensor;     // else [2 * ntensors]: (step_size, bias_correction2_sqrt) of tensor t
  bool write_grad;
};

// One element of torch.optim.SGD on z (cpu_optim_kernels.h, sgd_run).
template <typename T, typename A, bool WD, bool MOM>
__device__ __forceinline__ void sgd_elem(A z, T& p, T& b, bool first, const OptArgs<A>& a) {
  const A pv = to_acc(p);
  A d = mul_rn(z, a.sign);
  if (WD) d = add_rn(d, mul_rn(a.weight_decay, pv));
  if (MOM) {
    const A bv = first ? round_to<T, A>(d)
                       : round_to<T, A>(add_rn(mul_rn(static_cast<A>(to_acc(b)), a.momentum),
                                               mul_rn(a.one_minus_dampening, d)));
    b = static_cast<T>(bv);  // exact
    d = a.nesterov ? add_rn(d, mul_rn(a.momentum, bv)) : bv;
  }
  p = static_cast<T>(sub_rn(pv, mul_rn(a.lr, d)));
}

// One element of torch.optim.Adam (WD = 1) / AdamW (WD = 2) on z (cpu_optim_kernels.h, adam_run).
template <typename T, typename A, int WD, bool AMS>
__device__ __forceinline__ void adam_elem(A z, T& p, T& m, T& v, T& vmax, A step_size, A bc2,
                                          const OptArgs<A>& a) {
  A pv = to_acc(p);
  A d = mul_rn(z, a.sign);
  if (WD == 1) d = add_rn(d, mul_rn(a.weight_decay, pv));
  const A mv = to_acc(m);
  const A diff = sub_rn(d, mv);
  const T mt = static_cast<T>(a.small_weight ? add_rn(mv, mul_rn(a.weight, diff))
                                             : sub_rn(d, mul_rn(diff, a.one_minus_weight)));
  m = mt;
  const A vv = to_acc(v);
  A vx = round_to<T, A>(add_rn(mul_rn(vv, a.beta2), mul_rn(mul_rn(a.one_minus_beta2, d), d)));
  v = static_cast<T>(vx);  // exact
  if (AMS) {
    const A old = to_acc(vmax);
    A r = old > vx ? old : vx;
    r = old != old ? old : r;
    r = vx != vx ? vx : r;
    vx = r;
    vmax = static_cast<T>(vx);  // exact
  }
  const A root = sqrt_rn(vx);
  if (WD == 2) pv = mul_rn(pv, a.decay_factor);
  const A denom = add_rn(div_rn(root, bc2), a.eps);
  p = static_cast<T>(sub_rn(pv, div_rn(mul_rn(step_size, static_cast<A>(to_acc(mt))), denom)));
}

// KIND 0: SGD (X = momentum), 1: Adam (WD: 0 none, 1 L2, 2 decoupled; X = amsgrad). NS: states read/written.
template <typename T, int KIND, int WD, bool X>
__global__ void __launch_bounds__(kThreads)
    update_kernel(TableView table, int64_t extra, const double* __restrict__ finals, OptArgs<acc_t<T>> a) {
  using A = acc_t<T>;
  constexpr int NS = KIND == 0 ? (X ? 1 : 0) : (X ? 3 : 2);
  constexpr int V = kVec<T>;
  int64_t t;
  const ChunkRef<T> c = chunk_of<T>(table, blockIdx.x, t);
  const int64_t n = table.ntensors;
  const int64_t* ex = table.base + extra;
  const int64_t flags = ex[4 * n + t];
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) - table.first_chunk(t)) * kChunk;
  T* __restrict__ g = c.x;
  T* __restrict__ p = reinterpret_cast<T*>(ex[t]) + begin;
  T* s[3];
#pragma unroll
  for (int j = 0; j < 3; ++j) s[j] = j < NS ? reinterpret_cast<T*>(ex[(j + 1) * n + t]) + begin : nullptr;
  const bool aligned = (flags & kAligned) != 0;
  const bool first = (flags & kFirst) != 0;
  const bool store_g = a.write_grad && (flags & kTreated) != 0;  // z = g elsewhere: nothing to write
  const double mean = finals[3 * t], inv = finals[3 * t + 1];
  const bool wide = !std::is_same_v<A, double> && finals[3 * t + 2] != 0.0;
  const A hi = static_cast<A>(mean);
  const A lo = static_cast<A>(mean - static_cast<double>(hi));
  const A mult = static_cast<A>(inv);
  A step_size = a.step_size, bc2 = a.bc2_sqrt;
  if (KIND == 1 && a.per_tensor != nullptr) {
    step_size = static_cast<A>(a.per_tensor[2 * t]);
    bc2 = static_cast<A>(a.per_tensor[2 * t + 1]);
  }
  // z exactly as normalize_kernel writes it (rounded to T), in A.
  const auto zscore = [&](T x) -> T {
    if (wide) {
      return static_cast<T>(static_cast<A>(__dmul_rn(__dsub_rn(static_cast<double>(to_acc(x)), mean), inv)));
    }
    return static_cast<T>(mul_rn(sub_rn(sub_rn(to_acc(x), hi), lo), mult));
  };
  const auto elem = [&](T& gv, T& pv, T& s0, T& s1, T& s2) {
    const T zt = zscore(gv);
    if (store_g) gv = zt;
    const A z = to_acc(zt);
    if constexpr (KIND == 0) {
      sgd_elem<T, A, WD != 0, X>(z, pv, s0, first, a);  // (inlined: `a` is read from the parameter space)
    } else {
      adam_elem<T, A, WD, X>(z, pv, s0, s1, s2, step_size, bc2, a);
    }
  };
  // A new momentum buffer (first) is read like the others, as the CPU kernel does; its value is not used.
  for (int base = V * static_cast<int>(threadIdx.x); base < c.len; base += V * kThreads) {
    if (aligned && base + V <= c.len) {
      Pack<T> gp = *reinterpret_cast<const Pack<T>*>(g + base);
      Pack<T> pp = *reinterpret_cast<const Pack<T>*>(p + base);
      Pack<T> sp[3] = {};  // states beyond NS: unused registers
#pragma unroll
      for (int j = 0; j < NS; ++j) sp[j] = *reinterpret_cast<const Pack<T>*>(s[j] + base);
#pragma unroll
      for (int e = 0; e < V; ++e) elem(gp.v[e], pp.v[e], sp[0].v[e], sp[1].v[e], sp[2].v[e]);
      if (store_g) *reinterpret_cast<Pack<T>*>(g + base) = gp;
      *reinterpret_cast<Pack<T>*>(p + base) = pp;
#pragma unroll
      for (int j = 0; j < NS; ++j) *reinterpret_cast<Pack<T>*>(s[j] + base) = sp[j];
      continue;
    }
    // The rare unaligned or partial slot, element by element (the same operations).
#pragma unroll 1
    for (int i = base; i < base + V && i < c.len; ++i) {
      T gv = g[i], pv = p[i], sv[3] = {T(0), T(0), T(0)};
#pragma unroll
      for (int j = 0; j < NS; ++j) sv[j] = s[j][i];
      elem(gv, pv, sv[0], sv[1], sv[2]);
      if (store_g) g[i] = gv;
      p[i] = pv;
#pragma unroll
      for (int j = 0; j < NS; ++j) s[j][i] = sv[j];
    }
  }
}

// One entry of a fused step: a tensor of at least one element.
struct OptItem {
  const at::Tensor* grad;
  int64_t index;
  int64_t ptrs[4];  // param, states
  int64_t flags;
  double step_size, bc2;
};

// Checks the lists of one step (nothing is written before every check has passed; the CPU op's checks) and
// splits the tensors of at least one element by dtype.
std::array<std::vector<OptItem>, 4> cuda_optim_items(const char* op, at::TensorList params, at::TensorList grads,
                                                     const std::vector<at::TensorList>& states,
                                                     at::IntArrayRef treated, const c10::Device& device) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, op, ": ", grads.size(), " grads for ", n, " params");
  TORCH_CHECK(treated.size() == n, op, ": ", treated.size(), " treated flags for ", n, " params");
  for (const at::TensorList& l : states) {
    TORCH_CHECK(l.size() == n, op, ": a state list has ", l.size(), " tensors for ", n, " params");
  }
  std::array<std::vector<OptItem>, 4> by_dtype;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device() == device, op, ": params[", i, "] is on ", p.device(), ", expected ", device);
    TORCH_CHECK(p.layout() == at::kStrided, op, ": params[", i, "] is not a dense (strided) tensor");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), op, ": params[", i, "] is not dense (a view with gaps or overlaps)");
    int k = 0;
    while (k < 4 && kDtypes[k] != p.scalar_type()) ++k;
    TORCH_CHECK(k < 4, op, ": params[", i, "] has dtype ", p.scalar_type(),
                "; supported: float32, float16, bfloat16, float64");
    auto same = [&](const at::Tensor& t, const char* what) {
      TORCH_CHECK(t.defined() && t.device() == p.device() && t.layout() == at::kStrided &&
                      t.scalar_type() == p.scalar_type(),
                  op, ": ", what, "[", i, "] must be a strided ", p.scalar_type(), " tensor on ", p.device(),
                  " like its param");
      TORCH_CHECK(t.sizes() == p.sizes() && t.strides() == p.strides(), op, ": ", what, "[", i, "] has shape ",
                  t.sizes(), " and strides ", t.strides(), ", its param ", p.sizes(), " and ", p.strides());
    };
    same(grads[i], "grads");
    for (const at::TensorList& l : states) same(l[i], "states");
    if (p.numel() == 0) continue;
    OptItem e{&grads[i], static_cast<int64_t>(i), {0, 0, 0, 0}, 0, 0.0, 1.0};
    e.ptrs[0] = reinterpret_cast<int64_t>(p.data_ptr());
    bool aligned = e.ptrs[0] % 16 == 0 && reinterpret_cast<int64_t>(grads[i].data_ptr()) % 16 == 0;
    for (size_t j = 0; j < states.size(); ++j) {
      e.ptrs[j + 1] = reinterpret_cast<int64_t>(states[j][i].data_ptr());
      aligned = aligned && e.ptrs[j + 1] % 16 == 0;
    }
    e.flags = (treated[i] != 0 && p.numel() >= 2 ? kTreated : 0) | (aligned ? kAligned : 0);
    by_dtype[k].push_back(e);
  }
  return by_dtype;
}

template <typename T, int KIND, int WD, bool X>
void launch_optim(const std::vector<OptItem>& items, at::ScalarType dtype, double eps, double correction,
                  double* stats, OptArgs<acc_t<T>> args, c10::Device device) {
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  const auto n = static_cast<int64_t>(items.size());
  std::vector<Span> spans;
  spans.reserve(items.size());
  std::vector<int64_t> extra(5 * n);
  for (int64_t t = 0; t < n; ++t) {
    spans.emplace_back(*items[t].grad, items[t].index);  // dense (checked): used in place
    for (int j = 0; j < 4; ++j) extra[j * n + t] = items[t].ptrs[j];
    extra[4 * n + t] = items[t].flags;
  }
  const Table table = table_cache().get(spans, device, dtype, stream, capturing, std::move(extra));
  const at::Tensor partials = at::empty({5 * table.chunks}, at::TensorOptions().dtype(at::kDouble).device(device));
  const at::Tensor finals = at::empty({3 * table.ntensors}, at::TensorOptions().dtype(at::kDouble).device(device));
  const TableView view{table.data.data_ptr<int64_t>(), table.ntensors};
  const int64_t* flags = view.base + table.extra_offset + 4 * n;

  // Adam's per-tensor scalars: kernel arguments when uniform, else a per-call array.
  at::Tensor per_tensor;
  if (KIND == 1) {
    bool uniform = true;
    for (const OptItem& e : items) uniform = uniform && e.step_size == items[0].step_size && e.bc2 == items[0].bc2;
    using A = acc_t<T>;
    args.step_size = static_cast<A>(items[0].step_size);
    args.bc2_sqrt = static_cast<A>(items[0].bc2);
    if (!uniform) {
      std::vector<double> values(2 * n);
      for (int64_t t = 0; t < n; ++t) {
        values[2 * t] = items[t].step_size;
        values[2 * t + 1] = items[t].bc2;
      }
      per_tensor = table_cache().upload(values, device, stream, capturing);
      args.per_tensor = per_tensor.data_ptr<double>();
    }
  }

  stats_kernel<T><<<static_cast<unsigned>(table.chunks), kThreads, 0, stream.stream()>>>(
      view, partials.data_ptr<double>(), flags);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize_kernel<<<static_cast<unsigned>(table.ntensors), kThreads, 0, stream.stream()>>>(
      view, partials.data_ptr<double>(), finals.data_ptr<double>(), eps, correction, nullptr, stats,
      table.has_rows ? view.base + 3 * table.ntensors + 1 : nullptr, flags);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  update_kernel<T, KIND, WD, X><<<static_cast<unsigned>(table.chunks), kThreads, 0, stream.stream()>>>(
      view, table.extra_offset, finals.data_ptr<double>(), args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// NaN rows of `stats` for empty tensors (the finalize kernel writes the rows of the others).
void nan_rows_of_empty(const std::optional<at::Tensor>& stats_out, double* stats, at::TensorList params) {
  if (stats == nullptr) return;
  bool any = false;
  for (const at::Tensor& p : params) any = any || p.numel() == 0;
  if (any) stats_out->fill_(std::numeric_limits<double>::quiet_NaN());
}

void znorm_sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                         at::IntArrayRef treated, at::IntArrayRef first, double znorm_eps, double correction,
                         double lr, double momentum, double dampening, bool nesterov, double weight_decay,
                         bool maximize, bool write_grad, const std::optional<at::Tensor>& stats_out) {
  const char* op = "znorm_sgd_step_";
  const bool mom = momentum != 0.0;
  TORCH_CHECK(mom || momentum_buffers.empty(), op, ": momentum_buffers must be empty without momentum");
  TORCH_CHECK(first.size() == params.size(), op, ": ", first.size(), " first flags for ", params.size(), " params");
  bool skipped = false;
  if (params.empty()) {
    if (stats_out.has_value() && stats_out->defined()) check_stats(stats_out, params, stats_out->device(), skipped);
    return;
  }
  const c10::Device device = params[0].device();
  double* stats = check_stats(stats_out, params, device, skipped);
  const c10::cuda::CUDAGuard guard(device);
  std::vector<at::TensorList> states;
  if (mom) states.push_back(momentum_buffers);
  auto by_dtype = cuda_optim_items(op, params, grads, states, treated, device);  // the last check
  for (auto& items : by_dtype) {
    for (OptItem& e : items) e.flags |= first[e.index] != 0 ? kFirst : 0;
  }
  nan_rows_of_empty(stats_out, stats, params);
  const bool wd = weight_decay != 0.0;
  for (int k = 0; k < 4; ++k) {
    if (by_dtype[k].empty()) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, kDtypes[k], "znorm_sgd_step_cuda", [&] {
      using A = acc_t<scalar_t>;
      OptArgs<A> a{};
      a.lr = static_cast<A>(lr);
      a.momentum = static_cast<A>(momentum);
      a.one_minus_dampening = static_cast<A>(1.0 - dampening);
      a.weight_decay = static_cast<A>(weight_decay);
      a.sign = maximize ? A(-1) : A(1);
      a.nesterov = nesterov;
      a.per_tensor = nullptr;
      a.write_grad = write_grad;
      const auto& items = by_dtype[k];
      const auto dt = kDtypes[k];
      if (wd && mom) return launch_optim<scalar_t, 0, 1, true>(items, dt, znorm_eps, correction, stats, a, device);
      if (wd) return launch_optim<scalar_t, 0, 1, false>(items, dt, znorm_eps, correction, stats, a, device);
      if (mom) return launch_optim<scalar_t, 0, 0, true>(items, dt, znorm_eps, correction, stats, a, device);
      launch_optim<scalar_t, 0, 0, false>(items, dt, znorm_eps, correction, stats, a, device);
    });
  }
}

void znorm_adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::IntArrayRef treated,
                          c10::ArrayRef<double> step_size, c10::ArrayRef<double> bias_correction2_sqrt,
                          double znorm_eps, double correction, bool amsgrad, double beta1, double beta2, double lr,
                          double weight_decay, double eps, bool maximize, bool decoupled, bool write_grad,
                          const std::optional<at::Tensor>& stats_out) {
  const char* op = "znorm_adam_step_";
  TORCH_CHECK(amsgrad || max_exp_avg_sqs.empty(), op, ": max_exp_avg_sqs must be empty without amsgrad");
  TORCH_CHECK(step_size.size() == params.size() && bias_correction2_sqrt.size() == params.size(), op,
              ": step_size and bias_correction2_sqrt need one entry per param");
  bool skipped = false;
  if (params.empty()) {
    if (stats_out.has_value() && stats_out->defined()) check_stats(stats_out, params, stats_out->device(), skipped);
    return;
  }
  const c10::Device device = params[0].device();
  double* stats = check_stats(stats_out, params, device, skipped);
  const c10::cuda::CUDAGuard guard(device);
  std::vector<at::TensorList> states{exp_avgs, exp_avg_sqs};
  if (amsgrad) states.push_back(max_exp_avg_sqs);
  auto by_dtype = cuda_optim_items(op, params, grads, states, treated, device);  // the last check
  for (auto& items : by_dtype) {
    for (OptItem& e : items) {
      e.step_size = step_size[e.index];
      e.bc2 = bias_correction2_sqrt[e.index];
    }
  }
  nan_rows_of_empty(stats_out, stats, params);
  const int wd = weight_decay == 0.0 ? 0 : decoupled ? 2 : 1;
  for (int k = 0; k < 4; ++k) {
    if (by_dtype[k].empty()) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, kDtypes[k], "znorm_adam_step_cuda", [&] {
      using A = acc_t<scalar_t>;
      OptArgs<A> a{};
      const double weight = 1.0 - beta1;
      a.weight = static_cast<A>(weight);
      a.one_minus_weight = A(1) - a.weight;  // in A on the host, as the CPU kernels
      a.small_weight = std::abs(weight) < 0.5;
      a.beta2 = static_cast<A>(beta2);
      a.one_minus_beta2 = static_cast<A>(1.0 - beta2);
      a.weight_decay = static_cast<A>(weight_decay);
      a.decay_factor = static_cast<A>(1.0 - lr * weight_decay);
      a.eps = static_cast<A>(eps);
      a.sign = maximize ? A(-1) : A(1);
      a.per_tensor = nullptr;
      a.write_grad = write_grad;
      const auto& items = by_dtype[k];
      const auto dt = kDtypes[k];
      if (amsgrad) {
        if (wd == 0) return launch_optim<scalar_t, 1, 0, true>(items, dt, znorm_eps, correction, stats, a, device);
        if (wd == 1) return launch_optim<scalar_t, 1, 1, true>(items, dt, znorm_eps, correction, stats, a, device);
        return launch_optim<scalar_t, 1, 2, true>(items, dt, znorm_eps, correction, stats, a, device);
      }
      if (wd == 0) return launch_optim<scalar_t, 1, 0, false>(items, dt, znorm_eps, correction, stats, a, device);
      if (wd == 1) return launch_optim<scalar_t, 1, 1, false>(items, dt, znorm_eps, correction, stats, a, device);
      launch_optim<scalar_t, 1, 2, false>(items, dt, znorm_eps, correction, stats, a, device);
    });
  }
}

// [hits, builds, evictions, entries, graph_builds, graph_tables, stream_records]; for tests and debugging
// (znorm_kernels.backends.native.table_cache_stats names them).
std::vector<int64_t> table_cache_stats() {
  return table_cache().stats();
}

}  // namespace
}  // namespace znorm

TORCH_LIBRARY_FRAGMENT(znorm_kernels_C, m) {
  m.def("table_cache_stats() -> int[]", &znorm::table_cache_stats);
}

TORCH_LIBRARY_IMPL(znorm_kernels_C, CUDA, m) {
  m.impl("znorm_", &znorm::znorm_cuda);
  m.impl("znorm_sgd_step_", &znorm::znorm_sgd_step_cuda);
  m.impl("znorm_adam_step_", &znorm::znorm_adam_step_cuda);
}
