"""Connecting to Ray: an existing cluster when RAY_ADDRESS is set (or under `ray job submit`), else a local one."""

from __future__ import annotations

import os


def ensure_ray() -> None:
    """Initialise Ray once per process; a no-op when the caller (a test, a notebook, a job) already did."""
    import ray

    from pipelines import console

    if ray.is_initialized():
        console.attach_ray()
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        # A laptop run: a Ray of its own (address "local": never a cluster some other `ray start` left running,
        # which would refuse num_cpus), every core, and no dashboard (extra packages and a port nobody looks at).
        # To use a running cluster, set RAY_ADDRESS (as `ray job submit` does for its drivers).
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False)
    console.attach_ray()  # under a console: worker output to the log, our bars and lines to the terminal


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))
