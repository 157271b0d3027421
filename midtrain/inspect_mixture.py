"""``midtrain inspect``: the dry run. Resolve the mixture(s) of a config and print what the run would read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from litgpt.config import Config

from midtrain.config.checks import check_pretrain, world_size
from midtrain.config.sections import EvalArgs, TrainArgs
from midtrain.data.mixed_stream import resume_order
from midtrain.data.mixture import Mixture
from midtrain.data.order import RunOrder
from midtrain.data.sharded_mixed import ShardedMixedDataset
from midtrain.errors import MidtrainError
from midtrain.rundir import is_complete, own_checkpoint, read_train_state, resolve_resume


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


@dataclass
class History:
    """Where ``midtrain pretrain`` would continue from: a checkpoint (the run's own newest, else ``resume``) and
    its ``train_state.json``, or a fresh start (both None)."""

    checkpoint: Path | None
    saved: dict | None

    @property
    def step(self) -> int:
        return int(self.saved["step"]) if self.saved else 0

    @property
    def loader_state(self) -> dict | None:
        return self.saved["loader"] if self.saved else None


def history(resume: object, out_dir: Path | str) -> History:
    """The checkpoint a run of this config continues, by pretrain's resume policy (``out_dir``'s newest complete
    checkpoint, else ``resume``). A checkpoint that does not exist (yet) gives a fresh start (preflight warned)."""
    try:
        checkpoint = own_checkpoint(out_dir, resume) or resolve_resume(resume, out_dir)
    except MidtrainError:
        return History(None, None)
    return History(checkpoint, read_train_state(checkpoint) if checkpoint is not None else None)


def run_order(data: ShardedMixedDataset, past: History) -> RunOrder:
    """The order ``pretrain`` will follow after ``past`` (``data`` connected with ``global_batch_size``)."""
    return data.order(past.step, past.loader_state)


def recorded_order(data: ShardedMixedDataset, out_dir: Path | str, step: int) -> RunOrder:
    """The order step ``step`` (1-based) of the run in ``out_dir`` was trained on, as its checkpoints recorded it:
    the generations of the first checkpoint at or after the step, anchored at the last one before it (or the
    branch point), the global batch being what the run consumed per step between the two."""
    out_dir = Path(out_dir)
    found = sorted((int(read_train_state(p)["step"]), p) for p in out_dir.glob("step-*") if is_complete(p))
    after = next(((n, p) for n, p in found if n >= step), None)
    if after is None:
        raise MidtrainError(f"Step {step} is not among the steps {out_dir} has trained.")
    later = read_train_state(after[1])
    branch = later.get("branch_point") or {}
    anchor: tuple[int, dict | None] = (0, None)
    if branch.get("checkpoint") and is_complete(Path(branch["checkpoint"])):
        anchor = (int(branch["step"]), read_train_state(Path(branch["checkpoint"])))
    for n, p in found:
        if anchor[0] <= n < step:
            anchor = (n, read_train_state(p))
    if int(branch.get("step") or 0) >= step or (int(branch.get("step") or 0) > 0 and anchor[1] is None):
        raise MidtrainError(
            f"Step {step} was trained before {out_dir}'s branch point or before every checkpoint left there; "
            "inspect the run that trained it."
        )
    start, state = anchor
    index = int(state["loader"]["consumed"]) if state else 0
    batch, rem = divmod(int(later["loader"]["consumed"]) - index, after[0] - start)
    if rem:
        raise MidtrainError(f"The checkpoints of {out_dir} around step {step} do not share one global batch size.")
    last = later["loader"]["generations"][-1]
    fresh = data.order().order  # seed and shard layouts; the history itself is read as recorded
    order, _, _ = resume_order(later["loader"], fresh, data.block_size, {}, last["weights"], last["blend"])
    return RunOrder(order, start, index, batch)


def _epochs(read: int, samples: int) -> float:
    """Epochs of a shard read ``read`` times (0 for a shard with no window of the sequence length)."""
    return read / samples if samples else 0.0


def plan(data: ShardedMixedDataset, max_steps: int, run: RunOrder | None = None) -> list[PlanRow]:
    """Planned tokens and epochs per shard and stage for steps ``[run.step, max_steps)`` (default: a fresh run),
    counted exactly by the data order (``data`` must be connected with ``global_batch_size``); epochs = samples
    read / samples in the shard. Stages over before ``run.step`` are left out."""
    run = run or data.order()
    order, seq_len = run.order, data.block_size - 1
    samples = {s.id: s.samples(data.block_size) for s in data.shards}
    rows = []
    bounds = [s.at_step for s in data.stage_list[1:]] + [max_steps]
    for i, (stage, end) in enumerate(zip(data.stage_list, bounds)):
        lo = max(stage.at_step, run.step)
        hi = max(lo, min(end, max_steps))
        if hi == lo and end <= run.step:
            continue
        before, after = order.k_at(run.index_of(lo)), order.k_at(run.index_of(hi))
        for r in stage.mixture.rows:
            read = after.get(r.shard.id, 0) - before.get(r.shard.id, 0)
            rows.append(PlanRow(i, stage.at_step, r.shard.id, r.shard.type, r.shard.tokens, r.weight,
                                read * seq_len, _epochs(read, samples[r.shard.id])))
    return rows


@dataclass
class StepSample:
    position: int
    rank: int
    source: str
    epoch: int
    index: int


def step_provenance(data: ShardedMixedDataset, step: int, world_size: int = 1,
                    run: RunOrder | None = None) -> list[StepSample]:
    """The samples optimizer step ``step`` (1-based, as logged) trains on: position in the global batch, rank,
    source, the source's epoch (0-based) and the sample's index inside the source."""
    run = run or data.order()
    batch = run.global_batch
    if step < 1:
        raise MidtrainError(f"--step counts optimizer steps from 1 (as logged), got {step}.")
    if batch % world_size:
        raise MidtrainError(f"The global batch of {batch} does not split across {world_size} processes.")
    first = run.index_of(step - 1)
    gen, src, epoch, ids = run.order.lookup(np.arange(first, first + batch))
    names = list(run.order.generations[gen].weights)
    per_rank = batch // world_size
    return [StepSample(p, p // per_rank, names[s], e, i)
            for p, (s, e, i) in enumerate(zip(src.tolist(), epoch.tolist(), ids.tolist()))]


def epochs_by_step(data: ShardedMixedDataset, step: int, run: RunOrder | None = None) -> dict[str, float]:
    """Epochs of each source read by the end of optimizer step ``step`` (samples served / samples in the shard)."""
    run = run or data.order()
    k = run.order.k_at(run.index_of(step))
    samples = {s.id: s.samples(data.block_size) for s in data.shards}
    return {sid: _epochs(n, samples.get(sid, 0)) for sid, n in k.items()}


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
    data.connect(batch_size=train.micro_batch_size, max_seq_length=seq_len, with_source=True,
                 global_batch_size=train.global_batch_size)
    out_dir = out_dir or Path("out/pretrain")
    past = history(resume, out_dir)
    run = run_order(data, past)
    steps = max(0, train.max_steps - past.step)
    print(f"data_path: {data.data_path} ({len(data.shards)} shards, {sum(s.tokens for s in data.shards):,} tokens)")
    if past.checkpoint is not None:
        print(f"continues {past.checkpoint} (step {past.step}, global index {run.index:,}): its data order, then "
              "this config's mixture and stages")
    print(f"run: {steps:,} steps ({past.step + 1}..{train.max_steps}) x {train.global_batch_size} sequences x "
          f"{seq_len} tokens = {steps * tokens_per_step:,} tokens")
    if data.val_paths:
        print("validation sets: " + ", ".join(f"{k}={v}" for k, v in data.val_paths.items()))
    rows = plan(data, train.max_steps, run)
    table, warnings = format_plan(rows, [s.mixture for s in data.stage_list], data.repeat_warning)
    print(table)
    for w in warnings:
        print(f"WARNING: {w}")
    if step is not None:
        if step <= past.step:  # a step the run has trained: as its checkpoints recorded it
            run = recorded_order(data, out_dir, step)
            print(f"step {step} was trained before step {past.step + 1}: from the order {out_dir}'s checkpoints record")
        world = world_size(devices, num_nodes, _.get("accelerator", "auto"))
        first = run.index_of(step - 1)
        print(f"step {step}: global indices {first:,} to {first + run.global_batch - 1:,} on {world} process(es)")
        print(f"{'position':>8} {'rank':>5} {'source':<12} {'epoch':>6} {'index':>10}")
        for r in step_provenance(data, step, world, run):
            print(f"{r.position:>8} {r.rank:>5} {r.source:<12} {r.epoch:>6} {r.index:>10}")
        print(f"epochs read by the end of step {step}: "
              + ", ".join(f"{sid} {e:.3f}" for sid, e in epochs_by_step(data, step, run).items()))
    for problem in refused:  # e.g. before the branch checkpoint exists: the plan is still worth reading
        print(f"WARNING: {problem} (`midtrain pretrain` stops here.)")
    return rows
