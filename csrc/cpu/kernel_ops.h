// The CPU kernel ops (signatures: csrc/README.md), registered by register_cpu.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fastbnf {
namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_kernel(
    at::TensorList means, at::TensorList logvars, std::optional<int64_t> n,
    std::optional<at::ScalarType> out_dtype, bool with_kl, double prior_var,
    std::optional<at::ArrayRef<double>> prior_vars, std::optional<at::TensorList> prior_means,
    int64_t salt);

std::tuple<at::Tensor, at::Tensor> sample_backward_kernel(
    const at::Tensor& grad_theta, const at::Tensor& grad_kl, at::TensorList means,
    at::TensorList logvars, const at::Tensor& rng_state, bool with_kl, double prior_var,
    std::optional<at::ArrayRef<double>> prior_vars, std::optional<at::TensorList> prior_means);

at::Tensor kl_kernel(at::TensorList means, at::TensorList logvars, double prior_var,
                     std::optional<at::ArrayRef<double>> prior_vars,
                     std::optional<at::TensorList> prior_means);

std::tuple<at::Tensor, at::Tensor> kl_backward_kernel(
    const at::Tensor& grad_kl, at::TensorList means, at::TensorList logvars, double prior_var,
    std::optional<at::ArrayRef<double>> prior_vars, std::optional<at::TensorList> prior_means);

at::Tensor variance_kernel(at::TensorList logvars);

// The fused variational Adam step (adam_step.cpp).
at::Tensor adam_step_kernel(const at::Tensor& grad_theta, at::TensorList means,
                            at::TensorList logvars, const at::Tensor& exp_avgs,
                            const at::Tensor& exp_avg_sqs, const at::Tensor& theta,
                            const at::Tensor& rng_state, int64_t step, double lr, double beta1,
                            double beta2, double eps, double weight_decay, double kl_weight,
                            double prior_var, std::optional<at::ArrayRef<double>> prior_vars,
                            std::optional<at::TensorList> prior_means, int64_t salt);

// How many threads ran chunks of the last kernel call that went parallel (a diagnostic for the
// tests: at::parallel_for did split the work). Process-wide; concurrent calls mix.
int64_t threads_used();

}  // namespace cpu
}  // namespace fastbnf
