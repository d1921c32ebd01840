// Torch side of the fused CUDA kernels: checks, the device table of the group, the Philox key,
// and the registration of the CUDA implementations of the kernel ops (schemas come from Python).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <list>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "fused_ops.h"

namespace fastbnf {
namespace {

using cuda::DType;
using cuda::TensorDesc;

DType to_dtype(at::ScalarType type, const char* op, const char* what) {
  switch (type) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", what, " must be float32, float64, float16 or bfloat16, got ",
                  type);
  }
}

// The group after its checks: the tensors that the table points into (prior means converted
// to the group's dtype when they were not) and the host image of the table.
struct Group {
  at::Device device{at::kCUDA};
  at::ScalarType dtype = at::kFloat;
  int64_t numel = 0;
  std::vector<at::Tensor> keep_alive;
  std::vector<TensorDesc> descs;
};

Group check_group(const char* op, at::TensorList means, at::TensorList logvars, bool with_prior,
                  double prior_var, const std::optional<at::ArrayRef<double>>& prior_vars,
                  const std::optional<at::TensorList>& prior_means) {
  const int64_t count = static_cast<int64_t>(means.size());
  TORCH_CHECK(count > 0, op, ": means must hold at least one tensor");
  TORCH_CHECK(static_cast<int64_t>(logvars.size()) == count, op, ": got ", count,
              " means but ", logvars.size(), " logvars");
  Group group;
  group.device = means[0].device();
  group.dtype = means[0].scalar_type();
  TORCH_CHECK(group.device.is_cuda(), op, ": means[0] must be a CUDA tensor, got ", group.device);
  to_dtype(group.dtype, op, "means[0]");
  if (with_prior) {
    TORCH_CHECK(prior_var > 0.0 && std::isfinite(prior_var), op,
                ": prior_var must be positive and finite, got ", prior_var);
    if (prior_vars.has_value()) {
      TORCH_CHECK(static_cast<int64_t>(prior_vars->size()) == count, op, ": got ",
                  prior_vars->size(), " prior_vars for ", count, " tensors");
    }
    if (prior_means.has_value()) {
      TORCH_CHECK(static_cast<int64_t>(prior_means->size()) == count, op, ": got ",
                  prior_means->size(), " prior_means for ", count, " tensors");
    }
  }
  const size_t vec_bytes = 4 * at::elementSize(group.dtype);
  auto vec_aligned = [&](const void* ptr) {
    return reinterpret_cast<uintptr_t>(ptr) % vec_bytes == 0;
  };
  group.descs.resize(static_cast<size_t>(count));
  for (int64_t t = 0; t < count; ++t) {
    const at::Tensor& mean = means[t];
    const at::Tensor& logvar = logvars[t];
    TORCH_CHECK(mean.device() == group.device && logvar.device() == group.device, op,
                ": means[", t, "] and logvars[", t, "] must be on ", group.device, ", got ",
                mean.device(), " and ", logvar.device());
    TORCH_CHECK(mean.scalar_type() == group.dtype && logvar.scalar_type() == group.dtype, op,
                ": means[", t, "] and logvars[", t, "] must be ", group.dtype, ", got ",
                mean.scalar_type(), " and ", logvar.scalar_type());
    TORCH_CHECK(mean.sizes() == logvar.sizes(), op, ": means[", t, "] has shape ", mean.sizes(),
                " but logvars[", t, "] has shape ", logvar.sizes());
    TORCH_CHECK(mean.is_contiguous() && logvar.is_contiguous(), op, ": means[", t,
                "] and logvars[", t, "] must be contiguous");
    TensorDesc& d = group.descs[static_cast<size_t>(t)];
    d.mean = mean.data_ptr();
    d.logvar = logvar.data_ptr();
    d.prior_mean = nullptr;
    d.numel = mean.numel();
    d.prior_var = 1.0;
    d.log_prior_var = 0.0;
    if (with_prior) {
      const double pv = prior_vars.has_value() ? (*prior_vars)[t] : prior_var;
      TORCH_CHECK(pv > 0.0 && std::isfinite(pv), op, ": prior_vars[", t,
                  "] must be positive and finite, got ", pv);
      d.prior_var = pv;
      d.log_prior_var = std::log(pv);
      if (prior_means.has_value()) {
        at::Tensor pm = (*prior_means)[t];
        TORCH_CHECK(pm.device() == group.device, op, ": prior_means[", t, "] must be on ",
                    group.device, ", got ", pm.device());
        TORCH_CHECK(pm.numel() == mean.numel(), op, ": prior_means[", t, "] has ", pm.numel(),
                    " elements but means[", t, "] has ", mean.numel());
        pm = pm.to(group.dtype).contiguous();
        d.prior_mean = pm.data_ptr();
        group.keep_alive.push_back(pm);
      }
    }
    d.vec_ok = vec_aligned(d.mean) && vec_aligned(d.logvar) &&
               (d.prior_mean == nullptr || vec_aligned(d.prior_mean));
    d.pad = 0;
    group.numel += d.numel;
  }
  return group;
}

// Device tables, kept while the data pointers are unchanged (a training loop reuses the same
// parameters every step, so the table is uploaded once). A table used under CUDA graph
// capture is never evicted: the graph keeps reading it on every replay.
class TableCache {
 public:
  const void* get(const Group& group, cudaStream_t stream) {
    const int64_t count = static_cast<int64_t>(group.descs.size());
    std::string key(cuda::table_bytes(count) + sizeof(int64_t), '\0');
    const int64_t device = group.device.index();
    std::memcpy(key.data(), &device, sizeof(int64_t));
    cuda::fill_table(key.data() + sizeof(int64_t), group.descs.data(), count);
    const bool capturing =
        c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;

    std::lock_guard<std::mutex> lock(mutex_);
    auto found = entries_.find(key);
    if (found != entries_.end()) {
      Entry& entry = found->second;
      lru_.splice(lru_.end(), lru_, entry.position);
      entry.pinned = entry.pinned || capturing;
      if (!capturing && entry.stream != stream) {
        // The table may be freed on eviction: tell the allocator this stream reads it.
        c10::cuda::CUDACachingAllocator::recordStream(
            entry.device_table.storage().data_ptr(),
            c10::cuda::getStreamFromExternal(stream, group.device.index()));
      }
      return entry.device_table.data_ptr();
    }
    if (!capturing) evict();
    const int64_t bytes = static_cast<int64_t>(key.size() - sizeof(int64_t));
    at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), key.data() + sizeof(int64_t), static_cast<size_t>(bytes));
    at::Tensor dev = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(group.device));
    // Pinned source and non_blocking: an asynchronous copy (also valid under capture, the host
    // image is kept alive with the entry).
    dev.copy_(host, /*non_blocking=*/true);
    lru_.push_back(key);
    Entry entry{host, dev, stream, capturing, std::prev(lru_.end())};
    const void* ptr = dev.data_ptr();
    entries_.emplace(std::move(key), std::move(entry));
    return ptr;
  }

 private:
  struct Entry {
    at::Tensor host_table;
    at::Tensor device_table;
    cudaStream_t stream;
    bool pinned;
    std::list<std::string>::iterator position;
  };

  void evict() {
    auto it = lru_.begin();
    while (entries_.size() >= kMaxEntries && it != lru_.end()) {
      auto entry = entries_.find(*it);
      if (entry->second.pinned) {
        ++it;
        continue;
      }
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

int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_kernel(
    at::TensorList means, at::TensorList logvars, std::optional<int64_t> n,
    std::optional<at::ScalarType> out_dtype, bool with_kl, double prior_var,
    std::optional<at::ArrayRef<double>> prior_vars, std::optional<at::TensorList> prior_means,
    int64_t stream_id) {
  constexpr const char* op = "fastbnf::sample_kernel";
  TORCH_CHECK(!n.has_value() || *n >= 0, op, ": n must be non-negative, got ", n.value_or(0));
  Group group = check_group(op, means, logvars, with_kl, prior_var, prior_vars, prior_means);
  const c10::cuda::CUDAGuard guard(group.device);
  const at::ScalarType theta_type = out_dtype.value_or(group.dtype);
  const int64_t samples = n.value_or(1);
  const auto options = at::TensorOptions().device(group.device);
  std::vector<int64_t> shape;
  if (n.has_value()) shape.push_back(samples);
  shape.push_back(group.numel);
  at::Tensor theta = at::empty(shape, options.dtype(theta_type));
  at::Tensor kl = at::empty({}, options.dtype(group.dtype));
  at::Tensor rng_state = at::empty({2}, options.dtype(at::kLong));
  const auto workspace_bytes = static_cast<int64_t>(cuda::forward_workspace_bytes(group.numel));
  at::Tensor workspace = at::empty({workspace_bytes}, options.dtype(at::kByte));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  cuda::ForwardArgs args;
  args.dtype = to_dtype(group.dtype, op, "means");
  args.out_dtype = to_dtype(theta_type, op, "out_dtype");
  args.table = table_cache().get(group, stream);
  args.num_tensors = static_cast<int64_t>(group.descs.size());
  args.numel = group.numel;
  args.samples = samples;
  args.mode = cuda::ForwardMode::kSample;
  args.with_kl = with_kl;
  args.out = theta.data_ptr();
  args.kl = kl.data_ptr();
  args.rng_state = rng_state.data_ptr<int64_t>();
  args.workspace = workspace.data_ptr();
  args.num_sms = num_sms();

  // The key is taken under the generator's lock, as ATen's fused dropout does; the kernel
  // unpacks it (a captured graph then reads a fresh offset on each replay) and writes it to
  // rng_state for the backward.
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      std::nullopt, at::cuda::detail::getDefaultCUDAGenerator(group.device.index()));
  at::PhiloxCudaState philox;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(4);
  }
  args.rng.stream = static_cast<uint64_t>(stream_id);
  args.rng.captured = philox.captured_;
  if (philox.captured_) {
    args.rng.seed_ptr = philox.seed_.ptr;
    args.rng.offset_ptr = philox.offset_.ptr;
    args.rng.offset_intragraph = philox.offset_intragraph_;
  } else {
    args.rng.seed = philox.seed_.val;
    args.rng.offset = philox.offset_.val;
  }

  C10_CUDA_CHECK(cuda::launch_forward(args, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {theta, kl, rng_state};
}

std::tuple<at::Tensor, at::Tensor> backward_impl(
    const char* op, const at::Tensor* grad_theta, const at::Tensor& grad_kl,
    at::TensorList means, at::TensorList logvars, const at::Tensor* rng_state, bool with_kl,
    double prior_var, const std::optional<at::ArrayRef<double>>& prior_vars,
    const std::optional<at::TensorList>& prior_means) {
  Group group = check_group(op, means, logvars, with_kl, prior_var, prior_vars, prior_means);
  const c10::cuda::CUDAGuard guard(group.device);
  const int64_t numel = group.numel;
  const auto options = at::TensorOptions().device(group.device).dtype(group.dtype);

  cuda::BackwardArgs args;
  args.dtype = to_dtype(group.dtype, op, "means");
  args.numel = numel;
  args.num_tensors = static_cast<int64_t>(group.descs.size());
  args.with_kl = with_kl;
  at::Tensor grad_theta_c, grad_kl_c, rng_state_c;
  if (grad_theta != nullptr) {
    const at::Tensor& g = *grad_theta;
    TORCH_CHECK(g.device() == group.device, op, ": grad_theta must be on ", group.device,
                ", got ", g.device());
    TORCH_CHECK((g.dim() == 1 && g.size(0) == numel) || (g.dim() == 2 && g.size(1) == numel),
                op, ": grad_theta must have shape (", numel, ",) or (n, ", numel, "), got ",
                g.sizes());
    args.grad_dtype = to_dtype(g.scalar_type(), op, "grad_theta");
    grad_theta_c = g.contiguous();
    args.samples = g.dim() == 1 ? 1 : g.size(0);
    args.grad_theta = grad_theta_c.data_ptr();
    TORCH_CHECK(rng_state != nullptr && rng_state->device() == group.device &&
                    rng_state->scalar_type() == at::kLong && rng_state->numel() == 2,
                op, ": rng_state must be an int64 tensor of 2 elements on ", group.device);
    rng_state_c = rng_state->contiguous();
    args.rng_state = rng_state_c.data_ptr<int64_t>();
  }
  if (with_kl) {
    TORCH_CHECK(grad_kl.numel() == 1, op, ": grad_kl must have one element, got shape ",
                grad_kl.sizes());
    TORCH_CHECK(grad_kl.device() == group.device, op, ": grad_kl must be on ", group.device,
                ", got ", grad_kl.device());
    grad_kl_c = grad_kl.to(group.dtype).contiguous();
    args.grad_kl = grad_kl_c.data_ptr();
  }
  at::Tensor grad_means = at::empty({numel}, options);
  at::Tensor grad_logvars = at::empty({numel}, options);
  if (args.samples == 0 && !with_kl) {
    grad_means.zero_();
    grad_logvars.zero_();
    return {grad_means, grad_logvars};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  args.table = table_cache().get(group, stream);
  args.grad_mean = grad_means.data_ptr();
  args.grad_logvar = grad_logvars.data_ptr();
  args.num_sms = num_sms();
  C10_CUDA_CHECK(cuda::launch_backward(args, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_means, grad_logvars};
}

std::tuple<at::Tensor, at::Tensor> sample_backward_kernel(
    const at::Tensor& grad_theta, const at::Tensor& grad_kl, at::TensorList means,
    at::TensorList logvars, const at::Tensor& rng_state, bool with_kl, double prior_var,
    std::optional<at::ArrayRef<double>> prior_vars, std::optional<at::TensorList> prior_means) {
  return backward_impl("fastbnf::sample_backward_kernel", &grad_theta, grad_kl, means, logvars,
                       &rng_state, with_kl, prior_var, prior_vars, prior_means);
}

std::tuple<at::Tensor, at::Tensor> kl_backward_kernel(
    const at::Tensor& grad_kl, at::TensorList means, at::TensorList logvars, double prior_var,
    std::optional<at::ArrayRef<double>> prior_vars, std::optional<at::TensorList> prior_means) {
  return backward_impl("fastbnf::kl_backward_kernel", nullptr, grad_kl, means, logvars, nullptr,
                       /*with_kl=*/true, prior_var, prior_vars, prior_means);
}

at::Tensor forward_other(const char* op, cuda::ForwardMode mode, at::TensorList means,
                         at::TensorList logvars, double prior_var,
                         const std::optional<at::ArrayRef<double>>& prior_vars,
                         const std::optional<at::TensorList>& prior_means) {
  const bool with_prior = mode == cuda::ForwardMode::kKL;
  Group group = check_group(op, means, logvars, with_prior, prior_var, prior_vars, prior_means);
  const c10::cuda::CUDAGuard guard(group.device);
  const auto options = at::TensorOptions().device(group.device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cuda::ForwardArgs args;
  args.dtype = to_dtype(group.dtype, op, "means");
  args.out_dtype = args.dtype;
  args.table = table_cache().get(group, stream);
  args.num_tensors = static_cast<int64_t>(group.descs.size());
  args.numel = group.numel;
  args.mode = mode;
  args.num_sms = num_sms();
  at::Tensor result, workspace;
  if (mode == cuda::ForwardMode::kKL) {
    result = at::empty({}, options.dtype(group.dtype));
    workspace = at::empty({static_cast<int64_t>(cuda::forward_workspace_bytes(group.numel))},
                          options.dtype(at::kByte));
    args.kl = result.data_ptr();
    args.workspace = workspace.data_ptr();
  } else {
    result = at::empty({group.numel}, options.dtype(group.dtype));
    args.out = result.data_ptr();
  }
  C10_CUDA_CHECK(cuda::launch_forward(args, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return result;
}

at::Tensor kl_kernel(at::TensorList means, at::TensorList logvars, double prior_var,
                     std::optional<at::ArrayRef<double>> prior_vars,
                     std::optional<at::TensorList> prior_means) {
  return forward_other("fastbnf::kl_kernel", cuda::ForwardMode::kKL, means, logvars, prior_var,
                       prior_vars, prior_means);
}

at::Tensor variance_kernel(at::TensorList logvars) {
  // The table wants means: logvars stand in for them (never read as means here).
  return forward_other("fastbnf::variance_kernel", cuda::ForwardMode::kVariance, logvars,
                       logvars, 1.0, std::nullopt, std::nullopt);
}

}  // namespace
}  // namespace fastbnf

TORCH_LIBRARY_IMPL(fastbnf, CUDA, m) {
  m.impl("sample_kernel", &fastbnf::sample_kernel);
  m.impl("sample_backward_kernel", &fastbnf::sample_backward_kernel);
  m.impl("kl_kernel", &fastbnf::kl_kernel);
  m.impl("kl_backward_kernel", &fastbnf::kl_backward_kernel);
  m.impl("variance_kernel", &fastbnf::variance_kernel);
}
