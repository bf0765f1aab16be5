// Shared checks and helpers of the CPU kernels. Legend: T tokens, k choices, N rows, D width.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

namespace moe {

// Rows per parallel chunk so that one chunk moves roughly 32K elements.
inline int64_t row_grain(int64_t width) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, width));
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor for the cpp backend, got device ",
                    t.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must have shape ", shape, ", got ", t.sizes());
}

inline void check_float(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf, name,
                    " dtype ", s, " is not allowed; use float32, float64, bfloat16 or float16");
}

inline void check_dest(const at::Tensor& dest, int64_t num_tokens) {
  check_cpu(dest, "dest");
  check_dim(dest, 2, "dest", "[T, k]");
  TORCH_CHECK_VALUE(dest.scalar_type() == at::kLong, "dest dtype ", dest.scalar_type(),
                    " is not allowed; use int64");
  TORCH_CHECK_VALUE(dest.size(0) == num_tokens, "dest has ", dest.size(0), " tokens but the data has ",
                    num_tokens);
}

// The assignment (flat index t*k+j) that lands in each of the N rows, or -1. Checks every
// destination is in [-1, N) and, when unique is set, that no row is named twice.
inline std::vector<int64_t> row_sources(const int64_t* dest, int64_t num_assign, int64_t num_rows,
                                        bool unique) {
  std::vector<int64_t> src(num_rows, -1);
  for (int64_t a = 0; a < num_assign; ++a) {
    const int64_t d = dest[a];
    if (d < 0) continue;
    TORCH_CHECK_VALUE(d < num_rows, "dest value ", d, " at flat assignment ", a,
                      " is out of range; allowed: -1 or [0, ", num_rows, ")");
    TORCH_CHECK_VALUE(!unique || src[d] < 0, "dest names row ", d, " twice (assignments ", src[d],
                      " and ", a, "); every row may receive at most one assignment");
    src[d] = a;
  }
  return src;
}

// Checks every destination is in [-1, N) without building the inverse map.
inline void check_dest_range(const int64_t* dest, int64_t num_assign, int64_t num_rows) {
  for (int64_t a = 0; a < num_assign; ++a) {
    TORCH_CHECK_VALUE(dest[a] < num_rows, "dest value ", dest[a], " at flat assignment ", a,
                      " is out of range; allowed: -1 or [0, ", num_rows, ")");
  }
}

}  // namespace moe
