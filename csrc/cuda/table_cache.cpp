// The cache of the groups' device tables (table_cache.h). Torch side: the tables live in
// tensors of the CUDA caching allocator and pinned host memory.
#include "table_cache.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include <cstring>
#include <list>
#include <mutex>
#include <string>
#include <unordered_map>

#include "device_table.h"

namespace fastbnf {
namespace cuda {
namespace {

// Device tables (device_table.h), kept while the data pointers are unchanged: a training loop
// reuses the same parameters every step, so a table is built and uploaded once.
// - Streams: the upload is followed by an event; a call on another stream waits on it (and the
//   allocator is told that stream reads the table, recordStream).
// - CUDA graph capture: a call under capture uses an eagerly made table whose upload is done
//   (an event query), or else a table made under the same capture (its upload is a node of the
//   graph, so it runs before the kernels on every replay; a hit from another stream of the
//   capture waits on the event, an edge of the graph). A table made under capture is never
//   served to an eager call or to another capture, and every table a capture used is pinned:
//   the graph keeps reading it on every replay.
class TableCache {
 public:
  const void* get(const Group& group, cudaStream_t stream) {
    const int64_t count = static_cast<int64_t>(group.entries.size());
    const bool capturing =
        c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
    unsigned long long capture_id = 0;
    if (capturing) {
      cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
      C10_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &status, &capture_id));
    }
    const size_t elem_size = at::elementSize(group.dtype);
    Header header{group.device.index(), 0, group.numel, static_cast<int64_t>(elem_size)};
    std::string key(sizeof(Header) + tensors_bytes(count), '\0');
    std::memcpy(key.data(), &header, sizeof(Header));
    fill_tensors(key.data() + sizeof(Header), group.entries.data(), count, elem_size);

    std::lock_guard<std::mutex> lock(mutex_);
    if (capturing) {
      // An eagerly made table whose upload is done (torch.cuda.graph synchronizes before a
      // capture) serves the graph as it is, without a copy per replay; pinned from now on.
      auto eager = entries_.find(key);
      if (eager != entries_.end() && upload_done(eager->second)) {
        eager->second.pinned = true;
        lru_.splice(lru_.end(), lru_, eager->second.position);
        return eager->second.device_table.data_ptr();
      }
      header.capture_id = capture_id;
      std::memcpy(key.data(), &header, sizeof(Header));
    }
    auto found = entries_.find(key);
    if (found != entries_.end()) {
      Entry& entry = found->second;
      lru_.splice(lru_.end(), lru_, entry.position);
      entry.pinned = entry.pinned || capturing;
      if (entry.stream != stream) {
        // The upload was enqueued on another stream: wait for it (under capture, an edge of
        // the graph: the event was recorded in this capture).
        C10_CUDA_CHECK(cudaStreamWaitEvent(stream, entry.uploaded, 0));
        if (!capturing) {
          // The table may be freed on eviction: tell the allocator this stream reads it.
          c10::cuda::CUDACachingAllocator::recordStream(
              entry.device_table.storage().data_ptr(),
              c10::cuda::getStreamFromExternal(stream, group.device.index()));
        }
      }
      return entry.device_table.data_ptr();
    }
    if (!capturing) evict();
    const size_t bytes = table_bytes(count, group.numel);
    at::Tensor host;
    {
      // Pinned memory may come from cudaHostAlloc, which a capture in the global mode forbids
      // (PyTorch relaxes the mode the same way around its own allocations).
      const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
      host = at::empty({static_cast<int64_t>(bytes)},
                       at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    }
    std::memcpy(host.data_ptr(), key.data() + sizeof(Header), tensors_bytes(count));
    fill_tile_map(host.data_ptr(), group.entries.data(), count, group.numel);
    at::Tensor dev = at::empty({static_cast<int64_t>(bytes)},
                               at::TensorOptions().dtype(at::kByte).device(group.device));
    // Asynchronous from pinned memory on the current stream; under capture, a memcpy node of
    // the graph (the host image lives as long as the entry, forever once pinned).
    C10_CUDA_CHECK(
        cudaMemcpyAsync(dev.data_ptr(), host.data_ptr(), bytes, cudaMemcpyHostToDevice, stream));
    cudaEvent_t uploaded = nullptr;
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&uploaded, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(uploaded, stream));
    lru_.push_back(key);
    Entry entry{host, dev, stream, uploaded, capturing, false, std::prev(lru_.end())};
    const void* ptr = dev.data_ptr();
    entries_.emplace(std::move(key), std::move(entry));
    return ptr;
  }

 private:
  struct Header {
    int64_t device;
    unsigned long long capture_id;  // 0: made by an eager call
    int64_t numel;
    int64_t elem_size;
  };

  struct Entry {
    at::Tensor host_table;
    at::Tensor device_table;
    cudaStream_t stream;   // of the upload
    cudaEvent_t uploaded;  // recorded after the upload
    bool pinned;           // made or used under capture: never evicted
    bool done;             // the upload is known to be complete
    std::list<std::string>::iterator position;
  };

  // Whether an eagerly made table's upload is complete (an event query, allowed under capture
  // in the relaxed mode: the event was recorded outside any capture).
  static bool upload_done(Entry& entry) {
    if (entry.done) return true;
    cudaError_t status;
    {
      const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
      status = cudaEventQuery(entry.uploaded);
    }
    if (status == cudaSuccess) {
      entry.done = true;
      return true;
    }
    (void)cudaGetLastError();  // cudaErrorNotReady, or a query the capture refused
    return false;
  }

  void evict() {
    auto it = lru_.begin();
    while (entries_.size() >= kMaxEntries && it != lru_.end()) {
      auto entry = entries_.find(*it);
      if (entry->second.pinned) {
        ++it;
        continue;
      }
      // Not capturing: the upload must be done before its pinned host image goes back to
      // the host allocator (almost always long done).
      C10_CUDA_CHECK(cudaEventSynchronize(entry->second.uploaded));
      C10_CUDA_CHECK(cudaEventDestroy(entry->second.uploaded));
      entries_.erase(entry);
      it = lru_.erase(it);
    }
  }

  static constexpr size_t kMaxEntries = 64;
  std::mutex mutex_;
  std::unordered_map<std::string, Entry> entries_;
  std::list<std::string> lru_;
};

TableCache& table_cache() {
  static TableCache* cache = new TableCache();  // leaked: no CUDA frees at process exit
  return *cache;
}

}  // namespace

const void* device_table(const Group& group, cudaStream_t stream) {
  return table_cache().get(group, stream);
}

}  // namespace cuda
}  // namespace fastbnf
