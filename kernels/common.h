// Plain structs shared by the op entry points (ops.cpp), the CPU kernels and the CUDA kernels.
// Includes no torch header, so that the .cu files compile with nvcc alone (docs/design.md).
#pragma once

#include <cstdint>

namespace fastgan {

// Activation codes: fastgan.reference.ACTIVATIONS[name].code. From kTanh on, the curved ones
// (a nonzero second derivative): their gradient is computed from the input.
constexpr int64_t kLinear = 0;
constexpr int64_t kRelu = 1;
constexpr int64_t kLrelu = 2;
constexpr int64_t kTanh = 3;
constexpr int64_t kSigmoid = 4;
constexpr int64_t kElu = 5;
constexpr int64_t kSelu = 6;
constexpr int64_t kSoftplus = 7;
constexpr int64_t kSwish = 8;

// torch's F.selu: scale * (z if z > 0 else alpha * (exp(z) - 1)); F.softplus (beta 1) is z
// itself above the threshold (fastgan.reference).
constexpr double kSeluAlpha = 1.6732632423543772848170429916717;
constexpr double kSeluScale = 1.0507009873554804934193349852946;
constexpr double kSoftplusThreshold = 20.0;

// y = clamp(act(x * scale + b) * gain, -clamp, clamp); clamp < 0 means no clamp.
struct ActParams {
  int64_t act;
  double alpha;
  double gain;
  double clamp;
  double scale;
};

// A dense tensor seen as [outer, chan, inner] in memory order: element (o, c, i) lives at flat
// offset (o * chan + c) * inner + i and has index c along the bias dim
// (fastgan/ops/layout.py, as_outer_chan_inner).
struct Layout {
  int64_t outer;
  int64_t chan;
  int64_t inner;
};

// upfirdn2d's geometry (fastgan.reference.Resampling, StyleGAN2-ADA's order) with its filter's
// taps, flip and gain: insert up - 1 zeros after each pixel, pad by (pad_x0, pad_x1, pad_y0,
// pad_y1), correlate with the filter (flipped unless flip_filter) times gain, keep every
// down-th pixel.
struct Resampling {
  int64_t up_x, up_y, down_x, down_y;
  int64_t pad_x0, pad_x1, pad_y0, pad_y1;
  int64_t taps_y, taps_x;
  bool flip_filter;
  double gain;
};

}  // namespace fastgan
