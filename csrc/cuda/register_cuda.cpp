// Registers the CUDA implementations of the kernel ops (built only with a CUDA torch). The
// schemas are declared in Python (fastbnf/ops/library.py), so that the ops exist without the
// extension; the dispatcher accepts an implementation registered before its schema.
#include <torch/library.h>

#include "kernel_ops.h"

TORCH_LIBRARY_IMPL(fastbnf, CUDA, m) {
  m.impl("sample_kernel", &fastbnf::cuda::sample_kernel);
  m.impl("sample_backward_kernel", &fastbnf::cuda::sample_backward_kernel);
  m.impl("kl_kernel", &fastbnf::cuda::kl_kernel);
  m.impl("kl_backward_kernel", &fastbnf::cuda::kl_backward_kernel);
  m.impl("variance_kernel", &fastbnf::cuda::variance_kernel);
  m.impl("adam_step_kernel", &fastbnf::cuda::adam_step_kernel);
}
