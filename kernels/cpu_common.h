// What the CPU kernels share (cpu_kernels.cpp, cpu_upfirdn2d.cpp): the compute type, work
// items spread over threads, and vector steps that convert 16-bit values on load and store.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

namespace fastgan::cpu {

using at::vec::Vectorized;

template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int64_t kGrain = 32768;  // elements per thread at least (ATen's GRAIN_SIZE)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// at::parallel_for over n work items that hold `elements` elements in all, giving each thread
// at least kGrain of them: small tensors stay on the calling thread, which on a busy machine
// is much faster than waking another.
template <typename F>
void parallel_over(int64_t n, int64_t elements, const F& f) {
  const int64_t grain = ceil_div(kGrain * n, std::max<int64_t>(elements, 1));
  at::parallel_for(0, n, std::max<int64_t>(grain, 1), f);
}

// kWidth consecutive elements of T as kParts vectors of the compute type.
template <typename T>
struct Step {
  using A = Acc<T>;
  using V = Vectorized<A>;
  static constexpr int kParts = std::is_same_v<T, A> ? 1 : 2;
  static constexpr int64_t kWidth = kParts * V::size();
  V part[kParts];

  static Step load(const T* p) {
    Step s;
    if constexpr (kParts == 1) {
      s.part[0] = V::loadu(p);
    } else {
      at::vec::load_to_float<T>(p, s.part[0], s.part[1]);
    }
    return s;
  }
  // The first `count` elements from p, zeros after them.
  static Step load(const T* p, int64_t count) {
    if (count == kWidth) return load(p);
    T buffer[kWidth] = {};
    std::copy_n(p, count, buffer);
    return load(buffer);
  }
  void store(T* p) const {
    if constexpr (kParts == 1) {
      part[0].store(p);
    } else {
      at::vec::convert_from_float<T>(part[0], part[1]).store(p);
    }
  }
  void store(T* p, int64_t count) const {
    if (count == kWidth) return store(p);
    T buffer[kWidth];
    store(buffer);
    std::copy_n(buffer, count, p);
  }
  // The values rounded to T, as store() stores them.
  Step rounded() const {
    if constexpr (kParts == 1) {
      return *this;
    } else {
      Step s;
      std::tie(s.part[0], s.part[1]) =
          at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(part[0], part[1]));
      return s;
    }
  }
};

}  // namespace fastgan::cpu
