"""Why a run ended early: an exception per cause, each with the exit status of `flowkern train`."""
from __future__ import annotations


class TrainingStopped(RuntimeError):
    """A run that ended before its last step; `exit_code` is the command's exit status."""

    exit_code = 1


class TrainingInterrupted(TrainingStopped):
    """SIGINT or SIGTERM: the step in progress was finished and the checkpoint saved (exit 128 + signal number)."""

    def __init__(self, message: str, signum: int, step: int, checkpoint=None):
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum


class TrainingDiverged(TrainingStopped):
    """Too many consecutive steps skipped by the NaN/Inf guard."""


class RankTimeout(TrainingStopped):
    """A DDP rank stopped answering within the process group's timeout."""
