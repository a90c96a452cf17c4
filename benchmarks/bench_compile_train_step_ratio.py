"""Training-step time eager ÷ `torch.compile`d, at the demo's size on CPU.

What is compared: one training step (forward, MSE loss, backward, AdamW) of the demo recipe's model
(`cluster/recipes/demo-cpu.yaml`: DiT-demo, absolute positions, global attention) on its longest stage's
micro-batch (8 clips of 8x32x32, 4096 tokens), run eagerly and compiled with Inductor
(`torch.compile(model, fullgraph=True, dynamic=False)`, what `compile: true` in a recipe does). A ratio
above 1 means compiling pays. The one-off compile time is in the details: it is paid once per bucket
per worker, so it is what a short run must amortise.

Clock: process CPU time with torch on one thread (the machine is shared). Why fair: the same model
object and optimizer, the same inputs, eager and compiled steps interleaved in one process.
"""

from __future__ import annotations

import sys
import time

import torch

from benchmarks import common
from benchmarks.common import interleaved, main, median, paired_ratio, summary

FIGURE = "compile_train_step_ratio"
GOAL = (">=", 1.0)


def run(quick: bool) -> dict:
    from sora_model.config import dit_preset
    from sora_model.dit import DiT

    reps = 4 if quick else 8
    batch, frames, res = 8, 8, 32
    torch.manual_seed(0)
    torch.set_num_threads(1)  # CPU-time clock on one thread: robust to other processes' load
    cfg = dit_preset("DiT-demo", absolute_positions=True, temporal_windows=(0,))
    model = DiT(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, frames, res, res, generator=g)
    args = (
        torch.rand(batch, generator=g) * 1000,
        torch.randn(batch, 12, cfg.text_dim, generator=g),
        torch.ones(batch, 12, dtype=torch.bool),
        torch.randn(batch, cfg.text_dim, generator=g),
    )
    compiled = torch.compile(model, fullgraph=True, dynamic=False)

    def step(fn) -> None:
        out = fn(x, *args)
        torch.nn.functional.mse_loss(out, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    w0, c0 = time.perf_counter(), time.process_time()
    step(compiled)  # the compile
    compile_wall, compile_cpu = time.perf_counter() - w0, time.process_time() - c0
    times = interleaved(
        {"eager": lambda: step(model), "compiled": lambda: step(compiled)}, reps=reps, warmup=1, clock="cpu"
    )
    wall = dict(common.LAST_OTHER_CLOCK)
    ratio = round(paired_ratio(times["eager"], times["compiled"]), 3)
    saved = median(times["eager"]) - median(times["compiled"])
    result = {
        "value": ratio,
        "compared": (
            "train step (fwd+bwd+AdamW) time eager / torch.compile (Inductor, fullgraph), demo recipe model "
            f"(DiT-demo, {model.num_parameters():,} parameters), {batch}x{frames}x{res}x{res} ({batch * frames * 64} "
            "tokens), CPU fp32"
        ),
        "details": {
            "seconds_eager": summary(times["eager"]),
            "seconds_compiled": summary(times["compiled"]),
            "ratio_wall_clock": round(paired_ratio(wall["eager"], wall["compiled"]), 3),
            "compile_seconds_wall": round(compile_wall, 1),
            "compile_seconds_cpu_this_process": round(compile_cpu, 1),
            "steps_to_amortise_compile": round(compile_wall / saved, 1) if saved > 0 else None,
            "clock": "process CPU time, torch on 1 thread",
        },
    }
    if ratio < 1.0:
        result["note"] = (
            f"compiled steps are slower here ({median(times['compiled']):.3f} s vs {median(times['eager']):.3f} s "
            "eager), so the demo recipe keeps compile: false"
        )
    return result


if __name__ == "__main__":
    sys.exit(main(sys.modules[__name__]))
