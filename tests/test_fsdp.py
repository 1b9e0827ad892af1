"""FSDP2 (`torch.distributed.fsdp.fully_shard`) on CPU with gloo, 2 processes: the MeanFlow-style step of
tests/ddp_worker.py (flowkern.jvp through the sharded model, then the grad pass through it) gives, after 3 steps,
the parameters of one process training on the whole batch."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 fully_shard", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_path: str):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import ddp_worker

        import flowkern

        torch.set_num_threads(1)
        model = ddp_worker.make_model()
        fsdp.fully_shard(model)
        sharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
        with flowkern.use_backend("torch"):
            ddp_worker.train(model, rank, world)
        full = torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])   # every rank gathers
        torch.save({"params": full, "sharded": sharded}, f"{out_path}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp2_meanflow_steps_match_one_process(tmp_path):
    import ddp_worker

    import flowkern

    with flowkern.use_backend("torch"):
        single = ddp_worker.flat_params(ddp_worker.train(ddp_worker.make_model()))
    start = ddp_worker.flat_params(ddp_worker.make_model())
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "fsdp")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"fsdp.{r}") for r in range(2)]
    assert all(r["sharded"] for r in ranks)                       # the parameters really were sharded
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["params"], single, rtol=1e-5, atol=1e-6)
    assert (single - start).abs().max() > 1e-3                    # the steps moved the weights
