"""Drop in all-correct attribute accuracy (points) from step caching on the trained demo model: uncached - cached.

The same prompts, seeds and settings as `bench_step_cache_speedup.py` (`sora demo`'s eval workload, 96 clips;
`benchmarks/_step_cache.py`), sampled uncached and with each step cache at its default threshold, every clip judged
by the shapes judge. The figure is TeaCache's drop; First-Block-Cache's (not with --quick), the seen / held-out split
and how many clips changed verdict are in the details. One clip is ~1 point, so a drop of 1-2 points can be a single
clip's verdict.

    python -m benchmarks.bench_step_cache_accuracy_drop [--quick]
"""

from __future__ import annotations

import sys

import numpy as np

from benchmarks import _step_cache as sc
from benchmarks.common import main

FIGURE = "step_cache_accuracy_drop"
GOAL = ("<=", 2.0)


def run(quick: bool) -> dict:
    if sc.export_dir() is None:
        return sc.not_measured()
    from pipelines.evaluate.attributes import detect, score

    pipe, prompts, seeds, sampling = sc.load()
    base, _ = sc.sample_all(pipe, prompts, seeds, sampling)
    truths = [p["prompt"] for p in prompts for _ in seeds]

    def verdict(clips):
        return np.array([score([detect(c)], [t])["all"] == 1.0 for c, t in zip(clips, truths, strict=True)])

    base_right = verdict(base)
    acc = {"uncached": sc.accuracy(base, prompts, seeds)}
    drops, changed, counts, pixel = {}, {}, {}, {}
    for method, threshold in sc.CACHES.items() if not quick else [(sc.HEADLINE, sc.CACHES[sc.HEADLINE])]:
        clips, counts[method] = sc.sample_all(pipe, prompts, seeds, sampling, method, threshold)
        acc[method] = sc.accuracy(clips, prompts, seeds)
        drops[method] = round(acc["uncached"]["all"] - acc[method]["all"], 2)
        right = verdict(clips)
        changed[method] = {"lost": int((base_right & ~right).sum()), "gained": int((~base_right & right).sum())}
        pixel[method] = round(float(np.abs(clips.astype(np.int16) - base.astype(np.int16)).mean()), 3)
    return {
        "value": drops[sc.HEADLINE],
        "compared": ", ".join(f"{name} {a['all']:.1f}% all-correct" for name, a in acc.items())
        + f" of {len(base)} clips",
        "details": {
            "method": sc.HEADLINE,
            "drop_points": drops,
            "accuracy": acc,
            "verdicts_changed": changed,
            "mean_abs_pixel_diff": pixel,
            "transformer_calls": counts,
            "sampling": sampling,
            "export": sc.export_dir(),
        },
    }


if __name__ == "__main__":
    sys.exit(main(sys.modules[__name__]))
