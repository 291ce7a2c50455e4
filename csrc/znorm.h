// Shared by the CPU and CUDA kernels of znorm_kernels._C: the ops' names and schemas, the accumulation type, the
// statistics merge (Chan et al.), the span logic that lets a kernel work on a tensor's storage whatever its
// layout, and the split of a list by dtype (kDtypes, for_each_dtype). The tile sizes are in tiles.h; what only the
// fused optimizer steps share, in optim_args.h.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/ATen_fwd.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <array>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

namespace znorm {

// A kernel's accumulation type for elements of type T: float64 for float64 tensors, else float32.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// One op for both devices; the namespace keeps it apart from any Python-side `znorm_kernels::` op.
// `stats`, when given, is a contiguous float64 [len(tensors), 2] tensor on the tensors' device: row i receives
// tensor i's mean and standard deviation as the normalization used them (of the values as given, so scaled
// ones under grad_scale; the std with `correction`, before eps; 0 for a constant tensor), computed on the way
// at no extra pass over the data. Rows of tensors left unchanged (fewer than 2 elements) receive NaN.
inline constexpr const char* kSchema =
    "znorm_(Tensor(a!)[] tensors, float eps, float correction, Tensor? grad_scale, Tensor(b!)? stats=None) -> ()";

// The fused optimizer steps (CPU kernels in cpu_optim.cpp, CUDA kernels in cuda_optim.cu): per tensor, the
// statistics exactly as znorm_ computes them on that device, then ONE pass over the gradient, the parameter
// and its states applying torch.optim's update to z = the value znorm_ would write into the gradient (z = g
// where `treated` is 0, and for tensors of fewer than 2 elements). Updates in float32 (float64 for float64
// tensors), each operation rounded on its own (no FMA), each stored value rounded once to the tensor's
// dtype, as the Triton optimizer kernels. `momentum_buffers` is empty when momentum is 0; where `first` is
// nonzero the buffer becomes d (its contents are not used). `max_exp_avg_sqs` is empty unless amsgrad.
// `step_size` (lr / (1 - beta1**step)) and `bias_correction2_sqrt` ((1 - beta2**step) ** 0.5) are per tensor.
// `grads` is written (z, in its dtype) only with write_grad. `stats` as for znorm_; NaN rows for untreated
// tensors.
inline constexpr const char* kSgdSchema =
    "znorm_sgd_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, int[] treated, "
    "int[] first, float znorm_eps, float correction, float lr, float momentum, float dampening, bool nesterov, "
    "float weight_decay, bool maximize, bool write_grad, Tensor(d!)? stats=None) -> ()";
inline constexpr const char* kAdamSchema =
    "znorm_adam_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
    "Tensor(e!)[] max_exp_avg_sqs, int[] treated, float[] step_size, float[] bias_correction2_sqrt, "
    "float znorm_eps, float correction, bool amsgrad, float beta1, float beta2, float lr, float weight_decay, "
    "float eps, bool maximize, bool decoupled, bool write_grad, Tensor(f!)? stats=None) -> ()";

// (count, mean, M2, min, max) of a run of values. Partials are merged in double whatever the tensor dtype, so
// that thousands of chunk partials of one huge tensor merge without the drift a float32 merge has.
struct Moments {
  double n = 0.0;
  double mean = 0.0;
  double m2 = 0.0;
  double lo = INFINITY;
  double hi = -INFINITY;
};

// float64 values near the top or the bottom of the range: a run (chunk, partial, tensor) whose largest finite
// magnitude is beyond kHuge could overflow a sum or a square, one whose largest magnitude is below kTiny loses
// its squares to underflow. Such a run has its sums taken on its values times range_factor (a power of two:
// exact) and its M2 kept so scaled wherever it is stored or merged; its mean, min and max are not scaled, so
// whether an M2 is scaled follows from the bounds beside it. Every other run's factor is 1, and its arithmetic
// is unchanged bit for bit. The same convention as the Triton kernels' (triton_moments.py) and the host's
// (float64_range.py).
inline constexpr double kHuge = 0x1p400, kTiny = 0x1p-400, kShrink = 0x1p-600, kGrow = 0x1p600;

C10_HOST_DEVICE inline double range_factor(double lo, double hi) {
  const double big = -lo > hi ? -lo : hi;
  if (big > kHuge && big < INFINITY) return kShrink;
  return big < kTiny && big > 0.0 ? kGrow : 1.0;
}

// The moments of a run from its two in-cache passes: sum, min and max, then s1 = sum(x - m) and q = sum((x - m)^2)
// around its rounded mean m. mean = m + s1/n recovers what rounding m cost, and M2 = q - s1^2/n (exact for
// s1 = 0); no element is used as a shift, so an outlier costs precision only in its own square. A constant
// run (min == max, an exact test) has exactly its value as mean and 0 as M2. The sums are of the values times
// `factor` (range_factor(lo, hi)): M2 stays so scaled, the mean is unscaled.
C10_HOST_DEVICE inline Moments run_moments(double n, double m, double s1, double q, double lo, double hi,
                                           double factor = 1.0) {
  Moments r{n, (m + s1 / n) / factor, q - s1 * (s1 / n), lo, hi};
  if (!(r.m2 > 0.0)) r.m2 = r.m2 != r.m2 ? r.m2 : 0.0;  // rounding may take M2 just below 0; NaN stays
  if (lo == hi && r.mean == r.mean) {
    r.mean = lo;
    r.m2 = 0.0;
  }
  return r;
}

// Whether a float run's statistics may use float arithmetic: every |x| <= 2^50 and a spread of 0 or at least
// 2^-50, so float sums and squares stay far from overflow, and squares in the subnormal range (|d| < 2^-63)
// hold a negligible share of M2 (at least spread^2 / 2 >= 2^-101). Else double.
C10_HOST_DEVICE inline bool float_safe(double lo, double hi) {
  const double spread = hi - lo;
  return (-lo <= 0x1p50 && hi <= 0x1p50) && (spread >= 0x1p-50 || spread == 0.0);
}

// Chan's parallel update: the moments of the concatenation a ++ b. Callers merge in a fixed order, which
// makes the result independent of which thread or block produced each partial. Each M2 is scaled by its own
// range_factor, the result's by the merged bounds' (all 1, and the arithmetic the plain one, in every run whose
// values are neither huge nor all tiny).
C10_HOST_DEVICE inline Moments merge(const Moments& a, const Moments& b) {
  if (a.n == 0.0) return b;
  if (b.n == 0.0) return a;
  Moments r;
  r.n = a.n + b.n;
  r.lo = b.lo < a.lo ? b.lo : a.lo;
  r.hi = b.hi > a.hi ? b.hi : a.hi;
  const double f = range_factor(r.lo, r.hi);
  const double fa = f / range_factor(a.lo, a.hi), fb = f / range_factor(b.lo, b.hi);
  const double delta = b.mean * f - a.mean * f;
  r.mean = (a.mean * f + delta * (b.n / r.n)) / f;
  r.m2 = a.m2 * fa * fa + b.m2 * fb * fb + delta * delta * (a.n * (b.n / r.n));
  return r;
}

// What the normalize pass needs of one tensor: z = (x - mean) * inv. inv = 1 / (std + eps), or
// s / (std + s * eps) under a GradScaler scale s (a fused optimizer divides by s afterwards); torch.var_mean's
// denominator max(0, n - correction). A constant tensor (min == max) gets its value as mean and inv = 0, so
// every result is exactly 0 (eps = 0 too); so does std + eps == 0. `wide`: the spread or the multiplier is
// beyond float's comfortable range, so a float tensor is normalized in double. `factor`: the range_factor its
// statistics are scaled by; a tensor whose factor is not 1 is wide too, its `inv` is stored as inv / factor
// (from the scaled statistics: inv itself could overflow or lose its bits), and the wide normalize computes
// (x * factor - mean * factor) * inv. `stdev`: the standard deviation the multiplier came from (0 for a
// constant tensor), for the op's optional `stats` output.
struct Final {
  double mean = 0.0;
  double inv = 0.0;
  double stdev = 0.0;
  bool wide = false;
  double factor = 1.0;
};

C10_HOST_DEVICE inline Final finalize(const Moments& m, double eps, double correction, const double* scale) {
  const bool constant = m.lo == m.hi && m.mean == m.mean;
  const double dof = m.n - correction > 0.0 ? m.n - correction : 0.0;
  const double factor = range_factor(m.lo, m.hi);
  const double stdev = ::sqrt(m.m2 / dof);  // times factor
  const double s = scale == nullptr ? 1.0 : *scale;
  const double denom = stdev + s * eps * factor;
  Final f;
  f.mean = constant ? m.lo : m.mean;
  f.inv = constant || denom == 0.0 ? 0.0 : s / denom;
  f.stdev = constant ? 0.0 : stdev / factor;
  f.factor = factor;
  f.wide = factor != 1.0 || m.hi - m.lo >= 0x1p100 || f.inv > 0x1p100 || (f.inv < 0x1p-100 && f.inv != 0.0);
  return f;
}

// Where a kernel reads and writes one tensor. A dense tensor (contiguous, channels_last, any permutation) is
// used in place: mean and std do not depend on element order, and with non-negative strides its first
// logical element sits at the lowest address, so `data` spans exactly numel elements starting with it.
// A non-dense view is gathered into `scratch` and written back by `finish()`.
struct Span {
  at::Tensor tensor;   // the caller's tensor
  at::Tensor scratch;  // contiguous copy for a non-dense view, else undefined
  void* data = nullptr;
  int64_t numel = 0;
  int64_t index = 0;  // its position in the op's list: its row of `stats`

  Span(const at::Tensor& t, int64_t i) : tensor(t), numel(t.numel()), index(i) {
    if (t.is_non_overlapping_and_dense()) {
      data = t.data_ptr();
    } else {
      scratch = t.contiguous();
      data = scratch.data_ptr();
    }
  }
  void finish() {
    if (scratch.defined()) tensor.copy_(scratch);
  }
};

// The dtypes the ops take; spans_by_dtype (and step_entries, optim_args.h) fill one slot per entry, in this order.
inline constexpr at::ScalarType kDtypes[4] = {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble};

// The slot of `dtype` in kDtypes; 4 for a dtype the ops do not take.
inline int dtype_slot(at::ScalarType dtype) {
  int k = 0;
  while (k < 4 && kDtypes[k] != dtype) ++k;
  return k;
}

// Runs f.template operator()<T>(k) for each slot k of `by_dtype` (one list per entry of kDtypes) that holds
// work, in slot order, T being the slot's element type. Name: AT_DISPATCH's name for it (a constant).
template <const char* Name, typename Lists, typename F>
void for_each_dtype(const Lists& by_dtype, const F& f) {
  for (int k = 0; k < 4; ++k) {
    if (by_dtype[k].empty()) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, kDtypes[k], Name,
                                    [&] { f.template operator()<scalar_t>(k); });
  }
}

// The op's tensors as spans split by dtype, after checking that each is a strided tensor on `device` of a
// supported dtype; tensors of fewer than 2 elements are left out (contract rule 2). The Python dispatcher passes
// one device and dtype per call, but the op accepts any mix of dtypes.
inline std::array<std::vector<Span>, 4> spans_by_dtype(at::TensorList tensors, const c10::Device& device) {
  std::array<std::vector<Span>, 4> by_dtype;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device() == device, "znorm_: tensor ", i, " is on ", t.device(), ", expected ", device);
    TORCH_CHECK(t.layout() == at::kStrided, "znorm_: tensor ", i, " is not a dense (strided) tensor");
    if (t.numel() < 2) continue;
    const int k = dtype_slot(t.scalar_type());
    TORCH_CHECK(k < 4, "znorm_: tensor ", i, " has dtype ", t.scalar_type(),
                "; supported: float32, float16, bfloat16, float64");
    by_dtype[k].emplace_back(t, static_cast<int64_t>(i));
  }
  return by_dtype;
}

// Checks the op's optional `stats` output (see kSchema) before anything is written, and returns its data
// (nullptr without it). `skipped`: whether some tensor of the list has fewer than 2 elements (its row gets NaN).
inline double* check_stats(const std::optional<at::Tensor>& stats, at::TensorList tensors, const c10::Device& device,
                           bool& skipped) {
  skipped = false;
  if (!stats.has_value() || !stats->defined()) return nullptr;
  const at::Tensor& s = *stats;
  const auto n = static_cast<int64_t>(tensors.size());
  TORCH_CHECK(s.scalar_type() == at::kDouble, "znorm_: stats must be a float64 tensor, got ", s.scalar_type());
  TORCH_CHECK(s.layout() == at::kStrided, "znorm_: stats must be a dense (strided) tensor");
  TORCH_CHECK(s.dim() == 2 && s.size(0) == n && s.size(1) == 2, "znorm_: stats must have shape [", n,
              ", 2] (one row of mean and std per tensor), got ", s.sizes());
  TORCH_CHECK(s.device() == device, "znorm_: stats is on ", s.device(), ", expected the tensors' device ", device);
  TORCH_CHECK(s.is_contiguous(), "znorm_: stats must be contiguous");
  for (const at::Tensor& t : tensors) skipped = skipped || t.numel() < 2;
  return s.data_ptr<double>();
}

}  // namespace znorm
