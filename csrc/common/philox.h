// Philox4x32-10 and the normal transform shared by the CPU and CUDA kernels.
//
// Both backends include this header, so for the same rng_state they draw the same epsilon
// (up to a few ulp of the transcendental functions of each platform).
//
// Counter map (design.md §3): for sample k of n and flat element i of a group of N elements,
// j = k * N + i. The Philox block that holds element j has counter
//   (c0, c1) = low / high 32 bits of j / 4,  (c2, c3) = low / high 32 bits of the offset,
// key (seed_lo, seed_hi), and j uses output lane j % 4. Distinct offsets therefore give
// disjoint streams whatever the size of the group.
//
// Normal transform: Box-Muller on the lane pairs (0, 1) and (2, 3):
//   u1 = ((x0 >> 8) + 0.5) * 2^-24,  u2 = ((x1 >> 8) + 0.5) * 2^-24   (in float, in (0, 1])
//   r = sqrt(-2 log u1),  lane 0 -> r cos(2 pi u2),  lane 1 -> r sin(2 pi u2)
// and likewise lanes 2, 3 from x2, x3. All in float32; |epsilon| <= sqrt(2 * 24 log 2) ~ 5.8.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTBNF_HD __host__ __device__ __forceinline__
#else
#define FASTBNF_HD inline
#endif

namespace fastbnf {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct Philox4 {
  uint32_t x[4];
};

FASTBNF_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

// Philox4x32 with 10 rounds (Salmon et al., 2011), the generator of curand and ATen.
FASTBNF_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                 uint32_t k0, uint32_t k1) {
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

// The Philox block of flat index j / 4 under (seed, offset).
FASTBNF_HD Philox4 philox_block(uint64_t block, uint64_t seed, uint64_t offset) {
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                       static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Uniform in (0, 1] from the top 24 bits, in float: k + 0.5 is exact for k < 2^23 and rounds to
// even above, so the largest k gives 1.0 (a radius of 0, harmless). Never 0, so log is finite.
// Twins of this stream (the tests' NumPy Philox) must round the same way.
FASTBNF_HD float uniform24(uint32_t x) {
  return (static_cast<float>(x >> 8) + 0.5f) * 5.9604644775390625e-08f;  // 2^-24
}

constexpr float kTwoPi = 6.28318530717958647692f;

// The two normals of one Box-Muller pair (lanes 2p and 2p + 1).
FASTBNF_HD void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  const float r = sqrtf(-2.0f * logf(uniform24(a)));
  const float angle = kTwoPi * uniform24(b);
  *z0 = r * cosf(angle);
  *z1 = r * sinf(angle);
}

// All four normals of a block, in lane order.
FASTBNF_HD void normal4(const Philox4& bits, float out[4]) {
  box_muller(bits.x[0], bits.x[1], &out[0], &out[1]);
  box_muller(bits.x[2], bits.x[3], &out[2], &out[3]);
}

// The normal of flat index j alone (slow path: used at chunk edges, never in inner loops).
FASTBNF_HD float normal_at(uint64_t j, uint64_t seed, uint64_t offset) {
  float out[4];
  normal4(philox_block(j >> 2, seed, offset), out);
  return out[j & 3];
}

// Folds a stream number (the data-parallel rank) into a seed; 0 leaves the seed unchanged.
FASTBNF_HD uint64_t fold_stream(uint64_t seed, uint64_t stream) {
  return seed ^ (stream * 0x9E3779B97F4A7C15ull);
}

}  // namespace fastbnf
