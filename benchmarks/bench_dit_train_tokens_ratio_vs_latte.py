"""Train-step tokens/s of our DiT ÷ diffusers' LatteTransformer3DModel at matched width, depth, heads and tokens.

What is compared: one training step (forward, MSE loss, backward, torch AdamW step) on
CPU in fp32, same batch of random latents and text embeddings, same thread count, repetitions of the
two models interleaved in one process (medians of back-to-back pairs). Why it is fair, and which of
our configurations is the headline (the factorized one, which alternates spatial and temporal blocks
as Latte does): see benchmarks/_dit_vs_latte.py. Our full-3D-attention model is in the details.
"""

from __future__ import annotations

import sys

from benchmarks import _dit_vs_latte
from benchmarks.common import main

FIGURE = "dit_train_tokens_ratio_vs_latte"
GOAL = (">=", 1.3)


def run(quick: bool) -> dict:
    return _dit_vs_latte.measure("train", quick)


if __name__ == "__main__":
    sys.exit(main(sys.modules[__name__]))
