// The cache of the groups' device tables (device_table.h), for the launchers (kernel_ops.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include "../group.h"

namespace fastbnf {
namespace cuda {

// The device table of group, uploaded on stream or reused (see table_cache.cpp for when a table
// is reused, and how under CUDA graph capture). Valid while the group's tensors live.
const void* device_table(const Group& group, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastbnf
