"""The attention kernels' candidate tiles: each launch's pruner keeps the list of its head-dim bucket and loads (TMA
descriptors or pointers), in the list's order, the pinned tile first, and never an empty list."""
from __future__ import annotations

import pytest

from flowkern import _config
from flowkern._fused import kernel_module


@pytest.fixture
def compiled_mode(monkeypatch):
    """The configs module as it is on a GPU (the interpreter has one small config)."""
    kern = kernel_module("attention.configs")
    monkeypatch.setattr(kern, "_INTERPRETER", False)
    return kern


def _tile(config):
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def test_a_tile_without_a_depth_takes_both_depths_one_with_a_depth_only_that(compiled_mode):
    assert compiled_mode._tiles([(128, 64, 8, 2), (64, 64, 4)]) == [(128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2)]


@pytest.mark.parametrize("tangent", [False, True])
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("block_d", [64, 128, 256])
def test_forward_pruner_keeps_its_table_in_order(compiled_mode, monkeypatch, tangent, tma, block_d):
    kern = compiled_mode
    table = {(False, False): kern._FWD, (True, False): kern._FWD_TANGENT, (False, True): kern._FWD_TMA,
             (True, True): kern._FWD_TANGENT_TMA}[tangent, tma]
    configs = kern._configs(kern._FWD, kern._FWD_TANGENT, kern._FWD_TMA, kern._FWD_TANGENT_TMA)
    prune = kern.attention_fwd.early_config_prune
    monkeypatch.setitem(_config._env, "autotune", True)
    kept = prune(configs, {}, BLOCK_D=block_d, HAS_TANGENT=tangent, TMA=tma)
    assert [_tile(c) for c in kept] == kern._tiles(table[block_d])
    monkeypatch.setitem(_config._env, "autotune", False)
    assert [_tile(c) for c in prune(configs, {}, BLOCK_D=block_d, HAS_TANGENT=tangent, TMA=tma)] == \
        kern._tiles(table[block_d])[:1]


def test_pinned_tangent_forward_tiles(compiled_mode, monkeypatch):
    """The headline's tiles: 128 keys a tile with descriptors at D = 64, (128, 64) with two stages at D = 128
    (three would need 256 KiB of shared memory); the pointer path keeps its 64- and 32-key tiles."""
    kern = compiled_mode
    monkeypatch.setitem(_config._env, "autotune", False)
    configs = kern._configs(kern._FWD, kern._FWD_TANGENT, kern._FWD_TMA, kern._FWD_TANGENT_TMA)
    prune = kern.attention_fwd.early_config_prune
    pinned = {(d, tma): _tile(prune(configs, {}, BLOCK_D=d, HAS_TANGENT=True, TMA=tma)[0])
              for d in (64, 128) for tma in (False, True)}
    assert pinned == {(64, True): (128, 128, 8, 3), (128, True): (128, 64, 8, 2),
                      (64, False): (128, 64, 8, 3), (128, False): (128, 32, 8, 3)}


@pytest.mark.parametrize("name", ["attention_bwd_dq", "attention_bwd_dkdv", "tangent_bwd_dq", "tangent_bwd_dkdv"])
@pytest.mark.parametrize("tma", [False, True])
def test_backward_pruners_never_come_back_empty(compiled_mode, monkeypatch, name, tma):
    kern = compiled_mode
    tables = {"attention_bwd_dq": (kern._BWD_DQ, kern._BWD_DQ_TMA),
              "attention_bwd_dkdv": (kern._BWD_DKDV, kern._BWD_DKDV_TMA),
              "tangent_bwd_dq": (kern._TANGENT_BWD_DQ,), "tangent_bwd_dkdv": (kern._TANGENT_BWD_DKDV,)}[name]
    configs = kern._configs(*tables)
    monkeypatch.setitem(_config._env, "autotune", True)
    for block_d in (64, 128, 256):
        kept = getattr(kern, name).early_config_prune(configs, {}, BLOCK_D=block_d, TMA=tma)
        want = tables[1 if tma and len(tables) > 1 else 0][block_d]
        assert [_tile(c) for c in kept] == kern._tiles(want), (name, block_d)
