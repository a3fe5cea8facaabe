"""Stopping a run that cannot make progress, with the cause named.

- a non-finite loss (the step's loss is computed on the parameters before its update);
- adapter weights that became non-finite in an update (checked before they are saved);
- a dead gradient: the global gradient norm exactly 0 for ZERO_GRAD_STEPS steps in a row while the loss is
  positive (a batch without target tokens has loss 0 and is not counted).
"""
from __future__ import annotations

import math

ZERO_GRAD_STEPS = 5


class TrainingStopped(RuntimeError):
    """Training stopped because it cannot make progress; the message names the cause."""


class NonFiniteLoss(TrainingStopped):
    """The loss or the adapter weights stopped being finite."""


class DeadGradient(TrainingStopped):
    """The gradient was exactly zero for several steps in a row."""


class Guard:
    """check(step, loss, grad_norm, params_finite) after every step (step numbers from 1)."""

    def __init__(self, zero_grad_steps: int = ZERO_GRAD_STEPS):
        self.zero_grad_steps = zero_grad_steps
        self.zero_since: int | None = None

    def check(self, step: int, loss: float, grad_norm: float, params_finite: bool, *, last_good: str) -> None:
        hint = "try a lower --lr or --max-grad-norm; --resume --force continues from a checkpoint with them"
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"loss became {loss} at step {step}: training stopped; {last_good}; {hint}")
        if not params_finite:
            raise NonFiniteLoss(f"the adapter weights became non-finite in the update of step {step} (loss "
                                f"{loss:.4f}, gradient norm {grad_norm:.3g}): training stopped; {last_good}; "
                                f"{hint}")
        if grad_norm == 0.0 and loss > 0.0:
            self.zero_since = step if self.zero_since is None else self.zero_since
            if step - self.zero_since + 1 >= self.zero_grad_steps:
                raise DeadGradient(f"the gradient norm was exactly 0 at steps {self.zero_since}-{step} with the "
                                   f"loss at {loss:.4f}: the adapters no longer learn (a too-high --lr can "
                                   f"saturate the network); training stopped")
        else:
            self.zero_since = None
