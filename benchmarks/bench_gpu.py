"""GPU figures (issue 8): DiT-L tokens/s and MFU in bf16, ZeRO-3 vs ZeRO-2 vs DDP step time, 16x256x256 generation time.

    python -m benchmarks.bench_gpu [--quick] [--json PATH]
    torchrun --nproc_per_node 2 -m benchmarks.bench_gpu --zero-only   # the ZeRO/DDP comparison needs >= 2 GPUs

Exits 0 with a message when no CUDA device is present (the CPU sessions that built this had none).

1. Tokens/s and MFU: a DiT-L/2-sized model (width 1024, depth 24, 16 heads, patch 1x2x2, temporal
   windows (4, 16, 0)), bf16 autocast, batch 1 of 16 latent frames at 48x48 (16 x 24 x 24 = 9216 tokens,
   >= 8k), forward + backward + AdamW; MFU = achieved FLOPs / the device's dense bf16 peak, with model
   FLOPs counted as 6 x parameters x tokens plus attention's 12 x layers x width x tokens x attended keys.
   Measured eager and under `torch.compile`; the headline is the faster (`mfu_from` says which).
2. ZeRO-3 vs ZeRO-2 vs DDP: the same model and step under DeepSpeed stages 3 and 2 and torch DDP, step time
   medians interleaved (needs a process group: run under torchrun with >= 2 GPUs; skipped otherwise).
3. Generation: `TextToVideoPipeline` with the DiT-L-sized model (fresh weights: cost does not depend on
   them), 16 frames at 256x256 in pixel space with patch 1x8x8 (16 x 32 x 32 = 16k tokens), 30 Euler steps
   with classifier-free guidance, seconds per clip.
"""

from __future__ import annotations

import statistics
import sys
import time

from benchmarks.common import main

FIGURE = "gpu"
GOAL = (">=", 0.0)  # descriptive figures; no goal in the issue
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}
"""Dense bf16 tensor-core peaks (vendor datasheets, without sparsity)."""


def _peak(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _timed(fn, reps: int) -> list[float]:
    from benchmarks.gpu_common import cuda_timed

    return cuda_timed(fn, reps)


def dit_l(**kw):
    from sora_model.config import dit_preset

    return dit_preset("DiT-L/2", **{"in_channels": 4, "text_dim": 384, **kw})


def tokens_and_mfu(quick: bool, compiled: bool = False) -> dict:
    """One training step's tokens/s and MFU; `compiled`: the model under `torch.compile` (Inductor)."""
    import torch

    from sora_model.dit import DiT

    cfg = dit_l()
    model = DiT(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    forward = torch.compile(model) if compiled else model
    frames, lat = 16, 48
    x = torch.randn(1, 4, frames, lat, lat, device="cuda")
    text = (
        torch.randn(1, 32, 384, device="cuda"),
        torch.ones(1, 32, dtype=torch.bool, device="cuda"),
        torch.randn(1, 384, device="cuda"),
    )
    tokens = frames * (lat // 2) ** 2

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = forward(x, torch.tensor([500.0], device="cuda"), *text)
            loss = torch.nn.functional.mse_loss(out.float(), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    _timed(step, 2)
    warmup = time.perf_counter() - t0
    ts = _timed(step, 5 if quick else 20)
    sec = statistics.median(ts)
    params = sum(p.numel() for p in model.parameters())
    # attended keys per block: window w frames x tokens per frame (global: all frames)
    per_frame = (lat // 2) ** 2
    attn = 0
    for i in range(cfg.depth):
        w = cfg.temporal_windows[i % len(cfg.temporal_windows)] or frames
        attn += 12 * cfg.hidden_size * tokens * min(w, frames) * per_frame
    flops = 6 * params * tokens + attn
    name = torch.cuda.get_device_name(0)
    peak = _peak(name)
    tag = "compiled" if compiled else "eager"
    return {
        f"{tag}_tokens_per_s": round(tokens / sec, 1),
        f"{tag}_mfu": round(flops / sec / (peak * 1e12), 4) if peak else None,
        f"{tag}_step_seconds": round(sec, 4),
        f"{tag}_warmup_seconds": round(warmup, 1),
        "tokens_per_sample": tokens,
        "params": params,
        "device": name,
        "peak_bf16_tflops": peak,
    }


def best_mfu(quick: bool) -> dict:
    """Eager and compiled steps; the headline figures are the faster of the two (named in `mfu_from`)."""
    import torch

    out = tokens_and_mfu(quick)
    torch.cuda.empty_cache()  # the eager model is gone with its frame
    out.update(tokens_and_mfu(quick, compiled=True))
    best = "compiled" if out["compiled_step_seconds"] < out["eager_step_seconds"] else "eager"
    out["gpu_dit_l_tokens_per_s_bf16"] = out[f"{best}_tokens_per_s"]
    out["gpu_dit_l_mfu_bf16"] = out[f"{best}_mfu"]
    out["mfu_from"] = best
    return out


def generation(quick: bool) -> dict:
    from sora_model.config import DiffusionConfig, PipelineConfig, SampleConfig
    from sora_model.pipeline import TextToVideoPipeline

    cfg = PipelineConfig(
        model=dit_l(patch_size=(1, 8, 8), in_channels=3),
        diffusion=DiffusionConfig(num_sampling_steps=30),
        sample=SampleConfig(num_frames=16, height=256, width=256),
    )
    from benchmarks.gpu_common import random_text_encoder

    pipe = TextToVideoPipeline.from_config(cfg, device="cuda", text_encoder=random_text_encoder())
    pipe.set_precision("bf16")
    pipe("warm up", num_frames=16, height=256, width=256, steps=2)
    ts = _timed(lambda: pipe("a red circle moving left", num_frames=16, height=256, width=256), 2 if quick else 5)
    return {"gpu_generate_16x256x256_seconds": round(statistics.median(ts), 3)}


def zero_vs_ddp(quick: bool) -> dict:
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return {
            "gpu_zero3_vs_zero2_vs_ddp_step_time": None,
            "zero_note": "run under torchrun with >= 2 GPUs to measure",
        }
    import deepspeed
    import torch.distributed as dist

    from sora_model.dit import DiT

    deepspeed.init_distributed()
    rank = dist.get_rank()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    out = {}
    for label, stage in (("ddp", None), ("zero2", 2), ("zero3", 3)):
        torch.manual_seed(0)
        model = DiT(dit_l()).cuda()
        x = torch.randn(1, 4, 16, 32, 32, device="cuda")
        text = (
            torch.randn(1, 32, 384, device="cuda"),
            torch.ones(1, 32, dtype=torch.bool, device="cuda"),
            torch.randn(1, 384, device="cuda"),
        )
        if stage is None:
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4)

            def step(ddp=ddp, opt=opt, x=x, text=text):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = torch.nn.functional.mse_loss(ddp(x, torch.tensor([500.0], device="cuda"), *text).float(), x)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            engine, *_ = deepspeed.initialize(
                model=model,
                config={
                    "train_micro_batch_size_per_gpu": 1,
                    "zero_optimization": {"stage": stage},
                    "bf16": {"enabled": True},
                    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                    "steps_per_print": 1 << 30,
                },
            )

            def step(engine=engine, x=x, text=text):
                out_ = engine(
                    x.bfloat16(), torch.tensor([500.0], device="cuda"), text[0].bfloat16(), text[1], text[2].bfloat16()
                )
                engine.backward(torch.nn.functional.mse_loss(out_.float(), x))
                engine.step()

        _timed(step, 2)
        out[label] = round(statistics.median(_timed(step, 5 if quick else 15)), 4)
    if rank != 0:
        sys.exit(0)
    return {"gpu_zero3_vs_zero2_vs_ddp_step_time": out}


def run(quick: bool) -> dict:
    import torch

    if not torch.cuda.is_available():
        print(
            "bench_gpu: no CUDA device here; the GPU figures are not measured (run this on a GPU machine)",
            file=sys.stderr,
        )
        return {"value": None, "compared": "GPU figures: not measured (no GPU)", "details": {"cuda": False}}
    details = {}
    if not ZERO_ONLY:
        details.update(best_mfu(quick))
        details.update(generation(quick))
    details.update(zero_vs_ddp(quick))
    return {"value": details.get("gpu_dit_l_mfu_bf16"), "compared": "GPU figures (see details)", "details": details}


ZERO_ONLY = False


if __name__ == "__main__":
    if "--zero-only" in sys.argv:  # taken out before the shared argparse sees it
        sys.argv.remove("--zero-only")
        ZERO_ONLY = True
    sys.exit(main(sys.modules[__name__]))
