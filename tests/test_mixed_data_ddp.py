"""Two real processes (gloo): ranks draw different source sequences and disjoint samples."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from midtrain.data import ShardedMixedDataset


def _rank_main(rank: int, world: int, tree: str, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dm = ShardedMixedDataset(data_path=Path(tree), mix_weights_str="main:0.5,code:0.5", num_workers=0)
    dm.connect(batch_size=16, max_seq_length=16, with_source=True)
    loader = dm.train_dataloader()
    sources, firsts = [], []
    for k, batch in enumerate(loader):
        sources.append(batch["source"].tolist())
        firsts += batch["input_ids"][:, 0].tolist()
        if k == 9:
            break
    Path(out, f"rank{rank}.json").write_text(json.dumps({"sources": sources, "firsts": firsts,
                                                         "rank": loader.state_dict()["rank"]}))
    dist.destroy_process_group()


def test_ranks_differ_in_sources_and_samples(tree, tmp_path):
    port = 29500 + os.getpid() % 1000
    mp.spawn(_rank_main, args=(2, str(tree), str(tmp_path), port), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["sources"] != r1["sources"]
    assert set(r0["firsts"]).isdisjoint(r1["firsts"])  # litdata splits each shard between the ranks
