"""Wall-time speedup of step caching on the trained demo model at its default steps: uncached ÷ cached.

Each pass samples `sora demo`'s eval workload (32 prompts x 3 seeds, batches of 8, the export's 10 ab2 steps with
CFG; `benchmarks/_step_cache.py`) through `TextToVideoPipeline`, uncached, with TeaCache and with First-Block-Cache
at their default thresholds (--quick: 16 of the prompts, seen and held-out, with one seed). Passes are interleaved
(A B C, C B A, ...) on one torch thread and the figure is the median of per-round ratios for TeaCache, so load from
other processes on a shared machine lands on both sides.
The accuracy cost of the same passes is `bench_step_cache_accuracy_drop.py`.

    python -m benchmarks.bench_step_cache_speedup [--quick]
"""

from __future__ import annotations

import sys

from benchmarks import _step_cache as sc
from benchmarks.common import LAST_OTHER_CLOCK, interleaved, main, median, paired_ratio, summary

FIGURE = "step_cache_speedup"
GOAL = (">=", 1.6)


def run(quick: bool) -> dict:
    if sc.export_dir() is None:
        return sc.not_measured()
    pipe, prompts, seeds, sampling = sc.load()
    if quick:  # 2 batches of the 12: the ratio is per step and call, the same on a part of the workload
        prompts, seeds = prompts[:: len(prompts) // 16][:16], seeds[:1]
    pipe(prompts[0]["prompt"], steps=2, num_frames=sampling["num_frames"])  # warm: first-call costs out of the timing
    counts: dict[str, dict[str, int]] = {}

    def pass_of(method: str | None):
        def go() -> None:
            counts[method or "uncached"] = sc.sample_all(
                pipe, prompts, seeds, sampling, method, sc.CACHES.get(method) if method else None
            )[1]

        return go

    fns = {"uncached": pass_of(None), **{m: pass_of(m) for m in sc.CACHES}}
    times = interleaved(fns, reps=5 if quick else 4, warmup=0)
    cpu = dict(LAST_OTHER_CLOCK)
    speedups = {m: round(paired_ratio(times["uncached"], times[m]), 3) for m in sc.CACHES}
    return {
        "value": speedups[sc.HEADLINE],
        "compared": (
            f"median of {len(times['uncached'])} paired rounds of uncached ÷ {sc.HEADLINE} wall seconds for "
            f"a pass of {len(prompts) * len(seeds)} clips (medians alone: "
        )
        + ", ".join(f"{name} {median(ts):.2f} s" for name, ts in times.items())
        + ")",
        "details": {
            "method": sc.HEADLINE,
            "speedup": speedups,
            "cpu_time_speedup": {m: round(paired_ratio(cpu["uncached"], cpu[m]), 3) for m in sc.CACHES},
            "transformer_calls": {name: c for name, c in counts.items() if name != "uncached"},
            "wall_s": {name: summary(ts, 2) for name, ts in times.items()},
            "clips_per_pass": len(prompts) * len(seeds),
            "sampling": sampling,
            "export": sc.export_dir(),
            "thresholds": {m: _threshold(m) for m in sc.CACHES},
        },
    }


def _threshold(method: str) -> float:
    from sora_model.step_cache import check_step_cache

    return check_step_cache(method, sc.CACHES[method])[1]


if __name__ == "__main__":
    sys.exit(main(sys.modules[__name__]))
