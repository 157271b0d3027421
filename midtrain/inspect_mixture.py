"""``midtrain inspect``: the dry run. Resolve the mixture(s) of a config and print what the run would read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from litgpt.config import Config

from midtrain.config.checks import check_pretrain, world_size
from midtrain.config.sections import EvalArgs, TrainArgs
from midtrain.data.mixture import Mixture
from midtrain.data.sharded_mixed import ShardedMixedDataset
from midtrain.errors import MidtrainError


@dataclass
class PlanRow:
    stage: int
    at_step: int
    shard_id: str
    type: str
    tokens: int
    weight: float
    planned_tokens: int
    epochs: float


def plan(data: ShardedMixedDataset, max_steps: int, start_step: int = 0) -> list[PlanRow]:
    """Planned tokens and epochs per shard and stage for steps ``[start_step, max_steps)``, counted exactly by the
    data order (``data`` must be connected with ``global_batch_size``); epochs = samples read / samples in the shard."""
    order = data.order()
    batch, seq_len = data.global_batch_size, data.block_size - 1
    samples = {s.id: s.samples(data.block_size) for s in data.shards}
    rows = []
    bounds = [s.at_step for s in data.stage_list[1:]] + [max_steps]
    for i, (stage, end) in enumerate(zip(data.stage_list, bounds)):
        lo = max(stage.at_step, start_step)
        hi = max(lo, min(end, max_steps))
        before, after = order.k_at(lo * batch), order.k_at(hi * batch)
        for r in stage.mixture.rows:
            read = after.get(r.shard.id, 0) - before.get(r.shard.id, 0)
            rows.append(PlanRow(i, stage.at_step, r.shard.id, r.shard.type, r.shard.tokens, r.weight,
                                read * seq_len, read / samples[r.shard.id]))
    return rows


@dataclass
class StepSample:
    position: int
    rank: int
    source: str
    epoch: int
    index: int


def step_provenance(data: ShardedMixedDataset, step: int, world_size: int = 1) -> list[StepSample]:
    """The samples optimizer step ``step`` (1-based, as logged) trains on: position in the global batch, rank,
    source, the source's epoch (0-based) and the sample's index inside the source."""
    order = data.order()
    batch = data.global_batch_size
    if step < 1:
        raise MidtrainError(f"--step counts optimizer steps from 1 (as logged), got {step}.")
    if batch % world_size:
        raise MidtrainError(f"The global batch of {batch} does not split across {world_size} processes.")
    g = np.arange((step - 1) * batch, step * batch)
    gen, src, epoch, ids = order.lookup(g)
    names = list(order.generations[gen].weights)
    per_rank = batch // world_size
    return [StepSample(p, p // per_rank, names[s], e, i)
            for p, (s, e, i) in enumerate(zip(src.tolist(), epoch.tolist(), ids.tolist()))]


def epochs_by_step(data: ShardedMixedDataset, step: int) -> dict[str, float]:
    """Epochs of each source read by the end of optimizer step ``step`` (samples served / samples in the shard)."""
    k = data.order().k_at(step * data.global_batch_size)
    samples = {s.id: s.samples(data.block_size) for s in data.shards}
    return {sid: n / samples[sid] for sid, n in k.items()}


def split_step_option(args: list[str]) -> tuple[list[str], int | None]:
    """``midtrain inspect ... --step N``: take ``--step`` out of the pretrain options."""
    for i, arg in enumerate(args):
        if arg == "--step" or arg.startswith("--step="):
            value = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            rest = args[:i] + args[i + (1 if "=" in arg else 2):]
            try:
                return rest, int(value)
            except ValueError:
                raise MidtrainError(f"--step takes an optimizer step number, got {value!r}.") from None
    return args, None


def format_plan(rows: list[PlanRow], mixtures: list[Mixture], repeat_warning: float) -> tuple[str, list[str]]:
    """A fixed-width table and the list of warnings (shards read more than ``repeat_warning`` times)."""
    lines, warnings = [], []
    header = f"{'shard':<12} {'type':<10} {'tokens':>14} {'weight':>8} {'planned tokens':>16} {'epochs':>8}"
    for stage in sorted({r.stage for r in rows}):
        stage_rows = [r for r in rows if r.stage == stage]
        m = mixtures[stage]
        lines.append(f"stage {stage} from step {stage_rows[0].at_step}: {m.mode} {m.description}")
        lines.append(header)
        lines.append("-" * len(header))
        for r in stage_rows:
            flag = ""
            if r.epochs > repeat_warning:
                flag = "  <- repeats"
                warnings.append(
                    f"stage {stage}: shard {r.shard_id} would be read {r.epochs:.1f} times "
                    f"({r.planned_tokens:,} planned tokens from {r.tokens:,}); consider more data or a lower weight."
                )
            lines.append(
                f"{r.shard_id:<12} {r.type:<10} {r.tokens:>14,} {r.weight:>8.4f} {r.planned_tokens:>16,} "
                f"{r.epochs:>8.2f}{flag}"
            )
        lines.append("")
    return "\n".join(lines), warnings


def inspect(data: ShardedMixedDataset | None = None, train: TrainArgs | None = None, model_name: str | None = None,
            model_config: Config | None = None, devices: int | str = 1, num_nodes: int = 1, resume: object = None,
            out_dir: Path | None = None, step: int | None = None, **_: object) -> list[PlanRow]:
    """Print the resolved mixture of a pretrain config: per shard and stage, weight, planned tokens, epochs;
    with ``step``, also the samples that optimizer step trains on and the epochs per source read by then."""
    if data is None:
        raise MidtrainError("The config has no `data:` section to inspect.")
    train = train or TrainArgs()
    refused: list[str] = []
    config = check_pretrain(
        model_name=model_name, model_config=model_config, data=data, train=train, eval=_.get("eval") or EvalArgs(),
        devices=devices, num_nodes=num_nodes, accelerator=_.get("accelerator", "auto"), resume=resume,
        out_dir=out_dir or "out/pretrain", initial_checkpoint_dir=_.get("initial_checkpoint_dir"),
        tokenizer_dir=_.get("tokenizer_dir"), logger_name=_.get("logger_name", "csv"), dry_run=True,
        deferred=refused,
    )
    seq_len = train.max_seq_length or config.block_size
    tokens_per_step = train.global_batch_size * seq_len
    print(f"data_path: {data.data_path} ({len(data.shards)} shards, {sum(s.tokens for s in data.shards):,} tokens)")
    print(f"run: {train.max_steps:,} steps x {train.global_batch_size} sequences x {seq_len} tokens = "
          f"{train.max_steps * tokens_per_step:,} tokens")
    if data.val_paths:
        print("validation sets: " + ", ".join(f"{k}={v}" for k, v in data.val_paths.items()))
    data.connect(batch_size=train.micro_batch_size, max_seq_length=seq_len, with_source=True,
                 global_batch_size=train.global_batch_size)
    rows = plan(data, train.max_steps)
    table, warnings = format_plan(rows, [s.mixture for s in data.stage_list], data.repeat_warning)
    print(table)
    for w in warnings:
        print(f"WARNING: {w}")
    if step is not None:
        world = world_size(devices, num_nodes, _.get("accelerator", "auto"))
        print(f"step {step}: global indices {(step - 1) * train.global_batch_size:,} to "
              f"{step * train.global_batch_size - 1:,} on {world} process(es)")
        print(f"{'position':>8} {'rank':>5} {'source':<12} {'epoch':>6} {'index':>10}")
        for r in step_provenance(data, step, world):
            print(f"{r.position:>8} {r.rank:>5} {r.source:<12} {r.epoch:>6} {r.index:>10}")
        print(f"epochs read by the end of step {step}: "
              + ", ".join(f"{sid} {e:.3f}" for sid, e in epochs_by_step(data, step).items()))
    for problem in refused:  # e.g. before the branch checkpoint exists: the plan is still worth reading
        print(f"WARNING: {problem} (`midtrain pretrain` stops here.)")
    return rows
