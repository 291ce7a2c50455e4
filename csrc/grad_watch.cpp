// The hook's steady step in one native call (torch.classes.znorm_kernels_C.GradWatch; Python side in
// znorm_kernels/grad_watch.py). A GradWatch holds the parameters a hook treats and a record of their gradients
// as the hook's last full check saw them: which are present and, per present gradient, its dtype, device,
// dispatch keys, requires_grad, sizes, strides and address. step() reads every gradient through autograd's
// accessor and compares it with the record, in one loop, without a Python object per tensor:
//   - nothing changed: it runs znorm_kernels_C::znorm_ (unboxed, through the dispatcher) on each group the
//     record names, and returns kSame; the caller launches its other groups (Triton) on what it bound;
//   - the same layouts at other addresses, still pairwise disjoint on each device (rule 11): it records the
//     new addresses; where the op runs every group (`alone`) it runs them and returns kSame, else it returns
//     kMoved, running nothing (the caller binds its groups again, reading the gradients with take() or only
//     their addresses from addresses(), a buffer the watch keeps up to date);
//   - anything else: kChanged, nothing run; the caller takes its full path, which decides and raises.
// The watch never holds a gradient (that would keep its memory alive across zero_grad(set_to_none=True)).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace znorm {
namespace {

enum Status : int64_t { kSame = 0, kMoved = 1, kChanged = 2 };

// What a present gradient looked like at the last record.
struct Expected {
  int64_t param;  // its parameter's position
  c10::ScalarType dtype;
  c10::Device device;
  c10::DispatchKeySet keys;
  bool requires_grad;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
  uintptr_t address;
  uintptr_t span;  // bytes from its first byte to its last, for the disjointness of moved gradients
};

uintptr_t span_of(const at::Tensor& g) {
  if (g.numel() < 2) return 0;
  int64_t extent = 1;
  for (int64_t d = 0; d < g.dim(); ++d) extent += (g.size(d) - 1) * g.stride(d);
  return static_cast<uintptr_t>(extent) * g.element_size();
}

uintptr_t address_of(const at::Tensor& g) {
  // mutable_data, as Python's data_ptr(): a copy-on-write storage is materialized before it is written.
  return reinterpret_cast<uintptr_t>(g.unsafeGetTensorImpl()->mutable_data());  // throws without storage
}

bool same_layout(const at::Tensor& g, const Expected& e) {
  return g.scalar_type() == e.dtype && g.device() == e.device && g.key_set() == e.keys &&
         g.requires_grad() == e.requires_grad && g.sizes().equals(e.sizes) && g.strides().equals(e.strides);
}

// Whether the ranges [start, start + span) of these positions share no byte: sorted by start, each range ends
// at or before the next one starts (ranges of tensors with fewer than 2 elements are not compared). `order`
// holds the positions with a range in the order of their starts at the last check that sorted them: where
// the ranges still come in that order, one pass proves them disjoint (gradients that move keep their order
// more often than not); else they are sorted again, and `order` with them.
bool disjoint(const std::vector<int64_t>& positions, const std::vector<Expected>& record,
              std::vector<int64_t>& order) {
  bool in_order = !order.empty() || positions.empty();
  for (size_t i = 1; in_order && i < order.size(); ++i) {
    const Expected& a = record[order[i - 1]];
    in_order = a.address + a.span <= record[order[i]].address;
  }
  if (in_order) return true;
  order.clear();
  for (int64_t k : positions)
    if (record[k].span) order.push_back(k);
  std::sort(order.begin(), order.end(),
            [&](int64_t a, int64_t b) { return record[a].address < record[b].address; });
  for (size_t i = 1; i < order.size(); ++i) {
    const Expected& a = record[order[i - 1]];
    if (a.address + a.span > record[order[i]].address) {
      order.clear();  // (not a valid order: the next check sorts again)
      return false;
    }
  }
  return true;
}

using ZnormOp = void(at::TensorList, double, double, const std::optional<at::Tensor>&,
                     const std::optional<at::Tensor>&);

class GradWatch : public torch::CustomClassHolder {
 public:
  // The parameters are held (any reference to them, strong or weak, stops torch.utils.swap_tensors from
  // swapping them: grad_watch.py makes no watch where torch swaps parameters).
  explicit GradWatch(std::vector<at::Tensor> params) : params_(std::move(params)) {}

  // Records the gradients as they are now. `groups`: per group the op runs at kSame, positions among the
  // present gradients (in order); `by_device`: per device, positions among the present gradients whose ranges
  // must stay disjoint when they move; `moves`: whether moved gradients may keep the record (false where the
  // last check dropped a duplicate: a move then takes the full path); `alone`: whether `groups` are all the
  // caller's groups (a move then needs nothing of the caller). False (nothing recorded) where a gradient has
  // no address, or one the op runs is a lazily negated view.
  bool record(std::vector<std::vector<int64_t>> groups, std::vector<std::vector<int64_t>> by_device, bool moves,
              bool alone) {
    record_.clear();
    std::vector<Expected> record;
    try {
      for (int64_t i = 0; i < static_cast<int64_t>(params_.size()); ++i) {
        const at::Tensor& g = grad_of(i);
        if (!g.defined()) continue;
        record.push_back(Expected{i, g.scalar_type(), g.device(), g.key_set(), g.requires_grad(), g.sizes().vec(),
                                  g.strides().vec(), address_of(g), span_of(g)});
      }
    } catch (...) {
      return false;
    }
    const int64_t present = static_cast<int64_t>(record.size());
    for (const auto* lists : {&groups, &by_device})
      for (const auto& positions : *lists)
        for (int64_t k : positions)
          TORCH_CHECK(k >= 0 && k < present, "GradWatch.record: position ", k, " of ", present, " gradients");
    // The op refuses lazily negated views in its mutable list (torch's fallback): the Python path copes.
    for (const auto& positions : groups)
      for (int64_t k : positions)
        if (record[k].keys.has(c10::DispatchKey::Negative)) return false;
    record_ = std::move(record);
    groups_ = std::move(groups);
    by_device_ = std::move(by_device);
    orders_.assign(by_device_.size(), {});
    moves_ = moves;
    alone_ = alone;
    addresses_ = at::empty({present}, at::kLong);
    write_addresses();
    return true;
  }

  // Compares the gradients with the record and, where nothing changed, normalizes the recorded groups (see
  // the file's comment). `scale`: the still-scaled gradients' GradScaler scale, or None.
  int64_t step(double eps, double correction, std::optional<at::Tensor> scale) {
    moved_ = false;
    if (record_.empty()) return kChanged;
    bool moved = false;
    std::vector<uintptr_t> addresses;
    try {
      size_t k = 0;
      for (int64_t i = 0; i < static_cast<int64_t>(params_.size()); ++i) {
        const at::Tensor& g = grad_of(i);
        const bool expected = k < record_.size() && record_[k].param == i;
        if (g.defined() != expected || (expected && !same_layout(g, record_[k]))) return changed();
        if (!expected) continue;
        const uintptr_t address = address_of(g);
        if (address != record_[k].address && !moved) {
          moved = true;
          addresses.reserve(record_.size());
          for (size_t j = 0; j < k; ++j) addresses.push_back(record_[j].address);
        }
        if (moved) addresses.push_back(address);
        ++k;
      }
      if (k != record_.size()) return changed();
    } catch (...) {
      return changed();
    }
    if (moved) {
      const int64_t status = move_to(addresses);
      moved_ = status == kMoved && !alone_;
      if (status != kMoved || !alone_) return status;
    }
    run(eps, correction, scale);
    return kSame;
  }

  // After a kMoved step (the caller's next call), the present gradients in order, read again from their
  // parameters (the watch holds none: holding them would cost two atomic reference counts per gradient and
  // step); once.
  std::vector<at::Tensor> take() {
    std::vector<at::Tensor> out;
    if (!std::exchange(moved_, false)) return out;
    out.reserve(record_.size());
    for (const auto& e : record_) out.push_back(grad_of(e.param));
    return out;
  }

  // The present gradients' addresses as the record holds them (int64, CPU), in order: one tensor for the
  // watch's life, rewritten by every step that finds the gradients moved (for a caller that needs only where
  // they went, read after a kMoved step; a view of it costs nothing to keep). Empty before a record.
  at::Tensor addresses() { return addresses_.defined() ? addresses_ : at::empty({0}, at::kLong); }

 private:
  const at::Tensor& grad_of(int64_t i) const { return params_[i].unsafeGetTensorImpl()->grad(); }

  int64_t changed() { return kChanged; }

  int64_t move_to(const std::vector<uintptr_t>& addresses) {
    if (!moves_) return changed();
    std::vector<uintptr_t>& before = before_;
    before.resize(record_.size());
    for (size_t k = 0; k < record_.size(); ++k) before[k] = std::exchange(record_[k].address, addresses[k]);
    for (size_t g = 0; g < by_device_.size(); ++g) {
      if (!disjoint(by_device_[g], record_, orders_[g])) {
        for (size_t k = 0; k < record_.size(); ++k) record_[k].address = before[k];
        return changed();
      }
    }
    write_addresses();
    return kMoved;
  }

  void write_addresses() {
    int64_t* data = addresses_.data_ptr<int64_t>();
    for (size_t k = 0; k < record_.size(); ++k) data[k] = static_cast<int64_t>(record_[k].address);
  }

  void run(double eps, double correction, const std::optional<at::Tensor>& scale) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("znorm_kernels_C::znorm_", "").typed<ZnormOp>();
    const at::NoGradGuard no_grad;  // leaves that require grad are normalized in place, as by the Python path
    const std::optional<at::Tensor> none;
    std::vector<at::Tensor> tensors;
    for (const auto& positions : groups_) {
      if (positions.empty()) continue;
      tensors.clear();
      for (int64_t k : positions) tensors.push_back(grad_of(record_[k].param));
      std::optional<at::Tensor> group_scale;
      if (scale.has_value() && scale->defined()) {
        // As transfer.to_device: a non-blocking copy to the host returns before its value is there, and the
        // CPU op would read the buffer's old bytes; to a GPU it stays in stream order without a sync.
        const c10::Device device = tensors[0].device();
        group_scale = scale->to(device, /*non_blocking=*/!device.is_cpu());
      }
      op.call(tensors, eps, correction, group_scale, none);
    }
  }

  std::vector<at::Tensor> params_;
  std::vector<Expected> record_;
  std::vector<std::vector<int64_t>> groups_;
  std::vector<std::vector<int64_t>> by_device_;
  std::vector<std::vector<int64_t>> orders_;  // per device: positions by address at the last sort (disjoint)
  at::Tensor addresses_;                       // addresses(): the record's, kept up to date
  std::vector<uintptr_t> before_;  // a move's scratch, kept to save an allocation per move
  bool moves_ = false;
  bool alone_ = false;
  bool moved_ = false;  // the last step answered kMoved: take() may read the gradients
};

}  // namespace
}  // namespace znorm

TORCH_LIBRARY_FRAGMENT(znorm_kernels_C, m) {
  m.class_<znorm::GradWatch>("GradWatch")
      .def(torch::init<std::vector<at::Tensor>>())
      .def("record", &znorm::GradWatch::record)
      .def("step", &znorm::GradWatch::step)
      .def("take", &znorm::GradWatch::take)
      .def("addresses", &znorm::GradWatch::addresses);
}
