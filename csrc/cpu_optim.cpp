// The CPU kernels of the fused optimizer steps, znorm_sgd_step_ and znorm_adam_step_ (schemas in znorm.h).
//
// The same items as znorm_ (make_plan over the tensors of at least 1 element; cpu_common.h): a batch item
// computes each of its tensors' statistics (run_stats over the whole tensor, as znorm_'s batch item in
// cpu_znorm.cpp) and then updates it while it is in cache; a chunk item of a large treated tensor computes its
// chunk's partial moments in phase 1, phase 2 merges them in chunk order (as znorm_), phase 3 updates the
// chunk. So mean and multiplier are bitwise those of znorm_, and z those it would write. The update walks a run
// kOptBlock elements (tiles.h) at a time: the block's z into a small buffer (z_run, or z_run_wide for "wide"
// tensors), then one loop over z, the parameter and its states (cpu_optim_kernels.h). Untreated tensors and
// tensors of one element take z = g.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "cpu_common.h"
#include "znorm.h"

namespace znorm {
namespace {

using cpu_tiles::kOptBlock;

struct OptEntry {
  void* p = nullptr;
  void* g = nullptr;
  void* s[3] = {nullptr, nullptr, nullptr};  // states: SGD (buffer); Adam (exp_avg, exp_avg_sq, max_exp_avg_sq)
  int64_t numel = 0;
  int64_t index = 0;  // position in the op's lists: its row of `stats`
  bool treated = false;
  bool first = false;
  double step_size = 0.0;
  double bc2_sqrt = 1.0;
};

// Runs `update(entry, begin, z, n)` over every element of every entry, with z the block's z-scores in A (a
// scratch buffer the update may overwrite);
// computes the statistics of treated entries of >= 2 elements on the way (rows of `stats` written).
template <typename T, typename K, typename KO, typename Update>
void optim_typed(const std::vector<OptEntry>& es, double eps, double correction, double* stats, bool write_grad,
                 const Update& update) {
  using A = acc_t<T>;
  std::vector<int64_t> numels;
  int64_t total = 0;
  for (const OptEntry& e : es) {
    numels.push_back(e.numel);
    total += e.numel;
  }
  const Plan plan = make_plan(numels, 1);
  auto zs = [&](int64_t t) { return es[t].treated && es[t].numel >= 2; };
  auto record = [&](int64_t t, const Final& f) {
    if (stats == nullptr) return;
    stats[2 * es[t].index] = f.mean;
    stats[2 * es[t].index + 1] = f.stdev;
  };
  // One run of entry t: elements [begin, begin + len).
  auto apply = [&](int64_t t, int64_t begin, int64_t len, const ZConst<A>& c) {
    const OptEntry& e = es[t];
    T* g = static_cast<T*>(e.g) + begin;
    const bool store = write_grad && zs(t);  // z = g elsewhere: nothing to write
    A z[kOptBlock];
    for (int64_t off = 0; off < len; off += kOptBlock) {
      const int64_t n = std::min(kOptBlock, len - off);
      if (c.wide) {
        KO::template z_run_wide<T, A>(g + off, z, n, c.mean, c.inv);
      } else {
        KO::template z_run<T, A>(g + off, z, n, c.hi, c.lo, c.mult);
      }
      if (store) KO::template store_run<T, A>(g + off, z, n);
      update(e, begin + off, z, n);
    }
  };
  std::vector<Moments> partial(plan.items.size());
  run_items(static_cast<int64_t>(plan.items.size()), total, [&](int64_t i) {
    const Item& item = plan.items[i];
    if (item.last < 0) {
      if (zs(item.first)) partial[i] = run_stats<T, K>(static_cast<const T*>(es[item.first].g) + item.begin, item.len);
      return;
    }
    for (int64_t t = item.first; t < item.last; ++t) {
      const int64_t n = es[t].numel;
      if (n < 1) continue;
      ZConst<A> c;
      if (zs(t)) {
        const Final f = finalize(run_stats<T, K>(static_cast<const T*>(es[t].g), n), eps, correction, nullptr);
        record(t, f);
        c = zconst<A>(f);
      }
      apply(t, 0, n, c);
    }
  });
  if (plan.big.empty()) return;

  std::vector<ZConst<A>> consts(es.size());
  size_t next_chunk = 0;
  for (int64_t t : plan.big) {
    Moments m;
    while (next_chunk < plan.chunk_items.size() && plan.items[plan.chunk_items[next_chunk]].first == t) {
      m = merge(m, partial[plan.chunk_items[next_chunk]]);
      ++next_chunk;
    }
    if (!zs(t)) continue;
    const Final f = finalize(m, eps, correction, nullptr);
    record(t, f);
    consts[t] = zconst<A>(f);
  }
  run_items(static_cast<int64_t>(plan.chunk_items.size()), total, [&](int64_t i) {
    const Item& item = plan.items[plan.chunk_items[i]];
    apply(item.first, item.begin, item.len, consts[item.first]);
  });
}

struct SgdArgs {
  double eps, correction, lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, write_grad;
};

template <typename T, typename K, typename KO, bool WD, bool MOM>
void sgd_typed(const std::vector<OptEntry>& es, const SgdArgs& a, double* stats) {
  using A = acc_t<T>;
  SgdScalars<A> base;
  base.lr = static_cast<A>(a.lr);
  base.momentum = static_cast<A>(a.momentum);
  base.one_minus_dampening = static_cast<A>(1.0 - a.dampening);
  base.weight_decay = static_cast<A>(a.weight_decay);
  base.sign = a.maximize ? A(-1) : A(1);
  base.nesterov = a.nesterov;
  base.first = false;
  optim_typed<T, K, KO>(es, a.eps, a.correction, stats, a.write_grad,
                        [&](const OptEntry& e, int64_t begin, const A* z, int64_t n) {
                          SgdScalars<A> s = base;
                          s.first = e.first;
                          T* b = MOM ? static_cast<T*>(e.s[0]) + begin : nullptr;
                          KO::template sgd_run<T, A, WD, MOM>(static_cast<T*>(e.p) + begin, z, b, n, s);
                        });
}

template <typename T, typename K, typename KO>
void sgd_dispatch(const std::vector<OptEntry>& es, const SgdArgs& a, double* stats) {
  const bool wd = a.weight_decay != 0.0, mom = a.momentum != 0.0;
  if (wd && mom) return sgd_typed<T, K, KO, true, true>(es, a, stats);
  if (wd) return sgd_typed<T, K, KO, true, false>(es, a, stats);
  if (mom) return sgd_typed<T, K, KO, false, true>(es, a, stats);
  sgd_typed<T, K, KO, false, false>(es, a, stats);
}

struct AdamArgs {
  double eps_z, correction, beta1, beta2, lr, weight_decay, eps;
  bool amsgrad, maximize, decoupled, write_grad;
};

template <typename T, typename K, typename KO, int WD, bool AMS>
void adam_typed(const std::vector<OptEntry>& es, const AdamArgs& a, double* stats) {
  using A = acc_t<T>;
  AdamScalars<A> base;
  const double weight = 1.0 - a.beta1;
  base.weight = static_cast<A>(weight);
  base.one_minus_weight = A(1) - base.weight;
  base.small_weight = std::abs(weight) < 0.5;
  base.beta2 = static_cast<A>(a.beta2);
  base.one_minus_beta2 = static_cast<A>(1.0 - a.beta2);
  base.weight_decay = static_cast<A>(a.weight_decay);
  base.decay_factor = static_cast<A>(1.0 - a.lr * a.weight_decay);
  base.eps = static_cast<A>(a.eps);
  base.sign = a.maximize ? A(-1) : A(1);
  base.step_size = A(0);
  base.bc2_sqrt = A(1);
  optim_typed<T, K, KO>(es, a.eps_z, a.correction, stats, a.write_grad,
                        [&](const OptEntry& e, int64_t begin, A* z, int64_t n) {
                          AdamScalars<A> s = base;
                          s.step_size = static_cast<A>(e.step_size);
                          s.bc2_sqrt = static_cast<A>(e.bc2_sqrt);
                          T* vmax = AMS ? static_cast<T*>(e.s[2]) + begin : nullptr;
                          KO::template adam_run<T, A, WD, AMS>(static_cast<T*>(e.p) + begin, z,
                                                               static_cast<T*>(e.s[0]) + begin,
                                                               static_cast<T*>(e.s[1]) + begin, vmax, n, s);
                        });
}

template <typename T, typename K, typename KO>
void adam_dispatch(const std::vector<OptEntry>& es, const AdamArgs& a, double* stats) {
  const int wd = a.weight_decay == 0.0 ? 0 : a.decoupled ? 2 : 1;
  if (a.amsgrad) {
    if (wd == 0) return adam_typed<T, K, KO, 0, true>(es, a, stats);
    if (wd == 1) return adam_typed<T, K, KO, 1, true>(es, a, stats);
    return adam_typed<T, K, KO, 2, true>(es, a, stats);
  }
  if (wd == 0) return adam_typed<T, K, KO, 0, false>(es, a, stats);
  if (wd == 1) return adam_typed<T, K, KO, 1, false>(es, a, stats);
  adam_typed<T, K, KO, 2, false>(es, a, stats);
}

// Checks the lists of one step (nothing is written before every check has passed) and splits the tensors of
// at least one element by dtype. `states`: the state lists in use (each as long as params).
std::array<std::vector<OptEntry>, 4> optim_entries(const char* op, at::TensorList params, at::TensorList grads,
                                                   const std::vector<at::TensorList>& states,
                                                   at::IntArrayRef treated) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, op, ": ", grads.size(), " grads for ", n, " params");
  TORCH_CHECK(treated.size() == n, op, ": ", treated.size(), " treated flags for ", n, " params");
  for (const at::TensorList& l : states) {
    TORCH_CHECK(l.size() == n, op, ": a state list has ", l.size(), " tensors for ", n, " params");
  }
  std::array<std::vector<OptEntry>, 4> by_dtype;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu(), op, ": params[", i, "] is on ", p.device(), ", expected the CPU");
    TORCH_CHECK(p.layout() == at::kStrided, op, ": params[", i, "] is not a dense (strided) tensor");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), op, ": params[", i, "] is not dense (a view with gaps or overlaps)");
    int k = 0;
    while (k < 4 && kDtypes[k] != p.scalar_type()) ++k;
    TORCH_CHECK(k < 4, op, ": params[", i, "] has dtype ", p.scalar_type(),
                "; supported: float32, float16, bfloat16, float64");
    auto same = [&](const at::Tensor& t, const char* what) {
      TORCH_CHECK(t.defined() && t.device() == p.device() && t.layout() == at::kStrided &&
                      t.scalar_type() == p.scalar_type(),
                  op, ": ", what, "[", i, "] must be a strided ", p.scalar_type(), " tensor on the CPU like its param");
      TORCH_CHECK(t.sizes() == p.sizes() && t.strides() == p.strides(), op, ": ", what, "[", i, "] has shape ",
                  t.sizes(), " and strides ", t.strides(), ", its param ", p.sizes(), " and ", p.strides());
    };
    same(grads[i], "grads");
    for (const at::TensorList& l : states) same(l[i], "states");
    if (p.numel() == 0) continue;
    OptEntry e;
    e.p = p.data_ptr();
    e.g = grads[i].data_ptr();
    for (size_t j = 0; j < states.size(); ++j) e.s[j] = states[j][i].data_ptr();
    e.numel = p.numel();
    e.index = static_cast<int64_t>(i);
    e.treated = treated[i] != 0;
    by_dtype[k].push_back(e);
  }
  return by_dtype;
}

// NaN rows of `stats` for the tensors that get no statistics (untreated, or fewer than 2 elements).
void nan_rows(double* stats, at::TensorList params, at::IntArrayRef treated) {
  if (stats == nullptr) return;
  for (size_t i = 0; i < params.size(); ++i) {
    if (treated[i] == 0 || params[i].numel() < 2) {
      stats[2 * i] = stats[2 * i + 1] = std::numeric_limits<double>::quiet_NaN();
    }
  }
}

void znorm_sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                        at::IntArrayRef treated, at::IntArrayRef first, double znorm_eps, double correction,
                        double lr, double momentum, double dampening, bool nesterov, double weight_decay,
                        bool maximize, bool write_grad, const std::optional<at::Tensor>& stats_out) {
  const char* op = "znorm_sgd_step_";
  const bool mom = momentum != 0.0;
  TORCH_CHECK(mom || momentum_buffers.empty(), op, ": momentum_buffers must be empty without momentum");
  TORCH_CHECK(first.size() == params.size(), op, ": ", first.size(), " first flags for ", params.size(), " params");
  std::vector<at::TensorList> states;
  if (mom) states.push_back(momentum_buffers);
  const c10::Device cpu(c10::kCPU);
  bool skipped = false;
  double* stats = check_stats(stats_out, params, cpu, skipped);
  auto by_dtype = optim_entries(op, params, grads, states, treated);  // the last check
  for (auto& es : by_dtype) {
    for (OptEntry& e : es) e.first = first[e.index] != 0;
  }
  nan_rows(stats, params, treated);
  const SgdArgs a{znorm_eps, correction, lr, momentum, dampening, weight_decay, nesterov, maximize, write_grad};
  for (int k = 0; k < 4; ++k) {
    if (by_dtype[k].empty()) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, kDtypes[k], "znorm_sgd_step_cpu", [&] {
#ifdef ZNORM_HAVE_AVX2_COPY
      if (use_avx2()) {
        return sgd_dispatch<scalar_t, cpu_avx2::Kernels, cpu_avx2::OptimKernels>(by_dtype[k], a, stats);
      }
#endif
      sgd_dispatch<scalar_t, cpu_baseline::Kernels, cpu_baseline::OptimKernels>(by_dtype[k], a, stats);
    });
  }
}

void znorm_adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::IntArrayRef treated,
                         c10::ArrayRef<double> step_size, c10::ArrayRef<double> bias_correction2_sqrt,
                         double znorm_eps, double correction, bool amsgrad, double beta1, double beta2, double lr,
                         double weight_decay, double eps, bool maximize, bool decoupled, bool write_grad,
                         const std::optional<at::Tensor>& stats_out) {
  const char* op = "znorm_adam_step_";
  TORCH_CHECK(amsgrad || max_exp_avg_sqs.empty(), op, ": max_exp_avg_sqs must be empty without amsgrad");
  TORCH_CHECK(step_size.size() == params.size() && bias_correction2_sqrt.size() == params.size(), op,
              ": step_size and bias_correction2_sqrt need one entry per param");
  std::vector<at::TensorList> states{exp_avgs, exp_avg_sqs};
  if (amsgrad) states.push_back(max_exp_avg_sqs);
  const c10::Device cpu(c10::kCPU);
  bool skipped = false;
  double* stats = check_stats(stats_out, params, cpu, skipped);
  auto by_dtype = optim_entries(op, params, grads, states, treated);  // the last check
  for (auto& es : by_dtype) {
    for (OptEntry& e : es) {
      e.step_size = step_size[e.index];
      e.bc2_sqrt = bias_correction2_sqrt[e.index];
    }
  }
  nan_rows(stats, params, treated);
  const AdamArgs a{znorm_eps, correction, beta1, beta2, lr, weight_decay, eps,
                   amsgrad, maximize, decoupled, write_grad};
  for (int k = 0; k < 4; ++k) {
    if (by_dtype[k].empty()) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, kDtypes[k], "znorm_adam_step_cpu", [&] {
#ifdef ZNORM_HAVE_AVX2_COPY
      if (use_avx2()) {
        return adam_dispatch<scalar_t, cpu_avx2::Kernels, cpu_avx2::OptimKernels>(by_dtype[k], a, stats);
      }
#endif
      adam_dispatch<scalar_t, cpu_baseline::Kernels, cpu_baseline::OptimKernels>(by_dtype[k], a, stats);
    });
  }
}

}  // namespace
}  // namespace znorm

TORCH_LIBRARY_IMPL(znorm_kernels_C, CPU, m) {
  m.impl("znorm_sgd_step_", &znorm::znorm_sgd_step_cpu);
  m.impl("znorm_adam_step_", &znorm::znorm_adam_step_cpu);
}
