"""What each stage reads: a stream of clips in a new seeded order every epoch, resumable at any row.

    plan = StagePlan.from_files(files, seed=0, stage_index=1)          # driver: row counts from Parquet footers
    ds = stage_dataset(plan, start_sample=12_345, num_samples=80_000)    # Ray Data, streamed to the ranks
    for batch in device_batches(shard, stage, recipe.data, device):      # inside a worker
        batch["patches"]    # (B, N, P) float32, already on the device

The stage's clips are one stream in which epoch e visits every shard file once, in the permutation
seeded by (seed, stage, e); rows within a file are mixed by each rank's local shuffle buffer. A
position in the stream is a count of samples, so resuming at sample s starts reading at the file that
holds it (later in the same epoch or not, the cost is the same): nothing already consumed is read
again, and the count does not depend on the number of ranks, so a run resumed with other workers
continues where the stream stood. Ranks draw from it through Ray Train's streaming split.
"""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipelines.train.recipe import DataSpec, StageSpec

BATCH_COLUMNS = ("patches", "text_tokens", "text_mask", "text_pooled")
MAX_READ_BLOCKS = 4096
"""Upper bound on the read tasks of a stage's stream (each reads one file of one epoch)."""
STREAM_SLACK_EPOCHS = 1
"""Extra epochs of a stage stream beyond its steps, for micro-batches skipped as non-finite (lazy: unread)."""


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
    def from_files(cls, files: list[str], seed: int, stage_index: int, shuffle: bool = True,
                   grids: list[tuple[int, int, int]] | None = None) -> StagePlan:  # fmt: skip
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

    def locate(self, sample: int) -> tuple[int, int, int]:
        """(epoch, position in that epoch's file order, row inside the file) of stream sample `sample`."""
        epoch, within = divmod(sample, self.rows_per_epoch)
        for pos, i in enumerate(self.order(epoch)):
            if within < self.rows[i]:
                return epoch, pos, within
            within -= self.rows[i]
        raise AssertionError("unreachable")

    def units(self, start_sample: int, num_samples: int) -> list[tuple[int, int, int, int]]:
        """(epoch, file index, first row, end row) reads covering samples [start, start + num_samples)."""
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


class _ReadUnits:
    """Ray Data map_batches callable: unit indices -> the rows those units name (numpy tensors).

    A clip prepared with several captions (multi-caption datasets) carries the others in `extra_*` columns;
    each read draws one caption per row (`load.draw_captions`), seeded by the unit, so a resumed run draws
    what it would have drawn and each epoch pairs a clip with a fresh caption.
    """

    def __init__(self, files: list[str], units: np.ndarray, columns: tuple[str, ...], seed: int, grids: list | None = None):
        self.files, self.units, self.columns, self.seed, self.grids = files, units, list(columns), seed, grids

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:

        from pipelines.data.load import EXTRA_OF, draw_captions, open_parquet, table_to_numpy

        parts, epochs = [], []
        for u in batch["id"]:
            epoch, i, start, end = (int(v) for v in self.units[int(u)])
            shard = open_parquet(self.files[i])  # one open: the footer says which caption columns exist (local or s3://)
            names = shard.schema_arrow.names
            extra = [EXTRA_OF[c] for c in EXTRA_OF if c in self.columns and EXTRA_OF[c] in names]
            table = shard.read(columns=self.columns + extra).slice(start, end - start)
            if extra:
                rng = np.random.default_rng([self.seed, epoch, i, start])
                parts.append({k: v for k, v in draw_captions(table, rng).items() if k in self.columns})
            else:
                parts.append(table_to_numpy(table, self.columns))
            epochs.append(np.full(end - start, epoch, dtype=np.int64))
            if self.grids is not None:  # a mixed stage: rows say which bucket's grid their patches have
                parts[-1]["grid"] = np.tile(np.asarray(self.grids[i], dtype=np.int64), (end - start, 1))
        columns = self.columns + (["grid"] if self.grids is not None else [])
        arrays = {c: np.concatenate([p[c] for p in parts]) for c in columns}
        arrays["epoch"] = np.concatenate(epochs)
        return arrays


def stage_dataset(plan: StagePlan, start_sample: int, num_samples: int, read_cpus: float = 1.0, readers: int = 2) -> Any:
    """The stream of samples [start, start + num_samples) of a stage as a Ray Dataset (lazy; nothing read yet).

    The unit indices are put in the object store as blocks (no read tasks: on a laptop the workers
    hold every CPU), and at most `readers` read tasks run at once, asking for `read_cpus` each (0 on a
    laptop: reading Parquet is light; an uncapped 0-CPU map would start a process per block).
    """
    import pyarrow as pa
    import ray

    units = np.asarray(plan.units(start_sample, num_samples), dtype=np.int64).reshape(-1, 4)  # 32 bytes a unit
    blocks = np.array_split(np.arange(len(units)), min(len(units), MAX_READ_BLOCKS))
    return ray.data.from_arrow([pa.table({"id": b}) for b in blocks]).map_batches(
        _ReadUnits(plan.files, units, BATCH_COLUMNS, plan.seed * 1_000_003 + plan.stage_index, plan.grids), batch_size=1,
        num_cpus=read_cpus,
        compute=ray.data.TaskPoolStrategy(size=max(1, readers)),
    )


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
        return {
            "patches": torch.as_tensor(np.asarray(batch["patches"], dtype=np.float32)),  # (B, N, P)
            "text_tokens": torch.as_tensor(np.asarray(batch["text_tokens"], dtype=np.float16)[:, :keep]),  # (B, L', Dt)
            "text_mask": torch.as_tensor(mask[:, :keep]),  # (B, L')
            "text_pooled": torch.as_tensor(np.asarray(batch["text_pooled"], dtype=np.float16)),  # (B, Dt)
            "epoch": torch.from_numpy(np.array(batch["epoch"], dtype=np.int64)),  # (B,): a copy, Arrow's buffers are read-only
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


def device_batches(shard: Any, stage: StageSpec, spec: DataSpec, device: torch.device, seed: int, trim_text: bool = True) -> Any:
    """A rank's micro-batches of its shard of the stage stream, prefetched onto `device` (see `Collate` for trim_text)."""
    cuda = device.type == "cuda"
    return shard.iter_torch_batches(
        batch_size=stage.micro_batch,
        collate_fn=_collate_fn(trim_text),
        device=device,
        prefetch_batches=spec.prefetch_batches,
        pin_memory=spec.pin_memory and cuda,
        drop_last=True,
        local_shuffle_buffer_size=max(spec.shuffle_buffer, stage.micro_batch),
        local_shuffle_seed=seed,
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
