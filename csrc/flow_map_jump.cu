// Flow-map jump (see flow_map_jump.h and kernels/flow_map.py for the maths):
//   h_b = s_b - t_b,   y[b, f] = x[b, f] + h_b * u[b, f],   l'[b] = l[b] + h_b * D[b]   (float32 maths)
// One grid-stride loop over the batch*features elements (flat index i -> b = i / features, f = i % features: small
// feature sizes, 2-D toys, keep every thread busy), then one over the batch rows for the log-density. The flat index
// is 32-bit when it cannot overflow (integer division is far cheaper), else 64-bit. Each element is read and written
// by one thread, so y may alias x (in place).
#include "flow_map_jump.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace flowkern {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

template <typename T>
__device__ __forceinline__ float load_float(const T* p);
template <>
__device__ __forceinline__ float load_float<float>(const float* p) { return *p; }
template <>
__device__ __forceinline__ float load_float<__half>(const __half* p) { return __half2float(*p); }
template <>
__device__ __forceinline__ float load_float<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }

template <typename T>
__device__ __forceinline__ void store_float(T* p, float v);
template <>
__device__ __forceinline__ void store_float<float>(float* p, float v) { *p = v; }
template <>
__device__ __forceinline__ void store_float<__half>(__half* p, float v) { *p = __float2half_rn(v); }
template <>
__device__ __forceinline__ void store_float<__nv_bfloat16>(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// No __restrict__ on x / y (or logp / logp_out): they may alias (in place).
template <typename T, typename Index>
__global__ void flow_map_jump_kernel(const T* x, const T* __restrict__ u, const float* __restrict__ t,
                                     const float* __restrict__ s, T* y, int64_t batch, int64_t features,
                                     int64_t stride_xb, int64_t stride_ub, int64_t stride_yb, int64_t stride_t,
                                     int64_t stride_s, bool has_logp, const float* logp,
                                     const float* __restrict__ div, float* logp_out, int64_t stride_lp,
                                     int64_t stride_div, int64_t stride_lpo) {
  const Index start = static_cast<Index>(blockIdx.x) * static_cast<Index>(blockDim.x) + static_cast<Index>(threadIdx.x);
  const Index step = static_cast<Index>(gridDim.x) * static_cast<Index>(blockDim.x);
  const Index n = static_cast<Index>(batch * features);
  const Index nf = static_cast<Index>(features);
  for (Index i = start; i < n; i += step) {
    const int64_t b = static_cast<int64_t>(i / nf);
    const int64_t f = static_cast<int64_t>(i - static_cast<Index>(b) * nf);
    const float h = s[b * stride_s] - t[b * stride_t];
    const float xv = load_float<T>(x + b * stride_xb + f);
    const float uv = load_float<T>(u + b * stride_ub + f);
    store_float<T>(y + b * stride_yb + f, xv + h * uv);
  }
  if (has_logp) {
    for (int64_t b = start; b < batch; b += step) {
      const float h = s[b * stride_s] - t[b * stride_t];
      logp_out[b * stride_lpo] = logp[b * stride_lp] + h * div[b * stride_div];
    }
  }
}

template <typename T>
cudaError_t launch_typed(const void* x, const void* u, const float* t, const float* s, void* y, int64_t batch,
                         int64_t features, int64_t stride_xb, int64_t stride_ub, int64_t stride_yb, int64_t stride_t,
                         int64_t stride_s, bool has_logp, const float* logp, const float* div, float* logp_out,
                         int64_t stride_lp, int64_t stride_div, int64_t stride_lpo, cudaStream_t stream) {
  const int64_t work = batch * features > batch ? batch * features : batch;
  int64_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  const dim3 grid(static_cast<unsigned int>(blocks));
  // 32-bit flat indices when i + step stays below 2^31 for every i < work
  if (work + blocks * kThreads < static_cast<int64_t>(INT32_MAX)) {
    flow_map_jump_kernel<T, int32_t><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(u), t, s, static_cast<T*>(y), batch, features, stride_xb,
        stride_ub, stride_yb, stride_t, stride_s, has_logp, logp, div, logp_out, stride_lp, stride_div, stride_lpo);
  } else {
    flow_map_jump_kernel<T, int64_t><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(u), t, s, static_cast<T*>(y), batch, features, stride_xb,
        stride_ub, stride_yb, stride_t, stride_s, has_logp, logp, div, logp_out, stride_lp, stride_div, stride_lpo);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t flow_map_jump_launch(JumpDType dtype, const void* x, const void* u, const float* t, const float* s, void* y,
                                 int64_t batch, int64_t features, int64_t stride_xb, int64_t stride_ub,
                                 int64_t stride_yb, int64_t stride_t, int64_t stride_s, bool has_logp,
                                 const float* logp, const float* div, float* logp_out, int64_t stride_lp,
                                 int64_t stride_div, int64_t stride_lpo, cudaStream_t stream) {
  if (batch <= 0 || (features <= 0 && !has_logp)) return cudaSuccess;
  if (features < 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case JumpDType::kFloat32:
      return launch_typed<float>(x, u, t, s, y, batch, features, stride_xb, stride_ub, stride_yb, stride_t, stride_s,
                                 has_logp, logp, div, logp_out, stride_lp, stride_div, stride_lpo, stream);
    case JumpDType::kFloat16:
      return launch_typed<__half>(x, u, t, s, y, batch, features, stride_xb, stride_ub, stride_yb, stride_t, stride_s,
                                  has_logp, logp, div, logp_out, stride_lp, stride_div, stride_lpo, stream);
    case JumpDType::kBFloat16:
      return launch_typed<__nv_bfloat16>(x, u, t, s, y, batch, features, stride_xb, stride_ub, stride_yb, stride_t,
                                         stride_s, has_logp, logp, div, logp_out, stride_lp, stride_div, stride_lpo,
                                         stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace flowkern
