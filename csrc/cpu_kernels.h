// The CPU inner loops, written so the compiler vectorizes them without changing their rounding.
//
// This header has no include guard on purpose: znorm_cpu.cpp includes it twice, with ZNORM_ISA naming the
// namespace of each copy (cpu_baseline, and cpu_avx2 under `#pragma GCC target("avx2,f16c")`), and picks
// the copy at run time through its `Kernels` type. Every loop
// accumulates into a fixed array of kLanes partial sums (element i goes to lane i % kLanes) that is reduced
// by a fixed pairwise tree, and the build uses -ffp-contract=off, so both versions give bitwise the same
// results: the instruction set changes the speed, never the values.
//
// Needs, declared before the include: <cstdint>, <cstring>, c10::Half, c10::BFloat16, and ZNORM_ISA.

namespace ZNORM_ISA {

template <typename A>
struct Lanes {
  // 32 floats = 4 AVX2 (8 SSE) registers of independent sums: enough to hide the add latency.
  static constexpr int value = sizeof(A) == 4 ? 32 : 16;
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

// sum over the run of (x - shift).
template <typename T, typename A>
A sum_shifted(const T* __restrict p, int64_t n, A shift) {
  constexpr int L = Lanes<A>::value;
  A acc[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int j = 0; j < L; ++j) acc[j] += to_acc(p[i + j]) - shift;
  }
  for (int j = 0; i + j < n; ++j) acc[j] += to_acc(p[i + j]) - shift;
  return reduce_lanes<A, L>(acc);
}

// sum over the run of ((x - shift) - mean)^2: the second pass of a two-pass variance, over a run that is
// still in cache from the first.
template <typename T, typename A>
A sum_squares_centred(const T* __restrict p, int64_t n, A shift, A mean) {
  constexpr int L = Lanes<A>::value;
  A acc[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int j = 0; j < L; ++j) {
      const A d = (to_acc(p[i + j]) - shift) - mean;
      acc[j] += d * d;
    }
  }
  for (int j = 0; i + j < n; ++j) {
    const A d = (to_acc(p[i + j]) - shift) - mean;
    acc[j] += d * d;
  }
  return reduce_lanes<A, L>(acc);
}

// x <- ((x - shift) - mean) * mult. The shift is subtracted first, as the reference does: for a constant
// tensor (x - shift) is exactly 0, and so is the result.
template <typename T, typename A>
void normalize_run(T* __restrict p, int64_t n, A shift, A mean, A mult) {
  for (int64_t i = 0; i < n; ++i) p[i] = from_acc<T>(((to_acc(p[i]) - shift) - mean) * mult);
}

// This copy's loops as one type, the driver's template argument (znorm_typed<T, cpu_avx2::Kernels>).
struct Kernels {
  template <typename T>
  static auto to_acc(T v) {
    return ZNORM_ISA::to_acc(v);
  }
  template <typename T, typename A>
  static A sum_shifted(const T* p, int64_t n, A s) {
    return ZNORM_ISA::sum_shifted<T, A>(p, n, s);
  }
  template <typename T, typename A>
  static A sum_squares_centred(const T* p, int64_t n, A s, A m) {
    return ZNORM_ISA::sum_squares_centred<T, A>(p, n, s, m);
  }
  template <typename T, typename A>
  static void normalize_run(T* p, int64_t n, A s, A m, A k) {
    ZNORM_ISA::normalize_run<T, A>(p, n, s, m, k);
  }
};

}  // namespace ZNORM_ISA
