// The fused variational Adam step on the CPU (fastbnf::adam_step_kernel; contract:
// fastbnf/ops/library.py). One pass over the group per step, cut into the chunks of
// posterior_kernels.cpp (chunk_walk.h): per chunk, the current sample's normals (from rng_state)
// and the next sample's (a new key) into two scratch buffers (per tensor piece instead where
// noise_offsets place the tensors elsewhere in the stream: a rank's shards of a group), then per
// tensor piece and block of kBlock elements:
//
//   1. the gradients of the means and log-variances, as sample_backward_kernel computes them for
//      one sample with grad_kl = kl_weight (posterior_math.h), rounded to the group's dtype as
//      its outputs are, so that the step equals the composed one (reference.adam_step);
//   2. AdamW on the means (with the weight decay) and the log-variances (without) and on their
//      moments, in place (adam_math.h);
//   3. theta = mu + sigma * eps of the next sample, from the updated block (still in L1).
//
// The memory traffic is what the step must move: the sample's gradient and the next sample,
// and the means, log-variances and four moments read and written, 56 bytes per float32
// parameter with float32 samples.
#include <memory>

#include "../common/adam_math.h"
#include "chunk_walk.h"
#include "kernel_ops.h"

namespace fastbnf {
namespace cpu {
namespace {

// The policy of adam_math.h: FMA in lerp where PyTorch's vectorized lerp has it (the AVX2 path).
template <bool kAvx2>
struct AdamMath {
  static constexpr bool kFma = kAvx2 && FASTBNF_HAS_AVX2_PATH;
  static FASTBNF_INLINE float sqrt(float x) { return __builtin_sqrtf(x); }
  static FASTBNF_INLINE double sqrt(double x) { return __builtin_sqrt(x); }
  static FASTBNF_INLINE float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
  static FASTBNF_INLINE double fma(double a, double b, double c) { return __builtin_fma(a, b, c); }
};

struct StepArgs {
  const Group* g;
  const void* grad;                 // (N,), theta's dtype
  void* exp_avgs;                   // (2 N,), the group's dtype
  void* exp_avg_sqs;                // (2 N,)
  void* theta;                      // (N,), out_t
  PhiloxKey key = PhiloxKey(0, 0);  // of the current sample
  PhiloxKey next_key = PhiloxKey(0, 0);
  double kl_weight;
  adam::Hyper means;    // the means' hyperparameters
  adam::Hyper logvars;  // the same without the weight decay
};

// The moments of a piece: the means' at flat index i, the log-variances' at N + i.
template <typename T>
struct Moments {
  St<T>* __restrict m_mu;
  St<T>* __restrict v_mu;
  St<T>* __restrict m_lv;
  St<T>* __restrict v_lv;
};

// One tensor piece of m elements: mu, lv (updated in place) and pm from the tensor, g, eps,
// next and theta at the piece's flat position.
template <bool kAvx2, typename T, typename out_t, bool kPm>
FASTBNF_INLINE void step_piece(St<T>* __restrict mu, St<T>* __restrict lv,
                               const St<T>* __restrict pm, const St<out_t>* __restrict g,
                               const float* __restrict eps, const float* __restrict next,
                               const Moments<T>& mom, St<out_t>* __restrict theta, int64_t m,
                               const TensorEntry& entry, Compute<T> gkl,
                               const adam::Scalars<Compute<T>>& a_mu,
                               const adam::Scalars<Compute<T>>& a_lv) {
  using S = Compute<T>;
  using A = AdamMath<kAvx2>;
  const S inv_var = static_cast<S>(entry.inv_prior_var);
  for (int64_t b = 0; b < m; b += kBlock) {
    const int bm = static_cast<int>(std::min<int64_t>(kBlock, m - b));
    St<T>* __restrict mu_b = mu + b;
    St<T>* __restrict lv_b = lv + b;
    const St<T>* __restrict pm_b = kPm ? pm + b : nullptr;
    const St<out_t>* __restrict g_b = g + b;
    const float* __restrict eps_b = eps + b;
    alignas(32) S grad_mu[kBlock], grad_lv[kBlock];
    for_block<kAvx2, T, true, true>(lv_b, bm, [&](int e, S q, S, S s, S v) {
      const S gt = load_as<S, out_t>(g_b[e]);
      const S mean = load_as<S, T>(mu_b[e]);
      const S d = kPm ? P::sub(mean, load_as<S, T>(pm_b[e])) : mean;
      const S part = P::add(P::logvar_part_sample(s, P::mul(static_cast<S>(eps_b[e]), gt)),
                            P::logvar_part_kl(v, inv_var, gkl));
      grad_mu[e] = load_as<S, T>(store_as<T>(P::grad_mean(gt, gkl, d, inv_var)));
      grad_lv[e] = load_as<S, T>(store_as<T>(P::grad_logvar(P::softclip_slope(q), part)));
    });
    St<T>* __restrict m_mu = mom.m_mu + b;
    St<T>* __restrict v_mu = mom.v_mu + b;
    St<T>* __restrict m_lv = mom.m_lv + b;
    St<T>* __restrict v_lv = mom.v_lv + b;
    FASTBNF_SIMD
    for (int e = 0; e < bm; ++e) {
      S p = load_as<S, T>(mu_b[e]), m1 = load_as<S, T>(m_mu[e]), m2 = load_as<S, T>(v_mu[e]);
      adam::update<A>(p, m1, m2, grad_mu[e], a_mu);
      mu_b[e] = store_as<T>(p);
      m_mu[e] = store_as<T>(m1);
      v_mu[e] = store_as<T>(m2);
      S l = load_as<S, T>(lv_b[e]), n1 = load_as<S, T>(m_lv[e]), n2 = load_as<S, T>(v_lv[e]);
      adam::update<A>(l, n1, n2, grad_lv[e], a_lv);
      lv_b[e] = store_as<T>(l);
      m_lv[e] = store_as<T>(n1);
      v_lv[e] = store_as<T>(n2);
    }
    const float* __restrict next_b = next + b;
    St<out_t>* __restrict theta_b = theta + b;
    for_block<kAvx2, T, true, false>(lv_b, bm, [&](int e, S, S, S s, S) {
      const S mean = load_as<S, T>(mu_b[e]);
      theta_b[e] = store_as<out_t>(P::theta(mean, s, static_cast<S>(next_b[e])));
    });
  }
}

template <bool kAvx2, typename T, typename out_t, bool kPm>
FASTBNF_INLINE void step_chunks_impl(const StepArgs& a, int64_t c0, int64_t c1) {
  using S = Compute<T>;
  const Group& g = *a.g;
  const int64_t N = g.numel;
  const adam::Scalars<S> a_mu = adam::scalars<S>(a.means);
  const adam::Scalars<S> a_lv = adam::scalars<S>(a.logvars);
  const S gkl = static_cast<S>(a.kl_weight);
  std::unique_ptr<float[]> eps_buf(new float[normals_capacity(kChunk)]);
  std::unique_ptr<float[]> next_buf(new float[normals_capacity(kChunk)]);
  const St<out_t>* grad = static_cast<const St<out_t>*>(a.grad);
  St<out_t>* theta = static_cast<St<out_t>*>(a.theta);
  St<T>* exp_avgs = static_cast<St<T>*>(a.exp_avgs);
  St<T>* exp_avg_sqs = static_cast<St<T>*>(a.exp_avg_sqs);
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t i0 = c * kChunk;
    const int64_t i1 = std::min(N, i0 + kChunk);
    // The chunk's normals at once where the noise follows the flat index; else (shards, whose
    // tensors sit at noise_offsets in the stream) each piece's at its own place.
    const float* eps = nullptr;
    const float* next = nullptr;
    if (g.noise_is_flat) {
      const uint64_t j0 = static_cast<uint64_t>(i0);
      eps = fill_normals<kAvx2>(eps_buf.get(), j0, i1 - i0, a.key);
      next = fill_normals<kAvx2>(next_buf.get(), j0, i1 - i0, a.next_key);
    }
    for_pieces(g, i0, i1, [&](const TensorEntry& e, int64_t p0, int64_t p1) {
      const float* eps_p;
      const float* next_p;
      if (g.noise_is_flat) {
        eps_p = eps + (p0 - i0);
        next_p = next + (p0 - i0);
      } else {
        const uint64_t j = static_cast<uint64_t>(e.noise_begin + (p0 - e.begin));
        eps_p = fill_normals<kAvx2>(eps_buf.get(), j, p1 - p0, a.key);
        next_p = fill_normals<kAvx2>(next_buf.get(), j, p1 - p0, a.next_key);
      }
      // The op checked that the means and log-variances are the caller's tensors (no copies):
      // the table's read-only pointers are theirs, written here.
      St<T>* mu = const_cast<St<T>*>(at_flat<T>(e.mean, e, p0));
      St<T>* lv = const_cast<St<T>*>(at_flat<T>(e.logvar, e, p0));
      const Moments<T> mom{exp_avgs + p0, exp_avg_sqs + p0, exp_avgs + N + p0,
                           exp_avg_sqs + N + p0};
      step_piece<kAvx2, T, out_t, kPm>(mu, lv, kPm ? at_flat<T>(e.prior_mean, e, p0) : nullptr,
                                       grad + p0, eps_p, next_p, mom, theta + p0, p1 - p0, e, gkl,
                                       a_mu, a_lv);
    });
  }
}

template <typename T, typename out_t, bool kPm>
void step_chunks_generic(const StepArgs& a, int64_t c0, int64_t c1) {
  step_chunks_impl<false, T, out_t, kPm>(a, c0, c1);
}

template <typename T, typename out_t, bool kPm>
FASTBNF_TARGET_AVX2 void step_chunks_avx2(const StepArgs& a, int64_t c0, int64_t c1) {
  step_chunks_impl<FASTBNF_HAS_AVX2_PATH != 0, T, out_t, kPm>(a, c0, c1);
}

using StepFn = void (*)(const StepArgs&, int64_t, int64_t);

template <typename T, typename out_t, bool kPm>
StepFn step_fn(bool avx2) {
  return avx2 ? step_chunks_avx2<T, out_t, kPm> : step_chunks_generic<T, out_t, kPm>;
}

template <typename T, typename out_t>
void run_step(const StepArgs& a) {
  const bool avx2 = cpu_has_avx2();
  const StepFn fn =
      a.g->has_prior_means ? step_fn<T, out_t, true>(avx2) : step_fn<T, out_t, false>(avx2);
  for_chunks(a.g->numel, [&](int64_t c0, int64_t c1) { fn(a, c0, c1); });
}

}  // namespace

at::Tensor adam_step_kernel(const at::Tensor& grad_theta, at::TensorList means,
                            at::TensorList logvars, const at::Tensor& exp_avgs,
                            const at::Tensor& exp_avg_sqs, const at::Tensor& theta,
                            const at::Tensor& rng_state, int64_t step, double lr, double beta1,
                            double beta2, double eps, double weight_decay, double kl_weight,
                            double prior_var, std::optional<at::ArrayRef<double>> prior_vars,
                            std::optional<at::TensorList> prior_means, int64_t salt,
                            std::optional<at::IntArrayRef> noise_offsets,
                            const std::optional<at::Tensor>& step_tensor) {
  constexpr const char* op = "fastbnf::adam_step";
  const PriorArgs prior = prior_args(prior_var, prior_vars, prior_means);
  const Group g = make_group(op, means, logvars, &prior, noise_offsets);
  const at::Tensor grad =
      check_adam_step(op, g, means, logvars, grad_theta, exp_avgs, exp_avg_sqs, theta, step);
  const at::Tensor state = check_rng_state(op, rng_state, g);
  if (step_tensor) step = check_step_tensor(op, *step_tensor, g).item<int64_t>();
  const uint64_t seed = draw_seed(salt);
  at::Tensor next_state = make_rng_state(seed);

  StepArgs a{};
  a.g = &g;
  a.grad = grad.data_ptr();
  a.exp_avgs = exp_avgs.data_ptr();
  a.exp_avg_sqs = exp_avg_sqs.data_ptr();
  a.theta = theta.data_ptr();
  a.key = read_rng_state(state);
  a.next_key = PhiloxKey(seed, 0);
  a.kl_weight = kl_weight;
  a.means = adam::Hyper{lr, beta1, beta2, eps, weight_decay, step};
  a.logvars = adam::Hyper{lr, beta1, beta2, eps, 0.0, step};
  dispatch_group(g.dtype, [&](auto t) {
    using T = decltype(t);
    dispatch_like<T>(theta.scalar_type(), g.dtype, [&](auto o) { run_step<T, decltype(o)>(a); });
  });
  return next_state;
}

}  // namespace cpu
}  // namespace fastbnf
