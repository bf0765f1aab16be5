// Permute (tokens -> expert-major rows) and unpermute (weighted combine back to tokens)
// on CPU, with their backward kernels. Legend: T tokens, k choices, N rows, D width.
// Reduced-precision inputs (bf16, fp16) accumulate in fp32; fp64 stays in fp64.
#include "common.h"
#include "ops.h"

#include <cstring>

namespace moe {
namespace {

// sum_c a[c] * b[c] in acc_t, with eight independent partial sums so the compiler can
// vectorise the reduction without reassociating floating point on its own.
template <typename scalar_t, typename acc_t>
inline acc_t dot_row(const scalar_t* a, const scalar_t* b, int64_t D) {
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= D; c += 8) {
    for (int l = 0; l < 8; ++l) part[l] += static_cast<acc_t>(a[c + l]) * static_cast<acc_t>(b[c + l]);
  }
  acc_t dot = 0;
  for (; c < D; ++c) dot += static_cast<acc_t>(a[c]) * static_cast<acc_t>(b[c]);
  for (int l = 0; l < 8; ++l) dot += part[l];
  return dot;
}

// out[t] = sum_j w[t, j] * rows[dest[t, j]] over each token's valid (>= 0) destinations,
// accumulated in acc_t; without kWeighted every w[t, j] is 1 and wp is not read.
template <typename scalar_t, typename acc_t, bool kWeighted>
inline void combine_rows(const scalar_t* rows, const int64_t* dp, const acc_t* wp, scalar_t* out, int64_t T,
                         int64_t k, int64_t D) {
  at::parallel_for(0, T, row_grain(D * k), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(D);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t d = dp[t * k + j];
        if (d < 0) continue;
        const scalar_t* row = rows + d * D;
        if constexpr (kWeighted) {
          const acc_t wj = wp[t * k + j];
          for (int64_t c = 0; c < D; ++c) acc[c] += wj * static_cast<acc_t>(row[c]);
        } else {
          for (int64_t c = 0; c < D; ++c) acc[c] += static_cast<acc_t>(row[c]);
        }
      }
      scalar_t* o = out + t * D;
      for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

// rows[N, D] a floating CPU tensor called name, dest[T, k] a CPU destination map.
inline void check_rows_dest(const at::Tensor& rows, const char* name, const at::Tensor& dest) {
  check_cpu(rows, name);
  check_dim(rows, 2, name, "[N, D]");
  check_float(rows, name);
  check_cpu(dest, "dest");
  check_dim(dest, 2, "dest", "[T, k]");
  check_dest(dest, dest.size(0));
}

}  // namespace

at::Tensor permute_rows_cpu(const at::Tensor& x_in, const at::Tensor& dest_in, int64_t num_rows) {
  check_cpu(x_in, "x");
  check_dim(x_in, 2, "x", "[T, D]");
  check_float(x_in, "x");
  check_dest(dest_in, x_in.size(0));
  TORCH_CHECK_VALUE(num_rows >= 0, "num_rows=", num_rows, " is not allowed; it must be >= 0");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dest = dest_in.contiguous();
  const int64_t k = dest.size(1), D = x.size(1);
  const std::vector<int64_t> src = row_sources(dest.data_ptr<int64_t>(), dest.numel(), num_rows, true);
  at::Tensor rows = at::empty({num_rows, D}, x.options());
  const size_t row_bytes = static_cast<size_t>(D) * x.element_size();
  const char* xp = static_cast<const char*>(x.data_ptr());
  char* rp = static_cast<char*>(rows.data_ptr());
  // A pure gather: every row is either a copy of its token or zero, written once.
  at::parallel_for(0, num_rows, row_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (src[r] >= 0) {
        std::memcpy(rp + r * row_bytes, xp + (src[r] / k) * row_bytes, row_bytes);
      } else {
        std::memset(rp + r * row_bytes, 0, row_bytes);
      }
    }
  });
  return rows;
}

at::Tensor permute_rows_backward_cpu(const at::Tensor& grad_rows_in, const at::Tensor& dest_in) {
  check_rows_dest(grad_rows_in, "grad_rows", dest_in);
  const at::Tensor g = grad_rows_in.contiguous();
  const at::Tensor dest = dest_in.contiguous();
  const int64_t T = dest.size(0), k = dest.size(1), N = g.size(0), D = g.size(1);
  const int64_t* dp = dest.data_ptr<int64_t>();
  check_dest_range(dp, T * k, N);
  at::Tensor grad_x = at::empty({T, D}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "permute_rows_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    combine_rows<scalar_t, acc_t, false>(g.data_ptr<scalar_t>(), dp, nullptr, grad_x.data_ptr<scalar_t>(), T, k, D);
  });
  return grad_x;
}

at::Tensor unpermute_rows_cpu(const at::Tensor& rows_in, const at::Tensor& dest_in,
                              const at::Tensor& weights_in) {
  check_rows_dest(rows_in, "rows", dest_in);
  check_cpu(weights_in, "weights");
  TORCH_CHECK_VALUE(weights_in.sizes() == dest_in.sizes(), "weights must have the shape of dest ",
                    dest_in.sizes(), ", got ", weights_in.sizes());
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor dest = dest_in.contiguous();
  const int64_t T = dest.size(0), k = dest.size(1), N = rows.size(0), D = rows.size(1);
  const int64_t* dp = dest.data_ptr<int64_t>();
  check_dest_range(dp, T * k, N);
  // The reference casts the weights to the rows dtype before multiplying; so do we.
  const auto acc_type = at::toOpMathType(rows.scalar_type());
  const at::Tensor w = weights_in.to(rows.scalar_type()).to(acc_type).contiguous();
  at::Tensor y = at::empty({T, D}, rows.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "unpermute_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    combine_rows<scalar_t, acc_t, true>(rows.data_ptr<scalar_t>(), dp, w.data_ptr<acc_t>(), y.data_ptr<scalar_t>(), T,
                                        k, D);
  });
  return y;
}

std::vector<at::Tensor> unpermute_rows_backward_cpu(const at::Tensor& grad_y_in, const at::Tensor& rows_in,
                                                    const at::Tensor& dest_in, const at::Tensor& weights_in,
                                                    bool need_rows, bool need_weights) {
  check_cpu(grad_y_in, "grad_y");
  check_rows_dest(rows_in, "rows", dest_in);
  const at::Tensor dest = dest_in.contiguous();
  const int64_t T = dest.size(0), k = dest.size(1), N = rows_in.size(0), D = rows_in.size(1);
  TORCH_CHECK_VALUE(grad_y_in.dim() == 2 && grad_y_in.size(0) == T && grad_y_in.size(1) == D,
                    "grad_y must have shape [T, D] = [", T, ", ", D, "], got ", grad_y_in.sizes());
  const int64_t* dp = dest.data_ptr<int64_t>();
  const at::Tensor gy = grad_y_in.to(rows_in.scalar_type()).contiguous();
  const auto acc_type = at::toOpMathType(rows_in.scalar_type());
  const at::Tensor w = weights_in.to(rows_in.scalar_type()).to(acc_type).contiguous();
  at::Tensor grad_rows, grad_w;
  if (need_rows) {
    const std::vector<int64_t> src = row_sources(dp, T * k, N, true);
    grad_rows = at::empty({N, D}, rows_in.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows_in.scalar_type(), "unpermute_grad_rows", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gp = gy.data_ptr<scalar_t>();
      const acc_t* wp = w.data_ptr<acc_t>();
      scalar_t* out = grad_rows.data_ptr<scalar_t>();
      at::parallel_for(0, N, row_grain(D), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          scalar_t* o = out + r * D;
          const int64_t a = src[r];
          if (a < 0) {
            std::memset(o, 0, sizeof(scalar_t) * D);
            continue;
          }
          const acc_t wa = wp[a];
          const scalar_t* g = gp + (a / k) * D;
          for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(wa * static_cast<acc_t>(g[c]));
        }
      });
    });
  } else {
    check_dest_range(dp, T * k, N);
  }
  if (need_weights) {
    const at::Tensor rows = rows_in.contiguous();
    at::Tensor gw_acc = at::empty({T, k}, w.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "unpermute_grad_weights", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gp = gy.data_ptr<scalar_t>();
      const scalar_t* rp = rows.data_ptr<scalar_t>();
      acc_t* out = gw_acc.data_ptr<acc_t>();
      at::parallel_for(0, T, row_grain(D * k), [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const scalar_t* g = gp + t * D;
          for (int64_t j = 0; j < k; ++j) {
            const int64_t d = dp[t * k + j];
            out[t * k + j] = d >= 0 ? dot_row<scalar_t, acc_t>(g, rp + d * D, D) : acc_t(0);
          }
        }
      });
    });
    grad_w = gw_acc.to(weights_in.scalar_type());
  }
  return {grad_rows, grad_w};
}

}  // namespace moe
