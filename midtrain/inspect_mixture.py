"""``midtrain inspect``: the dry run. Resolve the mixture(s) of a config and print what the run would read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from litgpt.config import Config

from midtrain.data.mixture import Mixture
from midtrain.data.sharded_mixed import ShardedMixedDataset
from midtrain.errors import MidtrainError
from midtrain.preflight import check_pretrain
from midtrain.train.args import EvalArgs, TrainArgs


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


def plan(
    data: ShardedMixedDataset, max_steps: int, tokens_per_step: int, start_step: int = 0
) -> list[PlanRow]:
    """Planned tokens and epochs per shard and stage for steps ``[start_step, max_steps)``."""
    rows = []
    bounds = [s.at_step for s in data.stage_list[1:]] + [max_steps]
    for i, (stage, end) in enumerate(zip(data.stage_list, bounds)):
        steps = max(0, min(end, max_steps) - max(stage.at_step, start_step))
        for r in stage.mixture.rows:
            planned = int(round(r.weight * steps * tokens_per_step))
            rows.append(
                PlanRow(i, stage.at_step, r.shard.id, r.shard.type, r.shard.tokens, r.weight, planned,
                        planned / r.shard.tokens)
            )
    return rows


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
            out_dir: Path | None = None, **_: object) -> list[PlanRow]:
    """Print the resolved mixture of a pretrain config: per shard and stage, weight, planned tokens, epochs."""
    if data is None:
        raise MidtrainError("The config has no `data:` section to inspect.")
    train = train or TrainArgs()
    config = check_pretrain(
        model_name=model_name, model_config=model_config, data=data, train=train, eval=_.get("eval") or EvalArgs(),
        devices=devices, num_nodes=num_nodes, accelerator=_.get("accelerator", "auto"), resume=resume,
        out_dir=out_dir or "out/pretrain", initial_checkpoint_dir=_.get("initial_checkpoint_dir"),
        tokenizer_dir=_.get("tokenizer_dir"), logger_name=_.get("logger_name", "csv"), dry_run=True,
    )
    seq_len = train.max_seq_length or config.block_size
    tokens_per_step = train.global_batch_size * seq_len
    for stage in data.stage_list:
        for row in stage.mixture.active:
            row.shard.check_block_size(seq_len + 1)
    print(f"data_path: {data.data_path} ({len(data.shards)} shards, {sum(s.tokens for s in data.shards):,} tokens)")
    print(f"run: {train.max_steps:,} steps x {train.global_batch_size} sequences x {seq_len} tokens = "
          f"{train.max_steps * tokens_per_step:,} tokens")
    if data.val_paths:
        print("validation sets: " + ", ".join(f"{k}={v}" for k, v in data.val_paths.items()))
    rows = plan(data, train.max_steps, tokens_per_step)
    table, warnings = format_plan(rows, [s.mixture for s in data.stage_list], data.repeat_warning)
    print(table)
    for w in warnings:
        print(f"WARNING: {w}")
    return rows
