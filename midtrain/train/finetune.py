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
  uninterrupted run); resume policy, checkpoints and ``final/`` as in ``midtrain.train.runtime``.
* **Validation.** ``val/sft/loss`` on the data module's validation split and ``val/<name>/loss``
  on pretraining-shard sets (``val_data_path`` and ``replay.data.val_data_path``), at
  ``eval.interval`` and at the end.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from litgpt.config import Config
from litgpt.data import DataModule
from litgpt.tokenizer import Tokenizer
from torch.utils.data import DataLoader

from midtrain.data.replay import Replay
from midtrain.data.sft import IGNORE_INDEX, SFTOrder, StepBatches, scored_fraction, sft_val_loader, step_micro_batches
from midtrain.data.sharded_mixed import ShardedMixedDataset, ValWindows
from midtrain.data.shards import load_shard
from midtrain.errors import MidtrainError
from midtrain.preflight import check_finetune
from midtrain.rundir import TOKENIZER_MODEL_FILES, has_tokenizer
from midtrain.train.args import EvalArgs, TrainArgs
from midtrain.train.checkpoints import MODEL_CONFIG_FILE, MODEL_FILE, find_latest
from midtrain.train.loggers import build_logger
from midtrain.train.loss import micro_batch_loss
from midtrain.train.runtime import (
    PreemptionFlag,
    TrainingRun,
    begin_run,
    build_fabric,
    build_model_and_optimizer,
    check_tokenizer,
    load_initial_weights,
    resolve_start,
    run_config,
)
from midtrain.train.schedules import lr_at


def setup(
    checkpoint_dir: Path,
    out_dir: Path = Path("out/finetune"),
    precision: str | None = None,
    devices: int | str = 1,
    num_nodes: int = 1,
    accelerator: str = "auto",
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    data: DataModule | None = None,
    replay: Replay | None = None,
    val_data_path: dict[str, Path] | None = None,
    train: TrainArgs = TrainArgs(),
    epochs: float | None = None,
    eval: EvalArgs = EvalArgs(interval=100),
    optimizer: str | dict = "AdamW",
    resume: bool | Literal["auto"] | Path = "auto",
    tokenizer_dir: Path | None = None,
    logger_name: Literal["wandb", "tensorboard", "csv"] = "csv",
    seed: int = 42,
    compile: bool = True,
    preemption_signal: str | None = "SIGUSR1",
) -> None:
    """Fine-tune all weights of a checkpoint on instruction data, optionally replaying pretraining shards.

    Args:
        checkpoint_dir: Model to start from: one of our checkpoints (``step-*``), a run directory (its newest
            checkpoint) or a litgpt checkpoint directory; needs ``lit_model.pth`` and ``model_config.yaml``.
        out_dir: Run directory: checkpoints ``step-XXXXXXXX/``, ``metrics.jsonl``, ``summary.json``.
        precision: Fabric precision (``bf16-mixed``, ``32-true``, ...); default picks the best supported.
        devices: Devices per node.
        num_nodes: Number of nodes.
        accelerator: ``auto``, ``cpu`` or ``cuda``.
        strategy: ``auto`` (FSDP on several GPUs, DDP over gloo on CPU), ``ddp`` or ``fsdp``.
        data: A litgpt SFT data module (``litgpt.data.JSON``, ``Alpaca``, ...).
        replay: ``{ratio, data}``: the fraction of every step's sequences drawn from pretraining shards.
        val_data_path: Pretraining-shard validation sets ``name -> shard directory`` (forgetting), besides
            those in ``replay.data.val_data_path``.
        train: Length, batch sizes, LR schedule (warmup fraction, cosine/constant, ...), clipping, checkpoints.
        epochs: Length in epochs over the SFT training split instead of ``train.max_steps``.
        eval: Validation interval and sample budget per set.
        optimizer: A torch optimizer name or ``{class_path, init_args}``; its state starts fresh.
        resume: Where a new run starts: ``auto`` (default: fresh from ``checkpoint_dir``) or a checkpoint of a
            fine-tuning run. Once ``out_dir`` holds checkpoints, the run always continues from its newest (a
            requeue); ``false`` then refuses instead of training over them.
        tokenizer_dir: Tokenizer directory (default: ``checkpoint_dir``).
        logger_name: Extra logger besides ``metrics.jsonl``.
        seed: Seed for the SFT sample order.
        compile: ``torch.compile`` the model (it recompiles once for SFT batches of varying length, then
            treats the length as dynamic); false for quick CPU runs.
        preemption_signal: Signal that triggers a checkpoint and exit status 75 (requeue), or None.
    """
    if data is None:
        raise MidtrainError(
            "data is not set; configure a litgpt SFT data module under `data:` (e.g. litgpt.data.JSON)."
        )
    base = _resolve_base(Path(checkpoint_dir))
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else base
    if not has_tokenizer(tokenizer_dir):
        raise MidtrainError(
            f"No tokenizer ({' or '.join(TOKENIZER_MODEL_FILES)}) in {tokenizer_dir}; pass tokenizer_dir, the "
            "tokenizer the checkpoint was pretrained with."
        )
    if (epochs is None) == (train.max_steps is None):
        raise MidtrainError("Give exactly one of train.max_steps or epochs for the fine-tuning length.")
    if epochs is not None and epochs <= 0:
        raise MidtrainError(f"epochs must be > 0, got {epochs}.")
    replay = replay or Replay()
    replay_data = replay.build()
    config = Config.from_file(base / MODEL_CONFIG_FILE)
    check_finetune(
        config=config, train=train, eval=eval, devices=devices, num_nodes=num_nodes, accelerator=accelerator,
        resume=resume, out_dir=out_dir, logger_name=logger_name,
    )
    hparams = run_config(locals())
    fabric = build_fabric(devices, num_nodes, precision, strategy, accelerator)
    replay.sequences_per_step(train.global_batch_size, fabric.world_size)  # fail before launching
    fabric._loggers = [
        build_logger(logger_name, out_dir, name=f"finetune-{config.name}", log_interval=train.log_interval)
    ]
    fabric.launch(
        main, config, base, tokenizer_dir, data, replay, replay_data, val_data_path or {}, Path(out_dir), train, epochs,
        eval, optimizer, resume, seed, compile, preemption_signal, hparams,
    )  # fmt: skip


def main(
    fabric: L.Fabric,
    config: Config,
    base: Path,
    tokenizer_dir: Path,
    data: DataModule,
    replay: Replay,
    replay_data: ShardedMixedDataset | None,
    val_paths: dict[str, Path],
    out_dir: Path,
    train: TrainArgs,
    epochs: float | None,
    eval: EvalArgs,
    optimizer_cfg: str | dict,
    resume: bool | Literal["auto"] | Path,
    seed: int,
    compile: bool,
    preemption_signal: str | None,
    hparams: dict,
) -> None:
    preempt = PreemptionFlag(preemption_signal)
    world, rank = fabric.world_size, fabric.global_rank
    seq_len = train.max_seq_length or config.block_size
    n_replay = replay.sequences_per_step(train.global_batch_size, world)
    n_sft = train.global_batch_size - n_replay
    start = resolve_start(fabric, resume, out_dir, base)
    if start.checkpoint is not None and "sft" not in start.saved:
        raise MidtrainError(
            f"{start.checkpoint} is not a fine-tuning checkpoint; to start from pretrained weights use checkpoint_dir."
        )

    # ---- SFT data (litgpt module), replay stream, validation sets ------------------------------
    tokenizer = Tokenizer(tokenizer_dir)
    if tokenizer.vocab_size > config.padded_vocab_size:
        raise MidtrainError(
            f"The tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} tokens, the model only "
            f"{config.padded_vocab_size}; they do not belong together."
        )
    data.connect(tokenizer=tokenizer, batch_size=train.micro_batch_size, max_seq_length=seq_len + 1)
    with fabric.rank_zero_first():
        data.prepare_data()
    data.setup()
    train_set = data.train_dataloader().dataset
    val_set = data.val_dataloader().dataset
    if len(train_set) < n_sft:
        raise MidtrainError(
            f"The SFT training split has {len(train_set)} samples, fewer than one step needs ({n_sft})."
        )
    _check_scored(train_set, val_set, seq_len, eval.max_samples, fabric)
    if epochs is not None:
        train = dataclasses.replace(train, max_steps=math.ceil(epochs * len(train_set) / n_sft))
    train.validate()
    eval_batch = eval.batch_size or train.micro_batch_size
    val_loaders: dict[str, DataLoader] = {}
    if len(val_set):
        val_loaders["sft"] = sft_val_loader(val_set, eval_batch, eval.max_samples, rank, world)
    shard_sets = list((replay_data.val_paths if replay_data else {}).items()) + list(val_paths.items())
    for name, path in shard_sets:
        if name in val_loaders:
            raise MidtrainError(f"Validation set name {name!r} is used twice; names must be unique (and not 'sft').")
        path = Path(path)
        if not path.is_dir():
            raise MidtrainError(f"Validation set {name!r}: {path} does not exist.")
        load_shard(name, "val", path).check_block_size(seq_len + 1)
        val_loaders[name] = DataLoader(ValWindows(path, seq_len + 1, eval.max_samples), batch_size=eval_batch)
    replay_loader = None
    if n_replay:
        replay_data.connect(tokenizer, batch_size=n_replay // world, max_seq_length=seq_len, with_source=True,
                            global_batch_size=n_replay)
        replay_loader = replay_data.train_dataloader()

    end_step = start.end_step(train.max_steps, train.max_additional_steps)
    check_tokenizer(
        fabric, tokenizer_dir, [Path(path) for _, path in shard_sets] + _replay_shards(replay_data),
        base if start.checkpoint is None else None,
    )  # fmt: skip
    if not begin_run(fabric, start, end_step):
        return

    # ---- model and optimizer (fresh; weights from the base checkpoint unless resuming) ---------
    fabric.seed_everything(seed)
    model, optimizer = build_model_and_optimizer(
        fabric, config, seq_len, optimizer_cfg, train.tie_embeddings, initialize=False, compile=compile
    )
    base_lr = optimizer.param_groups[0]["lr"]
    schedule = train.schedule()
    fabric.print(f"LR schedule: {schedule.describe(base_lr, train.max_steps)}.")
    run = TrainingRun(
        fabric, start, model, optimizer, hparams, config, seq_len, tokenizer_dir, train.keep_last_checkpoints,
        val_loaders,
    )  # fmt: skip

    # ---- state: fresh or resumed -------------------------------------------------------------------
    step, sft_consumed = 0, 0
    counts = {"sft_tokens": 0, "replay_tokens": 0}  # scored tokens so far
    replay_by_source: dict[str, int] = {}
    if start.checkpoint is not None:
        saved = start.saved
        if saved["sft"]["train_samples"] != len(train_set):
            raise MidtrainError(
                f"The SFT training split had {saved['sft']['train_samples']} samples at {start.checkpoint} and has "
                f"{len(train_set)} now; the saved data position would mean something else."
            )
        run.restore()
        step, sft_consumed = start.step, int(saved["sft"]["consumed"])
        counts = {k: int(saved["tokens"][k]) for k in counts}
        replay_by_source = dict(saved["replay"]["tokens_by_source"])
        if replay_loader is not None and saved["replay"]["loader"]:
            replay_loader.load_state_dict(saved["replay"]["loader"])
        fabric.print(f"{sft_consumed} SFT samples consumed so far.")
    else:
        load_initial_weights(fabric, model, base)
        fabric.print(f"Fine-tuning {base} (fresh optimizer).")
    order = SFTOrder(len(train_set), seed)
    sft_loader = DataLoader(
        train_set,
        batch_sampler=StepBatches(order, sft_consumed, n_sft, rank, world),
        num_workers=getattr(data, "num_workers", 0),
        collate_fn=list,
    )
    fabric.print(
        f"Per step: {train.global_batch_size} sequences = {n_sft} SFT + {n_replay} replay "
        f"(each process: micro-batches of up to {train.micro_batch_size} SFT rows padded to their longest, replay "
        f"rows in micro-batches of their own); SFT train {len(train_set)} samples, "
        f"{train.max_steps} steps = {train.max_steps * n_sft / len(train_set):.2f} epochs; "
        f"validation sets: {', '.join(val_loaders) or 'none'}."
    )

    # counters since the last flush into ``counts``/``replay_by_source`` (this process, host): scored SFT and
    # replay tokens, replay sequences per source; the log window's (and last step's) loss sums stay on the device
    pending = torch.zeros(2 + (len(replay_loader.sources) if replay_loader is not None else 0), dtype=torch.float64)

    def add_pending(reduced: list[float]) -> None:
        """Add every process's pending counters (``pending`` all-reduced) to the run's totals."""
        counts["sft_tokens"] += int(reduced[0])
        counts["replay_tokens"] += int(reduced[1])
        for src, n in zip(replay_loader.sources if replay_loader is not None else [], reduced[2:]):
            if n:
                replay_by_source[src.id] = replay_by_source.get(src.id, 0) + int(n) * seq_len
        pending.zero_()

    def save(reason: str) -> Path:
        add_pending(fabric.all_reduce(pending.to(fabric.device), reduce_op="sum").tolist())
        train_state = {
            "sft": {"consumed": sft_consumed, "epoch": sft_consumed / len(train_set), "train_samples": len(train_set)},
            "replay": {
                "ratio": replay.ratio,
                "sequences_per_step": n_replay,
                "loader": replay_loader.state_dict() if replay_loader is not None else None,
                "tokens_by_source": replay_by_source,
            },
            "tokens": counts,
            "base_checkpoint": str(base),
        }
        return run.save(step, train_state, reason)

    if eval.initial_validation and val_loaders and not start.own:  # a continued run validated this step before
        run.validate(step)

    # ---- the loop: one iteration = one optimizer step -----------------------------------------------
    sft_iter = iter(sft_loader)
    replay_iter = iter(replay_loader) if replay_loader is not None else None
    # per part (sft, replay), this process: loss sums on the device (the window's and the last step's), scored
    # tokens and sequences on the host (the window's and the last step's); all reduced once per log step
    window_loss = torch.zeros(2, dtype=torch.float64, device=fabric.device)
    last_loss = torch.zeros_like(window_loss)
    window_rows = torch.zeros(2, 2, dtype=torch.float64)  # [part, (scored tokens, sequences)]
    last_rows = torch.zeros_like(window_rows)
    empty_steps = 0  # steps without a scored token on this process (a warning, not an error)
    t_window = run.start_clock()
    window_start_step = step
    while step < end_step:
        lr = lr_at(step, train.max_steps, base_lr, schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        replay_rows = None
        if replay_iter is not None:
            replay_batch = next(replay_iter)
            replay_rows = replay_batch["input_ids"]
            pending[2:].index_add_(0, replay_batch["source"], torch.ones(len(replay_rows), dtype=torch.float64))
        micro_batches = step_micro_batches(next(sft_iter), replay_rows, train.micro_batch_size)
        last_loss.zero_()
        last_rows.zero_()
        for is_replay, batch in micro_batches:
            scored = int((batch["labels"] != IGNORE_INDEX).sum())
            last_rows[int(is_replay)] += torch.tensor([scored, len(batch["labels"])], dtype=torch.float64)
        # the loss is the mean over the step's scored tokens on all processes; DDP/FSDP average gradients over
        # processes, so each one backpropagates world_size * (its sum of token losses) / (all scored tokens)
        scale = _loss_scale(fabric, float(last_rows[:, 0].sum()))
        empty_steps += int(last_rows[:, 0].sum() == 0)
        for i, (is_replay, batch) in enumerate(micro_batches):
            input_ids = batch["input_ids"].to(fabric.device, non_blocking=True)
            labels = batch["labels"].to(fabric.device, non_blocking=True)
            with fabric.no_backward_sync(model, enabled=i < len(micro_batches) - 1):
                loss = micro_batch_loss(model(input_ids), labels)  # the one pass over the logits
                fabric.backward(loss.total * scale)
            last_loss[int(is_replay)] += loss.total.detach()
        if train.max_norm is not None:
            fabric.clip_gradients(model, optimizer, max_norm=train.max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        sft_consumed += n_sft
        window_loss += last_loss
        window_rows += last_rows
        pending[:2] += last_rows[:, 0]

        if step % train.log_interval == 0 or step == end_step:
            window_steps = step - window_start_step
            host = torch.cat([window_rows.flatten(), last_rows.flatten(), pending, torch.tensor([empty_steps])])
            reduced = run.reduce_log(
                torch.cat([window_loss, last_loss, host.to(fabric.device)]), preempt, step,
                (time.perf_counter() - t_window) / window_steps,
            )  # fmt: skip
            now = time.perf_counter()  # after the reduction's host read: the window's queued work has run
            (w_sft_loss, w_rep_loss, sft_loss, rep_loss, w_sft_tok, w_sft_seq, w_rep_tok, w_rep_seq, sft_tok, sft_seq,
             rep_tok, rep_seq), rest = reduced[:12], reduced[12:]  # fmt: skip
            add_pending(rest[:-1])
            if rest[-1]:
                fabric.print(f"warning: {int(rest[-1])} process-step(s) up to step {step} had no scored tokens "
                             "(responses cut by max_seq_length?).")  # fmt: skip
            metrics: dict[str, Any] = {
                "loss": (sft_loss + rep_loss) / max(sft_tok + rep_tok, 1),
                "lr": lr,
                "replay_fraction": w_rep_seq / (w_sft_seq + w_rep_seq),
                "replay_sequences": int(rep_seq),
                "sft_sequences": int(sft_seq),
                "epoch": sft_consumed / len(train_set),
                "tokens/sft": counts["sft_tokens"],
                "tokens/replay": counts["replay_tokens"],
                "step_time": (now - t_window) / window_steps,
            }
            for name, loss_sum, tokens in (("sft", w_sft_loss, w_sft_tok), ("replay", w_rep_loss, w_rep_tok)):
                if tokens:
                    metrics[f"train/{name}/loss"] = loss_sum / tokens
            run.metrics.log(step, metrics)
            fabric.print(
                f"step {step}/{end_step} | loss {metrics['loss']:.4f} | lr {lr:.3e} | epoch {metrics['epoch']:.2f} | "
                f"replay {metrics['replay_sequences']}/{train.global_batch_size} | {metrics['step_time']:.2f} s/step"
            )
            window_loss.zero_()
            window_rows.zero_()
            empty_steps = 0
            t_window, window_start_step = now, step

        if val_loaders and eval.interval and step % eval.interval == 0 and step != end_step:
            run.validate(step)
        run.exit_if_preempted(preempt, step, save)
        if train.save_interval and step % train.save_interval == 0 and step != end_step:
            save("interval")

    run.finish(
        step, save, eval.final_validation,
        lambda: {
            "max_steps": train.max_steps,
            "base_checkpoint": str(base),
            "replay_ratio": replay.ratio,
            "replay_sequences_per_step": n_replay,
            "sft_sequences_per_step": n_sft,
            "epochs": sft_consumed / len(train_set),
            "tokens": counts,
            "replay_tokens_by_source": replay_by_source,
        },
    )  # fmt: skip


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


def _resolve_base(path: Path) -> Path:
    """The directory holding the starting weights (a run directory means its newest checkpoint)."""
    if not path.is_dir():
        raise MidtrainError(f"checkpoint_dir {path} does not exist.")
    if not (path / MODEL_FILE).is_file():
        latest = find_latest(path)
        if latest is None:
            raise MidtrainError(
                f"checkpoint_dir {path} has no {MODEL_FILE} and no complete step-* checkpoint; point it at a "
                "checkpoint directory (ours or litgpt's)."
            )
        path = latest
    if not (path / MODEL_CONFIG_FILE).is_file():
        raise MidtrainError(f"checkpoint_dir {path} has no {MODEL_CONFIG_FILE}; the model architecture is unknown.")
    return path
