// Flow-map jump y = x + (s - t) * u per sample, and the joint log-density update l' = l + (s - t) * D.
// Torch-free: launchers take raw pointers, sizes, strides (in elements) and a cudaStream_t.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace flowkern {

enum class JumpDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// x, u, y: [batch, features] of `dtype`, unit feature stride, row strides stride_xb/stride_ub/stride_yb (y may be x:
// in place). t, s: [batch] float32 with strides stride_t/stride_s (0 broadcasts one time). With has_logp, logp, div,
// logp_out: [batch] float32 (logp_out may be logp). Maths in float32. Returns the launch error (cudaSuccess if none).
cudaError_t flow_map_jump_launch(JumpDType dtype, const void* x, const void* u, const float* t, const float* s, void* y,
                                 int64_t batch, int64_t features, int64_t stride_xb, int64_t stride_ub,
                                 int64_t stride_yb, int64_t stride_t, int64_t stride_s, bool has_logp,
                                 const float* logp, const float* div, float* logp_out, int64_t stride_lp,
                                 int64_t stride_div, int64_t stride_lpo, cudaStream_t stream);

}  // namespace flowkern
