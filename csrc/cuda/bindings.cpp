// Torch bindings of the MoE CUDA kernels: checks tensors, allocates outputs, launches on the
// current stream. Built only into the CUDA variant of moe._C (see setup.py); the kernels
// themselves (csrc/cuda/*.cu) know nothing about torch.
// Legend: T tokens, k choices per token, E experts, N rows, D width.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <vector>

#include <torch/csrc/utils/pybind.h>

#include "kernels.h"

namespace moe {
namespace {

using at::Tensor;

void check_ok(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor for the cuda backend, got device ", t.device());
}

void check_2d(const Tensor& t, const char* name, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must have shape ", shape, ", got ", t.sizes());
}

cuda::DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, name, " dtype ", t.scalar_type(),
                        " is not allowed; use float32, float64, bfloat16 or float16");
  }
  return cuda::DType::kFloat32;  // unreachable
}

at::ScalarType acc_type(const Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

Tensor f32_or_undefined(const std::optional<Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->to(at::kFloat).contiguous() : Tensor();
}

const float* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

std::vector<Tensor> router_topk_cuda(const Tensor& logits_in, int64_t k, bool sigmoid, bool normalize,
                                     const std::optional<Tensor>& bias_in) {
  check_cuda(logits_in, "logits");
  check_2d(logits_in, "logits", "[T, E]");
  const int64_t T = logits_in.size(0), E = logits_in.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= E, "k=", k, " is not allowed; it must be in [1, ", E, "]");
  c10::cuda::CUDAGuard guard(logits_in.device());
  const Tensor logits = logits_in.to(at::kFloat).contiguous();
  const Tensor bias = f32_or_undefined(bias_in);
  auto f32 = logits.options();
  Tensor weights = at::empty({T, k}, f32), experts = at::empty({T, k}, f32.dtype(at::kLong));
  Tensor scores = at::empty({T, E}, f32), counts = at::zeros({E}, f32.dtype(at::kLong));
  check_ok(cuda::router_topk(logits.data_ptr<float>(), ptr_or_null(bias), weights.data_ptr<float>(),
                             experts.data_ptr<int64_t>(), scores.data_ptr<float>(), counts.data_ptr<int64_t>(), T, E,
                             k, sigmoid, normalize, stream()),
           "router_topk kernel");
  return {weights, experts, scores, counts, scores.sum(0)};
}

Tensor router_topk_backward_cuda(const std::optional<Tensor>& grad_weights, const std::optional<Tensor>& grad_scores,
                                 const std::optional<Tensor>& grad_score_sums, const Tensor& scores_in,
                                 const Tensor& experts_in, bool sigmoid, bool normalize) {
  check_cuda(scores_in, "scores");
  c10::cuda::CUDAGuard guard(scores_in.device());
  const Tensor scores = scores_in.to(at::kFloat).contiguous();
  const Tensor experts = experts_in.to(at::kLong).contiguous();
  const Tensor gw = f32_or_undefined(grad_weights), gs = f32_or_undefined(grad_scores);
  const Tensor gsum = f32_or_undefined(grad_score_sums);
  Tensor grad = at::empty_like(scores);
  check_ok(cuda::router_topk_backward(ptr_or_null(gw), ptr_or_null(gs), ptr_or_null(gsum), scores.data_ptr<float>(),
                                      experts.data_ptr<int64_t>(), grad.data_ptr<float>(), scores.size(0),
                                      scores.size(1), experts.size(1), sigmoid, normalize, stream()),
           "router_topk_backward kernel");
  return grad;
}

std::vector<Tensor> assign_slots_cuda(const Tensor& experts_in, const Tensor& order_in, const Tensor& dispatched_in,
                                      int64_t num_experts, int64_t capacity) {
  check_cuda(experts_in, "experts");
  check_2d(experts_in, "experts", "[T, k]");
  const int64_t N = experts_in.numel();
  TORCH_CHECK_VALUE(order_in.dim() == 1 && order_in.size(0) == N, "order must have shape [T*k] = [", N, "], got ",
                    order_in.sizes());
  TORCH_CHECK_VALUE(dispatched_in.sizes() == experts_in.sizes(), "dispatched must have shape ", experts_in.sizes(),
                    ", got ", dispatched_in.sizes());
  c10::cuda::CUDAGuard guard(experts_in.device());
  const Tensor experts = experts_in.to(at::kLong).contiguous();
  const Tensor order = order_in.to(at::kLong).contiguous();
  const Tensor dispatched = dispatched_in.to(at::kBool).contiguous();
  Tensor positions = at::full(experts.sizes(), -1, experts.options());
  Tensor tokens = at::zeros({num_experts}, experts.options());
  check_ok(cuda::assign_slots(experts.data_ptr<int64_t>(), order.data_ptr<int64_t>(), dispatched.data_ptr<bool>(),
                              positions.data_ptr<int64_t>(), tokens.data_ptr<int64_t>(), N, num_experts, capacity,
                              stream()),
           "assign_slots kernel");
  return {positions, positions.ge(0), tokens};
}

Tensor permute_rows_cuda(const Tensor& x_in, const Tensor& dest_in, int64_t num_rows) {
  check_cuda(x_in, "x");
  check_2d(x_in, "x", "[T, D]");
  check_2d(dest_in, "dest", "[T, k]");
  dtype_of(x_in, "x");
  TORCH_CHECK_VALUE(dest_in.size(0) == x_in.size(0), "dest has ", dest_in.size(0), " tokens but x has ", x_in.size(0));
  c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  const Tensor dest = dest_in.to(at::kLong).contiguous();
  Tensor rows = at::zeros({num_rows, x.size(1)}, x.options());
  check_ok(cuda::permute_rows(x.data_ptr(), dest.data_ptr<int64_t>(), rows.data_ptr(), dest.size(0), dest.size(1),
                              num_rows, x.size(1) * x.element_size(), stream()),
           "permute_rows kernel");
  return rows;
}

Tensor permute_rows_backward_cuda(const Tensor& grad_rows_in, const Tensor& dest_in) {
  check_cuda(grad_rows_in, "grad_rows");
  check_2d(grad_rows_in, "grad_rows", "[N, D]");
  check_2d(dest_in, "dest", "[T, k]");
  c10::cuda::CUDAGuard guard(grad_rows_in.device());
  const Tensor g = grad_rows_in.contiguous();
  const Tensor dest = dest_in.to(at::kLong).contiguous();
  Tensor out = at::empty({dest.size(0), g.size(1)}, g.options());
  check_ok(cuda::gather_sum(dtype_of(g, "grad_rows"), g.data_ptr(), dest.data_ptr<int64_t>(), nullptr,
                            out.data_ptr(), dest.size(0), dest.size(1), g.size(0), g.size(1), stream()),
           "permute_rows_backward kernel");
  return out;
}

Tensor unpermute_rows_cuda(const Tensor& rows_in, const Tensor& dest_in, const Tensor& weights) {
  check_cuda(rows_in, "rows");
  check_2d(rows_in, "rows", "[N, D]");
  check_2d(dest_in, "dest", "[T, k]");
  TORCH_CHECK_VALUE(weights.sizes() == dest_in.sizes(), "weights must have the shape of dest ", dest_in.sizes(),
                    ", got ", weights.sizes());
  c10::cuda::CUDAGuard guard(rows_in.device());
  const Tensor rows = rows_in.contiguous();
  const Tensor dest = dest_in.to(at::kLong).contiguous();
  // The reference casts the weights to the rows dtype before multiplying; so do we.
  const Tensor w = weights.to(rows.scalar_type()).to(acc_type(rows)).contiguous();
  Tensor out = at::empty({dest.size(0), rows.size(1)}, rows.options());
  check_ok(cuda::gather_sum(dtype_of(rows, "rows"), rows.data_ptr(), dest.data_ptr<int64_t>(), w.data_ptr(),
                            out.data_ptr(), dest.size(0), dest.size(1), rows.size(0), rows.size(1), stream()),
           "unpermute_rows kernel");
  return out;
}

std::vector<Tensor> unpermute_rows_backward_cuda(const Tensor& grad_y_in, const Tensor& rows_in, const Tensor& dest_in,
                                                 const Tensor& weights, bool need_rows, bool need_weights) {
  check_cuda(rows_in, "rows");
  check_2d(rows_in, "rows", "[N, D]");
  check_2d(dest_in, "dest", "[T, k]");
  c10::cuda::CUDAGuard guard(rows_in.device());
  const Tensor rows = rows_in.contiguous();
  const Tensor dest = dest_in.to(at::kLong).contiguous();
  const Tensor gy = grad_y_in.to(rows.scalar_type()).contiguous();
  const Tensor w = weights.to(rows.scalar_type()).to(acc_type(rows)).contiguous();
  Tensor grad_rows = need_rows ? at::zeros_like(rows) : Tensor();
  Tensor grad_w = need_weights ? at::empty(dest.sizes(), w.options()) : Tensor();
  check_ok(cuda::unpermute_rows_backward(dtype_of(rows, "rows"), gy.data_ptr(), rows.data_ptr(),
                                         dest.data_ptr<int64_t>(), w.data_ptr(),
                                         need_rows ? grad_rows.data_ptr() : nullptr,
                                         need_weights ? grad_w.data_ptr() : nullptr, dest.size(0), dest.size(1),
                                         rows.size(0), rows.size(1), stream()),
           "unpermute_rows_backward kernel");
  if (need_weights) grad_w = grad_w.to(weights.scalar_type());
  return {grad_rows, grad_w};
}

}  // namespace

void register_cuda_kernels(pybind11::module& m) {
  namespace py = pybind11;
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("router_topk_cuda", &router_topk_cuda, nogil, py::arg("logits"), py::arg("k"), py::arg("sigmoid"),
        py::arg("normalize"), py::arg("bias"));
  m.def("router_topk_backward_cuda", &router_topk_backward_cuda, nogil, py::arg("grad_weights"),
        py::arg("grad_scores"), py::arg("grad_score_sums"), py::arg("scores"), py::arg("experts"), py::arg("sigmoid"),
        py::arg("normalize"));
  m.def("assign_slots_cuda", &assign_slots_cuda, nogil, py::arg("experts"), py::arg("order"), py::arg("dispatched"),
        py::arg("num_experts"), py::arg("capacity"));
  m.def("permute_rows_cuda", &permute_rows_cuda, nogil, py::arg("x"), py::arg("dest"), py::arg("num_rows"));
  m.def("permute_rows_backward_cuda", &permute_rows_backward_cuda, nogil, py::arg("grad_rows"), py::arg("dest"));
  m.def("unpermute_rows_cuda", &unpermute_rows_cuda, nogil, py::arg("rows"), py::arg("dest"), py::arg("weights"));
  m.def("unpermute_rows_backward_cuda", &unpermute_rows_backward_cuda, nogil, py::arg("grad_y"), py::arg("rows"),
        py::arg("dest"), py::arg("weights"), py::arg("need_rows"), py::arg("need_weights"));
}

}  // namespace moe
