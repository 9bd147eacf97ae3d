// The fastgan operator library: schemas, argument checks, dense layouts and output
// allocation, and the CPU (always) and CUDA (FASTGAN_WITH_CUDA) registrations. The semantics
// are fastgan.reference's (docs/design.md); the fake kernels are registered from Python
// (fastgan/ext.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "ops.h"

namespace fastgan {
namespace {

void check_float(const at::Tensor& t, const char* name) {
  const auto type = t.scalar_type();
  TORCH_CHECK_TYPE(type == at::kHalf || type == at::kBFloat16 || type == at::kFloat ||
                       type == at::kDouble,
                   name, " must be float16, bfloat16, float32 or float64, got ", type);
}

void check_rank(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() >= 1, name, " must have at least one dimension, got a 0-d tensor");
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device(), "; expected the same device");
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(),
                   " but ", ref_name, " has ", ref.scalar_type(), "; expected the same dtype");
}

void check_same_shape(const at::Tensor& t, const char* name, const at::Tensor& ref,
                      const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, " has shape ", t.sizes(), " but ", ref_name,
                    " has shape ", ref.sizes(), "; expected the same shape");
}

int64_t normalize_dim(int64_t dim, int64_t ndim) {
  TORCH_CHECK_INDEX(-ndim <= dim && dim < ndim, "dim=", dim,
                    " is out of range for a tensor of rank ", ndim, "; expected ", -ndim,
                    " <= dim < ", ndim);
  return dim < 0 ? dim + ndim : dim;
}

// The last activation code the kernels of K compute: every one on CPU; the CUDA kernels compute
// linear, relu and lrelu (fastgan runs the others on its Triton kernels there).
template <const KernelSet& K>
constexpr int64_t kLastAct = kSwish;
#ifdef FASTGAN_WITH_CUDA
template <>
constexpr int64_t kLastAct<cuda_kernels> = kLrelu;
#endif

// "0 (linear), 1 (relu) or 2 (lrelu)": the codes from `first` to `last` with their names.
std::string act_codes(int64_t first, int64_t last) {
  static const char* const names[] = {"linear", "relu", "lrelu", "tanh", "sigmoid",
                                      "elu", "selu", "softplus", "swish"};
  std::string text;
  for (int64_t code = first; code <= last; ++code) {
    if (code > first) text += code == last ? " or " : ", ";
    text += std::to_string(code) + " (" + names[code] + ")";
  }
  return text;
}

// The activation's parameters, checked; act must be a code from `first` to `last` (`note`
// says why in the error).
ActParams check_act(int64_t act, double alpha, double gain, double clamp, double scale,
                    int64_t first, int64_t last, const char* note) {
  TORCH_CHECK_VALUE(act >= first && act <= last, "act must be ", act_codes(first, last), note,
                    ", got ", act);
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha >= 0,
                    "alpha must be a finite number >= 0, got ", alpha);
  TORCH_CHECK_VALUE(std::isfinite(gain), "gain must be a finite number, got ", gain);
  TORCH_CHECK_VALUE(!std::isnan(clamp),
                    "clamp must be a number >= 0, or negative for no clamp, got ", clamp);
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be a finite number, got ", scale);
  return {act, alpha, gain, clamp, scale};
}

at::ScalarType compute_type(at::ScalarType type) {
  return type == at::kDouble ? at::kDouble : at::kFloat;
}

// Dims from outermost to innermost in memory when a tensor of these sizes and strides is dense
// in that order (no gaps, no overlap; dims of size 1 are free), else empty. The same rule as
// fastgan/ops/layout.py's _dense_order, so that the outputs match the fake kernels' strides.
std::vector<int64_t> dense_order(at::IntArrayRef sizes, at::IntArrayRef strides) {
  std::vector<int64_t> order(sizes.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    if (strides[a] != strides[b]) return strides[a] > strides[b];
    if (sizes[a] != sizes[b]) return sizes[a] > sizes[b];
    return a < b;
  });
  int64_t expected = 1;
  for (auto it = order.rbegin(); it != order.rend(); ++it) {
    if (sizes[*it] != 1 && strides[*it] != expected) return {};
    expected *= sizes[*it];
  }
  return order;
}

struct DenseView {
  at::Tensor tensor;  // x itself when dense, else a contiguous copy
  Layout layout;
};

// x as [outer, chan, inner] in memory order with chan = x.size(dim) (as_outer_chan_inner).
DenseView dense_view(const at::Tensor& x, int64_t dim) {
  std::vector<int64_t> order = dense_order(x.sizes(), x.strides());
  at::Tensor dense = x;
  if (order.empty()) {
    dense = x.contiguous();
    order.resize(x.dim());
    std::iota(order.begin(), order.end(), 0);
  }
  Layout layout{1, x.size(dim), 1};
  const auto pos = std::find(order.begin(), order.end(), dim) - order.begin();
  for (int64_t i = 0; i < static_cast<int64_t>(order.size()); ++i) {
    if (i < pos) layout.outer *= x.size(order[i]);
    if (i > pos) layout.inner *= x.size(order[i]);
  }
  return {dense, layout};
}

// x dense with each sample (index along dim 0) one contiguous run (_per_sample_view).
at::Tensor per_sample_view(const at::Tensor& x) {
  DenseView view = dense_view(x, 0);
  return view.layout.outer == 1 ? view.tensor : x.contiguous();
}

at::Tensor empty_like_dense(const at::Tensor& dense, at::ScalarType type) {
  return at::empty_strided(dense.sizes(), dense.strides(), dense.options().dtype(type));
}

// t with exactly the strides of the dense tensor ref: t itself, or a copy (like_layout).
at::Tensor like_layout(const at::Tensor& t, const at::Tensor& ref) {
  if (t.strides() == ref.strides()) return t;
  return empty_like_dense(ref, t.scalar_type()).copy_(t);
}

// b checked against x (dim normalized) and made contiguous; undefined for no bias.
at::Tensor checked_bias(const std::optional<at::Tensor>& b, const at::Tensor& x, int64_t dim) {
  if (!b.has_value() || !b->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == x.size(dim),
                    "b must be a 1-d tensor of length x.shape[", dim, "] = ", x.size(dim),
                    ", got shape ", b->sizes());
  check_like(*b, "b", x, "x");
  return b->contiguous();
}

// dx in the layout of `view` and db ([chan], if need_db) for dy, as run(dy_dense, dx, db)
// writes them (not called for empty tensors: db is then zero).
template <typename Run>
std::tuple<at::Tensor, std::optional<at::Tensor>> gradients(const DenseView& view,
                                                            const at::Tensor& dy, bool need_db,
                                                            const Run& run) {
  const at::Tensor dy_dense = like_layout(dy, view.tensor);  // a copy when strides differ
  at::Tensor dx = empty_like_dense(view.tensor, dy.scalar_type());
  std::optional<at::Tensor> db;
  if (need_db) db = at::empty({view.layout.chan}, dy.options());
  if (dx.numel() > 0) {
    run(dy_dense, dx, need_db ? *db : at::Tensor());
  } else if (need_db) {
    db->zero_();
  }
  return {dx, db};
}

template <const KernelSet& K>
at::Tensor bias_act(const at::Tensor& x, const std::optional<at::Tensor>& b, int64_t dim,
                    int64_t act, double alpha, double gain, double clamp, double scale) {
  check_float(x, "x");
  check_rank(x, "x");
  dim = normalize_dim(dim, x.dim());
  const ActParams params = check_act(act, alpha, gain, clamp, scale, kLinear, kLastAct<K>,
                                     kLastAct<K> < kSwish ? " for CUDA tensors" : "");
  const at::Tensor bias = checked_bias(b, x, dim);
  const DenseView view = dense_view(x, dim);
  at::Tensor y = empty_like_dense(view.tensor, x.scalar_type());
  if (y.numel() > 0) K.bias_act(view.tensor, bias, y, view.layout, params);
  return y;
}

// The tensors of a gradient op checked: dy like t (the saved y or x, named t_name); returns
// dim normalized.
int64_t check_grad_tensors(const at::Tensor& dy, const at::Tensor& t, const char* t_name,
                           int64_t dim) {
  check_float(dy, "dy");
  check_float(t, t_name);
  check_rank(t, t_name);
  check_same_shape(dy, "dy", t, t_name);
  check_like(dy, "dy", t, t_name);
  return normalize_dim(dim, t.dim());
}

template <const KernelSet& K>
std::tuple<at::Tensor, std::optional<at::Tensor>> bias_act_grad(
    const at::Tensor& dy, const at::Tensor& y, int64_t dim, int64_t act, double alpha,
    double gain, double clamp, double scale, bool need_db) {
  dim = check_grad_tensors(dy, y, "y", dim);
  const ActParams params = check_act(act, alpha, gain, clamp, scale, kLinear, kLrelu,
                                     " (the others' gradient is bias_act_grad_from_input)");
  const DenseView view = dense_view(y, dim);
  return gradients(view, dy, need_db, [&](const at::Tensor& dy_dense, const at::Tensor& dx,
                                          const at::Tensor& db) {
    K.bias_act_grad(dy_dense, view.tensor, dx, db, view.layout, params);
  });
}

template <const KernelSet& K>
std::tuple<at::Tensor, std::optional<at::Tensor>> bias_act_grad_from_input(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& b, int64_t dim,
    int64_t act, double alpha, double gain, double clamp, double scale, bool scale_dx,
    bool need_db) {
  dim = check_grad_tensors(dy, x, "x", dim);
  const ActParams params = check_act(act, alpha, gain, clamp, scale, kTanh, kSwish,
                                     " (the others' gradient is bias_act_grad)");
  const at::Tensor bias = checked_bias(b, x, dim);
  const DenseView view = dense_view(x, dim);
  return gradients(view, dy, need_db, [&](const at::Tensor& dy_dense, const at::Tensor& dx,
                                          const at::Tensor& db) {
    K.bias_act_grad_from_input(dy_dense, view.tensor, bias, dx, db, view.layout, params,
                               scale_dx);
  });
}

template <const KernelSet& K>
at::Tensor per_sample_dot(const at::Tensor& a, const at::Tensor& b) {
  check_float(a, "a");
  check_rank(a, "a");
  const bool same = a.is_same(b);
  if (!same) {
    check_float(b, "b");
    check_same_shape(b, "b", a, "a");
    check_like(b, "b", a, "a");
  }
  const at::Tensor a_view = per_sample_view(a);
  const int64_t n = a.size(0);
  const int64_t per_sample = n == 0 ? 0 : a.numel() / n;
  at::Tensor out = at::empty({n}, a.options().dtype(compute_type(a.scalar_type())));
  if (a.numel() == 0) return out.zero_();
  K.per_sample_dot(a_view, same ? at::Tensor() : like_layout(b, a_view), out, n, per_sample);
  return out;
}

template <const KernelSet& K>
at::Tensor scale_per_sample(const at::Tensor& x, const at::Tensor& s) {
  check_float(x, "x");
  check_rank(x, "x");
  TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble,
                   "s must be float32 or float64, got ", s.scalar_type());
  TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == x.size(0),
                    "s must be a 1-d tensor of length x.shape[0] = ", x.size(0), ", got shape ",
                    s.sizes());
  TORCH_CHECK_VALUE(s.device() == x.device(), "s is on ", s.device(), " but x is on ",
                    x.device(), "; expected the same device");
  const at::Tensor x_view = per_sample_view(x);
  at::Tensor y = empty_like_dense(x_view, x.scalar_type());
  if (y.numel() == 0) return y;
  const int64_t n = x.size(0);
  const at::Tensor s_compute = s.to(compute_type(x.scalar_type())).contiguous();
  K.scale_per_sample(x_view, s_compute, y, n, x.numel() / n);
  return y;
}

// The memory format of upfirdn2d's output: x's (layout.memory_format in fastgan/ops).
at::MemoryFormat memory_format(const at::Tensor& x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast) || x.stride(1) < x.stride(3)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// Output size along one axis: (in * up + pad0 + pad1 - taps) // down + 1, which must be >= 1.
int64_t resampled_size(int64_t in, int64_t up, int64_t pad0, int64_t pad1, int64_t down,
                       int64_t taps, const char* axis) {
  const int64_t span = in * up + pad0 + pad1;
  TORCH_CHECK_VALUE(span >= taps, "padding (", pad0, ", ", pad1, ") along ", axis, " leaves ",
                    span, " pixels of the upsampled input, fewer than the filter's ", taps,
                    " taps: the output would be empty");
  return (span - taps) / down + 1;
}

at::Tensor upfirdn2d(const at::Tensor& x, const std::optional<at::Tensor>& f, int64_t up_x,
                     int64_t up_y, int64_t down_x, int64_t down_y, int64_t pad_x0,
                     int64_t pad_x1, int64_t pad_y0, int64_t pad_y1, bool flip_filter,
                     double gain) {
  check_float(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-d [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK_VALUE(up_x >= 1 && up_y >= 1, "up must be >= 1, got (", up_x, ", ", up_y, ")");
  TORCH_CHECK_VALUE(down_x >= 1 && down_y >= 1, "down must be >= 1, got (", down_x, ", ",
                    down_y, ")");
  TORCH_CHECK_VALUE(std::isfinite(gain), "gain must be a finite number, got ", gain);
  at::Tensor filter;
  int64_t taps_y = 1, taps_x = 1;
  if (f.has_value() && f->defined()) {
    TORCH_CHECK_TYPE(f->scalar_type() == at::kFloat, "f must be float32, got ", f->scalar_type());
    TORCH_CHECK_VALUE((f->dim() == 1 || f->dim() == 2) && f->numel() > 0,
                      "f must be a non-empty 1-d (separable) or 2-d filter, got shape ",
                      f->sizes());
    TORCH_CHECK_VALUE(f->device() == x.device(), "f is on ", f->device(), " but x is on ",
                      x.device(), "; expected the same device");
    filter = f->contiguous();
    taps_y = f->size(0);
    taps_x = f->size(-1);
  }
  const int64_t oh = resampled_size(x.size(2), up_y, pad_y0, pad_y1, down_y, taps_y, "y");
  const int64_t ow = resampled_size(x.size(3), up_x, pad_x0, pad_x1, down_x, taps_x, "x");
  const at::MemoryFormat format = memory_format(x);
  at::Tensor y = at::empty({x.size(0), x.size(1), oh, ow}, x.options().memory_format(format));
  if (y.numel() == 0) return y;
  const Resampling geom{up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1,
                        taps_y, taps_x, flip_filter, gain};
  cpu_upfirdn2d(x.contiguous(format), filter, y, geom,
                format == at::MemoryFormat::ChannelsLast);
  return y;
}

template <const KernelSet& K>
void register_kernels(torch::Library& m) {
  m.impl("bias_act", &bias_act<K>);
  m.impl("bias_act_grad", &bias_act_grad<K>);
  m.impl("per_sample_dot", &per_sample_dot<K>);
  m.impl("scale_per_sample", &scale_per_sample<K>);
}

}  // namespace
}  // namespace fastgan

// Each op's fake kernel is registered by its Python op module (the ops defined after each
// set_python_module call).
TORCH_LIBRARY(fastgan, m) {
  m.set_python_module("fastgan.ops.bias_act");
  m.def("bias_act(Tensor x, Tensor? b, int dim, int act, float alpha, float gain, float clamp, "
        "float scale) -> Tensor");
  m.def("bias_act_grad(Tensor dy, Tensor y, int dim, int act, float alpha, float gain, "
        "float clamp, float scale, bool need_db) -> (Tensor dx, Tensor? db)");
  m.def("bias_act_grad_from_input(Tensor dy, Tensor x, Tensor? b, int dim, int act, "
        "float alpha, float gain, float clamp, float scale, bool scale_dx, bool need_db) -> "
        "(Tensor dx, Tensor? db)");
  m.set_python_module("fastgan.ops.grad_sq_norm");
  m.def("per_sample_dot(Tensor a, Tensor b) -> Tensor");
  m.def("scale_per_sample(Tensor x, Tensor s) -> Tensor");
  m.set_python_module("fastgan.ops.upfirdn2d");
  m.def("upfirdn2d(Tensor x, Tensor? f, int up_x, int up_y, int down_x, int down_y, "
        "int pad_x0, int pad_x1, int pad_y0, int pad_y1, bool flip_filter, float gain) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(fastgan, CPU, m) {
  fastgan::register_kernels<fastgan::cpu_kernels>(m);
  // CPU only: CUDA tensors run the Triton kernels (the CUDA kernels of bias_act keep linear,
  // relu and lrelu, ops.h)
  m.impl("upfirdn2d", &fastgan::upfirdn2d);
  m.impl("bias_act_grad_from_input", &fastgan::bias_act_grad_from_input<fastgan::cpu_kernels>);
}

#ifdef FASTGAN_WITH_CUDA
TORCH_LIBRARY_IMPL(fastgan, CUDA, m) {
  fastgan::register_kernels<fastgan::cuda_kernels>(m);
}
#endif
