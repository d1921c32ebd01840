// What every fused CUDA kernel is made of (posterior_kernels.cu, adam_step.cu), device code
// and the host code that launches it: the element types and their conversions, the device policy
// of posterior_math.h, the noise, the walk over a group's tiles and segments, the key of a new
// sample, the dtype dispatch and the grid. Torch-free (nvcc compiles it on any machine).
//
// The kernels are built for memory bandwidth:
// - float arithmetic for float32, float16 and bfloat16 groups (read, compute in float, round
//   once on store), double for float64 groups;
// - a host-built tile map (device_table.h): a tile of kTileElements flat elements is walked
//   tensor by tensor (its segments), so the tensor of an element is never searched for;
// - each thread takes two quads (4 consecutive flat elements) at a time (quads g and g + 256 of
//   the tile), issues all their loads, then draws their noise and does the maths: 16-byte loads
//   and stores for 4-aligned tensors with aligned pointers, a scalar path for the others (a quad
//   that straddles tensors, a tensor that starts at an offset that is not a multiple of 4);
// - the RNG inlined, the grid sized from the SM count and the resident blocks (occupancy API,
//   cached per device and kernel) and grid-striding over the tiles.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <unordered_map>

#include "../common/philox.h"
#include "../common/posterior_math.h"
#include "launch.h"

namespace fastbnf {
namespace cuda {

namespace pm = ::fastbnf::posterior;

inline constexpr int kThreads = 256;
inline constexpr int kWarps = kThreads / 32;
static_assert(kTileElements == int64_t{kThreads} * 2 * 4 * 2, "a tile is 2 rounds of 2 quads");
static_assert(kTileElements % 4 == 0, "tiles hold whole quads");

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

// ---------------------------------------------------------------------------------------------
// Noise

// eps of the flat sample indices j .. j + 3 for j % 4 == 0: one Philox block.
__device__ __forceinline__ void eps4_aligned(uint64_t j, uint64_t key, uint64_t offset,
                                             float e[4]) {
  normal4(philox_block(j >> 2, key, offset), e);
}

// eps of j .. j + 3 for any j (rows k > 0 start mid block when N % 4 != 0, and so do the Adam
// step's shards at noise offsets that are not multiples of 4: two blocks).
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

// eps of the flat sample index j alone (one block, its lane j % 4).
__device__ __forceinline__ float eps1(uint64_t j, uint64_t key, uint64_t offset) {
  float a[4];
  normal4(philox_block(j >> 2, key, offset), a);
  const unsigned r = static_cast<unsigned>(j & 3);
  return r == 0 ? a[0] : (r == 1 ? a[1] : (r == 2 ? a[2] : a[3]));
}

// ---------------------------------------------------------------------------------------------
// Tiles and segments

// A tensor as one segment of a tile reads it: its pointers rebased to the tile's first element
// (so that a quad's address is base + 4 * g, a 32-bit offset), its end in the tile.
template <typename T>
struct Seg {
  const T* mean;
  const T* logvar;
  const T* prior_mean;  // null: the prior mean is 0
  typename Traits<T>::S inv_var, log_var_m1;
  // DeviceTensor's noise_shift. Only the Adam step reads it: in the sampling kernels it is
  // dead code, which costs them no register.
  int64_t noise_shift;
};

template <typename T>
__device__ __forceinline__ Seg<T> rebase(const DeviceTensor* d, int64_t ts) {
  using S = typename Traits<T>::S;
  const int64_t shift = ts - d->begin;  // may be negative: the tensor starts inside the tile
  const T* prior = static_cast<const T*>(d->prior_mean);
  Seg<T> s;
  s.mean = static_cast<const T*>(d->mean) + shift;
  s.logvar = static_cast<const T*>(d->logvar) + shift;
  s.prior_mean = prior == nullptr ? nullptr : prior + shift;
  s.inv_var = static_cast<S>(d->inv_prior_var);
  s.log_var_m1 = static_cast<S>(d->log_prior_var_m1);
  s.noise_shift = d->noise_shift;
  return s;
}

// Walks this block's tiles, tensor by tensor. In each segment (the part of a tensor inside the
// tile) the thread takes the quads (4 flat elements) whose first element lies in it, two at a
// time: g and g + 256 (g counted from the tile's first element), with g % 256 == threadIdx.x,
// so that every thread has work whatever the sizes of the tensors. pair(seg, g, has2, ts) takes
// the two quads when they lie whole in a vector-readable tensor; slow(t, i0) takes the quad of
// flat elements i0 .. i0 + 3 element by element (it may straddle tensors, or end the group);
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

// The key of a sample: the salted seed that rng_state records, its Philox key, the offset.
struct Key {
  uint64_t salted_seed, key, offset;
};

__device__ __forceinline__ Key unpack_key(const PhiloxArgs& rng) {
  // at::cuda::philox::unpack: under graph capture the seed and offset are read from device
  // memory that each replay updates.
  uint64_t seed = rng.seed, offset = rng.offset;
  if (rng.captured) {
    seed = static_cast<uint64_t>(*rng.seed_ptr);
    offset = static_cast<uint64_t>(*rng.offset_ptr) + rng.offset_intragraph;
  }
  const uint64_t salted_seed = fold_salt(seed, rng.salt);
  return Key{salted_seed, philox_key(salted_seed), offset};
}

// ---------------------------------------------------------------------------------------------
// Kernel parameters and the slow path's elements

struct Common {
  const DeviceTensor* tensors;
  const int32_t* tile_first;
  int64_t numel;
  int64_t num_tiles;
  double* partials;
  unsigned int* counter;
};

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

// ---------------------------------------------------------------------------------------------
// Host side: the dtype dispatch, the grid and the launch

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

// The grid: every SM filled with as many blocks as can be resident (the occupancy API, cached
// per device and kernel), no more blocks than tiles.
inline unsigned grid_size(const void* kernel, int64_t tiles) {
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

inline size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat64: return 8;
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    default: return 4;
  }
}

inline Common common(const void* table, int64_t num_tensors, int64_t numel) {
  Common c{};
  c.tensors = static_cast<const DeviceTensor*>(table);
  c.tile_first = reinterpret_cast<const int32_t*>(static_cast<const char*>(table) +
                                                  tensors_bytes(num_tensors));
  c.numel = numel;
  c.num_tiles = num_tiles(numel);
  return c;
}

}  // namespace cuda
}  // namespace fastbnf
