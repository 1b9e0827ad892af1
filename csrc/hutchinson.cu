// Hutchinson probes and the fused probe·(J·probe) reduction (see hutchinson.h). Torch-free.
#include "hutchinson.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace flowkern {
namespace {

template <typename T>
__device__ inline float to_float(T v);
template <>
__device__ inline float to_float<float>(float v) { return v; }
template <>
__device__ inline float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ inline float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ inline T from_float(float v);
template <>
__device__ inline float from_float<float>(float v) { return v; }
template <>
__device__ inline __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// One thread per (row, counter): writes the (up to) four elements of that counter.
template <typename T>
__global__ void hutchinson_probes_kernel(T* __restrict__ out, int64_t batch, int64_t dim, int64_t n_counters,
                                         int64_t total, uint64_t seed, uint32_t stream, int distribution) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = t / n_counters, counter = t % n_counters;
    const uint32_t sample = static_cast<uint32_t>(row % batch), probe = static_cast<uint32_t>(row / batch);
    float z[4];
    hutchinson_probe4(seed, stream, sample, probe, static_cast<uint32_t>(counter), distribution, z);
    T* dst = out + row * dim;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = counter * 4 + j;
      if (i < dim) dst[i] = from_float<T>(z[j]);
    }
  }
}

// One warp per (row, chunk of kReduceCountersPerWarp counters); lanes stride over counters, then a shuffle reduction.
template <typename T>
__global__ void hutchinson_reduce_kernel(const T* __restrict__ jz, float* __restrict__ partial, int64_t batch,
                                         int64_t dim, int64_t n_counters, int64_t n_chunks, int64_t n_warps,
                                         uint64_t seed, uint32_t stream, int distribution) {
  const int64_t warp = blockIdx.x * static_cast<int64_t>(kReduceWarpsPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= n_warps) return;  // whole warps exit together: the shuffles below stay full-warp
  const int64_t row = warp / n_chunks, chunk = warp % n_chunks;
  const uint32_t sample = static_cast<uint32_t>(row % batch), probe = static_cast<uint32_t>(row / batch);
  const T* src = jz + row * dim;
  float acc = 0.0f;
  const int64_t first = chunk * kReduceCountersPerWarp;
#pragma unroll
  for (int c = 0; c < kReduceCountersPerLane; ++c) {
    const int64_t counter = first + c * 32 + lane;
    if (counter < n_counters) {
      float z[4];
      hutchinson_probe4(seed, stream, sample, probe, static_cast<uint32_t>(counter), distribution, z);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t i = counter * 4 + j;
        if (i < dim) acc += z[j] * to_float<T>(src[i]);
      }
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xFFFFFFFFu, acc, offset);
  if (lane == 0) partial[row * n_chunks + chunk] = acc;
}

int blocks_for(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<int>(blocks < 65535 * 32 ? blocks : 65535 * 32);  // grid-stride loop covers the rest
}

template <typename T>
cudaError_t launch_probes(void* out, int64_t probes, int64_t batch, int64_t dim, uint64_t seed, uint32_t stream,
                          int distribution, cudaStream_t s) {
  const int64_t n_counters = hutchinson_counters(dim), total = probes * batch * n_counters;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  hutchinson_probes_kernel<T><<<blocks_for(total, threads), threads, 0, s>>>(
      static_cast<T*>(out), batch, dim, n_counters, total, seed, stream, distribution);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_reduce(const void* jz, float* partial, int64_t probes, int64_t batch, int64_t dim, uint64_t seed,
                          uint32_t stream, int distribution, cudaStream_t s) {
  const int64_t n_counters = hutchinson_counters(dim), n_chunks = hutchinson_reduce_chunks(dim);
  const int64_t n_warps = probes * batch * n_chunks;
  if (n_warps == 0) return cudaSuccess;
  const int64_t blocks = (n_warps + kReduceWarpsPerBlock - 1) / kReduceWarpsPerBlock;
  if (blocks > 0x7FFFFFFF) return cudaErrorInvalidValue;
  hutchinson_reduce_kernel<T><<<static_cast<unsigned>(blocks), 32 * kReduceWarpsPerBlock, 0, s>>>(
      static_cast<const T*>(jz), partial, batch, dim, n_counters, n_chunks, n_warps, seed, stream, distribution);
  return cudaGetLastError();
}

}  // namespace

cudaError_t hutchinson_probes(void* out, int dtype, int64_t probes, int64_t batch, int64_t dim, uint64_t seed,
                              uint32_t stream, int distribution, cudaStream_t cuda_stream) {
  switch (dtype) {
    case kFloat32: return launch_probes<float>(out, probes, batch, dim, seed, stream, distribution, cuda_stream);
    case kFloat16: return launch_probes<__half>(out, probes, batch, dim, seed, stream, distribution, cuda_stream);
    case kBFloat16:
      return launch_probes<__nv_bfloat16>(out, probes, batch, dim, seed, stream, distribution, cuda_stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t hutchinson_reduce_partials(const void* jz, int dtype, float* partial, int64_t probes, int64_t batch,
                                       int64_t dim, uint64_t seed, uint32_t stream, int distribution,
                                       cudaStream_t cuda_stream) {
  switch (dtype) {
    case kFloat32:
      return launch_reduce<float>(jz, partial, probes, batch, dim, seed, stream, distribution, cuda_stream);
    case kFloat16:
      return launch_reduce<__half>(jz, partial, probes, batch, dim, seed, stream, distribution, cuda_stream);
    case kBFloat16:
      return launch_reduce<__nv_bfloat16>(jz, partial, probes, batch, dim, seed, stream, distribution, cuda_stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace flowkern
