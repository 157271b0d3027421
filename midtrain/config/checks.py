"""Pre-flight checks: everything a run would trip over, checked before any weights are loaded.

``midtrain inspect`` and ``midtrain pretrain`` call :func:`check_pretrain` (``finetune`` calls
:func:`check_finetune`), so the dry run refuses exactly what the real run would refuse: the model
name, batch arithmetic against devices x nodes x micro-batch, the sequence length against the
model and the shards, stages against ``max_steps``, the resume and initial checkpoints (present, and
fitting the model, sequence length and tokenizer), the tokenizer the shards were prepared with, options
that do not apply to the chosen mixture mode, and the logger's package. (The resumed data order, e.g.
``data.seed``, is checked by ``pretrain`` before it writes anything: it needs the run's processes.)
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
from pathlib import Path
from typing import Any

import torch
from litgpt.config import Config, name_to_config

from midtrain.config.sections import EvalArgs, TrainArgs
from midtrain.data.mixture import MixtureSpec, load_mix_config
from midtrain.data.shards import load_shard
from midtrain.data.token_range import check_token_ids, read_manifest
from midtrain.errors import MidtrainError
from midtrain.rundir import (
    TRAIN_STATE_FILE,
    check_recorded_tokenizer,
    check_shard_tokenizers,
    own_checkpoint,
    read_train_state,
    resolve_resume,
    tokenizer_fingerprint,
)
from midtrain.storage import is_remote

LOGGER_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install 'midtrain[wandb]'"),
}


def resolve_model(model_name: str | None, config: Config | None) -> Config:
    """The litgpt ``Config`` of ``model_name`` or ``config`` (exactly one), with close names on a typo."""
    if (model_name is None) == (config is None):
        raise MidtrainError("Give exactly one of model_name (a litgpt model name) or model_config.")
    if config is not None:
        return config
    if model_name not in name_to_config:
        close = difflib.get_close_matches(model_name, list(name_to_config), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see `litgpt download list`)."
        raise MidtrainError(f"model_name {model_name!r} is not a litgpt model{hint}")
    return Config.from_name(model_name)


def world_size(devices: int | str, num_nodes: int, accelerator: str = "auto") -> int:
    """Processes the run would start: devices per node x nodes (``auto``: the visible GPUs, else 1). The one
    world-size rule of preflight, litgpt name translation and ``inspect``."""
    if num_nodes is None or int(num_nodes) < 1:
        raise MidtrainError(f"num_nodes must be >= 1, got {num_nodes}.")
    if devices in ("auto", -1, "-1"):
        on_gpu = accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available()
        n = torch.cuda.device_count() if on_gpu else 1
    elif isinstance(devices, int) or str(devices).isdigit():
        n = int(devices)
    else:
        raise MidtrainError(f"devices must be 'auto' or a positive integer, got {devices!r}.")
    if n < 1:
        raise MidtrainError(f"devices must be 'auto' or a positive integer, got {devices!r}.")
    return n * int(num_nodes)


def check_batches(train: TrainArgs, devices: int | str, num_nodes: int, accelerator: str = "auto") -> int:
    """Gradient accumulation steps per optimizer step; an error when the batch sizes do not divide."""
    world = world_size(devices, num_nodes, accelerator)
    return train.gradient_accumulation_iters(world, f"devices ({devices}) x num_nodes ({num_nodes})")


def check_eval(eval: EvalArgs) -> None:
    if eval.interval is not None and eval.interval < 0:
        raise MidtrainError(f"eval.interval must be >= 1 (0: only initial/final validation), got {eval.interval}.")
    if eval.max_samples is not None and eval.max_samples < 1:
        raise MidtrainError(f"eval.max_samples must be >= 1 (or null: the whole set), got {eval.max_samples}.")
    if eval.batch_size is not None and eval.batch_size < 1:
        raise MidtrainError(f"eval.batch_size must be >= 1, got {eval.batch_size}.")


def check_seq_len(train: TrainArgs, config: Config) -> int:
    seq_len = train.max_seq_length or config.block_size
    if seq_len < 1 or seq_len > config.block_size:
        raise MidtrainError(
            f"train.max_seq_length={seq_len} does not fit the model {config.name}: its block_size is "
            f"{config.block_size}; use 1..{config.block_size}."
        )
    return seq_len


def check_mode_options(spec: MixtureSpec, where: str) -> None:
    """Options of one mixture mode given with another (e.g. ``divide_by_tokens`` in literal mode) are errors."""
    modes = spec.modes()
    if modes == ["mix_config_path"]:
        inner = load_mix_config(spec.mix_config_path)
        for name in ("divide_by_tokens", "proportional_multipliers"):
            if getattr(spec, name) and not getattr(inner, name):
                raise MidtrainError(
                    f"{where}.{name} is set next to mix_config_path; put it inside {spec.mix_config_path}."
                )
        check_mode_options(inner, f"{where} (mix_config_path {spec.mix_config_path})")
        return
    mode = modes[0] if modes else None
    if spec.divide_by_tokens and mode != "mix_weights_str":
        raise MidtrainError(
            f"{where}.divide_by_tokens applies to weighted mode (mix_weights_str) only, not to {mode}; remove it."
        )
    if spec.proportional_multipliers and mode != "proportional_sampling":
        raise MidtrainError(
            f"{where}.proportional_multipliers applies to proportional_sampling only, not to {mode}; remove it."
        )


def check_data(data: Any, train: TrainArgs, seq_len: int) -> None:
    """Stages within the run, mode-specific options, every sampled shard long enough for ``seq_len``."""
    check_mode_options(data.spec, "data")
    for i, stage in enumerate(data.stage_list[1:]):
        check_mode_options(stage.spec, f"data.stages[{i}]")
        if stage.at_step >= train.max_steps:
            raise MidtrainError(
                f"data.stages[{i}].at_step={stage.at_step} is not before train.max_steps={train.max_steps}, so the "
                f"stage would never run; use at_step < {train.max_steps}."
            )
    for stage in data.stage_list:
        for row in stage.mixture.active:
            row.shard.check_block_size(seq_len + 1)
    for name, path in data.val_paths.items():
        load_shard(name, "val", path, data.storage_options).check_block_size(seq_len + 1)


def check_token_range(data: Any, config: Config) -> None:
    """Every sampled shard's largest token id fits the model's padded vocabulary (named shard otherwise)."""
    sampled = [row.shard for stage in data.stage_list for row in stage.mixture.active]
    check_token_ids(sampled, config.padded_vocab_size, data.storage_options)


def check_remote_tokenizers(data: Any, tokenizer_dir: Path | str | None) -> None:
    """Remote shards' ``prepare.json`` names the run's tokenizer (local shards: checked when training starts)."""
    remote = [s.path for s in data.shards if is_remote(s.path)]
    if tokenizer_dir is not None and remote:
        check_shard_tokenizers(tokenizer_dir, remote, read=lambda p: read_manifest(p, data.storage_options))


def check_resume(resume: Any, out_dir: Path | str, initial_checkpoint_dir: Path | str | None = None) -> Path | None:
    """The checkpoint a run starts from (a run's own newest takes precedence, as in pretrain), or None; an
    error when the resume target or ``initial_checkpoint_dir`` does not exist or is incomplete."""
    checkpoint = own_checkpoint(out_dir, resume)
    if checkpoint is None:
        checkpoint = resolve_resume(resume, out_dir)
    if initial_checkpoint_dir is not None:
        path = Path(initial_checkpoint_dir).expanduser()
        if not (path / "lit_model.pth").is_file():
            raise MidtrainError(f"initial_checkpoint_dir {path} has no lit_model.pth.")
    return checkpoint


def check_compatible(saved: dict, config: Config, seq_len: int, fingerprint: str | None, path: Path) -> None:
    """Refuse to resume a checkpoint written for another model, sequence length or tokenizer."""
    old = saved.get("model_config") or {}
    new = dataclasses.asdict(config)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k != "name")
    if diff:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
        raise MidtrainError(f"Checkpoint {path} was trained with a different model ({details}); cannot resume it.")
    if int(saved.get("max_seq_length", seq_len)) != seq_len:
        raise MidtrainError(
            f"Checkpoint {path} used max_seq_length {saved['max_seq_length']}, this run {seq_len}; keep it equal."
        )
    old_fp = (saved.get("tokenizer") or {}).get("fingerprint")
    if old_fp and fingerprint and old_fp != fingerprint:
        raise MidtrainError(
            f"Checkpoint {path} was trained with another tokenizer (fingerprint {old_fp[:12]} vs "
            f"{fingerprint[:12]}); token IDs would not mean the same thing."
        )


def check_tokenizers(
    tokenizer_dir: Path | str | None, shard_dirs: list[Path], weights_dir: Path | str | None = None
) -> str | None:
    """Refuse shards (their ``prepare.json``) and starting weights (one of our checkpoints) made with another
    tokenizer than ``tokenizer_dir``; returns a note on what could not be checked, or None."""
    if tokenizer_dir is None:
        return "note: no tokenizer_dir, so the tokenizer the shards were prepared with is not checked."
    note = check_shard_tokenizers(tokenizer_dir, shard_dirs)
    state = Path(weights_dir) / TRAIN_STATE_FILE if weights_dir is not None else None
    recorded = (read_train_state(Path(weights_dir)).get("tokenizer") or {}) if state and state.is_file() else {}
    check_recorded_tokenizer(
        recorded, tokenizer_fingerprint(tokenizer_dir), tokenizer_dir, f"{weights_dir} was trained",
        "token IDs would not mean the same thing. Use the tokenizer the weights were trained with.",
    )
    return note


def check_start(
    config: Config, seq_len: int, data: Any, resume: Any, out_dir: Path | str,
    initial_checkpoint_dir: Path | str | None, tokenizer_dir: Path | str | None,
) -> None:
    """Where the run starts: the resume target exists, fits the model, sequence length and tokenizer; shards and
    starting weights were made with ``tokenizer_dir``."""
    check_tokenizer_dir(tokenizer_dir)
    checkpoint = check_resume(resume, out_dir, initial_checkpoint_dir)
    local = [s.path for s in data.shards] + list(data.val_paths.values())
    shard_dirs = [Path(p) for p in local if not is_remote(p)]  # remote ones: check_remote_tokenizers
    note = check_tokenizers(tokenizer_dir, shard_dirs, checkpoint or initial_checkpoint_dir)
    if note:
        print(note)
    if checkpoint is not None:
        fingerprint = tokenizer_fingerprint(tokenizer_dir) if tokenizer_dir is not None else None
        check_compatible(read_train_state(checkpoint), config, seq_len, fingerprint, checkpoint)


def check_tokenizer_dir(tokenizer_dir: Path | str | None) -> None:
    if tokenizer_dir is not None and not Path(tokenizer_dir).expanduser().is_dir():
        raise MidtrainError(f"tokenizer_dir {tokenizer_dir} does not exist.")


def check_logger(logger_name: str) -> None:
    package = LOGGER_PACKAGES.get(logger_name)
    if package and importlib.util.find_spec(package[0]) is None:
        raise MidtrainError(
            f"logger_name: {logger_name} needs the {package[0]} package: {package[1]} (or use logger_name: csv)."
        )


def check_pretrain(
    *, model_name: str | None, model_config: Config | None, data: Any, train: TrainArgs, eval: EvalArgs,
    devices: int | str, num_nodes: int, accelerator: str = "auto", resume: Any = False,
    out_dir: Path | str = "out/pretrain", initial_checkpoint_dir: Path | str | None = None,
    tokenizer_dir: Path | str | None = None, logger_name: str = "csv", dry_run: bool = False,
    deferred: list[str] | None = None,
) -> Config:
    """Everything ``midtrain pretrain`` checks before loading weights; returns the model's ``Config``.

    ``dry_run`` (``midtrain inspect``): what depends on the machine rather than the config (the resume or
    initial checkpoint, the tokenizer against shards and weights, the logger's package) is appended to
    ``deferred`` instead of raised: ``inspect`` prints the plan, then each as a warning, so a midtraining
    config can be inspected before its pretraining run reached the branch step.
    """
    deferred = [] if deferred is None else deferred
    config = resolve_model(model_name, model_config)
    if data is None:
        raise MidtrainError("data is not set; configure a ShardedMixedDataset under `data:`.")
    train.validate()
    check_eval(eval)
    check_batches(train, devices, num_nodes, accelerator)
    seq_len = check_seq_len(train, config)
    check_data(data, train, seq_len)
    check_token_range(data, config)
    for check in (
        lambda: check_remote_tokenizers(data, tokenizer_dir),
        lambda: check_start(config, seq_len, data, resume, out_dir, initial_checkpoint_dir, tokenizer_dir),
        lambda: check_logger(logger_name),
    ):
        try:
            check()
        except MidtrainError as e:
            if not dry_run:
                raise
            deferred.append(str(e))
    return config


def check_finetune(
    *, config: Config, train: TrainArgs, eval: EvalArgs, devices: int | str, num_nodes: int,
    accelerator: str = "auto", resume: Any = False, out_dir: Path | str = "out/finetune", logger_name: str = "csv",
    length_from_epochs: bool = False,
) -> None:
    """What ``midtrain finetune`` checks before loading weights (besides its data and replay checks)."""
    train.validate(length_from_epochs)
    check_eval(eval)
    check_batches(train, devices, num_nodes, accelerator)
    check_seq_len(train, config)
    check_resume(resume, out_dir)
    check_logger(logger_name)
