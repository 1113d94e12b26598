// pybind11 side of the CUDA attention kernels (kernels/attention*.cu): the
// AttentionParams block, always bound so that the module has the same layout
// with or without CUDA, and the launchers when the build has them. Filled and
// called by python/fastpt/ops/attention_cuda.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "attention.h"
#include "common.h"

namespace fastpt {

void bind_attention(py::module_& m) {
  py::class_<AttentionParams>(m, "AttentionParams")
      .def(py::init<>())
      .def_readwrite("q", &AttentionParams::q)
      .def_readwrite("k", &AttentionParams::k)
      .def_readwrite("v", &AttentionParams::v)
      .def_readwrite("out", &AttentionParams::out)
      .def_readwrite("lse", &AttentionParams::lse)
      .def_readwrite("dout", &AttentionParams::dout)
      .def_readwrite("dq", &AttentionParams::dq)
      .def_readwrite("dk", &AttentionParams::dk)
      .def_readwrite("dv", &AttentionParams::dv)
      .def_readwrite("delta", &AttentionParams::delta)
      .def_readwrite("docs", &AttentionParams::docs)
      .def_readwrite("q_sb", &AttentionParams::q_sb)
      .def_readwrite("q_ss", &AttentionParams::q_ss)
      .def_readwrite("q_sh", &AttentionParams::q_sh)
      .def_readwrite("k_sb", &AttentionParams::k_sb)
      .def_readwrite("k_ss", &AttentionParams::k_ss)
      .def_readwrite("k_sh", &AttentionParams::k_sh)
      .def_readwrite("v_sb", &AttentionParams::v_sb)
      .def_readwrite("v_ss", &AttentionParams::v_ss)
      .def_readwrite("v_sh", &AttentionParams::v_sh)
      .def_readwrite("o_sb", &AttentionParams::o_sb)
      .def_readwrite("o_ss", &AttentionParams::o_ss)
      .def_readwrite("o_sh", &AttentionParams::o_sh)
      .def_readwrite("do_sb", &AttentionParams::do_sb)
      .def_readwrite("do_ss", &AttentionParams::do_ss)
      .def_readwrite("do_sh", &AttentionParams::do_sh)
      .def_readwrite("dq_sb", &AttentionParams::dq_sb)
      .def_readwrite("dq_ss", &AttentionParams::dq_ss)
      .def_readwrite("dq_sh", &AttentionParams::dq_sh)
      .def_readwrite("dk_sb", &AttentionParams::dk_sb)
      .def_readwrite("dk_ss", &AttentionParams::dk_ss)
      .def_readwrite("dk_sh", &AttentionParams::dk_sh)
      .def_readwrite("dv_sb", &AttentionParams::dv_sb)
      .def_readwrite("dv_ss", &AttentionParams::dv_ss)
      .def_readwrite("dv_sh", &AttentionParams::dv_sh)
      .def_readwrite("B", &AttentionParams::B)
      .def_readwrite("Sq", &AttentionParams::Sq)
      .def_readwrite("Sk", &AttentionParams::Sk)
      .def_readwrite("H", &AttentionParams::H)
      .def_readwrite("Hk", &AttentionParams::Hk)
      .def_readwrite("D", &AttentionParams::D)
      .def_readwrite("num_docs", &AttentionParams::num_docs)
      .def_readwrite("max_len", &AttentionParams::max_len)
      .def_readwrite("scale", &AttentionParams::scale)
      .def_readwrite("dropout_threshold24", &AttentionParams::dropout_threshold24)
      .def_readwrite("dropout_key", &AttentionParams::dropout_key)
      .def_readwrite("keep_scale", &AttentionParams::keep_scale)
      .def_readwrite("dtype", &AttentionParams::dtype)
      .def_readwrite("flags", &AttentionParams::flags);
  m.attr("ATTN_CAUSAL_ANY") = static_cast<int>(kAttnCausalAny);
#if defined(FASTPT_WITH_CUDA)
  // The launches are asynchronous and only read the struct, so the GIL is not
  // released: the call returns as soon as the kernels are queued.
  m.def(
      "attention_fwd_cuda",
      [](const AttentionParams& p, uintptr_t stream) { check_cuda(attention_fwd_cuda(p, stream), "attention forward"); },
      py::arg("params"), py::arg("stream"));
  m.def(
      "attention_bwd_cuda",
      [](const AttentionParams& p, uintptr_t stream) { check_cuda(attention_bwd_cuda(p, stream), "attention backward"); },
      py::arg("params"), py::arg("stream"));
  m.def("attention_cuda_head_dims", [] {
    std::vector<int> dims(static_cast<size_t>(attention_cuda_head_dims(nullptr, 0)));
    attention_cuda_head_dims(dims.data(), static_cast<int>(dims.size()));
    return dims;
  });
#endif
}

}  // namespace fastpt
