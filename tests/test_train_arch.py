"""`flowkern train <method> --arch dit`: a DiT (patch 2) on the 8×8 digits trains end to end through the PyTorch
backend and the Triton interpreter; the checkpoint records the architecture, so eval and sample rebuild it."""
from __future__ import annotations

import pytest
import torch
from helpers import one_thread, torch_backend
from nn_reference import randomize

import flowkern
from flowkern.__main__ import main
from flowkern.methods import get_method
from flowkern.train.rebuild import FlatImageFlowMap, architecture, image_geometry, network

TINY_DIT = ["--data", "digits", "--arch", "dit", "--steps", "3", "--batch", "8", "--hidden", "32", "--depth", "1",
            "--time-dim", "8", "--samples", "64", "--no-nll", "--no-progress", "--warmup", "1", "--log-every", "1"]


@pytest.mark.parametrize("method", ["fm", "meanflow"])
def test_dit_trains_on_digits_and_the_checkpoint_rebuilds_it(method, tmp_path, capsys):
    out = tmp_path / method
    with torch_backend(), one_thread():
        assert main(["train", method, "--out", str(out), *TINY_DIT]) == 0
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        assert state["arch"]["arch"] == "dit" and state["arch"]["img_size"] == 8 and state["arch"]["patch"] == 2
        assert state["arch"]["time_scale"] == (10.0 if method == "meanflow" else 1000.0)
        assert main(["eval", str(out / "checkpoint.pt"), "--steps", "1", "2", "--samples", "32"]) == 0
        assert main(["sample", str(out / "checkpoint.pt"), "--out", str(tmp_path / "x.pt"), "--n", "5"]) == 0
    x = torch.load(tmp_path / "x.pt")
    assert x.shape == (5, 64) and bool(torch.isfinite(x).all())
    assert f"{method} (EMA)" in capsys.readouterr().out
    assert (out / "samples.png").is_file()


@pytest.mark.interpreter
def test_meanflow_dit_steps_through_the_triton_interpreter():
    """The --arch dit network of the digits, a MeanFlow optimiser step on the fused kernels (attention with its
    JVP, norms, modulate, residual, GELU, time embedding): finite loss, every parameter group moves."""
    from conftest import TRITON_RUNS

    from flowkern.data import get_dataset
    from flowkern.methods.meanflow import MeanFlow

    if not TRITON_RUNS:
        pytest.skip("needs Triton (GPU or interpreter)")
    torch.manual_seed(0)
    arch = architecture("dit", {"hidden": 32, "depth": 1, "time_dim": 8, "dropout": 0.0}, (64,), MeanFlow)
    method = MeanFlow(randomize(network(arch), std=0.2))  # off adaLN-zero: every parameter has a gradient
    start = [p.detach().clone() for p in method.model.parameters()]
    opt = torch.optim.Adam(method.model.parameters(), lr=1e-2)
    x0 = get_dataset("digits").sample(4, torch.Generator().manual_seed(0))
    with flowkern.use_backend("triton"), one_thread():
        for step in range(1):
            loss, _ = method.loss(method.model, x0, step)
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    moved = [bool((p.detach() - p0).abs().max() > 0) for p, p0 in zip(method.model.parameters(), start)]
    assert all(moved), moved


def test_dit_on_vector_data_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "fm", "--arch", "dit", "--out", str(out), "--steps", "2"]) == 2
    assert "--arch dit needs square image data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["train", "fm", "--arch", "cnn", "--out", str(out)])
    assert info.value.code == 2 and "invalid choice: 'cnn'" in capsys.readouterr().err
    assert not out.exists()


def test_architecture_dicts_and_networks():
    train = {"hidden": 64, "depth": 2, "time_dim": 16, "dropout": 0.0}

    class Unscaled:
        network_time_scale = 1.0

    mlp = architecture("mlp", train, (2,), object)
    assert mlp == {"arch": "mlp", "dim": 2, "hidden": 64, "depth": 2, "time_dim": 16, "dropout": 0.0,
                   "time_scale": 1000.0, "time_mode": "ts"}
    dit = architecture("dit", train, (64,), Unscaled)
    assert dit == {"arch": "dit", "img_size": 8, "in_ch": 1, "patch": 2, "hidden": 64, "depth": 2, "heads": 2,
                   "time_dim": 16, "time_scale": 1.0, "time_mode": "ts"}
    net = network(dit)
    assert isinstance(net, FlatImageFlowMap) and net.dit.num_tokens == 16 and net.dit.time.time_scale == 1.0
    x = torch.randn(3, 64)
    with torch_backend():
        assert net(x, torch.rand(3), torch.rand(3)).shape == (3, 64)
    # a checkpoint written before the arch key existed is an MLP at the networks' default time scale
    legacy = network({"dim": 2, "hidden": 8, "depth": 1, "time_dim": 4})
    assert type(legacy).__name__ == "MLPFlowMap" and legacy.time.time_scale == 1000.0 and legacy.time.mode == "ts"
    # shortcut's, lsd's and psd's networks embed (t, t − s); esd's and flow matching's (t, s)
    for name, mode in (("psd", "t_delta"), ("shortcut", "t_delta"), ("lsd", "t_delta"), ("esd", "ts"),
                       ("fm", "ts"), ("f2d2", "ts")):
        arch = architecture("mlp", train, (2,), get_method(name))
        assert arch["time_mode"] == mode and network(arch).time.mode == mode, name
        assert network(architecture("dit", train, (64,), get_method(name))).dit.time.mode == mode, name
    assert architecture("mlp", train, (2,), get_method("esd"))["time_scale"] == 1.0   # du/dt in its target
    assert image_geometry((64,)) == (1, 8) and image_geometry((2,)) is None and image_geometry((63,)) is None
    with pytest.raises(ValueError, match="--dropout applies to --arch mlp only"):
        architecture("dit", {**train, "dropout": 0.1}, (64,), object)


def test_f2d2_trains_a_dit_joint_flow_map_from_a_dit_teacher(tmp_path, capsys):
    """--arch dit for f2d2: the DiT gets its scalar D head, starts from the DiT teacher's weights, trains, and the
    checkpoint's model gives a few-step NLL (the likelihood report, exact divergences in 64 dimensions, is left
    out: minutes on a CPU)."""
    from flowkern.train import checkpoint as ckpt
    from flowkern.train.rebuild import restore

    teacher = tmp_path / "fm"
    with torch_backend(), one_thread():
        assert main(["train", "fm", "--out", str(teacher), *TINY_DIT]) == 0
        out = tmp_path / "f2d2"
        assert main(["train", "f2d2", "--teacher", str(teacher / "checkpoint.pt"), "--out", str(out), *TINY_DIT]) == 0
        state = ckpt.load(out / "checkpoint.pt")
        assert state["arch"]["arch"] == "dit" and state["arch"]["divergence_head"] is True
        _, model = restore(state)
        x = torch.randn(4, 64)
        u, d = model(x, torch.ones(4), torch.zeros(4))
        assert u.shape == (4, 64) and d.shape == (4,)
        nll = flowkern.flow_map_log_likelihood(model, x, steps=2)
    assert nll.shape == (4,) and bool(torch.isfinite(nll).all())
    assert "f2d2 (EMA)" in capsys.readouterr().out
