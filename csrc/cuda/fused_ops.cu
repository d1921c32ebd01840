// Fused CUDA kernels: posterior sampling with the Gaussian KL in one launch per group, and the
// backward that regenerates eps. Torch-free (raw pointers, sizes, the Philox key and a stream),
// so that nvcc compiles this file on any machine. The maths and the RNG contract are in
// csrc/README.md; the Philox stream is the one of common/philox.h, shared with the CPU kernels.
#include "fused_ops.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>

#include "../common/philox.h"

namespace fastbnf {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kGroupsPerThread = 4;
// A tile is a fixed-size run of elements, the unit of the KL partial sums: the partials, hence
// the KL, do not depend on the grid size or the number of SMs.
constexpr int64_t kTile = int64_t{kThreads} * kGroupsPerThread * 4;
constexpr double kBound = 18.0;

// ---------------------------------------------------------------------------------------------
// Element types

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> struct Cvt;
template <> struct Cvt<float> {
  __device__ static float from(float x) { return x; }
  __device__ static float from(double x) { return static_cast<float>(x); }
};
template <> struct Cvt<double> {
  __device__ static double from(float x) { return x; }
  __device__ static double from(double x) { return x; }
};
template <> struct Cvt<__half> {
  __device__ static __half from(float x) { return __float2half_rn(x); }
  __device__ static __half from(double x) { return __double2half(x); }
};
template <> struct Cvt<__nv_bfloat16> {
  __device__ static __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
  __device__ static __nv_bfloat16 from(double x) { return __double2bfloat16(x); }
};

// Four consecutive elements, one Philox block: 16 bytes for fp32, 8 for fp16 / bf16, 2 x 16 for
// fp64.
template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename T, typename A>
__device__ __forceinline__ void load4(const void* base, int64_t index, A out[4]) {
  const Vec4<T> vec = *reinterpret_cast<const Vec4<T>*>(static_cast<const T*>(base) + index);
#pragma unroll
  for (int q = 0; q < 4; ++q) out[q] = static_cast<A>(to_acc(vec.v[q]));
}

template <typename T, typename A>
__device__ __forceinline__ A load1(const void* base, int64_t index) {
  return static_cast<A>(to_acc(static_cast<const T*>(base)[index]));
}

template <typename T, typename A>
__device__ __forceinline__ void store4(void* base, int64_t index, const A in[4]) {
  Vec4<T> vec;
#pragma unroll
  for (int q = 0; q < 4; ++q) vec.v[q] = Cvt<T>::from(in[q]);
  *reinterpret_cast<Vec4<T>*>(static_cast<T*>(base) + index) = vec;
}

template <typename T, typename A>
__device__ __forceinline__ void store1(void* base, int64_t index, A x) {
  static_cast<T*>(base)[index] = Cvt<T>::from(x);
}

template <typename A> __device__ __forceinline__ A dev_sqrt(A x);
template <> __device__ __forceinline__ float dev_sqrt(float x) { return sqrtf(x); }
template <> __device__ __forceinline__ double dev_sqrt(double x) { return sqrt(x); }
template <typename A> __device__ __forceinline__ A dev_exp(A x);
template <> __device__ __forceinline__ float dev_exp(float x) { return expf(x); }
template <> __device__ __forceinline__ double dev_exp(double x) { return exp(x); }

// ---------------------------------------------------------------------------------------------
// Table and RNG

struct Table {
  const int64_t* starts;
  const TensorDesc* descs;
  int64_t count;
};

__device__ __forceinline__ Table view_table(const void* table, int64_t count) {
  const int64_t* starts = static_cast<const int64_t*>(table);
  return Table{starts, reinterpret_cast<const TensorDesc*>(starts + count + 1), count};
}

// The tensor that holds flat element i: the last t in [lo, hi] with starts[t] <= i, which skips
// empty tensors.
__device__ __forceinline__ int64_t find_tensor(const Table& table, int64_t i, int64_t lo,
                                               int64_t hi) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (__ldg(table.starts + mid) <= i) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// The four normals of one Philox block. Not inlined: compiled once for all the kernels of this
// file instead of once per dtype pair (the transcendental functions are most of the code).
__device__ __noinline__ float4 normals_of_block(uint64_t block, uint64_t seed, uint64_t offset) {
  float out[4];
  normal4(philox_block(block, seed, offset), out);
  return make_float4(out[0], out[1], out[2], out[3]);
}

// eps of the four flat sample indices jbase .. jbase + 3 (one Philox block, or two when jbase
// is not a multiple of 4, which happens for samples k > 0 when N is not).
__device__ __forceinline__ void eps4(uint64_t jbase, uint64_t seed, uint64_t offset,
                                     float eps[4]) {
  const int r = static_cast<int>(jbase & 3);
  const int blocks = r == 0 ? 1 : 2;
#pragma unroll 1
  for (int b = 0; b < blocks; ++b) {
    const float4 v = normals_of_block((jbase >> 2) + b, seed, offset);
    const float a[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        if (r + q == s + 4 * b) eps[q] = a[s];
      }
    }
  }
}

__device__ __forceinline__ double block_sum(double value, double* shared) {
  // A fixed shuffle tree then the warps in order: the same result for the same inputs.
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) {
    value += __shfl_down_sync(0xffffffffu, value, delta);
  }
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) shared[warp] = value;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) total += shared[w];
  }
  __syncthreads();
  return total;  // valid in thread 0
}

// The elements of one group of four: values loaded and the prior of each element.
template <typename A>
struct Group4 {
  A mean[4], logvar[4], prior_mean[4], prior_var[4], log_prior_var[4];
  int count;  // valid elements, 1..4
};

// Loads the four flat elements i0 .. i0 + 3 (fewer at the end of the group); t is the tensor
// of i0. Vector loads when the four lie in one aligned stretch of one tensor.
template <typename T, typename A>
__device__ __forceinline__ void load_group(const Table& table, int64_t n, int64_t i0, int64_t t,
                                           bool with_prior, Group4<A>& g) {
  g.count = n - i0 < 4 ? static_cast<int>(n - i0) : 4;
  const int64_t start = __ldg(table.starts + t);
  const int64_t end = __ldg(table.starts + t + 1);
  const TensorDesc& d = table.descs[t];
  if (g.count == 4 && i0 + 4 <= end && ((i0 - start) & 3) == 0 && d.vec_ok) {
    const int64_t local = i0 - start;
    load4<T, A>(d.mean, local, g.mean);
    load4<T, A>(d.logvar, local, g.logvar);
    if (with_prior && d.prior_mean != nullptr) {
      load4<T, A>(d.prior_mean, local, g.prior_mean);
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) g.prior_mean[q] = A(0);
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      g.prior_var[q] = static_cast<A>(d.prior_var);
      g.log_prior_var[q] = static_cast<A>(d.log_prior_var);
    }
    return;
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    g.mean[q] = A(0);
    g.logvar[q] = A(0);
    g.prior_mean[q] = A(0);
    g.prior_var[q] = A(1);
    g.log_prior_var[q] = A(0);
    if (q < g.count) {
      const int64_t i = i0 + q;
      while (i >= __ldg(table.starts + t + 1)) ++t;
      const TensorDesc& e = table.descs[t];
      const int64_t local = i - __ldg(table.starts + t);
      g.mean[q] = load1<T, A>(e.mean, local);
      g.logvar[q] = load1<T, A>(e.logvar, local);
      if (with_prior && e.prior_mean != nullptr) {
        g.prior_mean[q] = load1<T, A>(e.prior_mean, local);
      }
      g.prior_var[q] = static_cast<A>(e.prior_var);
      g.log_prior_var[q] = static_cast<A>(e.log_prior_var);
    }
  }
}

struct Key {
  uint64_t seed, offset;
};

__device__ __forceinline__ Key unpack_key(const PhiloxArgs& rng) {
  // at::cuda::philox::unpack: under graph capture the seed and offset are read from device
  // memory that each replay updates.
  uint64_t seed = rng.seed, offset = rng.offset;
  if (rng.captured) {
    seed = static_cast<uint64_t>(*rng.seed_ptr);
    offset = static_cast<uint64_t>(*rng.offset_ptr) + rng.offset_intragraph;
  }
  return Key{fold_stream(seed, rng.stream), offset};
}

// ---------------------------------------------------------------------------------------------
// Kernels

struct ForwardParams {
  const void* table;
  int64_t num_tensors;
  int64_t numel;
  int64_t samples;
  int64_t num_tiles;
  int32_t mode;
  int32_t with_kl;
  int32_t out_aligned;
  void* out;
  void* kl;
  int64_t* rng_state;
  PhiloxArgs rng;
  double* partials;
  unsigned int* counter;
};

template <typename T, typename O>
__global__ void __launch_bounds__(kThreads) forward_kernel(const ForwardParams p) {
  using A = typename Acc<T>::type;
  __shared__ double shared[kThreads / 32];
  __shared__ bool is_last;

  const Table table = view_table(p.table, p.num_tensors);
  const bool sample = p.mode == static_cast<int32_t>(ForwardMode::kSample);
  const bool variance = p.mode == static_cast<int32_t>(ForwardMode::kVariance);
  const bool with_kl = p.with_kl != 0;
  const int64_t n = p.numel;
  Key key{0, 0};
  if (sample) {
    key = unpack_key(p.rng);
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      p.rng_state[0] = static_cast<int64_t>(key.seed);
      p.rng_state[1] = static_cast<int64_t>(key.offset);
    }
  }

  for (int64_t tile = blockIdx.x; tile < p.num_tiles; tile += gridDim.x) {
    const int64_t tile_start = tile * kTile;
    const int64_t tile_last = min(tile_start + kTile, n) - 1;
    const int64_t t_lo = find_tensor(table, tile_start, 0, p.num_tensors - 1);
    const int64_t t_hi = find_tensor(table, tile_last, t_lo, p.num_tensors - 1);
    double kl_sum = 0.0;
#pragma unroll 1
    for (int u = 0; u < kGroupsPerThread; ++u) {
      const int64_t i0 = tile_start + (int64_t{u} * kThreads + threadIdx.x) * 4;
      if (i0 >= n) continue;
      const int64_t t = (t_lo == t_hi) ? t_lo : find_tensor(table, i0, t_lo, t_hi);
      Group4<A> g;
      load_group<T, A>(table, n, i0, t, with_kl, g);
      A sigma[4], var[4], lv[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const A x = g.logvar[q] / static_cast<A>(kBound);
        lv[q] = g.logvar[q] / dev_sqrt(A(1) + x * x);
        sigma[q] = dev_exp(lv[q] / A(2));
        var[q] = dev_exp(lv[q]);
      }
      if (sample) {
        for (int64_t k = 0; k < p.samples; ++k) {
          const int64_t jbase = k * n + i0;
          float eps[4];
          eps4(static_cast<uint64_t>(jbase), key.seed, key.offset, eps);
          A theta[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) theta[q] = g.mean[q] + sigma[q] * static_cast<A>(eps[q]);
          if (g.count == 4 && p.out_aligned && (jbase & 3) == 0) {
            store4<O, A>(p.out, jbase, theta);
          } else {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              if (q < g.count) store1<O, A>(p.out, jbase + q, theta[q]);
            }
          }
        }
      } else if (variance) {
        if (g.count == 4 && p.out_aligned) {
          store4<T, A>(p.out, i0, var);
        } else {
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            if (q < g.count) store1<T, A>(p.out, i0 + q, var[q]);
          }
        }
      }
      if (with_kl) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          if (q < g.count) {
            const A diff = g.mean[q] - g.prior_mean[q];
            const A term = A(0.5) * (var[q] / g.prior_var[q] + diff * diff / g.prior_var[q] +
                                     g.log_prior_var[q] - lv[q] - A(1));
            kl_sum += static_cast<double>(term);
          }
        }
      }
    }
    if (with_kl) {
      const double total = block_sum(kl_sum, shared);
      if (threadIdx.x == 0) p.partials[tile] = total;
    }
  }

  if (!with_kl) {
    if (p.kl != nullptr && blockIdx.x == 0 && threadIdx.x == 0) store1<T, double>(p.kl, 0, 0.0);
    return;
  }
  // The last block to finish adds the tile partials in a fixed order (its threads take fixed
  // strided slices, then the fixed tree of block_sum), so the KL is the same for any grid.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(p.counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  double acc = 0.0;
  for (int64_t tile = threadIdx.x; tile < p.num_tiles; tile += kThreads) {
    acc += __ldcg(p.partials + tile);
  }
  const double total = block_sum(acc, shared);
  if (threadIdx.x == 0) {
    store1<T, double>(p.kl, 0, total);
    *p.counter = 0u;
  }
}

struct BackwardParams {
  const void* table;
  int64_t num_tensors;
  int64_t numel;
  int64_t samples;
  int64_t num_tiles;
  const void* grad_theta;
  const void* grad_kl;
  int32_t with_kl;
  int32_t grad_theta_aligned;
  int32_t out_aligned;
  const int64_t* rng_state;
  void* grad_mean;
  void* grad_logvar;
};

template <typename T, typename G>
__global__ void __launch_bounds__(kThreads) backward_kernel(const BackwardParams p) {
  using A = typename Acc<T>::type;
  const Table table = view_table(p.table, p.num_tensors);
  const bool with_kl = p.with_kl != 0;
  const int64_t n = p.numel;
  uint64_t seed = 0, offset = 0;
  if (p.samples > 0) {
    seed = static_cast<uint64_t>(p.rng_state[0]);
    offset = static_cast<uint64_t>(p.rng_state[1]);
  }
  const A grad_kl = with_kl ? load1<T, A>(p.grad_kl, 0) : A(0);

  for (int64_t tile = blockIdx.x; tile < p.num_tiles; tile += gridDim.x) {
    const int64_t tile_start = tile * kTile;
    const int64_t tile_last = min(tile_start + kTile, n) - 1;
    const int64_t t_lo = find_tensor(table, tile_start, 0, p.num_tensors - 1);
    const int64_t t_hi = find_tensor(table, tile_last, t_lo, p.num_tensors - 1);
#pragma unroll 1
    for (int u = 0; u < kGroupsPerThread; ++u) {
      const int64_t i0 = tile_start + (int64_t{u} * kThreads + threadIdx.x) * 4;
      if (i0 >= n) continue;
      const int64_t t = (t_lo == t_hi) ? t_lo : find_tensor(table, i0, t_lo, t_hi);
      Group4<A> g;
      load_group<T, A>(table, n, i0, t, with_kl, g);
      A g_sum[4] = {A(0), A(0), A(0), A(0)};
      A ge_sum[4] = {A(0), A(0), A(0), A(0)};
      for (int64_t k = 0; k < p.samples; ++k) {
        const int64_t jbase = k * n + i0;
        float eps[4];
        eps4(static_cast<uint64_t>(jbase), seed, offset, eps);
        A grad[4];
        if (g.count == 4 && p.grad_theta_aligned && (jbase & 3) == 0) {
          load4<G, A>(p.grad_theta, jbase, grad);
        } else {
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            grad[q] = q < g.count ? load1<G, A>(p.grad_theta, jbase + q) : A(0);
          }
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          g_sum[q] += grad[q];
          ge_sum[q] += grad[q] * static_cast<A>(eps[q]);
        }
      }
      A d_mean[4], d_logvar[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const A x = g.logvar[q] / static_cast<A>(kBound);
        const A r = A(1) / dev_sqrt(A(1) + x * x);
        const A lv = g.logvar[q] * r;
        const A slope = r * r * r;
        const A sigma = dev_exp(lv / A(2));
        A dm = g_sum[q];
        A dlv = A(0.5) * sigma * ge_sum[q];
        if (with_kl) {
          dm += grad_kl * (g.mean[q] - g.prior_mean[q]) / g.prior_var[q];
          dlv += grad_kl * A(0.5) * (dev_exp(lv) / g.prior_var[q] - A(1));
        }
        d_mean[q] = dm;
        d_logvar[q] = slope * dlv;
      }
      if (g.count == 4 && p.out_aligned) {
        store4<T, A>(p.grad_mean, i0, d_mean);
        store4<T, A>(p.grad_logvar, i0, d_logvar);
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          if (q < g.count) {
            store1<T, A>(p.grad_mean, i0 + q, d_mean[q]);
            store1<T, A>(p.grad_logvar, i0 + q, d_logvar[q]);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Dispatch

template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat64: f(double{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned grid_size(int64_t num_tiles, int num_sms) {
  const int64_t per_sm = 2048 / kThreads;
  const int64_t blocks = std::min<int64_t>(num_tiles, int64_t{std::max(num_sms, 1)} * per_sm);
  return static_cast<unsigned>(std::max<int64_t>(blocks, 1));
}

bool aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat64: return 8;
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    default: return 4;
  }
}

constexpr size_t kCounterBytes = 16;

}  // namespace

size_t table_bytes(int64_t num_tensors) {
  return sizeof(int64_t) * static_cast<size_t>(num_tensors + 1) +
         sizeof(TensorDesc) * static_cast<size_t>(num_tensors);
}

int64_t fill_table(void* host, const TensorDesc* descs, int64_t num_tensors) {
  int64_t* starts = static_cast<int64_t*>(host);
  int64_t total = 0;
  for (int64_t t = 0; t < num_tensors; ++t) {
    starts[t] = total;
    total += descs[t].numel;
  }
  starts[num_tensors] = total;
  std::memcpy(starts + num_tensors + 1, descs,
              sizeof(TensorDesc) * static_cast<size_t>(num_tensors));
  return total;
}

size_t forward_workspace_bytes(int64_t numel) {
  return kCounterBytes + sizeof(double) * static_cast<size_t>(ceil_div(numel, kTile));
}

cudaError_t launch_forward(const ForwardArgs& args, cudaStream_t stream) {
  ForwardParams p{};
  p.table = args.table;
  p.num_tensors = args.num_tensors;
  p.numel = args.numel;
  p.samples = args.samples;
  p.num_tiles = ceil_div(args.numel, kTile);
  p.mode = static_cast<int32_t>(args.mode);
  p.with_kl =
      (args.mode == ForwardMode::kKL) || (args.mode == ForwardMode::kSample && args.with_kl);
  const DType out_dtype = args.mode == ForwardMode::kSample ? args.out_dtype : args.dtype;
  p.out_aligned = aligned(args.out, 4 * dtype_size(out_dtype));
  p.out = args.out;
  p.kl = args.kl;
  p.rng_state = args.rng_state;
  p.rng = args.rng;
  p.counter = static_cast<unsigned int*>(args.workspace);
  p.partials = reinterpret_cast<double*>(static_cast<char*>(args.workspace) + kCounterBytes);
  if (p.with_kl) {
    // The counter must start at zero; the last block leaves it at zero again.
    const cudaError_t err = cudaMemsetAsync(args.workspace, 0, kCounterBytes, stream);
    if (err != cudaSuccess) return err;
  }
  const unsigned grid = grid_size(p.num_tiles, args.num_sms);
  dispatch_dtype(args.dtype, [&](auto t_tag) {
    using T = decltype(t_tag);
    dispatch_dtype(out_dtype, [&](auto o_tag) {
      using O = decltype(o_tag);
      forward_kernel<T, O><<<grid, kThreads, 0, stream>>>(p);
    });
  });
  return cudaSuccess;
}

cudaError_t launch_backward(const BackwardArgs& args, cudaStream_t stream) {
  BackwardParams p{};
  p.table = args.table;
  p.num_tensors = args.num_tensors;
  p.numel = args.numel;
  p.samples = args.samples;
  p.num_tiles = ceil_div(args.numel, kTile);
  p.grad_theta = args.grad_theta;
  p.grad_kl = args.grad_kl;
  p.with_kl = args.with_kl;
  p.grad_theta_aligned = aligned(args.grad_theta, 4 * dtype_size(args.grad_dtype));
  p.out_aligned = aligned(args.grad_mean, 4 * dtype_size(args.dtype)) &&
                  aligned(args.grad_logvar, 4 * dtype_size(args.dtype));
  p.rng_state = args.rng_state;
  p.grad_mean = args.grad_mean;
  p.grad_logvar = args.grad_logvar;
  if (p.num_tiles == 0) return cudaSuccess;
  const unsigned grid = grid_size(p.num_tiles, args.num_sms);
  dispatch_dtype(args.dtype, [&](auto t_tag) {
    using T = decltype(t_tag);
    dispatch_dtype(args.samples > 0 ? args.grad_dtype : args.dtype, [&](auto g_tag) {
      using G = decltype(g_tag);
      backward_kernel<T, G><<<grid, kThreads, 0, stream>>>(p);
    });
  });
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace fastbnf
