// The CPU inner loops of the fused optimizer steps (znorm_sgd_step_, znorm_adam_step_), written so the
// compiler vectorizes them without changing their rounding.
//
// Like cpu_znorm_kernels.h, no include guard on purpose: cpu_common.h includes it twice, right after
// cpu_znorm_kernels.h, with ZNORM_ISA naming the namespace of each copy (cpu_baseline, cpu_avx2), and uses its
// to_acc/from_acc. Every element's result depends on that element and the per-tensor scalars alone, there are
// no reductions, and the build uses -ffp-contract=off: both copies give bitwise the same values.
//
// The update is the one of the Triton optimizer kernels, operation by operation: torch.optim's single-tensor
// formulas in A (float32, float64 for float64 tensors), each operation rounded on its own, each stored value
// (momentum buffer, exp_avg, exp_avg_sq, max_exp_avg_sq, parameter) rounded once to the tensor's dtype and read
// back from that rounded value.
//
// Needs: <immintrin.h> on x86-64, optim_args.h (OptScalars, the per-call scalars), and, per copy,
// cpu_znorm_kernels.h (its to_acc/from_acc) included before it.

namespace ZNORM_ISA {

// z = the value normalize_run writes, ((x - hi) - lo) * mult rounded to T, read back in A. hi = lo = 0 and
// mult = 1 give z = g exactly (untreated tensors, tensors of one element).
template <typename T, typename A>
void z_run(const T* __restrict g, A* __restrict z, int64_t n, A hi, A lo, A mult) {
  for (int64_t i = 0; i < n; ++i) {
    z[i] = static_cast<A>(to_acc(from_acc<T>(((static_cast<A>(to_acc(g[i])) - hi) - lo) * mult)));
  }
}

// The value normalize_run_wide writes, read back in A.
template <typename T, typename A>
void z_run_wide(const T* __restrict g, A* __restrict z, int64_t n, double mean, double mult, double factor) {
  using F = decltype(to_acc(g[0]));
  const double mean_f = mean * factor;
  for (int64_t i = 0; i < n; ++i) {
    z[i] = static_cast<A>(
        to_acc(from_acc<T>(static_cast<F>((static_cast<double>(to_acc(g[i])) * factor - mean_f) * mult))));
  }
}

// g <- z (exact: z is a value of T).
template <typename T, typename A>
void store_run(T* __restrict g, const A* __restrict z, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] = from_acc<T>(z[i]);
}

// x rounded to T, in A (the value a store of x into a T tensor reads back). Kept in A, the compiler vectorizes
// what it would not with a T temporary (a struct for bfloat16 and float16).
template <typename T, typename A>
inline A round_to(A x) {
  return static_cast<A>(to_acc(from_acc<T>(x)));
}

// torch.optim.SGD on z: d = ±z (+ weight_decay * p); buf = d (first) or buf * momentum + (1 - dampening) * d,
// stored; d = d + momentum * buf (nesterov) or buf; p <- p - lr * d. `first`: the buffer is new and becomes d.
template <typename T, typename A, bool WD, bool MOM>
void sgd_run(T* __restrict p, const A* __restrict z, T* __restrict b, int64_t n, const OptScalars<A>& s,
             bool first) {
  const A lr = s.lr, momentum = s.momentum, omd = s.one_minus_dampening, wd = s.weight_decay, sign = s.sign;
  const bool nesterov = s.nesterov;
  for (int64_t i = 0; i < n; ++i) {
    const A pv = static_cast<A>(to_acc(p[i]));
    A d = z[i] * sign;
    if (WD) d = d + wd * pv;
    if (MOM) {
      const A prev = static_cast<A>(to_acc(b[i]));
      const A next = prev * momentum + omd * d;
      const A bv = round_to<T, A>(first ? d : next);
      b[i] = from_acc<T>(bv);  // exact
      d = nesterov ? d + momentum * bv : bv;
    }
    p[i] = from_acc<T>(pv - lr * d);
  }
}

// x <- sqrt(x), correctly rounded. Written with intrinsics: the build keeps errno semantics (-fmath-errno),
// under which the compiler does not vectorize std::sqrt. sqrtps/sqrtpd round like sqrtss/sqrtsd and like
// std::sqrt: both copies give the same values.
inline void sqrt_run(float* __restrict x, int64_t n) {
  int64_t i = 0;
#if defined(__x86_64__) && defined(ZNORM_F16C)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_sqrt_ps(_mm256_loadu_ps(x + i)));
#elif defined(__x86_64__)
  for (; i + 4 <= n; i += 4) _mm_storeu_ps(x + i, _mm_sqrt_ps(_mm_loadu_ps(x + i)));
#endif
  for (; i < n; ++i) x[i] = std::sqrt(x[i]);
}
inline void sqrt_run(double* __restrict x, int64_t n) {
  int64_t i = 0;
#if defined(__x86_64__) && defined(ZNORM_F16C)
  for (; i + 4 <= n; i += 4) _mm256_storeu_pd(x + i, _mm256_sqrt_pd(_mm256_loadu_pd(x + i)));
#elif defined(__x86_64__)
  for (; i + 2 <= n; i += 2) _mm_storeu_pd(x + i, _mm_sqrt_pd(_mm_loadu_pd(x + i)));
#endif
  for (; i < n; ++i) x[i] = std::sqrt(x[i]);
}

// torch.optim.Adam (WD = 1: L2) / AdamW (WD = 2: decoupled) on z, non-capturable single-tensor formulas:
// d = ±z (+ weight_decay * p), or p *= 1 - lr * weight_decay; m = lerp(m, d, 1 - beta1) (torch.lerp's two
// formulas); v = v * beta2 + (1 - beta2) * d * d; amsgrad: vmax = max(vmax, v) (NaN propagates), used for v;
// p <- p - (step_size * m) / (sqrt(v) / bias_correction2_sqrt + eps).
// Three loops over the run (at most a block, in L1): the states, with v (or vmax) left in `z`; the square
// roots; the parameters (p and the stored m read again: the same values).
template <typename T, typename A, int WD, bool AMS>
void adam_run(T* __restrict p, A* __restrict z, T* __restrict m, T* __restrict v, T* __restrict vmax,
              int64_t n, const OptScalars<A>& s) {
  const A weight = s.weight, omw = s.one_minus_weight, beta2 = s.beta2, omb2 = s.one_minus_beta2;
  const A wd = s.weight_decay, decay = s.decay_factor, eps = s.eps, sign = s.sign;
  const A step_size = s.step_size, bc2 = s.bc2_sqrt;
  const bool small = s.small_weight;
  for (int64_t i = 0; i < n; ++i) {
    const A pv = static_cast<A>(to_acc(p[i]));
    A d = z[i] * sign;
    if (WD == 1) d = d + wd * pv;
    const A mv = static_cast<A>(to_acc(m[i]));
    const A m_small = mv + weight * (d - mv);
    const A m_large = d - (d - mv) * omw;
    m[i] = from_acc<T>(small ? m_small : m_large);
    const A vv = static_cast<A>(to_acc(v[i]));
    A vx = round_to<T, A>(vv * beta2 + omb2 * d * d);
    v[i] = from_acc<T>(vx);  // exact
    if (AMS) {
      const A old = static_cast<A>(to_acc(vmax[i]));
      A r = old > vx ? old : vx;
      r = old != old ? old : r;
      r = vx != vx ? vx : r;
      vx = r;
      vmax[i] = from_acc<T>(vx);  // exact
    }
    z[i] = vx;
  }
  sqrt_run(z, n);
  for (int64_t i = 0; i < n; ++i) {
    A pv = static_cast<A>(to_acc(p[i]));
    if (WD == 2) pv = pv * decay;
    const A denom = z[i] / bc2 + eps;
    p[i] = from_acc<T>(pv - (step_size * static_cast<A>(to_acc(m[i]))) / denom);
  }
}

// This copy's optimizer loops as one type, the driver's template argument.
struct OptimKernels {
  template <typename T, typename A>
  static void z_run(const T* g, A* z, int64_t n, A hi, A lo, A mult) {
    ZNORM_ISA::z_run<T, A>(g, z, n, hi, lo, mult);
  }
  template <typename T, typename A>
  static void z_run_wide(const T* g, A* z, int64_t n, double mean, double mult, double factor) {
    ZNORM_ISA::z_run_wide<T, A>(g, z, n, mean, mult, factor);
  }
  template <typename T, typename A>
  static void store_run(T* g, const A* z, int64_t n) {
    ZNORM_ISA::store_run<T, A>(g, z, n);
  }
  template <typename T, typename A, bool WD, bool MOM>
  static void sgd_run(T* p, const A* z, T* b, int64_t n, const OptScalars<A>& s, bool first) {
    ZNORM_ISA::sgd_run<T, A, WD, MOM>(p, z, b, n, s, first);
  }
  template <typename T, typename A, int WD, bool AMS>
  static void adam_run(T* p, A* z, T* m, T* v, T* vmax, int64_t n, const OptScalars<A>& s) {
    ZNORM_ISA::adam_run<T, A, WD, AMS>(p, z, m, v, vmax, n, s);
  }
};

}  // namespace ZNORM_ISA
