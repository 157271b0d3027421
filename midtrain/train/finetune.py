"""``midtrain finetune``: full fine-tuning from a checkpoint, with replay of pretraining shards.

One readable loop, the same shape as ``midtrain pretrain``: the SFT data comes from a litgpt data
module (``JSON``, ``Alpaca``, ... with their prompt styles and ``mask_prompt``); ``replay.ratio`` of
the sequences of every optimizer step come from pretraining shards (layout: ``midtrain.data.replay``).

* **Loss.** The mean over all scored tokens of the optimizer step (all micro-batches, all
  processes): SFT response tokens (prompt tokens too when ``mask_prompt`` is off) and every
  next-token target of the replay sequences; padding never counts. ``ratio: 0`` is plain SFT.
* **Length.** ``train.max_steps`` optimizer steps, or ``epochs`` over the SFT training split:
  ``max_steps = ceil(epochs * n_train / sft_sequences_per_step)``. Epochs run back to back (a step
  may straddle two), each a fresh seeded permutation (``midtrain.data.sft``).
* **State.** The starting weights are loaded after ``fabric.setup`` (FSDP-safe); optimizer state is
  not taken from them. A checkpoint of this run holds model, optimizer, step, SFT samples consumed
  and the replay-stream state, so a requeue continues exactly (the same per-step losses as an
  uninterrupted run); resume policy, checkpoints and ``final/`` as in ``midtrain.train.runtime``, which runs the loop;
  this module supplies the step and the saved state (:class:`FinetuneSteps`).
* **Validation.** ``val/sft/loss`` on the data module's validation split and ``val/<name>/loss``
  on pretraining-shard sets (``val_data_path`` and ``replay.data.val_data_path``), at
  ``eval.interval`` and at the end.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from litgpt.tokenizer import Tokenizer
from torch.utils.data import DataLoader

from midtrain.config.checks import check_compatible
from midtrain.config.commands import FinetuneConfig
from midtrain.data.sft import IGNORE_INDEX, SFTOrder, StepBatches, scored_fraction, sft_val_loader, step_micro_batches
from midtrain.data.sharded_mixed import ShardedMixedDataset, ValWindows
from midtrain.errors import MidtrainError
from midtrain.preemption import shielded_iter
from midtrain.rundir import tokenizer_fingerprint
from midtrain.train.loss import micro_batch_loss
from midtrain.train.runtime import (
    PreemptionFlag,
    Start,
    TrainingRun,
    begin_run,
    build_model_and_optimizer,
    check_tokenizer,
    launch,
    load_initial_weights,
    resolve_start,
)


def setup(cfg: FinetuneConfig) -> None:
    """Run the command on ``cfg`` (its options and their help: :class:`FinetuneConfig`)."""
    launch(cfg, main, "finetune")


def main(fabric: L.Fabric, cfg: FinetuneConfig) -> None:
    preempt = PreemptionFlag(cfg.preemption_signal)
    start = resolve_start(fabric, cfg.resume, cfg.out_dir, cfg.base)
    if start.checkpoint is not None and "sft" not in start.saved:
        raise MidtrainError(
            f"{start.checkpoint} is not a fine-tuning checkpoint; to start from pretrained weights use checkpoint_dir."
        )
    sft = SFTData(fabric, cfg)
    train = sft.train  # with max_steps from epochs
    end_step = start.end_step(train.max_steps, train.max_additional_steps)
    check_tokenizer(
        fabric, cfg.tokenizer_dir, [path for _, path in cfg.shard_val_sets()] + _replay_shards(cfg.replay_data),
        cfg.base if start.checkpoint is None else None,
    )  # fmt: skip

    def check_resume() -> None:  # before begin_run writes anything
        if start.checkpoint is not None:
            if start.saved["sft"]["train_samples"] != len(sft.train_set):
                raise MidtrainError(
                    f"The SFT training split had {start.saved['sft']['train_samples']} samples at {start.checkpoint} "
                    f"and has {len(sft.train_set)} now; the saved data position would mean something else."
                )
            fingerprint = tokenizer_fingerprint(cfg.tokenizer_dir)
            check_compatible(start.saved, cfg.model, cfg.seq_len, fingerprint, start.checkpoint)

    if not begin_run(fabric, start, end_step, check_resume):
        return

    # model and optimizer (fresh; weights from the base checkpoint unless resuming)
    fabric.seed_everything(cfg.seed, verbose=False)  # the seed is in the saved hparams
    model, optimizer = build_model_and_optimizer(
        fabric, cfg.model, cfg.seq_len, cfg.optimizer, train.tie_embeddings, initialize=False, compile=cfg.compile
    )
    run = TrainingRun(
        fabric, start, model, optimizer, cfg.hparams(), cfg.model, cfg.seq_len, cfg.tokenizer_dir,
        train.keep_last_checkpoints, sft.val_loaders,
    )  # fmt: skip
    if start.checkpoint is not None:
        run.restore()
    else:
        load_initial_weights(fabric, model, cfg.base)
        fabric.print(f"Fine-tuning {cfg.base} (fresh optimizer).")
    run.fit(FinetuneSteps(fabric, cfg, sft, start), end_step, train, cfg.eval, preempt)


class SFTData:
    """The SFT splits of the litgpt data module, the replay stream and the validation loaders of one process;
    ``train`` has ``max_steps`` set (from ``epochs`` when given)."""

    def __init__(self, fabric: L.Fabric, cfg: FinetuneConfig) -> None:
        world, rank, seq_len, train = fabric.world_size, fabric.global_rank, cfg.seq_len, cfg.train
        self.n_replay = cfg.n_replay
        self.n_sft = train.global_batch_size - self.n_replay
        self.tokenizer = Tokenizer(cfg.tokenizer_dir)
        data = cfg.data
        data.connect(tokenizer=self.tokenizer, batch_size=train.micro_batch_size, max_seq_length=seq_len + 1)
        with fabric.rank_zero_first():
            data.prepare_data()
        data.setup()
        self.train_set = data.train_dataloader().dataset
        val_set = data.val_dataloader().dataset
        if len(self.train_set) < self.n_sft:
            raise MidtrainError(
                f"The SFT training split has {len(self.train_set)} samples, fewer than one step needs ({self.n_sft})."
            )
        _check_scored(self.train_set, val_set, seq_len, cfg.eval.max_samples, fabric)
        if cfg.epochs is not None:
            train = dataclasses.replace(train, max_steps=math.ceil(cfg.epochs * len(self.train_set) / self.n_sft))
        self.train = train
        eval_batch = cfg.eval.batch_size or train.micro_batch_size
        self.val_loaders: dict[str, DataLoader] = {}
        if len(val_set):
            self.val_loaders["sft"] = sft_val_loader(val_set, eval_batch, cfg.eval.max_samples, rank, world)
        for name, path in cfg.shard_val_sets():
            windows = ValWindows(path, seq_len + 1, cfg.eval.max_samples)
            self.val_loaders[name] = DataLoader(windows, batch_size=eval_batch)
        self.replay_loader = None
        if self.n_replay:
            cfg.replay_data.connect(self.tokenizer, batch_size=self.n_replay // world, max_seq_length=seq_len,
                                    with_source=True, global_batch_size=self.n_replay)  # fmt: skip
            self.replay_loader = cfg.replay_data.train_dataloader()


class FinetuneSteps:
    """Fine-tuning's part of the loop: SFT and replay rows per step, the loss as the mean over the step's scored
    tokens on all processes, SFT/replay losses and counts in the log, the data position in checkpoints."""

    def __init__(self, fabric: L.Fabric, cfg: FinetuneConfig, sft: SFTData, start: Start) -> None:
        self.fabric, self.cfg, self.sft = fabric, cfg, sft
        self.micro_batch_size, self.replay_loader = sft.train.micro_batch_size, sft.replay_loader
        self.consumed = 0
        self.counts = {"sft_tokens": 0, "replay_tokens": 0}  # scored tokens so far
        self.replay_by_source: dict[str, int] = {}
        if start.checkpoint is not None:
            saved = start.saved
            self.consumed = int(saved["sft"]["consumed"])
            self.counts = {k: int(saved["tokens"][k]) for k in self.counts}
            self.replay_by_source = dict(saved["replay"]["tokens_by_source"])
            if self.replay_loader is not None and saved["replay"]["loader"]:
                self.replay_loader.load_state_dict(saved["replay"]["loader"])
            fabric.print(f"{self.consumed} SFT samples consumed so far.")
        n_train, n_sft, n_replay, train = len(sft.train_set), sft.n_sft, sft.n_replay, sft.train
        sft_loader = DataLoader(
            sft.train_set,
            batch_sampler=StepBatches(SFTOrder(n_train, cfg.seed), self.consumed, n_sft, fabric.global_rank,
                                      fabric.world_size),
            num_workers=min(getattr(cfg.data, "num_workers", 0), len(os.sched_getaffinity(0))),  # never over the cores
            collate_fn=list,
        )  # fmt: skip
        fabric.print(
            f"Per step: {train.global_batch_size} sequences = {n_sft} SFT + {n_replay} replay "
            f"(each process: micro-batches of up to {train.micro_batch_size} SFT rows padded to their longest, "
            f"replay rows in micro-batches of their own); SFT train {n_train} samples, "
            f"{train.max_steps} steps = {train.max_steps * n_sft / n_train:.2f} epochs; "
            f"validation sets: {', '.join(sft.val_loaders) or 'none'}."
        )
        self.sft_iter = shielded_iter(sft_loader)
        self.replay_iter = shielded_iter(self.replay_loader) if self.replay_loader is not None else None
        # counters since the last flush into ``counts``/``replay_by_source`` (this process, host): scored SFT and
        # replay tokens, replay sequences per source
        n_sources = len(self.replay_loader.sources) if self.replay_loader is not None else 0
        self.pending = torch.zeros(2 + n_sources, dtype=torch.float64)
        # per part (sft, replay), this process: loss sums on the device (the window's and the last step's), scored
        # tokens and sequences on the host (the window's and the last step's); all reduced once per log step
        self.window_loss = torch.zeros(2, dtype=torch.float64, device=fabric.device)
        self.last_loss = torch.zeros_like(self.window_loss)
        self.window_rows = torch.zeros(2, 2, dtype=torch.float64)  # [part, (scored tokens, sequences)]
        self.last_rows = torch.zeros_like(self.window_rows)
        self.empty_steps = 0  # steps without a scored token on this process (a warning, not an error)
        self.scale: float | torch.Tensor = 1.0

    def micro_batches(self, step: int) -> list[tuple[bool, dict]]:
        replay_rows = None
        if self.replay_iter is not None:
            replay_batch = next(self.replay_iter)
            replay_rows = replay_batch["input_ids"]
            ones = torch.ones(len(replay_rows), dtype=torch.float64)
            self.pending[2:].index_add_(0, replay_batch["source"], ones)
        micro_batches = step_micro_batches(next(self.sft_iter), replay_rows, self.micro_batch_size)
        self.last_loss.zero_()
        self.last_rows.zero_()
        for is_replay, batch in micro_batches:
            scored = int((batch["labels"] != IGNORE_INDEX).sum())
            self.last_rows[int(is_replay)] += torch.tensor([scored, len(batch["labels"])], dtype=torch.float64)
        # the loss is the mean over the step's scored tokens on all processes; DDP/FSDP average gradients over
        # processes, so each one backpropagates world_size * (its sum of token losses) / (all scored tokens)
        self.scale = _loss_scale(self.fabric, float(self.last_rows[:, 0].sum()))
        self.empty_steps += int(self.last_rows[:, 0].sum() == 0)
        return micro_batches

    def loss(self, model: Any, part: tuple[bool, dict]) -> torch.Tensor:
        is_replay, batch = part
        input_ids = batch["input_ids"].to(self.fabric.device, non_blocking=True)
        labels = batch["labels"].to(self.fabric.device, non_blocking=True)
        loss = micro_batch_loss(model(input_ids), labels)  # the one pass over the logits
        self.last_loss[int(is_replay)] += loss.total.detach()
        return loss.total * self.scale

    def stepped(self) -> None:
        self.consumed += self.sft.n_sft
        self.window_loss += self.last_loss
        self.window_rows += self.last_rows
        self.pending[:2] += self.last_rows[:, 0]

    def log_values(self) -> torch.Tensor:
        host = torch.cat([self.window_rows.flatten(), self.last_rows.flatten(), self.pending,
                          torch.tensor([self.empty_steps])])  # fmt: skip
        return torch.cat([self.window_loss, self.last_loss, host.to(self.fabric.device)])

    def log_metrics(
        self, reduced: list[float], step: int, lr: float, window_steps: int, seconds: float
    ) -> tuple[dict, str]:
        (w_sft_loss, w_rep_loss, sft_loss, rep_loss, w_sft_tok, w_sft_seq, w_rep_tok, w_rep_seq, sft_tok, sft_seq,
         rep_tok, rep_seq), rest = reduced[:12], reduced[12:]  # fmt: skip
        self._add_pending(rest[:-1])
        if rest[-1]:
            self.fabric.print(f"warning: {int(rest[-1])} process-step(s) up to step {step} had no scored tokens "
                              "(responses cut by max_seq_length?).")  # fmt: skip
        metrics: dict[str, Any] = {
            "loss": (sft_loss + rep_loss) / max(sft_tok + rep_tok, 1),
            "lr": lr,
            "replay_fraction": w_rep_seq / (w_sft_seq + w_rep_seq),
            "replay_sequences": int(rep_seq),
            "sft_sequences": int(sft_seq),
            "epoch": self.consumed / len(self.sft.train_set),
            "tokens/sft": self.counts["sft_tokens"],
            "tokens/replay": self.counts["replay_tokens"],
            "step_time": seconds / window_steps,
        }
        for name, loss_sum, tokens in (("sft", w_sft_loss, w_sft_tok), ("replay", w_rep_loss, w_rep_tok)):
            if tokens:
                metrics[f"train/{name}/loss"] = loss_sum / tokens
        self.window_loss.zero_()
        self.window_rows.zero_()
        self.empty_steps = 0
        line = (f"epoch {metrics['epoch']:.2f} | replay {metrics['replay_sequences']}/"
                f"{self.sft.train.global_batch_size} | {metrics['step_time']:.2f} s/step")  # fmt: skip
        return metrics, line

    def _add_pending(self, reduced: list[float]) -> None:
        """Add every process's pending counters (``pending`` all-reduced) to the run's totals."""
        self.counts["sft_tokens"] += int(reduced[0])
        self.counts["replay_tokens"] += int(reduced[1])
        for src, n in zip(self.replay_loader.sources if self.replay_loader is not None else [], reduced[2:]):
            if n:
                self.replay_by_source[src.id] = self.replay_by_source.get(src.id, 0) + int(n) * self.cfg.seq_len
        self.pending.zero_()

    def state(self) -> dict:
        fabric, n_train = self.fabric, len(self.sft.train_set)
        self._add_pending(fabric.all_reduce(self.pending.to(fabric.device), reduce_op="sum").tolist())
        return {
            "sft": {"consumed": self.consumed, "epoch": self.consumed / n_train, "train_samples": n_train},
            "replay": {
                "ratio": self.cfg.replay.ratio,
                "sequences_per_step": self.sft.n_replay,
                "loader": self.replay_loader.state_dict() if self.replay_loader is not None else None,
                "tokens_by_source": self.replay_by_source,
            },
            "tokens": self.counts,
            "base_checkpoint": str(self.cfg.base),
        }

    def summary(self) -> dict:
        return {
            "max_steps": self.sft.train.max_steps,
            "base_checkpoint": str(self.cfg.base),
            "replay_ratio": self.cfg.replay.ratio,
            "replay_sequences_per_step": self.sft.n_replay,
            "sft_sequences_per_step": self.sft.n_sft,
            "epochs": self.consumed / len(self.sft.train_set),
            "tokens": self.counts,
            "replay_tokens_by_source": self.replay_by_source,
        }


# ---- helpers ---------------------------------------------------------------------------------


def _loss_scale(fabric: L.Fabric, scored: float) -> float | torch.Tensor:
    """``world_size / (scored tokens of the step on all processes)``; on several processes a device tensor from an
    all-reduce the host does not wait for (0 scored tokens: scale 1, the loss is then 0 anyway)."""
    if fabric.world_size == 1:
        return 1.0 / max(scored, 1.0)
    local = torch.tensor([scored], dtype=torch.float64, pin_memory=fabric.device.type == "cuda")
    total = fabric.all_reduce(local.to(fabric.device, non_blocking=True), reduce_op="sum")
    return fabric.world_size / total.clamp(min=1)


def _check_scored(train_set: Any, val_set: Any, seq_len: int, val_samples: int | None, fabric: L.Fabric) -> None:
    """Refuse SFT data whose responses are cut off by max_seq_length; say how much of it loses them."""
    hint = f"prompts fill all {seq_len + 1} tokens; raise train.max_seq_length or shorten the prompts"
    fraction = scored_fraction(train_set, limit=1000)
    if fraction == 0:
        raise MidtrainError(f"No SFT training sample keeps a scored response token: {hint}.")
    if fraction < 1:
        fabric.print(
            f"warning: {1 - fraction:.1%} of the SFT training samples (first 1000 checked) score nothing: {hint}."
        )
    if len(val_set) and scored_fraction(val_set, limit=val_samples) == 0:
        raise MidtrainError(f"No SFT validation sample keeps a scored response token: {hint}.")


def _replay_shards(replay_data: ShardedMixedDataset | None) -> list[Path]:
    if replay_data is None:
        return []
    return [s.path for s in replay_data.shards] + list(replay_data.val_paths.values())
