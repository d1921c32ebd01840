// Registers the CPU implementations of the kernel ops. The schemas are declared in Python
// (fastbnf/ops/library.py), so that the ops exist without the extension; the dispatcher accepts
// an implementation registered before its schema.
#include <torch/library.h>

#include "buffer_pool.h"
#include "kernel_ops.h"

TORCH_LIBRARY_IMPL(fastbnf, CPU, m) {
  m.impl("sample_kernel", &fastbnf::cpu::sample_kernel);
  m.impl("sample_backward_kernel", &fastbnf::cpu::sample_backward_kernel);
  m.impl("kl_kernel", &fastbnf::cpu::kl_kernel);
  m.impl("kl_backward_kernel", &fastbnf::cpu::kl_backward_kernel);
  m.impl("variance_kernel", &fastbnf::cpu::variance_kernel);
  m.impl("adam_step_kernel", &fastbnf::cpu::adam_step_kernel);
}

// The pool of large CPU outputs (buffer_pool.h), for fastbnf.empty_cache(), and the number of
// threads that ran the last parallel kernel call (kernel_ops.h, for the tests). Declared here,
// not in ops/library.py: these are controls of the extension, with no Python twin.
TORCH_LIBRARY_FRAGMENT(fastbnf, m) {
  m.def("cpu_cache_release() -> int", &fastbnf::cpu::release_idle_buffers);
  m.def("cpu_cache_bytes() -> int", &fastbnf::cpu::idle_buffer_bytes);
  m.def("cpu_threads_used() -> int", &fastbnf::cpu::threads_used);
}
