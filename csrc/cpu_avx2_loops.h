// The float-accumulating loops of cpu_znorm_kernels.h written with AVX2 intrinsics: float32, bfloat16 and
// float16 runs (their statistics and their normalize pass), which the compiler's own vectorization of the
// portable loops handled poorly (scalar inserts for the 16-bit types, double sums split across registers).
//
// Each loop keeps the portable loop's lanes exactly: element i goes to lane i % L, a vector register holds L/8
// (floats) or L/4 (doubles) consecutive lanes, and what is left after the last whole group of L elements, and
// the reduction of the lanes, is the portable code itself (sum_min_max_from, centred_sums_from). Each vector
// operation is the scalar one applied lane by lane (add, subtract, multiply, the comparisons' select, the
// conversions), and -ffp-contract=off keeps them apart, so the results are bitwise those of the portable loops.
//
// Included by cpu_znorm_kernels.h inside the AVX2 copy's namespace (ZNORM_AVX2_LOOPS), under
// `#pragma GCC target("avx2,f16c")`; needs <immintrin.h>.

namespace avx2_loops {

// Eight elements -> eight floats (exact for every type).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// Eight floats -> eight elements, rounded as from_acc does (float16: in the current rounding mode, as the
// scalar vcvtps2ph of this copy's from_acc; nearest even by default).
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
// from_acc<c10::BFloat16> lane by lane, before packing: (bits + 0x7FFF + lsb) >> 16, NaN -> 0x7FC0; every
// lane is then at most 0xFFFF, so the saturating packs are exact.
inline __m256i bf16_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}
inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i r = bf16_bits(v);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_CUR_DIRECTION));
}
// Sixteen at once: for bfloat16 one 256-bit pack (its lanes interleave the two halves; vpermq restores order).
template <typename T>
inline void store16(T* p, __m256 a, __m256 b) {
  store8(p, a);
  store8(p + 8, b);
}
template <>
inline void store16<c10::BFloat16>(c10::BFloat16* p, __m256 a, __m256 b) {
  const __m256i packed = _mm256_packus_epi32(bf16_bits(a), bf16_bits(b));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));
}

// sum_min_max<T, float>: 32 lanes in four registers. `v < mn ? v : mn` is vminps(v, mn) exactly (it returns
// its second operand when either is NaN), and `v > mx ? v : mx` is vmaxps(v, mx).
template <typename T>
void sum_min_max(const T* __restrict p, int64_t n, float& sum, float& lo, float& hi) {
  constexpr int L = Lanes<float>::value;
  static_assert(L == 32, "four registers of eight lanes");
  __m256 acc[4], mn[4], mx[4];
  for (int r = 0; r < 4; ++r) {
    acc[r] = _mm256_setzero_ps();
    mn[r] = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    mx[r] = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  }
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int r = 0; r < 4; ++r) {
      const __m256 v = load8(p + i + 8 * r);
      acc[r] = _mm256_add_ps(acc[r], v);
      mn[r] = _mm256_min_ps(v, mn[r]);
      mx[r] = _mm256_max_ps(v, mx[r]);
    }
  }
  alignas(32) float acc_l[L], mn_l[L], mx_l[L];
  for (int r = 0; r < 4; ++r) {
    _mm256_store_ps(acc_l + 8 * r, acc[r]);
    _mm256_store_ps(mn_l + 8 * r, mn[r]);
    _mm256_store_ps(mx_l + 8 * r, mx[r]);
  }
  sum_min_max_from<T, float, L>(p, i, n, acc_l, mn_l, mx_l, sum, lo, hi);
}

// centred_sums<T, float>: d = x - m in float, widened to double; 16 lanes of sum(d) and of sum(d^2) in four
// registers each.
template <typename T>
void centred_sums(const T* __restrict p, int64_t n, float m, double& s1, double& q) {
  constexpr int L = Lanes<double>::value;
  static_assert(L == 16, "four registers of four lanes");
  const __m256 vm = _mm256_set1_ps(m);
  __m256d acc[4], sq[4];
  for (int r = 0; r < 4; ++r) acc[r] = sq[r] = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int h = 0; h < 2; ++h) {
      const __m256 d = _mm256_sub_ps(load8(p + i + 8 * h), vm);
      const __m256d d0 = _mm256_cvtps_pd(_mm256_castps256_ps128(d));
      const __m256d d1 = _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1));
      acc[2 * h] = _mm256_add_pd(acc[2 * h], d0);
      acc[2 * h + 1] = _mm256_add_pd(acc[2 * h + 1], d1);
      sq[2 * h] = _mm256_add_pd(sq[2 * h], _mm256_mul_pd(d0, d0));
      sq[2 * h + 1] = _mm256_add_pd(sq[2 * h + 1], _mm256_mul_pd(d1, d1));
    }
  }
  alignas(32) double acc_l[L], sq_l[L];
  for (int r = 0; r < 4; ++r) {
    _mm256_store_pd(acc_l + 4 * r, acc[r]);
    _mm256_store_pd(sq_l + 4 * r, sq[r]);
  }
  centred_sums_from<T, float, L>(p, i, n, m, acc_l, sq_l, s1, q);
}

// normalize_run<T, float>: x <- ((x - hi) - lo) * mult, sixteen at a time; the last n % 16 by the portable
// loop.
template <typename T>
void normalize_run(T* __restrict p, int64_t n, float hi, float lo, float mult) {
  const __m256 vh = _mm256_set1_ps(hi), vl = _mm256_set1_ps(lo), vk = _mm256_set1_ps(mult);
  auto z = [&](__m256 x) { return _mm256_mul_ps(_mm256_sub_ps(_mm256_sub_ps(x, vh), vl), vk); };
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16(p + i, z(load8(p + i)), z(load8(p + i + 8)));
  ZNORM_ISA::normalize_run<T, float>(p + i, n - i, hi, lo, mult);
}

}  // namespace avx2_loops
