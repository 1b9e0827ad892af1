"""The method interface: one training method = its loss and targets; the engine (`flowkern.train`) owns the rest."""
from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn


class Method(torch.nn.Module):
    """One training method: loss and targets only. Owns the trainable network (self.model) and any frozen
    teacher / target copies (registered so state_dict() checkpoints them).

    Subclasses set `name` (the registry key, e.g. "fm") and implement `loss`; `sample` defaults to the flow-map
    sampler Φ(x, t, s) = x + (s − t)·u(x, t, s) on a uniform schedule from t = 1 (noise) to t = 0 (data).

    CLI options: a subclass may override `add_options(parser)` (add its own ``--flags`` to an argparse parser or
    argument group; use defaults so the command runs without them) and `from_options(model, args, teacher=None)`
    (build the method from the parsed namespace). The defaults add nothing and call ``cls(model, teacher=teacher)``
    (teacher only when given). `needs_teacher` says whether `flowkern train` must be given ``--teacher PATH`` (a
    flow-matching checkpoint); `init_from_teacher` whether the student starts from the teacher's weights.
    """

    name: ClassVar[str]
    OPTIONS: ClassVar[dict] = {}  # {option: (type, default, help)}: the --{name}-{option} CLI flags
    needs_teacher: ClassVar[bool] = False
    init_from_teacher: ClassVar[bool] = False

    def __init__(self, model: nn.Module, *, teacher: nn.Module | None = None, **options):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module or None, got {type(teacher).__name__}")
        if options:
            raise TypeError(f"{type(self).__name__} got unknown options: {', '.join(sorted(options))}")
        self.model = model
        if teacher is not None:
            teacher.requires_grad_(False).eval()
        self.teacher = teacher

    def train(self, mode: bool = True) -> Method:
        """Train mode for the student; a frozen teacher stays in eval mode (no dropout)."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def loss(self, net: Callable, x0: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        """Scalar float32 loss for a data batch x0 [B, ...]. `net` is the callable for the GRAD pass (the
        DDP-wrapped self.model under DDP, else self.model itself); no-grad passes (teacher, EMA target, JVP) use
        self.model / self.teacher directly."""
        raise NotImplementedError

    def sample(self, model: nn.Module, noise: Tensor, steps: int) -> Tensor:
        """Few-step sample from noise (t = 1) to data (t = 0) with `model` (the engine passes EMA weights)."""
        from flowkern.flow_map import sample

        return sample(model, noise, steps=steps)

    def lr_scale(self, step: int) -> float:
        """A factor on the engine's learning rate at optimiser step `step` (0-based), for methods with their own
        phases (progressive distillation anneals within each round); default 1."""
        return 1.0

    def on_step_end(self, step: int) -> None:
        """Curriculum / target updates, called after optimizer.step() (also when the step was skipped)."""

    @classmethod
    def add_options(cls, parser) -> None:
        """Add this method's ``--{name}-{option}`` flags (from its `OPTIONS` table) to `parser` (an argparse parser
        or argument group)."""
        from flowkern.methods._util import add_cli_options

        add_cli_options(parser, cls.name, cls.OPTIONS)

    @classmethod
    def option_values(cls, args) -> dict:
        """The constructor keywords from parsed CLI options; methods whose defaults depend on the run override it."""
        from flowkern.methods._util import cli_values

        return cli_values(args, cls.name, cls.OPTIONS)

    @classmethod
    def from_options(cls, model: nn.Module, args, *, teacher: nn.Module | None = None) -> Method:
        """Build the method from parsed CLI options (`args`, an argparse.Namespace)."""
        # an option still None here (e.g. sigma_data outside `flowkern train`) takes the constructor's default
        values = {k: v for k, v in cls.option_values(args).items() if v is not None}
        return cls(model, teacher=teacher, **values) if teacher is not None else cls(model, **values)
