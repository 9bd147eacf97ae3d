// CPU kernels of the fastgan operators (docs/design.md).
//
// Each tensor is cut into work items whose sizes depend on its shape only, never on the
// thread count; at::parallel_for runs the items, and every reduction sums per item first, then
// across items in a fixed order, so results are bitwise the same for any number of threads.
// Math runs on at::vec::Vectorized<float> (Vectorized<double> for float64); 16-bit values are
// converted to float32 on load and rounded back on store.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "cpu_common.h"
#include "ops.h"

namespace fastgan::cpu {
namespace {

constexpr int64_t kItemElements = 16384;  // elements per work item
constexpr int64_t kMaxItemCols = 4096;    // the longest piece of a row in one item
constexpr int64_t kMinRow = 64;           // shorter rows per channel: the periodic view
constexpr int64_t kPeriodicRow = 1024;    // periodic rows: the first multiple of the period >= this

// Sum of the lanes of `parts`, in a fixed order.
template <typename A, int N>
A sum_lanes(const Vectorized<A> (&parts)[N]) {
  A lanes[Vectorized<A>::size()];
  A sum = 0;
  for (int k = 0; k < N; ++k) {
    parts[k].store(lanes);
    for (int64_t i = 0; i < Vectorized<A>::size(); ++i) sum += lanes[i];
  }
  return sum;
}

// The activation of fastgan/ops/activation.py (activate, activation_grad) on vectors.
template <typename A>
struct VecAct {
  using V = Vectorized<A>;
  int64_t act;
  bool use_clamp;
  V alpha, gain, clamp, neg_clamp, scale, zero;

  explicit VecAct(const ActParams& p)
      : act(p.act), use_clamp(p.clamp >= 0), alpha(A(p.alpha)), gain(A(p.gain)),
        clamp(A(p.clamp)), neg_clamp(A(-p.clamp)), scale(A(p.scale)), zero(A(0)) {}

  // clamp(act(z) * gain); NaN stays NaN.
  V forward(V z) const {
    if (act == kRelu) {
      z = V::blendv(z, zero, z < zero);
    } else if (act == kLrelu) {
      z = V::blendv(z, z * alpha, z < zero);
    }
    V y = z * gain;
    if (use_clamp) {
      const V saturated = V::blendv(V::blendv(y, clamp, y > zero), neg_clamp, y < zero);
      y = V::blendv(saturated, y, y.abs() < clamp);
    }
    return y;
  }

  // dL/dz from dy and the output y; exactly 0 where the slope is 0, even for inf/NaN dy.
  V grad(V dy, V y) const {
    V g = dy;
    if (use_clamp) g = V::blendv(zero, g, y.abs() < clamp);
    g = g * gain;
    if (act == kRelu) {
      g = V::blendv(zero, g, y != zero);
    } else if (act == kLrelu) {
      g = V::blendv(g * alpha, g, y * gain > zero);
    }
    return g;
  }
};

// How bias_act cuts a [outer, chan, inner] tensor into rows and items. With inner >= kMinRow,
// a row is one [inner] run of one channel. Otherwise (channels_last, small inner) the flat
// tensor is cut into rows of `cols` elements, a multiple of the bias period chan * inner, so
// that column j always has channel (j / inner) % chan; the last row may be shorter.
struct Tiling {
  bool periodic;
  int64_t numel, cols, rows, item_rows, item_cols, n_col_items, n_items;
};

Tiling make_tiling(const Layout& l) {
  Tiling t{};
  t.numel = l.outer * l.chan * l.inner;
  t.periodic = l.inner < kMinRow;
  const int64_t period = l.chan * l.inner;
  t.cols = t.periodic ? period * ceil_div(kPeriodicRow, period) : l.inner;
  t.rows = ceil_div(t.numel, t.cols);
  t.item_cols = std::min(t.cols, kMaxItemCols);
  t.item_rows = std::max<int64_t>(1, kItemElements / t.item_cols);
  t.n_col_items = ceil_div(t.cols, t.item_cols);
  t.n_items = ceil_div(t.rows, t.item_rows) * t.n_col_items;
  return t;
}

struct Item {
  int64_t row_item, col_item, r0, r1, c0, c1;
};

template <typename F>
void for_each_item(const Tiling& t, const F& fn) {
  parallel_over(t.n_items, t.numel, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      Item item;
      item.row_item = i / t.n_col_items;
      item.col_item = i % t.n_col_items;
      item.r0 = item.row_item * t.item_rows;
      item.r1 = std::min(t.rows, item.r0 + t.item_rows);
      item.c0 = item.col_item * t.item_cols;
      item.c1 = std::min(t.cols, item.c0 + t.item_cols);
      fn(item);
    }
  });
}

// Bias per column of a periodic row, padded so that a full step loads past its end.
template <typename T>
std::vector<Acc<T>> periodic_bias(const Acc<T>* bias, const Layout& l, const Tiling& t) {
  std::vector<Acc<T>> row(t.cols + Step<T>::kWidth, Acc<T>(0));
  for (int64_t j = 0; j < t.cols; ++j) row[j] = bias[(j / l.inner) % l.chan];
  return row;
}

template <typename T>
void bias_act_kernel(const T* x, const Acc<T>* bias, T* y, const Layout& l,
                     const ActParams& p) {
  using S = Step<T>;
  using V = typename S::V;
  const Tiling t = make_tiling(l);
  const VecAct<Acc<T>> act(p);
  const std::vector<Acc<T>> row_bias =
      bias && t.periodic ? periodic_bias<T>(bias, l, t) : std::vector<Acc<T>>();
  for_each_item(t, [&](const Item& item) {
    for (int64_t r = item.r0; r < item.r1; ++r) {
      const int64_t offset = r * t.cols;
      const int64_t end = std::min(item.c1, t.numel - offset);
      const V channel_bias(bias && !t.periodic ? bias[r % l.chan] : Acc<T>(0));
      for (int64_t j = item.c0; j < end; j += S::kWidth) {
        const int64_t count = std::min(S::kWidth, end - j);
        S v = S::load(x + offset + j, count);
        for (int k = 0; k < S::kParts; ++k) {
          V z = v.part[k] * act.scale;
          if (bias) {
            z = z + (t.periodic ? V::loadu(row_bias.data() + j + k * V::size()) : channel_bias);
          }
          v.part[k] = act.forward(z);
        }
        v.store(y + offset + j, count);
      }
    }
  });
}

// Stage 1 writes one sum per (item, row) (rows of a channel) or per (item, column)
// (periodic rows); stage 2 adds them per channel in a fixed order.
template <typename T>
void bias_act_grad_kernel(const T* dy, const T* y, T* dx, T* db, const Layout& l,
                          const ActParams& p) {
  using S = Step<T>;
  using A = Acc<T>;
  using V = typename S::V;
  const Tiling t = make_tiling(l);
  const VecAct<A> act(p);
  const int64_t n_row_items = ceil_div(t.rows, t.item_rows);
  // periodic: [n_row_items, cols]; rows of a channel: [n_col_items, rows]
  std::vector<A> partial(db == nullptr ? 0 : t.periodic ? n_row_items * t.cols
                                                         : t.n_col_items * t.rows);
  for_each_item(t, [&](const Item& item) {
    std::vector<A> col_sums(db != nullptr && t.periodic ? item.c1 - item.c0 + S::kWidth : 0);
    for (int64_t r = item.r0; r < item.r1; ++r) {
      const int64_t offset = r * t.cols;
      const int64_t end = std::min(item.c1, t.numel - offset);
      V row_sums[S::kParts];
      for (auto& v : row_sums) v = V(A(0));
      for (int64_t j = item.c0; j < end; j += S::kWidth) {
        const int64_t count = std::min(S::kWidth, end - j);
        S g = S::load(dy + offset + j, count);  // zeros past `count` give g == 0
        const S out = S::load(y + offset + j, count);
        for (int k = 0; k < S::kParts; ++k) {
          g.part[k] = act.grad(g.part[k], out.part[k]);
          if (db != nullptr && t.periodic) {
            A* sums = col_sums.data() + (j - item.c0) + k * V::size();
            (V::loadu(sums) + g.part[k]).store(sums);
          } else if (db != nullptr) {
            row_sums[k] = row_sums[k] + g.part[k];
          }
          g.part[k] = g.part[k] * act.scale;
        }
        g.store(dx + offset + j, count);
      }
      if (db != nullptr && !t.periodic) partial[item.col_item * t.rows + r] = sum_lanes(row_sums);
    }
    if (db != nullptr && t.periodic) {
      std::copy(col_sums.begin(), col_sums.begin() + (item.c1 - item.c0),
                partial.begin() + item.row_item * t.cols + item.c0);
    }
  });
  if (db == nullptr) return;
  parallel_over(l.chan, static_cast<int64_t>(partial.size()), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      A sum = 0;
      if (t.periodic) {  // the columns of channel c, in order
        for (int64_t group = c; group * l.inner < t.cols; group += l.chan) {
          for (int64_t j = group * l.inner; j < (group + 1) * l.inner; ++j) {
            for (int64_t ri = 0; ri < n_row_items; ++ri) sum += partial[ri * t.cols + j];
          }
        }
      } else {
        for (int64_t o = 0; o < l.outer; ++o) {
          for (int64_t ci = 0; ci < t.n_col_items; ++ci) {
            sum += partial[ci * t.rows + o * l.chan + c];
          }
        }
      }
      db[c] = static_cast<T>(sum);
    }
  });
}

constexpr int64_t kSampleChunk = 8192;  // elements of one sample per work item
constexpr int kAccumulators = 4;        // independent sums per item (latency, accuracy)

template <typename T>
void per_sample_dot_kernel(const T* a, const T* b, Acc<T>* out, int64_t n,
                           int64_t per_sample) {
  using S = Step<T>;
  using A = Acc<T>;
  using V = typename S::V;
  const int64_t n_chunks = ceil_div(per_sample, kSampleChunk);
  std::vector<A> partial(n * n_chunks);
  parallel_over(n * n_chunks, n * per_sample, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t start = (i / n_chunks) * per_sample + (i % n_chunks) * kSampleChunk;
      const int64_t len = std::min(kSampleChunk, per_sample - (i % n_chunks) * kSampleChunk);
      V sums[kAccumulators * S::kParts];
      for (auto& v : sums) v = V(A(0));
      for (int64_t j = 0, step = 0; j < len; j += S::kWidth, ++step) {
        const int64_t count = std::min(S::kWidth, len - j);
        const S va = S::load(a + start + j, count);
        const S vb = b == nullptr ? va : S::load(b + start + j, count);
        V* acc = sums + (step % kAccumulators) * S::kParts;
        for (int k = 0; k < S::kParts; ++k) acc[k] = acc[k] + va.part[k] * vb.part[k];
      }
      partial[i] = sum_lanes(sums);
    }
  });
  for (int64_t s = 0; s < n; ++s) {
    A sum = 0;
    for (int64_t k = 0; k < n_chunks; ++k) sum += partial[s * n_chunks + k];
    out[s] = sum;
  }
}

template <typename T>
void scale_per_sample_kernel(const T* x, const Acc<T>* s, T* y, int64_t n, int64_t per_sample) {
  using S = Step<T>;
  using V = typename S::V;
  const int64_t n_chunks = ceil_div(per_sample, kSampleChunk);
  parallel_over(n * n_chunks, n * per_sample, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t start = (i / n_chunks) * per_sample + (i % n_chunks) * kSampleChunk;
      const int64_t len = std::min(kSampleChunk, per_sample - (i % n_chunks) * kSampleChunk);
      const V factor(s[i / n_chunks]);
      for (int64_t j = 0; j < len; j += S::kWidth) {
        const int64_t count = std::min(S::kWidth, len - j);
        S v = S::load(x + start + j, count);
        for (auto& part : v.part) part = part * factor;
        v.store(y + start + j, count);
      }
    }
  });
}

at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void bias_act(const at::Tensor& x, const at::Tensor& b, const at::Tensor& y,
                       const Layout& layout, const ActParams& act) {
  const at::Tensor bias = b.defined() ? b.to(compute_type(x)).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_act", [&] {
    bias_act_kernel<scalar_t>(x.const_data_ptr<scalar_t>(),
                              bias.defined() ? bias.const_data_ptr<Acc<scalar_t>>() : nullptr,
                              y.mutable_data_ptr<scalar_t>(), layout, act);
  });
}

void bias_act_grad(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& dx,
                            const at::Tensor& db, const Layout& layout, const ActParams& act) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "bias_act_grad",
                                  [&] {
    bias_act_grad_kernel<scalar_t>(dy.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                                   dx.mutable_data_ptr<scalar_t>(),
                                   db.defined() ? db.mutable_data_ptr<scalar_t>() : nullptr,
                                   layout, act);
  });
}

void per_sample_dot(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out,
                             int64_t n, int64_t per_sample) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "per_sample_dot",
                                  [&] {
    per_sample_dot_kernel<scalar_t>(a.const_data_ptr<scalar_t>(),
                                    b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                                    out.mutable_data_ptr<Acc<scalar_t>>(), n, per_sample);
  });
}

void scale_per_sample(const at::Tensor& x, const at::Tensor& s, const at::Tensor& y,
                               int64_t n, int64_t per_sample) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "scale_per_sample", [&] {
    scale_per_sample_kernel<scalar_t>(x.const_data_ptr<scalar_t>(),
                                      s.const_data_ptr<Acc<scalar_t>>(),
                                      y.mutable_data_ptr<scalar_t>(), n, per_sample);
  });
}

}  // namespace

}  // namespace fastgan::cpu

namespace fastgan {
const KernelSet cpu_kernels{&cpu::bias_act, &cpu::bias_act_grad, &cpu::per_sample_dot,
                            &cpu::scale_per_sample};
}  // namespace fastgan
