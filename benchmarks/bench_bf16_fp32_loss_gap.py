"""Relative gap between the bf16 and fp32 loss curves of the smoke recipe's clip stage, 20 steps, same seed.

What is compared: the trainer's own engine (DeepSpeed ZeRO-3, one gloo rank on CPU) and step function run the
smoke recipe's `clips` stage (DiT-tiny, 8x16x16 clips, 2 a micro-batch x 2 accumulated, lr 2e-3) for 20 steps in
fp32 and in DeepSpeed's bf16 mode (every parameter bf16, fp32 masters in the optimizer), each in a fresh
process, on the same micro-batches and the same noise (`pipelines/train/bf16_check.py`). The value is the
largest |bf16 - fp32| / fp32 over the 20 steps; the final step's gap is in the details.

Why: bf16 training must follow the fp32 curve to bf16's precision; a precision policy that rounds norms, the
condition path or the residual stream to bf16 would drift away from it. Goal: under 1%, the integration test's
tolerance (tests/integration/test_train_bf16.py says why).
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.common import main

FIGURE = "bf16_fp32_loss_gap"
GOAL = ("<=", 0.01)
ROOT = Path(__file__).resolve().parents[1]
STEPS = 20


def run(quick: bool) -> dict:
    from pipelines.train.bf16_check import loss_curves, relative_gaps

    curves = loss_curves(str(ROOT / "cluster" / "recipes" / "smoke-cpu.yaml"), "clips", STEPS)
    gaps = relative_gaps(curves)
    return {
        "value": round(max(gaps), 6),
        "compared": (
            f"max over {STEPS} steps of /bf16 - fp32/ / fp32 loss, smoke recipe's clips stage (DiT-tiny, "
            "8x16x16), trainer engine (DeepSpeed ZeRO-3, 1 gloo rank) + step function, same seed and "
            "batches, CPU"
        ),
        "details": {
            "final_relative_gap": round(gaps[-1], 6),
            "mean_relative_gap": round(sum(gaps) / len(gaps), 6),
            "fp32": [round(v, 5) for v in curves["fp32"]],
            "bf16": [round(v, 5) for v in curves["bf16"]],
        },
    }


if __name__ == "__main__":
    sys.exit(main(sys.modules[__name__]))
