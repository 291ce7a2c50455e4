// The CPU kernel of znorm_kernels_C::znorm_: ZNorm of a whole list of tensors in one call. The work items, the
// threads and the statistics of a run are shared with the fused optimizer steps (cpu_common.h); the sizes are in
// tiles.h (cpu_tiles).
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
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "cpu_common.h"
#include "znorm.h"

namespace znorm {
namespace {

Plan make_plan(const std::vector<Span>& spans) {
  std::vector<int64_t> numels;
  numels.reserve(spans.size());
  for (const Span& s : spans) numels.push_back(s.numel);
  return make_plan(numels, 2);
}

// The whole op for one dtype; K is the kernel namespace (baseline or AVX2), chosen once per call.
template <typename T, typename K>
void znorm_typed(std::vector<Span>& spans, double eps, double correction, const double* scale, double* stats) {
  using A = acc_t<T>;
  const Plan plan = make_plan(spans);
  int64_t total = 0;
  for (const Span& s : spans) total += s.numel;

  auto ptr = [&](int64_t t) { return static_cast<T*>(spans[t].data); };
  auto moments = [](const T* p, int64_t n) { return run_stats<T, K>(p, n); };
  auto normalize = [](T* p, int64_t n, const Final& f) {
    const ZConst<A> c = zconst<A>(f);
    if (c.wide) return K::normalize_run_wide(p, n, c.mean, c.inv);
    K::normalize_run(p, n, c.hi, c.lo, c.mult);
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
