"""Learning-rate schedules keyed to the optimizer step and the planned total ``max_steps``.

A schedule is a curve ``f(t)`` over ``t`` in ``[0, max_steps]`` (``t`` = number of updates done):

* warmup, ``0 <= t <= W``: ``f(t) = base_lr * t / W``, so ``f(W) = base_lr``;
* then by ``name``:
  - ``cosine``: ``f = min_lr + (base_lr - min_lr) * 0.5 * (1 + cos(pi * p))``, ``p = (t - W) / (max_steps - W)``;
  - ``linear``: ``f = base_lr - (base_lr - min_lr) * p``, same ``p``;
  - ``constant``: ``f = base_lr`` (``min_lr`` is not used);
  - ``wsd``: ``base_lr`` until ``max_steps - D``, then decay to ``min_lr`` over the last ``D`` steps
    with ``p = (t - (max_steps - D)) / D`` and the shape ``decay_shape``
    (``linear``: ``1 - p``; ``cosine``: ``0.5 * (1 + cos(pi * p))``; ``1-sqrt``: ``1 - sqrt(p)``).

The update with 0-based index ``step`` (the one that produces step ``step + 1``) uses
``lr_at(step) = f(step + 1)``: the first update already has a non-zero LR ``base_lr / W`` and the last
update (``step = max_steps - 1``) uses exactly ``min_lr``. Nothing here depends on devices,
micro-batch size or gradient accumulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from midtrain.errors import MidtrainError

ScheduleName = Literal["cosine", "wsd", "linear", "constant"]
DecayShape = Literal["linear", "cosine", "1-sqrt"]
DEFAULT_WSD_DECAY_FRACTION = 0.1


@dataclass
class LRSchedule:
    """Learning-rate schedule over optimizer steps (warmup, then cosine / wsd / linear / constant)."""

    name: ScheduleName = "cosine"
    """Shape after warmup: cosine or linear decay to min_lr, wsd (warmup-stable-decay), or constant."""
    warmup_steps: int | None = None
    """Warmup length in optimizer steps. Give this or warmup_fraction (or neither: no warmup)."""
    warmup_fraction: float | None = None
    """Warmup length as a fraction of max_steps (rounded to the nearest step)."""
    min_lr: float = 0.0
    """Absolute learning rate reached by the last optimizer step (not used by constant)."""
    decay_steps: int | None = None
    """wsd only: length of the final decay phase in optimizer steps. Give this or decay_fraction."""
    decay_fraction: float | None = None
    """wsd only: length of the final decay phase as a fraction of max_steps (default 0.1)."""
    decay_shape: DecayShape = "linear"
    """wsd only: shape of the final decay: linear, cosine or 1-sqrt."""

    def warmup_for(self, max_steps: int) -> int:
        """Warmup length in steps for a run of ``max_steps`` optimizer steps."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        if self.warmup_fraction is not None:
            return round(self.warmup_fraction * max_steps)
        return 0

    def decay_for(self, max_steps: int) -> int:
        """Length in steps of the final decay phase (wsd); ``max_steps - warmup`` for cosine and linear."""
        if self.name == "constant":
            return 0
        if self.name != "wsd":
            return max_steps - self.warmup_for(max_steps)
        if self.decay_steps is not None:
            return self.decay_steps
        fraction = DEFAULT_WSD_DECAY_FRACTION if self.decay_fraction is None else self.decay_fraction
        return max(1, round(fraction * max_steps))

    def validate(self, max_steps: int) -> None:
        """Raise MidtrainError if this schedule makes no sense for a run of ``max_steps`` steps."""
        where = "lr schedule"
        if self.name not in get_args(ScheduleName):
            raise MidtrainError(f"{where}: unknown name {self.name!r}; valid names are {list(get_args(ScheduleName))}.")
        if self.decay_shape not in get_args(DecayShape):
            raise MidtrainError(
                f"{where}: unknown decay_shape {self.decay_shape!r}; valid shapes are {list(get_args(DecayShape))}."
            )
        if max_steps < 1:
            raise MidtrainError(f"{where}: max_steps must be >= 1, got {max_steps}.")
        if self.warmup_steps is not None and self.warmup_fraction is not None:
            raise MidtrainError(f"{where}: give warmup_steps or warmup_fraction, not both.")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise MidtrainError(f"{where}: warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1:
            raise MidtrainError(f"{where}: warmup_fraction must be in [0, 1), got {self.warmup_fraction}.")
        warmup = self.warmup_for(max_steps)
        if warmup >= max_steps:
            raise MidtrainError(
                f"{where}: warmup ({warmup} steps) must be shorter than max_steps ({max_steps}); "
                "lower warmup_steps / warmup_fraction or raise max_steps."
            )
        if self.min_lr < 0:
            raise MidtrainError(f"{where}: min_lr must be >= 0, got {self.min_lr}.")
        if self.name != "wsd":
            if self.decay_steps is not None or self.decay_fraction is not None:
                raise MidtrainError(
                    f"{where}: decay_steps / decay_fraction are only used by name=wsd, got name={self.name!r}."
                )
            return
        if self.decay_steps is not None and self.decay_fraction is not None:
            raise MidtrainError(f"{where}: give decay_steps or decay_fraction, not both.")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise MidtrainError(f"{where}: decay_steps must be >= 1, got {self.decay_steps}.")
        if self.decay_fraction is not None and not 0 < self.decay_fraction <= 1:
            raise MidtrainError(f"{where}: decay_fraction must be in (0, 1], got {self.decay_fraction}.")
        decay = self.decay_for(max_steps)
        if warmup + decay > max_steps:
            raise MidtrainError(
                f"{where}: warmup ({warmup}) + decay ({decay}) steps exceed max_steps ({max_steps}); "
                "shorten one of them."
            )

    def check(self, base_lr: float, max_steps: int) -> None:
        """``validate`` plus the checks that need the base learning rate."""
        self.validate(max_steps)
        if not base_lr > 0:
            raise MidtrainError(f"lr schedule: the base learning rate must be > 0, got {base_lr}.")
        if self.name != "constant" and self.min_lr > base_lr:
            raise MidtrainError(
                f"lr schedule: min_lr ({self.min_lr}) must not exceed the base learning rate ({base_lr})."
            )

    def lr(self, step: int, max_steps: int, base_lr: float) -> float:
        """Learning rate for the update with 0-based index ``step``, for a schedule already checked
        (:meth:`check`)."""
        if not 0 <= step < max_steps:
            raise MidtrainError(f"lr schedule: step {step} is outside the run's steps [0, {max_steps}).")
        t = step + 1
        warmup = self.warmup_for(max_steps)
        if t <= warmup:
            return base_lr * t / warmup
        if self.name == "constant":
            return base_lr
        decay = self.decay_for(max_steps)
        decay_start = max_steps - decay
        if t <= decay_start:
            return base_lr
        shape = self.decay_shape if self.name == "wsd" else self.name
        factor = _decay_factor(shape, (t - decay_start) / decay)
        return self.min_lr + (base_lr - self.min_lr) * factor

    def describe(self, base_lr: float, max_steps: int) -> str:
        """One line for the run log, e.g. ``cosine: warmup 100 steps to 0.0003, then decay to 3e-05 by step 1000``."""
        warmup = self.warmup_for(max_steps)
        start = f"warmup {warmup} steps to {base_lr:g}" if warmup else f"no warmup, start at {base_lr:g}"
        if self.name == "constant":
            return f"constant: {start}, then constant until step {max_steps}"
        if self.name == "wsd":
            decay = self.decay_for(max_steps)
            return (
                f"wsd: {start}, stable until step {max_steps - decay}, then {self.decay_shape} decay "
                f"to {self.min_lr:g} over the last {decay} of {max_steps} steps"
            )
        return f"{self.name}: {start}, then {self.name} decay to {self.min_lr:g} by step {max_steps}"


def _decay_factor(shape: str, progress: float) -> float:
    """1 at progress 0, 0 at progress 1."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - math.sqrt(progress)


def lr_at(step: int, max_steps: int, base_lr: float, schedule: LRSchedule) -> float:
    """Learning rate for the optimizer update with 0-based index ``step`` (see the module docstring), after
    checking the schedule; a training run checks it once and then calls :meth:`LRSchedule.lr` every step."""
    schedule.check(base_lr, max_steps)
    return schedule.lr(step, max_steps, base_lr)
