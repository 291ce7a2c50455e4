// What the CPU ops (znorm_ in cpu_znorm.cpp, the fused optimizer steps in cpu_optim.cpp) share: the two copies
// of their inner loops (portable and AVX2) and the choice between them, the work items, their three phases and
// the threads that run them, the statistics of a run, the rows of the `stats` output, and the normalize pass's
// constants. The top of cpu_znorm.cpp describes the items and the statistics.
//
// Everything here is in an anonymous namespace, as it was when both ops lived in one file: each including
// translation unit gets its own internal copies (the loops are not exported from the shared library, and no
// definition is shared between files, so nothing here can break the one-definition rule).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>  // the vector loops (cpu_vec_loops.h), the optimizer loops' square roots
#endif

#include "optim_args.h"
#include "tiles.h"
#include "znorm.h"

namespace znorm {
namespace {  // internal linkage: the loops are not exported from the shared library
#define ZNORM_ISA cpu_baseline
#include "cpu_znorm_kernels.h"
#include "cpu_optim_kernels.h"
#undef ZNORM_ISA

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define ZNORM_HAVE_AVX2_COPY 1
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#define ZNORM_F16C 1
#define ZNORM_AVX2_LOOPS 1
#define ZNORM_ISA cpu_avx2
#include "cpu_znorm_kernels.h"
#include "cpu_optim_kernels.h"
#undef ZNORM_ISA
#undef ZNORM_AVX2_LOOPS
#undef ZNORM_F16C
#pragma GCC pop_options

#define ZNORM_HAVE_AVX512_COPY 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c")
// GCC 12's AVX-512 intrinsics pass _mm512_undefined_*() through, which -Wmaybe-uninitialized reports as
// uninitialized inside its own headers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define ZNORM_F16C 1
#define ZNORM_AVX512_LOOPS 1
#define ZNORM_ISA cpu_avx512
#include "cpu_znorm_kernels.h"
#include "cpu_optim_kernels.h"
#undef ZNORM_ISA
#undef ZNORM_AVX512_LOOPS
#undef ZNORM_F16C
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

using cpu_tiles::kChunk;
using cpu_tiles::kSerialBelow;

struct Item {
  int64_t first;  // batch: first tensor index; chunk: the tensor index
  int64_t last;   // batch: one past the last tensor index; chunk: -1
  int64_t begin;  // chunk: first element (0 for a batch)
  int64_t len;    // chunk: number of elements; batch: its tensors' elements
};

struct Plan {
  std::vector<Item> items;
  std::vector<int64_t> chunk_items;  // indices into items of the chunk items, in tensor then chunk order
  std::vector<int64_t> big;          // tensors split into chunks
  int64_t ntensors = 0;              // the tensors' count
  int64_t total = 0;                 // their elements, all together (for plan_threads)
};

// Items over tensors of the given sizes; tensors of fewer than `min_numel` elements are left out.
inline Plan make_plan(const std::vector<int64_t>& numels, int64_t min_numel) {
  Plan plan;
  plan.ntensors = static_cast<int64_t>(numels.size());
  for (const int64_t n : numels) plan.total += n;
  int64_t batch_start = -1, batch_elems = 0;
  auto close_batch = [&](int64_t end) {
    if (batch_start >= 0) plan.items.push_back({batch_start, end, 0, batch_elems});
    batch_start = -1;
    batch_elems = 0;
  };
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    const int64_t n = numels[t];
    if (n < min_numel) continue;
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
  close_batch(static_cast<int64_t>(numels.size()));
  return plan;
}

// The threads a phase of `plan` runs on: 1 below kSerialBelow elements.
inline int64_t plan_threads(const Plan& plan) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(plan.items.size()));
  return plan.total < kSerialBelow ? 1 : std::max<int64_t>(threads, 1);
}

// Phase 1's segments of items: `threads` runs of consecutive items of about equal elements, bounds[s] to
// bounds[s + 1] (the elements of the items: tensors left out of them do not count).
inline std::vector<int64_t> segment_bounds(const Plan& plan, int64_t threads) {
  const int64_t count = static_cast<int64_t>(plan.items.size());
  int64_t total = 0;
  for (const Item& item : plan.items) total += item.len;
  std::vector<int64_t> bounds(threads + 1, count);
  bounds[0] = 0;
  int64_t done = 0, s = 1;
  for (int64_t i = 0; i < count && s < threads; ++i) {
    done += plan.items[i].len;
    while (s < threads && done * threads >= total * s) bounds[s++] = i + 1;
  }
  return bounds;
}

// Runs fn(i) for every item i of the segments bounds[s] .. bounds[s + 1], one thread per segment: each thread
// runs its own segment from the front, then takes items from the back of the others' (so one slowed by the
// machine's other work hands part of its segment over). While no thread falls behind, every item runs on the
// same thread in both phases and from call to call, and finds its data in that core's caches.
template <typename F>
void run_segments(const std::vector<int64_t>& bounds, const F& fn) {
  const int64_t threads = static_cast<int64_t>(bounds.size()) - 1;
  if (threads <= 1) {
    for (int64_t i = bounds.front(); i < bounds.back(); ++i) fn(i);
    return;
  }
  // Per segment, its next item from the front (low 32 bits) and one past its last from the back (high 32
  // bits), claimed together by compare-and-swap; one cache line each, so that owners do not contend.
  TORCH_CHECK(bounds.back() < (int64_t{1} << 32), "the CPU kernel: more than 2**32 work items in one call");
  struct alignas(64) Ends {
    std::atomic<uint64_t> v;
  };
  std::vector<Ends> ends(threads);
  for (int64_t s = 0; s < threads; ++s) {
    ends[s].v.store(static_cast<uint64_t>(bounds[s]) | static_cast<uint64_t>(bounds[s + 1]) << 32,
                    std::memory_order_relaxed);
  }
  auto claim = [&](int64_t s, bool front) -> int64_t {
    uint64_t cur = ends[s].v.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t lo = cur & 0xFFFFFFFFu, hi = cur >> 32;
      if (lo >= hi) return -1;
      const uint64_t next = front ? (lo + 1) | hi << 32 : lo | (hi - 1) << 32;
      if (ends[s].v.compare_exchange_weak(cur, next, std::memory_order_relaxed)) {
        return static_cast<int64_t>(front ? lo : hi - 1);
      }
    }
  };
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t own = begin; own < end; ++own) {
      for (int64_t i = claim(own, true); i >= 0; i = claim(own, true)) fn(i);
    }
    for (int64_t k = 1; k < threads; ++k) {
      const int64_t other = (begin + k) % threads;
      for (int64_t i = claim(other, false); i >= 0; i = claim(other, false)) fn(i);
    }
  });
}

// The three phases of an op over `plan` (the top of cpu_znorm.cpp). Phase 1: whole(t) for each tensor t of a
// batch item; partial(t, begin, len), the moments of elements [begin, begin + len) of tensor t, for each chunk
// item. Phase 2, serially: each large tensor's partials merged in chunk order, and r[t] = merged(t, moments).
// Phase 3: part(t, begin, len, r[t]) for each chunk item, each in the segment its phase-1 item was in.
template <typename Partial, typename Whole, typename Merged, typename Part>
void run_plan(const Plan& plan, const Partial& partial, const Whole& whole, const Merged& merged, const Part& part) {
  if (plan.items.empty()) return;
  const std::vector<int64_t> bounds = segment_bounds(plan, plan_threads(plan));
  std::vector<Moments> partials(plan.items.size());
  run_segments(bounds, [&](int64_t i) {
    const Item& item = plan.items[i];
    if (item.last < 0) {
      partials[i] = partial(item.first, item.begin, item.len);
      return;
    }
    for (int64_t t = item.first; t < item.last; ++t) whole(t);
  });
  if (plan.big.empty()) return;

  std::vector<std::invoke_result_t<Merged, int64_t, const Moments&>> results(plan.ntensors);
  size_t next_chunk = 0;
  for (int64_t t : plan.big) {
    Moments m;
    while (next_chunk < plan.chunk_items.size() && plan.items[plan.chunk_items[next_chunk]].first == t) {
      m = merge(m, partials[plan.chunk_items[next_chunk]]);
      ++next_chunk;
    }
    results[t] = merged(t, m);
  }
  // chunk_items is ascending: the chunks of phase-1 segment s are those between these bounds.
  std::vector<int64_t> chunk_bounds(bounds.size());
  for (size_t s = 0; s < bounds.size(); ++s) {
    chunk_bounds[s] = std::lower_bound(plan.chunk_items.begin(), plan.chunk_items.end(), bounds[s]) -
                      plan.chunk_items.begin();
  }
  run_segments(chunk_bounds, [&](int64_t i) {
    const Item& item = plan.items[plan.chunk_items[i]];
    part(item.first, item.begin, item.len, results[item.first]);
  });
}

// The copy of the loops this machine runs: the widest it supports, or the one ZNORM_CPU_ISA names
// ("baseline": the portable loops; "avx2": AVX2 on an AVX-512 machine). Tests check that all give bitwise
// the same values.
enum class Isa { baseline, avx2, avx512 };

inline Isa cpu_isa() {
#ifdef ZNORM_HAVE_AVX2_COPY
  static const Isa isa = [] {
    const char* want = std::getenv("ZNORM_CPU_ISA");
    const bool baseline = want != nullptr && std::strcmp(want, "baseline") == 0;
    const bool avx2_only = want != nullptr && std::strcmp(want, "avx2") == 0;
    if (baseline || !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"))) return Isa::baseline;
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    return avx512 && !avx2_only ? Isa::avx512 : Isa::avx2;
  }();
  return isa;
#else
  return Isa::baseline;
#endif
}

// f.template operator()<K, KO>() with the copy of the loops this machine runs: K its znorm_ loops (Kernels), KO
// its optimizer loops (OptimKernels).
template <typename F>
void with_isa(const F& f) {
#ifdef ZNORM_HAVE_AVX2_COPY
  switch (cpu_isa()) {
    case Isa::avx512:
      return f.template operator()<cpu_avx512::Kernels, cpu_avx512::OptimKernels>();
    case Isa::avx2:
      return f.template operator()<cpu_avx2::Kernels, cpu_avx2::OptimKernels>();
    case Isa::baseline:
      break;
  }
#endif
  f.template operator()<cpu_baseline::Kernels, cpu_baseline::OptimKernels>();
}

// Row `row` of the `stats` output (nullptr: not asked for): the mean and std that the normalization used.
inline void record_row(double* stats, int64_t row, const Final& f) {
  if (stats == nullptr) return;
  stats[2 * row] = f.mean;
  stats[2 * row + 1] = f.stdev;
}

// NaN rows of the `stats` output (nullptr: not asked for) for the tensors i < n that get no statistics (none(i)).
template <typename F>
void nan_rows(double* stats, size_t n, const F& none) {
  if (stats == nullptr) return;
  for (size_t i = 0; i < n; ++i) {
    if (none(i)) stats[2 * i] = stats[2 * i + 1] = std::numeric_limits<double>::quiet_NaN();
  }
}

// The two in-cache passes over a run (see the top of cpu_znorm.cpp): its moments.
template <typename T, typename K>
Moments run_stats(const T* p, int64_t n) {
  using A = acc_t<T>;
  A sum, lo, hi;
  K::sum_min_max(p, n, sum, lo, hi);
  const double dn = static_cast<double>(n);
  if constexpr (std::is_same_v<A, double>) {
    const double factor = range_factor(lo, hi);
    if (factor != 1.0) {  // huge or tiny float64 values: both passes again, on scaled values (rare)
      const double m = K::scaled_sum(p, n, factor) / dn;
      double s1, q;
      K::scaled_centred_sums(p, n, m, factor, s1, q);
      return run_moments(dn, m, s1, q, lo, hi, factor);
    }
  }
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
}

// The normalize pass's constants: the mean as a pair hi + lo of A values, the multiplier in A; `wide` takes
// the float64 mean, multiplier and factor instead (float tensors beyond float's comfortable range, and any
// tensor whose statistics are scaled: Final::factor).
template <typename A>
struct ZConst {
  A hi = 0, lo = 0, mult = 1;  // the identity: z = g
  double mean = 0.0, inv = 1.0, factor = 1.0;
  bool wide = false;
};

template <typename A>
ZConst<A> zconst(const Final& f) {
  ZConst<A> c;
  c.hi = static_cast<A>(f.mean);
  c.lo = static_cast<A>(f.mean - static_cast<double>(c.hi));
  c.mult = static_cast<A>(f.inv);
  c.mean = f.mean;
  c.inv = f.inv;
  c.factor = f.factor;
  c.wide = f.wide && (!std::is_same_v<A, double> || f.factor != 1.0);
  return c;
}

}  // namespace
}  // namespace znorm
