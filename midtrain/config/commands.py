"""One config object per training command, validated once when built.

``midtrain pretrain`` / ``finetune`` build a :class:`PretrainConfig` / :class:`FinetuneConfig` from their options
(litgpt's field names; each dataclass declares its options and their help) and pass it whole to the
processes ``fabric.launch`` starts. Building one runs every check that needs no loaded data
(:mod:`midtrain.config.checks`) and resolves what the options name: the model ``Config``, the starting
checkpoint, the tokenizer, the replay mixture. What needs the data module loaded (the SFT split's size and
scored tokens) is checked where that data is built, in the process that loads it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from litgpt.config import Config
from litgpt.data import DataModule
from litgpt.tokenizer import Tokenizer

from midtrain.config.checks import check_finetune, check_pretrain, world_size
from midtrain.config.sections import EvalArgs, TrainArgs
from midtrain.data.replay import Replay
from midtrain.data.sharded_mixed import ShardedMixedDataset
from midtrain.data.shards import load_shard
from midtrain.errors import MidtrainError
from midtrain.rundir import MODEL_CONFIG_FILE, MODEL_FILE, TOKENIZER_MODEL_FILES, find_latest, has_tokenizer, to_plain

Resume = bool | Literal["auto"] | Path
Strategy = Literal["auto", "ddp", "fsdp"]
LoggerName = Literal["wandb", "tensorboard", "csv"]


def _options(cfg: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}


@dataclass
class PretrainConfig:
    """Pretrain (or midtrain) a litgpt model on a weighted mixture of token shards.

    Built once from the command's options (litgpt's field names; the CLI reads them and their help from here),
    running every check that needs no loaded data; then passed whole to the processes ``fabric.launch`` starts.

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

    model_name: str | None = None
    model_config: Config | None = None
    out_dir: Path = Path("out/pretrain")
    precision: str | None = None
    initial_checkpoint_dir: Path | None = None
    resume: Resume = "auto"
    data: ShardedMixedDataset | None = None
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    optimizer: str | dict = "AdamW"
    devices: int | str = "auto"
    num_nodes: int = 1
    accelerator: str = "auto"
    strategy: Strategy = "auto"
    tokenizer_dir: Path | None = None
    logger_name: LoggerName = "csv"
    seed: int = 42
    compile: bool = True
    preemption_signal: str | None = "SIGUSR1"
    model: Config = field(init=False)
    """The litgpt model config (from ``model_name`` or ``model_config``)."""

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.model = check_pretrain(
            model_name=self.model_name, model_config=self.model_config, data=self.data, train=self.train,
            eval=self.eval, devices=self.devices, num_nodes=self.num_nodes, accelerator=self.accelerator,
            resume=self.resume, out_dir=self.out_dir, initial_checkpoint_dir=self.initial_checkpoint_dir,
            tokenizer_dir=self.tokenizer_dir, logger_name=self.logger_name,
        )  # fmt: skip

    @property
    def seq_len(self) -> int:
        return self.train.max_seq_length or self.model.block_size

    def hparams(self) -> dict:
        """The run config as plain data (saved with every checkpoint)."""
        return to_plain({**_options(self), "config": self.model}, repr)


@dataclass
class FinetuneConfig:
    """Fine-tune all weights of a checkpoint on instruction data, optionally replaying pretraining shards.

    Built once from the command's options (litgpt's field names; the CLI reads them and their help from here),
    running every check that needs no loaded data; then passed whole to the processes ``fabric.launch`` starts.

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

    checkpoint_dir: Path
    out_dir: Path = Path("out/finetune")
    precision: str | None = None
    devices: int | str = 1
    num_nodes: int = 1
    accelerator: str = "auto"
    strategy: Strategy = "auto"
    data: DataModule | None = None
    replay: Replay | None = None
    val_data_path: dict[str, Path] | None = None
    train: TrainArgs = field(default_factory=TrainArgs)
    epochs: float | None = None
    eval: EvalArgs = field(default_factory=lambda: EvalArgs(interval=100))
    optimizer: str | dict = "AdamW"
    resume: Resume = "auto"
    tokenizer_dir: Path | None = None
    logger_name: LoggerName = "csv"
    seed: int = 42
    compile: bool = True
    preemption_signal: str | None = "SIGUSR1"
    base: Path = field(init=False)
    """The checkpoint directory holding the starting weights."""
    replay_data: ShardedMixedDataset | None = field(init=False)
    model: Config = field(init=False)
    n_replay: int = field(init=False)
    """Replay sequences per optimizer step, over all processes."""

    def __post_init__(self) -> None:
        if self.data is None:
            raise MidtrainError(
                "data is not set; configure a litgpt SFT data module under `data:` (e.g. litgpt.data.JSON)."
            )
        self.out_dir = Path(self.out_dir)
        self.base = _resolve_base(Path(self.checkpoint_dir))
        self.tokenizer_dir = Path(self.tokenizer_dir) if self.tokenizer_dir is not None else self.base
        if not has_tokenizer(self.tokenizer_dir):
            raise MidtrainError(
                f"No tokenizer ({' or '.join(TOKENIZER_MODEL_FILES)}) in {self.tokenizer_dir}; pass tokenizer_dir, the "
                "tokenizer the checkpoint was pretrained with."
            )
        if (self.epochs is None) == (self.train.max_steps is None):
            raise MidtrainError("Give exactly one of train.max_steps or epochs for the fine-tuning length.")
        if self.epochs is not None and self.epochs <= 0:
            raise MidtrainError(f"epochs must be > 0, got {self.epochs}.")
        self.replay = self.replay or Replay()
        self.replay_data = self.replay.build()
        self.model = Config.from_file(self.base / MODEL_CONFIG_FILE)
        check_finetune(
            config=self.model, train=self.train, eval=self.eval, devices=self.devices, num_nodes=self.num_nodes,
            accelerator=self.accelerator, resume=self.resume, out_dir=self.out_dir, logger_name=self.logger_name,
            length_from_epochs=self.epochs is not None,
        )  # fmt: skip
        world = world_size(self.devices, self.num_nodes, self.accelerator)
        self.n_replay = self.replay.sequences_per_step(self.train.global_batch_size, world)
        self._check_tokenizer()
        self._check_val_sets()

    @property
    def seq_len(self) -> int:
        return self.train.max_seq_length or self.model.block_size

    def shard_val_sets(self) -> list[tuple[str, Path]]:
        """Pretraining-shard validation sets: ``replay.data.val_data_path``, then ``val_data_path``."""
        replay_sets = self.replay_data.val_paths if self.replay_data else {}
        return [(name, Path(path)) for name, path in [*replay_sets.items(), *(self.val_data_path or {}).items()]]

    def _check_val_sets(self) -> None:
        seen = {"sft"}
        for name, path in self.shard_val_sets():
            if name in seen:
                raise MidtrainError(
                    f"Validation set name {name!r} is used twice; names must be unique (and not 'sft')."
                )
            seen.add(name)
            if not path.is_dir():
                raise MidtrainError(f"Validation set {name!r}: {path} does not exist.")
            load_shard(name, "val", path).check_block_size(self.seq_len + 1)

    def _check_tokenizer(self) -> None:
        vocab = Tokenizer(self.tokenizer_dir).vocab_size
        if vocab > self.model.padded_vocab_size:
            raise MidtrainError(
                f"The tokenizer in {self.tokenizer_dir} has {vocab} tokens, the model only "
                f"{self.model.padded_vocab_size}; they do not belong together."
            )

    def hparams(self) -> dict:
        """The run config as plain data (saved with every checkpoint)."""
        options = {**_options(self), "base": self.base, "replay_data": self.replay_data, "config": self.model}
        return to_plain(options, repr)


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
