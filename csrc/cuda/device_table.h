// The device table of a group, what every CUDA kernel reads, and the host code that writes it.
// Torch-free (the kernels' .cu files and the torch-side table_cache.cpp include it).
//
// A group is described by a table in device memory, built on the host once per group (the
// launchers cache it while the data pointers are unchanged, table_cache.h):
//   DeviceTensor tensors[T]   one per non-empty tensor (group_table.h's TensorEntry, plus the
//                             end of its flat range, its shift in the noise stream and whether
//                             it can be read 4 at a time)
//   int32_t tile_first[tiles] the first tensor of each tile of kTileElements flat elements
// so that a kernel resolves the tensor of a tile once (ATen's multi_tensor_apply and apex build
// the same kind of map), and one launch covers any number of tensors.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../common/group_table.h"

namespace fastbnf {
namespace cuda {

// Elements of a tile: the unit of the tile map, of the grid-stride loop and of the KL's partial
// sums (so the KL does not depend on the grid or the number of SMs). 256 threads x 2 quads of
// 4 elements x 2 rounds.
inline constexpr int64_t kTileElements = 4096;

struct DeviceTensor {
  const void* mean;
  const void* logvar;
  const void* prior_mean;  // null: the prior mean is 0
  int64_t begin;           // flat range [begin, end) of the tensor in the group
  int64_t end;
  // noise_begin - begin: flat element i draws the noise of i + noise_shift. 0 but for the Adam
  // step's shards (noise_offsets), which draw their slices of the whole group's noise; it may
  // be negative.
  int64_t noise_shift;
  double inv_prior_var;
  double log_prior_var_m1;
  int32_t vec;  // begin % 4 == 0 and every pointer aligned for 4-element vector loads
  int32_t pad;
};
static_assert(sizeof(DeviceTensor) == 72, "DeviceTensor is 72 bytes");

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t num_tiles(int64_t numel) { return ceil_div(numel, kTileElements); }

// Alignment of a 4-element vector access: 16 bytes (float32, and float64 as two halves), 8
// (float16, bfloat16).
inline size_t vec_alignment(size_t elem_size) { return std::min<size_t>(4 * elem_size, 16); }

inline bool aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Bytes of the tensors part alone (what identifies a table: the tile map follows from it).
inline size_t tensors_bytes(int64_t num_tensors) {
  return sizeof(DeviceTensor) * static_cast<size_t>(num_tensors);
}

// Bytes of the device table of a group (tensors, then the tile map).
inline size_t table_bytes(int64_t num_tensors, int64_t numel) {
  return tensors_bytes(num_tensors) + sizeof(int32_t) * static_cast<size_t>(num_tiles(numel));
}

// Writes the tensors part (elem_size: bytes of one element of the group's dtype).
inline void fill_tensors(void* host, const TensorEntry* entries, int64_t num_tensors,
                         size_t elem_size) {
  const size_t alignment = vec_alignment(elem_size);
  auto* out = static_cast<DeviceTensor*>(host);
  for (int64_t t = 0; t < num_tensors; ++t) {
    const TensorEntry& e = entries[t];
    DeviceTensor d{};
    d.mean = e.mean;
    d.logvar = e.logvar;
    d.prior_mean = e.prior_mean;
    d.begin = e.begin;
    d.end = e.begin + e.numel;
    d.noise_shift = e.noise_begin - e.begin;
    d.inv_prior_var = e.inv_prior_var;
    d.log_prior_var_m1 = e.log_prior_var_m1;
    d.vec = e.begin % 4 == 0 && (e.mean == nullptr || aligned(e.mean, alignment)) &&
            aligned(e.logvar, alignment) &&
            (e.prior_mean == nullptr || aligned(e.prior_mean, alignment));
    d.pad = 0;
    std::memcpy(out + t, &d, sizeof(d));
  }
}

// Writes the tile map after the tensors part (host holds table_bytes(num_tensors, numel)).
inline void fill_tile_map(void* host, const TensorEntry* entries, int64_t num_tensors,
                          int64_t numel) {
  auto* map = reinterpret_cast<int32_t*>(static_cast<char*>(host) + tensors_bytes(num_tensors));
  const int64_t tiles = num_tiles(numel);
  int64_t t = 0;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t start = tile * kTileElements;
    while (t + 1 < num_tensors && entries[t].begin + entries[t].numel <= start) ++t;
    map[tile] = static_cast<int32_t>(t);
  }
}

}  // namespace cuda
}  // namespace fastbnf
