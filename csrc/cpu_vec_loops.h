// The loops of cpu_znorm_kernels.h that sum in float (float32, bfloat16 and float16 runs: their statistics
// and their normalize pass), written once over a copy's vector instructions (`VecIsa`: cpu_avx2_vec.h or
// cpu_avx512_vec.h), which the compiler's own vectorization of the portable loops handled poorly (scalar
// inserts for the 16-bit types, double sums split across registers).
//
// Each loop keeps the portable loop's lanes exactly: element i goes to lane i % L, a register holds
// consecutive lanes (VecIsa::kFloats floats, or half as many doubles), and what is left after the last whole
// group of L elements, and the reduction of the lanes, is the portable code itself (sum_min_max_from,
// centred_sums_from). Each vector operation is the scalar one applied lane by lane, and -ffp-contract=off
// keeps them apart, so the results are bitwise those of the portable loops.
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

// centred_sums<T, float>: d = x - m in float, widened to double; the 16 double lanes of sum(d) and of
// sum(d^2), each group of W floats filling two registers of W / 2 lanes.
template <typename T>
void centred_sums(const T* __restrict p, int64_t n, float m, double& s1, double& q) {
  constexpr int L = Lanes<double>::value, R = L / W;
  static_assert(L % W == 0, "whole registers of lanes");
  const typename V::F vm = V::splat(m);
  typename V::D acc[2 * R], sq[2 * R];
  for (int r = 0; r < 2 * R; ++r) acc[r] = sq[r] = V::zero_d();
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int h = 0; h < R; ++h) {
      const typename V::F d = V::sub(V::load(p + i + W * h), vm);
      const typename V::D d0 = V::lo(d), d1 = V::hi(d);
      acc[2 * h] = V::add(acc[2 * h], d0);
      acc[2 * h + 1] = V::add(acc[2 * h + 1], d1);
      sq[2 * h] = V::add(sq[2 * h], V::mul(d0, d0));
      sq[2 * h + 1] = V::add(sq[2 * h + 1], V::mul(d1, d1));
    }
  }
  alignas(64) double acc_l[L], sq_l[L];
  for (int r = 0; r < 2 * R; ++r) {
    V::put(acc_l + W / 2 * r, acc[r]);
    V::put(sq_l + W / 2 * r, sq[r]);
  }
  centred_sums_from<T, float, L>(p, i, n, m, acc_l, sq_l, s1, q);
}

// normalize_run<T, float>: x <- ((x - hi) - lo) * mult, 2 * W at a time; the rest by the portable loop.
template <typename T>
void normalize_run(T* __restrict p, int64_t n, float hi, float lo, float mult) {
  const typename V::F vh = V::splat(hi), vl = V::splat(lo), vk = V::splat(mult);
  auto z = [&](typename V::F x) { return V::mul(V::sub(V::sub(x, vh), vl), vk); };
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) V::store2(p + i, z(V::load(p + i)), z(V::load(p + i + W)));
  ZNORM_ISA::normalize_run<T, float>(p + i, n - i, hi, lo, mult);
}

}  // namespace vec_loops
