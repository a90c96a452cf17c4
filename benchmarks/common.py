"""Shared pieces of the benchmark scripts: interleaved timing, machine facts, the per-script CLI.

Each `bench_<figure>.py` defines `FIGURE` (its results.json key), `GOAL` (an operator and a number)
and `run(quick: bool) -> dict` returning {"value", "compared", "details"}; `main(module)` gives it the
command line `python -m benchmarks.bench_<figure> [--quick] [--json PATH]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def interleaved(
    fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1, clock: str = "wall"
) -> dict[str, list[float]]:
    """Times of each callable, `reps` rounds, the order rotated every round.

    Interleaving (A B, B A, A B, ...) instead of all-A-then-all-B means a burst of load from another
    process on a shared machine lands on both sides; medians then drop the bursts.

    clock "wall": elapsed time. clock "cpu": this process's CPU time (all threads), which other
    processes' load barely changes; the right clock for single-process compute on a shared machine,
    with torch on one thread (so no OpenMP spin-waiting is counted). The other clock's times are kept
    in `LAST_OTHER_CLOCK` for the details.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    other: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        if r % 2:
            order = order[::-1]
        for n in order:
            w0, c0 = time.perf_counter(), time.process_time()
            fns[n]()
            w, c = time.perf_counter() - w0, time.process_time() - c0
            times[n].append(c if clock == "cpu" else w)
            other[n].append(w if clock == "cpu" else c)
    LAST_OTHER_CLOCK.clear()
    LAST_OTHER_CLOCK.update(other)
    return times


LAST_OTHER_CLOCK: dict[str, list[float]] = {}


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of the per-round ratios num[i] / den[i]: each pair ran back to back under the same load."""
    return float(statistics.median(a / b for a, b in zip(num, den, strict=True)))


def summary(xs: list[float], digits: int = 4) -> dict[str, Any]:
    return {
        "median": round(median(xs), digits),
        "min": round(min(xs), digits),
        "max": round(max(xs), digits),
        "n": len(xs),
    }


def machine() -> dict[str, Any]:
    """What ran the numbers: CPU, cores, load, library versions."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    for mod in ("torch", "ray", "deepspeed", "diffusers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing library is just not listed
            pass
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        pass
    return info


def goal_met(value: float | None, goal: tuple[str, float]) -> bool | None:
    if value is None:
        return None
    op, target = goal
    return value >= target if op == ">=" else value <= target


def main(module: Any) -> int:
    """The command line of one benchmark script.

    `run` may add a "note": why a goal is not met, from what it measured; RESULTS.md lists it.
    """
    name = module.__spec__.name if getattr(module, "__spec__", None) else module.__name__
    p = argparse.ArgumentParser(prog=f"python -m {name}", description=(module.__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions (2-core machines)")
    p.add_argument("--json", help="write the figure's result here (benchmarks.run uses this)")
    args = p.parse_args()
    t0 = time.perf_counter()
    result = module.run(quick=args.quick)
    result = {
        "figure": module.FIGURE,
        "goal": list(module.GOAL),
        "met": goal_met(result.get("value"), module.GOAL),
        "seconds": round(time.perf_counter() - t0, 1),
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python", "-m", name, *sys.argv[1:]]),
        "machine": machine(),
        **result,
    }
    text = json.dumps(result, indent=2, default=str)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0
