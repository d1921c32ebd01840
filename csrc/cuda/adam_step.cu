// The fused variational Adam step on CUDA (fastbnf::adam_step_kernel) and its launcher
// launch_adam_step (launch.h). Torch-free, like posterior_kernels.cu; the walk over the tiles is
// tile_walk.cuh's, the update adam_math.h's, the order of the work the CPU kernel's
// (cpu/adam_step.cpp).
#include <cuda_runtime.h>

#include <type_traits>

#include "../common/adam_math.h"
#include "launch.h"
#include "tile_walk.cuh"

namespace fastbnf {
namespace cuda {
namespace {

// The scalars of a capturable step that depend on its count (adam::step_terms), rounded to each
// compute type: written by adam_step_scalars_kernel, read by every thread of adam_step_kernel.
struct StepScalars {
  double bias2_sqrt_d, neg_step_size_d;
  float bias2_sqrt_f, neg_step_size_f;
};

struct AdamParams {
  Common c;
  const void* grad;
  void* exp_avgs;
  void* exp_avg_sqs;
  void* theta;
  const int64_t* rng_state;
  int64_t* next_rng_state;
  PhiloxArgs rng;
  double kl_weight;
  int32_t flat_vec;  // grad, theta and the moments readable 4 at a time (and N % 4 == 0)
  adam::Scalars<float> means_f, logvars_f;
  adam::Scalars<double> means_d, logvars_d;
  // A capturable step's: they replace the bias2_sqrt and neg_step_size above. Null otherwise.
  const StepScalars* step_scalars;
};

template <typename S>
__device__ __forceinline__ const adam::Scalars<S>& pick(const adam::Scalars<float>& f,
                                                        const adam::Scalars<double>& d) {
  if constexpr (std::is_same_v<S, float>) {
    return f;
  } else {
    return d;
  }
}

// A capturable step's scalars in the compute type S, as adam::scalars<S> rounds them.
template <typename S>
__device__ __forceinline__ void step_scalars(const StepScalars* st, S& bias2_sqrt,
                                             S& neg_step_size) {
  if constexpr (std::is_same_v<S, float>) {
    bias2_sqrt = st->bias2_sqrt_f;
    neg_step_size = st->neg_step_size_f;
  } else {
    bias2_sqrt = st->bias2_sqrt_d;
    neg_step_size = st->neg_step_size_d;
  }
}

// The scalars of a capturable step (AdamArgs::step): adam::step_terms of the count that the
// step reads from device memory when it runs (in a CUDA graph, the count of each replay), the
// formulas of the host's adam::scalars in double, kept and rounded to float as adam::scalars
// rounds them. One thread, on the stream before the step, rather than double arithmetic in
// every thread of the float step kernels (which do none, .ci/check_kernel_resources.py). Its
// powers may differ from the host's pow by an ulp of a double (adam_math.h, detail::pow_count):
// a capturable step can then differ from an eager one of the same count in the last bit, the
// same on every replay. D: the arithmetic, double (the template argument by which the resource
// check tells fp64 kernels).
template <typename D>
__global__ void adam_step_scalars_kernel(const int64_t* step, D lr, D beta1, D beta2,
                                         StepScalars* out) {
  static_assert(std::is_same_v<D, double>, "adam::step_terms computes in double");
  const adam::StepTerms t = adam::step_terms(lr, beta1, beta2, *step);
  out->bias2_sqrt_d = t.bias2_sqrt;
  out->neg_step_size_d = t.neg_step_size;
  out->bias2_sqrt_f = static_cast<float>(t.bias2_sqrt);
  out->neg_step_size_f = static_cast<float>(t.neg_step_size);
}

// A value rounded to the stored type T, back in the compute type.
template <typename T, typename S>
__device__ __forceinline__ S round_to(S x) {
  return static_cast<S>(widen(Narrow<T>::from(x)));
}

// Resident blocks asked of the compiler for the step: it keeps more values live than the
// sampling kernels (the gradients, the posterior and its moments, two keys) and spills within
// 64 registers, and within 80 on sm_90. Two blocks of 256 threads give it 128 registers and no
// spills (.ci/check_kernel_resources.py, REGISTER_BUDGETS), with seven 16-byte loads per quad.
constexpr int kAdamMinBlocks = 2;

// One step of the fused variational Adam (fastbnf::adam_step; the CPU kernel's comment in
// csrc/cpu/adam_step.cpp gives the order of the work): per quad (4 flat elements), the
// current and next samples' noise (at the elements' places in the stream: their flat indices,
// shifted for shards), the gradients as backward_kernel forms them (rounded to T as its
// outputs are), AdamW on the means, log-variances and moments (adam_math.h), the next theta.
// One quad at a time per thread. kCapturable: a capturable step's kernel, whose scalars of the
// count come from adam_step_scalars_kernel (AdamParams::step_scalars); an instantiation of its
// own, so that the eager step's kernel stays as it was (the capturable one holds two more
// values in registers: the fp64 kernels spill a few more bytes).
template <typename T, typename O, bool kCapturable>
__global__ void __launch_bounds__(kThreads, kAdamMinBlocks) adam_step_kernel(const AdamParams p) {
  using S = typename Traits<T>::S;
  using M = DeviceMath;
  const Key next = unpack_key(p.rng);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    p.next_rng_state[0] = static_cast<int64_t>(next.salted_seed);
    p.next_rng_state[1] = static_cast<int64_t>(next.offset);
  }
  const uint64_t key = philox_key(static_cast<uint64_t>(p.rng_state[0]));
  const uint64_t offset = static_cast<uint64_t>(p.rng_state[1]);
  adam::Scalars<S> a_mu = pick<S>(p.means_f, p.means_d);
  adam::Scalars<S> a_lv = pick<S>(p.logvars_f, p.logvars_d);
  if constexpr (kCapturable) {
    // The scalars of the step's count, once per thread (the means' and the log-variances' are
    // the same: the weight decay enters neither).
    S bias2_sqrt, neg_step_size;
    step_scalars(p.step_scalars, bias2_sqrt, neg_step_size);
    a_mu.bias2_sqrt = a_lv.bias2_sqrt = bias2_sqrt;
    a_mu.neg_step_size = a_lv.neg_step_size = neg_step_size;
  }
  const S gk = static_cast<S>(p.kl_weight);
  const int64_t n = p.c.numel;
  // The flat arrays, read from the parameter space where used (fewer live registers).
  auto grad = [&]() { return static_cast<const O*>(p.grad); };
  auto theta = [&]() { return static_cast<O*>(p.theta); };
  auto m_mu = [&]() { return static_cast<T*>(p.exp_avgs); };
  auto v_mu = [&]() { return static_cast<T*>(p.exp_avg_sqs); };
  auto m_lv = [&]() { return static_cast<T*>(p.exp_avgs) + n; };
  auto v_lv = [&]() { return static_cast<T*>(p.exp_avg_sqs) + n; };

  // The gradients of one element (d = mu - m, g its sample's gradient, e its noise), rounded
  // to T as backward_kernel's outputs are.
  auto grads = [&](S lv, S d, S g, float e, S inv_var, S& grad_mu, S& grad_lv) {
    const S q = pm::softclip_scale<M>(lv);
    const S lc = pm::softclip(lv, q);
    const S part = pm::add(pm::logvar_part_sample(pm::sigma<M>(lc), pm::mul(static_cast<S>(e), g)),
                           pm::logvar_part_kl(pm::variance<M>(lc), inv_var, gk));
    grad_mu = round_to<T>(pm::grad_mean(g, gk, d, inv_var));
    grad_lv = round_to<T>(pm::grad_logvar(pm::softclip_slope(q), part));
  };

  // The next sample of an updated element.
  auto next_theta = [&](S mu, S lv, float e_next) {
    return pm::theta(mu, pm::sigma<M>(pm::softclip(lv, pm::softclip_scale<M>(lv))),
                     static_cast<S>(e_next));
  };

  // Four values of a flat array (i0 % 4 == 0), vector-read where flat_vec allows.
  auto load_flat = [&](const auto* base, int64_t i0, S out[4]) {
    if (p.flat_vec) {
      load4<S, false>(base + i0, out);
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) out[q] = load1<S>(base + i0 + q);
    }
  };
  auto store_flat = [&](auto* base, int64_t i0, const S in[4]) {
    if (p.flat_vec) {
      store4(base + i0, in);
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) store1(base + i0 + q, in[q]);
    }
  };

  // The noise of the quad i0 .. i0 + 3 (i0 % 4 == 0) of a segment under (k, o): that of
  // i0 + noise_shift, the tensor's place in the stream (a shard's in its whole group). A shift
  // that is a multiple of 4 (always 0 but for shards) starts the quad at a Philox block: one
  // block; another, mid block: two. Branching on the segment's shift rather than on the index
  // keeps the one-block path as it was (the float64 kernels spill less).
  auto quad_eps = [&](const Seg<T>& s, int64_t i0, uint64_t k, uint64_t o, float e[4]) {
    const uint64_t j = static_cast<uint64_t>(i0 + s.noise_shift);
    if ((s.noise_shift & 3) == 0) {
      eps4_aligned(j, k, o, e);
    } else {
      eps4(j, k, o, e);
    }
  };

  // The quad of flat elements i0 .. i0 + 3 of a vector-readable segment, in three phases that
  // keep few values live: the gradients, Adam on the means then on the log-variances (each
  // with its moments), the next sample.
  auto quad = [&](const Seg<T>& s, int off, int64_t i0) {
    S mu[4], lv[4], g[4], d[4];
    load4<S, false>(s.mean + off, mu);
    load4<S, false>(s.logvar + off, lv);
    load_flat(grad(), i0, g);
#pragma unroll
    for (int q = 0; q < 4; ++q) d[q] = mu[q];
    if (s.prior_mean != nullptr) {
      S m[4];
      load4(s.prior_mean + off, m);
#pragma unroll
      for (int q = 0; q < 4; ++q) d[q] = pm::sub(mu[q], m[q]);
    }
    float e[4];
    quad_eps(s, i0, key, offset, e);
    S grad_mu[4], grad_lv[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) grads(lv[q], d[q], g[q], e[q], s.inv_var, grad_mu[q], grad_lv[q]);

    S m1[4], v1[4];
    load_flat(m_mu(), i0, m1);
    load_flat(v_mu(), i0, v1);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      adam::update<M>(mu[q], m1[q], v1[q], grad_mu[q], a_mu);
      mu[q] = round_to<T>(mu[q]);
    }
    store_flat(m_mu(), i0, m1);
    store_flat(v_mu(), i0, v1);
    load_flat(m_lv(), i0, m1);
    load_flat(v_lv(), i0, v1);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      adam::update<M>(lv[q], m1[q], v1[q], grad_lv[q], a_lv);
      lv[q] = round_to<T>(lv[q]);
    }
    store_flat(m_lv(), i0, m1);
    store_flat(v_lv(), i0, v1);
    // The table's pointers are read-only; the launcher checked that they are the caller's
    // tensors (no copies), which this step updates.
    store4(const_cast<T*>(s.mean) + off, mu);
    store4(const_cast<T*>(s.logvar) + off, lv);

    quad_eps(s, i0, next.key, next.offset, e);
#pragma unroll
    for (int q = 0; q < 4; ++q) g[q] = next_theta(mu[q], lv[q], e[q]);
    store_flat(theta(), i0, g);
  };

  auto pair = [&](const Seg<T>& s, int g, bool has2, int64_t ts) {
#pragma unroll 1
    for (int u = 0; u < (has2 ? 2 : 1); ++u) {
      const int off = 4 * (g + u * kThreads);
      quad(s, off, ts + off);
    }
  };

  // The noise of the flat elements i0 .. i0 + count - 1 of the slow path (i0 in tensor t) under
  // (k, o): the four from the first element's place in the stream; a quad that straddles
  // tensors whose shifts differ (shards) then draws the elements past the first tensor one by
  // one, in a loop kept rolled (one more Philox in the code, not three).
  auto slow_eps = [&](int t, int64_t i0, int count, uint64_t k, uint64_t o, float e[4]) {
    const DeviceTensor* d = p.c.tensors + t;
    const int64_t shift = d->noise_shift;
    eps4(static_cast<uint64_t>(i0 + shift), k, o, e);
    if (i0 + count <= d->end) return;
#pragma unroll 1
    for (int q = 1; q < count; ++q) {
      t = walk_to(p.c.tensors, t, i0 + q);
      const int64_t other = p.c.tensors[t].noise_shift;
      if (other == shift) continue;
      const float x = eps1(static_cast<uint64_t>(i0 + q + other), k, o);
#pragma unroll
      for (int r = 1; r < 4; ++r) e[r] = r == q ? x : e[r];
    }
  };

  // Element by element, in two passes over the quad (the update, then the next sample, which
  // reads the updated posterior back): one set of noise live at a time.
  auto slow = [&](int t, int64_t i0) {
    const int count = static_cast<int>(min(int64_t{4}, n - i0));
    float e[4];
    slow_eps(t, i0, count, key, offset, e);
    int t0 = t;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (q < count) {
        const int64_t i = i0 + q;
        const Elem<T> x = element_of<T>(p.c.tensors, t, i);
        S mu = x.mean(), lv = x.logvar(), grad_mu, grad_lv;
        const S d = x.has_prior_mean() ? pm::sub(mu, x.prior_mean()) : mu;
        grads(lv, d, load1<S>(grad() + i), e[q], x.inv_var(), grad_mu, grad_lv);
        S m1 = load1<S>(m_mu() + i), v1 = load1<S>(v_mu() + i);
        adam::update<M>(mu, m1, v1, grad_mu, a_mu);
        store1(m_mu() + i, m1);
        store1(v_mu() + i, v1);
        m1 = load1<S>(m_lv() + i);
        v1 = load1<S>(v_lv() + i);
        adam::update<M>(lv, m1, v1, grad_lv, a_lv);
        store1(m_lv() + i, m1);
        store1(v_lv() + i, v1);
        store1(const_cast<T*>(static_cast<const T*>(x.d->mean)) + x.local, mu);
        store1(const_cast<T*>(static_cast<const T*>(x.d->logvar)) + x.local, lv);
      }
    }
    slow_eps(t0, i0, count, next.key, next.offset, e);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (q < count) {
        const Elem<T> x = element_of<T>(p.c.tensors, t0, i0 + q);
        store1(theta() + i0 + q, next_theta(x.mean(), x.logvar(), e[q]));
      }
    }
  };

  for_each_tile<T>(p.c.tensors, p.c.tile_first, n, p.c.num_tiles, pair, slow, [](int64_t) {});
}

}  // namespace

size_t adam_step_workspace_bytes() { return sizeof(StepScalars); }

cudaError_t launch_adam_step(const AdamArgs& args, cudaStream_t stream) {
  AdamParams p{};
  p.c = common(args.table, args.num_tensors, args.numel);
  p.grad = args.grad_theta;
  p.exp_avgs = args.exp_avgs;
  p.exp_avg_sqs = args.exp_avg_sqs;
  p.theta = args.theta;
  p.rng_state = args.rng_state;
  p.next_rng_state = args.next_rng_state;
  p.rng = args.rng;
  p.kl_weight = args.kl_weight;
  const size_t group_alignment = vec_alignment(dtype_size(args.dtype));
  const size_t out_alignment = vec_alignment(dtype_size(args.out_dtype));
  p.flat_vec = args.numel % 4 == 0 && aligned(args.grad_theta, out_alignment) &&
               aligned(args.theta, out_alignment) && aligned(args.exp_avgs, group_alignment) &&
               aligned(args.exp_avg_sqs, group_alignment);
  p.means_f = args.means_f;
  p.logvars_f = args.logvars_f;
  p.means_d = args.means_d;
  p.logvars_d = args.logvars_d;
  if (args.step != nullptr) {
    auto* scalars = static_cast<StepScalars*>(args.step_workspace);
    adam_step_scalars_kernel<double>
        <<<1, 1, 0, stream>>>(args.step, args.lr, args.beta1, args.beta2, scalars);
    p.step_scalars = scalars;
  }
  // No tile still takes one block: it writes the next key.
  dispatch_dtype(args.dtype, [&](auto t_tag) {
    using T = decltype(t_tag);
    dispatch_narrow<T>(args.dtype, args.out_dtype, [&](auto o_tag) {
      using O = decltype(o_tag);
      if (p.step_scalars != nullptr) {
        launch(&adam_step_kernel<T, O, true>, p.c.num_tiles, p, stream);
      } else {
        launch(&adam_step_kernel<T, O, false>, p.c.num_tiles, p, stream);
      }
    });
  });
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace fastbnf
