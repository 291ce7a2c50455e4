// The loops of cpu_znorm_kernels.h that sum in float (float32, bfloat16 and float16 runs: their statistics
// and their normalize pass), written once over a copy's vector instructions (`VecIsa`: cpu_avx2_vec.h or
// cpu_avx512_vec.h), which the compiler's own vectorization of the portable loops handled poorly (scalar
// inserts for the 16-bit types, double sums split across registers). Where the AVX-512 copy's CPU has
// AVX512_BF16, bfloat16's normalize pass rounds with one instruction (VecIsa::z_bf16).
//
// Each loop keeps the portable loop's lanes exactly: element i goes to lane i % L, a register holds
// consecutive lanes (VecIsa::kFloats floats, or half as many doubles), and what is left after the last whole
// group of L elements (of the last whole block, for the centred sums), and the reduction of the lanes, is the
// portable code itself (sum_min_max_from, blocked_centred_sums_from). Each vector operation is the scalar one
// applied lane by lane, and -ffp-contract=off keeps them apart, so the results are bitwise those of the
// portable loops.
//
// Included by cpu_znorm_kernels.h inside a vector copy's namespace, after its VecIsa.

namespace vec_loops {

using V = VecIsa;
constexpr int W = V::kFloats;

// sum_min_max<T, float>: the 32 float lanes in L / W registers each of sums, minima and maxima.
template <typename T>
void sum_min_max(const T* __restrict p, int64_t n, float& sum, float& lo, float& hi) {
  constexpr int L = Lanes<float>::value, R = L / W;
  static_assert(L % W == 0, "whole registers of lanes");
  typename V::F acc[R], mn[R], mx[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = V::splat(0.0f);
    mn[r] = V::splat(std::numeric_limits<float>::infinity());
    mx[r] = V::splat(-std::numeric_limits<float>::infinity());
  }
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int r = 0; r < R; ++r) {
      const typename V::F v = V::load(p + i + W * r);
      acc[r] = V::add(acc[r], v);
      mn[r] = V::min(v, mn[r]);
      mx[r] = V::max(v, mx[r]);
    }
  }
  alignas(64) float acc_l[L], mn_l[L], mx_l[L];
  for (int r = 0; r < R; ++r) {
    V::put(acc_l + W * r, acc[r]);
    V::put(mn_l + W * r, mn[r]);
    V::put(mx_l + W * r, mx[r]);
  }
  sum_min_max_from<T, float, L>(p, i, n, acc_l, mn_l, mx_l, sum, lo, hi);
}

// centred_sums<T, float>: the 32 float lanes of the block sums of d and d^2 in L / W registers each, added
// to the double lanes (kept in memory: once per block) after each whole block; the last, partial block by
// the portable code.
template <typename T>
void centred_sums(const T* __restrict p, int64_t n, float m, double& s1, double& q) {
  constexpr int L = Lanes<float>::value, R = L / W;
  constexpr int64_t kBlock = cpu_tiles::kSquareBlock * L;
  static_assert(L % W == 0, "whole registers of lanes");
  const typename V::F vm = V::splat(m);
  alignas(64) double acc_l[L] = {}, sq_l[L] = {};
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    typename V::F bs[R], bq[R];
    for (int r = 0; r < R; ++r) bs[r] = bq[r] = V::splat(0.0f);
    for (int64_t k = i; k < i + kBlock; k += L) {
      for (int r = 0; r < R; ++r) {
        const typename V::F d = V::sub(V::load(p + k + W * r), vm);
        bs[r] = V::add(bs[r], d);
        bq[r] = V::add(bq[r], V::mul(d, d));
      }
    }
    for (int r = 0; r < R; ++r) {  // lanes W * r .. W * r + W - 1, as two registers of doubles each
      double* a = acc_l + W * r;
      double* s = sq_l + W * r;
      V::put(a, V::add(V::get(a), V::lo(bs[r])));
      V::put(a + W / 2, V::add(V::get(a + W / 2), V::hi(bs[r])));
      V::put(s, V::add(V::get(s), V::lo(bq[r])));
      V::put(s + W / 2, V::add(V::get(s + W / 2), V::hi(bq[r])));
    }
  }
  blocked_centred_sums_from<T, L>(p, i, n, m, acc_l, sq_l, s1, q);
}

// normalize_run<T, float>: x <- ((x - hi) - lo) * mult, 2 * W at a time; the rest by the portable loop.
template <typename T>
void normalize_run(T* __restrict p, int64_t n, float hi, float lo, float mult) {
  const typename V::F vh = V::splat(hi), vl = V::splat(lo), vk = V::splat(mult);
  auto z = [&](typename V::F x) { return V::mul(V::sub(V::sub(x, vh), vl), vk); };
  int64_t i = 0;
  if constexpr (std::is_same_v<T, c10::BFloat16>) i = V::z_bf16(p, n, vh, vl, vk);
  for (; i + 2 * W <= n; i += 2 * W) V::store2(p + i, z(V::load(p + i)), z(V::load(p + i + W)));
  ZNORM_ISA::normalize_run<T, float>(p + i, n - i, hi, lo, mult);
}

}  // namespace vec_loops
