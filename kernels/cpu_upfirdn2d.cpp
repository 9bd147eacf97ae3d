// The CPU kernel of fastgan::upfirdn2d (docs/design.md section 3).
//
// Polyphase, as the Triton kernel: along an axis, output pixel o in phase p = o % up takes the
// taps tap0(p) + up * t, which land on input pixel base(p) + (o / up) * down + t; the other
// taps land on inserted zeros and are skipped. Each output is a sum in a fixed order (filter
// rows, then columns), so results do not depend on the thread count. Work items are blocks of
// output rows of one channel plane (contiguous tensors) or of one image (channels_last);
// their sizes depend on the shape only. Sums run in float32 (float64 for float64) on
// at::vec vectors along the output row (contiguous) or along the channels (channels_last).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "cpu_common.h"
#include "ops.h"

namespace fastgan::cpu {
namespace {

constexpr int64_t kItemOutputs = 16384;  // output elements per work item (whole rows, >= 1)

int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((b - 1 - a) / b); }

// One output phase along an axis: its first tap landing on an input pixel, that pixel for the
// phase's first output, and how many taps (tap0, tap0 + up, ...) the filter has.
struct Phase {
  int64_t tap0, base, taps;
};

std::vector<Phase> phases(int64_t up, int64_t down, int64_t pad0, int64_t taps) {
  std::vector<Phase> out(up);
  for (int64_t p = 0; p < up; ++p) {
    const int64_t tap0 = ((pad0 - p * down) % up + up) % up;
    out[p] = {tap0, (p * down + tap0 - pad0) / up, tap0 < taps ? ceil_div(taps - tap0, up) : 0};
  }
  return out;
}

// The correlation weights [taps_y, taps_x] times gain, in the compute type: f flipped unless
// flip_filter, f[y] * f[x] for a separable f, all ones for none.
template <typename A>
std::vector<A> weights(const at::Tensor& f, const Resampling& g) {
  std::vector<A> w(g.taps_y * g.taps_x);
  const float* data = f.defined() ? f.const_data_ptr<float>() : nullptr;
  const bool separable = f.defined() && f.dim() == 1;
  for (int64_t ky = 0; ky < g.taps_y; ++ky) {
    for (int64_t kx = 0; kx < g.taps_x; ++kx) {
      const int64_t fy = g.flip_filter ? ky : g.taps_y - 1 - ky;
      const int64_t fx = g.flip_filter ? kx : g.taps_x - 1 - kx;
      const A value = data == nullptr ? A(1)
                      : separable     ? A(data[fy]) * A(data[fx])
                                      : A(data[fy * g.taps_x + fx]);
      w[ky * g.taps_x + kx] = value * A(g.gain);
    }
  }
  return w;
}

// acc[j] += w * x[j] for j < n.
template <typename T>
void axpy(Acc<T>* acc, const T* x, Acc<T> w, int64_t n) {
  using S = Step<T>;
  using V = typename S::V;
  const V weight(w);
  int64_t j = 0;
  for (; j + S::kWidth <= n; j += S::kWidth) {
    const S v = S::load(x + j);
    for (int k = 0; k < S::kParts; ++k) {
      Acc<T>* a = acc + j + k * V::size();
      at::vec::fmadd(v.part[k], weight, V::loadu(a)).store(a);
    }
  }
  for (; j < n; ++j) acc[j] += w * static_cast<Acc<T>>(x[j]);
}

// The rows of upfirdn2d's output for `outer` images (channels_last) or planes (contiguous) of
// `h` input rows: work items of whole output rows, `row_outputs` elements each. For output row
// oy of image or plane o, with `acc` (acc_size elements) zeroed first, calls
// add_row(o, iy, w_row, acc, scratch) for every filter row w_row that lands on an input row iy
// of the image, then store(o, oy, acc). `scratch` holds scratch_size elements per thread.
template <typename A, typename AddRow, typename Store>
void resample_rows(int64_t outer, int64_t h, int64_t oh, int64_t row_outputs, int64_t acc_size,
                   int64_t scratch_size, const std::vector<A>& w, const Resampling& g,
                   const AddRow& add_row, const Store& store) {
  const std::vector<Phase> ph_y = phases(g.up_y, g.down_y, g.pad_y0, g.taps_y);
  const int64_t rows_per_item = std::max<int64_t>(1, kItemOutputs / row_outputs);
  const int64_t row_items = ceil_div(oh, rows_per_item);
  const int64_t taps = std::max<int64_t>(1, g.taps_y * g.taps_x / (g.up_y * g.up_x));
  parallel_over(outer * row_items, outer * oh * row_outputs * taps, [&](int64_t begin,
                                                                         int64_t end) {
    std::vector<A> acc(acc_size), scratch(scratch_size, A(0));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t o = item / row_items;
      const int64_t oy0 = item % row_items * rows_per_item;
      for (int64_t oy = oy0; oy < std::min(oh, oy0 + rows_per_item); ++oy) {
        std::fill(acc.begin(), acc.end(), A(0));
        const Phase& py = ph_y[oy % g.up_y];
        for (int64_t t = 0; t < py.taps; ++t) {
          const int64_t iy = py.base + oy / g.up_y * g.down_y + t;
          if (iy >= 0 && iy < h) {
            add_row(o, iy, w.data() + (py.tap0 + g.up_y * t) * g.taps_x, acc.data(),
                    scratch.data());
          }
        }
        store(o, oy, acc.data());
      }
    }
  });
}

// upfirdn2d of `planes` contiguous [H, W] planes. Each input row is converted to the compute
// type and split by column modulo down_x (in `row`), so that every (output phase, tap) pair is
// one contiguous axpy over the phase's outputs, kept by phase in `acc`.
template <typename T>
void planes_kernel(const T* x, const std::vector<Acc<T>>& w, T* y, int64_t planes, int64_t h,
                   int64_t width, int64_t oh, int64_t ow, const Resampling& g) {
  using A = Acc<T>;
  const std::vector<Phase> ph_x = phases(g.up_x, g.down_x, g.pad_x0, g.taps_x);
  const int64_t cols = ceil_div(ow, g.up_x);        // outputs of phase 0 (others: <= that)
  const int64_t split = ceil_div(width, g.down_x);  // input columns per residue modulo down_x
  // row[q * split + j]: input column j * down + q; acc[p * cols + s]: output column p + up * s
  const auto add_row = [&](int64_t plane, int64_t iy, const A* w_row, A* acc, A* row) {
    const T* src = x + (plane * h + iy) * width;
    if (g.down_x == 1) {
      std::transform(src, src + width, row, [](T v) { return static_cast<A>(v); });
    } else {
      for (int64_t i = 0; i < width; ++i) row[i % g.down_x * split + i / g.down_x] = src[i];
    }
    for (int64_t p = 0; p < std::min(g.up_x, ow); ++p) {
      const Phase& px = ph_x[p];
      const int64_t n_out = ceil_div(ow - p, g.up_x);
      for (int64_t u = 0; u < px.taps; ++u) {
        const int64_t i0 = px.base + u;  // the input column of the phase's output 0
        const int64_t j0 = floor_div(i0, g.down_x), q = i0 - j0 * g.down_x;
        const int64_t lo = std::max<int64_t>(0, -j0), hi = std::min(n_out, split - j0);
        if (lo < hi) {
          axpy<A>(acc + p * cols + lo, row + q * split + j0 + lo, w_row[px.tap0 + g.up_x * u],
                  hi - lo);
        }
      }
    }
  };
  const auto store = [&](int64_t plane, int64_t oy, const A* acc) {
    T* out = y + (plane * oh + oy) * ow;
    for (int64_t ox = 0; ox < ow; ++ox) {
      out[ox] = static_cast<T>(acc[ox % g.up_x * cols + ox / g.up_x]);
    }
  };
  resample_rows<A>(planes, h, oh, ow, g.up_x * cols, g.down_x * split, w, g, add_row, store);
}

// upfirdn2d of n channels_last [H, W, C] images: every (output pixel, tap) pair is one axpy
// along the channels.
template <typename T>
void channels_last_kernel(const T* x, const std::vector<Acc<T>>& w, T* y, int64_t n,
                          int64_t c, int64_t h, int64_t width, int64_t oh, int64_t ow,
                          const Resampling& g) {
  using A = Acc<T>;
  const std::vector<Phase> ph_x = phases(g.up_x, g.down_x, g.pad_x0, g.taps_x);
  const auto add_row = [&](int64_t image, int64_t iy, const A* w_row, A* acc, A*) {
    const T* src = x + (image * h + iy) * width * c;
    for (int64_t ox = 0; ox < ow; ++ox) {
      const Phase& px = ph_x[ox % g.up_x];
      const int64_t ix0 = px.base + ox / g.up_x * g.down_x;
      for (int64_t u = 0; u < px.taps; ++u) {
        const int64_t ix = ix0 + u;
        if (ix >= 0 && ix < width) {
          axpy<T>(acc + ox * c, src + ix * c, w_row[px.tap0 + g.up_x * u], c);
        }
      }
    }
  };
  const auto store = [&](int64_t image, int64_t oy, const A* acc) {
    T* out = y + (image * oh + oy) * ow * c;
    for (int64_t i = 0; i < ow * c; ++i) out[i] = static_cast<T>(acc[i]);
  };
  resample_rows<A>(n, h, oh, ow * c, ow * c, 0, w, g, add_row, store);
}

}  // namespace
}  // namespace fastgan::cpu

namespace fastgan {

void cpu_upfirdn2d(const at::Tensor& x, const at::Tensor& f, const at::Tensor& y,
                   const Resampling& geom, bool channels_last) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upfirdn2d", [&] {
    const auto w = cpu::weights<cpu::Acc<scalar_t>>(f, geom);
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    if (channels_last) {
      cpu::channels_last_kernel<scalar_t>(in, w, out, x.size(0), x.size(1), x.size(2),
                                          x.size(3), y.size(2), y.size(3), geom);
    } else {
      cpu::planes_kernel<scalar_t>(in, w, out, x.size(0) * x.size(1), x.size(2), x.size(3),
                                   y.size(2), y.size(3), geom);
    }
  });
}

}  // namespace fastgan
