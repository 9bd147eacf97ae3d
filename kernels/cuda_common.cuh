// Device helpers shared by the CUDA kernels: compute types, 16-byte packs, the activation and
// its gradient (fastgan/ops/activation.py), a deterministic block sum, dtype dispatch.
// Plain CUDA: no torch header (docs/design.md).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "common.h"
#include "cuda_kernels.h"

namespace fastgan::gpu {

constexpr int kThreads = 256;  // threads per block of every kernel
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grids loop over work beyond this

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using Acc = typename AccOf<T>::type;  // float32, float64 for float64

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(Acc<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements per 16-byte load.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Pack number `index` of N elements from p (p + index * N must be N-element aligned).
template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p, int64_t index) {
  return reinterpret_cast<const Pack<T, N>*>(p)[index];
}
template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, int64_t index, const Pack<T, N>& pack) {
  reinterpret_cast<Pack<T, N>*>(p)[index] = pack;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

inline unsigned grid_size(int64_t blocks) {
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

template <typename A>
__device__ __forceinline__ A abs_value(A v) {  // NaN stays NaN
  return v < A(0) ? -v : v;
}

// The activation of fastgan/ops/activation.py with its parameters in the compute type A.
template <typename A>
struct DeviceAct {
  int act;
  bool use_clamp;
  A alpha, gain, clamp, scale;

  __host__ explicit DeviceAct(const ActParams& p)
      : act(static_cast<int>(p.act)), use_clamp(p.clamp >= 0), alpha(A(p.alpha)),
        gain(A(p.gain)), clamp(A(p.clamp)), scale(A(p.scale)) {}

  // clamp(act(z) * gain); NaN stays NaN.
  __device__ __forceinline__ A forward(A z) const {
    if (act == kRelu) {
      z = z < A(0) ? A(0) : z;
    } else if (act == kLrelu) {
      z = z < A(0) ? z * alpha : z;
    }
    A y = z * gain;
    if (use_clamp && !(abs_value(y) < clamp)) y = y < A(0) ? -clamp : (y > A(0) ? clamp : y);
    return y;
  }

  // dL/dz from dy and the output y; exactly 0 where the slope is 0, even for inf/NaN dy.
  __device__ __forceinline__ A grad(A dy, A y) const {
    A g = dy;
    if (use_clamp && !(abs_value(y) < clamp)) g = A(0);
    g = g * gain;
    if (act == kRelu) {
      g = y != A(0) ? g : A(0);
    } else if (act == kLrelu) {
      g = y * gain > A(0) ? g : g * alpha;
    }
    return g;
  }
};

// Sum of v over the kThreads threads of a 1-D block, in a fixed tree order; the result is in
// thread 0. `shared` holds kThreads / 32 values; safe to call again right after.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* shared) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? shared[lane] : A(0);
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  __syncthreads();
  return v;
}

// Calls launch(T()) with T the element type of dtype; returns cudaGetLastError().
template <typename F>
cudaError_t dispatch(DType dtype, const F& launch) {
  switch (dtype) {
    case DType::kFloat16:
      launch(__half());
      break;
    case DType::kBFloat16:
      launch(__nv_bfloat16());
      break;
    case DType::kFloat32:
      launch(float());
      break;
    case DType::kFloat64:
      launch(double());
      break;
  }
  return cudaGetLastError();
}

// Calls f(std::integral_constant<int, N>()) with N = kVec<T> (16-byte packs) when `vectorized`,
// else N = 1.
template <typename T, typename F>
void with_pack_size(bool vectorized, const F& f) {
  if (vectorized) {
    f(std::integral_constant<int, kVec<T>>());
  } else {
    f(std::integral_constant<int, 1>());
  }
}

// Calls f(Index()) with the narrowest index type that holds offsets below `numel`: divisions
// in int32 are several times cheaper than in int64.
template <typename F>
void with_index_type(int64_t numel, const F& f) {
  if (numel <= INT32_MAX) {
    f(int32_t());
  } else {
    f(int64_t());
  }
}

inline size_t acc_size(DType dtype) {
  return dtype == DType::kFloat64 ? sizeof(double) : sizeof(float);
}

}  // namespace fastgan::gpu
