// The arguments of the fused optimizer steps (schemas in znorm.h), as both devices' kernels take them: the ops'
// entry points (znorm_sgd_step, znorm_adam_step: one per op, instantiated for each device's Steps), the checks
// of their lists and the split of their tensors by dtype, the per-call scalars in the accumulation type, and the
// kernel variant (template arguments) that the scalars select. Host code, shared by the CPU kernels
// (cpu_optim.cpp, whose loops in cpu_optim_kernels.h read OptScalars) and the CUDA kernels (cuda_optim.cu, whose
// kernel argument OptArgs extends OptScalars).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "znorm.h"

namespace znorm {

inline constexpr const char* kSgdOp = "znorm_sgd_step_";
inline constexpr const char* kAdamOp = "znorm_adam_step_";

// A step's arguments besides its lists and per-tensor values, as its schema passes them.
struct SgdHyper {
  double znorm_eps, correction, lr, momentum, dampening;
  bool nesterov;
  double weight_decay;
  bool maximize, write_grad;
};
struct AdamHyper {
  double znorm_eps, correction;
  bool amsgrad;
  double beta1, beta2, lr, weight_decay, eps;
  bool maximize, decoupled, write_grad;
};

// The per-call scalars in A (Python floats rounded once to A on the host, as torch's kernels take their double
// scalars). One layout for both steps: the CUDA kernel argument (OptArgs, cuda_optim.cu) starts with it, and a
// step leaves the other step's fields 0.
template <typename A>
struct OptScalars {
  // SGD
  A lr, momentum, one_minus_dampening, weight_decay;
  A sign;  // -1 with maximize, else 1 (z * -1 is exactly -z)
  bool nesterov;
  // Adam (weight_decay, L2, and sign above too)
  A weight;            // 1 - beta1, the lerp weight
  A one_minus_weight;  // 1 - weight, in A
  A beta2, one_minus_beta2;
  A decay_factor;  // 1 - lr * weight_decay (decoupled)
  A eps;
  bool small_weight;  // |1 - beta1| < 0.5 (in double): torch.lerp's first formula
  A step_size;        // per tensor: lr / (1 - beta1**step)
  A bc2_sqrt;         // per tensor: (1 - beta2**step) ** 0.5
};

template <typename A>
OptScalars<A> sgd_scalars(const SgdHyper& h) {
  OptScalars<A> s{};
  s.lr = static_cast<A>(h.lr);
  s.momentum = static_cast<A>(h.momentum);
  s.one_minus_dampening = static_cast<A>(1.0 - h.dampening);
  s.weight_decay = static_cast<A>(h.weight_decay);
  s.sign = h.maximize ? A(-1) : A(1);
  s.nesterov = h.nesterov;
  return s;
}

// step_size and bc2_sqrt are per tensor: left 0 here.
template <typename A>
OptScalars<A> adam_scalars(const AdamHyper& h) {
  OptScalars<A> s{};
  const double weight = 1.0 - h.beta1;
  s.weight = static_cast<A>(weight);
  s.one_minus_weight = A(1) - s.weight;  // in A
  s.small_weight = std::abs(weight) < 0.5;
  s.beta2 = static_cast<A>(h.beta2);
  s.one_minus_beta2 = static_cast<A>(1.0 - h.beta2);
  s.weight_decay = static_cast<A>(h.weight_decay);
  s.decay_factor = static_cast<A>(1.0 - h.lr * h.weight_decay);
  s.eps = static_cast<A>(h.eps);
  s.sign = h.maximize ? A(-1) : A(1);
  return s;
}

// SGD's kernel variant: f.template operator()<WD, MOM>() with WD = (weight_decay != 0), MOM = (momentum != 0).
template <typename F>
void sgd_variant(const SgdHyper& h, const F& f) {
  const bool wd = h.weight_decay != 0.0, mom = h.momentum != 0.0;
  if (wd && mom) return f.template operator()<true, true>();
  if (wd) return f.template operator()<true, false>();
  if (mom) return f.template operator()<false, true>();
  f.template operator()<false, false>();
}

// Adam's kernel variant: f.template operator()<WD, AMS>() with WD 0 (no weight decay), 1 (L2: Adam) or
// 2 (decoupled: AdamW), AMS = amsgrad.
template <typename F>
void adam_variant(const AdamHyper& h, const F& f) {
  const int wd = h.weight_decay == 0.0 ? 0 : h.decoupled ? 2 : 1;
  if (h.amsgrad) {
    if (wd == 0) return f.template operator()<0, true>();
    if (wd == 1) return f.template operator()<1, true>();
    return f.template operator()<2, true>();
  }
  if (wd == 0) return f.template operator()<0, false>();
  if (wd == 1) return f.template operator()<1, false>();
  f.template operator()<2, false>();
}

// A step's lists and its `stats` output, as the op received them.
struct StepLists {
  const char* op;  // the op's name (kSgdOp, kAdamOp), for the messages
  at::TensorList params, grads;
  std::vector<at::TensorList> states;  // the state lists in use
  at::IntArrayRef treated;
  const std::optional<at::Tensor>& stats_out;
};

// Checks the lists of one step (nothing is written before every check has passed) and splits the params of at
// least one element by dtype (one list per entry of kDtypes); make(i) builds param i's entry. `device`: the CPU
// (any CPU tensor), or the call's CUDA device.
template <typename Entry, typename Make>
std::array<std::vector<Entry>, 4> step_entries(const StepLists& l, const c10::Device& device, const Make& make) {
  const char* op = l.op;
  const size_t n = l.params.size();
  TORCH_CHECK(l.grads.size() == n, op, ": ", l.grads.size(), " grads for ", n, " params");
  TORCH_CHECK(l.treated.size() == n, op, ": ", l.treated.size(), " treated flags for ", n, " params");
  for (const at::TensorList& s : l.states) {
    TORCH_CHECK(s.size() == n, op, ": a state list has ", s.size(), " tensors for ", n, " params");
  }
  const bool cpu = device.is_cpu();
  const std::string where = cpu ? std::string("the CPU") : device.str();  // as the messages name it
  std::array<std::vector<Entry>, 4> by_dtype;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = l.params[i];
    TORCH_CHECK(cpu ? p.device().is_cpu() : p.device() == device, op, ": params[", i, "] is on ", p.device(),
                ", expected ", where);
    TORCH_CHECK(p.layout() == at::kStrided, op, ": params[", i, "] is not a dense (strided) tensor");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), op, ": params[", i, "] is not dense (a view with gaps or overlaps)");
    const int k = dtype_slot(p.scalar_type());
    TORCH_CHECK(k < 4, op, ": params[", i, "] has dtype ", p.scalar_type(),
                "; supported: float32, float16, bfloat16, float64");
    auto same = [&](const at::Tensor& t, const char* what) {
      TORCH_CHECK(t.defined() && t.device() == p.device() && t.layout() == at::kStrided &&
                      t.scalar_type() == p.scalar_type(),
                  op, ": ", what, "[", i, "] must be a strided ", p.scalar_type(), " tensor on ", where,
                  " like its param");
      TORCH_CHECK(t.sizes() == p.sizes() && t.strides() == p.strides(), op, ": ", what, "[", i, "] has shape ",
                  t.sizes(), " and strides ", t.strides(), ", its param ", p.sizes(), " and ", p.strides());
    };
    same(l.grads[i], "grads");
    for (const at::TensorList& s : l.states) same(s[i], "states");
    if (p.numel() == 0) continue;
    by_dtype[k].push_back(make(i));
  }
  return by_dtype;
}

// The op znorm_sgd_step_ on one device: SGD's own arguments checked, then Steps::sgd (CpuSteps in cpu_optim.cpp,
// CudaSteps in cuda_optim.cu) with its lists (the momentum buffers its one state list, with momentum), its
// per-tensor `first` flags and the rest.
template <typename Steps>
void znorm_sgd_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    at::IntArrayRef treated, at::IntArrayRef first, double znorm_eps, double correction, double lr,
                    double momentum, double dampening, bool nesterov, double weight_decay, bool maximize,
                    bool write_grad, const std::optional<at::Tensor>& stats_out) {
  const char* op = kSgdOp;
  const bool mom = momentum != 0.0;
  TORCH_CHECK(mom || momentum_buffers.empty(), op, ": momentum_buffers must be empty without momentum");
  TORCH_CHECK(first.size() == params.size(), op, ": ", first.size(), " first flags for ", params.size(), " params");
  StepLists l{op, params, grads, {}, treated, stats_out};
  if (mom) l.states.push_back(momentum_buffers);
  Steps::sgd(l, first,
             SgdHyper{znorm_eps, correction, lr, momentum, dampening, nesterov, weight_decay, maximize, write_grad});
}

// The op znorm_adam_step_ on one device: Adam's own arguments checked, then Steps::adam with its lists (states
// exp_avgs, exp_avg_sqs, and max_exp_avg_sqs with amsgrad), its per-tensor step sizes and the rest.
template <typename Steps>
void znorm_adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::IntArrayRef treated,
                     c10::ArrayRef<double> step_size, c10::ArrayRef<double> bias_correction2_sqrt, double znorm_eps,
                     double correction, bool amsgrad, double beta1, double beta2, double lr, double weight_decay,
                     double eps, bool maximize, bool decoupled, bool write_grad,
                     const std::optional<at::Tensor>& stats_out) {
  const char* op = kAdamOp;
  TORCH_CHECK(amsgrad || max_exp_avg_sqs.empty(), op, ": max_exp_avg_sqs must be empty without amsgrad");
  TORCH_CHECK(step_size.size() == params.size() && bias_correction2_sqrt.size() == params.size(), op,
              ": step_size and bias_correction2_sqrt need one entry per param");
  StepLists l{op, params, grads, {exp_avgs, exp_avg_sqs}, treated, stats_out};
  if (amsgrad) l.states.push_back(max_exp_avg_sqs);
  Steps::adam(l, step_size, bias_correction2_sqrt,
              AdamHyper{znorm_eps, correction, amsgrad, beta1, beta2, lr, weight_decay, eps, maximize, decoupled,
                        write_grad});
}

}  // namespace znorm
