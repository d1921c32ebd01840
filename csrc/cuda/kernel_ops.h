// The CUDA kernel ops, launched by kernel_ops.cpp and registered by register_cuda.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fastbnf {
namespace cuda {

#include "../kernel_ops_decl.h"

}  // namespace cuda
}  // namespace fastbnf
