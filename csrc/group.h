// The input contract of the kernel ops, checked once for the CPU and the CUDA kernels: one
// function validates a group and builds its torch-free table (common/group_table.h). The
// pure-PyTorch backend checks the same contract with the same messages (fastbnf/_contract.py);
// tests/test_contract.py runs one table of bad inputs against every backend.
//
// The dtype contract:
// - posterior (means, logvars, prior means): float16, bfloat16, float32 or float64. The group's
//   dtype is that of its first tensor; a tensor of another floating dtype is converted to it
//   (a copy), so is a non-contiguous one (made contiguous): parameters change layout and dtype
//   after wrapping (.to(memory_format=...), load_state_dict(assign=True)).
// - arithmetic: float32 for float16, bfloat16 and float32 groups, float64 for float64 ones.
// - samples: the group's dtype, float16, bfloat16 or float32 (rounded once from the
//   arithmetic's value; float32 is for a float16 or bfloat16 posterior of a float32 model).
// - gradients of the samples: any floating dtype (the group's, float16, bfloat16 and float32
//   are read in place, float64 converted once); results: the group's dtype.
//
// Messages are built without iostreams (message.h): a libstdc++ that differs from the one torch
// was built with must not turn a bad input into a crash.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "common/group_table.h"

namespace fastbnf {

// The prior arguments of an op: N(m_t, v_t) with v_t = vars[t] (or var) and m_t = means[t] (or 0).
struct PriorArgs {
  double var = 1.0;
  std::optional<at::ArrayRef<double>> vars;
  std::optional<at::TensorList> means;
};

struct Group {
  at::ScalarType dtype = at::kFloat;
  at::Device device{at::kCPU};
  int64_t numel = 0;        // N, empty tensors included (they hold nothing)
  int64_t num_tensors = 0;  // T, empty tensors included
  bool has_prior_means = false;
  bool noise_is_flat = true;         // every entry's noise_begin is its begin (no noise_offsets)
  std::vector<TensorEntry> entries;  // the non-empty tensors, in group order
  std::vector<at::Tensor> copies;    // the converted or contiguous copies the entries read
};

// Whether a dtype is one of the contract's floating dtypes (float16, bfloat16, float32, float64).
bool is_posterior_dtype(at::ScalarType dtype);

// Whether the kernels store samples, and read their gradients, in a dtype as they are: the
// group's, float16, bfloat16 or float32 (a float16 or bfloat16 posterior of a float32 model).
bool is_sample_dtype(at::ScalarType dtype, const Group& group);

// Checks a group and builds its table. op is the public op's name ("fastbnf::sample"); means
// is absent for the ops that read none (variance), prior for those that use no prior;
// noise_offsets, one per tensor (>= 0), place the tensors in the noise stream (adam_step's
// shards), by default at their flat offsets in the group.
Group make_group(const char* op, std::optional<at::TensorList> means, at::TensorList logvars,
                 const PriorArgs* prior,
                 std::optional<at::IntArrayRef> noise_offsets = std::nullopt);

// The number of samples, n or 1.
int64_t check_samples(const char* op, std::optional<int64_t> n);

// The dtype of the samples.
at::ScalarType check_out_dtype(const char* op, std::optional<at::ScalarType> out_dtype,
                               const Group& group);

// The gradient of the samples, (N,) or (n, N), contiguous, in the group's dtype, float16 or
// bfloat16 (others converted once).
at::Tensor check_grad_theta(const char* op, const at::Tensor& grad_theta, const Group& group);

// The KL's incoming gradient: one element on the group's device.
void check_grad_kl(const char* op, const at::Tensor& grad_kl, const Group& group);

// rng_state: int64 (seed, offset) on the group's device, contiguous.
at::Tensor check_rng_state(const char* op, const at::Tensor& rng_state, const Group& group);

// step_tensor: the count of a capturable step, one int64 element on the group's device; its
// value is not checked (that would read the device).
at::Tensor check_step_tensor(const char* op, const at::Tensor& step_tensor, const Group& group);

// The state that a fused Adam step (fastbnf::adam_step) updates in place: the means and
// log-variances (of the group's dtype and contiguous, so that the kernel writes the caller's
// tensors, not copies), exp_avgs and exp_avg_sqs ((2 N,) of the group's dtype: the means' moments,
// then the log-variances'), theta ((N,) of a sample dtype) and grad_theta ((N,), returned in
// theta's dtype and contiguous); step >= 1.
at::Tensor check_adam_step(const char* op, const Group& group, at::TensorList means,
                           at::TensorList logvars, const at::Tensor& grad_theta,
                           const at::Tensor& exp_avgs, const at::Tensor& exp_avg_sqs,
                           const at::Tensor& theta, int64_t step);

}  // namespace fastbnf
