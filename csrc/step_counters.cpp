// Adam's step counters (torch's: one-element float32 or float64 CPU tensors, one per parameter), read and
// advanced in one call each for the ZNorm optimizers' remembered step (znorm_kernels/backends/step_counters.py):
// from Python a float() per counter and torch._foreach_add_ on the CPU cost a dispatch per tensor.
//   znorm_kernels_C::step_counts(Tensor[] counters) -> float[]   their values
//   znorm_kernels_C::add_one_(Tensor(a!)[] counters) -> ()       each += 1, in its own dtype, as add_ would
// Every counter is checked before any is read or written: a wrong one raises and changes nothing.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <vector>

namespace znorm {
namespace {

void check_counters(at::TensorList counters, const char* op) {
  for (size_t i = 0; i < counters.size(); ++i) {
    const at::Tensor& c = counters[i];
    TORCH_CHECK(c.defined() && c.device().is_cpu() && c.numel() == 1 &&
                    (c.scalar_type() == at::kFloat || c.scalar_type() == at::kDouble) && !c.is_conj() &&
                    !c.is_neg() && c.layout() == at::kStrided,
                op, ": counter ", i, " must be a one-element float32 or float64 CPU tensor");
  }
}

std::vector<double> step_counts(at::TensorList counters) {
  check_counters(counters, "step_counts");
  std::vector<double> out;
  out.reserve(counters.size());
  for (const at::Tensor& c : counters)
    out.push_back(c.scalar_type() == at::kFloat ? static_cast<double>(*c.const_data_ptr<float>())
                                                : *c.const_data_ptr<double>());
  return out;
}

void add_one_(at::TensorList counters) {
  check_counters(counters, "add_one_");
  for (const at::Tensor& c : counters) {
    if (c.scalar_type() == at::kFloat)
      *c.mutable_data_ptr<float>() += 1.0f;
    else
      *c.mutable_data_ptr<double>() += 1.0;
    c.unsafeGetTensorImpl()->bump_version();  // an in-place write, as add_ records it
  }
}

}  // namespace
}  // namespace znorm

TORCH_LIBRARY_FRAGMENT(znorm_kernels_C, m) {
  m.def("step_counts(Tensor[] counters) -> float[]", &znorm::step_counts);
  m.def("add_one_(Tensor(a!)[] counters) -> ()", &znorm::add_one_);
}
