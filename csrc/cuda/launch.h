// Torch-free interface of the fused CUDA kernels (posterior_kernels.cu, adam_step.cu): what a
// launcher (kernel_ops.cpp) hands them. Each launch_* enqueues its kernel on a stream and reads
// the group through its device table (device_table.h).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "../common/adam_math.h"
#include "device_table.h"

namespace fastbnf {
namespace cuda {

enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// The Philox key of a forward call, the pieces of at::PhiloxCudaState (unpacked in the kernel
// as at::cuda::philox::unpack does, so that a captured CUDA graph reads fresh values per replay).
struct PhiloxArgs {
  uint64_t seed = 0;
  const int64_t* seed_ptr = nullptr;
  uint64_t offset = 0;
  const int64_t* offset_ptr = nullptr;
  uint64_t offset_intragraph = 0;
  bool captured = false;
  uint64_t salt = 0;  // folded into the seed (fold_salt)
};

enum class ForwardMode : int32_t { kSample = 0, kKL = 1, kVariance = 2 };

struct ForwardArgs {
  DType dtype = DType::kFloat32;      // of means, logvars, prior means, kl and variance
  DType out_dtype = DType::kFloat32;  // of theta: dtype, float16 or bfloat16
  const void* table = nullptr;        // device table
  int64_t num_tensors = 0;            // non-empty tensors (entries of the table)
  int64_t numel = 0;                  // N
  int64_t samples = 1;                // rows of theta (kSample)
  ForwardMode mode = ForwardMode::kSample;
  bool with_kl = false;  // kSample: also the KL (kKL: always)
  bool with_prior_means = false;
  void* out = nullptr;           // theta (samples, N) or the variance (N)
  void* kl = nullptr;            // 0-dim, dtype; written in kSample and kKL modes
  int64_t* rng_state = nullptr;  // int64[2] (salted seed, offset), written in kSample mode
  PhiloxArgs rng;
  void* workspace = nullptr;  // forward_workspace_bytes(numel) bytes of device memory
};

struct BackwardArgs {
  DType dtype = DType::kFloat32;       // of means, logvars, prior means, grads
  DType grad_dtype = DType::kFloat32;  // of grad_theta: dtype, float16 or bfloat16
  DType grad_kl_dtype = DType::kFloat32;
  const void* table = nullptr;
  int64_t num_tensors = 0;
  int64_t numel = 0;
  int64_t samples = 0;               // rows of grad_theta; 0: the KL's backward alone
  const void* grad_theta = nullptr;  // (samples, N), contiguous
  const void* grad_kl = nullptr;     // one element of grad_kl_dtype; read when with_kl
  bool with_kl = false;
  bool with_prior_means = false;
  const int64_t* rng_state = nullptr;  // device int64[2]
  void* grad_mean = nullptr;           // (N,)
  void* grad_logvar = nullptr;         // (N,)
};

// The fused variational Adam step (fastbnf::adam_step): the gradients of the current sample
// (eps from rng_state), AdamW on the means and log-variances (updated in place through the
// table's pointers) and their moments, and the next sample (a new key) into theta. Both
// samples' noise is drawn at each tensor's place in the stream, the table's noise_shift (a
// shard's place in its whole group, noise_offsets).
struct AdamArgs {
  DType dtype = DType::kFloat32;      // of means, logvars, prior means and moments
  DType out_dtype = DType::kFloat32;  // of theta and grad_theta: dtype, float16 or bfloat16
  const void* table = nullptr;
  int64_t num_tensors = 0;
  int64_t numel = 0;
  const void* grad_theta = nullptr;    // (N,), contiguous
  void* exp_avgs = nullptr;            // (2 N,): the means', then the log-variances'
  void* exp_avg_sqs = nullptr;         // (2 N,)
  void* theta = nullptr;               // (N,)
  const int64_t* rng_state = nullptr;  // device int64[2] of the current sample
  int64_t* next_rng_state = nullptr;   // device int64[2], written
  PhiloxArgs rng;                      // the next sample's key
  double kl_weight = 0.0;
  adam::Scalars<float> means_f, logvars_f;   // the update's scalars, for float arithmetic
  adam::Scalars<double> means_d, logvars_d;  // and for double
  // A capturable step (step_tensor): the device count of the step (this one included, >= 1),
  // read when the launch runs, not when it is enqueued (a CUDA graph replays the count of each
  // replay). The scalars that depend on it (bias2_sqrt, neg_step_size) are then computed on the
  // device from it and lr, beta1, beta2 (adam::step_terms) into step_workspace
  // (adam_step_workspace_bytes() bytes of device memory) and replace those above; the others
  // do not depend on the step. Null: the scalars above, as given.
  const int64_t* step = nullptr;
  double lr = 0.0, beta1 = 0.0, beta2 = 0.0;
  void* step_workspace = nullptr;
};

// Bytes of the forward's workspace: the reduction's counter and one double per tile.
size_t forward_workspace_bytes(int64_t numel);
// Bytes at the start of the workspace that must be zero before a launch that computes the KL.
size_t forward_workspace_zero_bytes();
// Bytes of the workspace of a capturable Adam step (AdamArgs::step): its scalars.
size_t adam_step_workspace_bytes();

// Enqueue on stream (one kernel; the forward with a KL also a memset of the counter, a capturable
// Adam step first the one-thread kernel of its scalars); return the error of the non-kernel
// calls (the caller checks the launches). launch_forward and launch_backward are
// posterior_kernels.cu's, launch_adam_step is adam_step.cu's.
cudaError_t launch_forward(const ForwardArgs& args, cudaStream_t stream);
cudaError_t launch_backward(const BackwardArgs& args, cudaStream_t stream);
cudaError_t launch_adam_step(const AdamArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastbnf
