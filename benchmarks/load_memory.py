"""Host memory of loading a checkpoint on 2 CPU processes (DDP over gloo): before/after the loading changes.

    python benchmarks/load_memory.py [--n_embd 768] [--n_layer 6]

Writes one checkpoint (model + AdamW state, via ``save_checkpoint``), then, in a fresh 2-process group per
way, loads it and prints each rank's peak RSS and private (anonymous, not page-cache) memory:

* ``lightning-fsdp-style``: what Lightning's FSDP full-checkpoint load does on every rank (lazy load, then
  every entry but the model materialised), for a weights-only load and for a resume;
* ``model entry only``: :func:`midtrain.train.loading.load_model_entry` (weights-only loads now);
* ``resume (mmap)``: ``load_checkpoint`` as resumes on DDP run it (optimizer state memory-mapped).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from litgpt.config import Config
from litgpt.model import GPT


def private_mib() -> float:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(fields[k].split()[0]) for k in ("Private_Dirty", "Anonymous") if k in fields) / 2 / 1024


def work(fabric: L.Fabric, how: str, cfg: dict, path: Path) -> None:
    from lightning.fabric.utilities.load import _lazy_load, _materialize_tensors

    from midtrain.rundir import MODEL_FILE
    from midtrain.train.checkpoints import load_checkpoint, save_checkpoint
    from midtrain.train.loading import load_model_entry

    model = fabric.setup(GPT(Config(**cfg)))
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters()))
    if how == "save":
        model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
        optimizer.step()
        save_checkpoint(fabric, path, 1, {"model": model, "optimizer": optimizer}, {"step": 1}, {})
        return
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    file = path / "step-00000001" / MODEL_FILE
    if how == "lightning-fsdp-style":
        checkpoint = _lazy_load(file)
        model.load_state_dict(checkpoint.pop("model"))
        rest = _materialize_tensors(checkpoint)  # noqa: F841 - held, as Lightning holds it while loading
    elif how == "model entry only":
        load_model_entry(fabric, model, file)
    else:
        load_checkpoint(fabric, path / "step-00000001", {"model": model, "optimizer": optimizer})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{how:<22} rank {fabric.global_rank}: peak RSS {peak:,.0f} MiB (+{peak - base_rss:,.0f} over the set-up "
          f"model), private {private_mib():,.0f} MiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--n_layer", type=int, default=6)
    parser.add_argument("--how", default=None)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    cfg = {"name": "mem", "n_layer": args.n_layer, "n_head": 8, "n_embd": args.n_embd, "block_size": 64,
           "vocab_size": 8192, "padded_vocab_size": 8192}
    if args.how:  # one way, in its own process group
        from midtrain.train.runtime import build_fabric

        fabric = build_fabric(2, 1, "32-true", "ddp", "cpu")  # what midtrain runs on 2 CPU processes
        fabric.launch(work, args.how, cfg, Path(args.dir))
        return
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        for how in ("save", "lightning-fsdp-style", "model entry only", "resume (mmap)"):
            subprocess.run([sys.executable, __file__, "--how", how, "--dir", tmp, "--n_embd", str(args.n_embd),
                            "--n_layer", str(args.n_layer)], check=True)  # fmt: skip


if __name__ == "__main__":
    main()
