"""What the driver hands every Ray Train worker: one frozen `WorkerConfig`, built once in `trainer.build_trainer`.

    trainer.build_trainer -> TorchTrainer(train_loop_config={WORKER_CONFIG_KEY: WorkerConfig(...)})
    worker.train_loop_per_worker(config) -> config[WORKER_CONFIG_KEY]: the parsed Recipe, the stage streams, ...

Ray Train needs `train_loop_config` to be a dict (its run-state schema types it `Optional[Dict]`), so the one
object travels under one key. The recipe crosses as the parsed `Recipe` (pickled), never as a mapping to parse
again: an `init_from` export's config.json is read once, on the driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipelines.train.recipe import Recipe

if TYPE_CHECKING:
    from pipelines.train.data import StageStream

WORKER_CONFIG_KEY = "worker"
"""The one key of `train_loop_config`: its value is the `WorkerConfig`."""
DEFAULT_NAN_COUNT = 1
"""Micro-batches in a row an injected non-finite loss spans when the fault-injection variable names no count."""


@dataclass(frozen=True)
class StageInput:
    """What a stage's ranks read: its latent grid and the stream of its clips (data.py)."""

    grid: tuple[int, int, int]
    """Tokens per clip along (T', H', W'); a mixed stage: those of the bucket it samples at."""
    stream: StageStream


@dataclass(frozen=True)
class FaultInjection:
    """Faults tests inject (trainer.CRASH_ENV, trainer.NAN_ENV); all 0 in a real run."""

    crash_at_step: int = 0
    """The last rank dies once after this global step (a lost worker)."""
    nan_at_step: int = 0
    """A non-finite loss in this step ..."""
    nan_count: int = DEFAULT_NAN_COUNT
    """... for this many micro-batches in a row."""


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a rank needs beyond Ray Train's own context (rank, world, checkpoint)."""

    recipe: Recipe
    """The parsed recipe, its `device` already the one this run uses (`--device`, or the recorded one on resume)."""
    run_dir: str
    """The run folder's URI (a local path or fsspec URI): rank 0 writes metrics, exports and fatal.json there."""
    stages: dict[str, StageInput]
    """Stage name -> what its ranks read; only the stages still to run (a resumed run skips finished ones)."""
    sampler: Any = None
    """The sample actor's handle (samples.py), or None when no stage has sample prompts."""
    null_prompt: dict[str, Any] | None = None
    """The empty prompt's embedding, for models whose dropped captions become it (`null_text: empty_prompt`)."""
    stop_at_step: int = 0
    """`--stop-at-step`: checkpoint and stop after this global step; 0 runs to the end."""
    profile_steps: int = 0
    """`--profile N`: trace N steps of this attempt (profile.py); 0 traces nothing."""
    remote_progress: bool = False
    """Rank 0's progress bar is drawn by the driver's console rather than on the worker's stderr."""
    faults: FaultInjection = field(default_factory=FaultInjection)
