// Permute (tokens -> expert-major rows) and unpermute (weighted combine) on the GPU, with
// backward kernels. Legend: T tokens, k choices, N rows, D width. Destinations outside
// [0, N) are skipped. 16-bit rows accumulate in fp32, fp64 rows in fp64.
#include "common.cuh"
#include "kernels.h"

namespace moe {
namespace cuda {
namespace {

// One block per assignment (grid-stride); rows moved as words of type V.
template <typename V>
__global__ void permute_rows_kernel(const V* __restrict__ x, const int64_t* __restrict__ dest, V* __restrict__ rows,
                                    int64_t num_assign, int64_t k, int64_t N, int64_t width) {
  for (int64_t a = blockIdx.x; a < num_assign; a += gridDim.x) {
    const int64_t d = dest[a];
    if (d < 0 || d >= N) continue;
    const V* src = x + (a / k) * width;
    V* dst = rows + d * width;
    for (int64_t c = threadIdx.x; c < width; c += blockDim.x) dst[c] = src[c];
  }
}

// out[t] = sum_j (w[t,j] *) src[dest[t,j]]; one block per token (grid-stride).
template <typename T, bool WEIGHTED>
__global__ void gather_sum_kernel(const T* __restrict__ src, const int64_t* __restrict__ dest,
                                  const typename Acc<T>::type* __restrict__ w, T* __restrict__ out, int64_t num_tokens,
                                  int64_t k, int64_t N, int64_t D) {
  using A = typename Acc<T>::type;
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
      A acc = 0;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t d = dest[t * k + j];
        if (d < 0 || d >= N) continue;
        const A v = to_acc(src[d * D + c]);
        acc += WEIGHTED ? w[t * k + j] * v : v;
      }
      out[t * D + c] = from_acc<T>(acc);
    }
  }
}

// One block per assignment: grad_rows[dest] = w * grad_y[t]; grad_w = <grad_y[t], rows[dest]>.
template <typename T>
__global__ void unpermute_backward_kernel(const T* __restrict__ gy, const T* __restrict__ rows,
                                          const int64_t* __restrict__ dest, const typename Acc<T>::type* __restrict__ w,
                                          T* __restrict__ grad_rows, typename Acc<T>::type* __restrict__ grad_w,
                                          int64_t num_assign, int64_t k, int64_t N, int64_t D) {
  using A = typename Acc<T>::type;
  __shared__ A scratch[32];
  for (int64_t a = blockIdx.x; a < num_assign; a += gridDim.x) {
    const int64_t d = dest[a];
    const bool valid = d >= 0 && d < N;
    const T* g = gy + (a / k) * D;
    const A wa = w[a];
    A dot = 0;
    if (valid) {
      for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
        const A gc = to_acc(g[c]);
        if (grad_rows) grad_rows[d * D + c] = from_acc<T>(wa * gc);
        if (grad_w) dot += gc * to_acc(rows[d * D + c]);
      }
    }
    if (grad_w) {
      dot = block_sum(dot, scratch);
      if (threadIdx.x == 0) grad_w[a] = valid ? dot : A(0);
    }
  }
}

int threads_for(int64_t width) {
  int threads = 32;
  while (threads < 256 && threads < width) threads *= 2;
  return threads;
}

template <typename V>
cudaError_t launch_permute(const void* x, const int64_t* dest, void* rows, int64_t T, int64_t k, int64_t N,
                           int64_t row_bytes, cudaStream_t stream) {
  const int64_t width = row_bytes / static_cast<int64_t>(sizeof(V));
  permute_rows_kernel<V><<<grid_for(T * k, 1), threads_for(width), 0, stream>>>(
      static_cast<const V*>(x), dest, static_cast<V*>(rows), T * k, k, N, width);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_gather(const void* src, const int64_t* dest, const void* w, void* out, int64_t num_tokens,
                          int64_t k, int64_t N, int64_t D, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const unsigned grid = grid_for(num_tokens, 1);
  if (w) {
    gather_sum_kernel<T, true><<<grid, threads_for(D), 0, stream>>>(
        static_cast<const T*>(src), dest, static_cast<const A*>(w), static_cast<T*>(out), num_tokens, k, N, D);
  } else {
    gather_sum_kernel<T, false><<<grid, threads_for(D), 0, stream>>>(
        static_cast<const T*>(src), dest, nullptr, static_cast<T*>(out), num_tokens, k, N, D);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_unpermute_backward(const void* gy, const void* rows, const int64_t* dest, const void* w,
                                      void* grad_rows, void* grad_w, int64_t T_, int64_t k, int64_t N, int64_t D,
                                      cudaStream_t stream) {
  using A = typename Acc<T>::type;
  unpermute_backward_kernel<T><<<grid_for(T_ * k, 1), threads_for(D), 0, stream>>>(
      static_cast<const T*>(gy), static_cast<const T*>(rows), dest, static_cast<const A*>(w),
      static_cast<T*>(grad_rows), static_cast<A*>(grad_w), T_ * k, k, N, D);
  return cudaGetLastError();
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace

cudaError_t permute_rows(const void* x, const int64_t* dest, void* rows, int64_t T, int64_t k, int64_t N,
                         int64_t row_bytes, cudaStream_t stream) {
  if (T * k == 0 || row_bytes == 0) return cudaSuccess;
  // The widest word that divides the row and both base addresses.
  auto fits = [&](int64_t b) { return row_bytes % b == 0 && aligned(x, b) && aligned(rows, b); };
  if (fits(16)) return launch_permute<uint4>(x, dest, rows, T, k, N, row_bytes, stream);
  if (fits(8)) return launch_permute<uint2>(x, dest, rows, T, k, N, row_bytes, stream);
  if (fits(4)) return launch_permute<uint32_t>(x, dest, rows, T, k, N, row_bytes, stream);
  if (fits(2)) return launch_permute<uint16_t>(x, dest, rows, T, k, N, row_bytes, stream);
  return launch_permute<uint8_t>(x, dest, rows, T, k, N, row_bytes, stream);
}

cudaError_t gather_sum(DType dtype, const void* src, const int64_t* dest, const void* w, void* out, int64_t T,
                       int64_t k, int64_t N, int64_t D, cudaStream_t stream) {
  if (T == 0 || D == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch_gather<float>(src, dest, w, out, T, k, N, D, stream);
    case DType::kFloat64: return launch_gather<double>(src, dest, w, out, T, k, N, D, stream);
    case DType::kFloat16: return launch_gather<__half>(src, dest, w, out, T, k, N, D, stream);
    case DType::kBFloat16: return launch_gather<__nv_bfloat16>(src, dest, w, out, T, k, N, D, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t unpermute_rows_backward(DType dtype, const void* grad_y, const void* rows, const int64_t* dest,
                                    const void* w, void* grad_rows, void* grad_w, int64_t T, int64_t k, int64_t N,
                                    int64_t D, cudaStream_t stream) {
  if (T * k == 0 || (!grad_rows && !grad_w)) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return launch_unpermute_backward<float>(grad_y, rows, dest, w, grad_rows, grad_w, T, k, N, D, stream);
    case DType::kFloat64:
      return launch_unpermute_backward<double>(grad_y, rows, dest, w, grad_rows, grad_w, T, k, N, D, stream);
    case DType::kFloat16:
      return launch_unpermute_backward<__half>(grad_y, rows, dest, w, grad_rows, grad_w, T, k, N, D, stream);
    case DType::kBFloat16:
      return launch_unpermute_backward<__nv_bfloat16>(grad_y, rows, dest, w, grad_rows, grad_w, T, k, N, D, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace moe
