// The AVX-512 (F, BW, VL, DQ) instructions of the vector loops (cpu_vec_loops.h): `VecIsa`, sixteen floats
// per register, eight doubles. Each operation is the scalar one of the portable loops (cpu_znorm_kernels.h)
// applied lane by lane.
//
// Included by cpu_znorm_kernels.h inside the AVX-512 copy's namespace (ZNORM_AVX512_LOOPS), under
// `#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c")`; needs <immintrin.h>.

struct VecIsa {
  using F = __m512;   // floats
  using D = __m512d;  // doubles: half a register of floats, widened
  static constexpr int kFloats = 16;

  // kFloats elements -> floats (exact for every type).
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F load(const c10::BFloat16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static F load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }

  // 2 * kFloats floats -> elements, rounded as from_acc does (float16: in the current rounding mode, as the
  // scalar vcvtps2ph of this copy's from_acc; nearest even by default).
  template <typename T>
  static void store2(T* p, F a, F b) {
    store(p, a);
    store(p + kFloats, b);
  }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store(c10::BFloat16* p, F v) {
    // from_acc<c10::BFloat16> lane by lane: (bits + 0x7FFF + lsb) >> 16, NaN -> 0x7FC0; then each 32-bit
    // lane's low half, in order (vpmovdw).
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static void store(c10::Half* p, F v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_CUR_DIRECTION));
  }

  // normalize_run's z = ((x - vh) - vl) * vk for bfloat16, 2 * kFloats at a time, rounded by vcvtne2ps2bf16
  // (round to nearest even, as from_acc) where the CPU has AVX512_BF16: the elements it wrote, a multiple of
  // 2 * kFloats (0 without AVX512_BF16). That instruction reads denormals as zero and keeps a NaN's payload,
  // where from_acc keeps denormals and writes 0x7FC0: a pair of registers holding either takes store2.
  static int64_t z_bf16(c10::BFloat16* p, int64_t n, F vh, F vl, F vk) {
    static const bool has = __builtin_cpu_supports("avx512bf16");
    return has ? z_bf16_rounded(p, n, vh, vl, vk) : 0;
  }
  __attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c"))) static int64_t z_bf16_rounded(
      c10::BFloat16* p, int64_t n, F vh, F vl, F vk) {
    constexpr int kSpecial = 0x01 | 0x20 | 0x80;  // vfpclassps: quiet NaN, denormal, signalling NaN
    int64_t i = 0;
    for (; i + 2 * kFloats <= n; i += 2 * kFloats) {
      const F a = mul(sub(sub(load(p + i), vh), vl), vk);
      const F b = mul(sub(sub(load(p + i + kFloats), vh), vl), vk);
      if (_mm512_fpclass_ps_mask(a, kSpecial) | _mm512_fpclass_ps_mask(b, kSpecial)) {
        store2(p + i, a, b);
        continue;
      }
      _mm512_storeu_si512(p + i, (__m512i)_mm512_cvtne2ps_pbh(b, a));  // a in the low half
    }
    return i;
  }

  static F splat(float x) { return _mm512_set1_ps(x); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  // `v < m ? v : m` and `v > m ? v : m` exactly: vminps/vmaxps return their second operand when either is NaN.
  static F min(F v, F m) { return _mm512_min_ps(v, m); }
  static F max(F v, F m) { return _mm512_max_ps(v, m); }
  static void put(float* p, F v) { _mm512_store_ps(p, v); }

  static D lo(F v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
  static D hi(F v) { return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))); }
  static D get(const double* p) { return _mm512_load_pd(p); }
  static D add(D a, D b) { return _mm512_add_pd(a, b); }
  static void put(double* p, D v) { _mm512_store_pd(p, v); }
};
