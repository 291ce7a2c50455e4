// The CPU kernel of znorm_kernels_C::znorm_: ZNorm of a whole list of tensors in one call. The work items, their
// phases (run_plan), the threads and the statistics of a run are shared with the fused optimizer steps
// (cpu_common.h); the sizes are in tiles.h (cpu_tiles).
//
// Work is cut into items of at most kChunk elements, so one huge tensor and thousands of small ones both
// spread over the threads:
//   - a "batch" item is a run of consecutive small tensors (each <= kChunk elements, kChunk in all): each is
//     normalized completely while it is in cache (read from memory once, written once);
//   - a "chunk" item is kChunk elements of a large tensor: phase 1 writes its (count, mean, M2) partial to
//     its own slot, phase 2 merges each tensor's partials in chunk order (serially, in double), phase 3
//     normalizes the chunk.
// Each thread owns a run of consecutive items of about equal elements, the same in phases 1 and 3 and from
// call to call, so a chunk is normalized on the core whose caches it was read into; a thread that finishes
// its own takes items from the back of the others' (a shared, noisy machine slows one thread at a time).
// Lists of fewer than kSerialBelow elements run on the calling thread alone. An item's arithmetic does not
// depend on which thread runs it, nor do the merges (fixed order): the result is bitwise the same for any
// thread count.
//
// Statistics: two passes per run while it is in cache: sum, min and max in float32 (float64 for float64),
// then sum(x - m) and sum((x - m)^2) around the run's rounded mean m (run_moments in znorm.h: no element is
// used as a shift), in float over blocks of a few values per lane and in double across blocks (float64 runs:
// in double). Runs whose values are too large or too tightly spread for float squares take double. Partials
// merge in double; a tensor whose min equals its max is constant and becomes exactly 0.
//
// The optional `stats` output (row = the tensor's position in the list: mean, std) is written where each
// tensor's statistics are finalized (its batch item, or the serial merge of phase 2): no extra pass.
#include <ATen/core/Tensor.h>
#include <ATen/record_function.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>
#include <vector>

#include "cpu_common.h"
#include "znorm.h"

namespace znorm {
namespace {

constexpr char kDispatch[] = "znorm_cpu";

// The whole op for one dtype; K is the kernel namespace (baseline or AVX2), chosen once per call.
template <typename T, typename K>
void znorm_typed(std::vector<Span>& spans, double eps, double correction, const double* scale, double* stats) {
  using A = acc_t<T>;
  std::vector<int64_t> numels;
  numels.reserve(spans.size());
  for (const Span& s : spans) numels.push_back(s.numel);

  auto ptr = [&](int64_t t) { return static_cast<T*>(spans[t].data); };
  auto normalize = [](T* p, int64_t n, const Final& f) {
    const ZConst<A> c = zconst<A>(f);
    if (c.wide) return K::normalize_run_wide(p, n, c.mean, c.inv, c.factor);
    K::normalize_run(p, n, c.hi, c.lo, c.mult);
  };
  // Tensor t's statistics: its row of the stats output (each tensor's own row, so items on different threads
  // never share one), and what normalize needs.
  auto final_of = [&](int64_t t, const Moments& m) {
    const Final f = finalize(m, eps, correction, scale);
    record_row(stats, spans[t].index, f);
    return f;
  };
  run_plan(
      make_plan(numels, 2),
      // Phase 1: chunk partials into their slots; batches done completely.
      [&](int64_t t, int64_t begin, int64_t len) { return run_stats<T, K>(ptr(t) + begin, len); },
      [&](int64_t t) {
        const int64_t n = spans[t].numel;
        if (n < 2) return;
        normalize(ptr(t), n, final_of(t, run_stats<T, K>(ptr(t), n)));
      },
      // Phase 2: per large tensor, its partials merged in chunk order; phase 3: normalize the chunks.
      final_of, [&](int64_t t, int64_t begin, int64_t len, const Final& f) { normalize(ptr(t) + begin, len, f); });
}

// The value of the op's optional grad_scale (one element, any device and dtype), or none.
std::optional<double> scale_of(const std::optional<at::Tensor>& grad_scale) {
  if (!grad_scale.has_value() || !grad_scale->defined()) return std::nullopt;
  TORCH_CHECK(grad_scale->numel() == 1, "znorm_: grad_scale must hold one value, got ", grad_scale->numel());
  return grad_scale->to(at::kCPU, at::kDouble).item<double>();  // a CPU tensor: no device sync
}

// The op's work on checked spans, one dtype after the other; non-dense views' copies written back.
void run_spans(std::array<std::vector<Span>, 4>& by_dtype, double eps, double correction,
               const std::optional<double>& scale_value, double* stats) {
  const double* scale = scale_value ? &*scale_value : nullptr;
  for_each_dtype<kDispatch>(by_dtype, [&]<typename T>(int k) {
    with_isa([&]<typename K, typename>() { znorm_typed<T, K>(by_dtype[k], eps, correction, scale, stats); });
    for (Span& s : by_dtype[k]) s.finish();
  });
}

void znorm_cpu(at::TensorList tensors, double eps, double correction, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& stats_out) {
  const std::optional<double> scale = scale_of(grad_scale);
  const c10::Device cpu(c10::kCPU);
  bool skipped = false;
  double* stats = check_stats(stats_out, tensors, cpu, skipped);
  auto by_dtype = spans_by_dtype(tensors, cpu);  // the last check: nothing is written before it passes
  if (skipped) nan_rows(stats, tensors.size(), [&](size_t i) { return tensors[i].numel() < 2; });
  run_spans(by_dtype, eps, correction, scale, stats);
}

// The op bound to one list of dense CPU tensors (torch.classes.znorm_kernels_C.CpuList): its spans are made
// once, holding addresses and sizes, not the tensors; run() normalizes whatever lies there now, as the op
// would normalize the list. For callers that know the list is still at those addresses with those layouts
// (backends/native.py's bind): a call passes no tensor, so nothing is boxed or checked per tensor.
class CpuList : public torch::CustomClassHolder {
 public:
  explicit CpuList(std::vector<at::Tensor> tensors) {
    const c10::Device cpu(c10::kCPU);
    for (size_t i = 0; i < tensors.size(); ++i) {
      const at::Tensor& t = tensors[i];
      TORCH_CHECK(t.layout() != at::kStrided || t.is_non_overlapping_and_dense(), "CpuList: tensor ", i,
                  " is not dense");
      // What torch's dispatcher would stop before the op's kernel (immutable zero tensors, lazily negated or
      // conjugated views, Python subclasses) is not bound: those lists keep the op.
      TORCH_CHECK(!t._is_zerotensor() && !t.is_neg() && !t.is_conj() &&
                      !t.key_set().has(c10::DispatchKey::Python),
                  "CpuList: tensor ", i, " is not a plain CPU tensor");
      TORCH_CHECK(t.numel() < 2 || t.const_data_ptr() != nullptr, "CpuList: tensor ", i, " has no data");
    }
    by_dtype_ = spans_by_dtype(tensors, cpu);
    for (auto& spans : by_dtype_)
      for (Span& s : spans) s.tensor.reset();  // addresses only: the list's tensors are not kept alive
  }

  void run(double eps, double correction, const std::optional<at::Tensor>& grad_scale) {
    RECORD_FUNCTION("znorm_kernels_C::CpuList.run", std::vector<c10::IValue>());  // seen by torch.profiler
    run_spans(by_dtype_, eps, correction, scale_of(grad_scale), nullptr);
  }

 private:
  std::array<std::vector<Span>, 4> by_dtype_;
};

}  // namespace
}  // namespace znorm

TORCH_LIBRARY_IMPL(znorm_kernels_C, CPU, m) {
  m.impl("znorm_", &znorm::znorm_cpu);
}

TORCH_LIBRARY_FRAGMENT(znorm_kernels_C, m) {
  m.class_<znorm::CpuList>("CpuList")
      .def(torch::init<std::vector<at::Tensor>>())
      .def("run", &znorm::CpuList::run);
}
