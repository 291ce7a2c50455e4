// The device-table cache (cuda_table_cache.h, which describes it): building, filling and caching the tables of
// the CUDA kernels, and the op table_cache_stats that reports the cache's counters. Host code only.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <list>
#include <mutex>
#include <utility>
#include <vector>

#include "cuda_table_cache.h"
#include "tiles.h"
#include "znorm.h"

namespace znorm {
namespace {

using cuda_tiles::kChunk;

constexpr size_t kTableCacheSize = 16;

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

}  // namespace

Table TableCache::get(const std::vector<Span>& spans, c10::Device device, at::ScalarType dtype,
                      const c10::cuda::CUDAStream& stream, bool capturing, std::vector<int64_t> extra) {
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
    // Never freed: the captured copy reads this buffer at every replay (cuda_table_cache.h). Relaxed capture mode,
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

at::Tensor TableCache::upload(const std::vector<double>& values, c10::Device device,
                              const c10::cuda::CUDAStream& stream, bool capturing) {
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

std::vector<int64_t> TableCache::stats() {
  const std::lock_guard<std::mutex> lock(mutex_);
  return {hits_,
          builds_,
          evictions_,
          static_cast<int64_t>(lru_.size()),
          graph_builds_,
          static_cast<int64_t>(graph_tables_.size()),
          stream_records_};
}

// Allocated once and never destroyed (see cuda_table_cache.h).
TableCache& table_cache() {
  static TableCache* cache = new TableCache();
  return *cache;
}

namespace {

// [hits, builds, evictions, entries, graph_builds, graph_tables, stream_records]; for tests and debugging
// (the native backend's table_cache_stats names them). Defined in a CUDA build only.
std::vector<int64_t> table_cache_stats() {
  return table_cache().stats();
}

}  // namespace
}  // namespace znorm

TORCH_LIBRARY_FRAGMENT(znorm_kernels_C, m) {
  m.def("table_cache_stats() -> int[]", &znorm::table_cache_stats);
}
