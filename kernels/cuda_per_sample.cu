// CUDA kernels of per_sample_dot and scale_per_sample (docs/design.md). Plain CUDA, no torch
// header. Sample k is the run of per_sample elements at k * per_sample.
#include "cuda_common.cuh"

namespace fastgan::gpu {
namespace {

constexpr int64_t kChunkUnit = kThreads * 8;  // chunks are multiples of this (and of packs)
constexpr int64_t kTargetItems = 2048;        // enough blocks to fill a GPU

// Item (k, chunk) sums a * b (a * a with SAME, reading a once) over its chunk of sample k into
// out[item].
template <typename T, int VEC, bool SAME>
__global__ void __launch_bounds__(kThreads)
    per_sample_dot_kernel(const T* __restrict__ a, const T* __restrict__ b,
                          Acc<T>* __restrict__ out, int64_t per_sample, int64_t chunk,
                          int64_t n_chunks, int64_t n_items) {
  using A = Acc<T>;
  __shared__ A shared[kThreads / 32];
  for (int64_t item = blockIdx.x; item < n_items; item += gridDim.x) {
    const int64_t sample = item / n_chunks;
    const int64_t start = (item - sample * n_chunks) * chunk;
    const int64_t begin = sample * per_sample + start;
    const int64_t end = sample * per_sample + min64(per_sample, start + chunk);
    A sum = 0;
    for (int64_t i = begin + threadIdx.x * VEC; i < end; i += kThreads * VEC) {
      const Pack<T, VEC> pa = load_pack<VEC>(a, i / VEC);
      if constexpr (SAME) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum += to_acc(pa.v[k]) * to_acc(pa.v[k]);
      } else {
        const Pack<T, VEC> pb = load_pack<VEC>(b, i / VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum += to_acc(pa.v[k]) * to_acc(pb.v[k]);
      }
    }
    sum = block_sum(sum, shared);
    if (threadIdx.x == 0) out[item] = sum;
  }
}

// out[k] = the sum of partial[k * n_chunks : (k + 1) * n_chunks], in a fixed order.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    sum_chunks_kernel(const A* __restrict__ partial, A* __restrict__ out, int64_t n,
                      int64_t n_chunks) {
  __shared__ A shared[kThreads / 32];
  for (int64_t sample = blockIdx.x; sample < n; sample += gridDim.x) {
    A sum = 0;
    for (int64_t k = threadIdx.x; k < n_chunks; k += kThreads) {
      sum += partial[sample * n_chunks + k];
    }
    sum = block_sum(sum, shared);
    if (threadIdx.x == 0) out[sample] = sum;
  }
}

// Packs never cross samples: VEC divides per_sample.
template <typename T, int VEC, typename Index>
__global__ void __launch_bounds__(kThreads)
    scale_per_sample_kernel(const T* __restrict__ x, const Acc<T>* __restrict__ s,
                            T* __restrict__ y, int64_t n_packs, Index per_sample) {
  for (int64_t p = blockIdx.x * int64_t(kThreads) + threadIdx.x; p < n_packs;
       p += int64_t(gridDim.x) * kThreads) {
    const Pack<T, VEC> in = load_pack<VEC>(x, p);
    const Acc<T> factor = s[Index(p * VEC) / per_sample];  // one sample per pack
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) out.v[k] = from_acc<T>(to_acc(in.v[k]) * factor);
    store_pack<VEC>(y, p, out);
  }
}

// Chunks per sample: about kTargetItems items in all, each a multiple of kChunkUnit.
struct Chunking {
  int64_t chunk, n_chunks;
};

Chunking chunking(int64_t n, int64_t per_sample) {
  const int64_t max_chunks = ceil_div(per_sample, kChunkUnit);
  const int64_t wanted = min64(max_chunks, ceil_div(kTargetItems, n));
  const int64_t chunk = ceil_div(ceil_div(per_sample, wanted), kChunkUnit) * kChunkUnit;
  return {chunk, ceil_div(per_sample, chunk)};
}

}  // namespace

size_t per_sample_dot_workspace_bytes(DType dtype, int64_t n, int64_t per_sample) {
  const Chunking c = chunking(n, per_sample);
  return c.n_chunks == 1 ? 0 : n * c.n_chunks * acc_size(dtype);
}

cudaError_t launch_per_sample_dot(DType dtype, const void* a, const void* b, void* out,
                                  void* workspace, int64_t n, int64_t per_sample,
                                  cudaStream_t stream) {
  const Chunking c = chunking(n, per_sample);
  return dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    using A = Acc<T>;
    // With one chunk per sample the first stage writes the result.
    A* partial = static_cast<A*>(c.n_chunks == 1 ? out : workspace);
    const int64_t n_items = n * c.n_chunks;
    const bool packed =
        per_sample % kVec<T> == 0 && aligned16(a) && (b == nullptr || aligned16(b));
    with_pack_size<T>(packed, [&](auto pack) {
      constexpr int VEC = decltype(pack)::value;
      const T* a_t = static_cast<const T*>(a);
      if (b == nullptr) {
        per_sample_dot_kernel<T, VEC, true><<<grid_size(n_items), kThreads, 0, stream>>>(
            a_t, a_t, partial, per_sample, c.chunk, c.n_chunks, n_items);
      } else {
        per_sample_dot_kernel<T, VEC, false><<<grid_size(n_items), kThreads, 0, stream>>>(
            a_t, static_cast<const T*>(b), partial, per_sample, c.chunk, c.n_chunks, n_items);
      }
    });
    if (c.n_chunks > 1) {
      sum_chunks_kernel<A><<<grid_size(n), kThreads, 0, stream>>>(
          partial, static_cast<A*>(out), n, c.n_chunks);
    }
  });
}

cudaError_t launch_scale_per_sample(DType dtype, const void* x, const void* s, void* y,
                                    int64_t n, int64_t per_sample, cudaStream_t stream) {
  const int64_t numel = n * per_sample;
  return dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    const bool packed = per_sample % kVec<T> == 0 && aligned16(x) && aligned16(y);
    with_pack_size<T>(packed, [&](auto pack) {
      constexpr int VEC = decltype(pack)::value;
      with_index_type(numel, [&](auto index) {
        using Index = decltype(index);
        const int64_t n_packs = numel / VEC;
        scale_per_sample_kernel<T, VEC, Index><<<grid_size(ceil_div(n_packs, kThreads)),
                                                 kThreads, 0, stream>>>(
            static_cast<const T*>(x), static_cast<const Acc<T>*>(s), static_cast<T*>(y),
            n_packs, Index(per_sample));
      });
    });
  });
}

}  // namespace fastgan::gpu
