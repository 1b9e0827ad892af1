"""Progressive distillation (Salimans & Ho, 2022) of a flowkern flow-matching teacher: loss and targets.

Convention. The paper works in VP/logSNR time with an x̂-parameterised DDIM sampler; flowkern's linear interpolant
x_t = (1 − t)·x₀ + t·ε has the same DDIM step, which for this path IS the Euler step of the flow:

    x_s = (s/t)·x_t + (1 − s/t)·x̂₀   =   x_t + (s − t)·v,   v = (x_t − x̂₀)/t.

Target. The student's one step of size 2Δ from t must land where the teacher's two Euler steps of size Δ land:
    x' = x_t − Δ·v_T(x_t, t),   x'' = x' − Δ·v_T(x', t − Δ),
    (t''/t)·x_t + (1 − t''/t)·x̂ = x''  with t'' = t − 2Δ   ⇒   x̂_target = (t·x'' − t''·x_t)/(2Δ)
(at t'' = 0, x̂_target = x''). The student is a velocity network net(x, t, t) like the teacher (so it starts as a
copy of the teacher), its x̂ = x_t − t·net(x_t, t, t), and the loss is ‖x̂ − x̂_target‖²/t² = ‖net − v_target‖² with
v_target = (x_t − x̂_target)/t: the x̂ error weighted by 1/t² (the paper's "SNR + 1"-type weighting, which keeps
the weight finite at t = 1 where the x̂ error is what matters; t ≥ 1/N on the grid, so it is finite at t → 0 too).

Rounds. Round r trains a student of N_r = start_steps/2^r steps (t on the grid i/N_r, i = 1..N_r) against a
teacher of 2·N_r steps; every `round_steps` optimizer steps the student becomes the teacher and N halves, down to
`min_steps` (by default the run's `total_steps` shared equally by the log₂(start_steps/min_steps) + 1 rounds).
N is a pure function of the step, and the teacher copy is a registered submodule, so a checkpoint resumes exactly.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from flowkern._precision import accumulation_dtype
from flowkern._validate import check_bool, check_tensor
from flowkern.flow_map.jump import jump_prevalidated
from flowkern.flow_map import sample as flow_map_sample
from flowkern.methods._util import check_positive_int, frozen_copy, whole_state_dict
from flowkern.methods.base import Method
from flowkern.methods.edm import check_sample_args, col


def two_step_target(teacher: Callable, x: Tensor, t: Tensor, delta: Tensor) -> Tensor:
    """x̂_target = (t·x'' − (t − 2Δ)·x_t)/(2Δ) from the teacher's two Euler steps x_t → x' → x'' of size Δ (module
    docstring). x: [B, ...]; t, delta: [B] with t − 2Δ ≥ 0 and Δ > 0. Float32 (float64 for float64 x), no grad."""
    acc = accumulation_dtype(x.dtype)
    t, delta = t.to(acc), delta.to(acc)
    with torch.no_grad():
        x = x.to(acc)
        t_mid, t_end = t - delta, t - 2 * delta
        x_mid = jump_prevalidated(x, teacher(x, t, t).to(acc), t, t_mid)
        x_end = jump_prevalidated(x_mid, teacher(x_mid, t_mid, t_mid).to(acc), t_mid, t_end)
        return (col(t, x) * x_end - col(t_end, x) * x) / col(2 * delta, x)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def round_count(start_steps: int, min_steps: int) -> int:
    """Rounds of start_steps → start_steps/2 → … → min_steps: log₂(start_steps/min_steps) + 1."""
    return int(start_steps).bit_length() - int(min_steps).bit_length() + 1


class ProgressiveDistillation(Method):
    """Progressive distillation: halving rounds of "one student step = two teacher steps" (module docstring).

    Args:
        model: the student, a velocity network net(x, t, t) with the teacher's architecture; it is loaded with
            the teacher's weights here.
        teacher: the flow-matching teacher (required); a frozen copy is kept and replaced by the student at each
            halving.
        total_steps: optimizer steps of the whole run (sets the default round length).
        start_steps: student sampling steps in the first round (the teacher takes twice that); a power of two.
        round_steps: optimizer steps per halving round (None: total_steps shared equally by the rounds).
        min_steps: student steps of the last round (a power of two <= start_steps); N stays there after.
        round_anneal: multiply the learning rate by a linear anneal to 0 within each round, so each student
            converges before it becomes the teacher.
    """

    name: ClassVar[str] = "pd"
    needs_teacher: ClassVar[bool] = True
    init_from_teacher: ClassVar[bool] = True

    def __init__(self, model: nn.Module, *, teacher: nn.Module | None = None, total_steps: int,
                 start_steps: int = 64, round_steps: int | None = None, min_steps: int = 1,
                 round_anneal: bool = True):
        if teacher is None:
            raise ValueError("progressive distillation needs a teacher (a flow-matching velocity network)")
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        super().__init__(model, teacher=frozen_copy(teacher))
        self.total_steps = check_positive_int("total_steps", total_steps)
        self.start_steps = check_positive_int("start_steps", start_steps)
        self.min_steps = check_positive_int("min_steps", min_steps)
        self.round_anneal = check_bool("round_anneal", round_anneal)
        for name, n in (("start_steps", self.start_steps), ("min_steps", self.min_steps)):
            if not _is_power_of_two(n):
                raise ValueError(f"{name} must be a power of two (the steps halve every round), got {n}")
        if self.min_steps > self.start_steps:
            raise ValueError(f"min_steps ({self.min_steps}) must be <= start_steps ({self.start_steps})")
        if round_steps is None:
            round_steps = max(self.total_steps // round_count(self.start_steps, self.min_steps), 1)
        self.round_steps = check_positive_int("round_steps", round_steps)
        try:
            self.model.load_state_dict(self.teacher.state_dict())
        except RuntimeError as err:
            raise ValueError("the student must have the teacher's architecture (it starts as a copy of the "
                             f"teacher): {err}") from err

    def student_steps(self, step: int) -> int:
        """N at optimizer step `step` (0-based): max(min_steps, start_steps / 2^⌊step/round_steps⌋)."""
        step = max(int(step), 0)
        return max(self.min_steps, self.start_steps >> min(step // self.round_steps, 62))

    def lr_scale(self, step: int) -> float:
        """With round_anneal: 1 − (fraction of the current round done), restarting at 1 each round; the last round
        (N = min_steps) holds its final small value after its planned length. Else 1."""
        if not self.round_anneal:
            return 1.0
        last = (round_count(self.start_steps, self.min_steps) - 1) * self.round_steps
        into = step - last if step >= last else step % self.round_steps
        return max(1.0 - into / self.round_steps, 1.0 / self.round_steps)

    def targets(self, net: Callable, x0: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """(student velocity, v_target) for a batch, both float32 [B, ...]; the target carries no grad."""
        check_tensor("x0", x0)
        x0 = x0.float()
        n = self.student_steps(step)
        batch = x0.shape[0]
        t = torch.randint(1, n + 1, (batch,), device=x0.device).float() / n
        delta = torch.full_like(t, 0.5 / n)
        eps = torch.randn_like(x0)
        x_t = (1 - col(t, x0)) * x0 + col(t, x0) * eps
        x0_target = two_step_target(self.teacher, x_t, t, delta)
        v_target = (x_t - x0_target) / col(t, x_t)
        return net(x_t, t, t).float(), v_target

    def loss(self, net: Callable, x0: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        pred, target = self.targets(net, x0, step)
        loss = ((pred - target) ** 2).mean()
        return loss, {"student_steps": float(self.student_steps(step))}

    def on_step_end(self, step: int) -> None:
        """At the end of a round the student becomes the teacher (N halves at the next step)."""
        if self.student_steps(step + 1) < self.student_steps(step):
            self.teacher.load_state_dict(whole_state_dict(self.model))

    def sample(self, model: nn.Module, noise: Tensor, steps: int) -> Tensor:
        """`steps` Euler/DDIM steps of the student velocity on the uniform grid from t = 1 to t = 0."""
        steps = check_sample_args(model, noise, steps)
        with torch.no_grad():
            return flow_map_sample(lambda x, t, s: model(x, t, t), noise, steps=steps)
