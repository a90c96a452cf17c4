"""A mixed stage's micro-batches: clips of several buckets packed up to a token budget, with no padding.

    for batch in packed_batches(reader_dataset(stream, mbs), sizes, prefetch, device):
        batch["patches"]   # (ΣN, P): every clip's tokens, clip after clip
        batch["grids"]     # ((T', H', W'), ...) one per clip, Python ints: the DiT's packed layout

The stage stream (data.py) interleaves the buckets' shard files and carries each row's grid; the packs are
cut in stream order, a clip joining while the pack stays within `tokens_per_batch` (NaViT / Open-Sora's mixed
buckets), and dealt to the data-parallel groups like any micro-batch (`StagePlan.micro_batches`). Clips of
one grid are put next to each other, so attention runs one dense call per grid. A pack always holds at least
one clip (the recipe checks that every bucket's clip fits the budget), and the number of clips varies, so
positions in the stream are counted in rows, not micro-batches. The step weights each pack's loss by its
tokens among all packs of the step, on every rank (step.py): every token counts alike.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from pipelines.train.data import BATCH_COLUMNS

READ_ROWS = 16
"""Rows fetched from the shard per iteration (the packs are cut from them: any size works)."""

Row = dict[str, Any]


def iter_rows(batches: Iterable[dict[str, np.ndarray]]) -> Iterator[Row]:
    """Numpy batches (patches of several shapes arrive as object arrays) -> one row at a time."""
    for batch in batches:
        for i in range(len(batch["grid"])):
            yield {key: batch[key][i] for key in (*BATCH_COLUMNS, "grid", "epoch")}


def pack_rows(rows: Iterable[Row], budget: int) -> Iterator[list[Row]]:
    """Greedy in stream order: a clip joins the pack while the pack stays within `budget` tokens."""
    pack: list[Row] = []
    total = 0
    for row in rows:
        tokens = int(np.prod(row["grid"]))
        if pack and total + tokens > budget:
            yield pack
            pack, total = [], 0
        pack.append(row)
        total += tokens
    if pack:
        yield pack


def collate_pack(pack: list[Row], device: torch.device, pin: bool = False, trim_text: bool = True) -> dict[str, Any]:
    """One packed micro-batch on `device`: clips ordered by grid (one attention call per grid), captions trimmed
    (not for `text_padding: attended` models, which read the padding: `trim_text` False)."""
    order = sorted(range(len(pack)), key=lambda i: tuple(int(v) for v in pack[i]["grid"]))
    rows = [pack[i] for i in order]
    mask = np.stack([np.asarray(r["text_mask"], dtype=bool) for r in rows])  # (clips, L)
    # unused columns stay on the host
    keep = int(np.flatnonzero(mask.any(0)).max(initial=0)) + 1 if trim_text else mask.shape[1]
    host = {
        "patches": torch.as_tensor(
            np.concatenate([np.asarray(r["patches"], dtype=np.float32) for r in rows])
        ),  # (ΣN, P)
        "text_tokens": torch.as_tensor(
            np.stack([np.asarray(r["text_tokens"], dtype=np.float16) for r in rows])[:, :keep]
        ),
        "text_mask": torch.as_tensor(mask[:, :keep]),  # (clips, L')
        "text_pooled": torch.as_tensor(np.stack([np.asarray(r["text_pooled"], dtype=np.float16) for r in rows])),
        "epoch": torch.as_tensor(np.asarray([int(r["epoch"]) for r in rows], dtype=np.int64)),
    }
    out: dict[str, Any] = {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in host.items()}
    out["grids"] = tuple(tuple(int(v) for v in r["grid"]) for r in rows)
    out["rows"] = len(rows)
    return out


def packed_batches(
    dataset: Any, sizes: list[int], prefetch: int, device: torch.device, pin: bool = False, trim_text: bool = True
) -> Iterator[dict[str, Any]]:
    """A reading rank's packed micro-batches: its rows (`data.reader_dataset`, in stream order) cut into packs of
    `sizes` clips, the cut `StagePlan.micro_batches` made from the clips' grids."""
    batches = dataset.iter_batches(batch_size=READ_ROWS, batch_format="numpy", prefetch_batches=prefetch)
    rows = iter_rows(batches)
    for n in sizes:
        pack = list(itertools.islice(rows, n))
        if len(pack) < n:
            return
        yield collate_pack(pack, device, pin, trim_text)
