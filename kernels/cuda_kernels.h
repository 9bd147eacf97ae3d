// Host launchers of the CUDA kernels (cuda_bias_act.cu, cuda_per_sample.cu). Plain CUDA: raw
// pointers, sizes and a stream, no torch types, so that the .cu files compile with nvcc alone;
// cuda_glue.cpp calls them with tensors' pointers and the current stream (docs/design.md).
//
// Every launcher takes dense, non-empty data, launches on `stream` and returns
// cudaGetLastError(). Element types are DType; math runs in float32 (float64 for kFloat64).
// Reductions are two fixed stages (per-block partial sums into `workspace`, then a fixed-order
// sum per output), so results are the same run to run; no atomics.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common.h"

namespace fastgan::gpu {

enum class DType { kFloat16, kBFloat16, kFloat32, kFloat64 };

// y = clamp(act(x * scale + b) * gain); b null or [chan]; x and y seen as `layout`.
cudaError_t launch_bias_act(DType dtype, const void* x, const void* b, void* y,
                            const Layout& layout, const ActParams& act, cudaStream_t stream);

// Bytes of workspace that launch_bias_act_grad needs with db (none without).
size_t bias_act_grad_workspace_bytes(DType dtype, const Layout& layout);

// dx = scale * dz, dz = d y / d z * dy from the output y; db null (not wanted) or [chan]:
// sum of dz per channel, rounded to dtype once.
cudaError_t launch_bias_act_grad(DType dtype, const void* dy, const void* y, void* dx, void* db,
                                 void* workspace, const Layout& layout, const ActParams& act,
                                 cudaStream_t stream);

// Bytes of workspace that launch_per_sample_dot needs.
size_t per_sample_dot_workspace_bytes(DType dtype, int64_t n, int64_t per_sample);

// out[k] = sum over sample k of a * b (b null: a * a, reading a once), in the compute type;
// sample k is the run of per_sample elements at k * per_sample.
cudaError_t launch_per_sample_dot(DType dtype, const void* a, const void* b, void* out,
                                  void* workspace, int64_t n, int64_t per_sample,
                                  cudaStream_t stream);

// y[k] = x[k] * s[k] over each sample; s [n] in the compute type.
cudaError_t launch_scale_per_sample(DType dtype, const void* x, const void* s, void* y,
                                    int64_t n, int64_t per_sample, cudaStream_t stream);

}  // namespace fastgan::gpu
