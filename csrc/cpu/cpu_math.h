// Vectorizable building blocks of the CPU kernels: Philox batches, log, sinpi/cospi, exp.
//
// Everything here is plain C++ that GCC and Clang vectorize inside `#pragma omp simd` loops, so
// neither -ffast-math nor libmvec is needed: -ffast-math in a shared object's link line turns on
// flush-to-zero for the whole process, and libmvec exists only on glibc/x86-64. log and exp are
// Cephes' polynomials, sinpi/cospi a Taylor polynomial after an exact reduction (about 1 ulp on
// the ranges used), so the normals agree with philox.h's libm-based `normal4` to a few ulp: the
// same stream. The float64 exp is the one torch.exp calls (MKL's vmdExp, exported by
// libtorch_cpu; see exp_array), so that the float64 kernels round exactly like torch.exp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../common/philox.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
// Hot loops exist twice: generic (auto-vectorized for the build's baseline, SSE2 on x86-64,
// NEON on aarch64) and AVX2+FMA, picked at run time (cpu_has_avx2()). No -march=native, so the
// extension runs on any CPU of its architecture.
#define FASTBNF_HAS_AVX2_PATH 1
#define FASTBNF_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define FASTBNF_HAS_AVX2_PATH 0
#define FASTBNF_TARGET_AVX2
#endif

#if defined(__GNUC__) || defined(__clang__)
#define FASTBNF_INLINE inline __attribute__((always_inline))
#else
#define FASTBNF_INLINE inline
#endif

// Needs -fopenmp-simd or -fopenmp (see posterior_kernels.cpp for the build flags).
#define FASTBNF_SIMD _Pragma("omp simd")
#define FASTBNF_SIMD_SUM(acc) _Pragma("omp simd reduction(+ : acc)")

namespace fastbnf {
namespace cpu {

FASTBNF_INLINE uint32_t as_u32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

FASTBNF_INLINE float as_f32(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// a * b + c, fused on the AVX2+FMA path. The build has -ffp-contract=off, so that the plain
// arithmetic of the kernels rounds like PyTorch's; the polynomials below opt in to FMA here.
template <bool kFma>
FASTBNF_INLINE float madd(float a, float b, float c) {
  if constexpr (kFma) {
    return __builtin_fmaf(a, b, c);
  } else {
    return a * b + c;
  }
}

// log(x) for normal x > 0 (Cephes logf).
template <bool kFma>
FASTBNF_INLINE float log_poly(float x) {
  const uint32_t bits = as_u32(x);
  int32_t e = static_cast<int32_t>(bits >> 23) - 126;
  const float m = as_f32((bits & 0x007fffffu) | 0x3f000000u);  // x = m * 2^e, m in [0.5, 1)
  const bool small = m < 0.70710678118654752440f;
  e -= static_cast<int32_t>(small);  // branch-free selects: if-conversion vectorizes them
  const float f = (m + (small ? m : 0.0f)) - 1.0f;
  const float z = f * f;
  // Cephes' polynomial in Estrin form: a shorter dependency chain than Horner's.
  const float z2 = z * z;
  const float q01 = madd<kFma>(-2.4999993993e-1f, f, 3.3333331174e-1f);
  const float q23 = madd<kFma>(-1.6668057665e-1f, f, 2.0000714765e-1f);
  const float q45 = madd<kFma>(-1.2420140846e-1f, f, 1.4249322787e-1f);
  const float q67 = madd<kFma>(-1.1514610310e-1f, f, 1.1676998740e-1f);
  const float r0 = madd<kFma>(q23, z, q01);
  const float r1 = madd<kFma>(q67, z, q45);
  float y = madd<kFma>(7.0376836292e-2f, z2 * z2, madd<kFma>(r1, z2, r0));
  y = y * f * z;
  const float fe = static_cast<float>(e);
  y = madd<kFma>(-2.12194440e-4f, fe, y);
  y = madd<kFma>(-0.5f, z, y);
  return madd<kFma>(0.693359375f, fe, f + y);
}

// sin(pi x) and cos(pi x) for x in [0, 2], the angle in half-turns (philox.h's Box-Muller).
// The reduction is exact: j = round(2 x), r = x - j / 2 in [-1/4, 1/4] (x is a multiple of
// 2^-24 below 2, so r is a float). Then sin(pi r) = r (pi + z S(z)) and cos(pi r) = 1 + z C(z),
// z = r^2, Taylor through r^9 and r^10 (the first terms left out are below 3e-9 relatively);
// pi is split in two floats so that the leading product rounds once on the FMA path.
template <bool kFma>
FASTBNF_INLINE void sincospi_poly(float x, float* s, float* c) {
  const int32_t j = static_cast<int32_t>(x * 2.0f + 0.5f);  // x >= 0: truncation is floor
  const float r = x - static_cast<float>(j) * 0.5f;
  const float z = r * r;
  constexpr float kPiHi = 3.14159274101257324f;       // float(pi)
  constexpr float kPiLo = -8.74227801261895400e-08f;  // pi - kPiHi
  float ps =
      madd<kFma>(z, 8.21458866111281929e-02f, -5.99264529320791896e-01f);  // pi^9/9!, pi^7/7!
  ps = madd<kFma>(ps, z, 2.55016403987734498e+00f);                        // pi^5/5!
  ps = madd<kFma>(ps, z, -5.16771278004996947e+00f);                       // pi^3/3!
  ps = madd<kFma>(ps, z, kPiLo);
  const float sn = madd<kFma>(r, kPiHi, r * ps);
  float pc =
      madd<kFma>(z, -2.58068913900140499e-02f, 2.35330630358893123e-01f);  // pi^10/10!, pi^8/8!
  pc = madd<kFma>(pc, z, -1.33526276885458927e+00f);                       // pi^6/6!
  pc = madd<kFma>(pc, z, 4.05871212641676823e+00f);                        // pi^4/4!
  pc = madd<kFma>(pc, z, -4.93480220054467931e+00f);                       // pi^2/2
  const float cn = madd<kFma>(pc, z, 1.0f);
  const int32_t q = j & 3;
  const bool swap = (q & 1) != 0;
  const float sv = swap ? cn : sn;
  const float cv = swap ? sn : cn;
  *s = (q & 2) ? -sv : sv;
  *c = ((q + 1) & 2) ? -cv : cv;
}

// exp(x) for |x| <= 80 (Cephes expf: x = n ln2 + r, degree-5 polynomial, 2^n by bits).
template <bool kFma>
FASTBNF_INLINE float exp_poly(float x) {
  const float fx = x * 1.44269504088896341f + 0.5f;
  int32_t n = static_cast<int32_t>(fx);
  n -= static_cast<int32_t>(static_cast<float>(n) > fx);  // floor
  const float fn = static_cast<float>(n);
  const float r = (x - fn * 0.693359375f) - fn * -2.12194440e-4f;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = madd<kFma>(p, r, 1.3981999507e-3f);
  p = madd<kFma>(p, r, 8.3334519073e-3f);
  p = madd<kFma>(p, r, 4.1665795894e-2f);
  p = madd<kFma>(p, r, 1.6666665459e-1f);
  p = madd<kFma>(p, r, 5.0000001201e-1f);
  p = madd<kFma>(p, z, r + 1.0f);
  return p * as_f32(static_cast<uint32_t>(n + 127) << 23);
}

// torch.exp of float64 on PyTorch's x86-64 builds is MKL's vmdExp in its high-accuracy mode
// (aten/src/ATen/cpu/vml.h), which libtorch_cpu exports, not SLEEF's exp nor libm's, which
// round some values differently. Calling it keeps the float64 kernels bit for bit equal to
// fastbnf/reference.py (tests/test_kernels.py, tolerance_ulp: 0 ulp). Declared weak: a torch
// built without MKL leaves it null, and libm's exp stands in (within 1 ulp).
extern "C" __attribute__((weak)) void vmdExp(int n, const double* a, double* r, long long mode);

// VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE, PyTorch's mode.
constexpr long long kVmlMode = 0x00000002LL | 0x00140000LL | 0x00000100LL;

// exp of m <= 64 doubles, from in to out: PyTorch's (bitwise) where it is MKL's.
inline void exp_array(const double* in, double* out, int m) {
  if (vmdExp != nullptr) {
    vmdExp(m, in, out, kVmlMode);
  } else {
    for (int e = 0; e < m; ++e) out[e] = std::exp(in[e]);
  }
}

// philox.h's uniform24 through a signed conversion (the value is below 2^24), which vectorizes.
FASTBNF_INLINE float uniform24v(uint32_t x) {
  return (static_cast<float>(static_cast<int32_t>(x >> 8)) + 0.5f) * 5.9604644775390625e-08f;
}

FASTBNF_INLINE void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                 uint32_t k0, uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
  const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
  const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
  const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
  c1 = static_cast<uint32_t>(p1);
  c3 = static_cast<uint32_t>(p0);
  c0 = n0;
  c2 = n2;
}

// The round keys and the offset half of the counter of one rng_state = (salted_seed, offset):
// the key is philox.h's philox_key(salted_seed).
struct PhiloxKey {
  uint32_t k0[10], k1[10];
  uint32_t c2, c3;
  PhiloxKey(uint64_t salted_seed, uint64_t offset) {
    const uint64_t key = philox_key(salted_seed);
    uint32_t a = static_cast<uint32_t>(key), b = static_cast<uint32_t>(key >> 32);
    for (int r = 0; r < 10; ++r) {
      k0[r] = a;
      k1[r] = b;
      a += kPhiloxW0;
      b += kPhiloxW1;
    }
    c2 = static_cast<uint32_t>(offset);
    c3 = static_cast<uint32_t>(offset >> 32);
  }
};

// Blocks per batch: 4 AVX2 registers per Philox word, so that 4 independent dependency chains
// hide the multiplier latency.
constexpr int kBatchBlocks = 32;
constexpr int kBatch = 4 * kBatchBlocks;  // normals per batch

// The 4 words of Philox blocks block0 .. block0 + kBatchBlocks - 1 (any target).
FASTBNF_INLINE void philox_words_generic(uint32_t* __restrict x0, uint32_t* __restrict x1,
                                         uint32_t* __restrict x2, uint32_t* __restrict x3,
                                         uint64_t block0, const PhiloxKey& key) {
  FASTBNF_SIMD
  for (int l = 0; l < kBatchBlocks; ++l) {
    const uint64_t b = block0 + static_cast<uint64_t>(l);
    uint32_t c0 = static_cast<uint32_t>(b), c1 = static_cast<uint32_t>(b >> 32);
    uint32_t c2 = key.c2, c3 = key.c3;
    for (int r = 0; r < 10; ++r) philox_round(c0, c1, c2, c3, key.k0[r], key.k1[r]);
    x0[l] = c0;
    x1[l] = c1;
    x2[l] = c2;
    x3[l] = c3;
  }
}

#if FASTBNF_HAS_AVX2_PATH
// 8 lanes of (hi, lo) = a * m: the compilers' own vectorization of the 32x32->64 product
// shuffles lanes around; two vpmuludq and two blends do not.
FASTBNF_TARGET_AVX2 inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

FASTBNF_TARGET_AVX2 inline void philox_words_avx2(uint32_t* __restrict x0, uint32_t* __restrict x1,
                                                  uint32_t* __restrict x2, uint32_t* __restrict x3,
                                                  uint64_t block0, const PhiloxKey& key) {
  constexpr int V = kBatchBlocks / 8;
  __m256i c0[V], c1[V], c2[V], c3[V];
  const uint32_t lo = static_cast<uint32_t>(block0);
  const uint32_t hi = static_cast<uint32_t>(block0 >> 32);
  if (lo <= 0xFFFFFFFFu - kBatchBlocks) {
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int v = 0; v < V; ++v) {
      c0[v] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(lo + 8u * v)), iota);
      c1[v] = _mm256_set1_epi32(static_cast<int>(hi));
    }
  } else {  // the low counter word wraps inside this batch
    alignas(32) uint32_t w0[kBatchBlocks], w1[kBatchBlocks];
    for (int l = 0; l < kBatchBlocks; ++l) {
      const uint64_t b = block0 + static_cast<uint64_t>(l);
      w0[l] = static_cast<uint32_t>(b);
      w1[l] = static_cast<uint32_t>(b >> 32);
    }
    for (int v = 0; v < V; ++v) {
      c0[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(w0 + 8 * v));
      c1[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(w1 + 8 * v));
    }
  }
  for (int v = 0; v < V; ++v) {
    c2[v] = _mm256_set1_epi32(static_cast<int>(key.c2));
    c3[v] = _mm256_set1_epi32(static_cast<int>(key.c3));
  }
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    const __m256i k0 = _mm256_set1_epi32(static_cast<int>(key.k0[r]));
    const __m256i k1 = _mm256_set1_epi32(static_cast<int>(key.k1[r]));
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      __m256i h0, l0, h1, l1;
      mulhilo8(c0[v], m0, h0, l0);
      mulhilo8(c2[v], m1, h1, l1);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(h1, c1[v]), k0);
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(h0, c3[v]), k1);
      c1[v] = l1;
      c3[v] = l0;
    }
  }
  for (int v = 0; v < V; ++v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x0 + 8 * v), c0[v]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x1 + 8 * v), c1[v]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x2 + 8 * v), c2[v]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x3 + 8 * v), c3[v]);
  }
}
#endif

// Box-Muller of philox.h on the words of kBatchBlocks blocks, in lane order.
template <bool kFma>
FASTBNF_INLINE void box_muller_batch(float* __restrict out, const uint32_t* __restrict x0,
                                     const uint32_t* __restrict x1, const uint32_t* __restrict x2,
                                     const uint32_t* __restrict x3) {
  FASTBNF_SIMD
  for (int l = 0; l < kBatchBlocks; ++l) {
    const float ra = __builtin_sqrtf(-2.0f * log_poly<kFma>(uniform24v(x0[l])));
    const float rb = __builtin_sqrtf(-2.0f * log_poly<kFma>(uniform24v(x2[l])));
    float sa, ca, sb, cb;
    sincospi_poly<kFma>(2.0f * uniform24v(x1[l]), &sa, &ca);
    sincospi_poly<kFma>(2.0f * uniform24v(x3[l]), &sb, &cb);
    out[4 * l + 0] = ra * ca;
    out[4 * l + 1] = ra * sa;
    out[4 * l + 2] = rb * cb;
    out[4 * l + 3] = rb * sb;
  }
}

// The kBatch normals of Philox blocks block0 .. block0 + kBatchBlocks - 1, in lane order.
// Not inlined: a target-specific function cannot be inlined into a generic caller, and one
// call per kBatch normals costs nothing.
inline void normal_batch_generic(float* __restrict out, uint64_t block0, const PhiloxKey& key) {
  alignas(32) uint32_t x0[kBatchBlocks], x1[kBatchBlocks], x2[kBatchBlocks], x3[kBatchBlocks];
  philox_words_generic(x0, x1, x2, x3, block0, key);
  box_muller_batch<false>(out, x0, x1, x2, x3);
}

#if FASTBNF_HAS_AVX2_PATH
FASTBNF_TARGET_AVX2 inline void normal_batch_avx2(float* __restrict out, uint64_t block0,
                                                  const PhiloxKey& key) {
  alignas(32) uint32_t x0[kBatchBlocks], x1[kBatchBlocks], x2[kBatchBlocks], x3[kBatchBlocks];
  philox_words_avx2(x0, x1, x2, x3, block0, key);
  box_muller_batch<true>(out, x0, x1, x2, x3);
}
#endif

template <bool kAvx2>
FASTBNF_INLINE void normal_batch(float* __restrict out, uint64_t block0, const PhiloxKey& key) {
#if FASTBNF_HAS_AVX2_PATH
  if constexpr (kAvx2) {
    normal_batch_avx2(out, block0, key);
    return;
  }
#endif
  normal_batch_generic(out, block0, key);
}

// Capacity that fill_normals needs for count normals.
constexpr int64_t normals_capacity(int64_t count) { return count + 3 + kBatch; }

// Fills buf with whole batches from the block of j0 on and returns the pointer to the normal of
// flat index j0; the normals of j0 .. j0 + count - 1 follow it. buf holds
// normals_capacity(count) floats. Every normal comes out of normal_batch, whatever its
// position, so the value of an index does not depend on how the index space was cut.
template <bool kAvx2>
FASTBNF_INLINE const float* fill_normals(float* __restrict buf, uint64_t j0, int64_t count,
                                         const PhiloxKey& key) {
  const int64_t skip = static_cast<int64_t>(j0 & 3);
  const uint64_t block0 = j0 >> 2;
  for (int64_t done = 0, b = 0; done < skip + count; done += kBatch, b += kBatchBlocks) {
    normal_batch<kAvx2>(buf + done, block0 + static_cast<uint64_t>(b), key);
  }
  return buf + skip;
}

// Whether this CPU runs the FASTBNF_TARGET_AVX2 paths. FASTBNF_CPU_ISA=generic forces the
// generic ones (the tests check that both paths draw the same stream).
inline bool cpu_has_avx2() {
#if FASTBNF_HAS_AVX2_PATH
  static const bool has = [] {
    const char* isa = std::getenv("FASTBNF_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "generic") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return has;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace fastbnf
