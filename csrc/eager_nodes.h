// The eager path of the sample and KL ops with compiled kernels: C++ autograd nodes, so that a
// training step's backward runs no Python (eager_nodes.cpp). fastbnf/ops/native.py calls them
// through the module fastbnf._C (module.cpp); the pure-PyTorch backend, functorch transforms and
// several samples at once keep the autograd.Functions of fastbnf/ops/functions.py, which compute
// the same.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace fastbnf {
namespace eager {

// The prior arguments of an op, owned (a node keeps them until its backward).
struct Prior {
  double var = 1.0;
  std::optional<std::vector<double>> vars;
  std::optional<std::vector<at::Tensor>> means;
};

// The KL of a group, and with `linked` a second output, the token that the next sample of the
// same tensors takes instead of them (see sample): their backward is then one kernel call.
// Returns [kl] or [kl, token].
std::vector<at::Tensor> kl(const std::vector<at::Tensor>& means,
                           const std::vector<at::Tensor>& logvars, Prior prior, bool linked);

// One sample of a group, flat or split into per-tensor pieces, and the KL when with_kl. With a
// token (an output of kl(linked=true) over the same tensors), the sample's only input is the
// token and the KL's backward computes the gradients of both. Returns [theta, kl, rng_state] or
// [pieces..., kl, rng_state].
std::vector<at::Tensor> sample(const std::vector<at::Tensor>& means,
                               const std::vector<at::Tensor>& logvars,
                               std::optional<at::ScalarType> out_dtype, bool with_kl, Prior prior,
                               int64_t salt, bool split, const std::optional<at::Tensor>& token);

}  // namespace eager
}  // namespace fastbnf
