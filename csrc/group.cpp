// The input contract of the kernel ops (group.h). Its Python twin is fastbnf/_contract.py: the
// same checks in the same order, the same messages.
#include "group.h"

#include <cmath>
#include <string>
#include <utility>

#include "common/posterior_math.h"
#include "message.h"

namespace fastbnf {
namespace {

constexpr const char* kFloating = "a floating dtype (float16, bfloat16, float32 or float64)";

void check_prior_var(const char* op, const char* what, int64_t index, double value) {
  FASTBNF_CHECK_VALUE(std::isfinite(value) && value > 0.0, op, ": ", what, index < 0 ? "" : "[",
                      index < 0 ? std::string() : std::to_string(index), index < 0 ? "" : "]",
                      " must be positive and finite, got ", value);
}

// A tensor of the group as the kernels read it: on the group's device (checked), with the
// expected shape (checked), in the group's dtype and contiguous (converted, a copy, otherwise).
// first names the list whose tensors set the device (its [0]) and the shapes (its [t]).
const void* readable(const char* op, const char* list, size_t t, const at::Tensor& x,
                     const char* first, at::IntArrayRef shape, Group& group) {
  FASTBNF_CHECK_VALUE(x.device() == group.device, op, ": ", list, "[", t, "] is on ", x.device(),
                      ", expected ", group.device, " like ", first, "[0]");
  FASTBNF_CHECK_TYPE(is_posterior_dtype(x.scalar_type()), op, ": ", list, "[", t, "] has dtype ",
                     x.scalar_type(), ", expected ", kFloating);
  FASTBNF_CHECK_VALUE(x.sizes() == shape, op, ": ", list, "[", t, "] has shape ", x.sizes(),
                      ", expected ", shape, " like ", first, "[", t, "]");
  if (x.scalar_type() == group.dtype && x.is_contiguous()) return x.data_ptr();
  group.copies.push_back(x.to(group.dtype).contiguous());
  return group.copies.back().data_ptr();
}

}  // namespace

bool is_sample_dtype(at::ScalarType dtype, const Group& group) {
  return dtype == group.dtype || dtype == at::kHalf || dtype == at::kBFloat16 ||
         dtype == at::kFloat;
}

bool is_posterior_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
         dtype == at::kBFloat16;
}

Group make_group(const char* op, std::optional<at::TensorList> means, at::TensorList logvars,
                 const PriorArgs* prior, std::optional<at::IntArrayRef> noise_offsets) {
  const size_t count = logvars.size();
  if (means) {
    FASTBNF_CHECK_VALUE(means->size() == count, op, ": means has ", means->size(),
                        " tensors but logvars has ", count);
  }
  FASTBNF_CHECK_VALUE(count > 0, op, ": the group holds no tensors");
  const char* first_list = means ? "means" : "logvars";
  const at::Tensor& first = means ? (*means)[0] : logvars[0];

  Group group;
  group.device = first.device();
  FASTBNF_CHECK_TYPE(is_posterior_dtype(first.scalar_type()), op, ": ", first_list,
                     "[0] has dtype ", first.scalar_type(), ", expected ", kFloating);
  group.dtype = first.scalar_type();
  group.num_tensors = static_cast<int64_t>(count);

  if (prior != nullptr) {
    check_prior_var(op, "prior_var", -1, prior->var);
    if (prior->vars) {
      FASTBNF_CHECK_VALUE(prior->vars->size() == count, op, ": prior_vars has ",
                          prior->vars->size(), " entries for ", count, " tensors");
      for (size_t t = 0; t < count; ++t) {
        check_prior_var(op, "prior_vars", static_cast<int64_t>(t), (*prior->vars)[t]);
      }
    }
    if (prior->means) {
      FASTBNF_CHECK_VALUE(prior->means->size() == count, op, ": prior_means has ",
                          prior->means->size(), " entries for ", count, " tensors");
    }
    group.has_prior_means = prior->means.has_value();
  }

  if (noise_offsets) {
    FASTBNF_CHECK_VALUE(noise_offsets->size() == count, op, ": noise_offsets has ",
                        noise_offsets->size(), " entries for ", count, " tensors");
    for (size_t t = 0; t < count; ++t) {
      FASTBNF_CHECK_VALUE((*noise_offsets)[t] >= 0, op, ": noise_offsets[", t,
                          "] must be >= 0, got ", (*noise_offsets)[t]);
    }
  }

  group.entries.reserve(count);
  int64_t offset = 0;
  for (size_t t = 0; t < count; ++t) {
    const at::Tensor& reference = means ? (*means)[t] : logvars[t];
    const at::IntArrayRef shape = reference.sizes();
    TensorEntry entry{};
    if (means) entry.mean = readable(op, "means", t, (*means)[t], first_list, shape, group);
    entry.logvar = readable(op, "logvars", t, logvars[t], first_list, shape, group);
    if (prior != nullptr && prior->means) {
      entry.prior_mean =
          readable(op, "prior_means", t, (*prior->means)[t], first_list, shape, group);
    }
    const double var = prior != nullptr && prior->vars ? (*prior->vars)[t]
                                                       : (prior != nullptr ? prior->var : 1.0);
    const posterior::PriorConstants constants = posterior::prior_constants(var);
    entry.inv_prior_var = constants.inv_var;
    entry.log_prior_var_m1 = constants.log_var_m1;
    entry.begin = offset;
    entry.noise_begin = noise_offsets ? (*noise_offsets)[t] : offset;
    entry.numel = reference.numel();
    offset += entry.numel;
    if (entry.numel > 0) {
      group.noise_is_flat = group.noise_is_flat && entry.noise_begin == entry.begin;
      group.entries.push_back(entry);
    }
  }
  group.numel = offset;
  return group;
}

int64_t check_samples(const char* op, std::optional<int64_t> n) {
  FASTBNF_CHECK_VALUE(!n || *n >= 0, op, ": n must be non-negative, got ", n.value_or(0));
  return n.value_or(1);
}

at::ScalarType check_out_dtype(const char* op, std::optional<at::ScalarType> out_dtype,
                               const Group& group) {
  const at::ScalarType dtype = out_dtype.value_or(group.dtype);
  FASTBNF_CHECK_TYPE(is_sample_dtype(dtype, group), op,
                     ": out_dtype must be torch.float16, torch.bfloat16, torch.float32 or the ",
                     "group's dtype (", group.dtype, "), got ", dtype);
  return dtype;
}

at::Tensor check_grad_theta(const char* op, const at::Tensor& grad_theta, const Group& group) {
  FASTBNF_CHECK_VALUE(grad_theta.device() == group.device, op, ": grad_theta is on ",
                      grad_theta.device(), ", expected ", group.device);
  const at::ScalarType dtype = grad_theta.scalar_type();
  FASTBNF_CHECK_TYPE(is_posterior_dtype(dtype), op, ": grad_theta has dtype ", dtype,
                     ", expected ", kFloating);
  const int64_t N = group.numel;
  FASTBNF_CHECK_VALUE((grad_theta.dim() == 1 && grad_theta.size(0) == N) ||
                          (grad_theta.dim() == 2 && grad_theta.size(1) == N),
                      op, ": grad_theta has shape ", grad_theta.sizes(), ", expected (", N,
                      ",) or (n, ", N, ")");
  at::Tensor grad = grad_theta;
  if (!is_sample_dtype(dtype, group)) grad = grad.to(group.dtype);
  return grad.contiguous();
}

void check_grad_kl(const char* op, const at::Tensor& grad_kl, const Group& group) {
  FASTBNF_CHECK_VALUE(grad_kl.numel() == 1 && grad_kl.device() == group.device, op,
                      ": grad_kl must hold one element on ", group.device, ", got shape ",
                      grad_kl.sizes(), " on ", grad_kl.device());
}

at::Tensor check_rng_state(const char* op, const at::Tensor& rng_state, const Group& group) {
  FASTBNF_CHECK_VALUE(rng_state.scalar_type() == at::kLong && rng_state.dim() == 1 &&
                          rng_state.size(0) == 2 && rng_state.device() == group.device,
                      op, ": rng_state must be an int64 tensor of shape (2,) on ", group.device,
                      ", got ", rng_state.scalar_type(), " of shape ", rng_state.sizes(), " on ",
                      rng_state.device());
  return rng_state.contiguous();
}

at::Tensor check_step_tensor(const char* op, const at::Tensor& step_tensor, const Group& group) {
  FASTBNF_CHECK_VALUE(step_tensor.scalar_type() == at::kLong && step_tensor.numel() == 1 &&
                          step_tensor.device() == group.device,
                      op, ": step_tensor must be an int64 tensor of one element on ", group.device,
                      ", got ", step_tensor.scalar_type(), " of shape ", step_tensor.sizes(),
                      " on ", step_tensor.device());
  return step_tensor.contiguous();
}

namespace {

const char* python_bool(bool value) { return value ? "True" : "False"; }

// A tensor of the step's state: on the group's device, contiguous, of shape (numel,) and of
// the dtype that ok accepts (wanted names it).
void check_state(const char* op, const char* name, const at::Tensor& x, const Group& group,
                 int64_t numel, bool ok, const char* wanted) {
  FASTBNF_CHECK_VALUE(
      ok && x.device() == group.device && x.dim() == 1 && x.size(0) == numel && x.is_contiguous(),
      op, ": ", name, " must be a contiguous tensor of shape (", numel, ",) on ", group.device,
      " of ", wanted, ", got ", x.scalar_type(), " of shape ", x.sizes(), " on ", x.device(),
      ", contiguous: ", python_bool(x.is_contiguous()));
}

}  // namespace

at::Tensor check_adam_step(const char* op, const Group& group, at::TensorList means,
                           at::TensorList logvars, const at::Tensor& grad_theta,
                           const at::Tensor& exp_avgs, const at::Tensor& exp_avg_sqs,
                           const at::Tensor& theta, int64_t step) {
  for (const auto& [name, list] : {std::pair<const char*, at::TensorList>{"means", means},
                                   std::pair<const char*, at::TensorList>{"logvars", logvars}}) {
    for (size_t t = 0; t < list.size(); ++t) {
      const at::Tensor& x = list[t];
      FASTBNF_CHECK_VALUE(x.scalar_type() == group.dtype && x.is_contiguous(), op, ": ", name, "[",
                          t, "] is updated in place and must be contiguous, of the group's ",
                          "dtype ", group.dtype, ", got ", x.scalar_type(),
                          ", contiguous: ", python_bool(x.is_contiguous()));
    }
  }
  const std::string group_dtype = message::build("the group's dtype ", group.dtype);
  const int64_t N = group.numel;
  check_state(op, "exp_avgs", exp_avgs, group, 2 * N, exp_avgs.scalar_type() == group.dtype,
              group_dtype.c_str());
  check_state(op, "exp_avg_sqs", exp_avg_sqs, group, 2 * N,
              exp_avg_sqs.scalar_type() == group.dtype, group_dtype.c_str());
  const at::ScalarType out = theta.scalar_type();
  check_state(op, "theta", theta, group, N, is_sample_dtype(out, group),
              "the group's dtype, torch.float16, torch.bfloat16 or torch.float32");
  FASTBNF_CHECK_VALUE(is_posterior_dtype(grad_theta.scalar_type()) &&
                          grad_theta.device() == group.device && grad_theta.dim() == 1 &&
                          grad_theta.size(0) == N,
                      op, ": grad_theta must be a tensor of shape (", N, ",) on ", group.device,
                      " of ", kFloating, ", got ", grad_theta.scalar_type(), " of shape ",
                      grad_theta.sizes(), " on ", grad_theta.device());
  FASTBNF_CHECK_VALUE(step >= 1, op, ": step must be >= 1, got ", step);
  return grad_theta.to(out).contiguous();
}

}  // namespace fastbnf
