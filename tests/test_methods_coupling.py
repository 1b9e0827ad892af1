"""Minibatch OT coupling: the assignment against brute force, marginals kept, validation."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowkern.methods.coupling import couple, ot_permutation
from flowkern.methods.edm import SIGMA_MIN, consistency_sample, consistency_scalings


def brute_force_cost(x0, z):
    """The smallest Σ_i ‖x₀_i − z_π(i)‖² over all permutations (small n only)."""
    cost = torch.cdist(x0.double().flatten(1), z.double().flatten(1)).square()
    n = x0.shape[0]
    return min(float(cost[torch.arange(n), torch.tensor(p)].sum()) for p in itertools.permutations(range(n)))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), shape=st.sampled_from([(2,), (3,), (1, 2, 2)]), seed=st.integers(0, 2 ** 31 - 1))
def test_ot_permutation_is_the_optimal_assignment(n, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    x0 = 2 * torch.randn((n, *shape), generator=gen) + 1
    z = torch.randn((n, *shape), generator=gen)
    perm = ot_permutation(x0, z)
    assert perm.dtype == torch.int64 and torch.equal(perm.sort().values, torch.arange(n))
    got = float((x0.double() - z[perm].double()).square().sum())
    assert got == pytest.approx(brute_force_cost(x0, z), rel=1e-10, abs=1e-12)


def test_couple_keeps_the_noise_and_shortens_the_pairs():
    torch.manual_seed(0)
    x0 = torch.randn(256, 2) * 3 + torch.tensor([4.0, -1.0])
    z = torch.randn(256, 2)
    paired = couple(x0, z, "ot")
    assert couple(x0, z, "independent") is z
    # the same draws (the noise marginal is untouched), re-ordered
    assert torch.equal(paired[paired[:, 0].argsort()], z[z[:, 0].argsort()])
    # E‖x₀ − z‖² = ‖m‖² + 2·3² + 2 = 37 independent; the OT pairing heads for W₂² = ‖m‖² + 2·(3 − 1)² = 25
    before = float((x0 - z).square().sum(1).mean())
    after = float((x0 - paired).square().sum(1).mean())
    assert 30 < before < 46 and 24 < after < 32 and after < 0.8 * before, (before, after)


def test_bad_inputs():
    x0 = torch.randn(4, 2)
    with pytest.raises(ValueError, match="coupling"):
        couple(x0, x0, "sinkhorn")
    with pytest.raises(ValueError, match="same shape"):
        ot_permutation(x0, torch.randn(5, 2))
    with pytest.raises(TypeError, match="z"):
        ot_permutation(x0, [[0.0, 1.0]])


def test_blocks_are_paired_separately_and_a_partial_block_inside_a_full_one():
    torch.manual_seed(0)
    x0, z = 2 * torch.randn(300, 3), torch.randn(300, 3)
    out = couple(x0, z, "ot", block=128, generator=torch.Generator().manual_seed(5))
    for lo in (0, 128):                       # two full blocks: each its own optimal permutation of its own draws
        xb, zb = x0[lo:lo + 128], z[lo:lo + 128]
        assert torch.equal(out[lo:lo + 128], zb[ot_permutation(xb, zb)])
    # the last 44 rows: paired within rows 172..299 against 128 fresh draws of the generator
    fresh = torch.randn(128, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out[256:], fresh[ot_permutation(x0[172:], fresh)][84:])
    # fewer rows than a block: the coupling of what there is
    assert torch.equal(couple(x0[:10], z[:10], "ot", block=128), z[:10][ot_permutation(x0[:10], z[:10])])
    with pytest.raises(ValueError, match="block"):
        couple(x0, z, "ot", block=0)


@pytest.mark.parametrize("renoise", ["independent", "ot"])
def test_consistency_sampler_renoises_with_the_coupling(renoise):
    """A network whose consistency function is a fixed batch X at every σ: the last level's input is then
    y = X + √(σ² − σ_min²)·z, which exposes the noise the sampler paired with X."""
    torch.manual_seed(0)
    target = 2 * torch.randn(300, 2) + 1
    seen = []

    def net(u, t, s):
        sigma = (t / (1 - t)).double()
        c_skip, c_out, c_in = (c[:, None] for c in consistency_scalings(sigma, SIGMA_MIN, 0.5))
        y = u.double() / c_in
        seen.append((y, sigma))
        return ((target.double() - c_skip * y) / c_out).float()

    noise = torch.randn(300, 2)
    out = consistency_sample(net, noise.double(), 2, sigma_min=SIGMA_MIN, sigma_max=80.0, rho=7.0, sigma_data=0.5,
                             generator=torch.Generator().manual_seed(9), renoise=renoise, coupling_block=128)
    assert torch.allclose(out, target.double(), atol=1e-9)
    y, sigma = seen[-1]
    level = float(sigma[0])
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(300, 2, dtype=torch.float64, generator=gen)
    want = couple(target.double(), z, renoise, 128, gen)
    assert torch.allclose((y - target.double()) / (level ** 2 - SIGMA_MIN ** 2) ** 0.5, want, atol=1e-8)
    if renoise == "ot":
        assert not torch.allclose(want, z)


def test_a_partial_block_is_paired_against_draws_of_the_noise_scale():
    """The rows after the last full block are paired inside a full block of fresh draws: scale·N(0, I), the law z
    was drawn from (sCT and the TrigFlow sampler couple z ~ N(0, σ_d²I))."""
    gen = torch.Generator().manual_seed(0)
    block, extra, dim, sigma = 8, 4, 2000, 0.25
    x0 = torch.randn(block + extra, dim, generator=gen)
    z = sigma * torch.randn(block + extra, dim, generator=gen)
    paired = couple(x0, z, "ot", block, gen, scale=sigma)
    assert abs(float(paired[block:].std()) - sigma) < 0.01
    assert abs(float(couple(x0, z, "ot", block, gen)[block:].std()) - 1.0) < 0.02   # scale says what z is
    with pytest.raises(ValueError, match="scale"):
        couple(x0, z, "ot", block, gen, scale=0.0)
