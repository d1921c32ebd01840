// Outputs of the CPU kernels, and the pool that recycles the large ones.
//
// A training step allocates the same large outputs every time (samples, gradients). Fresh ones
// are new mappings whose first touch costs a page fault and the OS's zeroing per page, work of
// the order of the kernels' own on the same bytes (benchmarks/bench_step.py). Buffers of
// 128 KiB or more (glibc's mmap threshold) therefore go back to a pool when their tensor dies
// and serve the next request of the same size (tests/test_cpu_kernel.py holds the pool's rules).
// The pool keeps at most four times the largest buffer asked for (the oldest go first),
// FASTBNF_CPU_CACHE=0 turns the keeping off, and fastbnf.empty_cache() frees it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastbnf {
namespace cpu {

// An uninitialized, contiguous CPU tensor. Large ones come from the pool, page aligned (huge-page
// aligned from 2 MiB on), and cannot be resized.
at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype);

// Frees the pool's idle buffers; returns how many bytes they held.
int64_t release_idle_buffers();

// Bytes held by idle buffers.
int64_t idle_buffer_bytes();

}  // namespace cpu
}  // namespace fastbnf
