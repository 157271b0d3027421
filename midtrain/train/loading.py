"""Reading checkpoints into a set-up model without holding more than needed on every rank.

* **Weights only** (``initial_checkpoint_dir``, finetune's ``checkpoint_dir``, ``evaluate``): the file is
  memory-mapped and only its ``"model"`` entry is read (a ``step-*`` checkpoint's optimizer state is never
  touched); FSDP gathers and re-shards it module by module, as Lightning does.
* **Resume on FSDP**: the model likewise; the optimizer state is read on rank 0 only and scattered
  (``FullOptimStateDictConfig(rank0_only=True)``): rank 0 broadcasts one parameter's state at a time and
  every rank keeps its shard, so no rank but 0 ever holds the full Adam state, and rank 0 reads it from the
  page cache. (Lightning's own FSDP load materialises it on every rank.) On DDP every rank needs the whole
  state anyway (it is replicated); there ``fabric.load`` reads it memory-mapped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric import Fabric
from lightning.fabric.strategies import FSDPStrategy
from lightning.fabric.wrappers import _unwrap_objects

from midtrain.train.checkpoints import read_weights_only


def load_model_entry(fabric: Fabric, model: Any, file: Path | str, strict: bool = True) -> None:
    """Load the model weights of ``file`` (our ``{"model": ...}`` or litgpt's plain state dict) into ``model``
    (set up by Fabric), reading nothing else of the file. Call on every rank."""
    state = read_weights_only(file)
    _load_module(fabric, model, state["model"] if isinstance(state.get("model"), dict) else state, strict)


def load_fsdp_resume(fabric: Fabric, file: Path | str, state: dict[str, Any], strict: bool = True) -> bool:
    """Model and optimizer of a full (single-file) checkpoint into FSDP ``state``; the optimizer state from rank 0
    only. False (nothing done) when this is not FSDP with exactly a model and an optimizer to restore."""
    if not isinstance(fabric.strategy, FSDPStrategy) or set(state) != {"model", "optimizer"}:
        return False
    import torch.distributed as dist
    from lightning.fabric.strategies.fsdp import _get_full_state_dict_context
    from lightning.fabric.strategies.model_parallel import _rekey_optimizer_state_if_needed
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    checkpoint = read_weights_only(file)  # memory-mapped: nothing is read until used
    _load_module(fabric, state["model"], checkpoint["model"], strict)
    module, optimizer = _unwrap_objects(state["model"]), _unwrap_objects(state["optimizer"])
    if "optimizer" not in checkpoint:
        raise KeyError(f"'optimizer' is not in {file}")
    with _get_full_state_dict_context(module, world_size=fabric.world_size, rank0_only=True):
        full = _rekey_optimizer_state_if_needed(checkpoint["optimizer"], module) if dist.get_rank() == 0 else {}
        flat = FSDP.optim_state_dict_to_load(model=module, optim=optimizer, optim_state_dict=full)
    optimizer.load_state_dict(flat)
    return True


def _load_module(fabric: Fabric, model: Any, state_dict: dict[str, Any], strict: bool) -> None:
    module = _unwrap_objects(model)
    if isinstance(fabric.strategy, FSDPStrategy):
        from lightning.fabric.strategies.model_parallel import _load_raw_module_state

        _load_raw_module_state(state_dict, module, world_size=fabric.world_size, strict=strict)
    else:
        fabric.strategy.load_module_state_dict(module, state_dict, strict=strict)
