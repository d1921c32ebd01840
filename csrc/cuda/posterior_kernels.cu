// The fused posterior kernels on CUDA: posterior sampling with the Gaussian KL in one launch per
// group, the KL alone, the variance, and the backward that regenerates eps, with their launchers
// launch_forward and launch_backward (launch.h). Torch-free (raw pointers, sizes, the Philox key
// and a stream), so that nvcc compiles this file on any machine.
//
// The per-element maths is posterior_math.h's and the noise philox.h's, shared with the CPU
// kernels (cpu/posterior_kernels.cpp); the walk over the tiles is tile_walk.cuh's. The KL's
// terms are summed in the compute type per thread and tile, and only the tile partials are
// combined in double: per-tile double partials (a fixed shuffle tree and the warps in order),
// which the last block to finish (an atomic counter) adds in a fixed order, in the same launch,
// so the KL does not depend on the grid.
#include <cuda_runtime.h>

#include <algorithm>

#include "launch.h"
#include "tile_walk.cuh"

namespace fastbnf {
namespace cuda {
namespace {

// One element of grad_kl, whatever its floating dtype (read once per thread).
template <typename S>
__device__ __forceinline__ S load_scalar(const void* p, int32_t dtype) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat64: return static_cast<S>(*static_cast<const double*>(p));
    case DType::kFloat16: return static_cast<S>(__half2float(*static_cast<const __half*>(p)));
    case DType::kBFloat16:
      return static_cast<S>(__bfloat162float(*static_cast<const __nv_bfloat16*>(p)));
    default: return static_cast<S>(*static_cast<const float*>(p));
  }
}

// ---------------------------------------------------------------------------------------------
// The KL's reduction

// Sum of one double per thread, valid in thread 0: a fixed shuffle tree, then the warps in
// order, so the same inputs give the same bits. slots: kWarps doubles of shared memory.
__device__ __forceinline__ double block_sum(double value, double* slots) {
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) {
    value += __shfl_down_sync(0xffffffffu, value, delta);
  }
  if (threadIdx.x % 32 == 0) slots[threadIdx.x / 32] = value;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += slots[w];
  }
  return total;
}

// The KL's reduction state of a block.
struct KLReduce {
  double* partials;
  unsigned int* counter;
  int64_t num_tiles;
};

// The partial of one tile (a block-wide sum of each thread's terms) into partials[tile].
// Double-buffered slots: one barrier per tile.
__device__ __forceinline__ void tile_partial(double value, double (*slots)[kWarps], int& parity,
                                             double* partials, int64_t tile) {
  const double total = block_sum(value, slots[parity]);
  if (threadIdx.x == 0) partials[tile] = total;
  parity ^= 1;
}

// After the tiles: the last block to finish adds the partials in a fixed order (each thread a
// fixed strided slice, then block_sum) and writes the KL.
template <typename T>
__device__ __forceinline__ void finish_kl(const KLReduce& r, double* slots, void* kl) {
  __shared__ bool is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(r.counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  double acc = 0.0;
#pragma unroll 4
  for (int64_t tile = threadIdx.x; tile < r.num_tiles; tile += kThreads) {
    acc += __ldcg(r.partials + tile);
  }
  const double total = block_sum(acc, slots);
  if (threadIdx.x == 0) {
    store1(static_cast<T*>(kl), total);
    *r.counter = 0u;  // ready for the next launch
  }
}

// ---------------------------------------------------------------------------------------------
// Kernels

// The means and log-variances of a thread's two quads of a segment (the second one when
// has2), every load issued before any is used.
template <typename T, typename S>
__device__ __forceinline__ void load_pair(const Seg<T>& s, const int off[2], bool has2, S mu[2][4],
                                          S l[2][4]) {
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    if (u == 0 || has2) {
      load4(s.mean + off[u], mu[u]);
      load4(s.logvar + off[u], l[u]);
    }
  }
}

struct SampleParams {
  Common c;
  int64_t samples;
  int32_t with_kl;
  int32_t out_vec;  // theta's pointer aligned for 4-element stores
  void* out;
  void* kl;
  int64_t* rng_state;
  PhiloxArgs rng;
};

// theta = mu + sigma * eps for every sample, and the KL when with_kl.
template <typename T, typename O>
__global__ void __launch_bounds__(kThreads, Traits<T>::kMinBlocks)
    sample_forward_kernel(const SampleParams p) {
  using S = typename Traits<T>::S;
  using M = DeviceMath;
  __shared__ double slots[2][kWarps];
  const Key key = unpack_key(p.rng);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    p.rng_state[0] = static_cast<int64_t>(key.salted_seed);
    p.rng_state[1] = static_cast<int64_t>(key.offset);
  }
  const bool with_kl = p.with_kl != 0;
  const int64_t n = p.c.numel;
  O* out = static_cast<O*>(p.out);
  S kl_acc = S(0);
  int parity = 0;

  // sigma of one element, and its KL term into kl_acc.
  auto element_sigma = [&](S mu, S lv, bool prior, S m, S inv_var, S log_var_m1) {
    const S lc = pm::softclip(lv, pm::softclip_scale<M>(lv));
    if (with_kl) {
      const S d = prior ? pm::sub(mu, m) : mu;
      kl_acc = pm::add(kl_acc, pm::kl_term(d, pm::variance<M>(lc), lc, inv_var, log_var_m1));
    }
    return pm::sigma<M>(lc);
  };

  // theta of 4 elements of row k (flat sample index j) into out.
  auto store_row = [&](int64_t j, const S mu[4], const S sg[4], const float e[4], int count) {
    S th[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) th[q] = pm::theta(mu[q], sg[q], static_cast<S>(e[q]));
    if (count == 4 && p.out_vec && (j & 3) == 0) {
      store4(out + j, th);
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (q < count) store1(out + j + q, th[q]);
      }
    }
  };

  auto pair = [&](const Seg<T>& s, int g, bool has2, int64_t ts) {
    const int off[2] = {4 * g, 4 * (g + kThreads)};
    const bool prior = with_kl && s.prior_mean != nullptr;
    // All the loads of both quads first, then each quad's maths and noise.
    S mu[2][4], l[2][4];
    load_pair(s, off, has2, mu, l);
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (u == 0 || has2) {
        S m[4] = {S(0), S(0), S(0), S(0)};
        if (prior) load4(s.prior_mean + off[u], m);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          l[u][q] = element_sigma(mu[u][q], l[u][q], prior, m[q], s.inv_var, s.log_var_m1);
        }
        const int64_t i0 = ts + off[u];
        for (int64_t k = 0; k < p.samples; ++k) {
          const int64_t j = k * n + i0;
          float e[4];
          if (k == 0) {
            eps4_aligned(static_cast<uint64_t>(j), key.key, key.offset, e);
          } else {
            eps4(static_cast<uint64_t>(j), key.key, key.offset, e);
          }
          store_row(j, mu[u], l[u], e, 4);
        }
      }
    }
  };

  auto slow = [&](int t, int64_t i0) {
    const int count = static_cast<int>(min(int64_t{4}, n - i0));
    S mu[4], sg[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      mu[q] = sg[q] = S(0);
      if (q < count) {
        const Elem<T> x = element_of<T>(p.c.tensors, t, i0 + q);
        mu[q] = x.mean();
        const bool prior = with_kl && x.has_prior_mean();
        sg[q] = element_sigma(mu[q], x.logvar(), prior, prior ? x.prior_mean() : S(0), x.inv_var(),
                              x.log_var_m1());
      }
    }
    for (int64_t k = 0; k < p.samples; ++k) {
      const int64_t j = k * n + i0;
      float e[4];
      eps4(static_cast<uint64_t>(j), key.key, key.offset, e);
      store_row(j, mu, sg, e, count);
    }
  };

  auto tile_end = [&](int64_t tile) {
    if (!with_kl) return;
    tile_partial(static_cast<double>(kl_acc), slots, parity, p.c.partials, tile);
    kl_acc = S(0);
  };

  for_each_tile<T>(p.c.tensors, p.c.tile_first, n, p.c.num_tiles, pair, slow, tile_end);

  if (with_kl) {
    finish_kl<T>(KLReduce{p.c.partials, p.c.counter, p.c.num_tiles}, slots[0], p.kl);
  } else if (p.kl != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
    store1(static_cast<T*>(p.kl), S(0));
  }
}

struct KLParams {
  Common c;
  void* kl;
};

// The KL alone.
template <typename T>
__global__ void __launch_bounds__(kThreads, Traits<T>::kMinBlocks)
    kl_forward_kernel(const KLParams p) {
  using S = typename Traits<T>::S;
  using M = DeviceMath;
  __shared__ double slots[2][kWarps];
  const int64_t n = p.c.numel;
  S kl_acc = S(0);
  int parity = 0;

  auto term = [&](S mu, S lv, bool prior, S m, S inv_var, S log_var_m1) {
    const S lc = pm::softclip(lv, pm::softclip_scale<M>(lv));
    const S d = prior ? pm::sub(mu, m) : mu;
    kl_acc = pm::add(kl_acc, pm::kl_term(d, pm::variance<M>(lc), lc, inv_var, log_var_m1));
  };

  auto pair = [&](const Seg<T>& s, int g, bool has2, int64_t) {
    const int off[2] = {4 * g, 4 * (g + kThreads)};
    const bool prior = s.prior_mean != nullptr;
    S mu[2][4], l[2][4];
    load_pair(s, off, has2, mu, l);
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (u == 0 || has2) {
        S m[4] = {S(0), S(0), S(0), S(0)};
        if (prior) load4(s.prior_mean + off[u], m);
#pragma unroll
        for (int q = 0; q < 4; ++q) term(mu[u][q], l[u][q], prior, m[q], s.inv_var, s.log_var_m1);
      }
    }
  };

  auto slow = [&](int t, int64_t i0) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (i0 + q < n) {
        const Elem<T> x = element_of<T>(p.c.tensors, t, i0 + q);
        const bool prior = x.has_prior_mean();
        term(x.mean(), x.logvar(), prior, prior ? x.prior_mean() : S(0), x.inv_var(),
             x.log_var_m1());
      }
    }
  };

  auto tile_end = [&](int64_t tile) {
    tile_partial(static_cast<double>(kl_acc), slots, parity, p.c.partials, tile);
    kl_acc = S(0);
  };

  for_each_tile<T>(p.c.tensors, p.c.tile_first, n, p.c.num_tiles, pair, slow, tile_end);
  finish_kl<T>(KLReduce{p.c.partials, p.c.counter, p.c.num_tiles}, slots[0], p.kl);
}

struct VarianceParams {
  Common c;
  int32_t out_vec;
  void* out;
};

// exp(softclip(logvar)) of every element.
template <typename T>
__global__ void __launch_bounds__(kThreads, Traits<T>::kMinBlocks)
    variance_forward_kernel(const VarianceParams p) {
  using S = typename Traits<T>::S;
  using M = DeviceMath;
  const int64_t n = p.c.numel;
  T* out = static_cast<T*>(p.out);

  auto var = [](S lv) { return pm::variance<M>(pm::softclip(lv, pm::softclip_scale<M>(lv))); };

  auto pair = [&](const Seg<T>& s, int g, bool has2, int64_t ts) {
    const int off[2] = {4 * g, 4 * (g + kThreads)};
    S l[2][4];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (u == 0 || has2) load4(s.logvar + off[u], l[u]);
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (u == 0 || has2) {
#pragma unroll
        for (int q = 0; q < 4; ++q) l[u][q] = var(l[u][q]);
        T* dst = out + ts + off[u];
        if (p.out_vec) {
          store4(dst, l[u]);
        } else {
#pragma unroll
          for (int q = 0; q < 4; ++q) store1(dst + q, l[u][q]);
        }
      }
    }
  };

  auto slow = [&](int t, int64_t i0) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (i0 + q < n) store1(out + i0 + q, var(element_of<T>(p.c.tensors, t, i0 + q).logvar()));
    }
  };

  for_each_tile<T>(p.c.tensors, p.c.tile_first, n, p.c.num_tiles, pair, slow, [](int64_t) {});
}

struct BackwardParams {
  Common c;
  int64_t samples;
  const void* grad_theta;
  const void* grad_kl;
  int32_t grad_kl_dtype;
  int32_t with_kl;
  int32_t grad_vec;  // grad_theta aligned for 4-element loads
  int32_t out_vec;   // grad_mean and grad_logvar aligned for 4-element stores
  const int64_t* rng_state;
  void* grad_mean;
  void* grad_logvar;
};

// The gradients of the samples (samples > 0, eps regenerated from rng_state) and of the KL
// (with_kl) with respect to the means and log-variances.
template <typename T, typename G>
__global__ void __launch_bounds__(kThreads, Traits<T>::kMinBlocks)
    backward_kernel(const BackwardParams p) {
  using S = typename Traits<T>::S;
  using M = DeviceMath;
  const int64_t n = p.c.numel;
  const bool with_kl = p.with_kl != 0;
  const bool sampled = p.samples > 0;
  uint64_t key = 0, offset = 0;
  if (sampled) {
    key = philox_key(static_cast<uint64_t>(p.rng_state[0]));
    offset = static_cast<uint64_t>(p.rng_state[1]);
  }
  const S gk = with_kl ? load_scalar<S>(p.grad_kl, p.grad_kl_dtype) : S(0);
  const G* grad = static_cast<const G*>(p.grad_theta);
  T* grad_mean = static_cast<T*>(p.grad_mean);
  T* grad_logvar = static_cast<T*>(p.grad_logvar);

  // The sums G and E over the samples of 4 elements (flat index i0, count of them valid).
  auto sums = [&](int64_t i0, int count, S gs[4], S es[4]) {
    for (int64_t k = 0; k < p.samples; ++k) {
      const int64_t j = k * n + i0;
      S gr[4];
      if (count == 4 && p.grad_vec && (j & 3) == 0) {
        load4(grad + j, gr);
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) gr[q] = q < count ? load1<S>(grad + j + q) : S(0);
      }
      float e[4];
      eps4(static_cast<uint64_t>(j), key, offset, e);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const S ge = pm::mul(gr[q], static_cast<S>(e[q]));
        gs[q] = k == 0 ? gr[q] : pm::add(gs[q], gr[q]);
        es[q] = k == 0 ? ge : pm::add(es[q], ge);
      }
    }
  };

  // The two gradients of one element: d = mu - m (mu without a prior mean), its sums gs, es.
  auto grads = [&](S d, S lv, S gs, S es, S inv_var, S& out_mu, S& out_lv) {
    const S qs = pm::softclip_scale<M>(lv);
    const S lc = pm::softclip(lv, qs);
    S part = S(0), gm = S(0);
    if (sampled) {
      part = pm::logvar_part_sample(pm::sigma<M>(lc), es);
      gm = gs;
    }
    if (with_kl) {
      const S kl_mu = pm::mul(gk, pm::mul(d, inv_var));
      const S kl_part = pm::logvar_part_kl(pm::variance<M>(lc), inv_var, gk);
      gm = sampled ? pm::add(gs, kl_mu) : kl_mu;
      part = sampled ? pm::add(part, kl_part) : kl_part;
    }
    out_mu = gm;
    out_lv = pm::grad_logvar(pm::softclip_slope(qs), part);
  };

  auto store_grads = [&](int64_t i0, const S out_mu[4], const S out_lv[4]) {
    if (p.out_vec) {
      store4(grad_mean + i0, out_mu);
      store4(grad_logvar + i0, out_lv);
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        store1(grad_mean + i0 + q, out_mu[q]);
        store1(grad_logvar + i0 + q, out_lv[q]);
      }
    }
  };

  // One quad of a vector-readable tensor, any number of samples.
  auto one = [&](const Seg<T>& s, int off, int64_t ts) {
    const bool prior = with_kl && s.prior_mean != nullptr;
    S d[4] = {S(0), S(0), S(0), S(0)}, l[4];
    load4(s.logvar + off, l);
    if (with_kl) load4(s.mean + off, d);
    if (prior) {
      S m[4];
      load4(s.prior_mean + off, m);
#pragma unroll
      for (int q = 0; q < 4; ++q) d[q] = pm::sub(d[q], m[q]);
    }
    const int64_t i0 = ts + off;
    S gs[4] = {S(0), S(0), S(0), S(0)}, es[4] = {S(0), S(0), S(0), S(0)};
    sums(i0, 4, gs, es);
#pragma unroll
    for (int q = 0; q < 4; ++q) grads(d[q], l[q], gs[q], es[q], s.inv_var, d[q], l[q]);
    store_grads(i0, d, l);
  };

  auto pair = [&](const Seg<T>& s, int g, bool has2, int64_t ts) {
    const int off[2] = {4 * g, 4 * (g + kThreads)};
    if (p.samples > 1) {
#pragma unroll 1
      for (int u = 0; u < (has2 ? 2 : 1); ++u) one(s, 4 * (g + u * kThreads), ts);
      return;
    }
    const bool prior = with_kl && s.prior_mean != nullptr;
    // One sample at most: the log-variances and grad_theta of both quads first, then each
    // quad's means (with a KL), noise and gradients.
    S l[2][4], gs[2][4];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
#pragma unroll
      for (int q = 0; q < 4; ++q) gs[u][q] = S(0);
      if (u == 0 || has2) {
        load4(s.logvar + off[u], l[u]);
        if (sampled) {
          const int64_t i0 = ts + off[u];
          if (p.grad_vec) {
            load4(grad + i0, gs[u]);
          } else {
#pragma unroll
            for (int q = 0; q < 4; ++q) gs[u][q] = load1<S>(grad + i0 + q);
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (u == 0 || has2) {
        S d[4] = {S(0), S(0), S(0), S(0)};
        if (with_kl) load4(s.mean + off[u], d);
        if (prior) {
          S m[4];
          load4(s.prior_mean + off[u], m);
#pragma unroll
          for (int q = 0; q < 4; ++q) d[q] = pm::sub(d[q], m[q]);
        }
        const int64_t i0 = ts + off[u];
        S es[4] = {S(0), S(0), S(0), S(0)};
        if (sampled) {
          float e[4];
          eps4_aligned(static_cast<uint64_t>(i0), key, offset, e);
#pragma unroll
          for (int q = 0; q < 4; ++q) es[q] = pm::mul(gs[u][q], static_cast<S>(e[q]));
        }
#pragma unroll
        for (int q = 0; q < 4; ++q)
          grads(d[q], l[u][q], gs[u][q], es[q], s.inv_var, d[q], l[u][q]);
        store_grads(i0, d, l[u]);
      }
    }
  };

  auto slow = [&](int t, int64_t i0) {
    const int count = static_cast<int>(min(int64_t{4}, n - i0));
    S gs[4] = {S(0), S(0), S(0), S(0)}, es[4] = {S(0), S(0), S(0), S(0)};
    if (sampled) sums(i0, count, gs, es);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (q < count) {
        const Elem<T> x = element_of<T>(p.c.tensors, t, i0 + q);
        S d = S(0);
        if (with_kl) {
          d = x.mean();
          if (x.has_prior_mean()) d = pm::sub(d, x.prior_mean());
        }
        S out_mu, out_lv;
        grads(d, x.logvar(), gs[q], es[q], x.inv_var(), out_mu, out_lv);
        store1(grad_mean + i0 + q, out_mu);
        store1(grad_logvar + i0 + q, out_lv);
      }
    }
  };

  for_each_tile<T>(p.c.tensors, p.c.tile_first, n, p.c.num_tiles, pair, slow, [](int64_t) {});
}

constexpr size_t kCounterBytes = 16;

}  // namespace

size_t forward_workspace_bytes(int64_t numel) {
  return kCounterBytes +
         sizeof(double) * static_cast<size_t>(std::max<int64_t>(num_tiles(numel), 1));
}

size_t forward_workspace_zero_bytes() { return kCounterBytes; }

cudaError_t launch_forward(const ForwardArgs& args, cudaStream_t stream) {
  Common c = common(args.table, args.num_tensors, args.numel);
  c.counter = static_cast<unsigned int*>(args.workspace);
  c.partials = args.workspace == nullptr
                   ? nullptr
                   : reinterpret_cast<double*>(static_cast<char*>(args.workspace) + kCounterBytes);
  const bool with_kl =
      args.mode == ForwardMode::kKL || (args.mode == ForwardMode::kSample && args.with_kl);
  if (with_kl) {
    // The counter must start at zero; the last block leaves it at zero again.
    const cudaError_t err = cudaMemsetAsync(args.workspace, 0, kCounterBytes, stream);
    if (err != cudaSuccess) return err;
  }
  switch (args.mode) {
    case ForwardMode::kSample: {
      SampleParams p{};
      p.c = c;
      p.samples = args.samples;
      p.with_kl = with_kl;
      p.out_vec = aligned(args.out, vec_alignment(dtype_size(args.out_dtype)));
      p.out = args.out;
      p.kl = args.kl;
      p.rng_state = args.rng_state;
      p.rng = args.rng;
      dispatch_dtype(args.dtype, [&](auto t_tag) {
        using T = decltype(t_tag);
        dispatch_narrow<T>(args.dtype, args.out_dtype, [&](auto o_tag) {
          using O = decltype(o_tag);
          launch(&sample_forward_kernel<T, O>, c.num_tiles, p, stream);
        });
      });
      break;
    }
    case ForwardMode::kKL: {
      KLParams p{};
      p.c = c;
      p.kl = args.kl;
      dispatch_dtype(args.dtype, [&](auto t_tag) {
        using T = decltype(t_tag);
        launch(&kl_forward_kernel<T>, c.num_tiles, p, stream);
      });
      break;
    }
    case ForwardMode::kVariance: {
      if (c.num_tiles == 0) return cudaSuccess;
      VarianceParams p{};
      p.c = c;
      p.out_vec = aligned(args.out, vec_alignment(dtype_size(args.dtype)));
      p.out = args.out;
      dispatch_dtype(args.dtype, [&](auto t_tag) {
        using T = decltype(t_tag);
        launch(&variance_forward_kernel<T>, c.num_tiles, p, stream);
      });
      break;
    }
  }
  return cudaSuccess;
}

cudaError_t launch_backward(const BackwardArgs& args, cudaStream_t stream) {
  BackwardParams p{};
  p.c = common(args.table, args.num_tensors, args.numel);
  if (p.c.num_tiles == 0) return cudaSuccess;
  p.samples = args.samples;
  p.grad_theta = args.grad_theta;
  p.grad_kl = args.grad_kl;
  p.grad_kl_dtype = static_cast<int32_t>(args.grad_kl_dtype);
  p.with_kl = args.with_kl;
  const DType grad_dtype = args.samples > 0 ? args.grad_dtype : args.dtype;
  p.grad_vec = args.samples > 0 && aligned(args.grad_theta, vec_alignment(dtype_size(grad_dtype)));
  const size_t out_alignment = vec_alignment(dtype_size(args.dtype));
  p.out_vec = aligned(args.grad_mean, out_alignment) && aligned(args.grad_logvar, out_alignment);
  p.rng_state = args.rng_state;
  p.grad_mean = args.grad_mean;
  p.grad_logvar = args.grad_logvar;
  dispatch_dtype(args.dtype, [&](auto t_tag) {
    using T = decltype(t_tag);
    dispatch_narrow<T>(args.dtype, grad_dtype, [&](auto g_tag) {
      using G = decltype(g_tag);
      launch(&backward_kernel<T, G>, p.c.num_tiles, p, stream);
    });
  });
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace fastbnf
