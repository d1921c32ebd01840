// The parts every fused CPU kernel is made of (posterior_kernels.cpp, adam_step.cpp): the chunks
// of the flat index space and the group's tensor pieces in them, the storage types' conversions,
// the policies of posterior_math.h, the dtype dispatch and the key of a new sample. Their design
// is posterior_kernels.cpp's header comment. The CUDA kernels' counterpart is
// cuda/tile_walk.cuh.
#pragma once

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/Generator.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <mutex>
#include <type_traits>

#include "../common/posterior_math.h"
#include "../group.h"
#include "cpu_math.h"

namespace fastbnf {
namespace cpu {
namespace P = ::fastbnf::posterior;

// Chunk of the flat index space: the unit of parallel work and of the KL's partials.
constexpr int64_t kChunk = 4096;
// Chunks below which a call stays on the calling thread.
constexpr int64_t kGrainChunks = 8;
// Elements per block of a tensor piece: the float64 exps' scratch and the KL's lane sums.
constexpr int kBlock = 64;

// Bit t set: thread t of at::parallel_for ran chunks of the last call (see threads_used()).
inline std::atomic<uint64_t> g_threads_mask{0};

// ---------------------------------------------------------------------------------------------
// Storage types and scalar conversions that vectorize (c10's Half conversion does not).

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
template <typename T>
using St = typename Storage<T>::type;

// The arithmetic's type of a storage type.
template <typename T>
using Compute = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename out_t, typename S>
FASTBNF_INLINE St<out_t> store_as(S x) {
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
FASTBNF_INLINE S load_as(St<in_t> x) {
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

// ---------------------------------------------------------------------------------------------
// The policies of posterior_math.h.

// float32: cpu_math.h's exp polynomial (FMA on the AVX2 path), inline in the vectorized loops.
template <bool kAvx2>
struct FloatMath {
  static constexpr bool kFma = kAvx2 && FASTBNF_HAS_AVX2_PATH;
  static FASTBNF_INLINE float exp(float x) { return exp_poly<kAvx2>(x); }
  static FASTBNF_INLINE float rsqrt(float x) { return 1.0f / __builtin_sqrtf(x); }
  static FASTBNF_INLINE float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
};

// float64: the exps are taken over a block's array afterwards (cpu_math.h's exp_array, the exp
// that torch.exp calls); in the vectorized loop this policy's exp hands out the argument.
struct DoubleArgs {
  static constexpr bool kFma = false;
  static FASTBNF_INLINE double exp(double x) { return x; }
  static FASTBNF_INLINE double rsqrt(double x) { return 1.0 / __builtin_sqrt(x); }
};

// Runs tail(e, q, lc, s, v) for the m <= kBlock elements of a block of log-variances, with
// q = softclip_scale(l), lc = softclip(l), s = sigma(lc) (when kS) and v = variance(lc) (when
// kV). Float32: one vectorized loop. Float64: the softclip, the exps over arrays, then the tail.
template <bool kAvx2, typename T, bool kS, bool kV, class Tail>
FASTBNF_INLINE void for_block(const St<T>* __restrict lv, int m, const Tail& tail) {
  using S = Compute<T>;
  if constexpr (std::is_same_v<S, float>) {
    using M = FloatMath<kAvx2>;
    FASTBNF_SIMD
    for (int e = 0; e < m; ++e) {
      const S l = load_as<S, T>(lv[e]);
      const S q = P::softclip_scale<M>(l);
      const S lc = P::softclip(l, q);
      S s = 0, v = 0;
      if constexpr (kS) s = P::sigma<M>(lc);
      if constexpr (kV) v = P::variance<M>(lc);
      tail(e, q, lc, s, v);
    }
  } else {
    using M = DoubleArgs;
    alignas(32) S qb[kBlock], lcb[kBlock], sb[kBlock], vb[kBlock];
    FASTBNF_SIMD
    for (int e = 0; e < m; ++e) {
      const S l = load_as<S, T>(lv[e]);
      const S q = P::softclip_scale<M>(l);
      const S lc = P::softclip(l, q);
      qb[e] = q;
      lcb[e] = lc;
      if constexpr (kS) sb[e] = P::sigma<M>(lc);     // the argument of its exp
      if constexpr (kV) vb[e] = P::variance<M>(lc);  // likewise
    }
    if constexpr (kS) exp_array(sb, sb, m);  // in place (MKL's VM functions allow it)
    if constexpr (kV) exp_array(vb, vb, m);
    FASTBNF_SIMD
    for (int e = 0; e < m; ++e) tail(e, qb[e], lcb[e], sb[e], vb[e]);
  }
}

// ---------------------------------------------------------------------------------------------
// The group's table.

// The first entry that ends after flat index i.
inline size_t first_entry(const Group& g, int64_t i) {
  const auto it =
      std::upper_bound(g.entries.begin(), g.entries.end(), i,
                       [](int64_t x, const TensorEntry& e) { return x < e.begin + e.numel; });
  return static_cast<size_t>(it - g.entries.begin());
}

// Calls f(entry, i0, i1) for every tensor piece [i0, i1) of the flat range [a, b), in order.
template <typename F>
FASTBNF_INLINE void for_pieces(const Group& g, int64_t a, int64_t b, const F& f) {
  for (size_t t = first_entry(g, a); t < g.entries.size() && g.entries[t].begin < b; ++t) {
    const TensorEntry& e = g.entries[t];
    f(e, std::max(a, e.begin), std::min(b, e.begin + e.numel));
  }
}

template <typename T>
FASTBNF_INLINE const St<T>* at_flat(const void* base, const TensorEntry& e, int64_t i) {
  return static_cast<const St<T>*>(base) + (i - e.begin);
}

inline int64_t num_chunks(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Runs f(c0, c1) over the chunks [c0, c1) with ATen's thread pool.
template <typename F>
inline void for_chunks(int64_t numel, const F& f) {
  const int64_t chunks = num_chunks(numel);
  if (chunks == 0) return;
  g_threads_mask.store(0, std::memory_order_relaxed);
  at::parallel_for(0, chunks, kGrainChunks, [&](int64_t c0, int64_t c1) {
    const int thread = at::get_thread_num();
    g_threads_mask.fetch_or(uint64_t{1} << (thread & 63), std::memory_order_relaxed);
    f(c0, c1);
  });
}

// ---------------------------------------------------------------------------------------------
// Dtype dispatch.

// f(T{}) for the group's storage type.
template <typename F>
inline void dispatch_group(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kFloat: f(float{}); break;
    default: f(double{}); break;
  }
}

// f(U{}) for a dtype that is T, float16, bfloat16 or float32 (group.h guarantees no other).
template <typename T, typename F>
inline void dispatch_like(at::ScalarType dtype, at::ScalarType group_dtype, const F& f) {
  if (dtype == group_dtype) {
    f(T{});
  } else if (dtype == at::kHalf) {
    f(c10::Half{});
  } else if (dtype == at::kBFloat16) {
    f(c10::BFloat16{});
  } else {
    f(float{});
  }
}

inline at::Tensor make_rng_state(uint64_t seed) {
  at::Tensor state = at::empty({2}, at::TensorOptions().dtype(at::kLong));
  int64_t* p = state.data_ptr<int64_t>();
  p[0] = static_cast<int64_t>(seed);
  p[1] = 0;
  return state;
}

// The salted seed of a new sample: the default CPU generator's next 64 bits, the salt folded in.
inline uint64_t draw_seed(int64_t salt) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
      std::nullopt, at::detail::getDefaultCPUGenerator());
  uint64_t seed;
  {
    // The generator's mutex: other threads may draw from the default generator concurrently.
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();
  }
  return fold_salt(seed, static_cast<uint64_t>(salt));
}

inline PhiloxKey read_rng_state(const at::Tensor& rng_state) {
  const int64_t* p = rng_state.data_ptr<int64_t>();
  return PhiloxKey(static_cast<uint64_t>(p[0]), static_cast<uint64_t>(p[1]));
}

inline PriorArgs prior_args(double prior_var, std::optional<at::ArrayRef<double>> prior_vars,
                            std::optional<at::TensorList> prior_means) {
  PriorArgs prior;
  prior.var = prior_var;
  prior.vars = prior_vars;
  prior.means = prior_means;
  return prior;
}

}  // namespace cpu
}  // namespace fastbnf
