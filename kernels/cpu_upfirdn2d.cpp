// The CPU kernel of fastgan::upfirdn2d (docs/design.md section 3).
//
// Polyphase, as the Triton kernel: along an axis, output pixel o in phase p = o % up takes the
// taps tap0(p) + up * t, which land on input pixel base(p) + (o / up) * down + t; the other
// taps land on inserted zeros and are skipped. Each output is a sum in a fixed order (filter
// rows, then columns), so results do not depend on the thread count. Work items are blocks of
// output rows of one channel plane (contiguous tensors) or of one image (channels_last);
// their sizes depend on the shape only. Sums run in float32 (float64 for float64) on
// at::vec vectors along the output row (contiguous) or along the channels (channels_last),
// each output's taps summed in a register and the output stored once.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <utility>
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

// One tap of a run of outputs: where its inputs start, and its weight.
template <typename T>
struct Tap {
  const T* src;
  Acc<T> w;
};

constexpr int kBlock = 4;  // vector steps summed side by side: independent FMA chains

// sums[j] = the sum over taps t (in order) of taps[t].w * taps[t].src[offset + j], for
// j < count (at most B vector steps), in registers: B steps side by side, each over all
// taps. `kWhole`: the sources may be read in whole steps (count fills them, or they are
// padded past it).
template <int B, bool kWhole, typename T>
void sum_taps(const Tap<T>* taps, int64_t n_taps, int64_t offset, int64_t count,
              Acc<T>* sums) {
  using S = Step<T>;
  using V = typename S::V;
  S acc[B];
  for (auto& step : acc) {
    for (auto& part : step.part) part = V(Acc<T>(0));
  }
  for (int64_t t = 0; t < n_taps; ++t) {
    const V weight(taps[t].w);
    const T* src = taps[t].src + offset;
    for (int b = 0; b < B; ++b) {
      const int64_t left = count - b * S::kWidth;
      const S v = kWhole || left >= S::kWidth ? S::load(src + b * S::kWidth)
                                              : S::load(src + b * S::kWidth, left);
      for (int i = 0; i < S::kParts; ++i) {
        acc[b].part[i] = at::vec::fmadd(v.part[i], weight, acc[b].part[i]);
      }
    }
  }
  for (int b = 0; b < B; ++b) {
    for (int i = 0; i < S::kParts; ++i) {
      acc[b].part[i].store(sums + (b * S::kParts + i) * V::size());
    }
  }
}

// Runs sum_taps over [0, n) in blocks of kBlock vector steps, then one block of the 1 to
// kBlock steps left, calling store(offset, count, sums) for each. `kPadded`: the sources may
// be read whole steps past n.
template <bool kPadded, typename T, typename Store>
void sum_taps_over(const Tap<T>* taps, int64_t n_taps, int64_t n, const Store& store) {
  constexpr int64_t kStep = Step<T>::kWidth;
  static_assert(kBlock == 4, "the switch below dispatches the last block's 1 to 4 steps");
  Acc<T> sums[kBlock * kStep];
  int64_t offset = 0;
  for (; offset + kBlock * kStep <= n; offset += kBlock * kStep) {
    sum_taps<kBlock, true>(taps, n_taps, offset, kBlock * kStep, sums);
    store(offset, kBlock * kStep, sums);
  }
  const int64_t count = n - offset;
  switch (ceil_div(count, kStep)) {
    case 0: return;
    case 1: sum_taps<1, kPadded>(taps, n_taps, offset, count, sums); break;
    case 2: sum_taps<2, kPadded>(taps, n_taps, offset, count, sums); break;
    case 3: sum_taps<3, kPadded>(taps, n_taps, offset, count, sums); break;
    default: sum_taps<4, kPadded>(taps, n_taps, offset, count, sums); break;
  }
  store(offset, count, sums);
}

// A filter row that lands on an input row: the input row iy and the filter row ky.
struct FilterRow {
  int64_t iy, ky;
};

// The rows of upfirdn2d's output for `outer` images (channels_last) or planes (contiguous) of
// `h` input rows, in work items of whole output rows (`row_outputs` elements each): calls
// row(state, o, oy, rows, n_rows) for output row oy of image or plane o, in order, with the
// n_rows filter rows that land on its input rows (in filter order) and a per-thread
// state = make_state().
template <typename MakeState, typename Row>
void resample_rows(int64_t outer, int64_t h, int64_t oh, int64_t row_outputs,
                   const Resampling& g, const MakeState& make_state, const Row& row) {
  const std::vector<Phase> ph_y = phases(g.up_y, g.down_y, g.pad_y0, g.taps_y);
  const int64_t rows_per_item = std::max<int64_t>(1, kItemOutputs / row_outputs);
  const int64_t row_items = ceil_div(oh, rows_per_item);
  const int64_t taps = std::max<int64_t>(1, g.taps_y * g.taps_x / (g.up_y * g.up_x));
  parallel_over(outer * row_items, outer * oh * row_outputs * taps, [&](int64_t begin,
                                                                         int64_t end) {
    auto state = make_state();
    std::vector<FilterRow> rows(g.taps_y);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t o = item / row_items;
      const int64_t oy0 = item % row_items * rows_per_item;
      for (int64_t oy = oy0; oy < std::min(oh, oy0 + rows_per_item); ++oy) {
        const Phase& py = ph_y[oy % g.up_y];
        int64_t n_rows = 0;
        for (int64_t t = 0; t < py.taps; ++t) {
          const int64_t iy = py.base + oy / g.up_y * g.down_y + t;
          if (iy >= 0 && iy < h) rows[n_rows++] = {iy, py.tap0 + g.up_y * t};
        }
        row(state, o, oy, rows.data(), n_rows);
      }
    }
  });
}

// Input rows converted to the compute type, split by column modulo down_x and padded with
// zeros, in slots (input row iy in slot iy % slots), with which row each slot holds and the
// slots of the current output row's filter rows.
template <typename A>
struct ConvertedRows {
  std::vector<A> data;
  std::vector<int64_t> held;  // plane * h + iy, or -1
  std::vector<const A*> current;
  std::vector<Tap<A>> taps;  // those of the current output row and phase
};

// upfirdn2d of `planes` contiguous [H, W] planes. The input rows under the filter are kept
// converted (ConvertedRows: each converted once while consecutive output rows use it), so that
// along the output row the taps of each output phase read contiguous vectors without bounds
// checks; each vector of outputs sums all its taps in a register and is stored once.
template <typename T>
void planes_kernel(const T* x, const std::vector<Acc<T>>& w, T* y, int64_t planes, int64_t h,
                   int64_t width, int64_t oh, int64_t ow, const Resampling& g) {
  using A = Acc<T>;
  using V = Vectorized<A>;
  const std::vector<Phase> ph_x = phases(g.up_x, g.down_x, g.pad_x0, g.taps_x);
  const int64_t split = ceil_div(width, g.down_x);  // input columns per residue modulo down_x
  // Each tap of phase p reads split input row [j0, j0 + outputs of p): the padding on each
  // side (a block of vectors more on the right) keeps those reads inside a segment of zeros
  // and data.
  int64_t pad_l = 0, pad_r = 0;
  for (int64_t p = 0; p < std::min(g.up_x, ow); ++p) {
    for (int64_t u = 0; u < ph_x[p].taps; ++u) {
      const int64_t j0 = floor_div(ph_x[p].base + u, g.down_x);
      pad_l = std::max(pad_l, -j0);
      pad_r = std::max(pad_r, j0 + ceil_div(ow - p, g.up_x) - split);
    }
  }
  const int64_t segment = pad_l + split + pad_r + kBlock * V::size();
  const int64_t row_size = g.down_x * segment;  // the residues' segments of one input row
  // enough slots for the rows of one output row and those the next one adds
  const int64_t slots = ceil_div(g.taps_y, g.up_y) + g.down_y;
  // Per phase, its taps: where their vectors start in a converted row, and their columns.
  std::vector<std::vector<std::pair<int64_t, int64_t>>> taps_x(std::min(g.up_x, ow));
  for (int64_t p = 0; p < static_cast<int64_t>(taps_x.size()); ++p) {
    for (int64_t u = 0; u < ph_x[p].taps; ++u) {
      const int64_t i0 = ph_x[p].base + u;  // the input column of the phase's output 0
      const int64_t j0 = floor_div(i0, g.down_x), q = i0 - j0 * g.down_x;
      taps_x[p].push_back({q * segment + pad_l + j0, ph_x[p].tap0 + g.up_x * u});
    }
  }
  const auto make_state = [&] {
    return ConvertedRows<A>{std::vector<A>(slots * row_size, A(0)),
                            std::vector<int64_t>(slots, -1),
                            std::vector<const A*>(g.taps_y),
                            std::vector<Tap<A>>(g.taps_y * g.taps_x)};
  };
  const auto row = [&](ConvertedRows<A>& converted, int64_t plane, int64_t oy,
                       const FilterRow* rows, int64_t n_rows) {
    for (int64_t k = 0; k < n_rows; ++k) {
      const int64_t slot = rows[k].iy % slots;
      A* dst = converted.data.data() + slot * row_size;
      converted.current[k] = dst;
      if (converted.held[slot] == plane * h + rows[k].iy) continue;
      converted.held[slot] = plane * h + rows[k].iy;
      const T* src = x + (plane * h + rows[k].iy) * width;
      for (int64_t q = 0; q < g.down_x; ++q) {
        A* part = dst + q * segment + pad_l;
        for (int64_t j = 0; j * g.down_x + q < width; ++j) part[j] = src[j * g.down_x + q];
      }
    }
    T* out = y + (plane * oh + oy) * ow;
    for (int64_t p = 0; p < static_cast<int64_t>(taps_x.size()); ++p) {
      int64_t n_taps = 0;
      for (int64_t k = 0; k < n_rows; ++k) {
        const A* w_row = w.data() + rows[k].ky * g.taps_x;
        for (const auto& [start, kx] : taps_x[p]) {
          converted.taps[n_taps++] = {converted.current[k] + start, w_row[kx]};
        }
      }
      sum_taps_over<true>(converted.taps.data(), n_taps, ceil_div(ow - p, g.up_x),
                       [&](int64_t s, int64_t count, const A* sums) {
        for (int64_t i = 0; i < count; ++i) out[p + g.up_x * (s + i)] = static_cast<T>(sums[i]);
      });
    }
  };
  resample_rows(planes, h, oh, ow, g, make_state, row);
}

// upfirdn2d of n channels_last [H, W, C] images: each output pixel sums all its taps along
// the channels, blocks of vector steps of channels at a time, in registers.
template <typename T>
void channels_last_kernel(const T* x, const std::vector<Acc<T>>& w, T* y, int64_t n,
                          int64_t c, int64_t h, int64_t width, int64_t oh, int64_t ow,
                          const Resampling& g) {
  using A = Acc<T>;
  using S = Step<T>;
  using V = typename S::V;
  const std::vector<Phase> ph_x = phases(g.up_x, g.down_x, g.pad_x0, g.taps_x);
  const auto make_state = [&] { return std::vector<Tap<T>>(g.taps_y * g.taps_x); };
  const auto row = [&](std::vector<Tap<T>>& taps, int64_t image, int64_t oy,
                       const FilterRow* rows, int64_t n_rows) {
    T* out = y + (image * oh + oy) * ow * c;
    for (int64_t ox = 0; ox < ow; ++ox) {
      const Phase& px = ph_x[ox % g.up_x];
      const int64_t ix0 = px.base + ox / g.up_x * g.down_x;
      int64_t n_taps = 0;
      for (int64_t k = 0; k < n_rows; ++k) {
        const T* src = x + (image * h + rows[k].iy) * width * c;
        const A* w_row = w.data() + rows[k].ky * g.taps_x;
        for (int64_t u = 0; u < px.taps; ++u) {
          const int64_t ix = ix0 + u;
          if (ix >= 0 && ix < width) taps[n_taps++] = {src + ix * c, w_row[px.tap0 + g.up_x * u]};
        }
      }
      sum_taps_over<false>(taps.data(), n_taps, c, [&](int64_t c0, int64_t count,
                                                       const A* sums) {
        for (int64_t j = 0; j < count; j += S::kWidth) {
          S v;
          for (int i = 0; i < S::kParts; ++i) v.part[i] = V::loadu(sums + j + i * V::size());
          v.store(out + ox * c + c0 + j, std::min(S::kWidth, count - j));
        }
      });
    }
  };
  resample_rows(n, h, oh, ow * c, g, make_state, row);
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
