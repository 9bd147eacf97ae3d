// The CUDA kernel set of ops.h: tensors to raw pointers, workspaces from PyTorch's caching
// allocator, the current stream of the tensors' device, launch errors to exceptions. Compiled
// only when torch has CUDA (FASTGAN_WITH_CUDA; docs/design.md).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda_kernels.h"
#include "ops.h"

namespace fastgan::gpu {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, "fastgan CUDA kernels take float16, bfloat16, float32 or float64, "
                       "got ", t.scalar_type());
  }
}

const void* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr() : nullptr;
}

at::Tensor workspace(const at::Tensor& like, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

void bias_act(const at::Tensor& x, const at::Tensor& b, const at::Tensor& y,
                       const Layout& layout, const ActParams& act) {
  const c10::cuda::CUDAGuard guard(x.device());
  C10_CUDA_CHECK(launch_bias_act(dtype_of(x), x.const_data_ptr(), data_or_null(b),
                                 y.mutable_data_ptr(), layout, act,
                                 c10::cuda::getCurrentCUDAStream()));
}

void bias_act_grad(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& dx,
                            const at::Tensor& db, const Layout& layout, const ActParams& act) {
  const c10::cuda::CUDAGuard guard(y.device());
  const DType dtype = dtype_of(dy);
  const at::Tensor space =
      db.defined() ? workspace(dy, bias_act_grad_workspace_bytes(dtype, layout)) : at::Tensor();
  C10_CUDA_CHECK(launch_bias_act_grad(
      dtype, dy.const_data_ptr(), y.const_data_ptr(), dx.mutable_data_ptr(),
      db.defined() ? db.mutable_data_ptr() : nullptr,
      space.defined() ? space.mutable_data_ptr() : nullptr, layout, act,
      c10::cuda::getCurrentCUDAStream()));
}

void per_sample_dot(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out,
                             int64_t n, int64_t per_sample) {
  const c10::cuda::CUDAGuard guard(a.device());
  const DType dtype = dtype_of(a);
  const at::Tensor space = workspace(a, per_sample_dot_workspace_bytes(dtype, n, per_sample));
  C10_CUDA_CHECK(launch_per_sample_dot(dtype, a.const_data_ptr(), data_or_null(b),
                                       out.mutable_data_ptr(), space.mutable_data_ptr(), n,
                                       per_sample, c10::cuda::getCurrentCUDAStream()));
}

void scale_per_sample(const at::Tensor& x, const at::Tensor& s, const at::Tensor& y,
                               int64_t n, int64_t per_sample) {
  const c10::cuda::CUDAGuard guard(x.device());
  C10_CUDA_CHECK(launch_scale_per_sample(dtype_of(x), x.const_data_ptr(), s.const_data_ptr(),
                                         y.mutable_data_ptr(), n, per_sample,
                                         c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

}  // namespace fastgan::gpu

namespace fastgan {
const KernelSet cuda_kernels{&gpu::bias_act, &gpu::bias_act_grad, &gpu::per_sample_dot,
                             &gpu::scale_per_sample};
}  // namespace fastgan
