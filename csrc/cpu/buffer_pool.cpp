// The pool of large CPU outputs (see buffer_pool.h).
#include "buffer_pool.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include "message.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastbnf {
namespace cpu {
namespace {

// glibc's default mmap threshold. Below it malloc's bins reuse freed memory in place; above it
// a freed buffer may go back to the system (munmap, or a trim of the heap's top) and the next
// one is faulted in again, a page fault and a zeroing per page: as slow as the kernels' work.
constexpr size_t kPooledBytes = size_t{128} << 10;
// Buffers of a huge page or more are huge-page aligned, so that the advice below covers them
// whole; smaller ones are page aligned.
constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kPage = size_t{4} << 10;
// Idle buffers are kept up to this many times the largest buffer asked for.
constexpr size_t kIdleFactor = 4;

bool keeping_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("FASTBNF_CPU_CACHE");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }();
  return enabled;
}

class BufferPool {
 public:
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      largest_ = std::max(largest_, bytes);
      // The newest idle buffer of this size: likeliest still in cache.
      for (auto it = idle_.rbegin(); it != idle_.rend(); ++it) {
        if (it->bytes == bytes) {
          void* ptr = it->ptr;
          idle_bytes_ -= bytes;
          idle_.erase(std::next(it).base());
          return ptr;
        }
      }
    }
    void* ptr = nullptr;
    const size_t alignment = bytes >= kHugePage ? kHugePage : kPage;
    if (posix_memalign(&ptr, alignment, bytes) != 0 || ptr == nullptr) {
      C10_THROW_ERROR(OutOfMemoryError, message::build("fastbnf: could not allocate ", bytes,
                                                       " bytes for a kernel output"));
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    // Advice only: where transparent huge pages are off it changes nothing.
    if (bytes >= kHugePage) madvise(ptr, bytes & ~(kHugePage - 1), MADV_HUGEPAGE);
#endif
    return ptr;
  }

  void give_back(void* ptr, size_t bytes) {
    std::deque<Buffer> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const size_t cap = keeping_enabled() ? kIdleFactor * largest_ : 0;
      if (bytes > cap) {
        evicted.push_back({ptr, bytes});
      } else {
        while (idle_bytes_ + bytes > cap) {
          evicted.push_back(idle_.front());
          idle_bytes_ -= idle_.front().bytes;
          idle_.pop_front();
        }
        idle_.push_back({ptr, bytes});
        idle_bytes_ += bytes;
      }
    }
    for (const Buffer& b : evicted) std::free(b.ptr);
  }

  int64_t release() {
    std::deque<Buffer> freed;
    int64_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      freed.swap(idle_);
      bytes = static_cast<int64_t>(idle_bytes_);
      idle_bytes_ = 0;
    }
    for (const Buffer& b : freed) std::free(b.ptr);
    return bytes;
  }

  int64_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(idle_bytes_);
  }

 private:
  struct Buffer {
    void* ptr;
    size_t bytes;
  };
  std::mutex mutex_;
  std::deque<Buffer> idle_;  // oldest first
  size_t idle_bytes_ = 0;
  size_t largest_ = 0;
};

BufferPool& pool() {
  // Leaked: tensors may outlive static destruction at exit.
  static BufferPool* instance = new BufferPool();
  return *instance;
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  const auto options = at::TensorOptions().dtype(dtype);
  const size_t bytes =
      static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(dtype);
  if (bytes < kPooledBytes) return at::empty(sizes, options);
  void* ptr = pool().take(bytes);
  return at::from_blob(ptr, sizes, [bytes](void* p) { pool().give_back(p, bytes); }, options);
}

int64_t release_idle_buffers() { return pool().release(); }

int64_t idle_buffer_bytes() { return pool().idle_bytes(); }

}  // namespace cpu
}  // namespace fastbnf
