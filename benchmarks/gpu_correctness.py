"""GPU correctness at benchmark shapes with the autotuned kernels (the unit tests use one fixed config):
relative error of out, out_t and the primal gradients against float64 math attention on the GPU."""
from __future__ import annotations

import torch

import flowkern
import flowkern._config
from flowkern.testing import math_attention


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def main() -> None:
    torch.manual_seed(0)
    dev = "cuda"
    print(f"{'case':<52}{'out':>10}{'out_t':>10}{'dq':>10}{'dk':>10}{'dv':>10}")
    cases = [(1, 8, 8, 1024, 64, False, torch.bfloat16, "auto"), (1, 8, 2, 1000, 128, True, torch.bfloat16, "auto"),
             (2, 4, 4, 777, 96, True, torch.float16, "auto"), (1, 4, 1, 513, 256, False, torch.float32, "auto"),
             # the pointer path (tensors TMA cannot read, FLOWKERN_TMA=0) at the first two shapes
             (1, 8, 8, 1024, 64, False, torch.bfloat16, "0"), (1, 8, 2, 1000, 128, True, torch.bfloat16, "0")]
    for (b, hq, hkv, n, d, causal, dtype, tma) in cases:
        flowkern._config._env["tma"] = tma
        q = torch.randn(b, hq, n, d, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(b, hkv, n, d, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(b, hkv, n, d, device=dev, dtype=dtype, requires_grad=True)
        q_t, k_t, v_t = (torch.randn_like(x) for x in (q, k, v))
        out, out_t = flowkern.jvp_attention(q, k, v, q_t, k_t, v_t, is_causal=causal, enable_gqa=hq != hkv)
        grad = torch.randn_like(out)
        out.backward(grad)
        qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
        ref, ref_t = torch.func.jvp(lambda a, b_, c: math_attention(a, b_, c, is_causal=causal), (qd, kd, vd),
                                    (q_t.double(), k_t.double(), v_t.double()))
        ref = math_attention(qd, kd, vd, is_causal=causal)
        ref.backward(grad.double())
        errs = [rel(out, ref.detach()), rel(out_t, ref_t), rel(q.grad, qd.grad), rel(k.grad, kd.grad),
                rel(v.grad, vd.grad)]
        loads = "TMA" if flowkern._config.tma_loads(q.device) else "pointers"
        name = f"B{b} H{hq}/{hkv} N{n} D{d} {'causal' if causal else 'full'} {str(dtype)[6:]} {loads}"
        print(f"{name:<52}" + "".join(f"{e:10.2e}" for e in errs))
        limit = 1e-4 if dtype == torch.float32 else 2e-2
        assert all(e < limit for e in errs), f"{name}: relative error above {limit}"
    print("GPU correctness: OK")


if __name__ == "__main__":
    main()
