// The CPU kernels of the fused optimizer steps, znorm_sgd_step_ and znorm_adam_step_ (schemas in znorm.h; the ops'
// entry points and argument checks, shared with the CUDA kernels, in optim_args.h).
//
// The same items and phases as znorm_ (make_plan over the tensors of at least 1 element, run_plan; cpu_common.h):
// a batch item computes each of its tensors' statistics (run_stats over the whole tensor, as znorm_'s batch item
// in cpu_znorm.cpp) and then updates it while it is in cache; a chunk item of a large treated tensor computes its
// chunk's partial moments in phase 1, phase 2 merges them in chunk order, phase 3 updates the chunk. So mean and
// multiplier are bitwise those of znorm_, and z those it would write. The update walks a run kOptBlock elements
// (tiles.h) at a time: the block's z into a small buffer (z_run, or z_run_wide for "wide" tensors), then one loop
// over z, the parameter and its states (cpu_optim_kernels.h). Untreated tensors and tensors of one element take
// z = g.
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
#include "optim_args.h"
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
  for (const OptEntry& e : es) numels.push_back(e.numel);
  auto zs = [&](int64_t t) { return es[t].treated && es[t].numel >= 2; };
  auto grad = [&](int64_t t) { return static_cast<T*>(es[t].g); };
  // The constants of z for a treated tensor t from its moments (its row of `stats` written on the way).
  auto consts = [&](int64_t t, const Moments& m) {
    const Final f = finalize(m, eps, correction, nullptr);
    record_row(stats, es[t].index, f);
    return zconst<A>(f);
  };
  // One run of entry t: elements [begin, begin + len).
  auto apply = [&](int64_t t, int64_t begin, int64_t len, const ZConst<A>& c) {
    const OptEntry& e = es[t];
    T* g = grad(t) + begin;
    const bool store = write_grad && zs(t);  // z = g elsewhere: nothing to write
    A z[kOptBlock];
    for (int64_t off = 0; off < len; off += kOptBlock) {
      const int64_t n = std::min(kOptBlock, len - off);
      if (c.wide) {
        KO::template z_run_wide<T, A>(g + off, z, n, c.mean, c.inv, c.factor);
      } else {
        KO::template z_run<T, A>(g + off, z, n, c.hi, c.lo, c.mult);
      }
      if (store) KO::template store_run<T, A>(g + off, z, n);
      update(e, begin + off, z, n);
    }
  };
  run_plan(
      make_plan(numels, 1),
      [&](int64_t t, int64_t begin, int64_t len) { return zs(t) ? run_stats<T, K>(grad(t) + begin, len) : Moments{}; },
      [&](int64_t t) {
        const int64_t n = es[t].numel;
        if (n < 1) return;
        apply(t, 0, n, zs(t) ? consts(t, run_stats<T, K>(grad(t), n)) : ZConst<A>{});  // z = g without statistics
      },
      [&](int64_t t, const Moments& m) { return zs(t) ? consts(t, m) : ZConst<A>{}; }, apply);
}

template <typename T, typename K, typename KO, bool WD, bool MOM>
void sgd_typed(const std::vector<OptEntry>& es, const OptScalars<acc_t<T>>& base, const SgdHyper& h, double* stats) {
  using A = acc_t<T>;
  optim_typed<T, K, KO>(es, h.znorm_eps, h.correction, stats, h.write_grad,
                        [&](const OptEntry& e, int64_t begin, const A* z, int64_t n) {
                          T* b = MOM ? static_cast<T*>(e.s[0]) + begin : nullptr;
                          KO::template sgd_run<T, A, WD, MOM>(static_cast<T*>(e.p) + begin, z, b, n, base, e.first);
                        });
}

template <typename T, typename K, typename KO, int WD, bool AMS>
void adam_typed(const std::vector<OptEntry>& es, const OptScalars<acc_t<T>>& base, const AdamHyper& h,
                double* stats) {
  using A = acc_t<T>;
  optim_typed<T, K, KO>(es, h.znorm_eps, h.correction, stats, h.write_grad,
                        [&](const OptEntry& e, int64_t begin, A* z, int64_t n) {
                          OptScalars<A> s = base;
                          s.step_size = static_cast<A>(e.step_size);
                          s.bc2_sqrt = static_cast<A>(e.bc2_sqrt);
                          T* vmax = AMS ? static_cast<T*>(e.s[2]) + begin : nullptr;
                          KO::template adam_run<T, A, WD, AMS>(static_cast<T*>(e.p) + begin, z,
                                                               static_cast<T*>(e.s[0]) + begin,
                                                               static_cast<T*>(e.s[1]) + begin, vmax, n, s);
                        });
}

// A step once its own arguments are checked (optim_args.h): `stats` and the lists checked (step_entries: nothing
// is written before every check has passed), each entry completed by fill(entry) (its per-tensor arguments),
// NaN rows of `stats` for the tensors without statistics, then run.template operator()<T, K, KO>(entries, stats)
// per dtype, on this machine's copy of the loops.
template <const char* Name, typename Fill, typename Run>
void optim_step(const StepLists& l, const Fill& fill, const Run& run) {
  const c10::Device cpu(c10::kCPU);
  bool skipped = false;
  double* stats = check_stats(l.stats_out, l.params, cpu, skipped);
  const auto by_dtype = step_entries<OptEntry>(l, cpu, [&](size_t i) {
    OptEntry e;
    e.p = l.params[i].data_ptr();
    e.g = l.grads[i].data_ptr();
    for (size_t j = 0; j < l.states.size(); ++j) e.s[j] = l.states[j][i].data_ptr();
    e.numel = l.params[i].numel();
    e.index = static_cast<int64_t>(i);
    e.treated = l.treated[i] != 0;
    fill(e);
    return e;
  });  // the last check
  nan_rows(stats, l.params.size(), [&](size_t i) { return l.treated[i] == 0 || l.params[i].numel() < 2; });
  for_each_dtype<Name>(by_dtype, [&]<typename T>(int k) {
    with_isa([&]<typename K, typename KO>() { run.template operator()<T, K, KO>(by_dtype[k], stats); });
  });
}

constexpr char kSgdDispatch[] = "znorm_sgd_step_cpu";
constexpr char kAdamDispatch[] = "znorm_adam_step_cpu";

// The CPU kernels of the ops (znorm_sgd_step, znorm_adam_step in optim_args.h).
struct CpuSteps {
  static void sgd(const StepLists& l, at::IntArrayRef first, const SgdHyper& h) {
    auto fill = [&](OptEntry& e) { e.first = first[e.index] != 0; };
    optim_step<kSgdDispatch>(l, fill, [&]<typename T, typename K, typename KO>(const std::vector<OptEntry>& es,
                                                                              double* stats) {
      const auto s = sgd_scalars<acc_t<T>>(h);
      sgd_variant(h, [&]<bool WD, bool MOM>() { sgd_typed<T, K, KO, WD, MOM>(es, s, h, stats); });
    });
  }

  static void adam(const StepLists& l, c10::ArrayRef<double> step_size, c10::ArrayRef<double> bc2_sqrt,
                   const AdamHyper& h) {
    auto fill = [&](OptEntry& e) {
      e.step_size = step_size[e.index];
      e.bc2_sqrt = bc2_sqrt[e.index];
    };
    optim_step<kAdamDispatch>(l, fill, [&]<typename T, typename K, typename KO>(const std::vector<OptEntry>& es,
                                                                               double* stats) {
      const auto s = adam_scalars<acc_t<T>>(h);
      adam_variant(h, [&]<int WD, bool AMS>() { adam_typed<T, K, KO, WD, AMS>(es, s, h, stats); });
    });
  }
};

}  // namespace
}  // namespace znorm

TORCH_LIBRARY_IMPL(znorm_kernels_C, CPU, m) {
  m.impl("znorm_sgd_step_", &znorm::znorm_sgd_step<znorm::CpuSteps>);
  m.impl("znorm_adam_step_", &znorm::znorm_adam_step<znorm::CpuSteps>);
}
