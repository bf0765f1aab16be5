// Python bindings of moe._C: the CPU kernels always, the CUDA kernels when built with them.
// The torch.library custom ops in moe/ops/library.py call these functions.
#include <torch/csrc/utils/pybind.h>

#include "ops.h"

#ifdef MOE_WITH_CUDA
namespace moe {
void register_cuda_kernels(pybind11::module& m);  // csrc/cuda/bindings.cpp
}
#endif

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "MoE kernels: router top-k, slot assignment, permute, unpermute, grouped expert MLP (CPU; CUDA when built)";
  namespace py = pybind11;
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("router_topk_cpu", &moe::router_topk_cpu, nogil, py::arg("logits"), py::arg("k"),
        py::arg("sigmoid"), py::arg("normalize"), py::arg("bias"));
  m.def("router_topk_backward_cpu", &moe::router_topk_backward_cpu, nogil, py::arg("grad_weights"),
        py::arg("grad_scores"), py::arg("grad_score_sums"), py::arg("scores"), py::arg("experts"),
        py::arg("sigmoid"), py::arg("normalize"));
  m.def("assign_slots_cpu", &moe::assign_slots_cpu, nogil, py::arg("experts"), py::arg("order"),
        py::arg("dispatched"), py::arg("num_experts"), py::arg("capacity"));
  m.def("permute_rows_cpu", &moe::permute_rows_cpu, nogil, py::arg("x"), py::arg("dest"), py::arg("num_rows"));
  m.def("permute_rows_backward_cpu", &moe::permute_rows_backward_cpu, nogil, py::arg("grad_rows"),
        py::arg("dest"));
  m.def("unpermute_rows_cpu", &moe::unpermute_rows_cpu, nogil, py::arg("rows"), py::arg("dest"),
        py::arg("weights"));
  m.def("unpermute_rows_backward_cpu", &moe::unpermute_rows_backward_cpu, nogil, py::arg("grad_y"),
        py::arg("rows"), py::arg("dest"), py::arg("weights"), py::arg("need_rows"), py::arg("need_weights"));
  m.def("expert_mlp_forward_cpu", &moe::expert_mlp_forward_cpu, nogil, py::arg("x"), py::arg("counts"),
        py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"), py::arg("activation"), py::arg("row_tile"));
  m.def("expert_mlp_backward_cpu", &moe::expert_mlp_backward_cpu, nogil, py::arg("grad_out"), py::arg("x"),
        py::arg("h"), py::arg("counts"), py::arg("w1"), py::arg("w2"), py::arg("activation"), py::arg("need_x"),
        py::arg("need_w1"), py::arg("need_b1"), py::arg("need_w2"), py::arg("need_b2"), py::arg("row_tile"));
  m.def("expert_mlp_tokens_forward_cpu", &moe::expert_mlp_tokens_forward_cpu, nogil, py::arg("x"), py::arg("dest"),
        py::arg("weights"), py::arg("counts"), py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"),
        py::arg("activation"), py::arg("row_tile"));
  m.def("expert_mlp_tokens_backward_cpu", &moe::expert_mlp_tokens_backward_cpu, nogil, py::arg("grad_y"),
        py::arg("x"), py::arg("h"), py::arg("dest"), py::arg("weights"), py::arg("counts"), py::arg("w1"),
        py::arg("w2"), py::arg("b2"), py::arg("activation"), py::arg("need_x"), py::arg("need_weights"),
        py::arg("need_w1"), py::arg("need_b1"), py::arg("need_w2"), py::arg("need_b2"), py::arg("row_tile"));
#ifdef MOE_WITH_CUDA
  m.attr("has_cuda") = true;
  moe::register_cuda_kernels(m);
#else
  m.attr("has_cuda") = false;
#endif
}
