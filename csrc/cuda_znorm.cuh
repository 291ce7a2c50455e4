// What the fused optimizer steps (cuda_optim.cu) take from znorm_'s CUDA kernels (cuda_znorm.cu): stages 1 and 2,
// the very kernels of znorm_, so that their mean and multiplier (hence z) are bitwise what znorm_ computes.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda_table_cache.h"

namespace znorm {

// Launches stats_kernel<T> (one block per chunk of `table`) then finalize_kernel (one block per tensor) on
// `stream`, each followed by the launch check. `partials`: 5 * table.chunks doubles; `finals`: 3 *
// table.ntensors doubles, (mean, multiplier, wide) per tensor; `scale`: the GradScaler scale on the device, or
// nullptr; `stats`: the op's optional output, or nullptr; `flags`: the fused steps' per-tensor flags (tensors
// without kTreated get no statistics and the identity), or nullptr for znorm_. Instantiated in cuda_znorm.cu for
// float, c10::Half, c10::BFloat16 and double.
template <typename T>
void launch_stats_finalize(const Table& table, double* partials, double* finals, double eps, double correction,
                           const double* scale, double* stats, const int64_t* flags, cudaStream_t stream);

}  // namespace znorm
