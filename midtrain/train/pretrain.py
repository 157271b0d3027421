"""``midtrain pretrain``: pretraining and midtraining on a ShardedMixedDataset, in one readable loop.

Same shape as ``litgpt pretrain`` (model, data, train, eval, optimizer, devices, ...), plus:
absolute length in optimizer steps, step-keyed LR schedules, mixture stages, exact resume of the
data stream, carry-over of stream positions when the mixture changes, several validation sets,
per-source loss and token logging, atomic checkpoints and SLURM preemption. What it shares with
``finetune`` (resume policy, weights loaded after ``fabric.setup``, checkpoints, validation, the
end of a run with litgpt's ``final/``) lives in ``midtrain.train.runtime``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops, measure_flops
from litgpt.config import Config
from litgpt.model import GPT
from litgpt.tokenizer import Tokenizer
from litgpt.utils import chunked_cross_entropy

from midtrain.data.sharded_mixed import ShardedMixedDataset
from midtrain.preflight import check_pretrain
from midtrain.rundir import MIXTURE_HISTORY_FILE, write_json
from midtrain.train.args import EvalArgs, TrainArgs
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
    model_name: str | None = None,
    model_config: Config | None = None,
    out_dir: Path = Path("out/pretrain"),
    precision: str | None = None,
    initial_checkpoint_dir: Path | None = None,
    resume: bool | Literal["auto"] | Path = "auto",
    data: ShardedMixedDataset | None = None,
    train: TrainArgs = TrainArgs(),
    eval: EvalArgs = EvalArgs(),
    optimizer: str | dict = "AdamW",
    devices: int | str = "auto",
    num_nodes: int = 1,
    accelerator: str = "auto",
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    tokenizer_dir: Path | None = None,
    logger_name: Literal["wandb", "tensorboard", "csv"] = "csv",
    seed: int = 42,
    compile: bool = True,
    preemption_signal: str | None = "SIGUSR1",
) -> None:
    """Pretrain (or midtrain) a litgpt model on a weighted mixture of token shards.

    Args:
        model_name: A litgpt model name (e.g. ``pythia-160m``); mutually exclusive with ``model_config``.
        model_config: A litgpt ``Config`` for a custom model.
        out_dir: Run directory: checkpoints ``step-XXXXXXXX/``, ``metrics.jsonl``, ``mixture_history.json``.
        precision: Fabric precision (``bf16-mixed``, ``32-true``, ...); default picks the best supported.
        initial_checkpoint_dir: Start a new run from these model weights (step 0, fresh optimizer); loaded after
            ``fabric.setup`` (FSDP-safe).
        resume: Where a new run starts: ``auto`` (default: fresh), or a checkpoint directory (also another run's:
            midtraining into a new ``out_dir``). Once ``out_dir`` holds checkpoints, the run always continues from
            its newest (a requeue); ``false`` then refuses instead of training over them.
        data: The ShardedMixedDataset (mixture, stages, validation sets).
        train: Length, batch sizes, LR schedule, checkpoint interval.
        eval: Validation interval and sample budget.
        optimizer: A torch optimizer name or ``{class_path, init_args}``.
        devices: Devices per node.
        num_nodes: Number of nodes (SLURM: one srun task per device).
        accelerator: ``auto``, ``cpu`` or ``cuda``.
        strategy: ``auto`` (FSDP on several GPUs, DDP over gloo on CPU), ``ddp`` or ``fsdp``.
        tokenizer_dir: Tokenizer directory, copied into checkpoints and fingerprinted for resume checks.
        logger_name: Extra logger besides ``metrics.jsonl``.
        seed: Seed for model initialisation.
        compile: ``torch.compile`` the model (as ``litgpt pretrain`` always does); false for quick CPU runs.
        preemption_signal: Signal that triggers a checkpoint and exit status 75 (requeue), or None.
    """
    config = check_pretrain(
        model_name=model_name, model_config=model_config, data=data, train=train, eval=eval, devices=devices,
        num_nodes=num_nodes, accelerator=accelerator, resume=resume, out_dir=out_dir,
        initial_checkpoint_dir=initial_checkpoint_dir, tokenizer_dir=tokenizer_dir, logger_name=logger_name,
    )
    hparams = run_config(locals())
    fabric = build_fabric(devices, num_nodes, precision, strategy, accelerator)
    logger = build_logger(logger_name, out_dir, name=f"pretrain-{config.name}", log_interval=train.log_interval)
    fabric._loggers = [logger]
    fabric.launch(
        main,
        config,
        data,
        Path(out_dir),
        initial_checkpoint_dir,
        resume,
        train,
        eval,
        optimizer,
        tokenizer_dir,
        seed,
        compile,
        preemption_signal,
        hparams,
    )


def main(
    fabric: L.Fabric,
    config: Config,
    data: ShardedMixedDataset,
    out_dir: Path,
    initial_checkpoint_dir: Path | None,
    resume: bool | Literal["auto"] | Path,
    train: TrainArgs,
    eval: EvalArgs,
    optimizer_cfg: str | dict,
    tokenizer_dir: Path | None,
    seed: int,
    compile: bool,
    preemption_signal: str | None,
    hparams: dict,
) -> None:
    preempt = PreemptionFlag(preemption_signal)
    accum = train.gradient_accumulation_iters(fabric.world_size)
    seq_len = train.max_seq_length or config.block_size
    schedule = train.schedule()
    start = resolve_start(fabric, resume, out_dir, initial_checkpoint_dir)
    end_step = start.end_step(train.max_steps, train.max_additional_steps)
    check_tokenizer(
        fabric, tokenizer_dir, [s.path for s in data.shards] + list(data.val_paths.values()),
        initial_checkpoint_dir if start.checkpoint is None else None,
    )  # fmt: skip
    if not begin_run(fabric, start, end_step):
        return

    # ---- model and optimizer: built empty, then weights from litgpt's init, a checkpoint or initial weights ---
    fabric.seed_everything(seed)
    model, optimizer = build_model_and_optimizer(
        fabric, config, seq_len, optimizer_cfg, train.tie_embeddings, initialize=True, compile=compile
    )
    base_lr = optimizer.param_groups[0]["lr"]

    # ---- data --------------------------------------------------------------------------------
    tokenizer = Tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    data.connect(tokenizer=tokenizer, batch_size=train.micro_batch_size, max_seq_length=seq_len, with_source=True,
                 global_batch_size=train.global_batch_size)
    val_loaders = data.val_dataloaders(max_samples=eval.max_samples, batch_size=eval.batch_size)
    types = sorted({r.shard.type for s in data.stage_list for r in s.mixture.active})
    run = TrainingRun(
        fabric, start, model, optimizer, hparams, config, seq_len, tokenizer_dir, train.keep_last_checkpoints,
        val_loaders,
    )  # fmt: skip

    # ---- state: fresh, from initial weights, or resumed ------------------------------------
    step = 0
    tokens_by_source: dict[str, int] = {}
    history: list[dict] = []
    if start.checkpoint is not None:
        saved = run.restore()
        step = start.step
        tokens_by_source = {k: int(v) for k, v in saved["tokens_by_source"].items()}
        history = list(saved.get("mixture_history", []))
    elif initial_checkpoint_dir is not None:
        load_initial_weights(fabric, model, Path(initial_checkpoint_dir))

    stage_index, stage = data.stage_at(step)
    loader = data.train_dataloader(step)
    if start.checkpoint is not None:
        loader.load_state_dict(saved["loader"])  # the same on every rank
        if saved["mixture"]["weights"] != stage.mixture.weights_by_id():
            history.append(_switch(step, saved["mixture"], stage.mixture, f"resume from {start.checkpoint}"))
            fabric.print(f"Mixture changed at step {step}: {history[-1]['from']} -> {history[-1]['to']}")
    if not history:
        history.append(_switch(step, None, stage.mixture, "start"))
    fabric.print(f"Mixture from step {step}: {stage.mixture.mode} {stage.mixture.description}")

    # model FLOPs of one optimizer step (all ranks), and the device peak for MFU (known for GPUs only)
    flops_per_step = _flops_per_batch(config, train.micro_batch_size, seq_len) * accum * fabric.world_size
    peak_flops = get_available_flops(fabric.device, _compute_dtype(fabric))
    if fabric.global_rank == 0:
        write_json(out_dir / MIXTURE_HISTORY_FILE, history)

    step_tokens = torch.zeros(len(data.shards), dtype=torch.int64)  # this rank, since the last flush
    shard_index = {s.id: i for i, s in enumerate(data.shards)}

    def add_tokens(counts: list[float]) -> None:
        """Add every rank's tokens since the last flush (``step_tokens`` all-reduced) to ``tokens_by_source``."""
        for sid, i in shard_index.items():
            if counts[i]:
                tokens_by_source[sid] = tokens_by_source.get(sid, 0) + int(counts[i])
        step_tokens.zero_()

    def flush_tokens() -> None:
        add_tokens(fabric.all_reduce(step_tokens.to(fabric.device), reduce_op="sum").tolist())

    def save(reason: str) -> Path:
        flush_tokens()
        train_state = {
            "tokens_seen": sum(tokens_by_source.values()),
            "tokens_by_source": tokens_by_source,
            "tokens_by_type": _by_type(tokens_by_source, data),
            "mixture": {
                "stage": stage_index,
                "mode": stage.mixture.mode,
                "description": stage.mixture.description,
                "weights": stage.mixture.weights_by_id(),
            },
            "mixture_history": history,
            "loader": loader.state_dict(),
        }
        return run.save(step, train_state, reason)

    if eval.initial_validation and val_loaders and not start.own:  # a continued run validated this step before
        run.validate(step)

    # ---- the loop: one iteration = one optimizer step -----------------------------------------
    train_iter = iter(loader)
    # on the device, read once per log interval: per type, the sum of sequence mean losses and the sequences
    sums = torch.zeros(len(types), 2, dtype=torch.float64, device=fabric.device)
    source_type, source_shard = _source_maps(loader, types, shard_index, fabric.device)
    t_window = run.start_clock()
    window_start_step = step
    while step < end_step:
        new_index, new_stage = data.stage_at(step)
        if new_index != stage_index:  # a stage switch: same semantics as resuming with a new mixture
            state = loader.state_dict()
            loader = data.train_dataloader(step)
            loader.load_state_dict(state)
            train_iter = iter(loader)
            history.append(
                _switch(
                    step,
                    {"weights": stage.mixture.weights_by_id(), "description": stage.mixture.description},
                    new_stage.mixture,
                    "stage",
                )
            )
            fabric.print(f"Stage {new_index} at step {step}: {new_stage.mixture.mode} {new_stage.mixture.description}")
            stage_index, stage = new_index, new_stage
            source_type, source_shard = _source_maps(loader, types, shard_index, fabric.device)
            if fabric.global_rank == 0:
                write_json(out_dir / MIXTURE_HISTORY_FILE, history)

        lr = lr_at(step, train.max_steps, base_lr, schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=fabric.device)
        for micro in range(accum):
            batch = next(train_iter)
            tokens = batch["input_ids"].to(fabric.device, non_blocking=True).long()
            input_ids, targets = tokens[:, :-1], tokens[:, 1:]
            with fabric.no_backward_sync(model, enabled=micro < accum - 1):
                loss = micro_batch_loss(model(input_ids), targets)  # the one pass over the logits
                fabric.backward(loss.mean() / accum)
            with torch.no_grad():
                seq_type = source_type[batch["source"].to(fabric.device, non_blocking=True)]
                sums[:, 0].index_add_(0, seq_type, loss.seq_sum.double() / targets.size(1))
                sums[:, 1].index_add_(0, seq_type, torch.ones_like(loss.seq_sum, dtype=torch.float64))
                step_loss += loss.mean().detach() / accum
            step_tokens.index_add_(0, source_shard[batch["source"]], torch.full_like(batch["source"], seq_len))
        if train.max_norm is not None:
            fabric.clip_gradients(model, optimizer, max_norm=train.max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        if step % train.log_interval == 0 or step == end_step:
            window_steps = step - window_start_step
            window_tokens = window_steps * train.global_batch_size * seq_len
            reduced = run.reduce_log(
                torch.cat([sums.flatten(), step_loss.double().view(1), step_tokens.to(fabric.device).double()]),
                preempt, step, (time.perf_counter() - t_window) / window_steps,
            )  # fmt: skip
            now = time.perf_counter()  # after the reduction's host read: the window's queued work has run
            per_type, loss_sum = reduced[: 2 * len(types)], reduced[2 * len(types)]
            add_tokens(reduced[2 * len(types) + 1 :])
            metrics: dict[str, Any] = {
                "loss": loss_sum / fabric.world_size,
                "lr": lr,
                "tokens": sum(tokens_by_source.values()),
                "step_time": (now - t_window) / window_steps,
                "tokens_per_sec": window_tokens / (now - t_window),
                "tokens_per_sec_per_device": window_tokens / (now - t_window) / fabric.world_size,
                "mixture_stage": stage_index,
            }
            if peak_flops:
                metrics["mfu"] = flops_per_step / fabric.world_size * window_steps / (now - t_window) / peak_flops
            for t, type_loss, n in zip(types, per_type[0::2], per_type[1::2]):
                if n:
                    metrics[f"train/{t}/loss"] = type_loss / n
            for t, count in _by_type(tokens_by_source, data).items():
                metrics[f"tokens/{t}"] = count
            run.metrics.log(step, metrics)
            fabric.print(
                f"step {step}/{end_step} | loss {metrics['loss']:.4f} | lr {lr:.3e} | "
                f"{metrics['tokens_per_sec_per_device']:,.0f} tok/s/device"
            )
            sums.zero_()
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
            "tokens_seen": sum(tokens_by_source.values()),
            "tokens_by_source": tokens_by_source,
            "tokens_by_type": _by_type(tokens_by_source, data),
            "mixture_history": history,
        },
    )  # fmt: skip


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


