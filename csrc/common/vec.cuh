// Vectorized access shared by the elementwise kernels: Vec<T, V> is V elements of T read or written as one access of
// V * sizeof(T) bytes (16 in the kernels that use it), valid where aligned16 holds for the pointer.
#pragma once
#include <cstdint>

namespace detr_fast {

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace detr_fast
