"""What pretrain and finetune share: Fabric, the resume policy, model and weights, checkpoints, validation,
metrics, preemption and the end of a run (last checkpoint, final validation, litgpt's ``final/``)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.strategies import DDPStrategy, FSDPStrategy
from litgpt.config import Config
from litgpt.model import GPT, Block
from litgpt.pretrain import initialize_weights
from litgpt.utils import get_default_supported_precision, instantiate_torch_optimizer, num_parameters, parse_devices
from torch.utils.data import DataLoader

from midtrain import preemption
from midtrain.config.checks import check_compatible, check_tokenizers
from midtrain.config.sections import EvalArgs, TrainArgs
from midtrain.errors import MidtrainError
from midtrain.preemption import EXIT_PREEMPTED, report_save_time
from midtrain.rundir import (
    BRANCH_FILE,
    FINAL_DIR,
    MARKER_FILE,
    METRICS_FILE,
    MODEL_FILE,
    SUMMARY_FILE,
    own_checkpoint,
    read_json,
    read_train_state,
    resolve_resume,
    tokenizer_fingerprint,
    write_json,
)
from midtrain.train.checkpoints import load_checkpoint, prune_checkpoints, save_checkpoint, save_final
from midtrain.train.loading import load_model_entry
from midtrain.train.loggers import build_logger
from midtrain.train.loss import micro_batch_loss
from midtrain.train.ownership import release, shared_start

PREEMPTION_POLL_SECONDS = 10.0
"""Several processes agree on the preemption flag at every log step (inside the metrics reduction) and, between
log steps, with one small collective about this often (never every step: each one is a host-device sync)."""


class MmapCheckpointIO(TorchCheckpointIO):
    """Checkpoint reads with ``mmap=True, weights_only=True``: ranks share the page cache instead of each
    holding a full copy of model and optimizer state in RAM, and a file can only hold tensors and plain data."""

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:  # noqa: ARG002
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def build_fabric(
    devices: int | str,
    num_nodes: int,
    precision: str | None,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    accelerator: str = "auto",
) -> L.Fabric:
    """A Fabric for 1 process, N CPU processes (DDP over gloo) or N GPUs (FSDP by default; ``strategy: fsdp``
    also on a single GPU). FSDP shards within a node and replicates across nodes."""
    precision = precision or get_default_supported_precision(training=True)
    devices = parse_devices(devices)
    on_gpu = accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available()
    if strategy == "fsdp" and not on_gpu:
        raise MidtrainError("strategy: fsdp needs GPUs (Lightning runs FSDP on GPUs only); on CPU use ddp or auto.")
    plugins = []
    if devices * num_nodes == 1 and strategy != "fsdp":
        chosen = "auto"
        plugins.append(MmapCheckpointIO())
    elif strategy == "fsdp" or (strategy == "auto" and on_gpu):  # FSDP reads full checkpoints lazily itself
        sharding = "FULL_SHARD" if num_nodes == 1 else "HYBRID_SHARD"
        chosen = FSDPStrategy(auto_wrap_policy={Block}, state_dict_type="full", sharding_strategy=sharding)
    else:
        chosen = DDPStrategy(process_group_backend="nccl" if on_gpu else "gloo", checkpoint_io=MmapCheckpointIO())
    return L.Fabric(
        accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=chosen, precision=precision,
        plugins=plugins or None,
    )  # fmt: skip


def launch(cfg: Any, main: Callable[[L.Fabric, Any], None], command: str) -> None:
    """Start ``main(fabric, cfg)`` in the processes ``cfg`` asks for, with the run's logger; ``cfg`` is a
    checked :class:`~midtrain.config.commands.PretrainConfig` or ``FinetuneConfig``."""
    fabric = build_fabric(cfg.devices, cfg.num_nodes, cfg.precision, cfg.strategy, cfg.accelerator)
    name, interval = f"{command}-{cfg.model.name}", cfg.train.log_interval
    fabric._loggers = [build_logger(cfg.logger_name, cfg.out_dir, name=name, log_interval=interval)]
    try:
        fabric.launch(main, cfg)
    finally:
        release(cfg.out_dir)  # the next command of this process (a test, an experiment worker) may own it


@torch.no_grad()
def evaluate_sets(fabric: L.Fabric, model: GPT, loaders: dict[str, DataLoader]) -> dict[str, float]:
    """Token-weighted mean loss of each validation set, summed over all ranks (one host read per set)."""
    model.eval()
    results = {}
    for name, loader in loaders.items():
        total = torch.zeros(2, dtype=torch.float64, device=fabric.device)
        for batch in loader:
            if isinstance(batch, dict):
                input_ids, targets = batch["input_ids"], batch["labels"]
            else:
                input_ids, targets = batch[:, :-1], batch[:, 1:]
            input_ids = input_ids.to(fabric.device, non_blocking=True).long()
            targets = targets.to(fabric.device, non_blocking=True).long()
            loss = micro_batch_loss(model(input_ids), targets)
            total += torch.stack([loss.total.double(), loss.scored.double()])
        total = fabric.all_reduce(total, reduce_op="sum").tolist()
        if total[1] == 0:
            raise MidtrainError(f"Validation set {name!r} produced no scored tokens.")
        results[name] = total[0] / total[1]
    model.train()
    return results


def val_metrics(losses: dict[str, float]) -> dict[str, float]:
    out = {}
    for name, loss in losses.items():
        out[f"val/{name}/loss"] = loss
        out[f"val/{name}/ppl"] = math.exp(min(loss, 50.0))
    return out


class MetricsLog:
    """Append-only ``metrics.jsonl`` in the run directory (rank 0 writes), plus Fabric's loggers.

    Each step appears once across resumes: :func:`begin_run` cuts the rows an interrupted attempt
    logged after the checkpoint the run continues from."""

    def __init__(self, fabric: L.Fabric, out_dir: Path) -> None:
        self.fabric = fabric
        self.path = Path(out_dir) / METRICS_FILE

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, "wall_time": time.time(), **metrics}
        if self.fabric.global_rank == 0:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self.fabric.log_dict({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)


class PreemptionFlag:
    """Set by a signal (SLURM sends one before the time limit); read at step boundaries on every rank."""

    def __init__(self, signal_name: str | None) -> None:
        if signal_name:  # usually installed already at process start (midtrain.cli.main); a signal since then counts
            preemption.install(signal_name)
        else:
            preemption.uninstall()

    @property
    def requested(self) -> bool:
        return preemption.requested()

    def agreed(self, fabric: L.Fabric) -> bool:
        """True on every rank when any rank got the signal."""
        if fabric.world_size == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=fabric.device)
        return bool(fabric.all_reduce(flag, reduce_op="sum").item() > 0)


# ---- the resume policy -------------------------------------------------------------------------


@dataclass
class Start:
    """Where one submission of a run starts. Built by :func:`resolve_start`."""

    out_dir: Path
    checkpoint: Path | None
    """The checkpoint restored (model, optimizer, train state), or None: fresh optimizer at step 0."""
    saved: dict | None
    """Its ``train_state.json``."""
    own: bool
    """The checkpoint is ``out_dir``'s own: this submission continues the run (a requeue or a resubmission)."""
    branch: dict
    """Where the run in ``out_dir`` began: ``{"step", "checkpoint", "initial_weights"}``."""

    @property
    def step(self) -> int:
        return int(self.saved["step"]) if self.saved else 0

    def end_step(self, max_steps: int, max_additional_steps: int | None) -> int:
        """``max_steps``, or ``max_additional_steps`` after the branch point if that is earlier."""
        if max_additional_steps is None:
            return max_steps
        return min(max_steps, int(self.branch["step"]) + max_additional_steps)

    def finished(self, end_step: int) -> bool:
        """True when an earlier submission already trained to ``end_step`` and wrote its summary and ``final/``."""
        summary = self.out_dir / SUMMARY_FILE
        if not self.own or self.step < end_step or not summary.is_file():
            return False
        final_written = (self.out_dir / FINAL_DIR / MARKER_FILE).is_file()
        return final_written and json.loads(summary.read_text()).get("step") == self.step


def resolve_start(
    fabric: L.Fabric, resume: bool | Literal["auto"] | Path | str | None, out_dir: Path, initial_weights: Path | None
) -> Start:
    """Rank 0 claims ``out_dir`` (one live owner), cleans leftovers of interrupted saves and applies
    :func:`_resume_policy`; every rank gets its answer (never a listing of its own, which a stale NFS
    directory cache could make differ)."""
    return shared_start(fabric, lambda: _resume_policy(fabric, resume, out_dir, initial_weights), out_dir)


def _resume_policy(
    fabric: L.Fabric, resume: bool | Literal["auto"] | Path | str | None, out_dir: Path, initial_weights: Path | None
) -> Start:
    """The one resume policy of ``pretrain`` and ``finetune``.

    * ``out_dir`` holds a complete checkpoint: continue from its newest, whatever ``resume`` names
      (the same command resubmitted continues the same run); ``resume: false`` is refused rather
      than training over those checkpoints.
    * otherwise ``resume`` decides: ``auto``/``false`` start fresh, ``true`` is an error, a path
      branches from that checkpoint (e.g. another run's: midtraining into a new ``out_dir``).

    The branch point (the step and checkpoint the run began from) is kept in ``branch_point.json``
    and in every checkpoint; ``train.max_additional_steps`` counts from it.
    """
    own = own_checkpoint(out_dir, resume)
    if own is not None:
        named = Path(resume).expanduser().resolve() if resume not in ("auto", True) else None
        if named is not None and named not in (own.resolve(), (own / MODEL_FILE).resolve()):
            fabric.print(f"{out_dir} already has checkpoint {own.name}: continuing it, not starting from {resume}.")
        saved = read_train_state(own)
        branch = saved.get("branch_point") or read_json(out_dir / BRANCH_FILE)
        if branch is None:
            fabric.print(f"note: {own} records no branch point; max_additional_steps counts from step 0.")
            branch = {"step": 0, "checkpoint": None, "initial_weights": None}
        return Start(out_dir, own, saved, True, branch)
    checkpoint = resolve_resume(resume, out_dir)
    saved = read_train_state(checkpoint) if checkpoint is not None else None
    branch = {
        "step": int(saved["step"]) if saved else 0,
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "initial_weights": None if checkpoint is not None or initial_weights is None else str(initial_weights),
    }
    return Start(out_dir, checkpoint, saved, False, branch)


def begin_run(fabric: L.Fabric, start: Start, end_step: int, check: Callable[[], None] | None = None) -> bool:
    """Prepare ``out_dir`` for this submission; False when there is nothing to train (and say so).

    ``check`` (every compatibility check of the resume: model, tokenizer, data order, ...) runs before
    anything is written, so a refused resume leaves the run directory as it was.
    A new run records its branch point and starts an empty ``metrics.jsonl``; a continued run keeps
    the metrics rows up to the step it resumes from (later ones were logged after that checkpoint
    and are logged again), so each step appears once.
    """
    if start.finished(end_step):
        fabric.print(
            f"{start.out_dir} already finished at step {start.step} (this config ends at step {end_step}); "
            "nothing to train. Raise train.max_steps or max_additional_steps to train further."
        )
        return False
    if not start.own and start.step >= end_step:
        raise MidtrainError(
            f"{start.checkpoint} is at step {start.step}, and this run ends at step {end_step} "
            "(train.max_steps / max_additional_steps): nothing to train."
        )
    if check is not None:
        check()
    if fabric.global_rank == 0:
        start.out_dir.mkdir(parents=True, exist_ok=True)
        if not start.own:
            write_json(start.out_dir / BRANCH_FILE, start.branch)
        dropped = truncate_metrics(
            start.out_dir / METRICS_FILE, start.step if start.own else None, drop_final=start.step >= end_step
        )
        if dropped:
            after = f" after step {start.step}" if start.own else ""
            fabric.print(f"{METRICS_FILE}: removed {dropped} row(s) an earlier attempt logged{after}.")
    fabric.barrier()
    return True


def truncate_metrics(path: Path, through_step: int | None, drop_final: bool = False) -> int:
    """Keep the rows of ``path`` up to ``through_step`` (None: none), without its final-validation row if
    ``drop_final``; return how many were removed."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if through_step is None or row.get("step", 0) > through_step:
            continue
        if drop_final and row.get("final") and row.get("step") == through_step:
            continue
        kept.append(line)
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return len(lines) - len(kept)


# ---- model, weights, checkpoints -----------------------------------------------------------------


def build_model_and_optimizer(
    fabric: L.Fabric,
    config: Config,
    seq_len: int,
    optimizer_cfg: str | dict,
    tie_embeddings: bool | None,
    initialize: bool,
    compile: bool = False,
) -> tuple[Any, Any]:
    """The model (built empty: on the meta device under FSDP) and its optimizer, both set up by Fabric.

    ``initialize``: litgpt's pretraining init; otherwise the weights are undefined until a checkpoint is
    loaded into the set-up model (:func:`load_initial_weights` or ``load_checkpoint``).
    """
    with fabric.init_module(empty_init=True):
        model = GPT(config)
    if initialize:
        initialize_weights(fabric, model, n_layer=config.n_layer, n_embd=config.n_embd)
    if tie_embeddings:
        model.transformer.wte.weight = model.lm_head.weight
    model.max_seq_length = seq_len
    fabric.print(f"Model {config.name}: {num_parameters(model):,} parameters, sequence length {seq_len}.")
    if compile:
        model = torch.compile(model)
    model = fabric.setup(model)
    optimizer = instantiate_torch_optimizer(optimizer_cfg, model.parameters(), fused=fabric.device.type == "cuda")
    return model, fabric.setup_optimizers(optimizer)


def check_tokenizer(
    fabric: L.Fabric, tokenizer_dir: Path | None, shard_dirs: list[Path], weights_dir: Path | None = None
) -> None:
    """:func:`midtrain.config.checks.check_tokenizers`, its note printed once."""
    if note := check_tokenizers(tokenizer_dir, shard_dirs, weights_dir):
        fabric.print(note)


def load_initial_weights(fabric: L.Fabric, model: Any, directory: Path) -> None:
    """Model weights from a litgpt checkpoint dir (plain ``lit_model.pth``) or one of ours (``{"model": ...}``).

    Call on every rank after ``fabric.setup``, as litgpt does: the strategy loads them (FSDP gathers and
    re-shards; nothing is loaded into a meta model). The file is read with ``weights_only=True``.
    """
    directory = Path(directory)
    path = directory / MODEL_FILE
    if not path.is_file():
        raise MidtrainError(f"{directory} has no {MODEL_FILE}; point it at a litgpt or midtrain checkpoint directory.")
    try:
        load_model_entry(fabric, model, path)  # the "model" entry only, memory-mapped
    except (KeyError, RuntimeError) as err:
        raise MidtrainError(f"{path} does not fit the model: {str(err).splitlines()[0]}") from err
    fabric.print(f"Loaded weights from {path}.")


class TrainingRun:
    """What pretrain and finetune do alike once model and data exist: checkpoints, validation, preemption, end."""

    def __init__(
        self,
        fabric: L.Fabric,
        start: Start,
        model: Any,
        optimizer: Any,
        hparams: dict,
        config: Config,
        seq_len: int,
        tokenizer_dir: Path | None,
        keep_last: int | None,
        val_loaders: dict[str, DataLoader],
    ) -> None:
        self.fabric, self.start, self.model, self.optimizer = fabric, start, model, optimizer
        self.out_dir = start.out_dir
        self.hparams, self.config, self.seq_len, self.keep_last = hparams, config, seq_len, keep_last
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
        self.fingerprint = tokenizer_fingerprint(self.tokenizer_dir) if self.tokenizer_dir is not None else None
        self.val_loaders = val_loaders
        self.metrics = MetricsLog(fabric, self.out_dir)
        self.val_losses: dict[str, float] = {}
        self.prior_seconds = float(start.saved.get("train_seconds", 0.0)) if start.own else 0.0  # earlier attempts
        self.loop_start: float | None = None
        self._preempt_step, self._preempt_agreed, self._preempt_every = start.step, False, 1
        self.step = start.step
        self.base_lr = optimizer.param_groups[0]["lr"]  # the optimizer config's, before a checkpoint overwrites it
        """Optimizer steps done (the loop's position; checkpoints are named by it)."""

    def start_clock(self) -> float:
        """Mark the start of the training loop; returns ``time.perf_counter()`` of that moment."""
        self.loop_start = time.perf_counter()
        return self.loop_start

    def train_seconds(self) -> float:
        """Seconds in the training loop over every attempt of this run (checkpoints carry the sum)."""
        return self.prior_seconds + (time.perf_counter() - self.loop_start if self.loop_start is not None else 0.0)

    def restore(self) -> dict:
        """Model and optimizer from the start checkpoint (after the compatibility checks); its train state."""
        start = self.start
        check_compatible(start.saved, self.config, self.seq_len, self.fingerprint, start.checkpoint)
        load_checkpoint(self.fabric, start.checkpoint, {"model": self.model, "optimizer": self.optimizer})
        self.fabric.print(f"Resumed from {start.checkpoint} at optimizer step {start.step}.")
        return start.saved

    def save(self, step: int, train_state: dict, reason: str) -> Path:
        """Checkpoint ``out_dir/step-XXXXXXXX`` (all ranks), then keep only the newest ``keep_last``."""
        state = {
            **train_state,
            "train_seconds": self.train_seconds(),
            "step": step,
            "branch_point": self.start.branch,
            "model_config": dataclasses.asdict(self.config),
            "max_seq_length": self.seq_len,
            "tokenizer": {"fingerprint": self.fingerprint, "directory": str(self.tokenizer_dir)},
            "world_size": self.fabric.world_size,
            "reason": reason,
        }
        began = time.perf_counter()
        path = save_checkpoint(
            self.fabric, self.out_dir, step, {"model": self.model, "optimizer": self.optimizer}, state, self.hparams,
            model_config=dataclasses.asdict(self.config), tokenizer_dir=self.tokenizer_dir,
        )  # fmt: skip
        report_save_time(self.fabric, self.metrics, step, path, reason, time.perf_counter() - began)
        if self.fabric.global_rank == 0 and self.keep_last is not None:
            for old in prune_checkpoints(self.out_dir, self.keep_last):
                self.fabric.print(f"Removed {old.name} (train.keep_last_checkpoints={self.keep_last}).")
        return path

    def validate(self, step: int, **extra: Any) -> dict[str, float]:
        """Every validation set's loss, logged at ``step``."""
        losses = evaluate_sets(self.fabric, self.model, self.val_loaders)
        self.val_losses.update(losses)
        self.metrics.log(step, {**extra, **val_metrics(losses)})
        self.fabric.print(f"validation at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        return losses

    def reduce_log(self, values: torch.Tensor, flag: PreemptionFlag, step: int, seconds_per_step: float) -> list:
        """``values`` summed over all ranks, read once: the log step's one collective and host read.

        It also carries the preemption flag (so ranks agree on it at this step without another collective)
        and the step time, which sets how many steps pass before the next agreement between log steps.
        """
        extra = torch.tensor([float(flag.requested), seconds_per_step], dtype=values.dtype)
        reduced = self.fabric.all_reduce(torch.cat([values, extra.to(values.device)]), reduce_op="sum").tolist()
        *out, requested, seconds = reduced
        seconds /= self.fabric.world_size  # the mean over ranks: the same number on every rank
        self._preempt_step, self._preempt_agreed = step, requested > 0
        self._preempt_every = max(1, int(PREEMPTION_POLL_SECONDS / max(seconds, 1e-9)))
        return out

    def _preempted(self, flag: PreemptionFlag, step: int) -> bool:
        """Whether any rank got the signal, as every rank sees it at this step boundary (the same on all)."""
        if self.fabric.world_size == 1:
            return flag.requested
        if step == self._preempt_step:
            return self._preempt_agreed
        if step - self._preempt_step < self._preempt_every:
            return False
        self._preempt_step, self._preempt_agreed = step, flag.agreed(self.fabric)
        return self._preempt_agreed

    def exit_if_preempted(self, flag: PreemptionFlag, steps: Steps) -> None:
        """When any rank got the preemption signal: checkpoint and exit 75 so the job is requeued.

        One process checks at every step; several agree at log steps (:meth:`reduce_log`) and about every
        ``PREEMPTION_POLL_SECONDS`` in between, so the checkpoint is still written at a step boundary.
        """
        if not self._preempted(flag, self.step):
            return
        self.save(self.step, steps.state(), "preempted")
        self.fabric.print(
            f"Preemption signal: checkpoint written at step {self.step}; exiting with status {EXIT_PREEMPTED} "
            "so the job is requeued."
        )
        self.fabric.barrier()
        sys.exit(EXIT_PREEMPTED)

    def fit(self, steps: Steps, end_step: int, train: TrainArgs, eval: EvalArgs, preempt: PreemptionFlag) -> None:
        """The training loop, from the start step to ``end_step``; one iteration is one optimizer step.

        Per step: the LR, the command's micro-batches (gradients accumulated, synchronised on the last), clipping,
        the optimizer step; then at log steps one reduction and one metrics row, validation at ``eval.interval``,
        the preemption check and interval checkpoints; at the end :meth:`finish`.
        """
        fabric, model, optimizer = self.fabric, self.model, self.optimizer
        base_lr = self.base_lr
        schedule = train.schedule()
        schedule.check(base_lr, train.max_steps)  # once; every step then reads schedule.lr
        fabric.print(f"LR schedule: {schedule.describe(base_lr, train.max_steps)}.")
        if eval.initial_validation and self.val_loaders and not self.start.own:  # a continued run validated it
            self.validate(self.step)
        t_window = self.start_clock()
        window_start_step = self.step
        while self.step < end_step:
            lr = schedule.lr(self.step, train.max_steps, base_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = steps.micro_batches(self.step)
            for i, batch in enumerate(batches):
                with fabric.no_backward_sync(model, enabled=i < len(batches) - 1):
                    fabric.backward(steps.loss(model, batch))
            if train.max_norm is not None:
                fabric.clip_gradients(model, optimizer, max_norm=train.max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.step += 1
            steps.stepped()

            step = self.step
            if step % train.log_interval == 0 or step == end_step:
                window_steps = step - window_start_step
                reduced = self.reduce_log(
                    steps.log_values(), preempt, step, (time.perf_counter() - t_window) / window_steps
                )
                now = time.perf_counter()  # after the reduction's host read: the window's queued work has run
                metrics, line = steps.log_metrics(reduced, step, lr, window_steps, now - t_window)
                self.metrics.log(step, metrics)
                fabric.print(f"step {step}/{end_step} | loss {metrics['loss']:.4f} | lr {lr:.3e} | {line}")
                t_window, window_start_step = now, step
            if self.val_loaders and eval.interval and step % eval.interval == 0 and step != end_step:
                self.validate(step)
            self.exit_if_preempted(preempt, steps)
            if train.save_interval and step % train.save_interval == 0 and step != end_step:
                self.save(step, steps.state(), "interval")
        self.finish(steps, eval.final_validation)

    def finish(self, steps: Steps, final_validation: bool) -> None:
        """End of the run: the last checkpoint, the final validation, litgpt's ``final/``, ``summary.json``
        (``steps.summary()`` is taken last, so its figures include the end)."""
        step = self.step
        last = self.save(step, steps.state(), "end") if step > self.start.step else self.start.checkpoint
        preemption.exit_if_requested(self.fabric, "after the end checkpoint")
        if final_validation and self.val_loaders:
            self.validate(step, final=True)
            preemption.exit_if_requested(self.fabric, "after the final validation")
        final = save_final(
            self.fabric, self.out_dir, self.model, self.hparams, dataclasses.asdict(self.config), self.tokenizer_dir
        )
        self.fabric.print(f"Wrote {final} (plain weights for litgpt generate / convert_from_litgpt / finetune).")
        if self.fabric.global_rank == 0:
            write_json(
                self.out_dir / SUMMARY_FILE,
                {"step": step, "final_checkpoint": str(last), "final": str(final), "branch_point": self.start.branch,
                 **steps.summary(), "train_seconds": self.train_seconds(), "val": self.val_losses},
            )  # fmt: skip
        self.fabric.barrier()


class Steps(Protocol):
    """What a command supplies to :meth:`TrainingRun.fit`: its micro-batches and their loss, its log metrics and
    the state its checkpoints and summary hold."""

    def micro_batches(self, step: int) -> Sequence[Any]:
        """This process's micro-batches of the optimizer update with 0-based index ``step``."""

    def loss(self, model: Any, batch: Any) -> torch.Tensor:
        """One micro-batch forward; the loss to backpropagate (its statistics are kept for the log)."""

    def stepped(self) -> None:
        """After the optimizer step."""

    def log_values(self) -> torch.Tensor:
        """The values summed over all processes at a log step (one collective)."""

    def log_metrics(
        self, reduced: list[float], step: int, lr: float, window_steps: int, seconds: float
    ) -> tuple[dict, str]:
        """The metrics row of ``step`` for ``reduced`` (the window: ``window_steps`` steps in ``seconds``) and the
        end of the printed line."""

    def state(self) -> dict:
        """The train state a checkpoint holds besides model and optimizer (every process calls it)."""

    def summary(self) -> dict:
        """The command's figures in ``summary.json``."""

