"""The training loss, computed once per micro-batch: per-token cross-entropy in chunks.

One pass over the logits gives every token's loss (chunked over rows like litgpt's
``chunked_cross_entropy``, so the log-softmax temporaries stay small). From that one tensor come
the scalar the backward uses and the per-sequence sums the per-source statistics use; nothing
reads the logits a second time, and the logits are never copied to float32 (as in litgpt, the
cross-entropy runs in the logits' dtype; only the ``[B, T]`` per-token losses are float32).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class MicroBatchLoss(NamedTuple):
    """The loss of one micro-batch."""

    total: torch.Tensor
    """Sum of the scored tokens' losses (float32 scalar, differentiable)."""
    scored: torch.Tensor
    """Number of scored tokens (int64 scalar)."""
    seq_sum: torch.Tensor
    """Per sequence: sum of its scored tokens' losses (float32 ``[B]``, detached)."""
    seq_count: torch.Tensor
    """Per sequence: number of scored tokens (int64 ``[B]``)."""

    def mean(self) -> torch.Tensor:
        """Mean loss over the scored tokens (0 when none is scored); differentiable. No host sync."""
        return self.total / self.scored.clamp(min=1)


def token_losses(
    logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 128, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Cross-entropy of every target token, float32 ``[B, T]``; 0 where ``targets == ignore_index``.

    ``logits`` is ``[B, T, V]``; the rows are processed ``chunk_size`` at a time (0: all at once).
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    flat_logits = logits.reshape(-1, logits.size(-1))
    flat_targets = targets.reshape(-1)
    if chunk_size <= 0:
        losses = F.cross_entropy(flat_logits, flat_targets, ignore_index=ignore_index, reduction="none")
    else:
        losses = torch.cat(
            [
                F.cross_entropy(x, y, ignore_index=ignore_index, reduction="none")
                for x, y in zip(flat_logits.split(chunk_size), flat_targets.split(chunk_size))
            ]
        )
    return losses.float().view(targets.shape)


def micro_batch_loss(
    logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 128, ignore_index: int = IGNORE_INDEX
) -> MicroBatchLoss:
    """Sum, count, and per-sequence sums and counts of the token losses, from one pass over ``logits``."""
    per_token = token_losses(logits, targets, chunk_size, ignore_index)
    mask = targets != ignore_index
    seq_count = mask.sum(dim=1)
    # ignored positions are exactly 0 in ``per_token``, so plain sums are the sums over scored tokens
    return MicroBatchLoss(per_token.sum(), seq_count.sum(), per_token.detach().sum(dim=1), seq_count)
