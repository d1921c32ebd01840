// The per-element maths of fastbnf, written once: every kernel (CPU and CUDA) computes through
// these functions, and fastbnf/reference.py performs the same operations in the same order.
// Torch-free, for host and device code.
//
// For one element with posterior mean mu and log-variance l, prior N(m, pv), noise eps:
//
//   t     = l / B                          B = kSoftclipBound = 18 (divide_by_bound)
//   q     = rsqrt(t * t + 1)
//   lc    = l * q                          softclip(l), in (-B, B)
//   slope = (q * q) * q                    d softclip / dl
//   sigma = exp(lc * 0.5)
//   v     = exp(lc)                        the variance
//   theta = mu + sigma * eps
//   kl    = ((((v + d * d) * ipv) + c) - lc) * 0.5       d = mu - m, ipv = 1 / pv, c = log(pv) - 1
//
// and the gradients, with G = sum_k g_k and E = sum_k g_k * eps_k over the samples k = 0, 1, ...
// in order (G = g and E = g * eps for one sample), and gk the KL's incoming gradient:
//
//   grad_mu     = G + gk * (d * ipv)                          (G alone without the KL)
//   grad_logvar = slope * ((sigma * 0.5) * E + (((v * ipv) - 1) * 0.5) * gk)
//
// Each operation rounds once in the compute type S (float for float16, bfloat16 and float32
// groups, double for float64): nothing is fused. The host build has -ffp-contract=off; device
// code goes through __fmul_rn and friends, since nvcc would fuse a * b + c. ipv and c are computed
// in double from pv (prior_constants) and rounded once to S, as the reference rounds a Python
// float. exp and rsqrt come from a policy M: the platform's (CPU: the vectorized polynomials of
// cpu/cpu_math.h or PyTorch's own exp; CUDA: expf and rsqrtf, as PyTorch's CUDA ops use). M also
// says whether it has a fused multiply-add (M::kFma, M::fma), with which divide_by_bound
// replaces its division.
#pragma once

#include <cmath>

#include "philox.h"

namespace fastbnf {
namespace posterior {

constexpr double kSoftclipBound = 18.0;

// One rounding per operation.
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double div(double a, double b) { return __ddiv_rn(a, b); }
#else
template <typename S>
FASTBNF_HD S mul(S a, S b) {
  return a * b;
}
template <typename S>
FASTBNF_HD S add(S a, S b) {
  return a + b;
}
template <typename S>
FASTBNF_HD S sub(S a, S b) {
  return a - b;
}
template <typename S>
FASTBNF_HD S div(S a, S b) {
  return a / b;
}
#endif

// The prior's constants of a tensor, in double, rounded to S where used.
struct PriorConstants {
  double inv_var;     // 1 / pv
  double log_var_m1;  // log(pv) - 1
};

inline PriorConstants prior_constants(double prior_var) {
  return PriorConstants{1.0 / prior_var, std::log(prior_var) - 1.0};
}

// l / B, rounded once. In float with an FMA, a product by 1 / B and two FMA corrections take
// the place of the division: the same value for every finite float whose quotient is normal (a
// subnormal one may differ, and squares to 0 either way), checked over all 2^32 floats. The
// division and rsqrt's square root and division share the CPU's divider, whose throughput bounds
// the KL there, and a CUDA division is a dozen instructions.
template <class M, typename S>
FASTBNF_HD S divide_by_bound(S l) {
  if constexpr (M::kFma && sizeof(S) == sizeof(float)) {
    const S inverse = static_cast<S>(1.0 / kSoftclipBound);
    const S q = mul(l, inverse);
    return M::fma(M::fma(-q, static_cast<S>(kSoftclipBound), l), inverse, q);
  } else {
    return div(l, static_cast<S>(kSoftclipBound));
  }
}

// q = rsqrt((l / B)^2 + 1): softclip(l) = l * q and its slope is q^3.
template <class M, typename S>
FASTBNF_HD S softclip_scale(S l) {
  const S t = divide_by_bound<M>(l);
  return M::rsqrt(add(mul(t, t), static_cast<S>(1)));
}

template <typename S>
FASTBNF_HD S softclip(S l, S q) {
  return mul(l, q);
}

template <typename S>
FASTBNF_HD S softclip_slope(S q) {
  return mul(mul(q, q), q);
}

template <class M, typename S>
FASTBNF_HD S sigma(S lc) {
  return M::exp(mul(lc, static_cast<S>(0.5)));
}

template <class M, typename S>
FASTBNF_HD S variance(S lc) {
  return M::exp(lc);
}

template <typename S>
FASTBNF_HD S theta(S mu, S sigma, S eps) {
  return add(mu, mul(sigma, eps));
}

// d = mu - m (mu itself when the prior mean is 0), v = variance(lc).
template <typename S>
FASTBNF_HD S kl_term(S d, S v, S lc, S inv_var, S log_var_m1) {
  return mul(sub(add(mul(add(v, mul(d, d)), inv_var), log_var_m1), lc), static_cast<S>(0.5));
}

template <typename S>
FASTBNF_HD S grad_mean(S g_sum, S grad_kl, S d, S inv_var) {
  return add(g_sum, mul(grad_kl, mul(d, inv_var)));
}

// The sample's part of grad_logvar before the slope: (sigma * 0.5) * E.
template <typename S>
FASTBNF_HD S logvar_part_sample(S sigma, S ge_sum) {
  return mul(mul(sigma, static_cast<S>(0.5)), ge_sum);
}

// The KL's part of grad_logvar before the slope: (((v * ipv) - 1) * 0.5) * gk.
template <typename S>
FASTBNF_HD S logvar_part_kl(S v, S inv_var, S grad_kl) {
  return mul(mul(sub(mul(v, inv_var), static_cast<S>(1)), static_cast<S>(0.5)), grad_kl);
}

template <typename S>
FASTBNF_HD S grad_logvar(S slope, S part) {
  return mul(slope, part);
}

}  // namespace posterior
}  // namespace fastbnf
