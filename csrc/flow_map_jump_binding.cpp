// PyTorch binding of the flow-map jump: op torch.ops.flowkern.flow_map_jump (see flow_map_jump.h).
//   flow_map_jump(x, u, t, s, logp, div, y, logp_out, has_logp) -> ()
// writes y = x + (s - t) * u and, with has_logp, logp_out = logp + (s - t) * div. y may be x and logp_out may be
// logp (in place). Without has_logp the three log-density tensors are ignored (pass empty float32 tensors).
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "flow_map_jump.h"

namespace {

void check_rows(const at::Tensor& v, const char* name, const at::Tensor& x) {
  TORCH_CHECK(v.is_cuda(), "flow_map_jump: ", name, " must be a CUDA tensor");
  TORCH_CHECK(v.device() == x.device(), "flow_map_jump: ", name, " is on ", v.device(), " but x is on ", x.device());
  TORCH_CHECK(v.dim() == 2 && v.size(0) == x.size(0) && v.size(1) == x.size(1), "flow_map_jump: ", name,
              " must have the shape of x [B, F] = ", x.sizes(), ", got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == x.scalar_type(), "flow_map_jump: ", name, " has dtype ", v.scalar_type(),
              " but x has ", x.scalar_type());
  TORCH_CHECK(v.size(1) <= 1 || v.stride(1) == 1, "flow_map_jump: ", name, " must have unit feature stride, got ",
              v.strides());
}

void check_per_sample(const at::Tensor& v, const char* name, const at::Tensor& x) {
  TORCH_CHECK(v.is_cuda() && v.device() == x.device(), "flow_map_jump: ", name, " must be on ", x.device());
  TORCH_CHECK(v.scalar_type() == at::kFloat, "flow_map_jump: ", name, " must be float32, got ", v.scalar_type());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(0), "flow_map_jump: ", name, " must have shape [B] = [",
              x.size(0), "], got ", v.sizes());
}

flowkern::JumpDType jump_dtype(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return flowkern::JumpDType::kFloat32;
    case at::kHalf:
      return flowkern::JumpDType::kFloat16;
    case at::kBFloat16:
      return flowkern::JumpDType::kBFloat16;
    default:
      TORCH_CHECK(false, "flow_map_jump: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return flowkern::JumpDType::kFloat32;  // unreachable
}

void flow_map_jump(const at::Tensor& x, const at::Tensor& u, const at::Tensor& t, const at::Tensor& s,
                   const at::Tensor& logp, const at::Tensor& div, const at::Tensor& y, const at::Tensor& logp_out,
                   bool has_logp) {
  TORCH_CHECK(x.is_cuda(), "flow_map_jump: x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2, "flow_map_jump: x must be [B, F], got ", x.sizes());
  const flowkern::JumpDType dtype = jump_dtype(x);
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "flow_map_jump: x must have unit feature stride, got ",
              x.strides());
  check_rows(u, "u", x);
  check_rows(y, "y", x);
  check_per_sample(t, "t", x);
  check_per_sample(s, "s", x);
  if (has_logp) {
    check_per_sample(logp, "logp", x);
    check_per_sample(div, "div", x);
    check_per_sample(logp_out, "logp_out", x);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const cudaError_t err = flowkern::flow_map_jump_launch(
      dtype, x.data_ptr(), u.data_ptr(), t.data_ptr<float>(), s.data_ptr<float>(), y.data_ptr(), x.size(0), x.size(1),
      x.stride(0), u.stride(0), y.stride(0), t.stride(0), s.stride(0), has_logp,
      has_logp ? logp.data_ptr<float>() : nullptr, has_logp ? div.data_ptr<float>() : nullptr,
      has_logp ? logp_out.data_ptr<float>() : nullptr, has_logp ? logp.stride(0) : 0, has_logp ? div.stride(0) : 0,
      has_logp ? logp_out.stride(0) : 0, stream);
  TORCH_CHECK(err == cudaSuccess, "flow_map_jump: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flowkern, m) {
  m.def(
      "flow_map_jump(Tensor x, Tensor u, Tensor t, Tensor s, Tensor logp, Tensor div, Tensor(a!) y, "
      "Tensor(b!) logp_out, bool has_logp) -> ()");
}

TORCH_LIBRARY_IMPL(flowkern, CUDA, m) { m.impl("flow_map_jump", &flow_map_jump); }
