"""Two real processes (gloo): ranks read their slices of the same global order; equal validation passes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from midtrain.data import ShardedMixedDataset

pytestmark = pytest.mark.slow  # spawns 2-process DDP

MIX = "main:0.5,code:0.3,math:0.2"


def firsts(loader, batches: int) -> list[int]:
    out = []
    for k, batch in enumerate(loader):
        out += batch["input_ids"][:, 0].tolist()
        if k + 1 == batches:
            break
    return out


def _rank_main(rank: int, world: int, tree: str, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dm = ShardedMixedDataset(data_path=Path(tree), mix_weights_str=MIX, num_workers=1,
                             val_data_path={"m": str(Path(tree) / "m1")})
    dm.connect(batch_size=2, max_seq_length=16, with_source=True, global_batch_size=8)
    loader = dm.train_dataloader()
    served = firsts(loader, batches=2 * 5)  # 5 steps of 2 micro-batches
    val = dm.val_dataloaders(max_samples=5, batch_size=2)["m"]
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "firsts": served, "state": loader.state_dict(), "val_items": len(val.dataset), "val_batches": len(list(val)),
    }))
    dist.destroy_process_group()


def test_ranks_read_slices_of_one_order_and_run_equal_validation_passes(tree, tmp_path):
    port = 29500 + os.getpid() % 1000
    mp.spawn(_rank_main, args=(2, str(tree), str(tmp_path), port), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    single = ShardedMixedDataset(data_path=tree, mix_weights_str=MIX, num_workers=0)
    single.connect(batch_size=8, max_seq_length=16, with_source=True, global_batch_size=8)
    steps = firsts(single.train_dataloader(), batches=5)
    for s in range(5):  # step s: rank 0 took positions 0-3, rank 1 positions 4-7
        assert r0["firsts"][4 * s : 4 * s + 4] + r1["firsts"][4 * s : 4 * s + 4] == steps[8 * s : 8 * s + 8]
    assert r0["state"] == r1["state"] and r0["state"]["consumed"] == 40  # any rank's copy restores all
    assert r0["val_items"] == r1["val_items"] == 3  # 5 windows on 2 ranks: 3 + 3, one of them masked
    assert r0["val_batches"] == r1["val_batches"] == 2
