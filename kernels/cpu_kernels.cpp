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

// exp(z) - 1 and tanh(z). In float32 from Sleef's exp, which takes a third of the time of its
// expm1 and tanh here: exp(z) - 1 and (1 - e) / (1 + e) with e = exp(-2|z|), and near 0, where
// those would cancel, their Taylor polynomials (to z^6 and z^9; the first term left out is
// below 2e-8 of the result for |z| < 1/4): a few ulp everywhere. Float64 keeps Sleef's.
template <typename A>
Vectorized<A> expm1(Vectorized<A> z) {
  using V = Vectorized<A>;
  if constexpr (std::is_same_v<A, double>) {
    return z.expm1();
  } else {
    const V poly = V(1.f / 2) + z * (V(1.f / 6) + z * (V(1.f / 24) + z * (V(1.f / 120) +
                                                                      z * V(1.f / 720))));
    const V near0 = z + z * z * poly;
    return V::blendv(z.exp() - V(1.f), near0, z.abs() < V(0.25f));
  }
}

template <typename A>
Vectorized<A> tanh(Vectorized<A> z) {
  using V = Vectorized<A>;
  if constexpr (std::is_same_v<A, double>) {
    return z.tanh();
  } else {
    const V a = z.abs();
    const V e = (a * V(-2.f)).exp();
    const V far = (V(1.f) - e) / (V(1.f) + e);
    const V z2 = z * z;
    const V poly =
        V(-1.f / 3) + z2 * (V(2.f / 15) + z2 * (V(-17.f / 315) + z2 * V(62.f / 2835)));
    const V near0 = z + z * z2 * poly;
    return V::blendv(V::blendv(far, far.neg(), z < V(0.f)), near0, a < V(0.25f));
  }
}

// The activation of fastgan/ops/activation.py (activate, activation_grad,
// activation_grad_from_input) on vectors, as torch computes it for fastgan.reference.
template <typename A>
struct VecAct {
  using V = Vectorized<A>;
  int64_t act;
  bool use_clamp;
  V alpha, gain, clamp, neg_clamp, scale, zero, one;
  // torch's F.selu (scale, and scale * alpha for z <= 0) and F.softplus (fastgan.reference)
  V selu_scale, selu_neg, softplus_threshold;

  explicit VecAct(const ActParams& p)
      : act(p.act), use_clamp(p.clamp >= 0), alpha(A(p.alpha)), gain(A(p.gain)),
        clamp(A(p.clamp)), neg_clamp(A(-p.clamp)), scale(A(p.scale)), zero(A(0)), one(A(1)),
        selu_scale(A(kSeluScale)), selu_neg(A(kSeluScale * kSeluAlpha)),
        softplus_threshold(A(kSoftplusThreshold)) {}

  // 1 / (1 + exp(-z)) without overflow: exp(-|z|) only.
  V sigmoid(V z) const {
    const V e = z.abs().neg().exp();
    const V r = one / (one + e);
    return V::blendv(e * r, r, z >= zero);
  }

  // act(z) * gain, unclamped; kCurved: act is a curved one (kTanh on), else linear, relu or
  // lrelu (so that their loops hold no code of the others).
  template <bool kCurved>
  V unclamped(V z) const {
    if constexpr (kCurved) {
      z = curved(z);
    } else if (act == kRelu) {
      z = V::blendv(z, zero, z < zero);
    } else if (act == kLrelu) {
      z = V::blendv(z, z * alpha, z < zero);
    }
    return z * gain;
  }

  V curved(V z) const {
    switch (act) {
      case kTanh:
        return tanh(z);
      case kSigmoid:
        return sigmoid(z);
      case kElu:
        return V::blendv(z, expm1(z), z <= zero);
      case kSelu:
        return V::blendv(z * selu_scale, expm1(z) * selu_neg, z <= zero);
      case kSoftplus:
        return V::blendv(z.exp().log1p(), z, z > softplus_threshold);
      case kSwish:
        return sigmoid(z) * z;
    }
    return z;
  }

  // clamp(act(z) * gain); NaN stays NaN.
  template <bool kCurved>
  V forward(V z) const {
    V y = unclamped<kCurved>(z);
    if (use_clamp) {
      const V saturated = V::blendv(V::blendv(y, clamp, y > zero), neg_clamp, y < zero);
      y = V::blendv(saturated, y, y.abs() < clamp);
    }
    return y;
  }

  // dy * gain where |y| < clamp, exactly 0 elsewhere (also for inf/NaN dy).
  V masked_gain(V dy, V y) const {
    if (use_clamp) dy = V::blendv(zero, dy, y.abs() < clamp);
    return dy * gain;
  }

  // dL/dz from dy and the output y (linear, relu, lrelu); exactly 0 where the slope is 0,
  // even for inf/NaN dy.
  V grad(V dy, V y) const {
    V g = masked_gain(dy, y);
    if (act == kRelu) {
      g = V::blendv(zero, g, y != zero);
    } else if (act == kLrelu) {
      g = V::blendv(g * alpha, g, y * gain > zero);
    }
    return g;
  }

  // dL/dz from dy and the pre-activation z (the curved activations), in the order torch's
  // autograd computes it; y, the output as stored, for the clamp mask.
  V grad_from_input(V dy, V z, V y) const {
    const V g = masked_gain(dy, y);
    switch (act) {
      case kTanh: {
        const V t = tanh(z);
        return g * (one - t * t);
      }
      case kSigmoid: {
        const V s = sigmoid(z);
        return g * (one - s) * s;
      }
      case kElu:  // NaN takes the exp branch, as in torch's vectorized kernel
        return V::blendv(g * z.exp(), g, z > zero);
      case kSelu:
        return V::blendv(g * selu_neg * z.exp(), g * selu_scale, z > zero);
      case kSoftplus: {
        const V e = z.exp();
        return V::blendv(g * e / (e + one), g, z > softplus_threshold);
      }
      case kSwish: {
        const V s = sigmoid(z);
        return g * s + g * z * (one - s) * s;
      }
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

// z = x * scale + b of a tiling's elements: b per row (rows of one channel) or per column
// (periodic rows); bias null: none.
template <typename T>
struct PreActivation {
  using S = Step<T>;
  using A = Acc<T>;
  using V = typename S::V;
  const A* bias;
  bool periodic;
  V scale;
  std::vector<A> row_bias;  // periodic rows: the bias of each column

  PreActivation(const A* bias, const Layout& l, const Tiling& t, double scale)
      : bias(bias), periodic(t.periodic), scale(A(scale)),
        row_bias(bias && t.periodic ? periodic_bias<T>(bias, l, t) : std::vector<A>()) {}

  // The bias of a row of channel `channel` (rows of one channel; periodic rows: unused).
  V channel_bias(int64_t channel) const { return V(bias && !periodic ? bias[channel] : A(0)); }

  // x, the step at column j of a row whose channel_bias() is `row`, becomes z.
  void apply(S& x, V row, int64_t j) const {
    for (int k = 0; k < S::kParts; ++k) {
      x.part[k] = x.part[k] * scale;
      if (bias) {
        x.part[k] = x.part[k] + (periodic ? V::loadu(row_bias.data() + j + k * V::size()) : row);
      }
    }
  }
};

template <typename T, bool kCurved>
void bias_act_kernel(const T* x, const Acc<T>* bias, T* y, const Layout& l,
                     const ActParams& p) {
  using S = Step<T>;
  const Tiling t = make_tiling(l);
  const VecAct<Acc<T>> act(p);
  const PreActivation<T> pre(bias, l, t, p.scale);
  for_each_item(t, [&](const Item& item) {
    for (int64_t r = item.r0; r < item.r1; ++r) {
      const int64_t offset = r * t.cols;
      const int64_t end = std::min(item.c1, t.numel - offset);
      const auto row = pre.channel_bias(r % l.chan);
      for (int64_t j = item.c0; j < end; j += S::kWidth) {
        const int64_t count = std::min(S::kWidth, end - j);
        S v = S::load(x + offset + j, count);
        pre.apply(v, row, j);
        for (auto& part : v.part) part = act.template forward<kCurved>(part);
        v.store(y + offset + j, count);
      }
    }
  });
}

// dx = dx_scale * dz, db = sum of dz per channel (db null: not wanted), with
// dz_of(g, channel, at, j, count) turning g, the step of dy at column j of a row of channel
// `channel` (rows of one channel; flat offset at; count valid elements, zeros after them), into
// dz. Stage 1 writes one sum per (item, row) (rows of a channel) or per (item, column)
// (periodic rows); stage 2 adds them per channel in a fixed order.
template <typename T, typename DzOf>
void grad_kernel(const T* dy, T* dx, T* db, const Layout& l, const Tiling& t, double dx_scale,
                 const DzOf& dz_of) {
  using S = Step<T>;
  using A = Acc<T>;
  using V = typename S::V;
  const V scale(static_cast<A>(dx_scale));
  const int64_t n_row_items = ceil_div(t.rows, t.item_rows);
  // periodic: [n_row_items, cols]; rows of a channel: [n_col_items, rows]
  std::vector<A> partial(db == nullptr ? 0 : t.periodic ? n_row_items * t.cols
                                                         : t.n_col_items * t.rows);
  for_each_item(t, [&](const Item& item) {
    std::vector<A> col_sums(db != nullptr && t.periodic ? item.c1 - item.c0 + S::kWidth : 0);
    for (int64_t r = item.r0; r < item.r1; ++r) {
      const int64_t offset = r * t.cols;
      const int64_t end = std::min(item.c1, t.numel - offset);
      const int64_t channel = r % l.chan;
      V row_sums[S::kParts];
      for (auto& v : row_sums) v = V(A(0));
      for (int64_t j = item.c0; j < end; j += S::kWidth) {
        const int64_t count = std::min(S::kWidth, end - j);
        S g = S::load(dy + offset + j, count);  // zeros past `count` give dz == 0
        dz_of(g, channel, offset + j, j, count);
        for (int k = 0; k < S::kParts; ++k) {
          if (db != nullptr && t.periodic) {
            A* sums = col_sums.data() + (j - item.c0) + k * V::size();
            (V::loadu(sums) + g.part[k]).store(sums);
          } else if (db != nullptr) {
            row_sums[k] = row_sums[k] + g.part[k];
          }
          g.part[k] = g.part[k] * scale;
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

template <typename T>
void bias_act_grad_kernel(const T* dy, const T* y, T* dx, T* db, const Layout& l,
                          const ActParams& p) {
  using S = Step<T>;
  const VecAct<Acc<T>> act(p);
  grad_kernel<T>(dy, dx, db, l, make_tiling(l), p.scale,
                 [&](S& g, int64_t, int64_t at, int64_t, int64_t count) {
                   const S out = S::load(y + at, count);
                   for (int k = 0; k < S::kParts; ++k) {
                     g.part[k] = act.grad(g.part[k], out.part[k]);
                   }
                 });
}

template <typename T>
void bias_act_grad_from_input_kernel(const T* dy, const T* x, const Acc<T>* bias, T* dx, T* db,
                                     const Layout& l, const ActParams& p, bool scale_dx) {
  using S = Step<T>;
  const Tiling t = make_tiling(l);
  const VecAct<Acc<T>> act(p);
  const PreActivation<T> pre(bias, l, t, p.scale);
  grad_kernel<T>(dy, dx, db, l, t, scale_dx ? p.scale : 1.0,
                 [&](S& g, int64_t channel, int64_t at, int64_t j, int64_t count) {
                   S z = S::load(x + at, count);
                   pre.apply(z, pre.channel_bias(channel), j);
                   S y = z;
                   if (act.use_clamp) {  // the output as bias_act stores it: its mask
                     for (int k = 0; k < S::kParts; ++k) {
                       y.part[k] = act.template unclamped<true>(z.part[k]);
                     }
                     y = y.rounded();
                   }
                   for (int k = 0; k < S::kParts; ++k) {
                     g.part[k] = act.grad_from_input(g.part[k], z.part[k], y.part[k]);
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

// b (undefined: none) contiguous in the compute type of x.
at::Tensor compute_bias(const at::Tensor& b, const at::Tensor& x) {
  return b.defined() ? b.to(compute_type(x)).contiguous() : at::Tensor();
}

template <typename T>
const Acc<T>* bias_data(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<Acc<T>>() : nullptr;
}

void bias_act(const at::Tensor& x, const at::Tensor& b, const at::Tensor& y,
                       const Layout& layout, const ActParams& act) {
  const at::Tensor bias = compute_bias(b, x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_act", [&] {
    const auto kernel = act.act >= kTanh ? &bias_act_kernel<scalar_t, true>
                                         : &bias_act_kernel<scalar_t, false>;
    kernel(x.const_data_ptr<scalar_t>(), bias_data<scalar_t>(bias),
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

void bias_act_grad_from_input(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& b,
                              const at::Tensor& dx, const at::Tensor& db, const Layout& layout,
                              const ActParams& act, bool scale_dx) {
  const at::Tensor bias = compute_bias(b, x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(),
                                  "bias_act_grad_from_input", [&] {
    bias_act_grad_from_input_kernel<scalar_t>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        bias_data<scalar_t>(bias), dx.mutable_data_ptr<scalar_t>(),
        db.defined() ? db.mutable_data_ptr<scalar_t>() : nullptr, layout, act, scale_dx);
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
                            &cpu::scale_per_sample, &cpu::bias_act_grad_from_input};
}  // namespace fastgan
