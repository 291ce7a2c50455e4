// The CPU kernel of znorm_kernels_C::znorm_: ZNorm of a whole list of tensors in one call.
//
// Work is cut into items of at most kChunk elements, so one huge tensor and thousands of small ones both
// spread over the threads:
//   - a "batch" item is a run of consecutive small tensors (each <= kChunk elements, kChunk in all): each is
//     normalized completely while it is in cache (read from memory once, written once);
//   - a "chunk" item is kChunk elements of a large tensor: phase 1 writes its (count, mean, M2) partial to
//     its own slot, phase 2 merges each tensor's partials in chunk order (serially, in double), phase 3
//     normalizes the chunk.
// Threads take items from an atomic counter (a shared, noisy machine balances better than a static split);
// lists of fewer than kSerialBelow elements run on the calling thread alone. An item's arithmetic does not
// depend on which thread runs it, nor do the merges (fixed order): the result is bitwise the same for any
// thread count.
//
// Statistics are shifted by the tensor's first element and accumulated in float32 (float64 for float64),
// two passes per run (sum, then sum of centred squares), so a constant tensor gives exactly 0.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "znorm.h"

namespace znorm {
namespace {  // internal linkage: the loops are not exported from the shared library
#define ZNORM_ISA cpu_baseline
#include "cpu_kernels.h"
#undef ZNORM_ISA

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define ZNORM_HAVE_AVX2_COPY 1
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#define ZNORM_F16C 1
#define ZNORM_ISA cpu_avx2
#include "cpu_kernels.h"
#undef ZNORM_ISA
#undef ZNORM_F16C
#pragma GCC pop_options
#endif

// Elements per work item: 64 KiB of float32, well inside L2, so the second statistics pass and, for small
// tensors, the normalize pass read from cache.
constexpr int64_t kChunk = 16384;
// Below this many elements in all (16 MiB of float32), one thread does everything. A parallel region ends
// in a barrier that waits for every thread to have been scheduled: on a busy machine that wait is a scheduler
// time slice (milliseconds; measured 12-16 ms per call on this project's shared 2-core box), far more than the
// at most ~half of a few hundred microseconds that a second thread saves on a ResNet-sized list.
constexpr int64_t kSerialBelow = int64_t{1} << 22;

struct Item {
  int64_t first;  // batch: first tensor index; chunk: the tensor index
  int64_t last;   // batch: one past the last tensor index; chunk: -1
  int64_t begin;  // chunk: first element (0 for a batch)
  int64_t len;    // chunk: number of elements
};

struct Plan {
  std::vector<Item> items;
  std::vector<int64_t> chunk_items;  // indices into items of the chunk items, in tensor then chunk order
  std::vector<int64_t> big;          // tensors split into chunks
};

Plan make_plan(const std::vector<Span>& spans) {
  Plan plan;
  int64_t batch_start = -1, batch_elems = 0;
  auto close_batch = [&](int64_t end) {
    if (batch_start >= 0) plan.items.push_back({batch_start, end, 0, 0});
    batch_start = -1;
    batch_elems = 0;
  };
  for (int64_t t = 0; t < static_cast<int64_t>(spans.size()); ++t) {
    const int64_t n = spans[t].numel;
    if (n < 2) continue;
    if (n > kChunk) {
      close_batch(t);
      plan.big.push_back(t);
      for (int64_t b = 0; b < n; b += kChunk) {
        plan.chunk_items.push_back(static_cast<int64_t>(plan.items.size()));
        plan.items.push_back({t, -1, b, std::min(kChunk, n - b)});
      }
      continue;
    }
    if (batch_start >= 0 && batch_elems + n > kChunk) close_batch(t);
    if (batch_start < 0) batch_start = t;
    batch_elems += n;
  }
  close_batch(static_cast<int64_t>(spans.size()));
  return plan;
}

// Runs fn(i) for i in [0, count), items handed out by an atomic counter to the intra-op threads.
template <typename F>
void run_items(int64_t count, int64_t total_elems, const F& fn) {
  if (count == 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), count);
  if (threads <= 1 || total_elems < kSerialBelow) {
    for (int64_t i = 0; i < count; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < count;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(i);
    }
  });
}

bool use_avx2() {
#ifdef ZNORM_HAVE_AVX2_COPY
  // ZNORM_CPU_ISA=baseline forces the portable loops (tests check both give bitwise the same values).
  static const bool yes = [] {
    const char* isa = std::getenv("ZNORM_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "baseline") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  }();
  return yes;
#else
  return false;
#endif
}

// The whole op for one dtype; K is the kernel namespace (baseline or AVX2), chosen once per call.
template <typename T, typename K>
void znorm_typed(std::vector<Span>& spans, double eps, double correction, const double* scale) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const Plan plan = make_plan(spans);
  int64_t total = 0;
  for (const Span& s : spans) total += s.numel;

  auto ptr = [&](int64_t t) { return static_cast<T*>(spans[t].data); };
  // Two passes over a run that stays in cache: its mean and M2, shifted by its tensor's first element.
  auto moments = [](const T* p, int64_t n, A shift) {
    const A mean = K::sum_shifted(p, n, shift) / static_cast<A>(n);
    return std::pair<A, A>{mean, K::sum_squares_centred(p, n, shift, mean)};
  };
  // Phase 1: batches done completely; chunk partials into their slots.
  std::vector<Moments> partial(plan.items.size());
  run_items(static_cast<int64_t>(plan.items.size()), total, [&](int64_t i) {
    const Item& item = plan.items[i];
    if (item.last < 0) {
      const A shift = K::to_acc(ptr(item.first)[0]);
      const auto [mean, m2] = moments(ptr(item.first) + item.begin, item.len, shift);
      partial[i] = {static_cast<double>(item.len), static_cast<double>(mean), static_cast<double>(m2)};
      return;
    }
    for (int64_t t = item.first; t < item.last; ++t) {
      T* p = ptr(t);
      const int64_t n = spans[t].numel;
      if (n < 2) continue;
      const A shift = K::to_acc(p[0]);
      const auto [mean, m2] = moments(p, n, shift);
      const Moments m{static_cast<double>(n), static_cast<double>(mean), static_cast<double>(m2)};
      const A mult = static_cast<A>(multiplier(m, eps, correction, scale));
      K::normalize_run(p, n, shift, mean, mult);
    }
  });
  if (plan.big.empty()) return;

  // Phase 2: per large tensor, merge its partials in chunk order. Also fixes the shift now, before phase 3
  // overwrites the first element.
  struct Final {
    A shift, mean, mult;
  };
  std::vector<Final> finals(spans.size());
  size_t next_chunk = 0;
  for (int64_t t : plan.big) {
    Moments m;
    while (next_chunk < plan.chunk_items.size() && plan.items[plan.chunk_items[next_chunk]].first == t) {
      m = merge(m, partial[plan.chunk_items[next_chunk]]);
      ++next_chunk;
    }
    finals[t] = {K::to_acc(ptr(t)[0]), static_cast<A>(m.mean),
                 static_cast<A>(multiplier(m, eps, correction, scale))};
  }

  // Phase 3: normalize the chunks.
  run_items(static_cast<int64_t>(plan.chunk_items.size()), total, [&](int64_t i) {
    const Item& item = plan.items[plan.chunk_items[i]];
    const Final& f = finals[item.first];
    K::normalize_run(ptr(item.first) + item.begin, item.len, f.shift, f.mean, f.mult);
  });
}

template <typename T>
void znorm_dispatch_isa(std::vector<Span>& spans, double eps, double correction, const double* scale) {
#ifdef ZNORM_HAVE_AVX2_COPY
  if (use_avx2()) return znorm_typed<T, cpu_avx2::Kernels>(spans, eps, correction, scale);
#endif
  znorm_typed<T, cpu_baseline::Kernels>(spans, eps, correction, scale);
}

void znorm_cpu(at::TensorList tensors, double eps, double correction, const std::optional<at::Tensor>& grad_scale) {
  std::optional<double> scale_value;
  if (grad_scale.has_value() && grad_scale->defined()) {
    TORCH_CHECK(grad_scale->numel() == 1, "znorm_: grad_scale must hold one value, got ", grad_scale->numel());
    scale_value = grad_scale->to(at::kCPU, at::kDouble).item<double>();  // a CPU tensor: no device sync
  }
  const double* scale = scale_value ? &*scale_value : nullptr;

  auto by_dtype = spans_by_dtype(tensors, c10::Device(c10::kCPU));
  for (int k = 0; k < 4; ++k) {
    if (by_dtype[k].empty()) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, kDtypes[k], "znorm_cpu", [&] {
      znorm_dispatch_isa<scalar_t>(by_dtype[k], eps, correction, scale);
    });
    for (Span& s : by_dtype[k]) s.finish();
  }
}

}  // namespace
}  // namespace znorm

TORCH_LIBRARY_IMPL(znorm_kernels_C, CPU, m) {
  m.impl("znorm_", &znorm::znorm_cpu);
}
