// The signatures of the kernel ops (schemas: fastbnf/ops/library.py; csrc/README.md), written
// once for both backends: cpu/kernel_ops.h and cuda/kernel_ops.h include this file inside their
// own namespace, fastbnf::cpu and fastbnf::cuda, after including ATen's Tensor, <optional> and
// <tuple> (nothing is included here: inside a namespace it would be). No include guard, for that
// reason: a file that includes both headers declares both sets.

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

// The fused variational Adam step (cpu/adam_step.cpp, cuda/adam_step.cu).
at::Tensor adam_step_kernel(const at::Tensor& grad_theta, at::TensorList means,
                            at::TensorList logvars, const at::Tensor& exp_avgs,
                            const at::Tensor& exp_avg_sqs, const at::Tensor& theta,
                            const at::Tensor& rng_state, int64_t step, double lr, double beta1,
                            double beta2, double eps, double weight_decay, double kl_weight,
                            double prior_var, std::optional<at::ArrayRef<double>> prior_vars,
                            std::optional<at::TensorList> prior_means, int64_t salt,
                            std::optional<at::IntArrayRef> noise_offsets,
                            const std::optional<at::Tensor>& step_tensor);
