"""Pieces every training entry point shares: Fabric setup, metrics log, validation, preemption."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.strategies import DDPStrategy, FSDPStrategy
from litgpt.config import Config
from litgpt.model import GPT, Block
from litgpt.utils import get_default_supported_precision, parse_devices
from torch.utils.data import DataLoader

from midtrain import preemption
from midtrain.errors import MidtrainError
from midtrain.preemption import EXIT_PREEMPTED  # noqa: F401  (re-exported for the loops)


def build_fabric(
    devices: int | str,
    num_nodes: int,
    precision: str | None,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    accelerator: str = "auto",
) -> L.Fabric:
    """A Fabric for 1 process, N CPU processes (DDP over gloo) or N GPUs (FSDP by default)."""
    precision = precision or get_default_supported_precision(training=True)
    devices = parse_devices(devices)
    on_gpu = accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available()
    if devices * num_nodes == 1:
        chosen = "auto"
    elif strategy == "fsdp" or (strategy == "auto" and on_gpu):
        chosen = FSDPStrategy(auto_wrap_policy={Block}, state_dict_type="full", sharding_strategy="HYBRID_SHARD")
    else:
        chosen = DDPStrategy(process_group_backend="nccl" if on_gpu else "gloo")
    return L.Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=chosen, precision=precision)


def sequence_losses(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, ...]:
    """Per-sequence summed token loss and per-sequence count of scored tokens."""
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=ignore_index, reduction="none"
    ).view(targets.shape)
    mask = targets != ignore_index
    return (per_token * mask).sum(dim=1), mask.sum(dim=1)


@torch.no_grad()
def evaluate_sets(fabric: L.Fabric, model: GPT, loaders: dict[str, DataLoader]) -> dict[str, float]:
    """Token-weighted mean loss of each validation set, summed over all ranks."""
    model.eval()
    results = {}
    for name, loader in loaders.items():
        total = torch.zeros(2, dtype=torch.float64, device=fabric.device)
        for batch in loader:
            if isinstance(batch, dict):
                input_ids, targets = batch["input_ids"], batch["labels"]
            else:
                input_ids, targets = batch[:, :-1], batch[:, 1:]
            input_ids = input_ids.to(fabric.device).long()
            targets = targets.to(fabric.device).long()
            loss_sum, count = sequence_losses(model(input_ids), targets)
            total += torch.stack([loss_sum.sum().double(), count.sum().double()])
        total = fabric.all_reduce(total, reduce_op="sum")
        if total[1] == 0:
            raise MidtrainError(f"Validation set {name!r} produced no scored tokens.")
        results[name] = float(total[0] / total[1])
    model.train()
    return results


def val_metrics(losses: dict[str, float]) -> dict[str, float]:
    out = {}
    for name, loss in losses.items():
        out[f"val/{name}/loss"] = loss
        out[f"val/{name}/ppl"] = math.exp(min(loss, 50.0))
    return out


class MetricsLog:
    """Append-only ``metrics.jsonl`` in the run directory (rank 0 writes), plus Fabric's loggers."""

    def __init__(self, fabric: L.Fabric, out_dir: Path) -> None:
        self.fabric = fabric
        self.path = Path(out_dir) / "metrics.jsonl"

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


def tokenizer_fingerprint(tokenizer_dir: Path | None) -> str | None:
    """sha256 over the tokenizer files, to refuse resuming with a different tokenizer."""
    if tokenizer_dir is None:
        return None
    h = hashlib.sha256()
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json")
    for name in names:
        p = Path(tokenizer_dir) / name
        if p.is_file():
            h.update(name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def gather_objects(fabric: L.Fabric, obj: object) -> list:
    """Every rank's ``obj``, in rank order."""
    if fabric.world_size == 1:
        return [obj]
    out: list = [None] * fabric.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def run_config(local_vars: dict) -> dict:
    """The run config as plain data (saved with every checkpoint)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)

    return {k: plain(v) for k, v in local_vars.items() if not k.startswith("_")}


def rank_loader_state(fabric: L.Fabric, states: list[dict]) -> dict:
    """This rank's saved loader state; with another world size, rank 0's (the loader then reshuffles)."""
    if len(states) == fabric.world_size:
        return states[fabric.global_rank]
    return states[0]


def check_compatible(saved: dict, config: Config, seq_len: int, fingerprint: str | None, path: Path) -> None:
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
    old_fp = saved.get("tokenizer_fingerprint")
    if old_fp and fingerprint and old_fp != fingerprint:
        raise MidtrainError(
            f"Checkpoint {path} was trained with another tokenizer (fingerprint {old_fp[:12]} vs "
            f"{fingerprint[:12]}); token IDs would not mean the same thing."
        )


def load_weights(fabric: L.Fabric, model: GPT, directory: Path) -> None:
    """Model weights only, from a litgpt checkpoint dir or one of ours."""
    path = directory / "lit_model.pth"
    if not path.is_file():
        raise MidtrainError(f"initial_checkpoint_dir {directory} has no lit_model.pth.")
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state.get("model", state))
    fabric.print(f"Initial weights from {path}.")


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)
