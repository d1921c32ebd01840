// The per-element update of torch.optim.AdamW (torch.optim.Adam when the weight decay is 0),
// written once for the fused variational Adam step of the CPU and CUDA kernels. Torch-free, for
// host and device code.
//
// For a parameter p with gradient g, moments m and v, at step t (1 for the first):
//
//   p = p * decay                                decay = 1 - lr * weight_decay
//   m = lerp(m, g, w1)                           w1 = 1 - beta1
//   v = fma(w2 * g, g, v * beta2)                w2 = 1 - beta2
//   p = p + ((-step_size * m) / ((sqrt(v) / bias2_sqrt) + eps))
//
// with step_size = lr / (1 - beta1^t) and bias2_sqrt = (1 - beta2^t)^0.5, the operations and
// their order those of PyTorch's CPU kernels for the ops of torch.optim.AdamW's foreach update
// (mul_, lerp_, mul_, addcmul_, sqrt, div_, add_, addcdiv_; fastbnf/_compat.py adam_update).
// The scalars are computed in double from the hyperparameters as Python computes them and
// rounded once to the compute type S (those of a capturable step's count on the device,
// step_terms). lerp is PyTorch's vectorized one: with w = w1, m + w * (g - m) for |w| < 0.5
// and g + (w - 1) * (g - m) otherwise. lerp and addcmul go through a fused multiply-add, as
// PyTorch's vectorized CPU kernels do (vec::fmadd), where the policy M has one (M::kFma;
// otherwise a product and a sum). The multiplication by decay is exact when the weight decay
// is 0 (p * 1 = p), so every parameter takes it.
#pragma once

#include <cmath>
#include <cstdint>

#include "posterior_math.h"

namespace fastbnf {
namespace adam {

// The hyperparameters of one step, in double.
struct Hyper {
  double lr, beta1, beta2, eps, weight_decay;
  int64_t step;
};

// The scalars of the update in the compute type S.
template <typename S>
struct Scalars {
  S decay;          // 1 - lr * weight_decay
  S w1;             // lerp's weight 1 - beta1
  S w1_m1;          // w1 - 1, for lerp's large-weight form
  bool small;       // |w1| < 0.5
  S beta2, w2;      // w2 = 1 - beta2
  S bias2_sqrt;     // (1 - beta2^t)^0.5
  S eps;            //
  S neg_step_size;  // -lr / (1 - beta1^t)
};

// The powers of the bias corrections: beta^t for a count t >= 1, and y^0.5.
//
// Host: pow, the C library's (std::pow; Python's ** and so torch.optim.AdamW compute them so):
// glibc's is within 0.52 ulp, correctly rounded but for rare arguments (about one power in a
// thousand of Adam's betas and counts, and as many y^0.5 against sqrt(y)).
//
// Device (the CUDA kernel of a capturable step, whose count lives in device memory): CUDA's
// pow(double, double) is within 2 ulp and is not inlined (a call to a .func, which the kernels'
// PTX must not hold, .ci/check_kernel_resources.py). Instead beta^t by squaring in
// double-double (each product within 5 2^-106 relative, the whole within about 10 t 2^-106),
// rounded once: the correctly rounded power but where the exact one lies within that error of
// a rounding boundary; y^0.5 as sqrt, correctly rounded. So the device's powers, like CUDA's
// pow, may differ from the host's by an ulp of a double (rarely: where either is not correctly
// rounded), and a capturable step can then differ from an eager one of the same count in the
// last bit of its scalars; every replay of a count computes the same.
namespace detail {
#if defined(__CUDA_ARCH__)
struct DoubleDouble {
  double hi, lo;  // |lo| <= ulp(hi) / 2
};

// a * b in double-double: the exact product of the highs (an fma gives its error), plus the
// cross terms, renormalized (Joldes, Muller, Popescu 2017, DWTimesDW: error <= 5 2^-106).
__device__ __forceinline__ DoubleDouble dd_mul(DoubleDouble a, DoubleDouble b) {
  const double p = __dmul_rn(a.hi, b.hi);
  const double e = __fma_rn(a.hi, b.hi, -p);
  const double c = __dadd_rn(e, __fma_rn(a.hi, b.lo, __dmul_rn(a.lo, b.hi)));
  const double hi = __dadd_rn(p, c);
  return DoubleDouble{hi, __dsub_rn(c, __dsub_rn(hi, p))};
}

// x^n for 0 <= x <= 1 (Adam's betas; and -1 <= x < 0) and n >= 0 (1 for n < 0), rounded once.
// Powers below 2^-969 lose the low part's precision; 1 - x^n is then 1 all the same.
__device__ __forceinline__ double pow_count(double x, int64_t n) {
  DoubleDouble result{1.0, 0.0}, base{x, 0.0};
  uint64_t m = n > 0 ? static_cast<uint64_t>(n) : 0;
#pragma unroll 1
  while (m != 0) {
    if (m & 1) result = dd_mul(result, base);
    m >>= 1;
    if (m != 0) base = dd_mul(base, base);
  }
  return result.hi;  // hi = round(hi + lo)
}

__device__ __forceinline__ double pow_half(double y) { return __dsqrt_rn(y); }
#else
inline double pow_count(double x, int64_t n) { return std::pow(x, static_cast<double>(n)); }
inline double pow_half(double y) { return std::pow(y, 0.5); }
#endif
}  // namespace detail

// The scalars of the update that depend on the step t, in double (before any rounding to S):
// bias2_sqrt = (1 - beta2^t)^0.5 and neg_step_size = -lr / (1 - beta1^t). For host and device
// code: the CUDA kernel of a capturable step computes them on the device from the count
// (cuda/adam_step.cu). No product is formed, so nvcc has nothing to contract into a fused
// multiply-add.
struct StepTerms {
  double bias2_sqrt;
  double neg_step_size;
};

FASTBNF_HD StepTerms step_terms(double lr, double beta1, double beta2, int64_t step) {
  const double bias1 = 1.0 - detail::pow_count(beta1, step);
  return StepTerms{detail::pow_half(1.0 - detail::pow_count(beta2, step)), -(lr / bias1)};
}

// As torch.optim.AdamW computes them: Python floats (double), pow for ** (t as a double).
template <typename S>
Scalars<S> scalars(const Hyper& h) {
  const StepTerms terms = step_terms(h.lr, h.beta1, h.beta2, h.step);
  Scalars<S> s{};
  s.decay = static_cast<S>(1.0 - h.lr * h.weight_decay);
  s.w1 = static_cast<S>(1.0 - h.beta1);
  s.w1_m1 = s.w1 - static_cast<S>(1);  // in S, as PyTorch's lerp forms weight - 1
  s.small = std::abs(1.0 - h.beta1) < 0.5;
  s.beta2 = static_cast<S>(h.beta2);
  s.w2 = static_cast<S>(1.0 - h.beta2);
  s.bias2_sqrt = static_cast<S>(terms.bias2_sqrt);
  s.eps = static_cast<S>(h.eps);
  s.neg_step_size = static_cast<S>(terms.neg_step_size);
  return s;
}

// One parameter's update, in place. M: the policy of posterior_math.h with sqrt (and fma when
// M::kFma).
template <class M, typename S>
FASTBNF_HD void update(S& p, S& m, S& v, S g, const Scalars<S>& s) {
  namespace P = ::fastbnf::posterior;
  p = P::mul(p, s.decay);
  const S diff = P::sub(g, m);
  const S decayed_v = P::mul(v, s.beta2);
  const S w2_g = P::mul(s.w2, g);
  if constexpr (M::kFma) {
    m = s.small ? M::fma(s.w1, diff, m) : M::fma(s.w1_m1, diff, g);
    v = M::fma(w2_g, g, decayed_v);
  } else {
    m = s.small ? P::add(m, P::mul(s.w1, diff)) : P::add(g, P::mul(s.w1_m1, diff));
    v = P::add(decayed_v, P::mul(w2_g, g));
  }
  const S denom = P::add(P::div(M::sqrt(v), s.bias2_sqrt), s.eps);
  p = P::add(p, P::div(P::mul(s.neg_step_size, m), denom));
}

}  // namespace adam
}  // namespace fastbnf
