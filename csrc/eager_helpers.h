// Helpers of the eager path for groups of hundreds of tensors (eager_helpers.cpp): the pieces of
// a flat buffer shaped like a list of tensors, and one flat tensor over tensors that lie back to
// back in one storage.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace fastbnf {

// The per-tensor pieces of a contiguous 1-dim tensor, shaped like `like`: one TensorImpl each over
// the same storage, made without the dispatcher. Plain tensors, not autograd views.
std::vector<at::Tensor> views_like(const at::Tensor& flat, at::TensorList like);

// One flat tensor over `tensors` when they are contiguous and back to back in one storage, in
// order, else nullopt.
std::optional<at::Tensor> adjacent_flat(at::TensorList tensors);

}  // namespace fastbnf
