"""`sora train --profile N`: a torch.profiler trace of N optimizer steps, written into the run folder.

    prof = StepProfiler(n, run_uri, rank, device)   # every rank, at the start of an attempt
    prof.step()                                    # after each optimizer step
    prof.close()                                   # at the run's end, a stop or a fatal end: writes what it holds

One warm-up step first (the stage stream's start-up and DeepSpeed's first step are not the steady state), then N
recorded steps, each marked `ProfilerStep#k` in the trace. Each rank writes RUN/profile/rank<R>-step<S>.json
(Chrome trace format: chrome://tracing, Perfetto, or TensorBoard's profiler plugin), S the global step the
recording began after; a run with fewer steps left writes what it recorded. CPU activity always, CUDA kernels on
cuda, as torchtitan's `--profiling.enable_profiling` does.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

PROFILE_DIR = "profile"
WARMUP_STEPS = 1


class StepProfiler:
    def __init__(self, steps: int, run_uri: str, rank: int, device: torch.device, start_step: int = 0):
        from torch.profiler import ProfilerActivity, profile, schedule

        self.run_uri, self.rank, self.start_step = run_uri, rank, start_step
        self.written: str | None = None
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self._prof: Any = profile(
            activities=activities,
            schedule=schedule(wait=0, warmup=WARMUP_STEPS, active=steps, repeat=1),
            on_trace_ready=self._write,
            record_shapes=True,
            profile_memory=device.type == "cuda",
        )
        self._prof.start()

    def step(self) -> None:
        if self._prof is not None:
            self._prof.step()

    def close(self) -> None:
        """Stop recording; a trace still being recorded is written now (a run shorter than warm-up + N steps)."""
        prof, self._prof = self._prof, None
        if prof is not None:
            prof.stop()

    def _write(self, prof: Any) -> None:
        from pipelines.train.storage import RunStore

        rel = f"{PROFILE_DIR}/rank{self.rank}-step{self.start_step + WARMUP_STEPS}.json"
        fd, local = tempfile.mkstemp(prefix="sora-trace-", suffix=".json")
        os.close(fd)
        try:
            prof.export_chrome_trace(local)
            RunStore(self.run_uri).upload(local, rel)
        finally:
            os.unlink(local)
        self.written = rel
