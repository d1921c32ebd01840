// The Python module fastbnf._C. Importing it runs the static TORCH_LIBRARY_IMPL registrations of
// the kernels (the schemas come from fastbnf/ops/library.py). Its functions are the eager path's
// entry points with C++ autograd nodes (eager_nodes.h), called by fastbnf/ops/native.py: bound
// with pybind11 rather than declared as ops, since an op call from Python costs more host time,
// and the profiler sees them under the public ops' names.
#include <torch/csrc/Dtype.h>
#include <torch/extension.h>

#include "eager_nodes.h"

namespace {

namespace py = pybind11;
using fastbnf::eager::Prior;

Prior prior_of(double var, std::optional<std::vector<double>> vars,
               std::optional<std::vector<at::Tensor>> means) {
  return Prior{var, std::move(vars), std::move(means)};
}

std::optional<at::ScalarType> dtype_of(const py::object& dtype) {
  if (dtype.is_none()) return std::nullopt;
  TORCH_CHECK_TYPE(THPDtype_Check(dtype.ptr()), "out_dtype must be a torch.dtype or None");
  return reinterpret_cast<THPDtype*>(dtype.ptr())->scalar_type;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def(
      "eager_kl",
      [](const std::vector<at::Tensor>& means, const std::vector<at::Tensor>& logvars,
         double prior_var, std::optional<std::vector<double>> prior_vars,
         std::optional<std::vector<at::Tensor>> prior_means, bool linked) {
        Prior prior = prior_of(prior_var, std::move(prior_vars), std::move(prior_means));
        py::gil_scoped_release no_gil;
        return fastbnf::eager::kl(means, logvars, std::move(prior), linked);
      },
      "The KL of a group, and with linked the token of its next sample: [kl] or [kl, token].");
  m.def(
      "eager_sample",
      [](const std::vector<at::Tensor>& means, const std::vector<at::Tensor>& logvars,
         const py::object& out_dtype, bool with_kl, double prior_var,
         std::optional<std::vector<double>> prior_vars,
         std::optional<std::vector<at::Tensor>> prior_means, int64_t salt, bool split,
         std::optional<at::Tensor> token) {
        const auto dtype = dtype_of(out_dtype);
        Prior prior = prior_of(prior_var, std::move(prior_vars), std::move(prior_means));
        py::gil_scoped_release no_gil;
        return fastbnf::eager::sample(means, logvars, dtype, with_kl, std::move(prior), salt,
                                      split, token);
      },
      "One sample of a group: [theta, kl, rng_state] or, split, [pieces..., kl, rng_state].");
}
