// The device-table cache of the CUDA kernels (cuda_znorm.cu, cuda_optim.cu): the tables of tensor addresses,
// sizes and first chunk numbers that their blocks search (TableView, cuda_common.cuh), built once and reused
// while the same tensors come back. Host code only; the definitions are in cuda_table_cache.cpp.
//
// A table depends only on its tensors' addresses and sizes (and, in the rare lists that need them, their
// positions in the list: the rows of `stats`), so it is cached under (device, dtype, addresses, sizes, rows),
// the least recently used of kTableCacheSize (cuda_table_cache.cpp) entries out first: a call with the same
// tensors as a recent one allocates no pinned memory and copies nothing. A cached table is read-only device
// memory.
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
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/Stream.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <list>
#include <mutex>
#include <vector>

#include "znorm.h"

namespace znorm {

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

// What a launch needs of a table.
struct Table {
  at::Tensor data;  // int64 on the device: 3 * ntensors + 1 values (TableView), then the rows if has_rows
  int64_t ntensors = 0;
  int64_t chunks = 0;
  bool has_rows = false;
  int64_t extra_offset = 0;  // where the extra section starts (3 * ntensors + 1, + ntensors with rows)
};

class TableCache {
 public:
  // The table for `spans` on `device` (the current device, under the caller's guard), usable on `stream`.
  // `extra`: values appended to the table (part of the key), at Table::extra_offset.
  Table get(const std::vector<Span>& spans, c10::Device device, at::ScalarType dtype,
            const c10::cuda::CUDAStream& stream, bool capturing, std::vector<int64_t> extra = {});

  // A per-call array of host values (the fused Adam step's per-tensor step sizes) as a float64 tensor on
  // `device`, copied on `stream` without synchronization. Outside capture from a pinned block of the caching
  // host allocator (kept until the copy has run); during capture from a pinned buffer that is never freed,
  // since the captured copy reads it at every replay (the values are those of the captured call, as a kernel
  // argument's would be), into the graph's pool.
  at::Tensor upload(const std::vector<double>& values, c10::Device device, const c10::cuda::CUDAStream& stream,
                    bool capturing);

  // hits, eager builds, evictions, cached entries, builds during capture, tables kept for graphs, streams
  // recorded on cached tables.
  std::vector<int64_t> stats();

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

// The process's cache. Never destroyed: tables may be read by work still queued (or by graphs) when the process
// exits, and freeing device memory after CUDA has shut down fails.
TableCache& table_cache();

}  // namespace znorm
