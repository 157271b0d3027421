"""SFT micro-batches: padded to their own longest row, replay rows in micro-batches of their own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from litgpt.config import Config
from litgpt.model import GPT

from midtrain.data.sft import IGNORE_INDEX, plan_micro_batches, step_micro_batches
from midtrain.train.loss import micro_batch_loss

SEQ = 32


def _sft_sample(length: int, prompt: int, seed: int) -> dict:
    ids = torch.randint(1, 50, (length,), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:prompt] = IGNORE_INDEX  # a masked prompt
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize(("n_sft", "n_replay", "micro"), [(6, 2, 4), (8, 0, 2), (3, 5, 2), (1, 7, 8), (0, 4, 4)])
def test_plan_covers_every_row_once_and_never_mixes_replay_with_sft(n_sft, n_replay, micro):
    lengths = [(7 * i) % 11 + 3 for i in range(n_sft)]
    plans = plan_micro_batches(lengths, n_replay, micro)
    sft = [i for p in plans if not p.replay for i in p.rows]
    replay = [i for p in plans if p.replay for i in p.rows]
    assert sorted(sft) == list(range(n_sft)) and sorted(replay) == list(range(n_replay))  # exact counts
    assert all(1 <= len(p.rows) <= micro for p in plans)
    assert [lengths[i] for i in sft] == sorted(lengths, reverse=True)  # longest first
    assert len(plans) == -(-n_sft // micro) + -(-n_replay // micro)


def test_sft_micro_batches_are_padded_to_their_longest_row_not_to_the_replay_length():
    lengths = [5, 30, 7, 9, 28, 6]
    samples = [_sft_sample(n, 2, seed=i) for i, n in enumerate(lengths)]
    replay = torch.randint(0, 50, (2, SEQ + 1))
    batches = step_micro_batches(samples, replay, micro_batch_size=4)
    shapes = [(is_replay, tuple(b["input_ids"].shape)) for is_replay, b in batches]
    assert shapes == [(False, (4, 29)), (False, (2, 5)), (True, (2, SEQ))]  # 30, 28, 9, 7 | 6, 5
    for _, b in batches:
        assert b["input_ids"].shape == b["labels"].shape and b["input_ids"].dtype == torch.long
    torch.testing.assert_close(batches[-1][1]["labels"], replay[:, 1:].long())  # replay: every target scored


def test_grouping_does_not_change_the_step_loss():
    """The sum of token losses and the scored count over the planned micro-batches equal the row-by-row values."""
    torch.manual_seed(0)
    model = GPT(Config(n_layer=1, n_head=2, n_embd=16, block_size=SEQ, vocab_size=64, padded_vocab_size=64)).eval()
    lengths = [5, 30, 7, 9, 28, 6, 12]
    samples = [_sft_sample(n, 3, seed=10 + i) for i, n in enumerate(lengths)]
    replay = torch.randint(0, 64, (3, SEQ + 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        total, scored, replay_total = 0.0, 0, 0.0
        for is_replay, b in step_micro_batches(samples, replay, micro_batch_size=2):
            loss = micro_batch_loss(model(b["input_ids"]), b["labels"], chunk_size=5)
            total, scored = total + float(loss.total), scored + int(loss.scored)
            replay_total += float(loss.total) if is_replay else 0.0
        expected, expected_count, expected_replay = 0.0, 0, 0.0
        for s in samples:
            logits = model(s["input_ids"][None, :-1])[0]
            expected += float(F.cross_entropy(logits, s["labels"][1:], reduction="sum"))
            expected_count += int((s["labels"][1:] != IGNORE_INDEX).sum())
        for row in replay:
            expected_replay += float(F.cross_entropy(model(row[None, :-1].long())[0], row[1:].long(), reduction="sum"))
    assert scored == expected_count + 3 * SEQ
    assert total == pytest.approx(expected + expected_replay, rel=1e-5)
    assert replay_total == pytest.approx(expected_replay, rel=1e-5)
