"""What each stage reads: a stream of clips in a new seeded order every epoch, resumable at any sample.

    plan = StagePlan.from_files(files, seed=0, stage_index=1)              # driver: row counts from Parquet footers
    stream = StageStream(plan, micro_batch=4)                               # driver -> workers, whole
    mbs = reader_micro_batches(stream, start_sample=12_345, group=g, groups=dp, count=n)   # inside a reading rank
    for batch in device_batches(reader_dataset(stream, mbs), 4, recipe.data, device):
        batch["patches"]    # (B, N, P) float32, already on the device

The stage's clips are one stream in which epoch e visits every shard file once, in the permutation
seeded by (seed, stage, e), and each file's rows in a permutation seeded by (seed, stage, e, file). The
stream is cut into micro-batches (packs, for a mixed stage) and dealt round robin to the data-parallel
groups; one rank per group reads (a sequence-parallel group's other ranks receive its micro-batch). A
position in the stream is a count of samples, so resuming at sample s starts reading at the file that
holds it: nothing already consumed is read again, the count does not depend on the number of ranks, and
with the same number of ranks every rank draws exactly the micro-batches the uninterrupted run would have.
"""

from __future__ import annotations

import itertools
import math
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipelines.train.recipe import DataSpec

BATCH_COLUMNS = ("patches", "text_tokens", "text_mask", "text_pooled")
MAX_READ_BLOCKS = 4096
"""Upper bound on the read tasks of a stage's stream (each reads one file of one epoch)."""
STREAM_SLACK_MICRO = 16
"""Micro-batches a reading rank lists beyond its stage's steps (at least; or a tenth more), for micro-batches
skipped as non-finite, which the step replaces with the next ones (lazy: never read unless drawn)."""


@dataclass
class StagePlan:
    """The files of a stage's bucket and their row counts (enough to place any sample of any epoch)."""

    files: list[str]
    rows: list[int]
    seed: int
    stage_index: int
    shuffle: bool = True
    grids: list[tuple[int, int, int]] | None = None
    """A mixed stage: each file's clip grid (T', H', W'), sent along with its rows; None: one bucket."""

    @classmethod
    def from_files(
        cls,
        files: list[str],
        seed: int,
        stage_index: int,
        shuffle: bool = True,
        grids: list[tuple[int, int, int]] | None = None,
    ) -> StagePlan:
        """Row counts from the Parquet footers (no data read), in a thread pool: footers on S3 take a round trip."""
        from concurrent.futures import ThreadPoolExecutor

        from pipelines.data.load import open_parquet

        def count(path: str) -> int:
            return open_parquet(path).metadata.num_rows

        with ThreadPoolExecutor(max_workers=16) as pool:
            rows = list(pool.map(count, files))
        keep = [i for i, r in enumerate(rows) if r > 0]
        kept_grids = [tuple(grids[i]) for i in keep] if grids is not None else None
        return cls([files[i] for i in keep], [rows[i] for i in keep], seed, stage_index, shuffle, kept_grids)

    @property
    def rows_per_epoch(self) -> int:
        return sum(self.rows)

    def order(self, epoch: int) -> list[int]:
        """File indices in the order epoch `epoch` reads them."""
        idx = list(range(len(self.files)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.stage_index * 7_919 + epoch).shuffle(idx)
        return idx

    def row_order(self, epoch: int, file: int) -> np.ndarray:
        """The rows of file `file` in the order epoch `epoch` reads them: a seeded permutation (rows in order when
        `shuffle` is off). A function of (seed, stage, epoch, file) only, so any position of the stream can be read
        again without reading what came before it (what a per-rank shuffle buffer could not give)."""
        if not self.shuffle:
            return np.arange(self.rows[file])
        return np.random.default_rng([self.seed, self.stage_index, epoch, file]).permutation(self.rows[file])

    def locate(self, sample: int) -> tuple[int, int, int]:
        """(epoch, position in that epoch's file order, row inside the file) of stream sample `sample`."""
        epoch, within = divmod(sample, self.rows_per_epoch)
        for pos, i in enumerate(self.order(epoch)):
            if within < self.rows[i]:
                return epoch, pos, within
            within -= self.rows[i]
        raise AssertionError("unreachable")

    def units(self, start_sample: int, num_samples: int) -> list[tuple[int, int, int, int]]:
        """(epoch, file index, first position, end position) reads covering samples [start, start + num_samples);
        positions index the file's `row_order` of that epoch."""
        out = []
        epoch, pos, row = self.locate(start_sample)
        left = num_samples
        while left > 0:
            order = self.order(epoch)
            while pos < len(order) and left > 0:
                i = order[pos]
                end = min(self.rows[i], row + left)
                out.append((epoch, i, row, end))
                left -= end - row
                pos, row = pos + 1, 0
            epoch, pos = epoch + 1, 0
        return out

    def micro_batches(
        self, start_sample: int, micro_batch: int, budget: int = 0
    ) -> Iterator[list[tuple[int, int, int, int]]]:
        """The stage's micro-batches from `start_sample` on, each as the `units` it reads, in stream order.

        One bucket: `micro_batch` samples each. A mixed stage (`budget` > 0): packs cut greedily in stream order,
        a clip joining while the pack stays within `budget` tokens (each file's clips share its grid, so the cut
        is known from the plan without reading a row). A cut made from a pack boundary is the same cut whatever
        came before it, so a resume at a step's end cuts the packs the uninterrupted run cut.
        """
        epoch, pos, row = self.locate(start_sample)
        pack: list[tuple[int, int, int, int]] = []
        size = 0  # samples (one bucket) or tokens (mixed) in `pack`
        order = self.order(epoch)
        while True:
            i = order[pos]
            per = math.prod(self.grids[i]) if budget else 1
            limit = budget if budget else micro_batch
            while row < self.rows[i]:
                room = (limit - size) // per
                if room == 0:
                    if not pack:
                        raise ValueError(f"a clip of {per} tokens does not fit tokens_per_batch {budget}")
                    yield pack
                    pack, size = [], 0
                    continue
                end = min(self.rows[i], row + room)
                pack.append((epoch, i, row, end))
                size += (end - row) * per
                row = end
            pos, row = pos + 1, 0
            if pos == len(self.files):
                epoch, pos = epoch + 1, 0
                order = self.order(epoch)  # once an epoch: a permutation of every file


@dataclass(frozen=True)
class StageStream:
    """What a rank needs to read its share of a stage's stream: built by the driver, passed whole to the workers."""

    plan: StagePlan
    micro_batch: int
    budget: int = 0
    """A mixed stage's tokens per packed micro-batch; 0: `micro_batch` clips of one bucket."""
    read_cpus: float = 0.0
    readers: int = 2
    """Read tasks in flight per reading rank."""


def reader_micro_batches(
    stream: StageStream, start_sample: int, group: int, groups: int, count: int
) -> list[list[tuple[int, int, int, int]]]:
    """The first `count` micro-batches of data-parallel group `group` of `groups` from `start_sample`: the stage's
    micro-batches dealt round robin (c -> group c % groups). Every step draws `groups` x accumulation micro-batches
    in all, so a step ends on a deal boundary and a resume at any step's `consumed_samples` deals the same way."""
    out: list[list[tuple[int, int, int, int]]] = []
    if count <= 0:
        return out
    it = stream.plan.micro_batches(start_sample, stream.micro_batch, stream.budget)
    for c, mb in enumerate(it):
        if c % groups == group:
            out.append(mb)
            if len(out) == count:
                return out
    return out


def _segments(micro_batches: list[list[tuple[int, int, int, int]]]) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Consecutive reads of the same (epoch, file) merged: one read task opens each file once per epoch."""
    out: list[tuple[int, int, list[tuple[int, int]]]] = []
    for mb in micro_batches:
        for epoch, i, a, b in mb:
            if out and out[-1][0] == epoch and out[-1][1] == i:
                out[-1][2].append((a, b))
            else:
                out.append((epoch, i, [(a, b)]))
    return out


class _ReadSegments:
    """Ray Data map_batches callable: segment indices -> the rows they name, in order (numpy tensors).

    A segment is (epoch, file, position ranges): the file is read once, its rows put in the epoch's
    `row_order`, and the ranges taken. A clip prepared with several captions (multi-caption datasets) carries
    the others in `extra_*` columns; one caption per row is drawn over the whole file, seeded by (seed, epoch,
    file), so a row's caption does not depend on which rank reads it or where a run resumed.
    """

    def __init__(
        self, plan: StagePlan, segments: list[tuple[int, int, list[tuple[int, int]]]], columns: tuple[str, ...]
    ):
        self.plan, self.segments, self.columns = plan, segments, list(columns)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipelines.data.load import EXTRA_OF, draw_captions, open_parquet, table_to_numpy

        parts, epochs = [], []
        for s in batch["id"]:
            epoch, i, ranges = self.segments[int(s)]
            order = self.plan.row_order(epoch, i)
            take = np.concatenate([order[a:b] for a, b in ranges])
            # one open: the footer says which caption columns exist (local or s3://)
            shard = open_parquet(self.plan.files[i])
            names = shard.schema_arrow.names
            extra = [EXTRA_OF[c] for c in EXTRA_OF if c in self.columns and EXTRA_OF[c] in names]
            table = shard.read(columns=self.columns + extra)
            if extra:
                rng = np.random.default_rng([self.plan.seed, self.plan.stage_index, epoch, i])
                drawn = draw_captions(table, rng)
                parts.append({k: v[take] for k, v in drawn.items() if k in self.columns})
            else:
                parts.append(table_to_numpy(table.take(take), self.columns))
            epochs.append(np.full(len(take), epoch, dtype=np.int64))
            if self.plan.grids is not None:  # a mixed stage: rows say which bucket's grid their patches have
                parts[-1]["grid"] = np.tile(np.asarray(self.plan.grids[i], dtype=np.int64), (len(take), 1))
        columns = self.columns + (["grid"] if self.plan.grids is not None else [])
        arrays = {c: np.concatenate([p[c] for p in parts]) for c in columns}
        arrays["epoch"] = np.concatenate(epochs)
        return arrays


def reader_dataset(
    stream: StageStream, micro_batches: list[list[tuple[int, int, int, int]]], columns: tuple[str, ...] = BATCH_COLUMNS
) -> Any:
    """One reading rank's micro-batches as a Ray Dataset, rows in stream order (lazy; nothing read yet).

    The segment indices are put in the object store as blocks (no read tasks: on a laptop the workers hold
    every CPU), at most `stream.readers` read tasks run at once, asking for `read_cpus` each (0 on a laptop:
    reading Parquet is light; an uncapped 0-CPU map would start a process per block). Order is preserved:
    which rows form which micro-batch is the plan's, not the read tasks' finishing order. `columns`: BATCH_COLUMNS,
    and an image-to-video model's condition columns (`stage_data.image_columns`).
    """
    import pyarrow as pa
    import ray
    from ray.data import DataContext

    segments = _segments(micro_batches)
    DataContext.get_current().execution_options.preserve_order = True
    blocks = np.array_split(np.arange(len(segments)), max(1, min(len(segments), MAX_READ_BLOCKS)))
    # from_blocks puts the blocks from this process; from_arrow would run a 1-CPU metadata task per block, which
    # never starts inside a worker when the workers hold every CPU (the hang of the first try at this reader).
    return ray.data.from_blocks([pa.table({"id": b}) for b in blocks]).map_batches(
        _ReadSegments(stream.plan, segments, columns),
        batch_size=1,
        num_cpus=stream.read_cpus,
        compute=ray.data.TaskPoolStrategy(size=max(1, stream.readers)),
    )


def stage_dataset(
    plan: StagePlan, start_sample: int, num_samples: int, read_cpus: float = 1.0, readers: int = 2
) -> Any:
    """Samples [start, start + num_samples) of a stage's stream as one Ray Dataset, in stream order (a whole
    stream, not one reader's share: for tools and tests that read the stream as the ranks together would)."""
    return reader_dataset(StageStream(plan, 1, 0, read_cpus, readers), [plan.units(start_sample, num_samples)])


class Collate:
    """Numpy rows -> tensors: patches in fp32, caption embeddings kept in half precision until the device.

    Text tokens are the largest part of a clip's row after the patches (L x Dt, 226 x 4096 for T5-XXL);
    they travel host -> device in fp16, as `sora data prepare` stored them, and the step casts them.
    """

    def __init__(self, trim_text: bool = True):
        self.trim_text = trim_text
        """False for `text_padding: attended` models (Wan): they read every padding token, so none may be dropped."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        # Caption columns no row of the batch uses are dropped here, on the host, so the model never syncs to find them.
        mask = np.asarray(batch["text_mask"], dtype=bool)
        keep = int(np.flatnonzero(mask.any(0)).max(initial=0)) + 1 if self.trim_text else mask.shape[1]
        image = {}
        if "image_condition" in batch:  # image-to-video: the condition's mask + latents, and the image features
            image["image_condition"] = torch.as_tensor(np.asarray(batch["image_condition"], np.float32))  # (B, N, Pc)
        if "image_features" in batch:
            image["image_features"] = torch.as_tensor(np.asarray(batch["image_features"], np.float16))  # (B, Li, Di)
        return {
            **image,
            "patches": torch.as_tensor(np.asarray(batch["patches"], dtype=np.float32)),  # (B, N, P)
            "text_tokens": torch.as_tensor(np.asarray(batch["text_tokens"], dtype=np.float16)[:, :keep]),  # (B, L', Dt)
            "text_mask": torch.as_tensor(mask[:, :keep]),  # (B, L')
            "text_pooled": torch.as_tensor(np.asarray(batch["text_pooled"], dtype=np.float16)),  # (B, Dt)
            "epoch": torch.from_numpy(
                np.array(batch["epoch"], dtype=np.int64)
            ),  # (B,): a copy, Arrow's buffers are read-only
        }


def _collate_fn(trim_text: bool = True) -> Any:
    from ray.data.collate_fn import NumpyBatchCollateFn

    class NumpyCollate(NumpyBatchCollateFn):
        def __init__(self):
            super().__init__()
            self.inner = Collate(trim_text)

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            return self.inner(batch)

    return NumpyCollate()


def device_batches(dataset: Any, micro_batch: int, spec: DataSpec, device: torch.device, trim_text: bool = True) -> Any:
    """A reading rank's micro-batches (`reader_dataset`), prefetched onto `device` (see `Collate` for trim_text).

    No shuffle buffer here: the plan already mixes files and rows (`StagePlan.row_order`), and a buffer's
    state would be lost at a restart, so a resumed run would draw other batches than the uninterrupted one."""
    cuda = device.type == "cuda"
    return dataset.iter_torch_batches(
        batch_size=micro_batch,
        collate_fn=_collate_fn(trim_text),
        device=device,
        prefetch_batches=spec.prefetch_batches,
        pin_memory=spec.pin_memory and cuda,
        drop_last=True,
    )


class EarlyStream:
    """A stream opened, and its first micro-batch drawn, in a background thread.

    Opening a stage's stream starts Ray Data's split coordinator and read tasks: each stage's first
    step waited 10-15 s for it in the 2-core demo. Opened early, that start-up runs beside the engine
    build (the first stage) or the stage before (the others), so where accelerators do the stepping
    and the host's CPUs are free, the wait is gone (in the demo it fell to 1-4 s a stage, but the
    start-up's CPU work slowed the steps beside it about as much: two busy cores have none spare).
    `batches()` waits for the first micro-batch, re-raises what opening raised, and returns the stream.
    """

    _END = object()

    def __init__(self, open_stream: Callable[[], Iterator[Any]], name: str):
        self._first: Any = self._END
        self._rest: Iterator[Any] = iter(())
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._open, args=(open_stream,), name=f"stream-{name}", daemon=True)
        self._thread.start()

    def _open(self, open_stream: Callable[[], Iterator[Any]]) -> None:
        try:
            self._rest = iter(open_stream())
            self._first = next(self._rest, self._END)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            self._error = e

    def batches(self) -> Iterator[Any]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._rest if self._first is self._END else itertools.chain([self._first], self._rest)
