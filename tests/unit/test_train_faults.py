"""The trainer's faults of issue 27 that need no Ray: the stream each rank reads, the devices collectives use,
the noise a step draws, the packed loss's weights, the EMA warm-up, the model's FLOPs. Each failed before its fix."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.train.data import StagePlan, StageStream, reader_micro_batches

ROWS = [5, 3, 7, 4]


def plan(grids=None) -> StagePlan:
    return StagePlan(files=[f"f{i}" for i in range(len(ROWS))], rows=list(ROWS), seed=3, stage_index=1, grids=grids)


def rows_of(micro_batches) -> list[list[tuple[int, int, int]]]:
    """(epoch, file, row) of each micro-batch's samples; rows as the file's epoch permutation orders them."""
    p = plan()
    return [[(e, f, int(p.row_order(e, f)[r])) for e, f, a, b in mb for r in range(a, b)] for mb in micro_batches]


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_the_groups_read_disjoint_micro_batches_that_cover_the_stream(groups):
    """One reader per data-parallel group, not per rank: the groups' micro-batches tile the stream, none twice."""
    stream = StageStream(plan(), micro_batch=2)
    per_group = [rows_of(reader_micro_batches(stream, 0, g, groups, count=6)) for g in range(groups)]
    dealt = [mb for c in range(6) for mb in (per_group[g][c] for g in range(groups))]
    whole = rows_of(reader_micro_batches(stream, 0, 0, 1, count=6 * groups))
    assert dealt == whole
    flat = [s for mb in whole for s in mb]
    assert len(flat) == len(set(flat)) == 12 * groups


@pytest.mark.parametrize("steps_done", [1, 2, 5])
def test_a_reader_resumed_at_a_steps_sample_reads_what_the_uninterrupted_one_read_next(steps_done):
    """A restart (or --resume with the same workers) reads exactly the rest of each group's micro-batches."""
    groups, accum, mb = 2, 2, 3
    stream = StageStream(plan(), micro_batch=mb)
    consumed = steps_done * accum * groups * mb  # what trainer_state.json holds after `steps_done` steps
    for g in range(groups):
        whole = rows_of(reader_micro_batches(stream, 0, g, groups, count=10))
        resumed = rows_of(reader_micro_batches(stream, consumed, g, groups, count=10 - steps_done * accum))
        assert resumed == whole[steps_done * accum :]


def test_packs_resumed_at_a_boundary_are_the_packs_of_the_uninterrupted_stream():
    grids = [(1, 4, 4), (8, 4, 4), (1, 4, 4), (8, 4, 4)]  # 16 and 128 tokens
    stream = StageStream(plan(grids), micro_batch=1, budget=160)
    packs = list(reader_micro_batches(stream, 0, 0, 1, count=12))
    tokens = [sum((b - a) * int(np.prod(grids[f])) for _, f, a, b in mb) for mb in packs]
    assert all(16 <= t <= 160 for t in tokens)
    start = sum(b - a for mb in packs[:5] for _, _, a, b in mb)
    assert list(reader_micro_batches(stream, start, 0, 1, count=7)) == packs[5:]


def test_rows_within_a_file_are_mixed_by_epoch_and_reproducible():
    p = plan()
    assert sorted(p.row_order(0, 2).tolist()) == list(range(7))
    assert {tuple(p.row_order(e, 2)) for e in range(5)} != {tuple(range(7))}
    assert p.row_order(3, 2).tolist() == plan().row_order(3, 2).tolist()


def test_collectives_use_the_backends_device():
    """offload_optimizer keeps the fp32 masters on the host: a collective on NCCL must move them to the GPU first."""
    from pipelines.train.sequence_parallel import collective_device

    assert collective_device("nccl").type == "cuda"
    assert collective_device("gloo").type == "cpu"


def test_packed_loss_weights_every_token_alike_across_ranks_and_micro_batches():
    """Two ranks, two packs each: per-pack token-mean losses L weighted so that the averaged loss is the token mean.
    Before: each pack weighed the same, so a pack of 16 tokens counted as much as one of 160."""
    from pipelines.train.step import token_weights

    tokens = {0: [160.0, 16.0], 1: [144.0, 64.0]}
    losses = {0: [1.0, 5.0], 1: [2.0, 3.0]}  # each pack's mean over its own tokens
    total = sum(sum(t) for t in tokens.values())
    weighted = [w * loss for r in (0, 1) for w, loss in zip(token_weights(tokens[r], total, 2), losses[r])]
    per_token = sum(t * loss for r in (0, 1) for t, loss in zip(tokens[r], losses[r])) / total
    assert sum(weighted) / 4 == pytest.approx(per_token)  # DeepSpeed's mean over 2 ranks x 2 micro-batches
    assert token_weights([8.0, 8.0], 32.0, 2) == [1.0, 1.0]  # equal packs: unchanged


def test_ema_warm_up_forgets_the_initial_weights_within_steps():
    import torch

    from pipelines.train.ema import PartitionEMA

    model = torch.nn.Linear(4, 4, bias=False)
    torch.nn.init.zeros_(model.weight)
    plain, warm = PartitionEMA(model, 0.999), PartitionEMA(model, 0.999, warmup=True)
    assert [warm.decay_at(s) for s in (1, 2, 11)] == pytest.approx([0.1, 2 / 11, 11 / 20])
    assert warm.decay_at(100_000) == plain.decay_at(1) == 0.999
    with torch.no_grad():
        model.weight.fill_(1.0)  # the trained weights, far from the initial zeros
    for step in range(1, 21):
        plain.update(model, step)
        warm.update(model, step)
    assert float(plain.shadow["weight"].mean()) < 0.03  # still ~the initial weights after 20 steps
    assert float(warm.shadow["weight"].mean()) > 0.95
