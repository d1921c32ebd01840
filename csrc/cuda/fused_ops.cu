// Fused CUDA kernels: posterior sampling with the Gaussian KL in one launch per group, the KL
// alone, the variance, and the backward that regenerates eps. Torch-free (raw pointers, sizes,
// the Philox key and a stream), so that nvcc compiles this file on any machine.
//
// The per-element maths is posterior_math.h's and the noise philox.h's, shared with the CPU
// kernels. The kernels are built for memory bandwidth:
// - float arithmetic for float32, float16 and bfloat16 groups (read, compute in float, round
//   once on store), double for float64 groups; the KL's terms are summed in the compute type
//   per thread and tile, and only the tile partials are combined in double;
// - a host-built tile map (fused_ops.h): a tile of kTileElements flat elements is walked tensor
//   by tensor (its segments), so the tensor of an element is never searched for;
// - each thread takes two groups of 4 elements at a time (groups g and g + 256 of the tile),
//   issues all their loads, then draws their noise and does the maths: 16-byte loads and stores
//   for 4-aligned tensors with aligned pointers, a scalar path for the others (a group that
//   straddles tensors, a tensor that starts at an offset that is not a multiple of 4);
// - the RNG inlined, the grid sized from the SM count and the resident blocks (occupancy API,
//   cached per device and kernel) and grid-striding over the tiles;
// - the KL deterministic: per-tile double partials (a fixed shuffle tree and the warps in
//   order), which the last block to finish (an atomic counter) adds in a fixed order, in the
//   same launch.
#include "fused_ops.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <unordered_map>

#include "../common/philox.h"
#include "../common/posterior_math.h"

namespace fastbnf {
namespace cuda {
namespace {

namespace pm = ::fastbnf::posterior;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
static_assert(kTileElements == int64_t{kThreads} * 2 * 4 * 2, "a tile is 2 rounds of 2 groups");
static_assert(kTileElements % 4 == 0, "tiles hold whole groups of 4");

// ---------------------------------------------------------------------------------------------
// Element types

// The compute type, and the resident blocks per SM asked of the compiler: 4 blocks of 256
// threads cap a float kernel at 64 registers; double kernels get 128.
template <typename T>
struct Traits {
  using S = float;
  static constexpr int kMinBlocks = 4;
};
template <>
struct Traits<double> {
  using S = double;
  static constexpr int kMinBlocks = 2;
};

// exp and rsqrt of posterior_math.h on the device: the functions PyTorch's CUDA ops use.
struct DeviceMath {
  static constexpr bool kFma = true;
  __device__ __forceinline__ static float fma(float a, float b, float c) {
    return __fmaf_rn(a, b, c);
  }
  __device__ __forceinline__ static float exp(float x) { return expf(x); }
  __device__ __forceinline__ static double exp(double x) { return ::exp(x); }
  __device__ __forceinline__ static float rsqrt(float x) { return rsqrtf(x); }
  __device__ __forceinline__ static double rsqrt(double x) { return ::rsqrt(x); }
  // adam_math.h's: rounded once, as PyTorch's CUDA sqrt and fused multiply-adds.
  __device__ __forceinline__ static double fma(double a, double b, double c) {
    return __fma_rn(a, b, c);
  }
  __device__ __forceinline__ static float sqrt(float x) { return __fsqrt_rn(x); }
  __device__ __forceinline__ static double sqrt(double x) { return __dsqrt_rn(x); }
};

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

// Rounds a computed value to a stored type. Doubles go to float16 / bfloat16 through float, as
// PyTorch converts them.
template <typename O>
struct Narrow;
template <>
struct Narrow<float> {
  __device__ __forceinline__ static float from(float x) { return x; }
  __device__ __forceinline__ static float from(double x) { return static_cast<float>(x); }
};
template <>
struct Narrow<double> {
  __device__ __forceinline__ static double from(double x) { return x; }
  __device__ __forceinline__ static double from(float x) { return x; }
};
template <>
struct Narrow<__half> {
  __device__ __forceinline__ static __half from(float x) { return __float2half_rn(x); }
  __device__ __forceinline__ static __half from(double x) {
    return __float2half_rn(static_cast<float>(x));
  }
};
template <>
struct Narrow<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
  __device__ __forceinline__ static __nv_bfloat16 from(double x) {
    return __float2bfloat16_rn(static_cast<float>(x));
  }
};

template <typename S, typename T>
__device__ __forceinline__ S load1(const T* p) {
  return static_cast<S>(widen(p[0]));
}

template <typename O, typename S>
__device__ __forceinline__ void store1(O* p, S x) {
  p[0] = Narrow<O>::from(x);
}

// Four elements from a pointer aligned to min(4 * sizeof(T), 16) bytes.
// A vector load through the read-only cache (kNc), or a plain one for memory that the kernel
// writes too (the fused Adam step's in-place state).
template <bool kNc, typename V>
__device__ __forceinline__ V load_vec(const V* p) {
  if constexpr (kNc) {
    return __ldg(p);
  } else {
    return *p;
  }
}

template <typename S, bool kNc = true>
__device__ __forceinline__ void load4(const float* p, S out[4]) {
  const float4 v = load_vec<kNc>(reinterpret_cast<const float4*>(p));
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
}
template <typename S, bool kNc = true>
__device__ __forceinline__ void load4(const double* p, S out[4]) {
  const double2 a = load_vec<kNc>(reinterpret_cast<const double2*>(p));
  const double2 b = load_vec<kNc>(reinterpret_cast<const double2*>(p) + 1);
  out[0] = static_cast<S>(a.x);
  out[1] = static_cast<S>(a.y);
  out[2] = static_cast<S>(b.x);
  out[3] = static_cast<S>(b.y);
}
// The pair types of the 16-bit floats and their conversions to and from float2.
template <typename T>
struct Pair16;
template <>
struct Pair16<__half> {
  using type = __half2;
  __device__ __forceinline__ static float2 widen(__half2 v) { return __half22float2(v); }
  __device__ __forceinline__ static __half2 make(__half a, __half b) {
    return __halves2half2(a, b);
  }
};
template <>
struct Pair16<__nv_bfloat16> {
  using type = __nv_bfloat162;
  __device__ __forceinline__ static float2 widen(__nv_bfloat162 v) {
    return __bfloat1622float2(v);
  }
  __device__ __forceinline__ static __nv_bfloat162 make(__nv_bfloat16 a, __nv_bfloat16 b) {
    return __halves2bfloat162(a, b);
  }
};

// Four 16-bit floats: one 8-byte load, two pairs.
template <typename S, bool kNc = true, typename T, typename Pair = Pair16<T>>
__device__ __forceinline__ void load4(const T* p, S out[4]) {
  const uint2 v = load_vec<kNc>(reinterpret_cast<const uint2*>(p));
  typename Pair::type lo, hi;
  memcpy(&lo, &v.x, 4);
  memcpy(&hi, &v.y, 4);
  const float2 a = Pair::widen(lo), b = Pair::widen(hi);
  out[0] = a.x;
  out[1] = a.y;
  out[2] = b.x;
  out[3] = b.y;
}

template <typename S>
__device__ __forceinline__ void store4(float* p, const S in[4]) {
  *reinterpret_cast<float4*>(p) =
      make_float4(Narrow<float>::from(in[0]), Narrow<float>::from(in[1]),
                  Narrow<float>::from(in[2]), Narrow<float>::from(in[3]));
}
template <typename S>
__device__ __forceinline__ void store4(double* p, const S in[4]) {
  reinterpret_cast<double2*>(p)[0] = make_double2(in[0], in[1]);
  reinterpret_cast<double2*>(p)[1] = make_double2(in[2], in[3]);
}
// Four 16-bit floats, each rounded once: two pairs, one 8-byte store.
template <typename S, typename T, typename Pair = Pair16<T>>
__device__ __forceinline__ void store4(T* p, const S in[4]) {
  const auto lo = Pair::make(Narrow<T>::from(in[0]), Narrow<T>::from(in[1]));
  const auto hi = Pair::make(Narrow<T>::from(in[2]), Narrow<T>::from(in[3]));
  uint2 v;
  memcpy(&v.x, &lo, 4);
  memcpy(&v.y, &hi, 4);
  *reinterpret_cast<uint2*>(p) = v;
}

// One element of grad_kl, whatever its floating dtype (read once per thread).
template <typename S>
__device__ __forceinline__ S load_scalar(const void* p, int32_t dtype) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat64: return static_cast<S>(*static_cast<const double*>(p));
    case DType::kFloat16: return static_cast<S>(__half2float(*static_cast<const __half*>(p)));
    case DType::kBFloat16:
      return static_cast<S>(__bfloat162float(*static_cast<const __nv_bfloat16*>(p)));
    default: return static_cast<S>(*static_cast<const float*>(p));
  }
}

// ---------------------------------------------------------------------------------------------
// Noise

// eps of the flat sample indices j .. j + 3 for j % 4 == 0: one Philox block.
__device__ __forceinline__ void eps4_aligned(uint64_t j, uint64_t key, uint64_t offset,
                                             float e[4]) {
  normal4(philox_block(j >> 2, key, offset), e);
}

// eps of j .. j + 3 for any j (rows k > 0 start mid block when N % 4 != 0: two blocks).
__device__ __forceinline__ void eps4(uint64_t j, uint64_t key, uint64_t offset, float e[4]) {
  const unsigned r = static_cast<unsigned>(j & 3);
  float a[4];
  normal4(philox_block(j >> 2, key, offset), a);
  if (r == 0) {
    e[0] = a[0];
    e[1] = a[1];
    e[2] = a[2];
    e[3] = a[3];
    return;
  }
  float b[4];
  normal4(philox_block((j >> 2) + 1, key, offset), b);
  e[0] = r == 1 ? a[1] : (r == 2 ? a[2] : a[3]);
  e[1] = r == 1 ? a[2] : (r == 2 ? a[3] : b[0]);
  e[2] = r == 1 ? a[3] : (r == 2 ? b[0] : b[1]);
  e[3] = r == 1 ? b[0] : (r == 2 ? b[1] : b[2]);
}

// ---------------------------------------------------------------------------------------------
// Tiles and segments

// A tensor as one segment of a tile reads it: its pointers rebased to the tile's first element
// (so that a group's address is base + 4 * g, a 32-bit offset), its end in the tile.
template <typename T>
struct Seg {
  const T* mean;
  const T* logvar;
  const T* prior_mean;  // null: the prior mean is 0
  typename Traits<T>::S inv_var, log_var_m1;
};

template <typename T>
__device__ __forceinline__ Seg<T> rebase(const DeviceTensor* d, int64_t ts) {
  using S = typename Traits<T>::S;
  const int64_t shift = ts - d->begin;  // may be negative: the tensor starts inside the tile
  const T* prior = static_cast<const T*>(d->prior_mean);
  return Seg<T>{static_cast<const T*>(d->mean) + shift, static_cast<const T*>(d->logvar) + shift,
                prior == nullptr ? nullptr : prior + shift, static_cast<S>(d->inv_prior_var),
                static_cast<S>(d->log_prior_var_m1)};
}

// Walks this block's tiles, tensor by tensor. In each segment (the part of a tensor inside the
// tile) the thread takes the groups of 4 flat elements whose first element lies in it, two at a
// time: g and g + 256 (g counted from the tile's first element), with g % 256 == threadIdx.x,
// so that every thread has work whatever the sizes of the tensors. pair(seg, g, has2, ts) takes
// the two groups when they lie whole in a vector-readable tensor; slow(t, i0) takes the group
// of flat elements i0 .. i0 + 3 element by element (it may straddle tensors, or end the group);
// tile_end(tile) follows each tile.
template <typename T, class Pair, class Slow, class TileEnd>
__device__ __forceinline__ void for_each_tile(const DeviceTensor* __restrict__ tensors,
                                              const int32_t* __restrict__ tile_first,
                                              int64_t numel, int64_t num_tiles, Pair&& pair,
                                              Slow&& slow, TileEnd&& tile_end) {
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t ts = tile * kTileElements;
    const int te = static_cast<int>(min(kTileElements, numel - ts));  // tile-relative end
    int t = __ldg(tile_first + tile);
    for (;;) {
      const DeviceTensor* d = tensors + t;
      const int64_t end64 = d->end - ts;
      const int lo = static_cast<int>(max(d->begin - ts, int64_t{0}));
      const int hi = static_cast<int>(min(end64, int64_t{te}));
      const bool vec = d->vec != 0;
      const int gb = (hi + 3) >> 2;
      int g = ((lo + 3) >> 2);
      g += (static_cast<int>(threadIdx.x) - g) & (kThreads - 1);
      if (g < gb) {
        const Seg<T> seg = rebase<T>(d, ts);
        for (; g < gb; g += 2 * kThreads) {
          const bool has2 = g + kThreads < gb;
          if (vec && 4 * (has2 ? g + kThreads : g) + 4 <= hi) {
            pair(seg, g, has2, ts);
          } else {
            slow(t, ts + 4 * g);
            if (has2) slow(t, ts + 4 * (g + kThreads));
          }
        }
      }
      if (end64 >= te) break;
      ++t;
    }
    tile_end(tile);
  }
}

// The tensor of flat element i, walking from t (i lies in tensor t or after it).
__device__ __forceinline__ int walk_to(const DeviceTensor* __restrict__ tensors, int t,
                                       int64_t i) {
  while (i >= tensors[t].end) ++t;
  return t;
}

// Sum of one double per thread, valid in thread 0: a fixed shuffle tree, then the warps in
// order, so the same inputs give the same bits. slots: kWarps doubles of shared memory.
__device__ __forceinline__ double block_sum(double value, double* slots) {
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) {
    value += __shfl_down_sync(0xffffffffu, value, delta);
  }
  if (threadIdx.x % 32 == 0) slots[threadIdx.x / 32] = value;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += slots[w];
  }
  return total;
}

// The KL's reduction state of a block.
struct KLReduce {
  double* partials;
  unsigned int* counter;
  int64_t num_tiles;
};

// The partial of one tile (a block-wide sum of each thread's terms) into partials[tile].
// Double-buffered slots: one barrier per tile.
__device__ __forceinline__ void tile_partial(double value, double (*slots)[kWarps], int& parity,
                                             double* partials, int64_t tile) {
  const double total = block_sum(value, slots[parity]);
  if (threadIdx.x == 0) partials[tile] = total;
  parity ^= 1;
}

// After the tiles: the last block to finish adds the partials in a fixed order (each thread a
// fixed strided slice, then block_sum) and writes the KL.
template <typename T>
__device__ __forceinline__ void finish_kl(const KLReduce& r, double* slots, void* kl) {
  __shared__ bool is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(r.counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  double acc = 0.0;
#pragma unroll 4
  for (int64_t tile = threadIdx.x; tile < r.num_tiles; tile += kThreads) {
    acc += __ldcg(r.partials + tile);
  }
  const double total = block_sum(acc, slots);
  if (threadIdx.x == 0) {
    store1(static_cast<T*>(kl), total);
    *r.counter = 0u;  // ready for the next launch
  }
}

struct Key {
  uint64_t stream_seed, key, offset;
};

__device__ __forceinline__ Key unpack_key(const PhiloxArgs& rng) {
  // at::cuda::philox::unpack: under graph capture the seed and offset are read from device
  // memory that each replay updates.
  uint64_t seed = rng.seed, offset = rng.offset;
  if (rng.captured) {
    seed = static_cast<uint64_t>(*rng.seed_ptr);
    offset = static_cast<uint64_t>(*rng.offset_ptr) + rng.offset_intragraph;
  }
  const uint64_t stream_seed = fold_stream(seed, rng.stream);
  return Key{stream_seed, philox_key(stream_seed), offset};
}

// ---------------------------------------------------------------------------------------------
// Kernels

struct Common {
  const DeviceTensor* tensors;
  const int32_t* tile_first;
  int64_t numel;
  int64_t num_tiles;
  double* partials;
  unsigned int* counter;
};

// The means and log-variances of a thread's two groups of a segment (the second one when
// has2), every load issued before any is used.
template <typename T, typename S>
__device__ __forceinline__ void load_pair(const Seg<T>& s, const int off[2], bool has2, S mu[2][4],
                                          S l[2][4]) {
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    if (u == 0 || has2) {
      load4(s.mean + off[u], mu[u]);
      load4(s.logvar + off[u], l[u]);
    }
  }
}

// One element of the slow path: its tensor's entry and its index in the tensor.
template <typename T>
struct Elem {
  const DeviceTensor* d;
  int64_t local;
  __device__ __forceinline__ typename Traits<T>::S mean() const {
    return load1<typename Traits<T>::S>(static_cast<const T*>(d->mean) + local);
  }
  __device__ __forceinline__ typename Traits<T>::S logvar() const {
    return load1<typename Traits<T>::S>(static_cast<const T*>(d->logvar) + local);
  }
  __device__ __forceinline__ bool has_prior_mean() const { return d->prior_mean != nullptr; }
  __device__ __forceinline__ typename Traits<T>::S prior_mean() const {
    return load1<typename Traits<T>::S>(static_cast<const T*>(d->prior_mean) + local);
  }
  __device__ __forceinline__ typename Traits<T>::S inv_var() const {
    return static_cast<typename Traits<T>::S>(d->inv_prior_var);
  }
  __device__ __forceinline__ typename Traits<T>::S log_var_m1() const {
    return static_cast<typename Traits<T>::S>(d->log_prior_var_m1);
  }
};

// The element i of the group, walking from tensor t (updated).
template <typename T>
__device__ __forceinline__ Elem<T> element_of(const DeviceTensor* __restrict__ tensors, int& t,
                                              int64_t i) {
  t = walk_to(tensors, t, i);
  const DeviceTensor* d = tensors + t;
  return Elem<T>{d, i - d->begin};
}

struct SampleParams {
  Common c;
  int64_t samples;
  int32_t with_kl;
  int32_t out_vec;  // theta's pointer aligned for 4-element stores
  void* out;
  void* kl;
  int64_t* rng_state;
  PhiloxArgs rng;
};

// theta = mu + sigma * eps for every sample, and the KL when with_kl.
template <typename T, typename O>
__global__ void __launch_bounds__(kThreads, Traits<T>::kMinBlocks)
    sample_forward_kernel(const SampleParams p) {
  using S = typename Traits<T>::S;
  using M = DeviceMath;
  __shared__ double slots[2][kWarps];
  const Key key = unpack_key(p.rng);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    p.rng_state[0] = static_cast<int64_t>(key.stream_seed);
    p.rng_state[1] = static_cast<int64_t>(key.offset);
  }
  const bool with_kl = p.with_kl != 0;
  const int64_t n = p.c.numel;
  O* out = static_cast<O*>(p.out);
  S kl_acc = S(0);
  int parity = 0;

  // sigma of one element, and its KL term into kl_acc.
  auto element_sigma = [&](S mu, S lv, bool prior, S m, S inv_var, S log_var_m1) {
    const S lc = pm::softclip(lv, pm::softclip_scale<M>(lv));
    if (with_kl) {
      const S d = prior ? pm::sub(mu, m) : mu;
      kl_acc = pm::add(kl_acc, pm::kl_term(d, pm::variance<M>(lc), lc, inv_var, log_var_m1));
    }
    return pm::sigma<M>(lc);
  };

  // theta of 4 elements of row k (flat sample index j) into out.
  auto store_row = [&](int64_t j, const S mu[4], const S sg[4], const float e[4], int count) {
    S th[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) th[q] = pm::theta(mu[q], sg[q], static_cast<S>(e[q]));
    if (count == 4 && p.out_vec && (j & 3) == 0) {
      store4(out + j, th);
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (q < count) store1(out + j + q, th[q]);
      }
    }
  };

  auto pair = [&](const Seg<T>& s, int g, bool has2, int64_t ts) {
    const int off[2] = {4 * g, 4 * (g + kThreads)};
    const bool prior = with_kl && s.prior_mean != nullptr;
    // All the loads of both groups first, then each group's maths and noise.
    S mu[2][4], l[2][4];
    load_pair(s, off, has2, mu, l);
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (u == 0 || has2) {
        S m[4] = {S(0), S(0), S(0), S(0)};
        if (prior) load4(s.prior_mean + off[u], m);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          l[u][q] = element_sigma(mu[u][q], l[u][q], prior, m[q], s.inv_var, s.log_var_m1);
        }
        const int64_t i0 = ts + off[u];
        for (int64_t k = 0; k < p.samples; ++k) {
          const int64_t j = k * n + i0;
          float e[4];
          if (k == 0) {
            eps4_aligned(static_cast<uint64_t>(j), key.key, key.offset, e);
          } else {
            eps4(static_cast<uint64_t>(j), key.key, key.offset, e);
          }
          store_row(j, mu[u], l[u], e, 4);
        }
      }
    }
  };

  auto slow = [&](int t, int64_t i0) {
    const int count = static_cast<int>(min(int64_t{4}, n - i0));
    S mu[4], sg[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      mu[q] = sg[q] = S(0);
      if (q < count) {
        const Elem<T> x = element_of<T>(p.c.tensors, t, i0 + q);
        mu[q] = x.mean();
        const bool prior = with_kl && x.has_prior_mean();
        sg[q] = element_sigma(mu[q], x.logvar(), prior, prior ? x.prior_mean() : S(0), x.inv_var(),
                              x.log_var_m1());
      }
    }
    for (int64_t k = 0; k < p.samples; ++k) {
      const int64_t j = k * n + i0;
      float e[4];
      eps4(static_cast<uint64_t>(j), key.key, key.offset, e);
      store_row(j, mu, sg, e, count);
    }
  };

  auto tile_end = [&](int64_t tile) {
    if (!with_kl) return;
    tile_partial(static_cast<double>(kl_acc), slots, parity, p.c.partials, tile);
    kl_acc = S(0);
  };

  for_each_tile<T>(p.c.tensors, p.c.tile_first, n, p.c.num_tiles, pair, slow, tile_end);

  if (with_kl) {
    finish_kl<T>(KLReduce{p.c.partials, p.c.counter, p.c.num_tiles}, slots[0], p.kl);
  } else if (p.kl != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
    store1(static_cast<T*>(p.kl), S(0));
  }
}

struct KLParams {
  Common c;
  void* kl;
};

// The KL alone.
template <typename T>
__global__ void __launch_bounds__(kThreads, Traits<T>::kMinBlocks)
    kl_forward_kernel(const KLParams p) {
  using S = typename Traits<T>::S;
  using M = DeviceMath;
  __shared__ double slots[2][kWarps];
  const int64_t n = p.c.numel;
  S kl_acc = S(0);
  int parity = 0;

  auto term = [&](S mu, S lv, bool prior, S m, S inv_var, S log_var_m1) {
    const S lc = pm::softclip(lv, pm::softclip_scale<M>(lv));
    const S d = prior ? pm::sub(mu, m) : mu;
    kl_acc = pm::add(kl_acc, pm::kl_term(d, pm::variance<M>(lc), lc, inv_var, log_var_m1));
  };

  auto pair = [&](const Seg<T>& s, int g, bool has2, int64_t) {
    const int off[2] = {4 * g, 4 * (g + kThreads)};
    const bool prior = s.prior_mean != nullptr;
    S mu[2][4], l[2][4];
    load_pair(s, off, has2, mu, l);
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (u == 0 || has2) {
        S m[4] = {S(0), S(0), S(0), S(0)};
        if (prior) load4(s.prior_mean + off[u], m);
#pragma unroll
        for (int q = 0; q < 4; ++q) term(mu[u][q], l[u][q], prior, m[q], s.inv_var, s.log_var_m1);
      }
    }
  };

  auto slow = [&](int t, int64_t i0) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (i0 + q < n) {
        const Elem<T> x = element_of<T>(p.c.tensors, t, i0 + q);
        const bool prior = x.has_prior_mean();
        term(x.mean(), x.logvar(), prior, prior ? x.prior_mean() : S(0), x.inv_var(),
             x.log_var_m1());
      }
    }
  };

  auto tile_end = [&](int64_t tile) {
    tile_partial(static_cast<double>(kl_acc), slots, parity, p.c.partials, tile);
    kl_acc = S(0);
  };

  for_each_tile<T>(p.c.tensors, p.c.tile_first, n, p.c.num_tiles, pair, slow, tile_end);
  finish_kl<T>(KLReduce{p.c.partials, p.c.counter, p.c.num_tiles}, slots[0], p.kl);
}

struct VarianceParams {
  Common c;
  int32_t out_vec;
  void* out;
};

// exp(softclip(logvar)) of every element.
template <typename T>
__global__ void __launch_bounds__(kThreads, Traits<T>::kMinBlocks)
    variance_forward_kernel(const VarianceParams p) {
  using S = typename Traits<T>::S;
  using M = DeviceMath;
  const int64_t n = p.c.numel;
  T* out = static_cast<T*>(p.out);

  auto var = [](S lv) { return pm::variance<M>(pm::softclip(lv, pm::softclip_scale<M>(lv))); };

  auto pair = [&](const Seg<T>& s, int g, bool has2, int64_t ts) {
    const int off[2] = {4 * g, 4 * (g + kThreads)};
    S l[2][4];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (u == 0 || has2) load4(s.logvar + off[u], l[u]);
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (u == 0 || has2) {
#pragma unroll
        for (int q = 0; q < 4; ++q) l[u][q] = var(l[u][q]);
        T* dst = out + ts + off[u];
        if (p.out_vec) {
          store4(dst, l[u]);
        } else {
#pragma unroll
          for (int q = 0; q < 4; ++q) store1(dst + q, l[u][q]);
        }
      }
    }
  };

  auto slow = [&](int t, int64_t i0) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (i0 + q < n) store1(out + i0 + q, var(element_of<T>(p.c.tensors, t, i0 + q).logvar()));
    }
  };

  for_each_tile<T>(p.c.tensors, p.c.tile_first, n, p.c.num_tiles, pair, slow, [](int64_t) {});
}

struct BackwardParams {
  Common c;
  int64_t samples;
  const void* grad_theta;
  const void* grad_kl;
  int32_t grad_kl_dtype;
  int32_t with_kl;
  int32_t grad_vec;  // grad_theta aligned for 4-element loads
  int32_t out_vec;   // grad_mean and grad_logvar aligned for 4-element stores
  const int64_t* rng_state;
  void* grad_mean;
  void* grad_logvar;
};

// The gradients of the samples (samples > 0, eps regenerated from rng_state) and of the KL
// (with_kl) with respect to the means and log-variances.
template <typename T, typename G>
__global__ void __launch_bounds__(kThreads, Traits<T>::kMinBlocks)
    backward_kernel(const BackwardParams p) {
  using S = typename Traits<T>::S;
  using M = DeviceMath;
  const int64_t n = p.c.numel;
  const bool with_kl = p.with_kl != 0;
  const bool sampled = p.samples > 0;
  uint64_t key = 0, offset = 0;
  if (sampled) {
    key = philox_key(static_cast<uint64_t>(p.rng_state[0]));
    offset = static_cast<uint64_t>(p.rng_state[1]);
  }
  const S gk = with_kl ? load_scalar<S>(p.grad_kl, p.grad_kl_dtype) : S(0);
  const G* grad = static_cast<const G*>(p.grad_theta);
  T* grad_mean = static_cast<T*>(p.grad_mean);
  T* grad_logvar = static_cast<T*>(p.grad_logvar);

  // The sums G and E over the samples of 4 elements (flat index i0, count of them valid).
  auto sums = [&](int64_t i0, int count, S gs[4], S es[4]) {
    for (int64_t k = 0; k < p.samples; ++k) {
      const int64_t j = k * n + i0;
      S gr[4];
      if (count == 4 && p.grad_vec && (j & 3) == 0) {
        load4(grad + j, gr);
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) gr[q] = q < count ? load1<S>(grad + j + q) : S(0);
      }
      float e[4];
      eps4(static_cast<uint64_t>(j), key, offset, e);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const S ge = pm::mul(gr[q], static_cast<S>(e[q]));
        gs[q] = k == 0 ? gr[q] : pm::add(gs[q], gr[q]);
        es[q] = k == 0 ? ge : pm::add(es[q], ge);
      }
    }
  };

  // The two gradients of one element: d = mu - m (mu without a prior mean), its sums gs, es.
  auto grads = [&](S d, S lv, S gs, S es, S inv_var, S& out_mu, S& out_lv) {
    const S qs = pm::softclip_scale<M>(lv);
    const S lc = pm::softclip(lv, qs);
    S part = S(0), gm = S(0);
    if (sampled) {
      part = pm::logvar_part_sample(pm::sigma<M>(lc), es);
      gm = gs;
    }
    if (with_kl) {
      const S kl_mu = pm::mul(gk, pm::mul(d, inv_var));
      const S kl_part = pm::logvar_part_kl(pm::variance<M>(lc), inv_var, gk);
      gm = sampled ? pm::add(gs, kl_mu) : kl_mu;
      part = sampled ? pm::add(part, kl_part) : kl_part;
    }
    out_mu = gm;
    out_lv = pm::grad_logvar(pm::softclip_slope(qs), part);
  };

  auto store_grads = [&](int64_t i0, const S out_mu[4], const S out_lv[4]) {
    if (p.out_vec) {
      store4(grad_mean + i0, out_mu);
      store4(grad_logvar + i0, out_lv);
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        store1(grad_mean + i0 + q, out_mu[q]);
        store1(grad_logvar + i0 + q, out_lv[q]);
      }
    }
  };

  // One group of a vector-readable tensor, any number of samples.
  auto one = [&](const Seg<T>& s, int off, int64_t ts) {
    const bool prior = with_kl && s.prior_mean != nullptr;
    S d[4] = {S(0), S(0), S(0), S(0)}, l[4];
    load4(s.logvar + off, l);
    if (with_kl) load4(s.mean + off, d);
    if (prior) {
      S m[4];
      load4(s.prior_mean + off, m);
#pragma unroll
      for (int q = 0; q < 4; ++q) d[q] = pm::sub(d[q], m[q]);
    }
    const int64_t i0 = ts + off;
    S gs[4] = {S(0), S(0), S(0), S(0)}, es[4] = {S(0), S(0), S(0), S(0)};
    sums(i0, 4, gs, es);
#pragma unroll
    for (int q = 0; q < 4; ++q) grads(d[q], l[q], gs[q], es[q], s.inv_var, d[q], l[q]);
    store_grads(i0, d, l);
  };

  auto pair = [&](const Seg<T>& s, int g, bool has2, int64_t ts) {
    const int off[2] = {4 * g, 4 * (g + kThreads)};
    if (p.samples > 1) {
#pragma unroll 1
      for (int u = 0; u < (has2 ? 2 : 1); ++u) one(s, 4 * (g + u * kThreads), ts);
      return;
    }
    const bool prior = with_kl && s.prior_mean != nullptr;
    // One sample at most: the log-variances and grad_theta of both groups first, then each
    // group's means (with a KL), noise and gradients.
    S l[2][4], gs[2][4];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
#pragma unroll
      for (int q = 0; q < 4; ++q) gs[u][q] = S(0);
      if (u == 0 || has2) {
        load4(s.logvar + off[u], l[u]);
        if (sampled) {
          const int64_t i0 = ts + off[u];
          if (p.grad_vec) {
            load4(grad + i0, gs[u]);
          } else {
#pragma unroll
            for (int q = 0; q < 4; ++q) gs[u][q] = load1<S>(grad + i0 + q);
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (u == 0 || has2) {
        S d[4] = {S(0), S(0), S(0), S(0)};
        if (with_kl) load4(s.mean + off[u], d);
        if (prior) {
          S m[4];
          load4(s.prior_mean + off[u], m);
#pragma unroll
          for (int q = 0; q < 4; ++q) d[q] = pm::sub(d[q], m[q]);
        }
        const int64_t i0 = ts + off[u];
        S es[4] = {S(0), S(0), S(0), S(0)};
        if (sampled) {
          float e[4];
          eps4_aligned(static_cast<uint64_t>(i0), key, offset, e);
#pragma unroll
          for (int q = 0; q < 4; ++q) es[q] = pm::mul(gs[u][q], static_cast<S>(e[q]));
        }
#pragma unroll
        for (int q = 0; q < 4; ++q)
          grads(d[q], l[u][q], gs[u][q], es[q], s.inv_var, d[q], l[u][q]);
        store_grads(i0, d, l[u]);
      }
    }
  };

  auto slow = [&](int t, int64_t i0) {
    const int count = static_cast<int>(min(int64_t{4}, n - i0));
    S gs[4] = {S(0), S(0), S(0), S(0)}, es[4] = {S(0), S(0), S(0), S(0)};
    if (sampled) sums(i0, count, gs, es);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (q < count) {
        const Elem<T> x = element_of<T>(p.c.tensors, t, i0 + q);
        S d = S(0);
        if (with_kl) {
          d = x.mean();
          if (x.has_prior_mean()) d = pm::sub(d, x.prior_mean());
        }
        S out_mu, out_lv;
        grads(d, x.logvar(), gs[q], es[q], x.inv_var(), out_mu, out_lv);
        store1(grad_mean + i0 + q, out_mu);
        store1(grad_logvar + i0 + q, out_lv);
      }
    }
  };

  for_each_tile<T>(p.c.tensors, p.c.tile_first, n, p.c.num_tiles, pair, slow, [](int64_t) {});
}

struct AdamParams {
  Common c;
  const void* grad;
  void* exp_avgs;
  void* exp_avg_sqs;
  void* theta;
  const int64_t* rng_state;
  int64_t* next_rng_state;
  PhiloxArgs rng;
  double kl_weight;
  int32_t flat_vec;  // grad, theta and the moments readable 4 at a time (and N % 4 == 0)
  adam::Scalars<float> means_f, logvars_f;
  adam::Scalars<double> means_d, logvars_d;
};

template <typename S>
__device__ __forceinline__ const adam::Scalars<S>& pick(const adam::Scalars<float>& f,
                                                        const adam::Scalars<double>& d) {
  if constexpr (std::is_same_v<S, float>) {
    return f;
  } else {
    return d;
  }
}

// A value rounded to the stored type T, back in the compute type.
template <typename T, typename S>
__device__ __forceinline__ S round_to(S x) {
  return static_cast<S>(widen(Narrow<T>::from(x)));
}

// Resident blocks asked of the compiler for the step: it keeps more values live than the
// sampling kernels (the gradients, the posterior and its moments, two keys): 64 registers spill,
// and so do 80 on sm_90. Two blocks of 256 threads give it 128, and their loads (seven 16-byte
// vectors per group of 4 elements) still keep tens of KB in flight per SM.
constexpr int kAdamMinBlocks = 2;

// One step of the fused variational Adam (fastbnf::adam_step; the CPU kernel's comment in
// csrc/cpu/adam_step.cpp gives the order of the work): per group of 4 flat elements, the
// current and next samples' noise, the gradients as backward_kernel forms them (rounded to T as
// its outputs are), AdamW on the means, log-variances and moments (adam_math.h), the next
// theta. One group at a time per thread.
template <typename T, typename O>
__global__ void __launch_bounds__(kThreads, kAdamMinBlocks) adam_step_kernel(const AdamParams p) {
  using S = typename Traits<T>::S;
  using M = DeviceMath;
  const Key next = unpack_key(p.rng);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    p.next_rng_state[0] = static_cast<int64_t>(next.stream_seed);
    p.next_rng_state[1] = static_cast<int64_t>(next.offset);
  }
  const uint64_t key = philox_key(static_cast<uint64_t>(p.rng_state[0]));
  const uint64_t offset = static_cast<uint64_t>(p.rng_state[1]);
  const adam::Scalars<S> a_mu = pick<S>(p.means_f, p.means_d);
  const adam::Scalars<S> a_lv = pick<S>(p.logvars_f, p.logvars_d);
  const S gk = static_cast<S>(p.kl_weight);
  const int64_t n = p.c.numel;
  // The flat arrays, read from the parameter space where used (fewer live registers).
  auto grad = [&]() { return static_cast<const O*>(p.grad); };
  auto theta = [&]() { return static_cast<O*>(p.theta); };
  auto m_mu = [&]() { return static_cast<T*>(p.exp_avgs); };
  auto v_mu = [&]() { return static_cast<T*>(p.exp_avg_sqs); };
  auto m_lv = [&]() { return static_cast<T*>(p.exp_avgs) + n; };
  auto v_lv = [&]() { return static_cast<T*>(p.exp_avg_sqs) + n; };

  // The gradients of one element (d = mu - m, g its sample's gradient, e its noise), rounded
  // to T as backward_kernel's outputs are.
  auto grads = [&](S lv, S d, S g, float e, S inv_var, S& grad_mu, S& grad_lv) {
    const S q = pm::softclip_scale<M>(lv);
    const S lc = pm::softclip(lv, q);
    const S part = pm::add(pm::logvar_part_sample(pm::sigma<M>(lc), pm::mul(static_cast<S>(e), g)),
                           pm::logvar_part_kl(pm::variance<M>(lc), inv_var, gk));
    grad_mu = round_to<T>(pm::grad_mean(g, gk, d, inv_var));
    grad_lv = round_to<T>(pm::grad_logvar(pm::softclip_slope(q), part));
  };

  // The next sample of an updated element.
  auto next_theta = [&](S mu, S lv, float e_next) {
    return pm::theta(mu, pm::sigma<M>(pm::softclip(lv, pm::softclip_scale<M>(lv))),
                     static_cast<S>(e_next));
  };

  // Four values of a flat array (i0 % 4 == 0), vector-read where flat_vec allows.
  auto load_flat = [&](const auto* base, int64_t i0, S out[4]) {
    if (p.flat_vec) {
      load4<S, false>(base + i0, out);
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) out[q] = load1<S>(base + i0 + q);
    }
  };
  auto store_flat = [&](auto* base, int64_t i0, const S in[4]) {
    if (p.flat_vec) {
      store4(base + i0, in);
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) store1(base + i0 + q, in[q]);
    }
  };

  // The group of flat elements i0 .. i0 + 3 of a vector-readable segment, in three phases that
  // keep few values live: the gradients, Adam on the means then on the log-variances (each
  // with its moments), the next sample.
  auto group = [&](const Seg<T>& s, int off, int64_t i0) {
    S mu[4], lv[4], g[4], d[4];
    load4<S, false>(s.mean + off, mu);
    load4<S, false>(s.logvar + off, lv);
    load_flat(grad(), i0, g);
#pragma unroll
    for (int q = 0; q < 4; ++q) d[q] = mu[q];
    if (s.prior_mean != nullptr) {
      S m[4];
      load4(s.prior_mean + off, m);
#pragma unroll
      for (int q = 0; q < 4; ++q) d[q] = pm::sub(mu[q], m[q]);
    }
    float e[4];
    eps4_aligned(static_cast<uint64_t>(i0), key, offset, e);
    S grad_mu[4], grad_lv[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) grads(lv[q], d[q], g[q], e[q], s.inv_var, grad_mu[q], grad_lv[q]);

    S m1[4], v1[4];
    load_flat(m_mu(), i0, m1);
    load_flat(v_mu(), i0, v1);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      adam::update<M>(mu[q], m1[q], v1[q], grad_mu[q], a_mu);
      mu[q] = round_to<T>(mu[q]);
    }
    store_flat(m_mu(), i0, m1);
    store_flat(v_mu(), i0, v1);
    load_flat(m_lv(), i0, m1);
    load_flat(v_lv(), i0, v1);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      adam::update<M>(lv[q], m1[q], v1[q], grad_lv[q], a_lv);
      lv[q] = round_to<T>(lv[q]);
    }
    store_flat(m_lv(), i0, m1);
    store_flat(v_lv(), i0, v1);
    // The table's pointers are read-only; the launcher checked that they are the caller's
    // tensors (no copies), which this step updates.
    store4(const_cast<T*>(s.mean) + off, mu);
    store4(const_cast<T*>(s.logvar) + off, lv);

    eps4_aligned(static_cast<uint64_t>(i0), next.key, next.offset, e);
#pragma unroll
    for (int q = 0; q < 4; ++q) g[q] = next_theta(mu[q], lv[q], e[q]);
    store_flat(theta(), i0, g);
  };

  auto pair = [&](const Seg<T>& s, int g, bool has2, int64_t ts) {
#pragma unroll 1
    for (int u = 0; u < (has2 ? 2 : 1); ++u) {
      const int off = 4 * (g + u * kThreads);
      group(s, off, ts + off);
    }
  };

  // Element by element, in two passes over the group (the update, then the next sample, which
  // reads the updated posterior back): one set of noise live at a time.
  auto slow = [&](int t, int64_t i0) {
    const int count = static_cast<int>(min(int64_t{4}, n - i0));
    float e[4];
    eps4(static_cast<uint64_t>(i0), key, offset, e);
    int t0 = t;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (q < count) {
        const int64_t i = i0 + q;
        const Elem<T> x = element_of<T>(p.c.tensors, t, i);
        S mu = x.mean(), lv = x.logvar(), grad_mu, grad_lv;
        const S d = x.has_prior_mean() ? pm::sub(mu, x.prior_mean()) : mu;
        grads(lv, d, load1<S>(grad() + i), e[q], x.inv_var(), grad_mu, grad_lv);
        S m1 = load1<S>(m_mu() + i), v1 = load1<S>(v_mu() + i);
        adam::update<M>(mu, m1, v1, grad_mu, a_mu);
        store1(m_mu() + i, m1);
        store1(v_mu() + i, v1);
        m1 = load1<S>(m_lv() + i);
        v1 = load1<S>(v_lv() + i);
        adam::update<M>(lv, m1, v1, grad_lv, a_lv);
        store1(m_lv() + i, m1);
        store1(v_lv() + i, v1);
        store1(const_cast<T*>(static_cast<const T*>(x.d->mean)) + x.local, mu);
        store1(const_cast<T*>(static_cast<const T*>(x.d->logvar)) + x.local, lv);
      }
    }
    eps4(static_cast<uint64_t>(i0), next.key, next.offset, e);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (q < count) {
        const Elem<T> x = element_of<T>(p.c.tensors, t0, i0 + q);
        store1(theta() + i0 + q, next_theta(x.mean(), x.logvar(), e[q]));
      }
    }
  };

  for_each_tile<T>(p.c.tensors, p.c.tile_first, n, p.c.num_tiles, pair, slow, [](int64_t) {});
}

// ---------------------------------------------------------------------------------------------
// Dispatch

template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat64: f(double{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
  }
}

// The stored types a kernel pairs with a group's T: T itself, float16, bfloat16 or float32.
template <typename T, typename F>
void dispatch_narrow(DType group, DType other, F&& f) {
  if (other == group) {
    f(T{});
  } else if (other == DType::kFloat16) {
    f(__half{});
  } else if (other == DType::kBFloat16) {
    f(__nv_bfloat16{});
  } else {
    f(float{});
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The grid: every SM filled with as many blocks as can be resident (the occupancy API, cached
// per device and kernel), no more blocks than tiles.
unsigned grid_size(const void* kernel, int64_t tiles) {
  static std::mutex mutex;
  static std::unordered_map<uint64_t, int64_t>* cache =
      new std::unordered_map<uint64_t, int64_t>();
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    device = 0;
  }
  const uint64_t key = reinterpret_cast<uintptr_t>(kernel) * 64u + static_cast<uint64_t>(device);
  int64_t resident = 0;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto found = cache->find(key);
    if (found != cache->end()) resident = found->second;
  }
  if (resident == 0) {
    // The first launch of a kernel may come under CUDA graph capture (a step captured without
    // a warm-up): query in the relaxed capture mode, which allows these calls.
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    const bool exchanged = cudaThreadExchangeStreamCaptureMode(&mode) == cudaSuccess;
    int sms = 0, blocks = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0) !=
            cudaSuccess) {
      (void)cudaGetLastError();
      sms = sms > 0 ? sms : 1;
      blocks = 4;  // what __launch_bounds__ asks of the float kernels
    }
    if (exchanged) (void)cudaThreadExchangeStreamCaptureMode(&mode);
    resident = int64_t{std::max(sms, 1)} * std::max(blocks, 1);
    std::lock_guard<std::mutex> lock(mutex);
    (*cache)[key] = resident;
  }
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(tiles, resident)));
}

template <typename T>
void launch(void (*kernel)(T), int64_t tiles, const T& params, cudaStream_t stream) {
  const unsigned grid = grid_size(reinterpret_cast<const void*>(kernel), tiles);
  kernel<<<grid, kThreads, 0, stream>>>(params);
}

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat64: return 8;
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    default: return 4;
  }
}

// Alignment of a 4-element vector access: 16 bytes (float32, and float64 as two halves), 8
// (float16, bfloat16).
size_t vec_alignment(size_t elem_size) { return std::min<size_t>(4 * elem_size, 16); }

bool aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

constexpr size_t kCounterBytes = 16;

Common common(const void* table, int64_t num_tensors, int64_t numel) {
  Common c{};
  c.tensors = static_cast<const DeviceTensor*>(table);
  c.tile_first = reinterpret_cast<const int32_t*>(static_cast<const char*>(table) +
                                                  tensors_bytes(num_tensors));
  c.numel = numel;
  c.num_tiles = num_tiles(numel);
  return c;
}

}  // namespace

int64_t num_tiles(int64_t numel) { return ceil_div(numel, kTileElements); }

size_t tensors_bytes(int64_t num_tensors) {
  return sizeof(DeviceTensor) * static_cast<size_t>(num_tensors);
}

size_t table_bytes(int64_t num_tensors, int64_t numel) {
  return tensors_bytes(num_tensors) + sizeof(int32_t) * static_cast<size_t>(num_tiles(numel));
}

void fill_tensors(void* host, const TensorEntry* entries, int64_t num_tensors, size_t elem_size) {
  const size_t alignment = vec_alignment(elem_size);
  auto* out = static_cast<DeviceTensor*>(host);
  for (int64_t t = 0; t < num_tensors; ++t) {
    const TensorEntry& e = entries[t];
    DeviceTensor d{};
    d.mean = e.mean;
    d.logvar = e.logvar;
    d.prior_mean = e.prior_mean;
    d.begin = e.begin;
    d.end = e.begin + e.numel;
    d.inv_prior_var = e.inv_prior_var;
    d.log_prior_var_m1 = e.log_prior_var_m1;
    d.vec = e.begin % 4 == 0 && (e.mean == nullptr || aligned(e.mean, alignment)) &&
            aligned(e.logvar, alignment) &&
            (e.prior_mean == nullptr || aligned(e.prior_mean, alignment));
    d.pad = 0;
    std::memcpy(out + t, &d, sizeof(d));
  }
}

void fill_tile_map(void* host, const TensorEntry* entries, int64_t num_tensors, int64_t numel) {
  auto* map = reinterpret_cast<int32_t*>(static_cast<char*>(host) + tensors_bytes(num_tensors));
  const int64_t tiles = num_tiles(numel);
  int64_t t = 0;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t start = tile * kTileElements;
    while (t + 1 < num_tensors && entries[t].begin + entries[t].numel <= start) ++t;
    map[tile] = static_cast<int32_t>(t);
  }
}

size_t forward_workspace_bytes(int64_t numel) {
  return kCounterBytes +
         sizeof(double) * static_cast<size_t>(std::max<int64_t>(num_tiles(numel), 1));
}

size_t forward_workspace_zero_bytes() { return kCounterBytes; }

cudaError_t launch_forward(const ForwardArgs& args, cudaStream_t stream) {
  Common c = common(args.table, args.num_tensors, args.numel);
  c.counter = static_cast<unsigned int*>(args.workspace);
  c.partials = args.workspace == nullptr
                   ? nullptr
                   : reinterpret_cast<double*>(static_cast<char*>(args.workspace) + kCounterBytes);
  const bool with_kl =
      args.mode == ForwardMode::kKL || (args.mode == ForwardMode::kSample && args.with_kl);
  if (with_kl) {
    // The counter must start at zero; the last block leaves it at zero again.
    const cudaError_t err = cudaMemsetAsync(args.workspace, 0, kCounterBytes, stream);
    if (err != cudaSuccess) return err;
  }
  switch (args.mode) {
    case ForwardMode::kSample: {
      SampleParams p{};
      p.c = c;
      p.samples = args.samples;
      p.with_kl = with_kl;
      p.out_vec = aligned(args.out, vec_alignment(dtype_size(args.out_dtype)));
      p.out = args.out;
      p.kl = args.kl;
      p.rng_state = args.rng_state;
      p.rng = args.rng;
      dispatch_dtype(args.dtype, [&](auto t_tag) {
        using T = decltype(t_tag);
        dispatch_narrow<T>(args.dtype, args.out_dtype, [&](auto o_tag) {
          using O = decltype(o_tag);
          launch(&sample_forward_kernel<T, O>, c.num_tiles, p, stream);
        });
      });
      break;
    }
    case ForwardMode::kKL: {
      KLParams p{};
      p.c = c;
      p.kl = args.kl;
      dispatch_dtype(args.dtype, [&](auto t_tag) {
        using T = decltype(t_tag);
        launch(&kl_forward_kernel<T>, c.num_tiles, p, stream);
      });
      break;
    }
    case ForwardMode::kVariance: {
      if (c.num_tiles == 0) return cudaSuccess;
      VarianceParams p{};
      p.c = c;
      p.out_vec = aligned(args.out, vec_alignment(dtype_size(args.dtype)));
      p.out = args.out;
      dispatch_dtype(args.dtype, [&](auto t_tag) {
        using T = decltype(t_tag);
        launch(&variance_forward_kernel<T>, c.num_tiles, p, stream);
      });
      break;
    }
  }
  return cudaSuccess;
}

cudaError_t launch_backward(const BackwardArgs& args, cudaStream_t stream) {
  BackwardParams p{};
  p.c = common(args.table, args.num_tensors, args.numel);
  if (p.c.num_tiles == 0) return cudaSuccess;
  p.samples = args.samples;
  p.grad_theta = args.grad_theta;
  p.grad_kl = args.grad_kl;
  p.grad_kl_dtype = static_cast<int32_t>(args.grad_kl_dtype);
  p.with_kl = args.with_kl;
  const DType grad_dtype = args.samples > 0 ? args.grad_dtype : args.dtype;
  p.grad_vec = args.samples > 0 && aligned(args.grad_theta, vec_alignment(dtype_size(grad_dtype)));
  const size_t out_alignment = vec_alignment(dtype_size(args.dtype));
  p.out_vec = aligned(args.grad_mean, out_alignment) && aligned(args.grad_logvar, out_alignment);
  p.rng_state = args.rng_state;
  p.grad_mean = args.grad_mean;
  p.grad_logvar = args.grad_logvar;
  dispatch_dtype(args.dtype, [&](auto t_tag) {
    using T = decltype(t_tag);
    dispatch_narrow<T>(args.dtype, grad_dtype, [&](auto g_tag) {
      using G = decltype(g_tag);
      launch(&backward_kernel<T, G>, p.c.num_tiles, p, stream);
    });
  });
  return cudaSuccess;
}

cudaError_t launch_adam_step(const AdamArgs& args, cudaStream_t stream) {
  AdamParams p{};
  p.c = common(args.table, args.num_tensors, args.numel);
  p.grad = args.grad_theta;
  p.exp_avgs = args.exp_avgs;
  p.exp_avg_sqs = args.exp_avg_sqs;
  p.theta = args.theta;
  p.rng_state = args.rng_state;
  p.next_rng_state = args.next_rng_state;
  p.rng = args.rng;
  p.kl_weight = args.kl_weight;
  const size_t group_alignment = vec_alignment(dtype_size(args.dtype));
  const size_t out_alignment = vec_alignment(dtype_size(args.out_dtype));
  p.flat_vec = args.numel % 4 == 0 && aligned(args.grad_theta, out_alignment) &&
               aligned(args.theta, out_alignment) && aligned(args.exp_avgs, group_alignment) &&
               aligned(args.exp_avg_sqs, group_alignment);
  p.means_f = args.means_f;
  p.logvars_f = args.logvars_f;
  p.means_d = args.means_d;
  p.logvars_d = args.logvars_d;
  // No tile still takes one block: it writes the next key.
  dispatch_dtype(args.dtype, [&](auto t_tag) {
    using T = decltype(t_tag);
    dispatch_narrow<T>(args.dtype, args.out_dtype, [&](auto o_tag) {
      using O = decltype(o_tag);
      launch(&adam_step_kernel<T, O>, p.c.num_tiles, p, stream);
    });
  });
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace fastbnf
