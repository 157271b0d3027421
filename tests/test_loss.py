"""The one-pass chunked loss agrees with torch's cross_entropy: mean, gradient, per-sequence sums, masking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from litgpt.utils import chunked_cross_entropy

from midtrain.train.loss import IGNORE_INDEX, micro_batch_loss, token_losses


def _batch(b: int = 3, t: int = 11, v: int = 37, ignored: float = 0.3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (b, t), generator=g)
    targets[torch.rand(b, t, generator=g) < ignored] = IGNORE_INDEX
    return logits, targets


@pytest.mark.parametrize("chunk_size", [0, 1, 5, 33, 128])
def test_token_losses_match_cross_entropy_for_every_chunk_size(chunk_size):
    logits, targets = _batch()
    expected = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, T], 0 where ignored
    got = token_losses(logits, targets, chunk_size=chunk_size)
    assert got.shape == targets.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float())
    assert (got[targets == IGNORE_INDEX] == 0).all()


@pytest.mark.parametrize("chunk_size", [0, 7])
def test_mean_and_gradient_match_litgpt_chunked_cross_entropy(chunk_size):
    logits, targets = _batch(seed=1)
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.clone().requires_grad_()
    loss = micro_batch_loss(ours_in, targets, chunk_size=chunk_size)
    loss.mean().backward()
    ref = chunked_cross_entropy(ref_in, targets, chunk_size=chunk_size)
    ref.backward()
    torch.testing.assert_close(loss.mean().double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-5, atol=1e-7)


def test_per_sequence_sums_and_counts():
    logits, targets = _batch(b=4, t=9, seed=2)
    targets[2] = IGNORE_INDEX  # a sequence with nothing scored
    loss = micro_batch_loss(logits, targets, chunk_size=4)
    for i in range(4):
        keep = targets[i] != IGNORE_INDEX
        expected = F.cross_entropy(logits[i][keep], targets[i][keep], reduction="sum") if keep.any() else 0.0
        torch.testing.assert_close(loss.seq_sum[i].double(), torch.as_tensor(expected, dtype=torch.float64))
        assert int(loss.seq_count[i]) == int(keep.sum())
    assert int(loss.scored) == int((targets != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss.total, loss.seq_sum.sum())
    assert not loss.seq_sum.requires_grad


def test_nothing_scored_gives_zero_loss_and_zero_gradient():
    logits, targets = _batch(b=2, t=5)
    logits.requires_grad_()
    loss = micro_batch_loss(logits, torch.full_like(targets, IGNORE_INDEX))
    loss.mean().backward()
    assert float(loss.mean().detach()) == 0.0 and int(loss.scored) == 0
    assert (logits.grad == 0).all()


def test_bfloat16_logits_are_not_copied_to_float32_and_give_float32_sums():
    logits, targets = _batch(b=2, t=6, ignored=0.0)
    loss = micro_batch_loss(logits.bfloat16(), targets)
    assert loss.seq_sum.dtype == torch.float32
    expected = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(dim=1)
    torch.testing.assert_close(loss.seq_sum.double(), expected, rtol=2e-2, atol=2e-2)


def test_shape_mismatch_is_an_error():
    logits, targets = _batch()
    with pytest.raises(ValueError, match="do not match"):
        token_losses(logits, targets[:, :-1])
