// The kernels behind the fastgan operators, one set per device type. ops.cpp checks the
// arguments, makes the tensors dense, allocates the outputs and calls these; they see only
// valid, non-empty, dense tensors (docs/design.md).
#pragma once

#include <ATen/core/Tensor.h>

#include "common.h"

namespace fastgan {

// The kernels of one device type. Each one:
//   bias_act(x, b, y, layout, act): y = clamp(act(x * scale + b) * gain). x and y dense with
//     the same strides, seen as `layout`; b undefined (no bias) or contiguous [chan] of x's
//     dtype.
//   bias_act_grad(dy, y, dx, db, layout, act): dx = scale * dz with dz = d y / d z * dy from
//     the output y (linear, relu, lrelu); db (undefined: not wanted) = sum of dz per channel,
//     [chan] of dy's dtype, a fixed two-stage reduction. dy, y and dx dense with the same
//     strides.
//   bias_act_grad_from_input(dy, x, b, dx, db, layout, act, scale_dx): the same for the curved
//     activations (kTanh on), dz from the input: z = x * scale + b, the clamp mask from the
//     output as bias_act stores it; dx = scale * dz, or dz unless scale_dx. x, dy and dx dense
//     with the same strides, b as in bias_act. Null in cuda_kernels: the op is registered for
//     CPU only (on CUDA fastgan runs the curved activations on its Triton kernels).
//   per_sample_dot(a, b, out, n, per_sample): out[k] = sum(a[k] * b[k]) over a sample, with
//     b undefined meaning b is a (read once); each sample a contiguous run of per_sample
//     elements at k * per_sample; out [n] in float32 (float64 for float64).
//   scale_per_sample(x, s, y, n, per_sample): y[k] = x[k] * s[k]; s [n] contiguous in the
//     compute dtype (float32, float64 for float64); x and y laid out as in per_sample_dot.
struct KernelSet {
  void (*bias_act)(const at::Tensor& x, const at::Tensor& b, const at::Tensor& y,
                   const Layout& layout, const ActParams& act);
  void (*bias_act_grad)(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& dx,
                        const at::Tensor& db, const Layout& layout, const ActParams& act);
  void (*per_sample_dot)(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out,
                         int64_t n, int64_t per_sample);
  void (*scale_per_sample)(const at::Tensor& x, const at::Tensor& s, const at::Tensor& y,
                           int64_t n, int64_t per_sample);
  void (*bias_act_grad_from_input)(const at::Tensor& dy, const at::Tensor& x,
                                   const at::Tensor& b, const at::Tensor& dx,
                                   const at::Tensor& db, const Layout& layout,
                                   const ActParams& act, bool scale_dx);
};

extern const KernelSet cpu_kernels;  // cpu_kernels.cpp

// upfirdn2d on CPU only (cpu_upfirdn2d.cpp; CUDA tensors run fastgan's Triton kernel): y =
// upfirdn2d(x, f) with x and y [N, C, H, W] both contiguous, or both channels_last
// (`channels_last`); f undefined (identity) or a contiguous float32 [taps] (separable) or
// [taps_y, taps_x] filter; y's size is the geometry's output size.
void cpu_upfirdn2d(const at::Tensor& x, const at::Tensor& f, const at::Tensor& y,
                   const Resampling& geom, bool channels_last);
#ifdef FASTGAN_WITH_CUDA
extern const KernelSet cuda_kernels;  // cuda_glue.cpp: the current stream of the tensors' device
#endif

}  // namespace fastgan
