"""litgpt's field names in a midtrain config: translated with litgpt's meaning (a note is printed) or refused
in one line naming midtrain's field.

==========================  ======================================================================
litgpt                      midtrain
==========================  ======================================================================
``train.max_tokens``        ``train.max_steps = max_tokens // (global_batch_size * max_seq_length)``
``eval.max_iters``          ``eval.max_samples = max_iters * eval batch * devices * num_nodes``
``train.epochs``            finetune: top-level ``epochs``; pretrain: refused (length is in steps)
``eval.max_new_tokens``,    dropped: midtrain validates losses and generates no samples
``eval.evaluate_example``
``train.lr_warmup_steps``,  same names, same meaning (no translation needed)
``min_lr``, ``max_norm`` …
==========================  ======================================================================
"""

from __future__ import annotations

from typing import Any

from midtrain.errors import MidtrainError

DELETE = object()


def get(cfg: dict, key: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def has(cfg: dict, key: str) -> bool:
    return get(cfg, key, DELETE) is not DELETE


def _seq_len(cfg: dict) -> int:
    seq = get(cfg, "train.max_seq_length")
    if seq:
        return int(seq)
    block = get(cfg, "model_config.block_size")
    if block:
        return int(block)
    name = cfg.get("model_name")
    if name:
        from litgpt.config import Config

        try:
            return Config.from_name(name).block_size
        except ValueError:
            pass
    raise MidtrainError(
        "train.max_tokens (litgpt) needs the sequence length to become train.max_steps: set train.max_seq_length, "
        "or give train.max_steps directly."
    )


def _world(cfg: dict) -> tuple[int, str]:
    from midtrain.config.checks import world_size

    devices, nodes = cfg.get("devices", 1), int(cfg.get("num_nodes", 1) or 1)
    world = world_size(devices, nodes, cfg.get("accelerator", "auto"))
    if isinstance(devices, int) and devices > 0:
        return world, f" on each of {world} devices"
    return world, f" on each of {world} device(s) (devices: {devices} = {world // nodes} per node)"


def translate(command: str, cfg: dict) -> tuple[dict[str, Any], list[str]]:
    """Changes ``{dotted key: new value or DELETE}`` turning litgpt's names in ``cfg`` into midtrain's, with notes."""
    changes: dict[str, Any] = {}
    notes: list[str] = []
    if has(cfg, "train.max_tokens"):
        tokens = int(get(cfg, "train.max_tokens"))
        if get(cfg, "train.max_steps") is not None:
            raise MidtrainError("Give train.max_steps or litgpt's train.max_tokens, not both (midtrain counts steps).")
        batch = int(get(cfg, "train.global_batch_size", 512))
        seq = _seq_len(cfg)
        steps = tokens // (batch * seq)
        if steps < 1:
            raise MidtrainError(
                f"train.max_tokens={tokens:,} is less than one optimizer step ({batch} x {seq} = {batch * seq:,} "
                "tokens); midtrain counts steps: set train.max_steps."
            )
        changes.update({"train.max_tokens": DELETE, "train.max_steps": steps})
        notes.append(
            f"train.max_tokens: {tokens:,} -> train.max_steps: {steps:,} (= max_tokens // "
            f"(global_batch_size {batch} x max_seq_length {seq}))"
        )
    if has(cfg, "train.epochs"):
        epochs = get(cfg, "train.epochs")
        if command != "finetune":
            raise MidtrainError(
                "train.epochs: pretraining length is train.max_steps (optimizer steps) or litgpt's train.max_tokens; "
                "epochs apply to `midtrain finetune` (top-level `epochs`)."
            )
        if cfg.get("epochs") is not None:
            raise MidtrainError("Give `epochs` or litgpt's train.epochs, not both.")
        changes.update({"train.epochs": DELETE, "epochs": epochs})
        notes.append(f"train.epochs: {epochs} -> epochs: {epochs} (midtrain finetune takes it at the top level)")
    if has(cfg, "eval.max_iters"):
        iters = int(get(cfg, "eval.max_iters"))
        if get(cfg, "eval.max_samples") is not None:
            raise MidtrainError("Give eval.max_samples or litgpt's eval.max_iters, not both.")
        batch = int(get(cfg, "eval.batch_size") or get(cfg, "train.micro_batch_size", 4))
        world, how = _world(cfg)
        samples = iters * batch * world
        changes.update({"eval.max_iters": DELETE, "eval.max_samples": samples})
        notes.append(
            f"eval.max_iters: {iters} -> eval.max_samples: {samples} (litgpt: {iters} batches of {batch}{how}; "
            "midtrain: a fixed sequence budget per validation set)"
        )
    for key in ("eval.max_new_tokens", "eval.evaluate_example"):
        if has(cfg, key):
            changes[key] = DELETE
            notes.append(f"{key} dropped: midtrain validates losses and does not generate samples")
    return changes, notes


def apply(cfg: dict, changes: dict[str, Any]) -> None:
    """Apply ``{dotted key: value or DELETE}`` to ``cfg`` in place."""
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            if value is DELETE and not isinstance(node.get(part), dict):
                break
            node = node.setdefault(part, {})
        else:
            if value is DELETE:
                node.pop(leaf, None)
            else:
                node[leaf] = value
