// fastbnf's random stream: Philox4x32-10, its key and counter map, and the normal transform.
// Torch-free, for host and device code: the CPU and CUDA kernels include it, so that for the same
// rng_state they draw the same epsilon (up to a few ulp of each platform's transcendentals).
//
// Key: rng_state holds (salted_seed, offset). salted_seed is the generator's seed with the salt
// (the data-parallel rank) folded in (fold_salt); the Philox key is philox_key(salted_seed), the
// seed mixed with a fastbnf constant. PyTorch's own Philox streams (curand_init(seed, thread,
// offset) in torch.randn, dropout, ...) are keyed by the generator's seed itself, so fastbnf's
// counters cannot coincide with theirs: the keys differ.
//
// Counter map: for sample k of n and flat element i of a group of N elements, j = k * N + i. The
// Philox block that holds element j has counter
//   (c0, c1) = low / high 32 bits of j / 4,  (c2, c3) = low / high 32 bits of the offset,
// and j uses output lane j % 4. Distinct offsets give disjoint streams whatever N.
//
// Normal transform: Box-Muller on the lane pairs (0, 1) and (2, 3), in float32:
//   u1 = ((x0 >> 8) + 0.5) * 2^-24 in (0, 1],  x = 2 * ((x1 >> 8) + 0.5) * 2^-24 in (0, 2),
//   r = sqrt(-2 log u1),  lane 0 -> r cos(pi x),  lane 1 -> r sin(pi x)
// and likewise lanes 2, 3 from x2, x3. The angle is taken in half-turns (sinpi, cospi): x is
// exact, its reduction is exact, and CUDA's sincospif has no slow path. |epsilon| <= 5.8.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTBNF_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define FASTBNF_HD inline __attribute__((always_inline))
#else
#define FASTBNF_HD inline
#endif

namespace fastbnf {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// Folded into a seed once per salt (the data-parallel rank): seed ^ (salt * kSaltMix).
constexpr uint64_t kSaltMix = 0x9E3779B97F4A7C15ull;
// Mixed into every key ("fastbnf!" in ASCII): separates fastbnf's streams from the generator's.
constexpr uint64_t kKeyDomain = 0x66617374626E6621ull;

// Folds a salt (the data-parallel rank) into a seed; 0 leaves the seed unchanged.
FASTBNF_HD uint64_t fold_salt(uint64_t seed, uint64_t salt) { return seed ^ (salt * kSaltMix); }

// The Philox key of a salted seed: splitmix64's finalizer of seed ^ kKeyDomain, a bijection.
FASTBNF_HD uint64_t philox_key(uint64_t salted_seed) {
  uint64_t z = salted_seed ^ kKeyDomain;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct Philox4 {
  uint32_t x[4];
};

FASTBNF_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

// Philox4x32 with 10 rounds (Salmon et al., 2011), the generator of curand and ATen.
FASTBNF_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                 uint32_t k1) {
#if defined(__CUDACC__) || defined(__HIPCC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kPhiloxM0, c0, &hi0);
    const uint32_t lo1 = mulhilo32(kPhiloxM1, c2, &hi1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The Philox block of flat index j / 4 under (key, offset); key is philox_key(salted_seed).
FASTBNF_HD Philox4 philox_block(uint64_t block, uint64_t key, uint64_t offset) {
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                       static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                       static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
}

// Uniform in (0, 1] from the top 24 bits, in float: k + 0.5 is exact for k < 2^23 and rounds to
// even above, so the largest k gives 1.0 (a radius of 0, harmless). Never 0, so log is finite.
// Twins of this stream (the tests' NumPy Philox) must round the same way.
FASTBNF_HD float uniform24(uint32_t x) {
  return (static_cast<float>(x >> 8) + 0.5f) * 5.9604644775390625e-08f;  // 2^-24
}

// The two normals of one Box-Muller pair (lanes 2p and 2p + 1). The CPU kernels vectorize the
// same transform with their own polynomials (cpu/cpu_math.h).
FASTBNF_HD void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  const float x = 2.0f * uniform24(b);  // half-turns, exact
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  const float r = sqrtf(-2.0f * logf(uniform24(a)));
  float s, c;
  sincospif(x, &s, &c);
#else
  const float r = std::sqrt(-2.0f * std::log(uniform24(a)));
  const double angle = 3.14159265358979323846 * static_cast<double>(x);
  const float s = static_cast<float>(std::sin(angle));
  const float c = static_cast<float>(std::cos(angle));
#endif
  *z0 = r * c;
  *z1 = r * s;
}

// All four normals of a block, in lane order.
FASTBNF_HD void normal4(const Philox4& bits, float out[4]) {
  box_muller(bits.x[0], bits.x[1], &out[0], &out[1]);
  box_muller(bits.x[2], bits.x[3], &out[2], &out[3]);
}

}  // namespace fastbnf
