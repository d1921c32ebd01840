// The CPU kernel ops, registered by register_cpu.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fastbnf {
namespace cpu {

#include "../kernel_ops_decl.h"

// How many threads ran chunks of the last kernel call that went parallel (a diagnostic for the
// tests: at::parallel_for did split the work). Process-wide; concurrent calls mix.
int64_t threads_used();

}  // namespace cpu
}  // namespace fastbnf
