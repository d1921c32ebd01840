// Fused CPU kernels of the fastbnf kernel ops (contract: csrc/README.md).
//
// One pass over the flat index space of the group per call. The space is cut into chunks of
// kChunk elements at fixed global positions, whatever the thread count; at::parallel_for hands
// out whole chunks. A chunk finds the tensors it overlaps in the pointer table, draws its normals
// into a thread-local scratch buffer (L1/L2 resident) and runs the vectorized epilogue per
// tensor piece. The KL of chunk c is an fp64 partial sum of its elements, in element order, and
// the partials are added in chunk order: the KL is the same for any number of threads.
//
// Build flags (fastbnf/_build.py): -O3 -fopenmp -fno-math-errno -ffp-contract=off, and no
// -ffast-math. With PyTorch's OpenMP backend (Linux wheels) at::parallel_for is inline code whose
// `omp parallel` runs serially unless this file is built with -fopenmp (the symbols resolve to the
// libgomp that libtorch_cpu loads); where PyTorch uses its native pool (macOS), -fopenmp-simd is
// enough. -fno-math-errno lets sqrt vectorize. -ffp-contract=off keeps softclip, theta and the
// KL terms rounding like PyTorch (softclip near its bound turns one ulp into 18 ulp of the
// variance); only the polynomials of cpu_math.h use FMA, explicitly, on the AVX2 path.
#include "fused_ops.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/Generator.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "buffer_pool.h"
#include "cpu_math.h"

#if defined(__FAST_MATH__)
#warning "fastbnf: csrc/cpu is meant to be built without -ffast-math (see fused_ops.cpp)"
#endif
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#warning "fastbnf: csrc/cpu built without -fopenmp: at::parallel_for will run on one thread"
#endif

namespace fastbnf {
namespace cpu {
namespace {

// Chunk of the flat index space: the unit of parallel work and of the KL's fp64 partials.
constexpr int64_t kChunk = 4096;
// Chunks below which a call stays on the calling thread.
constexpr int64_t kGrainChunks = 8;

constexpr double kSoftclipBound = 18.0;

// ---------------------------------------------------------------------------------------------
// Scalar conversions that vectorize (c10's Half conversion does not).

template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<c10::BFloat16> {
  using type = uint16_t;
};
template <>
struct Storage<c10::Half> {
  using type = uint16_t;
};

template <typename out_t, typename S>
FASTBNF_INLINE typename Storage<out_t>::type store_as(S x) {
  if constexpr (std::is_same_v<out_t, c10::BFloat16>) {
    // c10's round_to_nearest_even, branch-free.
    const float f = static_cast<float>(x);
    const uint32_t u = as_u32(f);
    const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
    return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
  } else if constexpr (std::is_same_v<out_t, c10::Half>) {
#if defined(__FLT16_MAX__)
    const _Float16 h = static_cast<_Float16>(static_cast<float>(x));
    uint16_t u;
    std::memcpy(&u, &h, sizeof(u));
    return u;
#else
    return c10::Half(static_cast<float>(x)).x;
#endif
  } else {
    return static_cast<out_t>(x);
  }
}

template <typename S, typename in_t>
FASTBNF_INLINE S load_as(typename Storage<in_t>::type x) {
  if constexpr (std::is_same_v<in_t, c10::BFloat16>) {
    return static_cast<S>(as_f32(static_cast<uint32_t>(x) << 16));
  } else if constexpr (std::is_same_v<in_t, c10::Half>) {
#if defined(__FLT16_MAX__)
    _Float16 h;
    std::memcpy(&h, &x, sizeof(h));
    return static_cast<S>(static_cast<float>(h));
#else
    c10::Half h;
    h.x = x;
    return static_cast<S>(static_cast<float>(h));
#endif
  } else {
    return static_cast<S>(x);
  }
}

template <bool kFma>
FASTBNF_INLINE float exp_s(float x) {
  return exp_poly<kFma>(x);
}
template <bool kFma>
FASTBNF_INLINE double exp_s(double x) {
  return std::exp(x);
}

// softclip(l, 18) = l * q with q = 1 / sqrt(1 + (l / 18)^2), whose derivative is q^3. The same
// operations, in the same order, as PyTorch's `x * (1 + (x / 18).square()).rsqrt()` (zuko and
// fastbnf.reference): with the build's -ffp-contract=off they round alike, which matters since
// exp(softclip) near the bound turns one ulp of softclip into 18 ulp of the variance.
template <typename S>
FASTBNF_INLINE S softclip(S l, S& q) {
  const S t = l / static_cast<S>(kSoftclipBound);
  q = static_cast<S>(1) / std::sqrt(static_cast<S>(1) + t * t);
  return l * q;
}

// ---------------------------------------------------------------------------------------------
// The group: a table of pointers and flat offsets, empty tensors left out.

struct Entry {
  const void* mu;
  const void* lv;
  const void* pm;
  double pv;
  int64_t begin;
  int64_t end;
};

struct Group {
  std::vector<Entry> entries;
  std::vector<int64_t> ends;  // entries[t].end, for the search of a chunk's first tensor
  int64_t numel = 0;
  at::ScalarType dtype = at::kFloat;
  bool has_prior_means = false;

  size_t first_entry(int64_t i) const {
    return static_cast<size_t>(std::upper_bound(ends.begin(), ends.end(), i) - ends.begin());
  }
};

void check_tensor(const char* op, const char* list, size_t t, const at::Tensor& x,
                  at::ScalarType dtype, at::IntArrayRef sizes) {
  TORCH_CHECK(x.defined(), op, ": ", list, "[", t, "] is undefined");
  TORCH_CHECK(x.device().is_cpu(), op, ": ", list, "[", t, "] is on ", x.device(),
              ", expected cpu");
  TORCH_CHECK(x.scalar_type() == dtype, op, ": ", list, "[", t, "] has dtype ", x.scalar_type(),
              ", expected ", dtype, " like means[0]");
  TORCH_CHECK(x.sizes() == sizes, op, ": ", list, "[", t, "] has shape ", x.sizes(),
              ", expected ", sizes, " like means[", t, "]");
  TORCH_CHECK(x.is_contiguous(), op, ": ", list, "[", t,
              "] is not contiguous (create it with torch.contiguous_format)");
}

void check_prior_var(const char* op, const std::string& what, double v) {
  TORCH_CHECK(std::isfinite(v) && v > 0.0, op, ": ", what, " must be positive and finite, got ",
              v);
}

// Validates the lists of a call and builds its table. means may be absent (variance).
Group make_group(const char* op, std::optional<at::TensorList> means, at::TensorList logvars,
                 double prior_var, std::optional<at::ArrayRef<double>> prior_vars,
                 std::optional<at::TensorList> prior_means) {
  const size_t T = logvars.size();
  TORCH_CHECK(T > 0, op, ": the group holds no tensors");
  if (means) {
    TORCH_CHECK(means->size() == T, op, ": means and logvars have different lengths (",
                means->size(), " vs ", T, ")");
  }
  if (prior_vars) {
    TORCH_CHECK(prior_vars->size() == T, op, ": prior_vars has ", prior_vars->size(),
                " entries for ", T, " tensors");
  }
  if (prior_means) {
    TORCH_CHECK(prior_means->size() == T, op, ": prior_means has ", prior_means->size(),
                " entries for ", T, " tensors");
  }
  if (means) check_prior_var(op, "prior_var", prior_var);

  Group g;
  const at::Tensor& ref = means ? (*means)[0] : logvars[0];
  TORCH_CHECK(ref.defined(), op, ": ", means ? "means[0]" : "logvars[0]", " is undefined");
  g.dtype = ref.scalar_type();
  TORCH_CHECK(g.dtype == at::kFloat || g.dtype == at::kDouble, op,
              ": the group's dtype must be float32 or float64, got ", g.dtype);
  g.has_prior_means = prior_means.has_value();
  g.entries.reserve(T);
  g.ends.reserve(T);
  int64_t offset = 0;
  for (size_t t = 0; t < T; ++t) {
    const at::Tensor& lv = logvars[t];
    TORCH_CHECK(lv.defined(), op, ": logvars[", t, "] is undefined");
    const at::IntArrayRef sizes = means ? (*means)[t].sizes() : lv.sizes();
    if (means) check_tensor(op, "means", t, (*means)[t], g.dtype, sizes);
    check_tensor(op, "logvars", t, lv, g.dtype, sizes);
    const void* pm = nullptr;
    if (prior_means) {
      check_tensor(op, "prior_means", t, (*prior_means)[t], g.dtype, sizes);
      pm = (*prior_means)[t].data_ptr();
    }
    double pv = prior_var;
    if (prior_vars) {
      pv = (*prior_vars)[t];
      check_prior_var(op, "prior_vars[" + std::to_string(t) + "]", pv);
    }
    const int64_t numel = lv.numel();
    if (numel > 0) {
      g.entries.push_back(
          Entry{means ? (*means)[t].data_ptr() : nullptr, lv.data_ptr(), pm, pv, offset,
                offset + numel});
      g.ends.push_back(offset + numel);
    }
    offset += numel;
  }
  g.numel = offset;
  return g;
}

int64_t num_chunks(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Runs f(c0, c1) over the chunks [c0, c1) with ATen's thread pool.
template <typename F>
void for_chunks(int64_t numel, const F& f) {
  const int64_t chunks = num_chunks(numel);
  if (chunks == 0) return;
  at::parallel_for(0, chunks, kGrainChunks, f);
}

double sum_in_order(const std::vector<double>& partials) {
  double total = 0.0;
  for (const double p : partials) total += p;
  return total;
}

// Calls f(entry, i0, i1) for every tensor piece [i0, i1) of the flat range [a, b), in order.
template <typename F>
FASTBNF_INLINE void for_pieces(const Group& g, int64_t a, int64_t b, const F& f) {
  for (size_t t = g.first_entry(a); t < g.entries.size() && g.entries[t].begin < b; ++t) {
    const Entry& e = g.entries[t];
    f(e, std::max(a, e.begin), std::min(b, e.end));
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: theta = mu + sigma * eps for sample 0, sigma kept for the other samples, KL terms.

struct PriorConst {
  double inv_pv;
  double log_pv_m1;  // log(pv) - 1
};

FASTBNF_INLINE PriorConst prior_const(const Entry& e) {
  return PriorConst{1.0 / e.pv, std::log(e.pv) - 1.0};
}

// One tensor piece of m elements. Returns its KL sum when kKl.
template <bool kFma, typename S, typename out_t, bool kTheta, bool kSig, bool kKl, bool kPm>
FASTBNF_INLINE double forward_piece(const S* __restrict mu, const S* __restrict lv,
                                    const S* __restrict pm, const float* __restrict eps,
                                    typename Storage<out_t>::type* __restrict theta,
                                    S* __restrict sig, int64_t m, PriorConst pc) {
  const S inv_pv = static_cast<S>(pc.inv_pv);
  const S c = static_cast<S>(pc.log_pv_m1);
  double acc = 0.0;
  FASTBNF_SIMD_SUM(acc)
  for (int64_t e = 0; e < m; ++e) {
    S q;
    const S lc = softclip(lv[e], q);
    const S s = exp_s<kFma>(lc * static_cast<S>(0.5));
    if constexpr (kTheta) theta[e] = store_as<out_t>(mu[e] + s * static_cast<S>(eps[e]));
    if constexpr (kSig) sig[e] = s;
    if constexpr (kKl) {
      const S d = kPm ? mu[e] - pm[e] : mu[e];
      const S v = exp_s<kFma>(lc);  // not s * s: one rounding, like the reference
      acc += static_cast<double>(static_cast<S>(0.5) * ((v + d * d) * inv_pv + c - lc));
    }
  }
  return acc;
}

// theta of sample k > 0 from the kept sigma.
template <typename S, typename out_t>
FASTBNF_INLINE void resample_piece(const S* __restrict mu, const S* __restrict sig,
                                   const float* __restrict eps,
                                   typename Storage<out_t>::type* __restrict theta, int64_t m) {
  FASTBNF_SIMD
  for (int64_t e = 0; e < m; ++e) {
    theta[e] = store_as<out_t>(mu[e] + sig[e] * static_cast<S>(eps[e]));
  }
}

struct ForwardArgs {
  const Group* g;
  int64_t n;  // samples drawn (0: KL only)
  void* theta;
  bool with_kl;
  PhiloxKey key;
  double* partials;
};

template <bool kAvx2, typename S, typename out_t, bool kKl, bool kPm>
FASTBNF_INLINE void forward_chunks_impl(const ForwardArgs& a, int64_t c0, int64_t c1) {
  using out_s = typename Storage<out_t>::type;
  const Group& g = *a.g;
  const int64_t N = g.numel;
  std::unique_ptr<float[]> eps_buf(a.n > 0 ? new float[normals_capacity(kChunk)] : nullptr);
  std::unique_ptr<S[]> sig_buf(a.n > 1 ? new S[kChunk] : nullptr);
  out_s* theta = static_cast<out_s*>(a.theta);
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t i0 = c * kChunk;
    const int64_t i1 = std::min(N, i0 + kChunk);
    const float* eps = nullptr;
    if (a.n > 0) eps = fill_normals<kAvx2>(eps_buf.get(), static_cast<uint64_t>(i0), i1 - i0, a.key);
    double kl = 0.0;
    for_pieces(g, i0, i1, [&](const Entry& e, int64_t p0, int64_t p1) {
      const S* mu = static_cast<const S*>(e.mu) + (p0 - e.begin);
      const S* lv = static_cast<const S*>(e.lv) + (p0 - e.begin);
      const S* pm = kPm ? static_cast<const S*>(e.pm) + (p0 - e.begin) : nullptr;
      const PriorConst pc = prior_const(e);
      const int64_t m = p1 - p0;
      if (a.n == 0) {
        kl += forward_piece<kAvx2, S, out_t, false, false, kKl, kPm>(mu, lv, pm, nullptr, nullptr,
                                                              nullptr, m, pc);
      } else if (a.n == 1) {
        kl += forward_piece<kAvx2, S, out_t, true, false, kKl, kPm>(mu, lv, pm, eps + (p0 - i0),
                                                             theta + p0, nullptr, m, pc);
      } else {
        kl += forward_piece<kAvx2, S, out_t, true, true, kKl, kPm>(
            mu, lv, pm, eps + (p0 - i0), theta + p0, sig_buf.get() + (p0 - i0), m, pc);
      }
    });
    for (int64_t k = 1; k < a.n; ++k) {
      eps = fill_normals<kAvx2>(eps_buf.get(), static_cast<uint64_t>(k * N + i0), i1 - i0, a.key);
      for_pieces(g, i0, i1, [&](const Entry& e, int64_t p0, int64_t p1) {
        resample_piece<S, out_t>(static_cast<const S*>(e.mu) + (p0 - e.begin),
                                 sig_buf.get() + (p0 - i0), eps + (p0 - i0),
                                 theta + k * N + p0, p1 - p0);
      });
    }
    if (kKl) a.partials[c] = kl;
  }
}

template <typename S, typename out_t, bool kKl, bool kPm>
void forward_chunks_generic(const ForwardArgs& a, int64_t c0, int64_t c1) {
  forward_chunks_impl<false, S, out_t, kKl, kPm>(a, c0, c1);
}

template <typename S, typename out_t, bool kKl, bool kPm>
FASTBNF_TARGET_AVX2 void forward_chunks_avx2(const ForwardArgs& a, int64_t c0, int64_t c1) {
  forward_chunks_impl<FASTBNF_HAS_AVX2_PATH != 0, S, out_t, kKl, kPm>(a, c0, c1);
}

template <typename S, typename out_t>
void run_forward(const ForwardArgs& a) {
  using Fn = void (*)(const ForwardArgs&, int64_t, int64_t);
  const bool kl = a.with_kl, pm = a.g->has_prior_means;
  const bool avx2 = cpu_has_avx2();
  Fn fn;
  if (avx2) {
    fn = kl ? (pm ? forward_chunks_avx2<S, out_t, true, true> : forward_chunks_avx2<S, out_t, true, false>)
            : forward_chunks_avx2<S, out_t, false, false>;
  } else {
    fn = kl ? (pm ? forward_chunks_generic<S, out_t, true, true>
                  : forward_chunks_generic<S, out_t, true, false>)
            : forward_chunks_generic<S, out_t, false, false>;
  }
  for_chunks(a.g->numel, [&](int64_t c0, int64_t c1) { fn(a, c0, c1); });
}

// ---------------------------------------------------------------------------------------------
// Backward: grad_mu = sum_k g_k + g_kl (mu - m) / pv,
//           grad_logvar = s' (0.5 sigma sum_k g_k eps_k + g_kl 0.5 (v / pv - 1)).

// kMode 0: no sample gradient (KL only); 1: one sample, g and eps read directly;
// 2: several samples, their sums G and GE given.
template <bool kFma, typename S, typename grad_t, int kMode, bool kKl, bool kPm>
FASTBNF_INLINE void backward_piece(const S* __restrict mu, const S* __restrict lv,
                                   const S* __restrict pm,
                                   const typename Storage<grad_t>::type* __restrict gt,
                                   const float* __restrict eps, const S* __restrict G,
                                   const S* __restrict GE, S* __restrict gmu, S* __restrict glv,
                                   int64_t m, PriorConst pc, S gkl) {
  const S inv_pv = static_cast<S>(pc.inv_pv);
  const S half = static_cast<S>(0.5);
  FASTBNF_SIMD
  for (int64_t e = 0; e < m; ++e) {
    S q;
    const S lc = softclip(lv[e], q);
    const S s = exp_s<kFma>(lc * half);
    S a = 0, b = 0;
    if constexpr (kMode == 1) {
      const S g = load_as<S, grad_t>(gt[e]);
      a = g;
      b = half * s * (g * static_cast<S>(eps[e]));
    } else if constexpr (kMode == 2) {
      a = G[e];
      b = half * s * GE[e];
    }
    if constexpr (kKl) {
      const S d = kPm ? mu[e] - pm[e] : mu[e];
      a += gkl * (d * inv_pv);
      b += gkl * (half * (exp_s<kFma>(lc) * inv_pv - static_cast<S>(1)));
    }
    gmu[e] = a;
    glv[e] = (q * q * q) * b;
  }
}

// G = sum_k g_k and GE = sum_k g_k eps_k over the samples, k in order.
template <typename S, typename grad_t>
FASTBNF_INLINE void accumulate_piece(const typename Storage<grad_t>::type* __restrict gt,
                                     const float* __restrict eps, S* __restrict G,
                                     S* __restrict GE, int64_t m, bool first) {
  if (first) {
    FASTBNF_SIMD
    for (int64_t e = 0; e < m; ++e) {
      const S g = load_as<S, grad_t>(gt[e]);
      G[e] = g;
      GE[e] = g * static_cast<S>(eps[e]);
    }
  } else {
    FASTBNF_SIMD
    for (int64_t e = 0; e < m; ++e) {
      const S g = load_as<S, grad_t>(gt[e]);
      G[e] += g;
      GE[e] += g * static_cast<S>(eps[e]);
    }
  }
}

struct BackwardArgs {
  const Group* g;
  int64_t n;           // samples in grad_theta (0: KL only)
  const void* grad;    // (n, N) flat
  double grad_kl;
  PhiloxKey key;
  void* grad_means;
  void* grad_logvars;
};

template <bool kAvx2, typename S, typename grad_t, bool kKl, bool kPm>
FASTBNF_INLINE void backward_chunks_impl(const BackwardArgs& a, int64_t c0, int64_t c1) {
  using grad_s = typename Storage<grad_t>::type;
  const Group& g = *a.g;
  const int64_t N = g.numel;
  std::unique_ptr<float[]> eps_buf(a.n > 0 ? new float[normals_capacity(kChunk)] : nullptr);
  std::unique_ptr<S[]> G(a.n > 1 ? new S[kChunk] : nullptr);
  std::unique_ptr<S[]> GE(a.n > 1 ? new S[kChunk] : nullptr);
  const grad_s* grad = static_cast<const grad_s*>(a.grad);
  S* gmu = static_cast<S*>(a.grad_means);
  S* glv = static_cast<S*>(a.grad_logvars);
  const S gkl = static_cast<S>(a.grad_kl);
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t i0 = c * kChunk;
    const int64_t i1 = std::min(N, i0 + kChunk);
    const float* eps = nullptr;
    if (a.n > 1) {
      for (int64_t k = 0; k < a.n; ++k) {
        eps = fill_normals<kAvx2>(eps_buf.get(), static_cast<uint64_t>(k * N + i0), i1 - i0,
                                  a.key);
        accumulate_piece<S, grad_t>(grad + k * N + i0, eps, G.get(), GE.get(), i1 - i0, k == 0);
      }
    } else if (a.n == 1) {
      eps = fill_normals<kAvx2>(eps_buf.get(), static_cast<uint64_t>(i0), i1 - i0, a.key);
    }
    for_pieces(g, i0, i1, [&](const Entry& e, int64_t p0, int64_t p1) {
      const S* mu = static_cast<const S*>(e.mu) + (p0 - e.begin);
      const S* lv = static_cast<const S*>(e.lv) + (p0 - e.begin);
      const S* pm = kPm ? static_cast<const S*>(e.pm) + (p0 - e.begin) : nullptr;
      const PriorConst pc = prior_const(e);
      const int64_t m = p1 - p0, r = p0 - i0;
      if (a.n == 0) {
        backward_piece<kAvx2, S, grad_t, 0, kKl, kPm>(mu, lv, pm, nullptr, nullptr, nullptr, nullptr,
                                               gmu + p0, glv + p0, m, pc, gkl);
      } else if (a.n == 1) {
        backward_piece<kAvx2, S, grad_t, 1, kKl, kPm>(mu, lv, pm, grad + p0, eps + r, nullptr, nullptr,
                                               gmu + p0, glv + p0, m, pc, gkl);
      } else {
        backward_piece<kAvx2, S, grad_t, 2, kKl, kPm>(mu, lv, pm, nullptr, nullptr, G.get() + r,
                                               GE.get() + r, gmu + p0, glv + p0, m, pc, gkl);
      }
    });
  }
}

template <typename S, typename grad_t, bool kKl, bool kPm>
void backward_chunks_generic(const BackwardArgs& a, int64_t c0, int64_t c1) {
  backward_chunks_impl<false, S, grad_t, kKl, kPm>(a, c0, c1);
}

template <typename S, typename grad_t, bool kKl, bool kPm>
FASTBNF_TARGET_AVX2 void backward_chunks_avx2(const BackwardArgs& a, int64_t c0, int64_t c1) {
  backward_chunks_impl<FASTBNF_HAS_AVX2_PATH != 0, S, grad_t, kKl, kPm>(a, c0, c1);
}

template <typename S, typename grad_t>
void run_backward(const BackwardArgs& a, bool with_kl) {
  using Fn = void (*)(const BackwardArgs&, int64_t, int64_t);
  const bool pm = a.g->has_prior_means;
  Fn fn;
  if (cpu_has_avx2()) {
    fn = with_kl ? (pm ? backward_chunks_avx2<S, grad_t, true, true>
                       : backward_chunks_avx2<S, grad_t, true, false>)
                 : backward_chunks_avx2<S, grad_t, false, false>;
  } else {
    fn = with_kl ? (pm ? backward_chunks_generic<S, grad_t, true, true>
                       : backward_chunks_generic<S, grad_t, true, false>)
                 : backward_chunks_generic<S, grad_t, false, false>;
  }
  for_chunks(a.g->numel, [&](int64_t c0, int64_t c1) { fn(a, c0, c1); });
}

// ---------------------------------------------------------------------------------------------
// Variance: exp(softclip(logvar)).

template <bool kFma, typename S>
FASTBNF_INLINE void variance_chunks_impl(const Group& g, S* out, int64_t c0, int64_t c1) {
  for_pieces(g, c0 * kChunk, std::min(g.numel, c1 * kChunk),
             [&](const Entry& e, int64_t p0, int64_t p1) {
               const S* __restrict lv = static_cast<const S*>(e.lv) + (p0 - e.begin);
               S* __restrict o = out + p0;
               const int64_t m = p1 - p0;
               FASTBNF_SIMD
               for (int64_t i = 0; i < m; ++i) {
                 S q;
                 o[i] = exp_s<kFma>(softclip(lv[i], q));
               }
             });
}

template <typename S>
void variance_chunks_generic(const Group& g, S* out, int64_t c0, int64_t c1) {
  variance_chunks_impl<false, S>(g, out, c0, c1);
}

template <typename S>
FASTBNF_TARGET_AVX2 void variance_chunks_avx2(const Group& g, S* out, int64_t c0, int64_t c1) {
  variance_chunks_impl<FASTBNF_HAS_AVX2_PATH != 0, S>(g, out, c0, c1);
}

// ---------------------------------------------------------------------------------------------
// Dtype dispatch.

template <typename F>
void dispatch_group(at::ScalarType dtype, const F& f) {
  if (dtype == at::kFloat) {
    f(float{});
  } else {
    f(double{});
  }
}

template <typename F>
void dispatch_low(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    case at::kFloat:
      f(float{});
      break;
    default:
      f(double{});
      break;
  }
}

at::Tensor make_rng_state(uint64_t seed) {
  at::Tensor state = at::empty({2}, at::TensorOptions().dtype(at::kLong));
  int64_t* p = state.data_ptr<int64_t>();
  p[0] = static_cast<int64_t>(seed);
  p[1] = 0;
  return state;
}

uint64_t draw_seed(int64_t stream) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
      std::nullopt, at::detail::getDefaultCPUGenerator());
  uint64_t seed;
  {
    // The generator's mutex: other threads may draw from the default generator concurrently.
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();
  }
  return fold_stream(seed, static_cast<uint64_t>(stream));
}

PhiloxKey read_rng_state(const char* op, const at::Tensor& rng_state) {
  TORCH_CHECK(rng_state.defined(), op, ": rng_state is undefined");
  TORCH_CHECK(rng_state.device().is_cpu(), op, ": rng_state is on ", rng_state.device(),
              ", expected cpu");
  TORCH_CHECK(rng_state.scalar_type() == at::kLong, op, ": rng_state has dtype ",
              rng_state.scalar_type(), ", expected int64");
  TORCH_CHECK(rng_state.dim() == 1 && rng_state.size(0) == 2, op,
              ": rng_state must have shape (2,) [seed, offset], got ", rng_state.sizes());
  const at::Tensor s = rng_state.contiguous();
  const int64_t* p = s.data_ptr<int64_t>();
  return PhiloxKey(static_cast<uint64_t>(p[0]), static_cast<uint64_t>(p[1]));
}

at::Tensor kl_tensor(double kl, at::ScalarType dtype) {
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(dtype));
  if (dtype == at::kFloat) {
    *out.data_ptr<float>() = static_cast<float>(kl);
  } else {
    *out.data_ptr<double>() = kl;
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The ops.

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_kernel(
    at::TensorList means, at::TensorList logvars, std::optional<int64_t> n,
    std::optional<at::ScalarType> out_dtype, bool with_kl, double prior_var,
    std::optional<at::ArrayRef<double>> prior_vars, std::optional<at::TensorList> prior_means,
    int64_t stream) {
  constexpr const char* op = "fastbnf::sample_kernel";
  const Group g = make_group(op, means, logvars, prior_var, prior_vars, prior_means);
  if (n) TORCH_CHECK(*n >= 0, op, ": n must be non-negative, got ", *n);
  const at::ScalarType odt = out_dtype.value_or(g.dtype);
  TORCH_CHECK(odt == g.dtype || odt == at::kBFloat16 || odt == at::kHalf, op,
              ": out_dtype must be the group's dtype (", g.dtype, "), bfloat16 or float16, got ",
              odt);
  const int64_t N = g.numel;
  const int64_t samples = n.value_or(1);
  at::Tensor theta = n ? empty_output({samples, N}, odt) : empty_output({N}, odt);
  const uint64_t seed = draw_seed(stream);
  at::Tensor rng_state = make_rng_state(seed);

  std::vector<double> partials(with_kl ? num_chunks(N) : 0);
  ForwardArgs a{&g, samples, theta.data_ptr(), with_kl, PhiloxKey(seed, 0), partials.data()};
  if (samples > 0 || with_kl) {
    dispatch_group(g.dtype, [&](auto s) {
      using S = decltype(s);
      if (odt == g.dtype) {
        run_forward<S, S>(a);
      } else if (odt == at::kBFloat16) {
        run_forward<S, c10::BFloat16>(a);
      } else {
        run_forward<S, c10::Half>(a);
      }
    });
  }
  at::Tensor kl = with_kl ? kl_tensor(sum_in_order(partials), g.dtype)
                          : at::zeros({}, at::TensorOptions().dtype(g.dtype));
  return {theta, kl, rng_state};
}

std::tuple<at::Tensor, at::Tensor> sample_backward_kernel(
    const at::Tensor& grad_theta, const at::Tensor& grad_kl, at::TensorList means,
    at::TensorList logvars, const at::Tensor& rng_state, bool with_kl, double prior_var,
    std::optional<at::ArrayRef<double>> prior_vars, std::optional<at::TensorList> prior_means) {
  constexpr const char* op = "fastbnf::sample_backward_kernel";
  const Group g = make_group(op, means, logvars, prior_var, prior_vars, prior_means);
  const int64_t N = g.numel;
  const PhiloxKey key = read_rng_state(op, rng_state);
  TORCH_CHECK(grad_theta.defined(), op, ": grad_theta is undefined");
  TORCH_CHECK(grad_theta.device().is_cpu(), op, ": grad_theta is on ", grad_theta.device(),
              ", expected cpu");
  const at::ScalarType gdt = grad_theta.scalar_type();
  TORCH_CHECK(gdt == at::kFloat || gdt == at::kDouble || gdt == at::kBFloat16 || gdt == at::kHalf,
              op, ": grad_theta must be floating point, got ", gdt);
  TORCH_CHECK((grad_theta.dim() == 1 && grad_theta.size(0) == N) ||
                  (grad_theta.dim() == 2 && grad_theta.size(1) == N),
              op, ": grad_theta has shape ", grad_theta.sizes(), ", expected (", N, ",) or (n, ",
              N, ")");
  const int64_t samples = grad_theta.dim() == 2 ? grad_theta.size(0) : 1;
  double gkl = 0.0;
  if (with_kl) {
    TORCH_CHECK(grad_kl.defined() && grad_kl.numel() == 1, op,
                ": grad_kl must hold one element, got shape ",
                grad_kl.defined() ? grad_kl.sizes() : at::IntArrayRef{});
    gkl = grad_kl.item<double>();
  }
  // A gradient of another floating dtype than the group's or the low-precision outputs' is
  // converted once; the usual cases are read in place.
  at::Tensor grad = grad_theta;
  if (gdt != g.dtype && gdt != at::kBFloat16 && gdt != at::kHalf) grad = grad.to(g.dtype);
  grad = grad.contiguous();

  at::Tensor grad_means = empty_output({N}, g.dtype);
  at::Tensor grad_logvars = empty_output({N}, g.dtype);
  BackwardArgs a{&g,  samples, grad.data_ptr(), gkl, key, grad_means.data_ptr(),
                 grad_logvars.data_ptr()};
  dispatch_group(g.dtype, [&](auto s) {
    using S = decltype(s);
    dispatch_low(grad.scalar_type(), [&](auto gv) {
      using grad_t = decltype(gv);
      if constexpr (std::is_same_v<grad_t, S> || std::is_same_v<grad_t, c10::BFloat16> ||
                    std::is_same_v<grad_t, c10::Half>) {
        run_backward<S, grad_t>(a, with_kl);
      }
    });
  });
  return {grad_means, grad_logvars};
}

at::Tensor kl_kernel(at::TensorList means, at::TensorList logvars, double prior_var,
                     std::optional<at::ArrayRef<double>> prior_vars,
                     std::optional<at::TensorList> prior_means) {
  constexpr const char* op = "fastbnf::kl_kernel";
  const Group g = make_group(op, means, logvars, prior_var, prior_vars, prior_means);
  std::vector<double> partials(num_chunks(g.numel));
  ForwardArgs a{&g, 0, nullptr, true, PhiloxKey(0, 0), partials.data()};
  dispatch_group(g.dtype, [&](auto s) {
    using S = decltype(s);
    run_forward<S, S>(a);
  });
  return kl_tensor(sum_in_order(partials), g.dtype);
}

std::tuple<at::Tensor, at::Tensor> kl_backward_kernel(
    const at::Tensor& grad_kl, at::TensorList means, at::TensorList logvars, double prior_var,
    std::optional<at::ArrayRef<double>> prior_vars, std::optional<at::TensorList> prior_means) {
  constexpr const char* op = "fastbnf::kl_backward_kernel";
  const Group g = make_group(op, means, logvars, prior_var, prior_vars, prior_means);
  TORCH_CHECK(grad_kl.defined() && grad_kl.numel() == 1, op,
              ": grad_kl must hold one element");
  const int64_t N = g.numel;
  at::Tensor grad_means = empty_output({N}, g.dtype);
  at::Tensor grad_logvars = empty_output({N}, g.dtype);
  BackwardArgs a{&g, 0, nullptr, grad_kl.item<double>(), PhiloxKey(0, 0), grad_means.data_ptr(),
                 grad_logvars.data_ptr()};
  dispatch_group(g.dtype, [&](auto s) {
    using S = decltype(s);
    run_backward<S, S>(a, true);
  });
  return {grad_means, grad_logvars};
}

at::Tensor variance_kernel(at::TensorList logvars) {
  constexpr const char* op = "fastbnf::variance_kernel";
  const Group g = make_group(op, std::nullopt, logvars, 1.0, std::nullopt, std::nullopt);
  at::Tensor out = empty_output({g.numel}, g.dtype);
  dispatch_group(g.dtype, [&](auto s) {
    using S = decltype(s);
    S* o = out.data_ptr<S>();
    const bool avx2 = cpu_has_avx2();
    for_chunks(g.numel, [&](int64_t c0, int64_t c1) {
      if (avx2) {
        variance_chunks_avx2<S>(g, o, c0, c1);
      } else {
        variance_chunks_generic<S>(g, o, c0, c1);
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace fastbnf
