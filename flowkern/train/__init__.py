"""The training engine: one loop for every method (`Trainer`), its config, EMA, checkpoints, DDP plumbing.

    trainer = Trainer(method, dataset.sample, TrainConfig(steps=2000, batch=512), out_dir="runs/fm")
    trainer.fit(); model = trainer.eval_model()

`fit` ends early with a `TrainingStopped`: `TrainingInterrupted` (SIGINT/SIGTERM, checkpoint saved),
`TrainingDiverged` (too many consecutive skipped steps), `RankTimeout` (a DDP rank stopped answering); a checkpoint
that cannot be written raises `CheckpointWriteError` (the previous one is kept).
"""
from flowkern.train.checkpoint import CheckpointError, CheckpointWriteError
from flowkern.train.config import TrainConfig
from flowkern.train.ema import EMA
from flowkern.train.loop import Trainer
from flowkern.train.stops import RankTimeout, TrainingDiverged, TrainingInterrupted, TrainingStopped

__all__ = ["EMA", "CheckpointError", "CheckpointWriteError", "RankTimeout", "TrainConfig", "Trainer",
           "TrainingDiverged", "TrainingInterrupted", "TrainingStopped"]
