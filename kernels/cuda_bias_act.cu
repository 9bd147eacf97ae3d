// CUDA kernels of bias_act and bias_act_grad (docs/design.md). Plain CUDA, no torch header.
//
// The elementwise kernels loop over 16-byte packs of the flat tensor (single elements when
// the size or the pointers' alignment do not allow packs). The bias gradient is two stages:
// per-item sums of dz into a workspace, then one fixed-order sum per channel.
#include "cuda_common.cuh"

namespace fastgan::gpu {
namespace {

// Channel of flat element i of an [outer, chan, inner] tensor, advanced element by element
// without division.
template <typename Index>
struct ChannelCursor {
  Index chan, inner, c, col;

  __device__ ChannelCursor(Index i, Index chan_, Index inner_) : chan(chan_), inner(inner_) {
    const Index row = i / inner;
    col = i - row * inner;
    c = row % chan;
  }
  __device__ void next() {
    if (++col == inner) {
      col = 0;
      if (++c == chan) c = 0;
    }
  }
};

template <typename T, int VEC, typename Index>
__global__ void __launch_bounds__(kThreads)
    bias_act_kernel(const T* __restrict__ x, const T* __restrict__ b, T* __restrict__ y,
                    int64_t n_packs, Index chan, Index inner, DeviceAct<Acc<T>> act) {
  for (int64_t p = blockIdx.x * int64_t(kThreads) + threadIdx.x; p < n_packs;
       p += int64_t(gridDim.x) * kThreads) {
    const Pack<T, VEC> in = load_pack<VEC>(x, p);
    Pack<T, VEC> out;
    if (b == nullptr) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        out.v[k] = from_acc<T>(act.forward(to_acc(in.v[k]) * act.scale));
      }
    } else {
      ChannelCursor<Index> cursor(Index(p * VEC), chan, inner);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        out.v[k] = from_acc<T>(act.forward(to_acc(in.v[k]) * act.scale + to_acc(b[cursor.c])));
        cursor.next();
      }
    }
    store_pack<VEC>(y, p, out);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    bias_act_grad_kernel(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx,
                         int64_t n_packs, DeviceAct<Acc<T>> act) {
  for (int64_t p = blockIdx.x * int64_t(kThreads) + threadIdx.x; p < n_packs;
       p += int64_t(gridDim.x) * kThreads) {
    const Pack<T, VEC> g = load_pack<VEC>(dy, p);
    const Pack<T, VEC> out = load_pack<VEC>(y, p);
    Pack<T, VEC> result;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      result.v[k] = from_acc<T>(act.grad(to_acc(g.v[k]), to_acc(out.v[k])) * act.scale);
    }
    store_pack<VEC>(dx, p, result);
  }
}

// How the bias gradient is cut into items; sizes depend on the shape only. With
// inner >= kMinRowInner an item is a chunk of one [inner] row (one channel) and a block sums
// it. Otherwise the tensor is the matrix [outer, chan * inner], whose column j has channel
// j / inner, and an item is a block of columns over rows_per_chunk rows.
constexpr int64_t kMinRowInner = 32;
constexpr int64_t kRowChunk = kThreads * 16;  // a multiple of every pack size
constexpr int kColThreads = 32;
constexpr int kRowThreads = kThreads / kColThreads;
constexpr int64_t kMaxRowChunks = 1024;

struct GradTiling {
  bool by_rows;
  int64_t n_chunks;  // by rows: items per row
  int64_t cols, rows_per_chunk, n_row_chunks;  // by columns
  int64_t workspace_elements;
};

GradTiling grad_tiling(const Layout& l) {
  GradTiling t{};
  t.by_rows = l.inner >= kMinRowInner;
  if (t.by_rows) {
    t.n_chunks = ceil_div(l.inner, kRowChunk);
    t.workspace_elements = l.outer * l.chan * t.n_chunks;
  } else {
    t.cols = l.chan * l.inner;
    const int64_t target_chunks = min64(ceil_div(l.outer, kRowThreads * 4), kMaxRowChunks);
    t.rows_per_chunk = ceil_div(l.outer, target_chunks);
    t.n_row_chunks = ceil_div(l.outer, t.rows_per_chunk);
    t.workspace_elements = t.n_row_chunks * t.cols;
  }
  return t;
}

// Item (row, k) writes dx for chunk k of row `row` and the sum of its dz to partial[item].
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    bias_act_grad_rows_kernel(const T* __restrict__ dy, const T* __restrict__ y,
                              T* __restrict__ dx, Acc<T>* __restrict__ partial, int64_t inner,
                              int64_t n_chunks, int64_t n_items, DeviceAct<Acc<T>> act) {
  using A = Acc<T>;
  __shared__ A shared[kThreads / 32];
  for (int64_t item = blockIdx.x; item < n_items; item += gridDim.x) {
    const int64_t row = item / n_chunks;
    const int64_t begin = row * inner + (item - row * n_chunks) * kRowChunk;
    const int64_t end = min64((row + 1) * inner, begin + kRowChunk);
    A sum = 0;
    for (int64_t i = begin + threadIdx.x * VEC; i < end; i += kThreads * VEC) {
      const Pack<T, VEC> g = load_pack<VEC>(dy, i / VEC);
      const Pack<T, VEC> out = load_pack<VEC>(y, i / VEC);
      Pack<T, VEC> result;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A dz = act.grad(to_acc(g.v[k]), to_acc(out.v[k]));
        sum += dz;
        result.v[k] = from_acc<T>(dz * act.scale);
      }
      store_pack<VEC>(dx, i / VEC, result);
    }
    sum = block_sum(sum, shared);
    if (threadIdx.x == 0) partial[item] = sum;
  }
}

// db[c] = the sum over o and k of partial[(o * chan + c) * n_chunks + k].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    db_from_rows_kernel(const Acc<T>* __restrict__ partial, T* __restrict__ db, int64_t outer,
                        int64_t chan, int64_t n_chunks) {
  using A = Acc<T>;
  __shared__ A shared[kThreads / 32];
  for (int64_t c = blockIdx.x; c < chan; c += gridDim.x) {
    A sum = 0;
    for (int64_t j = threadIdx.x; j < outer * n_chunks; j += kThreads) {
      const int64_t o = j / n_chunks;
      sum += partial[(o * chan + c) * n_chunks + (j - o * n_chunks)];
    }
    sum = block_sum(sum, shared);
    if (threadIdx.x == 0) db[c] = from_acc<T>(sum);
  }
}

// Blocks of kColThreads x kRowThreads threads. Item (rc, cb) covers the kColThreads * VEC
// columns of block cb over the rows of chunk rc; it writes their dx and the column sums of dz
// to partial[rc * cols + column].
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    bias_act_grad_cols_kernel(const T* __restrict__ dy, const T* __restrict__ y,
                              T* __restrict__ dx, Acc<T>* __restrict__ partial, int64_t outer,
                              int64_t cols, int64_t rows_per_chunk, int64_t n_col_blocks,
                              int64_t n_items, DeviceAct<Acc<T>> act) {
  using A = Acc<T>;
  __shared__ A shared[kRowThreads][kColThreads * VEC];
  for (int64_t item = blockIdx.x; item < n_items; item += gridDim.x) {
    const int64_t rc = item / n_col_blocks;
    const int64_t j = ((item - rc * n_col_blocks) * kColThreads + threadIdx.x) * VEC;
    A sums[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) sums[k] = 0;
    if (j < cols) {
      const int64_t end = min64(outer, (rc + 1) * rows_per_chunk);
      for (int64_t r = rc * rows_per_chunk + threadIdx.y; r < end; r += kRowThreads) {
        const int64_t p = (r * cols + j) / VEC;
        const Pack<T, VEC> g = load_pack<VEC>(dy, p);
        const Pack<T, VEC> out = load_pack<VEC>(y, p);
        Pack<T, VEC> result;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const A dz = act.grad(to_acc(g.v[k]), to_acc(out.v[k]));
          sums[k] += dz;
          result.v[k] = from_acc<T>(dz * act.scale);
        }
        store_pack<VEC>(dx, p, result);
      }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) shared[threadIdx.y][threadIdx.x * VEC + k] = sums[k];
    __syncthreads();
    if (threadIdx.y == 0 && j < cols) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        A sum = 0;
        for (int t = 0; t < kRowThreads; ++t) sum += shared[t][threadIdx.x * VEC + k];
        partial[rc * cols + j + k] = sum;
      }
    }
    __syncthreads();
  }
}

// db[c] = the sum over row chunks rc and i < inner of partial[rc * chan * inner + c * inner + i].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    db_from_cols_kernel(const Acc<T>* __restrict__ partial, T* __restrict__ db, int64_t chan,
                        int64_t inner, int64_t n_row_chunks) {
  using A = Acc<T>;
  __shared__ A shared[kRowThreads][kColThreads];
  for (int64_t c0 = int64_t(blockIdx.x) * kColThreads; c0 < chan;
       c0 += int64_t(gridDim.x) * kColThreads) {
    const int64_t c = c0 + threadIdx.x;
    A sum = 0;
    if (c < chan) {
      for (int64_t rc = threadIdx.y; rc < n_row_chunks; rc += kRowThreads) {
        for (int64_t i = 0; i < inner; ++i) sum += partial[(rc * chan + c) * inner + i];
      }
    }
    shared[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && c < chan) {
      A total = 0;
      for (int t = 0; t < kRowThreads; ++t) total += shared[t][threadIdx.x];
      db[c] = from_acc<T>(total);
    }
    __syncthreads();
  }
}

}  // namespace

cudaError_t launch_bias_act(DType dtype, const void* x, const void* b, void* y,
                            const Layout& layout, const ActParams& act, cudaStream_t stream) {
  const int64_t numel = layout.outer * layout.chan * layout.inner;
  return dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    const bool packed = numel % kVec<T> == 0 && aligned16(x) && aligned16(y);
    with_pack_size<T>(packed, [&](auto pack) {
      constexpr int VEC = decltype(pack)::value;
      with_index_type(numel, [&](auto index) {
        using Index = decltype(index);
        const int64_t n_packs = numel / VEC;
        bias_act_kernel<T, VEC, Index><<<grid_size(ceil_div(n_packs, kThreads)), kThreads, 0,
                                          stream>>>(
            static_cast<const T*>(x), static_cast<const T*>(b), static_cast<T*>(y), n_packs,
            Index(layout.chan), Index(layout.inner), DeviceAct<Acc<T>>(act));
      });
    });
  });
}

size_t bias_act_grad_workspace_bytes(DType dtype, const Layout& layout) {
  return grad_tiling(layout).workspace_elements * acc_size(dtype);
}

cudaError_t launch_bias_act_grad(DType dtype, const void* dy, const void* y, void* dx, void* db,
                                 void* workspace, const Layout& layout, const ActParams& act,
                                 cudaStream_t stream) {
  const int64_t numel = layout.outer * layout.chan * layout.inner;
  return dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    using A = Acc<T>;
    const T* dy_t = static_cast<const T*>(dy);
    const T* y_t = static_cast<const T*>(y);
    T* dx_t = static_cast<T*>(dx);
    const DeviceAct<A> device_act(act);
    const bool aligned = aligned16(dy) && aligned16(y) && aligned16(dx);
    if (db == nullptr) {
      with_pack_size<T>(aligned && numel % kVec<T> == 0, [&](auto pack) {
        constexpr int VEC = decltype(pack)::value;
        const int64_t n_packs = numel / VEC;
        bias_act_grad_kernel<T, VEC><<<grid_size(ceil_div(n_packs, kThreads)), kThreads, 0,
                                       stream>>>(dy_t, y_t, dx_t, n_packs, device_act);
      });
      return;
    }
    const GradTiling t = grad_tiling(layout);
    A* partial = static_cast<A*>(workspace);
    T* db_t = static_cast<T*>(db);
    if (t.by_rows) {
      const int64_t n_items = layout.outer * layout.chan * t.n_chunks;
      with_pack_size<T>(aligned && layout.inner % kVec<T> == 0, [&](auto pack) {
        constexpr int VEC = decltype(pack)::value;
        bias_act_grad_rows_kernel<T, VEC><<<grid_size(n_items), kThreads, 0, stream>>>(
            dy_t, y_t, dx_t, partial, layout.inner, t.n_chunks, n_items, device_act);
      });
      db_from_rows_kernel<T><<<grid_size(layout.chan), kThreads, 0, stream>>>(
          partial, db_t, layout.outer, layout.chan, t.n_chunks);
    } else {
      const dim3 block(kColThreads, kRowThreads);
      with_pack_size<T>(aligned && t.cols % kVec<T> == 0, [&](auto pack) {
        constexpr int VEC = decltype(pack)::value;
        const int64_t n_col_blocks = ceil_div(t.cols, kColThreads * VEC);
        const int64_t n_items = t.n_row_chunks * n_col_blocks;
        bias_act_grad_cols_kernel<T, VEC><<<grid_size(n_items), block, 0, stream>>>(
            dy_t, y_t, dx_t, partial, layout.outer, t.cols, t.rows_per_chunk, n_col_blocks,
            n_items, device_act);
      });
      db_from_cols_kernel<T><<<grid_size(ceil_div(layout.chan, kColThreads)), block, 0,
                               stream>>>(partial, db_t, layout.chan, layout.inner,
                                         t.n_row_chunks);
    }
  });
}

}  // namespace fastgan::gpu
