// The CPU inner loops of znorm_ (cpu_znorm.cpp), written so the compiler vectorizes them without changing their
// rounding.
//
// This header has no include guard on purpose: cpu_common.h includes it three times, with ZNORM_ISA naming the
// namespace of each copy (cpu_baseline, cpu_avx2 and cpu_avx512, the last two under `#pragma GCC target`),
// and the ops pick the copy at run time through its `Kernels` type. The AVX2 and AVX-512 copies replace the
// loops that sum in float (float32, bfloat16 and float16 runs) by the intrinsics of cpu_vec_loops.h, which
// keep these lanes. Every loop accumulates into a fixed array of lanes partial sums (element i goes to lane
// i % lanes; cpu_tiles::kLanes32 / kLanes64 in tiles.h) that is reduced by a fixed pairwise tree, and the
// build uses -ffp-contract=off, so every copy gives bitwise the same results: the instruction set changes the
// speed, never the values.
//
// Needs, declared before the include: <cstdint>, <cstring>, <limits>, c10::Half, c10::BFloat16, tiles.h, and
// ZNORM_ISA.

namespace ZNORM_ISA {

template <typename A>
struct Lanes {
  // 4 AVX2 (8 SSE) registers of independent sums: enough to hide the add latency.
  static constexpr int value = sizeof(A) == 4 ? cpu_tiles::kLanes32 : cpu_tiles::kLanes64;
};

// Element -> accumulation type.
inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(c10::BFloat16 v) {
  // bfloat16 is the top half of a float32: a shift, which vectorizes (the c10 conversion does the same).
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float to_acc(c10::Half v) {
#ifdef ZNORM_F16C
  _Float16 h;
  std::memcpy(&h, &v.x, sizeof(h));
  return static_cast<float>(h);  // vcvtph2ps
#else
  return static_cast<float>(v);
#endif
}

// Accumulation type -> element, rounding to nearest even as torch's own conversions do.
template <typename T>
inline T from_acc(float v);
template <>
inline float from_acc<float>(float v) {
  return v;
}
template <>
inline c10::BFloat16 from_acc<c10::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  // Round to nearest even; NaN becomes the canonical quiet NaN, as in c10::BFloat16.
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  c10::BFloat16 out;
  out.x = v != v ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
  return out;
}
template <>
inline c10::Half from_acc<c10::Half>(float v) {
#ifdef ZNORM_F16C
  const _Float16 h = static_cast<_Float16>(v);  // vcvtps2ph, round to nearest even
  c10::Half out;
  std::memcpy(&out.x, &h, sizeof(h));
  return out;
#else
  return c10::Half(v);
#endif
}
template <typename T>
inline T from_acc(double v);
template <>
inline double from_acc<double>(double v) {
  return v;
}

template <typename A, int L>
inline A reduce_lanes(A (&acc)[L]) {
  for (int width = L / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
  }
  return acc[0];
}

// Sum, minimum and maximum of a run, in A. NaN never wins a comparison, so it is left out of the minimum and
// maximum (it still reaches the sum, hence the mean, which is how it propagates).
//
// sum_min_max_from takes the lanes as they stand after element i and adds the rest, then reduces them: the
// portable loop below starts it at 0 with empty lanes, the vector loops (cpu_vec_loops.h) after their vector
// part, so both share the tail and the reduction.
template <typename T, typename A, int L>
void sum_min_max_from(const T* __restrict p, int64_t i, int64_t n, A (&acc)[L], A (&mn)[L], A (&mx)[L], A& sum,
                      A& lo, A& hi) {
  for (; i + L <= n; i += L) {
    for (int j = 0; j < L; ++j) {
      const A v = static_cast<A>(to_acc(p[i + j]));
      acc[j] += v;
      mn[j] = v < mn[j] ? v : mn[j];
      mx[j] = v > mx[j] ? v : mx[j];
    }
  }
  for (int j = 0; i + j < n; ++j) {
    const A v = static_cast<A>(to_acc(p[i + j]));
    acc[j] += v;
    mn[j] = v < mn[j] ? v : mn[j];
    mx[j] = v > mx[j] ? v : mx[j];
  }
  sum = reduce_lanes<A, L>(acc);
  for (int j = 1; j < L; ++j) {
    mn[0] = mn[j] < mn[0] ? mn[j] : mn[0];
    mx[0] = mx[j] > mx[0] ? mx[j] : mx[0];
  }
  lo = mn[0];
  hi = mx[0];
}

template <typename T, typename A>
void sum_min_max(const T* __restrict p, int64_t n, A& sum, A& lo, A& hi) {
  constexpr int L = Lanes<A>::value;
  A acc[L] = {}, mn[L], mx[L];
  for (int j = 0; j < L; ++j) {
    mn[j] = std::numeric_limits<A>::infinity();
    mx[j] = -std::numeric_limits<A>::infinity();
  }
  sum_min_max_from<T, A, L>(p, 0, n, acc, mn, mx, sum, lo, hi);
}

// sum(d) and sum(d^2) over the run, d = x - m: the second pass of the statistics, over a run still in cache.
// centred_sums_from: as sum_min_max_from.
//
// In double (float64 runs, and float runs whose values float squares cannot take): d is taken in A, its square
// and both sums in double, in double lanes.
template <typename T, typename A, int L>
void centred_sums_from(const T* __restrict p, int64_t i, int64_t n, A m, double (&acc)[L], double (&sq)[L],
                       double& s1, double& q) {
  for (; i + L <= n; i += L) {
    for (int j = 0; j < L; ++j) {
      const double d = static_cast<double>(static_cast<A>(to_acc(p[i + j])) - m);
      acc[j] += d;
      sq[j] += d * d;
    }
  }
  for (int j = 0; i + j < n; ++j) {
    const double d = static_cast<double>(static_cast<A>(to_acc(p[i + j])) - m);
    acc[j] += d;
    sq[j] += d * d;
  }
  s1 = reduce_lanes<double, L>(acc);
  q = reduce_lanes<double, L>(sq);
}

// In float (float32, bfloat16 and float16 runs): d, its square and their sums in float lanes, over blocks of
// cpu_tiles::kSquareBlock * L elements (kSquareBlock values per lane), each block's lane sums then added to
// double lanes. A float sum of k values is off by at most (k - 1) units of its last place times the sum of
// their magnitudes, so a block bounds the error of M2 by a fixed few units of float's last place, whatever the
// run's length, and however large an outlier's square is beside the others: only its own block's small
// squares are rounded against it, and their share of M2 is at most the block's. blocked_centred_sums_from
// starts at a block boundary i, with the double lanes as the vector loops left them.
template <typename T, int L>
void blocked_centred_sums_from(const T* __restrict p, int64_t i, int64_t n, float m, double (&acc)[L],
                               double (&sq)[L], double& s1, double& q) {
  constexpr int64_t kBlock = cpu_tiles::kSquareBlock * L;
  for (; i < n; i += kBlock) {
    float bs[L] = {}, bq[L] = {};
    const int64_t end = i + kBlock < n ? i + kBlock : n;
    for (int64_t k = i; k < end; k += L) {
      for (int j = 0; j < L && k + j < end; ++j) {
        const float d = to_acc(p[k + j]) - m;
        bs[j] += d;
        bq[j] += d * d;
      }
    }
    for (int j = 0; j < L; ++j) {
      acc[j] += static_cast<double>(bs[j]);
      sq[j] += static_cast<double>(bq[j]);
    }
  }
  s1 = reduce_lanes<double, L>(acc);
  q = reduce_lanes<double, L>(sq);
}

template <typename T, typename A>
void centred_sums(const T* __restrict p, int64_t n, A m, double& s1, double& q) {
  if constexpr (std::is_same_v<A, float>) {
    constexpr int L = Lanes<float>::value;
    double acc[L] = {}, sq[L] = {};
    blocked_centred_sums_from<T, L>(p, 0, n, m, acc, sq, s1, q);
  } else {
    constexpr int L = Lanes<double>::value;
    double acc[L] = {}, sq[L] = {};
    centred_sums_from<T, A, L>(p, 0, n, m, acc, sq, s1, q);
  }
}

// sum(x * factor) over a float64 run, in the lanes of sum_min_max (huge or tiny values, scaled: rare).
inline double scaled_sum(const double* __restrict p, int64_t n, double factor) {
  constexpr int L = Lanes<double>::value;
  double acc[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int j = 0; j < L; ++j) acc[j] += p[i + j] * factor;
  }
  for (int j = 0; i + j < n; ++j) acc[j] += p[i + j] * factor;
  return reduce_lanes<double, L>(acc);
}

// centred_sums of a float64 run's values times factor: d = x * factor - m.
inline void scaled_centred_sums(const double* __restrict p, int64_t n, double m, double factor, double& s1,
                                double& q) {
  constexpr int L = Lanes<double>::value;
  double acc[L] = {}, sq[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int j = 0; j < L; ++j) {
      const double d = p[i + j] * factor - m;
      acc[j] += d;
      sq[j] += d * d;
    }
  }
  for (int j = 0; i + j < n; ++j) {
    const double d = p[i + j] * factor - m;
    acc[j] += d;
    sq[j] += d * d;
  }
  s1 = reduce_lanes<double, L>(acc);
  q = reduce_lanes<double, L>(sq);
}

// x <- ((x - hi) - lo) * mult, the mean given as a pair hi + lo of A values: x - hi is exact near the mean, so
// the pair keeps the float64 mean's precision at A's cost. A constant tensor has hi = its value, lo = 0 and
// mult = 0: every result is exactly 0.
template <typename T, typename A>
void normalize_run(T* __restrict p, int64_t n, A hi, A lo, A mult) {
  for (int64_t i = 0; i < n; ++i) p[i] = from_acc<T>(((to_acc(p[i]) - hi) - lo) * mult);
}

// x <- (x * factor - mean * factor) * mult in double, for tensors beyond float's comfortable range and those
// whose statistics are scaled ("wide"; rare); factor is 1 but for the latter (Final::factor).
template <typename T>
void normalize_run_wide(T* __restrict p, int64_t n, double mean, double mult, double factor) {
  using A = decltype(to_acc(p[0]));
  const double mean_f = mean * factor;
  for (int64_t i = 0; i < n; ++i) {
    p[i] = from_acc<T>(static_cast<A>((static_cast<double>(to_acc(p[i])) * factor - mean_f) * mult));
  }
}

// The hand-vectorized loops of this copy, if it has them (cpu_common.h defines which): `vec_loops`, written
// once (cpu_vec_loops.h) over the copy's instructions.
#if defined(ZNORM_AVX512_LOOPS)
#include "cpu_avx512_vec.h"
#elif defined(ZNORM_AVX2_LOOPS)
#include "cpu_avx2_vec.h"
#endif
#if defined(ZNORM_AVX512_LOOPS) || defined(ZNORM_AVX2_LOOPS)
#include "cpu_vec_loops.h"
#define ZNORM_VEC_LOOPS 1
#endif

// This copy's loops as one type, the driver's template argument (znorm_typed<T, cpu_avx2::Kernels>). The AVX2
// and AVX-512 copies run their hand-vectorized loops (vec_loops) wherever the sums are in float.
struct Kernels {
  template <typename T>
  static auto to_acc(T v) {
    return ZNORM_ISA::to_acc(v);
  }
  template <typename T, typename A>
  static void sum_min_max(const T* p, int64_t n, A& sum, A& lo, A& hi) {
#ifdef ZNORM_VEC_LOOPS
    if constexpr (std::is_same_v<A, float>) return vec_loops::sum_min_max<T>(p, n, sum, lo, hi);
#endif
    ZNORM_ISA::sum_min_max<T, A>(p, n, sum, lo, hi);
  }
  template <typename T, typename A>
  static void centred_sums(const T* p, int64_t n, A m, double& s1, double& q) {
#ifdef ZNORM_VEC_LOOPS
    if constexpr (std::is_same_v<A, float>) return vec_loops::centred_sums<T>(p, n, m, s1, q);
#endif
    ZNORM_ISA::centred_sums<T, A>(p, n, m, s1, q);
  }
  template <typename T, typename A>
  static void normalize_run(T* p, int64_t n, A hi, A lo, A mult) {
#ifdef ZNORM_VEC_LOOPS
    if constexpr (std::is_same_v<A, float>) return vec_loops::normalize_run<T>(p, n, hi, lo, mult);
#endif
    ZNORM_ISA::normalize_run<T, A>(p, n, hi, lo, mult);
  }
  static double scaled_sum(const double* p, int64_t n, double factor) {
    return ZNORM_ISA::scaled_sum(p, n, factor);
  }
  static void scaled_centred_sums(const double* p, int64_t n, double m, double factor, double& s1, double& q) {
    ZNORM_ISA::scaled_centred_sums(p, n, m, factor, s1, q);
  }
  template <typename T>
  static void normalize_run_wide(T* p, int64_t n, double mean, double mult, double factor) {
    ZNORM_ISA::normalize_run_wide<T>(p, n, mean, mult, factor);
  }
};

}  // namespace ZNORM_ISA

#undef ZNORM_VEC_LOOPS
