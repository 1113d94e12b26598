// Shared helpers of the torch-free native core: dtype codes, pointer casts,
// and argument checks.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "dtypes.h"

namespace fastpt {

namespace py = pybind11;

template <typename T>
inline T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

inline void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

// Calls f(T{}) with T the integer type named by an index dtype code.
template <typename F>
inline void dispatch_index(int code, const char* what, F&& f) {
  switch (code) {
    case kInt32: f(int32_t{}); break;
    case kInt64: f(int64_t{}); break;
    default: throw std::invalid_argument(std::string(what) + ": expected int32 or int64 dtype code, got " + std::to_string(code));
  }
}

// x86-64 wheels are built for the baseline ISA; hot loops get an AVX2 clone
// chosen at load time (32-bit vector multiplies need SSE4.1 or later).
// FASTPT_VECTOR_CLONES_512 adds an AVX-512 (x86-64-v4) clone, for loops that are
// compute-bound in AVX2: the dropout hash + half-float conversions measured 2.3x
// faster with it on Zen 5.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTPT_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#define FASTPT_VECTOR_CLONES_512 __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define FASTPT_VECTOR_CLONES
#define FASTPT_VECTOR_CLONES_512
#endif

// Turns the message of a CUDA launcher (empty on success) into a Python error.
inline void check_cuda(const char* err, const char* op) {
  if (err && err[0]) throw std::runtime_error(std::string(op) + ": CUDA error: " + err);
}

}  // namespace fastpt
