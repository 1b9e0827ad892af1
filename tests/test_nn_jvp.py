"""flowkern.nn.jvp: results, detached outputs, identical dropout masks, validation, and the DDP recipe (gloo, 2 CPU
processes) against one process on the doubled batch."""
from __future__ import annotations

import pytest
import torch
from ddp_worker import BATCH, flat_params, make_model, rank_main, train
from spawned import spawn_ranks

import flowkern
import flowkern.nn


def _data(batch=4, dim=2):
    gen = torch.Generator().manual_seed(0)
    return ((torch.randn(batch, dim, generator=gen), torch.rand(batch, generator=gen), torch.rand(batch, generator=gen)),
            (torch.randn(batch, dim, generator=gen), torch.ones(batch), torch.zeros(batch)))


def test_matches_torch_func_jvp_and_is_detached():
    model = make_model()
    primals, tangents = _data()
    with flowkern.use_backend("torch"):
        out, tan = flowkern.nn.jvp(model, primals, tangents)
        with torch.no_grad():
            ref, ref_t = torch.func.jvp(model, primals, tangents)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(tan, ref_t, atol=1e-6, rtol=1e-6)
    assert not out.requires_grad and not tan.requires_grad and out.grad_fn is None


def test_single_tensor_primal_and_tuple_outputs():
    model = flowkern.nn.MLPFlowMap(2, 8, 1, 8, divergence_head=True)
    (x, t, s), (x_t, _, _) = _data()
    with flowkern.use_backend("torch"):
        (u, d), (u_t, d_t) = flowkern.nn.jvp(lambda x: model(x, t, s), x, x_t)
    assert u.shape == u_t.shape == (4, 2) and d.shape == d_t.shape == (4,)


@pytest.mark.parametrize("preserve", [True, False])
def test_dropout_masks_match_the_grad_pass(preserve):
    model = make_model(dropout=0.5).train()
    primals, tangents = _data()
    with flowkern.use_backend("torch"):
        u_jvp, _ = flowkern.nn.jvp(model, primals, tangents, preserve_rng_state=preserve)
        u = model(*primals)
    assert torch.allclose(u_jvp, u, atol=1e-5) == preserve


@pytest.mark.parametrize("call, err, match", [
    (lambda m, p, t: flowkern.nn.jvp(m, p, t[:2]), ValueError, "one entry per primal"),
    (lambda m, p, t: flowkern.nn.jvp(m, p, (t[0], t[1].half(), t[2])), TypeError, r"tangents\[1\] has dtype"),
    (lambda m, p, t: flowkern.nn.jvp(m, p, (t[0][:2], t[1], t[2])), ValueError, r"tangents\[0\] must have the shape"),
    (lambda m, p, t: flowkern.nn.jvp(m, (p[0], p[1].long(), p[2]), t), TypeError, r"primals\[1\] must be a floating"),
    (lambda m, p, t: flowkern.nn.jvp(m, p, (t[0], 1.0, t[2])), TypeError, r"tangents\[1\] must be a torch.Tensor"),
    (lambda m, p, t: flowkern.nn.jvp(m, p, t, kwargs=[1]), TypeError, "kwargs must be a dict"),
    (lambda m, p, t: flowkern.nn.jvp(m, p, t, preserve_rng_state=1), TypeError, "preserve_rng_state"),
    (lambda m, p, t: flowkern.nn.jvp("m", p, t), TypeError, "model must be callable"),
    (lambda m, p, t: flowkern.nn.jvp(m, {"x": p[0]}, t), TypeError, "primals must be a tensor or a tuple"),
])
def test_bad_arguments_raise(call, err, match):
    primals, tangents = _data()
    with pytest.raises(err, match=match):
        call(make_model(), primals, tangents)


def test_ddp_two_processes_match_one_process_on_the_doubled_batch(tmp_path):
    """World size 2 (gloo, CPU), each rank half the global batch: after 3 MeanFlow steps the parameters equal those of
    one process on the whole batch (the grad pass went through DDP: gradients were all-reduced), the replicas agree,
    and the JVP pass and the grad pass drew the same dropout masks."""
    world = 2
    spawn_ranks(rank_main, world, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    with flowkern.use_backend("torch"):
        single = flat_params(train(make_model()))
    start = flat_params(make_model())
    assert BATCH % world == 0
    assert (single - start).abs().max() > 1e-3  # the steps moved the parameters
    for r, res in enumerate(results):
        torch.testing.assert_close(res["params"], single, atol=2e-5, rtol=1e-4, msg=lambda m, r=r: f"rank {r}: {m}")
        assert res["same_masks"], f"rank {r}: the JVP pass and the DDP grad pass drew different dropout masks"
        assert res["differs_otherwise"], f"rank {r}: dropout had no effect (the mask check could not fail)"


def test_ddp_module_without_wrapper_is_what_jvp_runs():
    assert flowkern.nn.unwrap_ddp(model := make_model()) is model


def test_meanflow_training_with_flowkern_jvp_learns_a_2d_toy():
    """40 MeanFlow steps (flowkern.nn.jvp + grad pass) on a two-mode 2-D mixture: the flow-matching loss at s = t
    on a held-out batch falls well below its value at init (u = 0: E‖ε − x‖²)."""
    torch.manual_seed(0)
    model = flowkern.nn.MLPFlowMap(2, hidden=64, depth=1, time_dim=16, time_scale=10.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def data(n, gen):
        sign = torch.randint(0, 2, (n, 1), generator=gen) * 2 - 1
        return torch.cat([2.0 * sign, 0.3 * torch.randn(n, 1, generator=gen)], 1)

    gen = torch.Generator().manual_seed(1)
    x_ev, e_ev, t_ev = data(512, gen), torch.randn(512, 2, generator=gen), torch.rand(512, generator=gen)
    z_ev = (1 - t_ev[:, None]) * x_ev + t_ev[:, None] * e_ev

    def fm_loss():
        with torch.no_grad():
            return (model(z_ev, t_ev, t_ev) - (e_ev - x_ev)).square().sum(-1).mean().item()

    with flowkern.use_backend("torch"):
        before = fm_loss()
        for _ in range(40):
            x, e = data(128, gen), torch.randn(128, 2, generator=gen)
            t = torch.rand(128, generator=gen)
            r = torch.where(torch.rand(128, generator=gen) < 0.5, t, t * torch.rand(128, generator=gen))
            z, v = (1 - t[:, None]) * x + t[:, None] * e, e - x
            _, dudt = flowkern.nn.jvp(model, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
            loss = (model(z, t, r) - (v - (t - r)[:, None] * dudt)).square().sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        after = fm_loss()
    assert after < 0.75 * before, (before, after)  # 6.0 -> 3.4 at this seed


def _float64_mlp():
    from nn_reference import randomize

    model = randomize(flowkern.nn.MLPFlowMap(2, 16, 2, 8, divergence_head=True), std=0.3).double()
    (x, t, s), (x_t, t_t, s_t) = _data()
    return model, (x.double(), t.double(), s.double()), (x_t.double(), 0.5 * t_t.double(), s_t.double())


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_dual_pass_equals_torch_func_jvp_in_float64(backend):
    """flowkern.jvp runs on forward-AD duals; torch.func.jvp of the same model is the reference (u and D)."""
    if backend == "triton":
        from conftest import TRITON_RUNS

        if not TRITON_RUNS:
            pytest.skip("needs Triton (GPU or interpreter)")
    model, primals, tangents = _float64_mlp()
    with flowkern.use_backend("torch"):  # float64: the PyTorch backend serves it under either request
        (u, d), (u_t, d_t) = flowkern.nn.jvp(model, primals, tangents)
        with torch.no_grad():
            (u_r, d_r), (ut_r, dt_r) = torch.func.jvp(model, primals, tangents)
    for a, b in ((u, u_r), (d, d_r), (u_t, ut_r), (d_t, dt_r)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert u_t.abs().max() > 1e-3 and d_t.abs().max() > 1e-3  # a real tangent, not zeros


def test_output_independent_of_the_primals_gets_a_zero_tangent():
    x = torch.randn(3, 2, dtype=torch.float64)
    const = torch.arange(3.0, dtype=torch.float64)
    out, (y_t, c_t) = flowkern.nn.jvp(lambda x: (2 * x, const), x, torch.ones_like(x))
    torch.testing.assert_close(y_t, torch.full_like(x, 2.0))
    torch.testing.assert_close(c_t, torch.zeros_like(const))
    torch.testing.assert_close(out[1], const)
