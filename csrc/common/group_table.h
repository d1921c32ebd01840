// The torch-free description of a validated group, what the kernels read: one entry per
// non-empty tensor, in group order. Built by make_group (csrc/group.h) for the CPU and CUDA
// kernels alike.
#pragma once

#include <cstdint>

namespace fastbnf {

struct TensorEntry {
  const void* mean;  // null where the op reads no means (variance)
  const void* logvar;
  const void* prior_mean;  // null: the prior mean is 0
  int64_t begin;           // flat offset of the tensor in the group
  // The index of the tensor's first element in the noise stream: begin, or the op's
  // noise_offsets[t] (a shard's place in the whole group it was cut from: its rank draws its
  // slice of the same noise).
  int64_t noise_begin;
  int64_t numel;            // > 0
  double inv_prior_var;     // 1 / pv (posterior::prior_constants)
  double log_prior_var_m1;  // log(pv) - 1
};

}  // namespace fastbnf
