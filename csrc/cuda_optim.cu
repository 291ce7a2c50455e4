// The CUDA kernels of the fused optimizer steps, znorm_sgd_step_ and znorm_adam_step_ (schemas in znorm.h; the
// ops' entry points, argument checks and per-call scalars, shared with the CPU kernels, in optim_args.h).
//
// Per dtype, three launches on the current stream: stats_kernel and finalize_kernel, the very kernels of
// znorm_ (cuda_znorm.cu, through launch_stats_finalize: so mean and multiplier, hence z, are bitwise what the
// "cuda" backend's znorm_ writes), over a cached table of every tensor of at least one element; tensors without
// statistics (untreated, one element) are flagged, their chunks skipped and their finals the identity (z = g).
// Then update_kernel, one block per chunk: z as normalize_kernel computes it, then torch.optim's update in A
// (float32; float64 for float64 tensors), operation by operation as the CPU kernels (cpu_optim_kernels.h):
// every operation correctly rounded on its own (__f*_rn / __d*_rn intrinsics: no FMA contraction whatever the
// compiler flags, division and square root correctly rounded), each stored value rounded once to T and read
// back from it.
//
// The table's extra section (cached with it: the same params, grads and states step after step hit the
// cache): p[n], s0[n], s1[n], s2[n], flags[n] (kTreated, kFirst, kAligned). Adam's per-tensor step_size and
// bias_correction2_sqrt: kernel arguments when every tensor of the call has the same (the common case), else
// a per-call float64 array uploaded by TableCache::upload (cuda_table_cache.h; graph-capturable, the values of
// the captured call).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda_common.cuh"
#include "cuda_table_cache.h"
#include "cuda_znorm.cuh"
#include "optim_args.h"
#include "tiles.h"
#include "znorm.h"

namespace znorm {
namespace {

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }

// x rounded to T, in A (the value a store of x into a T tensor reads back).
template <typename T, typename A>
__device__ __forceinline__ A round_to(A x) {
  return static_cast<A>(to_acc(static_cast<T>(x)));
}

// The kernel's argument: the per-call scalars in A (OptScalars, optim_args.h: rounded once to A on the host, as
// the CPU kernels take them; its step_size and bc2_sqrt are every tensor's when per_tensor is nullptr), then
// what only the kernel needs.
template <typename A>
struct OptArgs : OptScalars<A> {
  const double* per_tensor;  // nullptr, or [2 * ntensors]: (step_size, bias_correction2_sqrt) of tensor t
  bool write_grad;
};

// One element of torch.optim.SGD on z (cpu_optim_kernels.h, sgd_run).
template <typename T, typename A, bool WD, bool MOM>
__device__ __forceinline__ void sgd_elem(A z, T& p, T& b, bool first, const OptArgs<A>& a) {
  const A pv = to_acc(p);
  A d = mul_rn(z, a.sign);
  if (WD) d = add_rn(d, mul_rn(a.weight_decay, pv));
  if (MOM) {
    const A bv = first ? round_to<T, A>(d)
                       : round_to<T, A>(add_rn(mul_rn(static_cast<A>(to_acc(b)), a.momentum),
                                               mul_rn(a.one_minus_dampening, d)));
    b = static_cast<T>(bv);  // exact
    d = a.nesterov ? add_rn(d, mul_rn(a.momentum, bv)) : bv;
  }
  p = static_cast<T>(sub_rn(pv, mul_rn(a.lr, d)));
}

// One element of torch.optim.Adam (WD = 1) / AdamW (WD = 2) on z (cpu_optim_kernels.h, adam_run).
template <typename T, typename A, int WD, bool AMS>
__device__ __forceinline__ void adam_elem(A z, T& p, T& m, T& v, T& vmax, A step_size, A bc2,
                                          const OptArgs<A>& a) {
  A pv = to_acc(p);
  A d = mul_rn(z, a.sign);
  if (WD == 1) d = add_rn(d, mul_rn(a.weight_decay, pv));
  const A mv = to_acc(m);
  const A diff = sub_rn(d, mv);
  const T mt = static_cast<T>(a.small_weight ? add_rn(mv, mul_rn(a.weight, diff))
                                             : sub_rn(d, mul_rn(diff, a.one_minus_weight)));
  m = mt;
  const A vv = to_acc(v);
  A vx = round_to<T, A>(add_rn(mul_rn(vv, a.beta2), mul_rn(mul_rn(a.one_minus_beta2, d), d)));
  v = static_cast<T>(vx);  // exact
  if (AMS) {
    const A old = to_acc(vmax);
    A r = old > vx ? old : vx;
    r = old != old ? old : r;
    r = vx != vx ? vx : r;
    vx = r;
    vmax = static_cast<T>(vx);  // exact
  }
  const A root = sqrt_rn(vx);
  if (WD == 2) pv = mul_rn(pv, a.decay_factor);
  const A denom = add_rn(div_rn(root, bc2), a.eps);
  p = static_cast<T>(sub_rn(pv, div_rn(mul_rn(step_size, static_cast<A>(to_acc(mt))), denom)));
}

// KIND 0: SGD (X = momentum), 1: Adam (WD: 0 none, 1 L2, 2 decoupled; X = amsgrad). NS: states read/written.
template <typename T, int KIND, int WD, bool X>
__global__ void __launch_bounds__(kThreads)
    update_kernel(TableView table, int64_t extra, const double* __restrict__ finals, OptArgs<acc_t<T>> a) {
  using A = acc_t<T>;
  constexpr int NS = KIND == 0 ? (X ? 1 : 0) : (X ? 3 : 2);
  constexpr int V = kVec<T>;
  int64_t t;
  const ChunkRef<T> c = chunk_of<T>(table, blockIdx.x, t);
  const int64_t n = table.ntensors;
  const int64_t* ex = table.base + extra;
  const int64_t flags = ex[4 * n + t];
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) - table.first_chunk(t)) * kChunk;
  T* __restrict__ g = c.x;
  T* __restrict__ p = reinterpret_cast<T*>(ex[t]) + begin;
  T* s[3];
#pragma unroll
  for (int j = 0; j < 3; ++j) s[j] = j < NS ? reinterpret_cast<T*>(ex[(j + 1) * n + t]) + begin : nullptr;
  const bool aligned = (flags & kAligned) != 0;
  const bool first = (flags & kFirst) != 0;
  const bool store_g = a.write_grad && (flags & kTreated) != 0;  // z = g elsewhere: nothing to write
  const double mean = finals[3 * t], inv = finals[3 * t + 1], factor = finals[3 * t + 2];
  // As normalize_kernel: float tensors beyond float's range (their factor is 1), float64 tensors whose
  // statistics are scaled.
  constexpr bool f64 = std::is_same_v<A, double>;
  const bool wide = f64 ? factor != 0.0 && factor != 1.0 : factor != 0.0;
  const A hi = static_cast<A>(mean);
  const A lo = static_cast<A>(mean - static_cast<double>(hi));
  const A mult = static_cast<A>(inv);
  A step_size = a.step_size, bc2 = a.bc2_sqrt;
  if (KIND == 1 && a.per_tensor != nullptr) {
    step_size = static_cast<A>(a.per_tensor[2 * t]);
    bc2 = static_cast<A>(a.per_tensor[2 * t + 1]);
  }
  // z exactly as normalize_kernel writes it (rounded to T), in A.
  const auto zscore = [&](T x) -> T {
    if (wide && f64) return static_cast<T>(__dmul_rn(__dsub_rn(__dmul_rn(to_acc(x), factor), mean * factor), inv));
    if (wide) return static_cast<T>(static_cast<A>(__dmul_rn(__dsub_rn(static_cast<double>(to_acc(x)), mean), inv)));
    return static_cast<T>(mul_rn(sub_rn(sub_rn(to_acc(x), hi), lo), mult));
  };
  const auto elem = [&](T& gv, T& pv, T& s0, T& s1, T& s2) {
    const T zt = zscore(gv);
    if (store_g) gv = zt;
    const A z = to_acc(zt);
    if constexpr (KIND == 0) {
      sgd_elem<T, A, WD != 0, X>(z, pv, s0, first, a);  // (inlined: `a` is read from the parameter space)
    } else {
      adam_elem<T, A, WD, X>(z, pv, s0, s1, s2, step_size, bc2, a);
    }
  };
  // A new momentum buffer (first) is read like the others, as the CPU kernel does; its value is not used.
  for (int base = V * static_cast<int>(threadIdx.x); base < c.len; base += V * kThreads) {
    if (aligned && base + V <= c.len) {
      Pack<T> gp = *reinterpret_cast<const Pack<T>*>(g + base);
      Pack<T> pp = *reinterpret_cast<const Pack<T>*>(p + base);
      Pack<T> sp[3] = {};  // states beyond NS: unused registers
#pragma unroll
      for (int j = 0; j < NS; ++j) sp[j] = *reinterpret_cast<const Pack<T>*>(s[j] + base);
#pragma unroll
      for (int e = 0; e < V; ++e) elem(gp.v[e], pp.v[e], sp[0].v[e], sp[1].v[e], sp[2].v[e]);
      if (store_g) *reinterpret_cast<Pack<T>*>(g + base) = gp;
      *reinterpret_cast<Pack<T>*>(p + base) = pp;
#pragma unroll
      for (int j = 0; j < NS; ++j) *reinterpret_cast<Pack<T>*>(s[j] + base) = sp[j];
      continue;
    }
    // The rare unaligned or partial slot, element by element (the same operations).
#pragma unroll 1
    for (int i = base; i < base + V && i < c.len; ++i) {
      T gv = g[i], pv = p[i], sv[3] = {T(0), T(0), T(0)};
#pragma unroll
      for (int j = 0; j < NS; ++j) sv[j] = s[j][i];
      elem(gv, pv, sv[0], sv[1], sv[2]);
      if (store_g) g[i] = gv;
      p[i] = pv;
#pragma unroll
      for (int j = 0; j < NS; ++j) s[j][i] = sv[j];
    }
  }
}

// One entry of a fused step: a tensor of at least one element.
struct OptItem {
  const at::Tensor* grad;
  int64_t index;
  int64_t ptrs[4];  // param, states
  int64_t flags;
  double step_size, bc2;
};

template <typename T, int KIND, int WD, bool X>
void launch_optim(const std::vector<OptItem>& items, at::ScalarType dtype, double eps, double correction,
                  double* stats, OptArgs<acc_t<T>> args, c10::Device device) {
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  const auto n = static_cast<int64_t>(items.size());
  std::vector<Span> spans;
  spans.reserve(items.size());
  std::vector<int64_t> extra(5 * n);
  for (int64_t t = 0; t < n; ++t) {
    spans.emplace_back(*items[t].grad, items[t].index);  // dense (checked): used in place
    for (int j = 0; j < 4; ++j) extra[j * n + t] = items[t].ptrs[j];
    extra[4 * n + t] = items[t].flags;
  }
  const Table table = table_cache().get(spans, device, dtype, stream, capturing, std::move(extra));
  const at::Tensor partials = at::empty({5 * table.chunks}, at::TensorOptions().dtype(at::kDouble).device(device));
  const at::Tensor finals = at::empty({3 * table.ntensors}, at::TensorOptions().dtype(at::kDouble).device(device));
  const TableView view{table.data.data_ptr<int64_t>(), table.ntensors};
  const int64_t* flags = view.base + table.extra_offset + 4 * n;

  // Adam's per-tensor scalars: kernel arguments when uniform, else a per-call array.
  at::Tensor per_tensor;
  if (KIND == 1) {
    bool uniform = true;
    for (const OptItem& e : items) uniform = uniform && e.step_size == items[0].step_size && e.bc2 == items[0].bc2;
    using A = acc_t<T>;
    args.step_size = static_cast<A>(items[0].step_size);
    args.bc2_sqrt = static_cast<A>(items[0].bc2);
    if (!uniform) {
      std::vector<double> values(2 * n);
      for (int64_t t = 0; t < n; ++t) {
        values[2 * t] = items[t].step_size;
        values[2 * t + 1] = items[t].bc2;
      }
      per_tensor = table_cache().upload(values, device, stream, capturing);
      args.per_tensor = per_tensor.data_ptr<double>();
    }
  }

  launch_stats_finalize<T>(table, partials.data_ptr<double>(), finals.data_ptr<double>(), eps, correction, nullptr,
                           stats, flags, stream.stream());
  update_kernel<T, KIND, WD, X><<<static_cast<unsigned>(table.chunks), kThreads, 0, stream.stream()>>>(
      view, table.extra_offset, finals.data_ptr<double>(), args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// NaN rows of `stats` for empty tensors (the finalize kernel writes the rows of the others).
void nan_rows_of_empty(const std::optional<at::Tensor>& stats_out, double* stats, at::TensorList params) {
  if (stats == nullptr) return;
  bool any = false;
  for (const at::Tensor& p : params) any = any || p.numel() == 0;
  if (any) stats_out->fill_(std::numeric_limits<double>::quiet_NaN());
}

// A step once its own arguments are checked (optim_args.h): `stats` checked and the device guard set (cuda_call),
// the lists checked (step_entries: nothing is written before every check has passed), each entry completed by
// fill(entry) (its per-tensor arguments), NaN rows of `stats` for empty tensors, then
// launch.template operator()<T>(entries, dtype, stats, device) per dtype.
template <const char* Name, typename Fill, typename Launch>
void optim_step(const StepLists& l, const Fill& fill, const Launch& launch) {
  const CudaCall call = cuda_call(l.params, l.stats_out);
  if (!call.device) return;
  const c10::Device device = *call.device;
  const c10::cuda::CUDAGuard guard(device);
  const auto by_dtype = step_entries<OptItem>(l, device, [&](size_t i) {
    const at::Tensor& p = l.params[i];
    OptItem e{&l.grads[i], static_cast<int64_t>(i), {0, 0, 0, 0}, 0, 0.0, 1.0};
    e.ptrs[0] = reinterpret_cast<int64_t>(p.data_ptr());
    bool aligned = e.ptrs[0] % 16 == 0 && reinterpret_cast<int64_t>(l.grads[i].data_ptr()) % 16 == 0;
    for (size_t j = 0; j < l.states.size(); ++j) {
      e.ptrs[j + 1] = reinterpret_cast<int64_t>(l.states[j][i].data_ptr());
      aligned = aligned && e.ptrs[j + 1] % 16 == 0;
    }
    e.flags = (l.treated[i] != 0 && p.numel() >= 2 ? kTreated : 0) | (aligned ? kAligned : 0);
    fill(e);
    return e;
  });  // the last check
  nan_rows_of_empty(l.stats_out, call.stats, l.params);
  for_each_dtype<Name>(by_dtype, [&]<typename T>(int k) {
    launch.template operator()<T>(by_dtype[k], kDtypes[k], call.stats, device);
  });
}

constexpr char kSgdDispatch[] = "znorm_sgd_step_cuda";
constexpr char kAdamDispatch[] = "znorm_adam_step_cuda";

// The CUDA kernels of the ops (znorm_sgd_step, znorm_adam_step in optim_args.h): per dtype, OptArgs from the
// shared scalars and launch_optim of the variant they select.
struct CudaSteps {
  static void sgd(const StepLists& l, at::IntArrayRef first, const SgdHyper& h) {
    auto fill = [&](OptItem& e) { e.flags |= first[e.index] != 0 ? kFirst : 0; };
    optim_step<kSgdDispatch>(l, fill, [&]<typename T>(const std::vector<OptItem>& items, at::ScalarType dtype,
                                                      double* stats, c10::Device device) {
      const OptArgs<acc_t<T>> a{sgd_scalars<acc_t<T>>(h), nullptr, h.write_grad};
      sgd_variant(h, [&]<bool WD, bool MOM>() {
        launch_optim<T, 0, WD ? 1 : 0, MOM>(items, dtype, h.znorm_eps, h.correction, stats, a, device);
      });
    });
  }

  static void adam(const StepLists& l, c10::ArrayRef<double> step_size, c10::ArrayRef<double> bc2_sqrt,
                   const AdamHyper& h) {
    auto fill = [&](OptItem& e) {
      e.step_size = step_size[e.index];
      e.bc2 = bc2_sqrt[e.index];
    };
    optim_step<kAdamDispatch>(l, fill, [&]<typename T>(const std::vector<OptItem>& items, at::ScalarType dtype,
                                                       double* stats, c10::Device device) {
      const OptArgs<acc_t<T>> a{adam_scalars<acc_t<T>>(h), nullptr, h.write_grad};
      adam_variant(h, [&]<int WD, bool AMS>() {
        launch_optim<T, 1, WD, AMS>(items, dtype, h.znorm_eps, h.correction, stats, a, device);
      });
    });
  }
};

}  // namespace
}  // namespace znorm

TORCH_LIBRARY_IMPL(znorm_kernels_C, CUDA, m) {
  m.impl("znorm_sgd_step_", &znorm::znorm_sgd_step<znorm::CudaSteps>);
  m.impl("znorm_adam_step_", &znorm::znorm_adam_step<znorm::CudaSteps>);
}
