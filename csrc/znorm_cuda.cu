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
// tensors of fewer than 2 elements), row[t], that position: its row of the `stats` output.
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
__global__ void __launch_bounds__(kThreads, 5) stats_kernel(TableView table, double* __restrict__ partials) {
  using A = acc_t<T>;
  const int64_t chunk = blockIdx.x;
  int64_t t;
  const ChunkRef<T> c = chunk_of<T>(table, chunk, t);

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
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(TableView table, const double* __restrict__ partials, double* __restrict__ finals, double eps,
                    double correction, const double* __restrict__ scale, double* __restrict__ stats,
                    const int64_t* __restrict__ rows) {
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
  uint64_t hash = 0;

  bool operator==(const TableKey& o) const {
    return hash == o.hash && device == o.device && dtype == o.dtype && ptrs == o.ptrs && numels == o.numels &&
           rows == o.rows;
  }
};

TableKey key_of(const std::vector<Span>& spans, c10::Device device, at::ScalarType dtype) {
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
  key.hash = h;
  return key;
}

// What a launch needs of a table.
struct Table {
  at::Tensor data;  // int64 on the device: 3 * ntensors + 1 values (TableView), then the rows if has_rows
  int64_t ntensors = 0;
  int64_t chunks = 0;
  bool has_rows = false;
};

int64_t count_chunks(const std::vector<Span>& spans) {
  int64_t chunks = 0;
  for (const Span& s : spans) chunks += (s.numel + kChunk - 1) / kChunk;
  TORCH_CHECK(chunks <= std::numeric_limits<int32_t>::max(), "znorm_: too many elements for one call (", chunks,
              " chunks)");
  return chunks;
}

void fill_table(int64_t* h, const std::vector<Span>& spans, bool has_rows) {
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
}

class TableCache {
 public:
  // The table for `spans` on `device` (the current device, under the caller's guard), usable on `stream`.
  Table get(const std::vector<Span>& spans, c10::Device device, at::ScalarType dtype,
            const c10::cuda::CUDAStream& stream, bool capturing) {
    TableKey key = key_of(spans, device, dtype);
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
    Table table{at::Tensor(), n, count_chunks(spans), has_rows};
    const int64_t len = 3 * n + 1 + (has_rows ? n : 0);
    const size_t bytes = static_cast<size_t>(len) * sizeof(int64_t);
    if (capturing) {
      // Never freed: the captured copy reads this buffer at every replay (see above). Relaxed capture mode,
      // since cudaHostAlloc counts as unsafe in the default (global) one.
      void* host = nullptr;
      {
        const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
        C10_CUDA_CHECK(cudaHostAlloc(&host, bytes, cudaHostAllocPortable));
      }
      fill_table(static_cast<int64_t*>(host), spans, has_rows);
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
    fill_table(host.data_ptr<int64_t>(), spans, has_rows);
    table.data = host.to(device, /*non_blocking=*/true);
    ++builds_;
    lru_.push_front(Entry{std::move(key), table, stream.id(), {}, false});
    if (lru_.size() > kTableCacheSize) {
      lru_.pop_back();  // its memory returns to the allocator, reused only once every stream that read it is past
      ++evictions_;
    }
    return table;
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
      view, partials.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize_kernel<<<static_cast<unsigned>(table.ntensors), kThreads, 0, stream.stream()>>>(
      view, partials.data_ptr<double>(), finals.data_ptr<double>(), eps, correction, scale, stats,
      table.has_rows ? view.base + 3 * table.ntensors + 1 : nullptr);
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
}
