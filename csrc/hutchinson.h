// Hutchinson trace estimation: counter-based Philox probes and the fused probe·(J·probe) reduction.
// Torch-free: compiles with plain nvcc. The probe map is the one of kernels/divergence.py (Triton):
//
//   probe(seed, stream, b, k, i): Philox4x32-10, key (seed mod 2^32, seed >> 32), counter (i >> 2, b, k, stream)
//   -> words r0..r3; element i uses lane i & 3.
//   rademacher: +1 if the top bit of r_lane is 0, else -1          (bit-identical to the Triton kernel)
//   gaussian:   u_j = ((r_j >> 8) + 0.5)·2^-24; lanes 0,1 = sqrt(-2 ln u0)·(cos, sin)(2π u1), lanes 2,3 from (u2, u3)
//               (equal to the Triton kernel up to the last bits of logf/sinf/cosf)
//
// Layout: [K, B, D] contiguous (probe, sample, flattened element); rows are k·B + b.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace flowkern {

enum HutchinsonDistribution : int { kRademacher = 0, kGaussian = 1 };
enum HutchinsonDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Reduction tiling: one warp per (row, chunk) of kReduceCountersPerWarp Philox counters (4 elements each).
constexpr int kReduceWarpsPerBlock = 8;
constexpr int kReduceCountersPerLane = 8;
constexpr int64_t kReduceCountersPerWarp = 32 * kReduceCountersPerLane;

inline int64_t hutchinson_counters(int64_t dim) { return (dim + 3) / 4; }
// Number of partial sums per row written by hutchinson_reduce_partials.
inline int64_t hutchinson_reduce_chunks(int64_t dim) {
  return (hutchinson_counters(dim) + kReduceCountersPerWarp - 1) / kReduceCountersPerWarp;
}

struct PhiloxWords {
  uint32_t r[4];
};

__host__ __device__ inline uint32_t philox_mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 (Salmon et al. 2011; Random123 known-answer tests pass), as Triton's tl.philox.
__host__ __device__ inline PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                                      uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_b = philox_mulhi(0xCD9E8D57u, c2), lo_b = 0xCD9E8D57u * c2;
    const uint32_t hi_a = philox_mulhi(0xD2511F53u, c0), lo_a = 0xD2511F53u * c0;
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

__host__ __device__ inline float philox_uniform(uint32_t r) {
  return static_cast<float>(r >> 8) * 5.9604644775390625e-08f + 2.9802322387695312e-08f;
}

// The four probe values of Philox counter `counter` (elements 4·counter .. 4·counter + 3) of row (sample, probe).
__host__ __device__ inline void hutchinson_probe4(uint64_t seed, uint32_t stream, uint32_t sample, uint32_t probe,
                                                  uint32_t counter, int distribution, float z[4]) {
  const PhiloxWords w = philox4x32_10(counter, sample, probe, stream, static_cast<uint32_t>(seed & 0xFFFFFFFFu),
                                      static_cast<uint32_t>(seed >> 32));
  if (distribution == kRademacher) {
#pragma unroll
    for (int j = 0; j < 4; ++j) z[j] = (w.r[j] >> 31) == 0u ? 1.0f : -1.0f;
  } else {
    const float two_pi = 6.283185307179586f;
    const float ra = sqrtf(-2.0f * logf(philox_uniform(w.r[0])));
    const float rb = sqrtf(-2.0f * logf(philox_uniform(w.r[2])));
    const float ta = two_pi * philox_uniform(w.r[1]);
    const float tb = two_pi * philox_uniform(w.r[3]);
    z[0] = ra * cosf(ta);
    z[1] = ra * sinf(ta);
    z[2] = rb * cosf(tb);
    z[3] = rb * sinf(tb);
  }
}

// out[k, b, i] = probe(seed, stream, b, k, i) for a contiguous [probes, batch, dim] tensor of `dtype`.
cudaError_t hutchinson_probes(void* out, int dtype, int64_t probes, int64_t batch, int64_t dim, uint64_t seed,
                              uint32_t stream, int distribution, cudaStream_t cuda_stream);

// partial[(k·B + b)·n_chunks + c] = Σ_{i in chunk c} probe(seed, stream, b, k, i)·jz[k, b, i] (float32 accumulation),
// n_chunks = hutchinson_reduce_chunks(dim); the probe is regenerated, never read. Sum over c for the estimate.
cudaError_t hutchinson_reduce_partials(const void* jz, int dtype, float* partial, int64_t probes, int64_t batch,
                                       int64_t dim, uint64_t seed, uint32_t stream, int distribution,
                                       cudaStream_t cuda_stream);

}  // namespace flowkern
