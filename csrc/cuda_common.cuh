// What the CUDA kernels (cuda_znorm.cu, cuda_optim.cu) share: the bits of the fused optimizer steps' per-tensor
// flags, 128-bit packs, the view of a device table (built by cuda_table_cache.cpp) and the chunk a block works on,
// the visit of a chunk in a fixed order, the block reductions, the element -> accumulation type conversion, and,
// on the host, the device of a call (cuda_call). The sizes (kThreads, kUnroll, kChunk) are in tiles.h (cuda_tiles).
//
// Everything here is in an anonymous namespace, as it was when the kernels lived in one file: each .cu gets its
// own internal copies (the build uses no relocatable device code, so device code never crosses a translation
// unit), and no definition is shared between files for the one-definition rule to check.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <optional>
#include <type_traits>

#include "tiles.h"
#include "znorm.h"

namespace znorm {
namespace {

using cuda_tiles::kChunk;
using cuda_tiles::kThreads;
using cuda_tiles::kUnroll;

// Bits of a fused optimizer step's per-tensor flags (its table's flags section).
constexpr int64_t kTreated = 1;  // ZNorm applies (treated and at least 2 elements): statistics computed
constexpr int64_t kFirst = 2;    // SGD: the momentum buffer is new and becomes d
constexpr int64_t kAligned = 4;  // every tensor of the entry (grad, param, states) is 16-byte aligned

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
// section of the fused optimizer steps' tables (Table::extra_offset, cuda_table_cache.h; see update_kernel in
// cuda_optim.cu).
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
// partial slot at a tensor's end, go element by element, in the same order. f(u, v) takes each element v as an
// lvalue: Write, it may change it, and every slot is stored back (a vector slot as one 128-bit store); else x
// may point to const and nothing is stored. The rare partial round of a Write visit is not unrolled (compact
// code).
template <bool Write, typename T, typename F>
__device__ __forceinline__ void chunk_slots(T* __restrict__ x, int len, bool aligned, F&& f) {
  using E = std::remove_const_t<T>;
  constexpr int V = kVec<E>;
  for (int base = V * static_cast<int>(threadIdx.x); base < len; base += V * kUnroll * kThreads) {
    if (aligned && base + (kUnroll - 1) * V * kThreads + V <= len) {
      Pack<E> p[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) p[u] = *reinterpret_cast<const Pack<E>*>(x + base + u * V * kThreads);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int j = 0; j < V; ++j) f(u, p[u].v[j]);
        if constexpr (Write) *reinterpret_cast<Pack<E>*>(x + base + u * V * kThreads) = p[u];
      }
      continue;
    }
#pragma unroll (Write ? 1 : kUnroll)
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * V * kThreads;
      if (aligned && i + V <= len) {
        Pack<E> p = *reinterpret_cast<const Pack<E>*>(x + i);
#pragma unroll
        for (int j = 0; j < V; ++j) f(u, p.v[j]);
        if constexpr (Write) *reinterpret_cast<Pack<E>*>(x + i) = p;
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (i + j < len) f(u, x[i + j]);
        }
      }
    }
  }
}

// f(u, value) folds each element of this thread's share of a chunk (chunk_slots), in its fixed order.
template <typename T, typename F>
__device__ __forceinline__ void visit_chunk(const T* __restrict__ x, int len, bool aligned, F&& f) {
  chunk_slots<false>(x, len, aligned, f);
}

// x[i] = f(x[i]) over this thread's share of a chunk (chunk_slots; order is immaterial).
template <typename T, typename F>
__device__ __forceinline__ void transform_chunk(T* __restrict__ x, int len, bool aligned, F&& f) {
  chunk_slots<true>(x, len, aligned, [&](int, T& v) { v = f(v); });
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

// Element -> accumulation type (acc_t, znorm.h).
template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T v) {
  return static_cast<acc_t<T>>(v);
}

// The start of a CUDA op's call (znorm_, the fused optimizer steps): its device, its first tensor's, with the
// `stats` output checked against it (check_stats, znorm.h) before the caller's device guard (a CUDA stats tensor
// with CPU tensors must get check_stats's error, not the guard's). An empty list has no device: its `stats`, when
// given, is checked against its own, and the op has nothing to do.
struct CudaCall {
  std::optional<c10::Device> device;
  double* stats = nullptr;  // check_stats's
  bool skipped = false;     // check_stats's
};

inline CudaCall cuda_call(at::TensorList tensors, const std::optional<at::Tensor>& stats_out) {
  CudaCall call;
  if (tensors.empty()) {
    if (stats_out.has_value() && stats_out->defined()) {
      check_stats(stats_out, tensors, stats_out->device(), call.skipped);
    }
    return call;
  }
  call.device = tensors[0].device();
  call.stats = check_stats(stats_out, tensors, *call.device, call.skipped);
  return call;
}

}  // namespace
}  // namespace znorm
