// Fused CPU kernels of the fastbnf kernel ops (contract: csrc/README.md, csrc/group.h).
//
// One pass over the flat index space of the group per call. The space is cut into chunks of
// kChunk elements at fixed global positions, whatever the thread count; at::parallel_for hands
// out whole chunks. A chunk finds the tensors it overlaps in the group's table, draws its normals
// into a thread-local scratch buffer (L1/L2 resident) and runs the vectorized epilogue per
// tensor piece, in blocks of kBlock elements. The per-element maths is posterior_math.h's, with
// the policy of this file (exp: cpu_math.h's polynomial in float32, and in float64 the exp that
// torch.exp calls, MKL's vmdExp through cpu_math.h's exp_array; rsqrt: 1 / sqrt, as PyTorch's
// CPU rsqrt). The KL terms of a block are added in float
// lanes (8 lanes in a fixed order, whatever the vector width) and the lanes in double; a chunk's
// partial is its blocks' sum in order and the partials are added in chunk order: the KL is the
// same for any number of threads, and the same from sample_kernel as from kl_kernel.
//
// Dtypes: the group's storage type T is float16, bfloat16, float32 or float64; the arithmetic's
// type S is float32, or float64 for float64 groups. theta is stored as T, float16 or bfloat16,
// gradients of theta are read as T, float16 or bfloat16; gradients and variances are stored as T.
//
// Build flags (fastbnf/_build.py): -O3 -fopenmp -fno-math-errno -ffp-contract=off, and no
// -ffast-math. With PyTorch's OpenMP backend (Linux wheels) at::parallel_for is inline code whose
// `omp parallel` runs serially unless this file is built with -fopenmp (the symbols resolve to the
// libgomp that libtorch_cpu loads); where PyTorch uses its native pool (macOS), -fopenmp-simd is
// enough. -fno-math-errno lets sqrt vectorize. -ffp-contract=off keeps every operation of
// posterior_math.h rounding once, like PyTorch's (softclip near its bound turns one ulp into 18
// ulp of the variance); only the polynomials of cpu_math.h use FMA, explicitly, on the AVX2 path.
#include "kernel_ops.h"

#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>

#include <memory>
#include <vector>

#include "buffer_pool.h"
#include "chunk_walk.h"

#if defined(__FAST_MATH__)
#warning "fastbnf: csrc/cpu is meant to be built without -ffast-math (see posterior_kernels.cpp)"
#endif
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#warning "fastbnf: csrc/cpu built without -fopenmp: at::parallel_for will run on one thread"
#endif

namespace fastbnf {
namespace cpu {
namespace {

// Float lanes of the KL's block sums.
constexpr int kLanes = 8;

// The KL terms of a chunk: each block's terms in kLanes lanes of S (term e to lane e % kLanes,
// in order), the lanes then added in double into 4 running sums. The order is fixed by the
// code, not by the vector width: the generic and AVX2 paths sum alike.
template <typename S>
struct KlSum {
  double lanes[4] = {0.0, 0.0, 0.0, 0.0};

  // term holds kBlock values, the first m of them this block's terms.
  FASTBNF_INLINE void add(S* __restrict term, int m) {
    const int padded = (m + kLanes - 1) / kLanes * kLanes;
    for (int e = m; e < padded; ++e) term[e] = 0;
    S acc[kLanes];
    for (int l = 0; l < kLanes; ++l) acc[l] = term[l];
    for (int g = kLanes; g < padded; g += kLanes) {
      for (int l = 0; l < kLanes; ++l) acc[l] += term[g + l];
    }
    for (int l = 0; l < 4; ++l) {
      lanes[l] += static_cast<double>(acc[l]) + static_cast<double>(acc[l + 4]);
    }
  }

  double total() const { return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]); }
};

double sum_in_order(const std::vector<double>& partials) {
  double total = 0.0;
  for (const double p : partials) total += p;
  return total;
}

// ---------------------------------------------------------------------------------------------
// Forward: theta = mu + sigma * eps for sample 0, sigma kept for the other samples, KL terms.

// kMode 0: KL only; 1: one sample; 2: several samples (sigma kept in sig for the others).
template <bool kAvx2, typename T, typename out_t, int kMode, bool kKl, bool kPm>
FASTBNF_INLINE void forward_piece(const St<T>* __restrict mu, const St<T>* __restrict lv,
                                  const St<T>* __restrict pm, const float* __restrict eps,
                                  St<out_t>* __restrict theta, Compute<T>* __restrict sig,
                                  int64_t m, const TensorEntry& entry, KlSum<Compute<T>>& kl) {
  using S = Compute<T>;
  constexpr bool kTheta = kMode > 0;
  const S inv_var = static_cast<S>(entry.inv_prior_var);
  const S log_var_m1 = static_cast<S>(entry.log_prior_var_m1);
  for (int64_t b = 0; b < m; b += kBlock) {
    const int bm = static_cast<int>(std::min<int64_t>(kBlock, m - b));
    const St<T>* __restrict mu_b = mu + b;
    const St<T>* __restrict pm_b = kPm ? pm + b : nullptr;
    const float* __restrict eps_b = kTheta ? eps + b : nullptr;
    St<out_t>* __restrict theta_b = kTheta ? theta + b : nullptr;
    S* __restrict sig_b = kMode == 2 ? sig + b : nullptr;
    alignas(32) S term[kBlock];
    for_block<kAvx2, T, kTheta, kKl>(lv + b, bm, [&](int e, S, S lc, S s, S v) {
      if constexpr (kTheta) {
        const S mean = load_as<S, T>(mu_b[e]);
        theta_b[e] = store_as<out_t>(P::theta(mean, s, static_cast<S>(eps_b[e])));
        if constexpr (kMode == 2) sig_b[e] = s;
      }
      if constexpr (kKl) {
        const S mean = load_as<S, T>(mu_b[e]);
        const S d = kPm ? P::sub(mean, load_as<S, T>(pm_b[e])) : mean;
        term[e] = P::kl_term(d, v, lc, inv_var, log_var_m1);
      }
    });
    if constexpr (kKl) kl.add(term, bm);
  }
}

// theta of sample k > 0 from the kept sigma.
template <typename T, typename out_t>
FASTBNF_INLINE void resample_piece(const St<T>* __restrict mu, const Compute<T>* __restrict sig,
                                   const float* __restrict eps, St<out_t>* __restrict theta,
                                   int64_t m) {
  using S = Compute<T>;
  FASTBNF_SIMD
  for (int64_t e = 0; e < m; ++e) {
    theta[e] = store_as<out_t>(P::theta(load_as<S, T>(mu[e]), sig[e], static_cast<S>(eps[e])));
  }
}

struct ForwardArgs {
  const Group* g;
  int64_t n;  // samples drawn (0: KL only)
  void* theta;
  PhiloxKey key;
  double* partials;  // per chunk, when the KL is computed
};

template <bool kAvx2, typename T, typename out_t, int kMode, bool kKl, bool kPm>
FASTBNF_INLINE void forward_chunks_impl(const ForwardArgs& a, int64_t c0, int64_t c1) {
  using S = Compute<T>;
  const Group& g = *a.g;
  const int64_t N = g.numel;
  std::unique_ptr<float[]> eps_buf(kMode > 0 ? new float[normals_capacity(kChunk)] : nullptr);
  std::unique_ptr<S[]> sig_buf(kMode == 2 ? new S[kChunk] : nullptr);
  St<out_t>* theta = static_cast<St<out_t>*>(a.theta);
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t i0 = c * kChunk;
    const int64_t i1 = std::min(N, i0 + kChunk);
    const float* eps = nullptr;
    if constexpr (kMode > 0) {
      eps = fill_normals<kAvx2>(eps_buf.get(), static_cast<uint64_t>(i0), i1 - i0, a.key);
    }
    KlSum<S> kl;
    for_pieces(g, i0, i1, [&](const TensorEntry& e, int64_t p0, int64_t p1) {
      forward_piece<kAvx2, T, out_t, kMode, kKl, kPm>(
          at_flat<T>(e.mean, e, p0), at_flat<T>(e.logvar, e, p0),
          kPm ? at_flat<T>(e.prior_mean, e, p0) : nullptr, kMode > 0 ? eps + (p0 - i0) : nullptr,
          kMode > 0 ? theta + p0 : nullptr, kMode == 2 ? sig_buf.get() + (p0 - i0) : nullptr,
          p1 - p0, e, kl);
    });
    if constexpr (kMode == 2) {
      for (int64_t k = 1; k < a.n; ++k) {
        eps =
            fill_normals<kAvx2>(eps_buf.get(), static_cast<uint64_t>(k * N + i0), i1 - i0, a.key);
        for_pieces(g, i0, i1, [&](const TensorEntry& e, int64_t p0, int64_t p1) {
          resample_piece<T, out_t>(at_flat<T>(e.mean, e, p0), sig_buf.get() + (p0 - i0),
                                   eps + (p0 - i0), theta + k * N + p0, p1 - p0);
        });
      }
    }
    if constexpr (kKl) a.partials[c] = kl.total();
  }
}

template <typename T, typename out_t, int kMode, bool kKl, bool kPm>
void forward_chunks_generic(const ForwardArgs& a, int64_t c0, int64_t c1) {
  forward_chunks_impl<false, T, out_t, kMode, kKl, kPm>(a, c0, c1);
}

template <typename T, typename out_t, int kMode, bool kKl, bool kPm>
FASTBNF_TARGET_AVX2 void forward_chunks_avx2(const ForwardArgs& a, int64_t c0, int64_t c1) {
  forward_chunks_impl<FASTBNF_HAS_AVX2_PATH != 0, T, out_t, kMode, kKl, kPm>(a, c0, c1);
}

using ForwardFn = void (*)(const ForwardArgs&, int64_t, int64_t);

template <typename T, typename out_t, int kMode, bool kKl, bool kPm>
ForwardFn forward_fn(bool avx2) {
  return avx2 ? forward_chunks_avx2<T, out_t, kMode, kKl, kPm>
              : forward_chunks_generic<T, out_t, kMode, kKl, kPm>;
}

template <typename T, typename out_t, int kMode>
ForwardFn forward_fn(bool avx2, bool kl, bool pm) {
  if (!kl) return forward_fn<T, out_t, kMode, false, false>(avx2);
  return pm ? forward_fn<T, out_t, kMode, true, true>(avx2)
            : forward_fn<T, out_t, kMode, true, false>(avx2);
}

// Samples of out_t (when n > 0) and the KL (when with_kl).
template <typename T, typename out_t>
void run_forward(const ForwardArgs& a, bool with_kl) {
  const bool avx2 = cpu_has_avx2(), pm = a.g->has_prior_means;
  ForwardFn fn;
  if (a.n == 0) {
    if (!with_kl) return;
    // The KL alone does not depend on the samples' dtype.
    fn = pm ? forward_fn<T, T, 0, true, true>(avx2) : forward_fn<T, T, 0, true, false>(avx2);
  } else if (a.n == 1) {
    fn = forward_fn<T, out_t, 1>(avx2, with_kl, pm);
  } else {
    fn = forward_fn<T, out_t, 2>(avx2, with_kl, pm);
  }
  for_chunks(a.g->numel, [&](int64_t c0, int64_t c1) { fn(a, c0, c1); });
}

// ---------------------------------------------------------------------------------------------
// Backward: grad_mu = G + gk (mu - m) / pv, grad_logvar = s' (0.5 sigma E + gk 0.5 (v / pv - 1)),
// with G = sum_k g_k and E = sum_k g_k eps_k.

// kMode 0: no sample gradient (KL only); 1: one sample, g and eps read directly;
// 2: several samples, their sums G and GE given.
template <bool kAvx2, typename T, typename grad_t, int kMode, bool kKl, bool kPm>
FASTBNF_INLINE void backward_piece(const St<T>* __restrict mu, const St<T>* __restrict lv,
                                   const St<T>* __restrict pm, const St<grad_t>* __restrict gt,
                                   const float* __restrict eps, const Compute<T>* __restrict G,
                                   const Compute<T>* __restrict GE, St<T>* __restrict gmu,
                                   St<T>* __restrict glv, int64_t m, const TensorEntry& entry,
                                   Compute<T> gkl) {
  using S = Compute<T>;
  const S inv_var = static_cast<S>(entry.inv_prior_var);
  for (int64_t b = 0; b < m; b += kBlock) {
    const int bm = static_cast<int>(std::min<int64_t>(kBlock, m - b));
    const St<T>* __restrict mu_b = kKl ? mu + b : nullptr;
    const St<T>* __restrict pm_b = kPm ? pm + b : nullptr;
    const St<grad_t>* __restrict gt_b = kMode == 1 ? gt + b : nullptr;
    const float* __restrict eps_b = kMode == 1 ? eps + b : nullptr;
    const S* __restrict G_b = kMode == 2 ? G + b : nullptr;
    const S* __restrict GE_b = kMode == 2 ? GE + b : nullptr;
    St<T>* __restrict gmu_b = gmu + b;
    St<T>* __restrict glv_b = glv + b;
    for_block<kAvx2, T, (kMode > 0), kKl>(lv + b, bm, [&](int e, S q, S lc, S s, S v) {
      S g_sum = 0, part = 0;
      if constexpr (kMode == 1) {
        const S g = load_as<S, grad_t>(gt_b[e]);
        g_sum = g;
        part = P::logvar_part_sample(s, P::mul(static_cast<S>(eps_b[e]), g));
      } else if constexpr (kMode == 2) {
        g_sum = G_b[e];
        part = P::logvar_part_sample(s, GE_b[e]);
      }
      if constexpr (kKl) {
        const S mean = load_as<S, T>(mu_b[e]);
        const S d = kPm ? P::sub(mean, load_as<S, T>(pm_b[e])) : mean;
        const S kl_part = P::logvar_part_kl(v, inv_var, gkl);
        if constexpr (kMode > 0) {
          g_sum = P::grad_mean(g_sum, gkl, d, inv_var);
          part = P::add(part, kl_part);
        } else {
          g_sum = P::mul(gkl, P::mul(d, inv_var));
          part = kl_part;
        }
      }
      gmu_b[e] = store_as<T>(g_sum);
      glv_b[e] = store_as<T>(P::grad_logvar(P::softclip_slope(q), part));
    });
  }
}

// G = sum_k g_k and GE = sum_k g_k eps_k over the samples, k in order.
template <typename S, typename grad_t>
FASTBNF_INLINE void accumulate_piece(const St<grad_t>* __restrict gt, const float* __restrict eps,
                                     S* __restrict G, S* __restrict GE, int64_t m, bool first) {
  if (first) {
    FASTBNF_SIMD
    for (int64_t e = 0; e < m; ++e) {
      const S g = load_as<S, grad_t>(gt[e]);
      G[e] = g;
      GE[e] = P::mul(static_cast<S>(eps[e]), g);
    }
  } else {
    FASTBNF_SIMD
    for (int64_t e = 0; e < m; ++e) {
      const S g = load_as<S, grad_t>(gt[e]);
      G[e] = P::add(G[e], g);
      GE[e] = P::add(GE[e], P::mul(static_cast<S>(eps[e]), g));
    }
  }
}

struct BackwardArgs {
  const Group* g;
  int64_t n;         // samples in grad_theta (0: KL only)
  const void* grad;  // (n, N) flat
  double grad_kl;
  PhiloxKey key;
  void* grad_means;
  void* grad_logvars;
};

template <bool kAvx2, typename T, typename grad_t, int kMode, bool kKl, bool kPm>
FASTBNF_INLINE void backward_chunks_impl(const BackwardArgs& a, int64_t c0, int64_t c1) {
  using S = Compute<T>;
  const Group& g = *a.g;
  const int64_t N = g.numel;
  std::unique_ptr<float[]> eps_buf(kMode > 0 ? new float[normals_capacity(kChunk)] : nullptr);
  std::unique_ptr<S[]> G(kMode == 2 ? new S[kChunk] : nullptr);
  std::unique_ptr<S[]> GE(kMode == 2 ? new S[kChunk] : nullptr);
  const St<grad_t>* grad = static_cast<const St<grad_t>*>(a.grad);
  St<T>* gmu = static_cast<St<T>*>(a.grad_means);
  St<T>* glv = static_cast<St<T>*>(a.grad_logvars);
  const S gkl = static_cast<S>(a.grad_kl);
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t i0 = c * kChunk;
    const int64_t i1 = std::min(N, i0 + kChunk);
    const float* eps = nullptr;
    if constexpr (kMode == 2) {
      for (int64_t k = 0; k < a.n; ++k) {
        eps =
            fill_normals<kAvx2>(eps_buf.get(), static_cast<uint64_t>(k * N + i0), i1 - i0, a.key);
        accumulate_piece<S, grad_t>(grad + k * N + i0, eps, G.get(), GE.get(), i1 - i0, k == 0);
      }
    } else if constexpr (kMode == 1) {
      eps = fill_normals<kAvx2>(eps_buf.get(), static_cast<uint64_t>(i0), i1 - i0, a.key);
    }
    for_pieces(g, i0, i1, [&](const TensorEntry& e, int64_t p0, int64_t p1) {
      const int64_t r = p0 - i0;
      backward_piece<kAvx2, T, grad_t, kMode, kKl, kPm>(
          at_flat<T>(e.mean, e, p0), at_flat<T>(e.logvar, e, p0),
          kPm ? at_flat<T>(e.prior_mean, e, p0) : nullptr, kMode == 1 ? grad + p0 : nullptr,
          kMode == 1 ? eps + r : nullptr, kMode == 2 ? G.get() + r : nullptr,
          kMode == 2 ? GE.get() + r : nullptr, gmu + p0, glv + p0, p1 - p0, e, gkl);
    });
  }
}

template <typename T, typename grad_t, int kMode, bool kKl, bool kPm>
void backward_chunks_generic(const BackwardArgs& a, int64_t c0, int64_t c1) {
  backward_chunks_impl<false, T, grad_t, kMode, kKl, kPm>(a, c0, c1);
}

template <typename T, typename grad_t, int kMode, bool kKl, bool kPm>
FASTBNF_TARGET_AVX2 void backward_chunks_avx2(const BackwardArgs& a, int64_t c0, int64_t c1) {
  backward_chunks_impl<FASTBNF_HAS_AVX2_PATH != 0, T, grad_t, kMode, kKl, kPm>(a, c0, c1);
}

using BackwardFn = void (*)(const BackwardArgs&, int64_t, int64_t);

template <typename T, typename grad_t, int kMode, bool kKl, bool kPm>
BackwardFn backward_fn(bool avx2) {
  return avx2 ? backward_chunks_avx2<T, grad_t, kMode, kKl, kPm>
              : backward_chunks_generic<T, grad_t, kMode, kKl, kPm>;
}

template <typename T, typename grad_t, int kMode>
BackwardFn backward_fn(bool avx2, bool kl, bool pm) {
  if (!kl) return backward_fn<T, grad_t, kMode, false, false>(avx2);
  return pm ? backward_fn<T, grad_t, kMode, true, true>(avx2)
            : backward_fn<T, grad_t, kMode, true, false>(avx2);
}

// Gradients from n samples' gradients of grad_t (when n > 0) and the KL's (when with_kl).
template <typename T, typename grad_t>
void run_backward(const BackwardArgs& a, bool with_kl) {
  const bool avx2 = cpu_has_avx2(), pm = a.g->has_prior_means;
  BackwardFn fn;
  if (a.n == 0) {
    // Without samples the gradients are the KL's, or zero; grad_t plays no part.
    fn = backward_fn<T, T, 0>(avx2, with_kl, pm);
  } else if (a.n == 1) {
    fn = backward_fn<T, grad_t, 1>(avx2, with_kl, pm);
  } else {
    fn = backward_fn<T, grad_t, 2>(avx2, with_kl, pm);
  }
  for_chunks(a.g->numel, [&](int64_t c0, int64_t c1) { fn(a, c0, c1); });
}

// ---------------------------------------------------------------------------------------------
// Variance: exp(softclip(logvar)).

template <bool kAvx2, typename T>
FASTBNF_INLINE void variance_chunks_impl(const Group& g, St<T>* out, int64_t c0, int64_t c1) {
  using S = Compute<T>;
  for_pieces(g, c0 * kChunk, std::min(g.numel, c1 * kChunk),
             [&](const TensorEntry& e, int64_t p0, int64_t p1) {
               const St<T>* lv = at_flat<T>(e.logvar, e, p0);
               St<T>* o = out + p0;
               for (int64_t b = 0; b < p1 - p0; b += kBlock) {
                 const int bm = static_cast<int>(std::min<int64_t>(kBlock, p1 - p0 - b));
                 St<T>* __restrict ob = o + b;
                 for_block<kAvx2, T, false, true>(
                     lv + b, bm, [&](int i, S, S, S, S v) { ob[i] = store_as<T>(v); });
               }
             });
}

template <typename T>
void variance_chunks_generic(const Group& g, St<T>* out, int64_t c0, int64_t c1) {
  variance_chunks_impl<false, T>(g, out, c0, c1);
}

template <typename T>
FASTBNF_TARGET_AVX2 void variance_chunks_avx2(const Group& g, St<T>* out, int64_t c0, int64_t c1) {
  variance_chunks_impl<FASTBNF_HAS_AVX2_PATH != 0, T>(g, out, c0, c1);
}

// The KL in the group's dtype, rounded from double as PyTorch's .to() rounds.
at::Tensor kl_tensor(double kl, at::ScalarType dtype) {
  return at::scalar_tensor(kl, at::TensorOptions().dtype(at::kDouble)).to(dtype);
}

}  // namespace

int64_t threads_used() {
  return static_cast<int64_t>(__builtin_popcountll(g_threads_mask.load()));
}

// ---------------------------------------------------------------------------------------------
// The ops. Their checks are group.h's, under the public ops' names.

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_kernel(
    at::TensorList means, at::TensorList logvars, std::optional<int64_t> n,
    std::optional<at::ScalarType> out_dtype, bool with_kl, double prior_var,
    std::optional<at::ArrayRef<double>> prior_vars, std::optional<at::TensorList> prior_means,
    int64_t salt) {
  constexpr const char* op = "fastbnf::sample";
  const PriorArgs prior = prior_args(prior_var, prior_vars, prior_means);
  const Group g = make_group(op, means, logvars, &prior);
  const int64_t samples = check_samples(op, n);
  const at::ScalarType odt = check_out_dtype(op, out_dtype, g);
  const int64_t N = g.numel;
  at::Tensor theta = n ? empty_output({samples, N}, odt) : empty_output({N}, odt);
  const uint64_t seed = draw_seed(salt);
  at::Tensor rng_state = make_rng_state(seed);

  std::vector<double> partials(with_kl ? num_chunks(N) : 0);
  const ForwardArgs a{&g, samples, theta.data_ptr(), PhiloxKey(seed, 0), partials.data()};
  dispatch_group(g.dtype, [&](auto t) {
    using T = decltype(t);
    dispatch_like<T>(odt, g.dtype, [&](auto o) { run_forward<T, decltype(o)>(a, with_kl); });
  });
  at::Tensor kl = with_kl ? kl_tensor(sum_in_order(partials), g.dtype)
                          : at::zeros({}, at::TensorOptions().dtype(g.dtype));
  return {theta, kl, rng_state};
}

std::tuple<at::Tensor, at::Tensor> sample_backward_kernel(
    const at::Tensor& grad_theta, const at::Tensor& grad_kl, at::TensorList means,
    at::TensorList logvars, const at::Tensor& rng_state, bool with_kl, double prior_var,
    std::optional<at::ArrayRef<double>> prior_vars, std::optional<at::TensorList> prior_means) {
  constexpr const char* op = "fastbnf::sample_backward";
  const PriorArgs prior = prior_args(prior_var, prior_vars, prior_means);
  const Group g = make_group(op, means, logvars, &prior);
  const at::Tensor grad = check_grad_theta(op, grad_theta, g);
  const at::Tensor state = check_rng_state(op, rng_state, g);
  double gkl = 0.0;
  if (with_kl) {
    check_grad_kl(op, grad_kl, g);
    gkl = grad_kl.item<double>();
  }
  const int64_t N = g.numel;
  const int64_t samples = grad.dim() == 2 ? grad.size(0) : 1;

  at::Tensor grad_means = empty_output({N}, g.dtype);
  at::Tensor grad_logvars = empty_output({N}, g.dtype);
  const BackwardArgs a{&g,
                       samples,
                       grad.data_ptr(),
                       gkl,
                       read_rng_state(state),
                       grad_means.data_ptr(),
                       grad_logvars.data_ptr()};
  dispatch_group(g.dtype, [&](auto t) {
    using T = decltype(t);
    dispatch_like<T>(grad.scalar_type(), g.dtype,
                     [&](auto gv) { run_backward<T, decltype(gv)>(a, with_kl); });
  });
  return {grad_means, grad_logvars};
}

at::Tensor kl_kernel(at::TensorList means, at::TensorList logvars, double prior_var,
                     std::optional<at::ArrayRef<double>> prior_vars,
                     std::optional<at::TensorList> prior_means) {
  constexpr const char* op = "fastbnf::kl";
  const PriorArgs prior = prior_args(prior_var, prior_vars, prior_means);
  const Group g = make_group(op, means, logvars, &prior);
  std::vector<double> partials(num_chunks(g.numel));
  const ForwardArgs a{&g, 0, nullptr, PhiloxKey(0, 0), partials.data()};
  dispatch_group(g.dtype, [&](auto t) {
    using T = decltype(t);
    run_forward<T, T>(a, true);
  });
  return kl_tensor(sum_in_order(partials), g.dtype);
}

std::tuple<at::Tensor, at::Tensor> kl_backward_kernel(
    const at::Tensor& grad_kl, at::TensorList means, at::TensorList logvars, double prior_var,
    std::optional<at::ArrayRef<double>> prior_vars, std::optional<at::TensorList> prior_means) {
  constexpr const char* op = "fastbnf::kl_backward";
  const PriorArgs prior = prior_args(prior_var, prior_vars, prior_means);
  const Group g = make_group(op, means, logvars, &prior);
  check_grad_kl(op, grad_kl, g);
  const int64_t N = g.numel;
  at::Tensor grad_means = empty_output({N}, g.dtype);
  at::Tensor grad_logvars = empty_output({N}, g.dtype);
  const BackwardArgs a{&g,
                       0,
                       nullptr,
                       grad_kl.item<double>(),
                       PhiloxKey(0, 0),
                       grad_means.data_ptr(),
                       grad_logvars.data_ptr()};
  dispatch_group(g.dtype, [&](auto t) {
    using T = decltype(t);
    run_backward<T, T>(a, true);
  });
  return {grad_means, grad_logvars};
}

at::Tensor variance_kernel(at::TensorList logvars) {
  constexpr const char* op = "fastbnf::variance";
  const Group g = make_group(op, std::nullopt, logvars, nullptr);
  at::Tensor out = empty_output({g.numel}, g.dtype);
  dispatch_group(g.dtype, [&](auto t) {
    using T = decltype(t);
    St<T>* o = static_cast<St<T>*>(out.data_ptr());
    const bool avx2 = cpu_has_avx2();
    for_chunks(g.numel, [&](int64_t c0, int64_t c1) {
      if (avx2) {
        variance_chunks_avx2<T>(g, o, c0, c1);
      } else {
        variance_chunks_generic<T>(g, o, c0, c1);
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace fastbnf
