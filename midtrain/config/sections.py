"""Training and evaluation arguments (litgpt's field names where the meaning is the same)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from midtrain.config.schedules import LRSchedule
from midtrain.errors import MidtrainError


@dataclass
class TrainArgs:
    """How long and how to train. Length is absolute: ``max_steps`` optimizer steps in total."""

    max_steps: int | None = None
    """Total optimizer steps of the run (61035 in the midtraining paper). A resumed run trains the rest."""
    max_additional_steps: int | None = None
    """Stop after this many more optimizer steps than the step resumed from (LR horizon stays max_steps)."""
    global_batch_size: int = 512
    """Sequences per optimizer step, over all devices."""
    micro_batch_size: int = 4
    """Sequences per forward pass per device."""
    max_seq_length: int | None = None
    """Tokens per training sequence (defaults to the model's block size)."""
    save_interval: int | None = 1000
    """Write a checkpoint every this many optimizer steps (None: only at the end)."""
    log_interval: int = 1
    """Log every this many optimizer steps."""
    max_norm: float | None = 1.0
    """Gradient clipping norm (None: no clipping)."""
    lr_schedule: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    """Learning-rate schedule, a function of the optimizer step and max_steps only."""
    lr_warmup_steps: int | None = None
    """Linear warmup length in optimizer steps."""
    lr_warmup_fraction: float | None = None
    """Linear warmup length as a fraction of max_steps (instead of lr_warmup_steps)."""
    lr_decay_fraction: float | None = None
    """WSD: length of the final decay phase as a fraction of max_steps (default 0.1)."""
    min_lr: float = 0.0
    """Learning rate at the end of the schedule."""
    tie_embeddings: bool | None = None
    """Tie the input embedding and output head weights."""
    keep_last_checkpoints: int | None = None
    """Delete older step checkpoints, keeping this many (None: keep all)."""

    def gradient_accumulation_iters(self, world_size: int, processes: str | None = None) -> int:
        """Micro-batches per optimizer step on each of ``world_size`` processes."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            lower = self.global_batch_size // per_step * per_step
            valid = ", ".join(str(n) for n in (lower, lower + per_step) if n > 0)
            raise MidtrainError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of train.micro_batch_size "
                f"({self.micro_batch_size}) x {processes or 'processes'} ({world_size}) = {per_step}; "
                f"use e.g. {valid}."
            )
        return self.global_batch_size // per_step

    def schedule(self) -> LRSchedule:
        """The LR schedule these fields describe."""
        return LRSchedule(
            name=self.lr_schedule, warmup_steps=self.lr_warmup_steps, warmup_fraction=self.lr_warmup_fraction,
            min_lr=self.min_lr, decay_fraction=self.lr_decay_fraction,
        )

    def validate(self, length_from_epochs: bool = False) -> None:
        """Called once, when the command's config is built (``length_from_epochs``: finetune's ``epochs`` sets
        ``max_steps`` once the SFT split is loaded)."""
        if not length_from_epochs and (self.max_steps is None or self.max_steps < 1):
            raise MidtrainError("train.max_steps must be set to the total number of optimizer steps (>= 1).")
        if self.max_additional_steps is not None and self.max_additional_steps < 1:
            raise MidtrainError("train.max_additional_steps must be >= 1 when set.")
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise MidtrainError("train.micro_batch_size and train.global_batch_size must be >= 1.")
        if self.log_interval < 1:
            raise MidtrainError("train.log_interval must be >= 1.")


@dataclass
class EvalArgs:
    """Validation on every named set in ``data.val_data_path``."""

    interval: int = 1000
    """Evaluate every this many optimizer steps."""
    max_samples: int | None = 512
    """Sequences per validation set (a fixed budget, independent of batch size and devices; None: all)."""
    batch_size: int | None = None
    """Sequences per validation forward pass (default: train.micro_batch_size)."""
    initial_validation: bool = False
    """Evaluate before the first step."""
    final_validation: bool = True
    """Evaluate after the last step."""
