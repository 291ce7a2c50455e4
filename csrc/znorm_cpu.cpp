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
// Statistics: two passes per run while it is in cache, accumulated in float32 (float64 for float64): sum, min
// and max, then sum(x - m) and sum((x - m)^2) around the run's rounded mean m (run_moments in znorm.h: no
// element is used as a shift). Runs whose values are too large or too tightly spread for float squares take
// double. Partials merge in double; a tensor whose min equals its max is constant and becomes exactly 0.
//
// The optional `stats` output (row = the tensor's position in the list: mean, std) is written where each
// tensor's statistics are finalized (its batch item, or the serial merge of phase 2): no extra pass.
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
#include <limits>
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
void znorm_typed(std::vector<Span>& spans, double eps, double correction, const double* scale, double* stats) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const Plan plan = make_plan(spans);
  int64_t total = 0;
  for (const Span& s : spans) total += s.numel;

  auto ptr = [&](int64_t t) { return static_cast<T*>(spans[t].data); };
  // The two in-cache passes over a run (see the top of this file).
  auto moments = [](const T* p, int64_t n) {
    A sum, lo, hi;
    K::sum_min_max(p, n, sum, lo, hi);
    const double dn = static_cast<double>(n);
    if (std::is_same_v<A, double> || float_safe(lo, hi)) {
      const A m = sum / static_cast<A>(n);
      double s1, q;
      K::centred_sums(p, n, m, s1, q);
      return run_moments(dn, m, s1, q, lo, hi);
    }
    double sum64, lo64, hi64, s1, q;
    K::sum_min_max(p, n, sum64, lo64, hi64);
    const double m = sum64 / dn;
    K::centred_sums(p, n, m, s1, q);
    return run_moments(dn, m, s1, q, lo, hi);
  };
  auto normalize = [](T* p, int64_t n, const Final& f) {
    if (f.wide && !std::is_same_v<A, double>) return K::normalize_run_wide(p, n, f.mean, f.inv);
    const A hi = static_cast<A>(f.mean);
    const A lo = static_cast<A>(f.mean - static_cast<double>(hi));
    K::normalize_run(p, n, hi, lo, static_cast<A>(f.inv));
  };
  // Tensor t's row of the stats output: each tensor's own row, so items on different threads never share one.
  auto record = [&](int64_t t, const Final& f) {
    if (stats == nullptr) return;
    stats[2 * spans[t].index] = f.mean;
    stats[2 * spans[t].index + 1] = f.stdev;
  };
  // Phase 1: batches done completely; chunk partials into their slots.
  std::vector<Moments> partial(plan.items.size());
  run_items(static_cast<int64_t>(plan.items.size()), total, [&](int64_t i) {
    const Item& item = plan.items[i];
    if (item.last < 0) {
      partial[i] = moments(ptr(item.first) + item.begin, item.len);
      return;
    }
    for (int64_t t = item.first; t < item.last; ++t) {
      const int64_t n = spans[t].numel;
      if (n < 2) continue;
      const Final f = finalize(moments(ptr(t), n), eps, correction, scale);
      record(t, f);
      normalize(ptr(t), n, f);
    }
  });
  if (plan.big.empty()) return;

  // Phase 2: per large tensor, merge its partials in chunk order.
  std::vector<Final> finals(spans.size());
  size_t next_chunk = 0;
  for (int64_t t : plan.big) {
    Moments m;
    while (next_chunk < plan.chunk_items.size() && plan.items[plan.chunk_items[next_chunk]].first == t) {
      m = merge(m, partial[plan.chunk_items[next_chunk]]);
      ++next_chunk;
    }
    finals[t] = finalize(m, eps, correction, scale);
    record(t, finals[t]);
  }

  // Phase 3: normalize the chunks.
  run_items(static_cast<int64_t>(plan.chunk_items.size()), total, [&](int64_t i) {
    const Item& item = plan.items[plan.chunk_items[i]];
    normalize(ptr(item.first) + item.begin, item.len, finals[item.first]);
  });
}

template <typename T>
void znorm_dispatch_isa(std::vector<Span>& spans, double eps, double correction, const double* scale,
                        double* stats) {
#ifdef ZNORM_HAVE_AVX2_COPY
  if (use_avx2()) return znorm_typed<T, cpu_avx2::Kernels>(spans, eps, correction, scale, stats);
#endif
  znorm_typed<T, cpu_baseline::Kernels>(spans, eps, correction, scale, stats);
}

void znorm_cpu(at::TensorList tensors, double eps, double correction, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& stats_out) {
  std::optional<double> scale_value;
  if (grad_scale.has_value() && grad_scale->defined()) {
    TORCH_CHECK(grad_scale->numel() == 1, "znorm_: grad_scale must hold one value, got ", grad_scale->numel());
    scale_value = grad_scale->to(at::kCPU, at::kDouble).item<double>();  // a CPU tensor: no device sync
  }
  const double* scale = scale_value ? &*scale_value : nullptr;

  const c10::Device cpu(c10::kCPU);
  bool skipped = false;
  double* stats = check_stats(stats_out, tensors, cpu, skipped);
  auto by_dtype = spans_by_dtype(tensors, cpu);  // the last check: nothing is written before it passes
  if (stats != nullptr && skipped) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (tensors[i].numel() < 2) stats[2 * i] = stats[2 * i + 1] = std::numeric_limits<double>::quiet_NaN();
    }
  }
  for (int k = 0; k < 4; ++k) {
    if (by_dtype[k].empty()) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, kDtypes[k], "znorm_cpu", [&] {
      znorm_dispatch_isa<scalar_t>(by_dtype[k], eps, correction, scale, stats);
    });
    for (Span& s : by_dtype[k]) s.finish();
  }
}

}  // namespace
}  // namespace znorm

TORCH_LIBRARY_IMPL(znorm_kernels_C, CPU, m) {
  m.impl("znorm_", &znorm::znorm_cpu);
}
