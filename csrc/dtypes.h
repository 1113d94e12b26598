// Dtype codes passed from Python (python/fastpt/_native.py keeps the same
// table). No pybind11 or torch here, so CUDA sources include it too.
#pragma once

namespace fastpt {

enum DType : int { kInt32 = 0, kInt64 = 1, kUInt8 = 2, kInt16 = 3, kFloat32 = 4, kFloat16 = 5, kBFloat16 = 6, kFloat64 = 7 };

}  // namespace fastpt
