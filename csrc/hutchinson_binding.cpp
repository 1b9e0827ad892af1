// torch.ops.flowkern.hutchinson_probes_ / hutchinson_reduce: the CUDA backend of flowkern.divergence.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "hutchinson.h"

namespace {

int hutchinson_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return flowkern::kFloat32;
    case at::kHalf: return flowkern::kFloat16;
    case at::kBFloat16: return flowkern::kBFloat16;
    default: TORCH_CHECK(false, "flowkern hutchinson: ", name, " must be float32, float16 or bfloat16, got ",
                         t.scalar_type());
  }
  return -1;
}

void check_common(const at::Tensor& t, const char* name, int64_t seed, int64_t stream, int64_t distribution) {
  TORCH_CHECK(t.is_cuda(), "flowkern hutchinson: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 3, "flowkern hutchinson: ", name, " must be [K, B, D], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "flowkern hutchinson: ", name, " must be contiguous");
  TORCH_CHECK(seed >= 0, "flowkern hutchinson: seed must be >= 0, got ", seed);
  TORCH_CHECK(stream >= 0 && stream <= 0xFFFFFFFFll, "flowkern hutchinson: stream must fit in 32 bits, got ", stream);
  TORCH_CHECK(distribution == flowkern::kRademacher || distribution == flowkern::kGaussian,
              "flowkern hutchinson: distribution must be 0 (rademacher) or 1 (gaussian), got ", distribution);
  TORCH_CHECK(t.size(0) <= 0xFFFFFFFFll && t.size(1) <= 0xFFFFFFFFll && t.size(2) <= 4 * 0xFFFFFFFFll,
              "flowkern hutchinson: K, B and D/4 must fit in 32 bits, got ", t.sizes());
}

void hutchinson_probes_(at::Tensor out, int64_t seed, int64_t stream, int64_t distribution) {
  check_common(out, "out", seed, stream, distribution);
  const int dtype = hutchinson_dtype(out, "out");
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaError_t err = flowkern::hutchinson_probes(
      out.data_ptr(), dtype, out.size(0), out.size(1), out.size(2), static_cast<uint64_t>(seed),
      static_cast<uint32_t>(stream), static_cast<int>(distribution), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "flowkern hutchinson_probes_ launch failed: ", cudaGetErrorString(err));
}

at::Tensor hutchinson_reduce(const at::Tensor& jz, int64_t seed, int64_t stream, int64_t distribution) {
  check_common(jz, "jz", seed, stream, distribution);
  const int dtype = hutchinson_dtype(jz, "jz");
  const c10::cuda::CUDAGuard guard(jz.device());
  const int64_t probes = jz.size(0), batch = jz.size(1), dim = jz.size(2);
  const int64_t chunks = flowkern::hutchinson_reduce_chunks(dim);
  at::Tensor partial = at::empty({probes * batch, chunks}, jz.options().dtype(at::kFloat));
  const cudaError_t err = flowkern::hutchinson_reduce_partials(
      jz.data_ptr(), dtype, partial.data_ptr<float>(), probes, batch, dim, static_cast<uint64_t>(seed),
      static_cast<uint32_t>(stream), static_cast<int>(distribution), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "flowkern hutchinson_reduce launch failed: ", cudaGetErrorString(err));
  return partial.sum(1).view({probes, batch});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flowkern, m) {
  m.def("hutchinson_probes_(Tensor(a!) out, int seed, int stream, int distribution) -> ()");
  m.def("hutchinson_reduce(Tensor jz, int seed, int stream, int distribution) -> Tensor");
}

TORCH_LIBRARY_IMPL(flowkern, CUDA, m) {
  m.impl("hutchinson_probes_", &hutchinson_probes_);
  m.impl("hutchinson_reduce", &hutchinson_reduce);
}
