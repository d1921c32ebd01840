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
// rounded once to the compute type S. lerp is PyTorch's vectorized one: with w = w1,
// m + w * (g - m) for |w| < 0.5 and g + (w - 1) * (g - m) otherwise. lerp and addcmul go
// through a fused multiply-add, as PyTorch's vectorized CPU kernels do (vec::fmadd), where the
// policy M has one (M::kFma; otherwise a product and a sum). The multiplication by decay is
// exact when the weight decay is 0 (p * 1 = p), so every parameter takes it.
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

// As torch.optim.AdamW computes them: Python floats (double), pow for ** (t as a double).
template <typename S>
Scalars<S> scalars(const Hyper& h) {
  const double t = static_cast<double>(h.step);
  const double bias1 = 1.0 - std::pow(h.beta1, t);
  const double bias2_sqrt = std::pow(1.0 - std::pow(h.beta2, t), 0.5);
  Scalars<S> s{};
  s.decay = static_cast<S>(1.0 - h.lr * h.weight_decay);
  s.w1 = static_cast<S>(1.0 - h.beta1);
  s.w1_m1 = s.w1 - static_cast<S>(1);  // in S, as PyTorch's lerp forms weight - 1
  s.small = std::abs(1.0 - h.beta1) < 0.5;
  s.beta2 = static_cast<S>(h.beta2);
  s.w2 = static_cast<S>(1.0 - h.beta2);
  s.bias2_sqrt = static_cast<S>(bias2_sqrt);
  s.eps = static_cast<S>(h.eps);
  s.neg_step_size = static_cast<S>(-(h.lr / bias1));
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
