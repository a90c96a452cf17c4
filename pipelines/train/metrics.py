"""What rank 0 records per optimizer step: RUN/metrics.csv, RUN/tensorboard/, and RUN/loss.png at the end."""

from __future__ import annotations

import csv
import math
import os
from typing import Any

METRICS_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
LOSS_PLOT = "loss.png"
METRIC_COLUMNS = (
    "step", "stage", "stage_step", "epoch", "loss", "diffusion", "temporal_consistency", "motion_smoothness",
    "perceptual", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "step_time_s", "nonfinite_skipped", "time",
)  # fmt: skip
SCALARS = ("loss", "diffusion", "temporal_consistency", "motion_smoothness", "perceptual", "lr", "grad_norm",
           "samples_per_s", "tokens_per_s")  # fmt: skip


class MetricsLog:
    """metrics.csv and TensorBoard events in `folder`; a resumed run first drops rows past its checkpoint."""

    def __init__(self, folder: str, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path = os.path.join(folder, METRICS_FILE)
        rows: list[dict[str, str]] = []
        if os.path.isfile(self.path):
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= start_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in METRIC_COLUMNS} for r in rows)
        # purge_step drops events a crashed attempt logged past the checkpoint it resumes from.
        self.tb = SummaryWriter(os.path.join(folder, TENSORBOARD_DIR), purge_step=start_step + 1)

    def log(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_COLUMNS).writerow(row)
        for key in SCALARS:
            value = row[key]
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(f"train/{key}", value, row["step"])

    def flush(self) -> None:
        self.tb.flush()

    def close(self) -> None:
        self.tb.flush()
        self.tb.close()


def plot_loss(folder: str) -> str | None:
    """`folder`/loss.png from its metrics.csv (Agg backend: no display on cluster nodes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(folder, METRICS_FILE)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "diffusion"):
        ax.plot(steps, [float(r[key]) for r in rows], label=key, alpha=0.8)
    bounds: dict[str, int] = {}
    for r in rows:
        bounds.setdefault(r["stage"], int(r["step"]))
    for name, s in bounds.items():
        ax.axvline(s, color="grey", lw=0.5)
        ax.text(s, ax.get_ylim()[1], name, fontsize=7, va="top")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    out = os.path.join(folder, LOSS_PLOT)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
