// The launchers of the CUDA kernel ops (kernel_ops.h), torch side: the input contract
// (group.h), the device table of the group (table_cache.h), the Philox key, the outputs, then the
// torch-free launch (launch.h) on the current stream and a launch check. Messages go through
// message.h (no iostreams).
#include "kernel_ops.h"

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "../group.h"
#include "../message.h"
#include "launch.h"
#include "table_cache.h"

namespace fastbnf {
namespace cuda {
namespace {

DType to_dtype(at::ScalarType type) {
  switch (type) {
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kFloat32;
  }
}

void check_cuda(const char* op, const Group& group) {
  FASTBNF_CHECK_VALUE(group.device.is_cuda(), op, ": the group is on ", group.device,
                      ", expected a CUDA device");
}

// The fields of a forward launch that every mode shares; the caller sets the outputs.
ForwardArgs forward_args(const Group& group, ForwardMode mode, cudaStream_t stream) {
  ForwardArgs args;
  args.dtype = to_dtype(group.dtype);
  args.out_dtype = args.dtype;
  args.table = device_table(group, stream);
  args.num_tensors = static_cast<int64_t>(group.entries.size());
  args.numel = group.numel;
  args.mode = mode;
  args.with_prior_means = group.has_prior_means;
  return args;
}

// The key of a new sample. It is taken under the generator's lock, as ATen's fused dropout
// does; the kernel unpacks it (a captured graph then reads a fresh offset on each replay), folds
// the salt into the seed and writes (salted seed, offset) to its rng_state for the backward.
PhiloxArgs new_key(const Group& group, int64_t salt) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      std::nullopt, at::cuda::detail::getDefaultCUDAGenerator(group.device.index()));
  at::PhiloxCudaState philox;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(4);
  }
  PhiloxArgs rng;
  rng.salt = static_cast<uint64_t>(salt);
  rng.captured = philox.captured_;
  if (philox.captured_) {
    rng.seed_ptr = philox.seed_.ptr;
    rng.offset_ptr = philox.offset_.ptr;
    rng.offset_intragraph = philox.offset_intragraph_;
  } else {
    rng.seed = philox.seed_.val;
    rng.offset = philox.offset_.val;
  }
  return rng;
}

// The gradients of the samples (grad_theta non-null) and of the KL (with_kl).
std::tuple<at::Tensor, at::Tensor> backward_impl(const char* op, const Group& group,
                                                 const at::Tensor* grad_theta,
                                                 const at::Tensor* rng_state, bool with_kl,
                                                 const at::Tensor& grad_kl) {
  check_cuda(op, group);
  const c10::cuda::CUDAGuard guard(group.device);
  const int64_t numel = group.numel;
  const auto options = at::TensorOptions().device(group.device).dtype(group.dtype);
  at::Tensor grad_means = at::empty({numel}, options);
  at::Tensor grad_logvars = at::empty({numel}, options);

  BackwardArgs args;
  args.dtype = to_dtype(group.dtype);
  args.numel = numel;
  args.num_tensors = static_cast<int64_t>(group.entries.size());
  args.with_kl = with_kl;
  args.with_prior_means = group.has_prior_means;
  if (grad_theta != nullptr) {
    args.samples = grad_theta->dim() == 1 ? 1 : grad_theta->size(0);
    args.grad_dtype = to_dtype(grad_theta->scalar_type());
    args.grad_theta = grad_theta->data_ptr();
    args.rng_state = rng_state->data_ptr<int64_t>();
  }
  at::Tensor grad_kl_value;
  if (with_kl) {
    // One element of any dtype: the kernel reads the four floating ones as they are.
    grad_kl_value = is_posterior_dtype(grad_kl.scalar_type()) ? grad_kl : grad_kl.to(at::kFloat);
    args.grad_kl = grad_kl_value.data_ptr();
    args.grad_kl_dtype = to_dtype(grad_kl_value.scalar_type());
  }
  if (numel == 0) return {grad_means, grad_logvars};
  if (args.samples == 0 && !with_kl) {
    grad_means.zero_();
    grad_logvars.zero_();
    return {grad_means, grad_logvars};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  args.table = device_table(group, stream);
  args.grad_mean = grad_means.data_ptr();
  args.grad_logvar = grad_logvars.data_ptr();
  C10_CUDA_CHECK(launch_backward(args, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_means, grad_logvars};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_kernel(
    at::TensorList means, at::TensorList logvars, std::optional<int64_t> n,
    std::optional<at::ScalarType> out_dtype, bool with_kl, double prior_var,
    std::optional<at::ArrayRef<double>> prior_vars, std::optional<at::TensorList> prior_means,
    int64_t salt) {
  constexpr const char* op = "fastbnf::sample";
  const PriorArgs prior{prior_var, prior_vars, prior_means};
  const Group group = make_group(op, means, logvars, &prior);
  const int64_t samples = check_samples(op, n);
  const at::ScalarType theta_type = check_out_dtype(op, out_dtype, group);
  check_cuda(op, group);
  const c10::cuda::CUDAGuard guard(group.device);
  const auto options = at::TensorOptions().device(group.device);
  std::vector<int64_t> shape;
  if (n.has_value()) shape.push_back(samples);
  shape.push_back(group.numel);
  at::Tensor theta = at::empty(shape, options.dtype(theta_type));
  at::Tensor kl = at::empty({}, options.dtype(group.dtype));
  at::Tensor rng_state = at::empty({2}, options.dtype(at::kLong));
  at::Tensor workspace;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  ForwardArgs args = forward_args(group, ForwardMode::kSample, stream);
  args.out_dtype = to_dtype(theta_type);
  args.samples = samples;
  args.with_kl = with_kl;
  args.out = theta.data_ptr();
  args.kl = kl.data_ptr();
  args.rng_state = rng_state.data_ptr<int64_t>();
  if (with_kl) {
    workspace = at::empty({static_cast<int64_t>(forward_workspace_bytes(group.numel))},
                          options.dtype(at::kByte));
    args.workspace = workspace.data_ptr();
  }

  args.rng = new_key(group, salt);

  C10_CUDA_CHECK(launch_forward(args, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {theta, kl, rng_state};
}

std::tuple<at::Tensor, at::Tensor> sample_backward_kernel(
    const at::Tensor& grad_theta, const at::Tensor& grad_kl, at::TensorList means,
    at::TensorList logvars, const at::Tensor& rng_state, bool with_kl, double prior_var,
    std::optional<at::ArrayRef<double>> prior_vars, std::optional<at::TensorList> prior_means) {
  constexpr const char* op = "fastbnf::sample_backward";
  const PriorArgs prior{prior_var, prior_vars, prior_means};
  const Group group = make_group(op, means, logvars, &prior);
  const at::Tensor grad = check_grad_theta(op, grad_theta, group);
  const at::Tensor state = check_rng_state(op, rng_state, group);
  if (with_kl) check_grad_kl(op, grad_kl, group);
  return backward_impl(op, group, &grad, &state, with_kl, grad_kl);
}

std::tuple<at::Tensor, at::Tensor> kl_backward_kernel(
    const at::Tensor& grad_kl, at::TensorList means, at::TensorList logvars, double prior_var,
    std::optional<at::ArrayRef<double>> prior_vars, std::optional<at::TensorList> prior_means) {
  constexpr const char* op = "fastbnf::kl_backward";
  const PriorArgs prior{prior_var, prior_vars, prior_means};
  const Group group = make_group(op, means, logvars, &prior);
  check_grad_kl(op, grad_kl, group);
  return backward_impl(op, group, nullptr, nullptr, /*with_kl=*/true, grad_kl);
}

at::Tensor kl_kernel(at::TensorList means, at::TensorList logvars, double prior_var,
                     std::optional<at::ArrayRef<double>> prior_vars,
                     std::optional<at::TensorList> prior_means) {
  constexpr const char* op = "fastbnf::kl";
  const PriorArgs prior{prior_var, prior_vars, prior_means};
  const Group group = make_group(op, means, logvars, &prior);
  check_cuda(op, group);
  const c10::cuda::CUDAGuard guard(group.device);
  const auto options = at::TensorOptions().device(group.device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor result = at::empty({}, options.dtype(group.dtype));
  at::Tensor workspace = at::empty({static_cast<int64_t>(forward_workspace_bytes(group.numel))},
                                   options.dtype(at::kByte));
  ForwardArgs args = forward_args(group, ForwardMode::kKL, stream);
  args.with_kl = true;
  args.kl = result.data_ptr();
  args.workspace = workspace.data_ptr();
  C10_CUDA_CHECK(launch_forward(args, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return result;
}

at::Tensor variance_kernel(at::TensorList logvars) {
  constexpr const char* op = "fastbnf::variance";
  const Group group = make_group(op, std::nullopt, logvars, nullptr);
  check_cuda(op, group);
  const c10::cuda::CUDAGuard guard(group.device);
  at::Tensor result =
      at::empty({group.numel}, at::TensorOptions().device(group.device).dtype(group.dtype));
  if (group.numel == 0) return result;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  ForwardArgs args = forward_args(group, ForwardMode::kVariance, stream);
  args.out = result.data_ptr();
  C10_CUDA_CHECK(launch_forward(args, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return result;
}

at::Tensor adam_step_kernel(const at::Tensor& grad_theta, at::TensorList means,
                            at::TensorList logvars, const at::Tensor& exp_avgs,
                            const at::Tensor& exp_avg_sqs, const at::Tensor& theta,
                            const at::Tensor& rng_state, int64_t step, double lr, double beta1,
                            double beta2, double eps, double weight_decay, double kl_weight,
                            double prior_var, std::optional<at::ArrayRef<double>> prior_vars,
                            std::optional<at::TensorList> prior_means, int64_t salt,
                            std::optional<at::IntArrayRef> noise_offsets,
                            const std::optional<at::Tensor>& step_tensor) {
  constexpr const char* op = "fastbnf::adam_step";
  const PriorArgs prior{prior_var, prior_vars, prior_means};
  const Group group = make_group(op, means, logvars, &prior, noise_offsets);
  const at::Tensor grad =
      check_adam_step(op, group, means, logvars, grad_theta, exp_avgs, exp_avg_sqs, theta, step);
  const at::Tensor state = check_rng_state(op, rng_state, group);
  check_cuda(op, group);
  // A capturable step: the count is read on the device when the step runs, never here.
  const at::Tensor count = step_tensor ? check_step_tensor(op, *step_tensor, group) : at::Tensor();
  const c10::cuda::CUDAGuard guard(group.device);
  const auto options = at::TensorOptions().device(group.device);
  at::Tensor next_state = at::empty({2}, options.dtype(at::kLong));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AdamArgs args;
  args.dtype = to_dtype(group.dtype);
  args.out_dtype = to_dtype(theta.scalar_type());
  args.table = device_table(group, stream);
  args.num_tensors = static_cast<int64_t>(group.entries.size());
  args.numel = group.numel;
  args.grad_theta = grad.data_ptr();
  args.exp_avgs = exp_avgs.data_ptr();
  args.exp_avg_sqs = exp_avg_sqs.data_ptr();
  args.theta = theta.data_ptr();
  args.rng_state = state.data_ptr<int64_t>();
  args.next_rng_state = next_state.data_ptr<int64_t>();
  args.rng = new_key(group, salt);
  args.kl_weight = kl_weight;
  const adam::Hyper means_hyper{lr, beta1, beta2, eps, weight_decay, step};
  const adam::Hyper logvars_hyper{lr, beta1, beta2, eps, 0.0, step};
  args.means_f = adam::scalars<float>(means_hyper);
  args.logvars_f = adam::scalars<float>(logvars_hyper);
  args.means_d = adam::scalars<double>(means_hyper);
  args.logvars_d = adam::scalars<double>(logvars_hyper);
  at::Tensor step_workspace;
  if (count.defined()) {
    // The scalars of the count, computed on the device into the workspace (the stream's
    // allocation: the step's kernels use it before any later work of the stream can reuse it).
    step_workspace =
        at::empty({static_cast<int64_t>(adam_step_workspace_bytes())}, options.dtype(at::kByte));
    args.step = count.data_ptr<int64_t>();
    args.lr = lr;
    args.beta1 = beta1;
    args.beta2 = beta2;
    args.step_workspace = step_workspace.data_ptr();
  }
  C10_CUDA_CHECK(launch_adam_step(args, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return next_state;
}

}  // namespace cuda
}  // namespace fastbnf
