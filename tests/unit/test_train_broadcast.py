"""A sequence-parallel group's micro-batch travels from its one reader by `dist.broadcast` (issue 27).

Two gloo processes: rank 0 reads (its batch is the group's), rank 1 passes None, as a non-reading rank does in
the trainer, and receives every tensor (its shape and dtype) and every plain value (a pack's grids, its row count).
Before the fix the batch was pickled through `broadcast_object_list`, and the receiving rank had to hold a batch.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _batch() -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "patches": torch.randn(40, 48, generator=g),  # (ΣN, P)
        "text_tokens": torch.randn(2, 5, 8, generator=g).half(),  # fp16 in transit
        "text_mask": torch.rand(2, 5, generator=g) > 0.3,
        "epoch": torch.tensor([1, 2]),
        "grids": ((1, 4, 4), (3, 2, 4)),
        "rows": 2,
    }


def _worker(rank: int, port: int, queue) -> None:  # noqa: ANN001
    from pipelines.train.sequence_parallel import broadcast_batch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        got = broadcast_batch(_batch() if rank == 0 else None, dist.new_group([0, 1]), 0, torch.device("cpu"))
        want = _batch()
        ok = set(got) == set(want) and got["grids"] == want["grids"] and got["rows"] == 2
        for key in ("patches", "text_tokens", "text_mask", "epoch"):
            ok = ok and got[key].dtype == want[key].dtype and torch.equal(got[key], want[key])
        queue.put((rank, ok))
    finally:
        dist.destroy_process_group()


def test_the_readers_batch_reaches_a_rank_that_read_nothing():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(queue.get() for _ in range(2)) == [(0, True), (1, True)]
