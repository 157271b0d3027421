"""``midtrain pretrain``: pretraining and midtraining on a ShardedMixedDataset, in one readable loop.

Same shape as ``litgpt pretrain`` (model, data, train, eval, optimizer, devices, ...), plus:
absolute length in optimizer steps, step-keyed LR schedules, mixture stages, exact resume of the
data stream, carry-over of stream positions when the mixture changes, several validation sets,
per-source loss and token logging, atomic checkpoints and SLURM preemption. This module supplies the
micro-batch step and the saved state (:class:`PretrainSteps`); the loop, resume policy, checkpoints,
validation and the end of a run with litgpt's ``final/`` live in ``midtrain.train.runtime``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops, measure_flops
from litgpt.config import Config
from litgpt.model import GPT
from litgpt.tokenizer import Tokenizer
from litgpt.utils import chunked_cross_entropy

from midtrain.config.commands import PretrainConfig
from midtrain.data.sharded_mixed import ShardedMixedDataset
from midtrain.preemption import shielded_iter
from midtrain.rundir import MIXTURE_HISTORY_FILE, write_json
from midtrain.train.loss import micro_batch_loss
from midtrain.train.runtime import (
    PreemptionFlag,
    Start,
    TrainingRun,
    begin_run,
    build_model_and_optimizer,
    launch,
    load_initial_weights,
    resolve_start,
)


def setup(cfg: PretrainConfig) -> None:
    """Run the command on ``cfg`` (its options and their help: :class:`PretrainConfig`)."""
    launch(cfg, main, "pretrain")


def main(fabric: L.Fabric, cfg: PretrainConfig) -> None:
    data, train = cfg.data, cfg.train
    preempt = PreemptionFlag(cfg.preemption_signal)
    start = resolve_start(fabric, cfg.resume, cfg.out_dir, cfg.initial_checkpoint_dir)
    end_step = start.end_step(train.max_steps, train.max_additional_steps)
    tokenizer = Tokenizer(cfg.tokenizer_dir) if cfg.tokenizer_dir is not None else None
    data.connect(tokenizer=tokenizer, batch_size=train.micro_batch_size, max_seq_length=cfg.seq_len,
                 with_source=True, global_batch_size=train.global_batch_size)  # fmt: skip

    def check_data_order() -> None:  # model, tokenizer, shards: check_pretrain; this needs the run's processes
        if start.saved is not None:
            data.train_dataloader(start.step).load_state_dict(start.saved["loader"])  # data.seed, shards, ...

    if not begin_run(fabric, start, end_step, check_data_order):
        return

    # model and optimizer: built empty, then weights from litgpt's init, a checkpoint or initial weights
    fabric.seed_everything(cfg.seed, verbose=False)  # the seed is in the saved hparams
    model, optimizer = build_model_and_optimizer(
        fabric, cfg.model, cfg.seq_len, cfg.optimizer, train.tie_embeddings, initialize=True, compile=cfg.compile
    )
    val_loaders = data.val_dataloaders(max_samples=cfg.eval.max_samples, batch_size=cfg.eval.batch_size)
    run = TrainingRun(
        fabric, start, model, optimizer, cfg.hparams(), cfg.model, cfg.seq_len, cfg.tokenizer_dir,
        train.keep_last_checkpoints, val_loaders,
    )  # fmt: skip
    saved = run.restore() if start.checkpoint is not None else None
    if saved is None and cfg.initial_checkpoint_dir is not None:
        load_initial_weights(fabric, model, Path(cfg.initial_checkpoint_dir))
    run.fit(PretrainSteps(fabric, cfg, start, saved), end_step, train, cfg.eval, preempt)


class PretrainSteps:
    """Pretraining's part of the loop: the mixture stream (stages, resume), the next-token loss, per-type losses
    and per-source tokens in the log, and the stream's state in checkpoints."""

    def __init__(self, fabric: L.Fabric, cfg: PretrainConfig, start: Start, saved: dict | None) -> None:
        self.fabric, self.cfg, self.data = fabric, cfg, cfg.data
        self.accum = cfg.train.gradient_accumulation_iters(fabric.world_size)
        data, step = cfg.data, start.step
        self.tokens_by_source: dict[str, int] = {}
        self.history: list[dict] = []
        if saved is not None:
            self.tokens_by_source = {k: int(v) for k, v in saved["tokens_by_source"].items()}
            self.history = list(saved.get("mixture_history", []))
        self.stage_index, self.stage = data.stage_at(step)
        self.loader = data.train_dataloader(step, saved["loader"] if saved is not None else None)  # same on all ranks
        if saved is not None:
            if saved["mixture"]["weights"] != self.stage.mixture.weights_by_id():
                why = f"resume from {start.checkpoint}"
                self.history.append(_switch(step, saved["mixture"], self.stage.mixture, why))
                fabric.print(f"Mixture changed at step {step}: {self.history[-1]['from']} -> {self.history[-1]['to']}")
        if not self.history:
            self.history.append(_switch(step, None, self.stage.mixture, "start"))
        fabric.print(f"Mixture from step {step}: {self.stage.mixture.mode} {self.stage.mixture.description}")

        # model FLOPs of one optimizer step (all ranks), and the device peak for MFU (known for GPUs only)
        micro = _flops_per_batch(cfg.model, cfg.train.micro_batch_size, cfg.seq_len)
        self.flops_per_step = micro * self.accum * fabric.world_size
        self.peak_flops = get_available_flops(fabric.device, _compute_dtype(fabric))
        self._write_history()

        self.types = sorted({r.shard.type for s in data.stage_list for r in s.mixture.active})
        self.shard_index = {s.id: i for i, s in enumerate(data.shards)}
        self.step_tokens = torch.zeros(len(data.shards), dtype=torch.int64)  # this rank, since the last flush
        # on the device, read once per log interval: per type, the sum of sequence mean losses and the sequences
        self.sums = torch.zeros(len(self.types), 2, dtype=torch.float64, device=fabric.device)
        self.step_loss = torch.zeros((), device=fabric.device)
        self._start_stream()

    def _start_stream(self) -> None:
        self.train_iter = shielded_iter(self.loader)
        self.source_type, self.source_shard = _source_maps(
            self.loader, self.types, self.shard_index, self.fabric.device
        )

    def _write_history(self) -> None:
        if self.fabric.global_rank == 0:
            write_json(self.cfg.out_dir / MIXTURE_HISTORY_FILE, self.history)

    def micro_batches(self, step: int) -> list[dict]:
        new_index, new_stage = self.data.stage_at(step)
        if new_index != self.stage_index:  # a stage switch: same semantics as resuming with a new mixture
            self.loader = self.data.train_dataloader(step, self.loader.state_dict())
            old = self.stage.mixture
            self.history.append(
                _switch(step, {"weights": old.weights_by_id(), "description": old.description}, new_stage.mixture,
                        "stage")
            )  # fmt: skip
            self.fabric.print(
                f"Stage {new_index} at step {step}: {new_stage.mixture.mode} {new_stage.mixture.description}"
            )
            self.stage_index, self.stage = new_index, new_stage
            self._start_stream()
            self._write_history()
        self.step_loss = torch.zeros((), device=self.fabric.device)
        return [next(self.train_iter) for _ in range(self.accum)]

    def loss(self, model: Any, batch: dict) -> torch.Tensor:
        device = self.fabric.device
        tokens = batch["input_ids"].to(device, non_blocking=True).long()
        input_ids, targets = tokens[:, :-1], tokens[:, 1:]
        loss = micro_batch_loss(model(input_ids), targets)  # the one pass over the logits
        with torch.no_grad():
            seq_type = self.source_type[batch["source"].to(device, non_blocking=True)]
            self.sums[:, 0].index_add_(0, seq_type, loss.seq_sum.double() / targets.size(1))
            self.sums[:, 1].index_add_(0, seq_type, torch.ones_like(loss.seq_sum, dtype=torch.float64))
            self.step_loss += loss.mean().detach() / self.accum
        src = batch["source"]
        self.step_tokens.index_add_(0, self.source_shard[src], torch.full_like(src, self.cfg.seq_len))
        return loss.mean() / self.accum

    def stepped(self) -> None:
        pass

    def log_values(self) -> torch.Tensor:
        device = self.fabric.device
        return torch.cat([self.sums.flatten(), self.step_loss.double().view(1), self.step_tokens.to(device).double()])

    def log_metrics(
        self, reduced: list[float], step: int, lr: float, window_steps: int, seconds: float
    ) -> tuple[dict, str]:
        n_types, world = len(self.types), self.fabric.world_size
        per_type, loss_sum = reduced[: 2 * n_types], reduced[2 * n_types]
        self._add_tokens(reduced[2 * n_types + 1 :])
        window_tokens = window_steps * self.cfg.train.global_batch_size * self.cfg.seq_len
        metrics: dict[str, Any] = {
            "loss": loss_sum / world,
            "lr": lr,
            "tokens": sum(self.tokens_by_source.values()),
            "step_time": seconds / window_steps,
            "tokens_per_sec": window_tokens / seconds,
            "tokens_per_sec_per_device": window_tokens / seconds / world,
            "mixture_stage": self.stage_index,
        }
        if self.peak_flops:
            metrics["mfu"] = self.flops_per_step / world * window_steps / seconds / self.peak_flops
        for t, type_loss, n in zip(self.types, per_type[0::2], per_type[1::2]):
            if n:
                metrics[f"train/{t}/loss"] = type_loss / n
        for t, count in _by_type(self.tokens_by_source, self.data).items():
            metrics[f"tokens/{t}"] = count
        self.sums.zero_()
        return metrics, f"{metrics['tokens_per_sec_per_device']:,.0f} tok/s/device"

    def _add_tokens(self, counts: list[float]) -> None:
        """Add every rank's tokens since the last flush (``step_tokens`` all-reduced) to ``tokens_by_source``."""
        for sid, i in self.shard_index.items():
            if counts[i]:
                self.tokens_by_source[sid] = self.tokens_by_source.get(sid, 0) + int(counts[i])
        self.step_tokens.zero_()

    def state(self) -> dict:
        fabric = self.fabric
        self._add_tokens(fabric.all_reduce(self.step_tokens.to(fabric.device), reduce_op="sum").tolist())
        mixture = self.stage.mixture
        return {
            "tokens_seen": sum(self.tokens_by_source.values()),
            "tokens_by_source": self.tokens_by_source,
            "tokens_by_type": _by_type(self.tokens_by_source, self.data),
            "mixture": {
                "stage": self.stage_index,
                "mode": mixture.mode,
                "description": mixture.description,
                "weights": mixture.weights_by_id(),
            },
            "mixture_history": self.history,
            "loader": self.loader.state_dict(),
        }

    def summary(self) -> dict:
        return {
            "max_steps": self.cfg.train.max_steps,
            "tokens_seen": sum(self.tokens_by_source.values()),
            "tokens_by_source": self.tokens_by_source,
            "tokens_by_type": _by_type(self.tokens_by_source, self.data),
            "mixture_history": self.history,
        }


# ---- helpers ---------------------------------------------------------------------------------


def _switch(step: int, old: dict | None, new, reason: str) -> dict:
    return {
        "step": step,
        "reason": reason,
        "from": None if old is None else old.get("description"),
        "to": f"{new.mode} {new.description}",
        "weights": new.weights_by_id(),
    }


def _by_type(tokens_by_source: dict[str, int], data: ShardedMixedDataset) -> dict[str, int]:
    type_of = {s.id: s.type for s in data.shards}
    out: dict[str, int] = {}
    for sid, n in tokens_by_source.items():
        out[type_of.get(sid, "unknown")] = out.get(type_of.get(sid, "unknown"), 0) + n
    return out


def _source_maps(
    loader: Any, types: list[str], shard_index: dict[str, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """For the loader's sources (a batch's ``source`` indexes them): their type index, on the device (per-type
    loss sums stay there), and their shard index, on the host (token counts)."""
    source_type = torch.tensor([types.index(s.type) for s in loader.sources], device=device)
    return source_type, torch.tensor([shard_index[s.id] for s in loader.sources])


def _compute_dtype(fabric: L.Fabric) -> torch.dtype:
    precision = str(fabric._precision.precision) if hasattr(fabric._precision, "precision") else ""
    return torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else torch.float32


def _flops_per_batch(config: Config, micro_batch: int, seq_len: int) -> float:
    with torch.device("meta"):
        meta = GPT(config)
        meta.max_seq_length = seq_len
        x = torch.randint(0, 1, (micro_batch, seq_len))
        flops = measure_flops(meta, lambda: meta(x), lambda y: chunked_cross_entropy(y, x, chunk_size=0))
    return float(flops)


