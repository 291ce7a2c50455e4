// The loops of cpu_avx2_loops.h in AVX-512 (F, BW, VL, DQ): the same lanes, twice as many of them per
// register. A 512-bit register holds 16 consecutive float lanes or 8 double lanes, so the 32 float lanes of a
// run's sums are two registers and its 16 double lanes two more; what is left after the last whole group of
// lanes, and the lanes' reduction, is the portable code itself. Each operation is the scalar one lane by lane
// and -ffp-contract=off keeps them apart: the results are bitwise those of the portable and AVX2 loops.
//
// Included by cpu_znorm_kernels.h inside the AVX-512 copy's namespace (ZNORM_AVX512_LOOPS), under
// `#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c")`; needs <immintrin.h>.

namespace avx512_loops {

// Sixteen elements -> sixteen floats (exact for every type).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Sixteen floats -> sixteen elements, rounded as from_acc does (float16: in the current rounding mode, as
// the scalar vcvtps2ph of this copy's from_acc; nearest even by default).
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(c10::BFloat16* p, __m512 v) {
  // from_acc<c10::BFloat16> lane by lane: (bits + 0x7FFF + lsb) >> 16, NaN -> 0x7FC0; then each 32-bit lane's
  // low half, in order (vpmovdw).
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
inline void store16(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_CUR_DIRECTION));
}

// sum_min_max<T, float>: 32 lanes in two registers; vminps(v, mn) is `v < mn ? v : mn` exactly (its second
// operand when either is NaN), vmaxps(v, mx) is `v > mx ? v : mx`.
template <typename T>
void sum_min_max(const T* __restrict p, int64_t n, float& sum, float& lo, float& hi) {
  constexpr int L = Lanes<float>::value;
  static_assert(L == 32, "two registers of sixteen lanes");
  __m512 acc[2], mn[2], mx[2];
  for (int r = 0; r < 2; ++r) {
    acc[r] = _mm512_setzero_ps();
    mn[r] = _mm512_set1_ps(std::numeric_limits<float>::infinity());
    mx[r] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  }
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int r = 0; r < 2; ++r) {
      const __m512 v = load16(p + i + 16 * r);
      acc[r] = _mm512_add_ps(acc[r], v);
      mn[r] = _mm512_min_ps(v, mn[r]);
      mx[r] = _mm512_max_ps(v, mx[r]);
    }
  }
  alignas(64) float acc_l[L], mn_l[L], mx_l[L];
  for (int r = 0; r < 2; ++r) {
    _mm512_store_ps(acc_l + 16 * r, acc[r]);
    _mm512_store_ps(mn_l + 16 * r, mn[r]);
    _mm512_store_ps(mx_l + 16 * r, mx[r]);
  }
  sum_min_max_from<T, float, L>(p, i, n, acc_l, mn_l, mx_l, sum, lo, hi);
}

// centred_sums<T, float>: d = x - m in float, widened to double; 16 lanes of sum(d) and of sum(d^2) in two
// registers each.
template <typename T>
void centred_sums(const T* __restrict p, int64_t n, float m, double& s1, double& q) {
  constexpr int L = Lanes<double>::value;
  static_assert(L == 16, "two registers of eight lanes");
  const __m512 vm = _mm512_set1_ps(m);
  __m512d acc[2], sq[2];
  for (int r = 0; r < 2; ++r) acc[r] = sq[r] = _mm512_setzero_pd();
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const __m512 d = _mm512_sub_ps(load16(p + i), vm);
    const __m512d d0 = _mm512_cvtps_pd(_mm512_castps512_ps256(d));
    const __m512d d1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d), 1)));
    acc[0] = _mm512_add_pd(acc[0], d0);
    acc[1] = _mm512_add_pd(acc[1], d1);
    sq[0] = _mm512_add_pd(sq[0], _mm512_mul_pd(d0, d0));
    sq[1] = _mm512_add_pd(sq[1], _mm512_mul_pd(d1, d1));
  }
  alignas(64) double acc_l[L], sq_l[L];
  for (int r = 0; r < 2; ++r) {
    _mm512_store_pd(acc_l + 8 * r, acc[r]);
    _mm512_store_pd(sq_l + 8 * r, sq[r]);
  }
  centred_sums_from<T, float, L>(p, i, n, m, acc_l, sq_l, s1, q);
}

// normalize_run<T, float>: x <- ((x - hi) - lo) * mult, sixteen at a time; the last n % 16 by the portable
// loop.
template <typename T>
void normalize_run(T* __restrict p, int64_t n, float hi, float lo, float mult) {
  const __m512 vh = _mm512_set1_ps(hi), vl = _mm512_set1_ps(lo), vk = _mm512_set1_ps(mult);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    store16(p + i, _mm512_mul_ps(_mm512_sub_ps(_mm512_sub_ps(load16(p + i), vh), vl), vk));
  }
  ZNORM_ISA::normalize_run<T, float>(p + i, n - i, hi, lo, mult);
}

}  // namespace avx512_loops
