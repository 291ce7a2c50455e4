// The AVX2 instructions of the vector loops (cpu_vec_loops.h): `VecIsa`, eight floats per register, four
// doubles. Each operation is the scalar one of the portable loops (cpu_znorm_kernels.h) applied lane by lane.
//
// Included by cpu_znorm_kernels.h inside the AVX2 copy's namespace (ZNORM_AVX2_LOOPS), under
// `#pragma GCC target("avx2,f16c")`; needs <immintrin.h>.

struct VecIsa {
  using F = __m256;   // floats
  using D = __m256d;  // doubles: half a register of floats, widened
  static constexpr int kFloats = 8;

  // kFloats elements -> floats (exact for every type).
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F load(const c10::BFloat16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static F load(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

  // 2 * kFloats floats -> elements, rounded as from_acc does (float16: in the current rounding mode, as the
  // scalar vcvtps2ph of this copy's from_acc; nearest even by default).
  static void store2(float* p, F a, F b) {
    _mm256_storeu_ps(p, a);
    _mm256_storeu_ps(p + 8, b);
  }
  static void store2(c10::BFloat16* p, F a, F b) {
    // One 256-bit pack (its lanes interleave the two halves; vpermq restores the order).
    const __m256i packed = _mm256_packus_epi32(bf16_bits(a), bf16_bits(b));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));
  }
  static void store2(c10::Half* p, F a, F b) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a, _MM_FROUND_CUR_DIRECTION));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), _mm256_cvtps_ph(b, _MM_FROUND_CUR_DIRECTION));
  }
  // from_acc<c10::BFloat16> lane by lane, before packing: (bits + 0x7FFF + lsb) >> 16, NaN -> 0x7FC0; every
  // lane is then at most 0xFFFF, so the saturating pack is exact.
  static __m256i bf16_bits(F v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  }

  // No one-instruction bfloat16 rounding here (see the AVX-512 copy): normalize_run stores every element.
  static int64_t z_bf16(c10::BFloat16*, int64_t, F, F, F) { return 0; }

  static F splat(float x) { return _mm256_set1_ps(x); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  // `v < m ? v : m` and `v > m ? v : m` exactly: vminps/vmaxps return their second operand when either is NaN.
  static F min(F v, F m) { return _mm256_min_ps(v, m); }
  static F max(F v, F m) { return _mm256_max_ps(v, m); }
  static void put(float* p, F v) { _mm256_store_ps(p, v); }

  static D lo(F v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
  static D hi(F v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }
  static D get(const double* p) { return _mm256_load_pd(p); }
  static D add(D a, D b) { return _mm256_add_pd(a, b); }
  static void put(double* p, D v) { _mm256_store_pd(p, v); }
};
