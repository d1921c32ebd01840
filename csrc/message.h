// Error messages built without iostreams.
//
// TORCH_CHECK formats its arguments through std::ostringstream (c10::str). An extension run
// against another libstdc++ than the one it was compiled with (seen on a GPU image) then crashes
// in the stream code instead of raising: a bad input kills the process. These helpers append
// text, integers (std::to_string), doubles (snprintf), shapes, dtypes and devices to a
// std::string, and throw c10 errors that carry the finished string. The formats are Python's
// (shapes as tuples, dtypes as torch.float32), so that the pure-PyTorch backend's messages
// (fastbnf/_contract.py) are the same.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <type_traits>
#include <utility>

namespace fastbnf {
namespace message {

inline void append(std::string& out, const char* text) { out += text; }
inline void append(std::string& out, const std::string& text) { out += text; }

template <typename I, std::enable_if_t<std::is_integral_v<I> && !std::is_same_v<I, bool>, int> = 0>
inline void append(std::string& out, I value) {
  out += std::to_string(value);
}

// Python's format(value, "g").
inline void append(std::string& out, double value) {
  if (std::isnan(value)) {
    out += "nan";
    return;
  }
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%g", value);
  out += buffer;
}

// str(dtype) in Python.
inline void append(std::string& out, at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: out += "torch.float32"; return;
    case at::kDouble: out += "torch.float64"; return;
    case at::kHalf: out += "torch.float16"; return;
    case at::kBFloat16: out += "torch.bfloat16"; return;
    case at::kLong: out += "torch.int64"; return;
    case at::kInt: out += "torch.int32"; return;
    case at::kShort: out += "torch.int16"; return;
    case at::kChar: out += "torch.int8"; return;
    case at::kByte: out += "torch.uint8"; return;
    case at::kBool: out += "torch.bool"; return;
    default:
      out += "torch.";
      out += c10::toString(dtype);
      return;
  }
}

// str(tuple(shape)) in Python: (), (5,), (7, 3).
inline void append(std::string& out, at::IntArrayRef sizes) {
  out += "(";
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (d > 0) out += ", ";
    out += std::to_string(sizes[d]);
  }
  out += sizes.size() == 1 ? ",)" : ")";
}

inline void append(std::string& out, const at::Device& device) { out += device.str(); }

template <typename... Parts>
std::string build(const Parts&... parts) {
  std::string out;
  (append(out, parts), ...);
  return out;
}

}  // namespace message
}  // namespace fastbnf

// Raise a c10 error of the given type (ValueError, TypeError: the Python exception) with a
// message of parts, when cond fails.
#define FASTBNF_CHECK(error, cond, ...)                               \
  do {                                                                \
    if (C10_UNLIKELY(!(cond))) {                                      \
      C10_THROW_ERROR(error, ::fastbnf::message::build(__VA_ARGS__)); \
    }                                                                 \
  } while (false)

#define FASTBNF_CHECK_VALUE(cond, ...) FASTBNF_CHECK(ValueError, cond, __VA_ARGS__)
#define FASTBNF_CHECK_TYPE(cond, ...) FASTBNF_CHECK(TypeError, cond, __VA_ARGS__)
