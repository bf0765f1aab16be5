// Slot assignment on the GPU: one block per expert walks the service order in tiles of
// blockDim.x assignments; a warp ballot plus a prefix over the block's warps gives every
// matching assignment its exclusive running count. Legend: N = T*k assignments, E experts.
#include "common.cuh"
#include "kernels.h"

namespace moe {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__global__ void assign_slots_kernel(const int64_t* __restrict__ experts, const int64_t* __restrict__ order,
                                    const bool* __restrict__ dispatched, int64_t* __restrict__ positions,
                                    int64_t* __restrict__ tokens, int64_t N, int64_t capacity) {
  __shared__ int warp_hits[kThreads / 32];
  const int64_t e = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t seen = 0;  // dispatched assignments of expert e in earlier tiles
  for (int64_t start = 0; start < N; start += kThreads) {
    const int64_t i = start + threadIdx.x;
    int64_t a = -1;
    bool hit = false;
    if (i < N) {
      a = order[i];
      hit = a >= 0 && a < N && dispatched[a] && experts[a] == e;
    }
    const unsigned ballot = __ballot_sync(kFullMask, hit);
    if (lane == 0) warp_hits[warp] = __popc(ballot);
    __syncthreads();
    int64_t pos = seen + __popc(ballot & ((1u << lane) - 1u));
    int64_t tile_hits = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      if (w < warp) pos += warp_hits[w];
      tile_hits += warp_hits[w];
    }
    if (hit && (capacity < 0 || pos < capacity)) positions[a] = pos;
    seen += tile_hits;
    __syncthreads();  // warp_hits is rewritten by the next tile
  }
  if (threadIdx.x == 0) tokens[e] = (capacity >= 0 && seen > capacity) ? capacity : seen;
}

}  // namespace

cudaError_t assign_slots(const int64_t* experts, const int64_t* order, const bool* dispatched, int64_t* positions,
                         int64_t* tokens_per_expert, int64_t N, int64_t num_experts, int64_t capacity,
                         cudaStream_t stream) {
  if (num_experts == 0) return cudaSuccess;
  assign_slots_kernel<<<static_cast<unsigned>(num_experts), kThreads, 0, stream>>>(
      experts, order, dispatched, positions, tokens_per_expert, N, capacity);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace moe
