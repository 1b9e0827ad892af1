"""The training engine: one loop for every method (`Trainer`), its config, EMA, checkpoints, DDP plumbing.

    trainer = Trainer(method, dataset.sample, TrainConfig(steps=2000, batch=512), out_dir="runs/fm")
    trainer.fit(); model = trainer.eval_model()
"""
from flowkern.train.checkpoint import CheckpointError
from flowkern.train.config import TrainConfig
from flowkern.train.ema import EMA
from flowkern.train.loop import Trainer

__all__ = ["EMA", "CheckpointError", "TrainConfig", "Trainer"]
