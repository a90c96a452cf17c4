"""What rank 0 records per optimizer step: RUN/metrics.csv, RUN/tensorboard/, and RUN/loss.png at the end.

Besides the losses, the trainer's own speed: tokens/s (all ranks, each clip counted once) and MFU, the model
FLOPs those tokens took (`train_flops_per_token`, from the DiTConfig: linear layers + attention, backward
twice the forward, recompute not counted) over the workers' peak (`peak_tflops`, recipe or PEAK_TFLOPS).
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any

METRICS_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
LOSS_PLOT = "loss.png"
METRIC_COLUMNS = (
    "step",
    "stage",
    "stage_step",
    "epoch",
    "loss",
    "diffusion",
    "temporal_consistency",
    "motion_smoothness",
    "perceptual",
    "lr",
    "grad_norm",
    "samples_per_s",
    "tokens_per_s",
    "mfu",
    "step_time_s",
    "nonfinite_skipped",
    "time",
)
SCALARS = (
    "loss",
    "diffusion",
    "temporal_consistency",
    "motion_smoothness",
    "perceptual",
    "lr",
    "grad_norm",
    "samples_per_s",
    "tokens_per_s",
    "mfu",
)
PEAK_TFLOPS = {
    # Dense bf16 tensor-core peaks per GPU (vendor datasheets, no sparsity); matched against the device name.
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L4": 121.0,
    "V100": 125.0,
    "4090": 165.0,
    "3090": 71.0,
}
CPU_PEAK_TFLOPS = 0.1
"""A nominal per-worker CPU peak (fp32, a few AVX2/AVX-512 cores): CPU MFU compares CPU runs, not CPU with GPU."""
FP32_FRACTION = {"H200": 67 / 989, "H100": 67 / 989, "H800": 67 / 989, "A100": 19.5 / 312}
"""fp32 peak over bf16 peak where it differs much (training without bf16 on those GPUs)."""


def peak_tflops(device_name: str, bf16: bool, override: float | None = None) -> float:
    """The per-worker peak MFU divides by: `override` (recipe `peak_tflops`), else the table, else the CPU figure."""
    if override is not None:
        return override
    for key, value in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):  # "L40S" before "L40"
        if key in device_name.upper():
            return value if bf16 else value * FP32_FRACTION.get(key, 0.5)
    return CPU_PEAK_TFLOPS


def train_flops_per_token(cfg, num_tokens: int, text_tokens: int) -> float:
    """Training FLOPs per video token of a DiT (forward + backward = 3 forwards; a multiply-add is 2 FLOPs).

    Per block: self-attention's qkv and output projections (8 D^2), its scores and weighted sum over the clip's
    `num_tokens` (4 N D; full attention's upper bound, windows attend less), cross-attention's q and output (4 D^2),
    its keys and values of `text_tokens` caption tokens from width Dt shared by the clip's N tokens (4 L Dt D / N)
    and its attention (4 L D), the MLP (4 D F). Plus patch embedding and the final layer (4 P D). Timestep and
    adaLN work is per clip, not per token, and left out (as torchtitan's 6N + attention estimate does).
    """
    d, n, l_text = cfg.hidden_size, max(1, num_tokens), text_tokens
    ffn = cfg.ffn_dim or int(cfg.hidden_size * cfg.mlp_ratio)
    patch = cfg.in_channels * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    block = 8 * d * d + 4 * n * d + 4 * d * d + 4 * l_text * cfg.text_dim * d / n + 4 * l_text * d + 4 * d * ffn
    return 3.0 * (cfg.depth * block + 4 * patch * d)


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
