// Every tile, chunk and thread-count constant of the native kernels, in one place. Most of them fix an order
// of operations as well as a size (which elements share a partial sum, where a tensor's partials split), so
// changing one changes the results' bits; the native tests repeat the chunk sizes for their boundary cases.
// Each kernel file takes them by name (using-declarations in cpu_common.h and cuda_common.cuh).
#pragma once

#include <cstdint>

namespace znorm {

// The CPU kernels (cpu_znorm.cpp, cpu_optim.cpp, cpu_common.h, cpu_znorm_kernels.h).
namespace cpu_tiles {

// Elements per work item (one chunk of a large tensor, or a batch of small tensors holding at most this many).
// 64 KiB of float32, well inside L2: the second statistics pass and, for small tensors, the normalize pass read
// from cache.
inline constexpr int64_t kChunk = 16384;
// Elements in all below which a call runs on the calling thread alone (256 KiB of float32): the smallest list
// measured to gain from a second thread, with the other core idle and with it busy
// (bench/log/2026-12-07-dev-cpu-backend.md); below it the parallel region's start and end are a large share.
inline constexpr int64_t kSerialBelow = int64_t{1} << 16;
// Elements per block of a fused optimizer update (the length of its z-score buffer, which stays in L1).
inline constexpr int64_t kOptBlock = 1024;
// Partial sums of a loop accumulating in float32 (element i goes to lane i % kLanes32): 4 AVX2 (8 SSE)
// registers of independent sums, enough to hide the add latency.
inline constexpr int kLanes32 = 32;
// Values per float lane summed in float before the lane's sum joins its double (the float runs' sums of d and
// d^2, cpu_znorm_kernels.h): the error of M2 stays within a few units of float's last place, whatever the run.
inline constexpr int kSquareBlock = 8;
// Partial sums of a loop accumulating in float64 (float64 runs, and float runs beyond float squares' range): 4
// AVX2 registers.
inline constexpr int kLanes64 = 16;

}  // namespace cpu_tiles

// The CUDA kernels (cuda_znorm.cu, cuda_optim.cu, cuda_common.cuh, cuda_table_cache.cpp).
namespace cuda_tiles {

// Threads per block of every kernel (also the width of the block reductions and of finalize's merge tree).
inline constexpr int kThreads = 256;
// Independent accumulators per thread: loads in flight, not a serial add chain.
inline constexpr int kUnroll = 4;
// Elements per block in stages 1 and 3 and in the fused update (32 per thread); the table counts chunks of it.
inline constexpr int64_t kChunk = 8192;
// Minimum blocks per SM in stats_kernel's __launch_bounds__: caps its registers so that this many fit.
inline constexpr int kStatsMinBlocksPerSm = 5;

}  // namespace cuda_tiles

}  // namespace znorm
