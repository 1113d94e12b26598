// pybind11 entry point of fastpt._C. Everything crosses as integers (data
// pointers, sizes, dtype codes, streams): no torch headers, one binary for
// every torch version. The Python layer (python/fastpt/ops/*) validates first.
// Each op family registers its own functions (bind_* in csrc/<op>_cpu.cpp).
#include <pybind11/pybind11.h>

#include <string>

#include "common.h"

namespace fastpt {
void bind_mlm_mask(py::module_& m);
void bind_random_masking(py::module_& m);
void bind_span_corrupt(py::module_& m);
void bind_contrastive(py::module_& m);
void bind_attention(py::module_& m);
void bind_dropout(py::module_& m);
void bind_cross_entropy(py::module_& m);
}  // namespace fastpt

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict d;
#ifdef FASTPT_VERSION
  d["version"] = FASTPT_VERSION;
#endif
  d["threads"] = "fastpt pool";
#if defined(FASTPT_WITH_CUDA)
  d["cuda"] = true;
  d["cuda_version"] = FASTPT_CUDA_VERSION;
  d["cuda_archs"] = FASTPT_CUDA_ARCHS;
#else
  d["cuda"] = false;
#endif
  d["compiler"] = std::string(__VERSION__);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastpt native core (torch-free): CPU kernels and, when built, CUDA kernels";
  m.def("build_info", &build_info);
  fastpt::bind_mlm_mask(m);
  fastpt::bind_random_masking(m);
  fastpt::bind_span_corrupt(m);
  fastpt::bind_contrastive(m);
  fastpt::bind_attention(m);
  fastpt::bind_dropout(m);
  fastpt::bind_cross_entropy(m);
}
