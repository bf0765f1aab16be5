// Slot assignment on CPU: one sequential scan over the assignments in service order
// (O(N), far cheaper than the row copies around it). Legend: T tokens, k choices,
// N = T*k assignments, E experts.
#include "common.h"
#include "ops.h"

namespace moe {

std::vector<at::Tensor> assign_slots_cpu(const at::Tensor& experts_in, const at::Tensor& order_in,
                                         const at::Tensor& dispatched_in, int64_t num_experts,
                                         int64_t capacity) {
  check_cpu(experts_in, "experts");
  check_cpu(order_in, "order");
  check_cpu(dispatched_in, "dispatched");
  check_dim(experts_in, 2, "experts", "[T, k]");
  TORCH_CHECK_VALUE(num_experts >= 1, "num_experts=", num_experts, " is not allowed; it must be >= 1");
  const int64_t T = experts_in.size(0), k = experts_in.size(1), N = T * k;
  TORCH_CHECK_VALUE(order_in.dim() == 1 && order_in.size(0) == N, "order must have shape [T*k] = [", N,
                    "], got ", order_in.sizes());
  TORCH_CHECK_VALUE(dispatched_in.sizes() == experts_in.sizes(), "dispatched must have shape ",
                    experts_in.sizes(), ", got ", dispatched_in.sizes());
  const at::Tensor experts = experts_in.to(at::kLong).contiguous();
  const at::Tensor order = order_in.to(at::kLong).contiguous();
  const at::Tensor dispatched = dispatched_in.to(at::kBool).contiguous();
  auto opts = experts.options();
  at::Tensor positions = at::full({T, k}, -1, opts);
  at::Tensor tokens = at::zeros({num_experts}, opts);
  const int64_t* ep = experts.data_ptr<int64_t>();
  const int64_t* op = order.data_ptr<int64_t>();
  const bool* dp = dispatched.data_ptr<bool>();
  int64_t* pp = positions.data_ptr<int64_t>();
  int64_t* seen = tokens.data_ptr<int64_t>();  // dispatched assignments seen per expert so far

  for (int64_t i = 0; i < N; ++i) {
    const int64_t a = op[i];
    TORCH_CHECK_VALUE(a >= 0 && a < N, "order[", i, "]=", a, " is out of range; allowed: [0, ", N, ")");
    if (!dp[a]) continue;
    const int64_t e = ep[a];
    TORCH_CHECK_VALUE(e >= 0 && e < num_experts, "experts value ", e, " at flat assignment ", a,
                      " is out of range; allowed: [0, ", num_experts, ")");
    const int64_t pos = seen[e]++;
    if (capacity < 0 || pos < capacity) pp[a] = pos;
  }
  if (capacity >= 0) {
    for (int64_t e = 0; e < num_experts; ++e) seen[e] = std::min(seen[e], capacity);
  }
  at::Tensor kept = positions.ge(0);
  return {positions, kept, tokens};
}

}  // namespace moe
