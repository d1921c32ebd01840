// Torch-free interface of the fused CUDA kernels (fused_ops.cu).
//
// A group of T tensors is described by a table that lives in device memory: int64 starts[T + 1]
// (flat offset of each tensor in the group, starts[T] = N) followed by TensorDesc descs[T]. The
// launcher builds it on the host with fill_table() and keeps it on the device while the data
// pointers are unchanged, so that one launch covers any number of tensors.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace fastbnf {
namespace cuda {

enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct TensorDesc {
  const void* mean;
  const void* logvar;
  const void* prior_mean;  // null: prior mean 0
  int64_t numel;
  double prior_var;
  double log_prior_var;
  int32_t vec_ok;  // mean, logvar (and prior_mean) aligned for 4-element vector loads
  int32_t pad;
};

// Bytes of the device table of T tensors, and its host image.
size_t table_bytes(int64_t num_tensors);
// Writes starts (from descs[t].numel) and descs into host (table_bytes(T) bytes); returns N.
int64_t fill_table(void* host, const TensorDesc* descs, int64_t num_tensors);

// The Philox key of a forward call, the pieces of at::PhiloxCudaState (unpacked in the kernel
// as at::cuda::philox::unpack does, so that a captured CUDA graph reads fresh values per replay).
struct PhiloxArgs {
  uint64_t seed = 0;
  const int64_t* seed_ptr = nullptr;
  uint64_t offset = 0;
  const int64_t* offset_ptr = nullptr;
  uint64_t offset_intragraph = 0;
  bool captured = false;
  uint64_t stream = 0;  // folded into the seed (fold_stream)
};

enum class ForwardMode : int32_t { kSample = 0, kKL = 1, kVariance = 2 };

struct ForwardArgs {
  DType dtype = DType::kFloat32;      // of means, logvars, prior means, kl and variance
  DType out_dtype = DType::kFloat32;  // of theta
  const void* table = nullptr;        // device table
  int64_t num_tensors = 0;
  int64_t numel = 0;      // N
  int64_t samples = 1;    // rows of theta (kSample)
  ForwardMode mode = ForwardMode::kSample;
  bool with_kl = false;   // kSample: also the KL (kKL: always)
  void* out = nullptr;    // theta (samples, N) or the variance (N)
  void* kl = nullptr;     // 0-dim, dtype; written in kSample and kKL modes
  int64_t* rng_state = nullptr;  // int64[2] (seed, offset), written in kSample mode
  PhiloxArgs rng;
  void* workspace = nullptr;  // forward_workspace_bytes(numel) bytes of device memory
  int num_sms = 1;
};

struct BackwardArgs {
  DType dtype = DType::kFloat32;       // of means, logvars, prior means, grad_kl, grads
  DType grad_dtype = DType::kFloat32;  // of grad_theta
  const void* table = nullptr;
  int64_t num_tensors = 0;
  int64_t numel = 0;
  int64_t samples = 0;                  // rows of grad_theta; 0: KL backward only
  const void* grad_theta = nullptr;     // (samples, N), contiguous
  const void* grad_kl = nullptr;        // 0-dim, dtype; read when with_kl
  bool with_kl = false;
  const int64_t* rng_state = nullptr;   // device int64[2]
  void* grad_mean = nullptr;            // (N,)
  void* grad_logvar = nullptr;          // (N,)
  int num_sms = 1;
};

size_t forward_workspace_bytes(int64_t numel);

// Enqueue on stream; return the error of the non-kernel calls (the caller checks the launch).
cudaError_t launch_forward(const ForwardArgs& args, cudaStream_t stream);
cudaError_t launch_backward(const BackwardArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastbnf
