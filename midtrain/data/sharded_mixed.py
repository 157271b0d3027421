"""``ShardedMixedDataset``: the litgpt ``DataModule`` over typed, weighted token shards.

It works as the ``data:`` of ``midtrain pretrain`` (batches carry their source) and of the stock
``litgpt pretrain`` (plain token tensors; one mixture, a validation set required). Every setting
is checked when the object is built: shards are discovered, the mixture and every stage's
mixture are resolved, validation paths are verified; ``connect`` then checks that each sampled
shard can serve the sequence length. The training order is ``midtrain.data.order``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from litgpt.data import DataModule
from litgpt.tokenizer import Tokenizer
from torch.utils.data import DataLoader, Dataset

from midtrain.data.mixed_stream import MixedLoader, MixedStream, Source, resume_order
from midtrain.data.mixture import MODE_FIELDS, Mixture, MixtureSpec, resolve_mixture
from midtrain.data.order import BLENDS, DataOrder, Generation, RankSlice, RunOrder, layout_fingerprint
from midtrain.data.shards import Shard, discover_shards, load_shard
from midtrain.errors import MidtrainError
from midtrain.storage import is_remote, open_dataset


@dataclass
class Stage:
    """A mixture that takes over at optimizer step ``at_step``."""

    at_step: int
    spec: MixtureSpec
    mixture: Mixture


@dataclass
class ShardedMixedDataset(DataModule):
    """Weighted mixture of litdata token shards under ``data_path`` (see ``midtrain.data.mixture``)."""

    data_path: str | Path | None = None
    """Directory holding the shard folders (``1``, ``2``, ``c1``, ``m1``, ...); may be ``s3://…`` or ``gs://…``."""
    val_data_path: str | dict[str, str] | None = None
    """A validation shard directory, or a mapping ``name -> shard directory`` for several sets (local or remote)."""
    mix_weights_str: str | dict[str, float] | None = None
    """Weighted mode: per-type weights, e.g. ``main:0.8,code:0.2``."""
    literal_weights_str: str | dict[str, float] | None = None
    """Literal mode: per-shard weights, e.g. ``main/1:0.8,q1:0.1,q2:0.1``."""
    proportional_sampling: bool = False
    """Proportional mode: weight every shard by its token count."""
    mix_config_path: str | None = None
    """A JSON/YAML file holding the fields of one mode."""
    divide_by_tokens: bool = False
    """Weighted mode: split a type's weight across its shards by tokens instead of equally."""
    proportional_multipliers: dict[str, float] | None = None
    """Proportional mode: per-type multipliers, e.g. ``{code: 2.0}``."""
    shard_types: dict[str, str] | None = None
    """Extra shard types, ``name -> directory prefix`` (e.g. ``{pubmed: pm}``)."""
    stages: list[dict[str, Any]] | None = None
    """Mixture switches inside one run: ``[{at_step: 20000, mix_weights_str: "main:0.88,math:0.12"}]``."""
    seed: int = 42
    """Seed of the data order (per-source epoch permutations; the random blend)."""
    blend: str = "exact"
    """``exact``: every prefix of a mixture within one sample of its shares; ``random``: i.i.d. source draws."""
    storage_options: dict[str, Any] | None = None
    """Passed to every litdata ``StreamingDataset`` (credentials / endpoint for ``s3://`` and other remote shards)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 = in the main process)."""
    repeat_warning: float = 4.0
    """`midtrain inspect` warns when a shard would be read more than this many times."""

    tokenizer: Tokenizer | None = field(default=None, init=False, repr=False)
    batch_size: int = field(default=1, init=False, repr=False)
    block_size: int = field(default=-1, init=False, repr=False)
    with_source: bool = field(default=False, init=False, repr=False)
    global_batch_size: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__init__()
        if self.num_workers < 0:
            raise MidtrainError(f"data.num_workers must be >= 0, got {self.num_workers}.")
        if self.blend not in BLENDS:
            raise MidtrainError(f"data.blend must be one of {', '.join(BLENDS)}, got {self.blend!r}.")
        self.shards: list[Shard] = discover_shards(self.data_path, self.shard_types, self.storage_options)
        self.spec = MixtureSpec(
            mix_weights_str=self.mix_weights_str,
            literal_weights_str=self.literal_weights_str,
            proportional_sampling=self.proportional_sampling,
            mix_config_path=self.mix_config_path,
            divide_by_tokens=self.divide_by_tokens,
            proportional_multipliers=self.proportional_multipliers,
        )
        self.mixture = resolve_mixture(self.spec, self.shards, self.shard_types)
        self.stage_list = self._resolve_stages()
        self.val_paths = self._resolve_val_paths()

    def _resolve_stages(self) -> list[Stage]:
        stages = [Stage(at_step=0, spec=self.spec, mixture=self.mixture)]
        for i, raw in enumerate(self.stages or []):
            if not isinstance(raw, dict) or "at_step" not in raw:
                raise MidtrainError(f"data.stages[{i}] must be a mapping with 'at_step' and one of {MODE_FIELDS}.")
            fields_ = dict(raw)
            at = fields_.pop("at_step")
            if not isinstance(at, int) or at <= stages[-1].at_step:
                raise MidtrainError(
                    f"data.stages[{i}].at_step is {at!r}; stage steps must be integers, > 0 and increasing."
                )
            spec = MixtureSpec.from_mapping(fields_, where=f"data.stages[{i}]")
            stages.append(Stage(at_step=at, spec=spec, mixture=resolve_mixture(spec, self.shards, self.shard_types)))
        return stages

    def _resolve_val_paths(self) -> dict[str, Path | str]:
        if self.val_data_path is None:
            return {}
        raw = self.val_data_path if isinstance(self.val_data_path, dict) else {"val": self.val_data_path}
        paths: dict[str, Path | str] = {}
        for name, path in raw.items():
            p = path if is_remote(path) else Path(path).expanduser()
            if not is_remote(p) and not p.is_dir():
                raise MidtrainError(f"Validation set {name!r}: {p} does not exist.")
            paths[str(name)] = load_shard(str(name), "val", p, self.storage_options).path  # checks index.json
        return paths

    # --- litgpt DataModule interface -------------------------------------------------------

    def connect(
        self, tokenizer: Tokenizer | None = None, batch_size: int = 1, max_seq_length: int | None = -1, **kwargs: Any
    ) -> None:
        if max_seq_length is None or max_seq_length < 1:
            raise MidtrainError("ShardedMixedDataset needs max_seq_length >= 1 (train.max_seq_length or the model's).")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.block_size = max_seq_length + 1  # inputs plus the next-token targets
        self.with_source = bool(kwargs.get("with_source", False))  # midtrain's loops; the stock loop omits it
        self.global_batch_size = kwargs.get("global_batch_size")
        for stage in self.stage_list:
            for row in stage.mixture.active:
                row.shard.check_block_size(self.block_size)
        for name, path in self.val_paths.items():
            load_shard(name, "val", path, self.storage_options).check_block_size(self.block_size)

    def stage_at(self, step: int) -> tuple[int, Stage]:
        """Index and stage in force at optimizer step ``step``."""
        index = max(i for i, s in enumerate(self.stage_list) if s.at_step <= step)
        return index, self.stage_list[index]

    def _layouts(self) -> dict[str, tuple[int, ...]]:
        """Samples per chunk of every shard at the connected block size."""
        return {s.id: tuple(d // self.block_size for d in s.chunk_dims) for s in self.shards}

    def order(self, step: int = 0, state: dict | None = None, later_stages: bool = True) -> RunOrder:
        """The data order of a run from optimizer step ``step`` (0-based): fresh, or continuing a checkpoint's
        loader ``state``; the stage in force at ``step`` and (``later_stages``) every later stage, each a new
        generation only where its mixture differs. The one builder of the order for training (each loader and
        stage switch) and for ``midtrain inspect`` (needs ``connect`` with ``global_batch_size``)."""
        self._require_connected()
        batch = self._global_batch()
        index, stage = self.stage_at(step)
        weights, reason = stage.mixture.weights_by_id(), f"stage {index}"
        fresh = DataOrder(self.seed, self._layouts(), [Generation(step * batch, weights, self.blend, {}, reason)])
        if state is None:
            run = RunOrder(fresh, step, step * batch, batch)
        else:
            order, consumed, _ = resume_order(state, fresh, self.block_size, self._shards_seen(stage), weights,
                                              self.blend, reason)  # fmt: skip
            run = RunOrder(order, step, consumed, batch)
        for i, later in enumerate(self.stage_list[index + 1 :] if later_stages else [], start=index + 1):
            run.order.continue_with(run.index_of(later.at_step), later.mixture.weights_by_id(), self.blend,
                                    f"stage {i}")  # fmt: skip
        return run

    def _global_batch(self) -> int:
        """Sequences per optimizer step over all ranks (the stock loop gives none: ranks x micro-batch)."""
        return self.global_batch_size or _world_and_rank()[0] * self.batch_size

    def _sources(self, stage: Stage) -> list[Source]:
        return [
            Source(id=r.shard.id, type=r.shard.type, path=str(r.shard.path), tokens=r.shard.tokens,
                   fingerprint=layout_fingerprint(r.shard.chunk_dims), dtype_code=r.shard.dtype_code)
            for r in stage.mixture.active
        ]

    def _shards_seen(self, stage: Stage) -> dict[str, dict]:
        return {s.id: {"tokens": s.tokens, "fingerprint": s.fingerprint} for s in self._sources(stage)}

    def train_dataloader(self, step: int = 0, state: dict | None = None) -> MixedLoader:
        """This rank's loader from optimizer step ``step``: fresh, or continuing the loader ``state`` of a
        checkpoint or of the loader of the stage before (the order: :meth:`order`, up to the stage at ``step``)."""
        self._require_connected()
        if not self.with_source and len(self.stage_list) > 1:
            raise MidtrainError(
                "data.stages switch the mixture inside a run, which the stock `litgpt pretrain` loop cannot do "
                "(it builds its loader once). Run `midtrain pretrain` with this config."
            )
        world, rank = _world_and_rank()
        ranks = RankSlice(self._global_batch(), world, rank, self.batch_size)
        run = self.order(step, None, later_stages=False)
        stream = MixedStream(run.order, self._sources(self.stage_at(step)[1]), self.block_size, ranks,
                             start=run.index, storage_options=self.storage_options)  # fmt: skip
        loader = MixedLoader(stream, num_workers=self.num_workers, plain=not self.with_source)
        if state is not None:
            loader.load_state_dict(state)  # resume_order, as in order(); checks a mid-step state's batch split
        else:
            run.order.blend(0)  # computed once here; workers get it with the stream
        return loader

    def val_dataloader(self) -> DataLoader:
        """The first validation set as plain token batches (what the stock ``litgpt pretrain`` loop expects)."""
        self._require_connected()
        if not self.val_paths:
            raise MidtrainError(
                "The stock `litgpt pretrain` loop needs a validation set: set data.val_data_path (or run "
                "`midtrain pretrain`, where validation sets are optional)."
            )
        name, path = next(iter(self.val_paths.items()))
        windows = ValWindows(path, self.block_size, None, masked=False, storage_options=self.storage_options)
        return DataLoader(windows, batch_size=self.batch_size)

    def val_dataloaders(self, max_samples: int | None = None, batch_size: int | None = None) -> dict[str, DataLoader]:
        """One loader per named validation set, each over a fixed sample budget split evenly across ranks."""
        self._require_connected()
        return {
            name: DataLoader(
                ValWindows(path, self.block_size, max_samples, storage_options=self.storage_options),
                batch_size=batch_size or self.batch_size,
            )
            for name, path in self.val_paths.items()
        }

    def _require_connected(self) -> None:
        if self.block_size < 2:
            raise MidtrainError("Call data.connect(tokenizer, batch_size, max_seq_length) before asking for loaders.")


def _world_and_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ValWindows(Dataset):
    """A fixed budget of evenly spaced, unshuffled windows of a validation shard, split across ranks.

    Window ``i`` of ``n`` is sample ``floor(i * total / n)``; rank ``r`` of ``w`` takes windows
    ``r, r + w, ...``. The union over ranks is the same set for every world size, so a summed and
    all-reduced loss does not depend on the device count or the micro-batch size. Every rank gets
    ``ceil(n / w)`` items, so every rank runs the same number of forward passes (collectives under
    FSDP): a rank short of windows pads with a copy of a window whose targets are all masked
    (``masked=True``: dict items ``input_ids``/``labels``), or, for the stock loop's plain tensors,
    with a repeat of the shard's first window.
    """

    def __init__(
        self,
        path: Any,
        block_size: int,
        max_samples: int | None = None,
        masked: bool = True,
        storage_options: dict | None = None,
    ) -> None:
        self.dataset = open_dataset(path, block_size, storage_options)
        total = load_shard("val", "val", path, storage_options).samples(block_size)
        n = total if max_samples is None else min(total, int(max_samples))
        world, rank = _world_and_rank()
        self.indices = [i * total // n for i in range(rank, n, world)]
        self.length = -(-n // world)
        self.total_windows = n
        self.masked = masked

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor | dict[str, torch.Tensor]:
        if not 0 <= i < self.length:
            raise IndexError(i)  # ends plain iteration over the dataset
        pad = i >= len(self.indices)
        window = self.dataset[0 if pad else self.indices[i]]
        if not self.masked:
            return window
        labels = window[1:].clone()
        if pad:
            labels.fill_(-100)
        return {"input_ids": window[:-1], "labels": labels}


def register_litgpt_alias() -> None:
    """Old configs say ``class_path: litgpt.data.ShardedMixedDataset`` (the research fork's location)."""
    import litgpt.data

    litgpt.data.ShardedMixedDataset = ShardedMixedDataset
