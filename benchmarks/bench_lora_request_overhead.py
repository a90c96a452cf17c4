"""Seconds per request with a LoRA adapter ÷ without, on the generator replica's sampling path.

What is compared: the call a generator replica makes for one request (`Generator._run_group`): `with
adapters.applied(NAME): pipe(prompt, ...)`, with NAME a resident adapter (the steady state: the LRU holds it) and
with NAME None (the base model, nothing applied). The model is Wan2.1-1.3B's width (1536, 12 heads, FFN 8960, shared
modulation, QK RMSNorm over the width) at 2 layers, with the packaged MiniLM text encoder and the pixel-space
autoencoder; the request is 2 frames at 32x32 (512 tokens), 4 steps, CFG. The adapter is a community-layout Wan LoRA
of rank 32 on every projection Wan LoRAs target (self q/k/v/o, cross q/k/v/o, FFN in/out: 10 per block), applied
unmerged through forward hooks that accumulate B's GEMM into the Linear's output in place. Few tokens make the ratio
pessimistic: the adapter's matmuls grow with tokens like the Linears', attention grows faster, so at Wan's 32k tokens
its share is smaller still. The Ray Serve round trip is left out (its noise on a shared 2-core machine is larger than
the effect); it is the same with and without an adapter.

Why fair: the same pipeline object, prompt, seed and shape on both sides, interleaved call by call on one torch thread,
timed with the process CPU clock (other processes' load barely moves it); the figure is the median of per-round
ratios. The details give the wall-clock ratio too, and the one-time cost of loading the adapter on a miss.

    python -m benchmarks.bench_lora_request_overhead [--quick]
"""

from __future__ import annotations

import sys
import tempfile
import time

from benchmarks.common import LAST_OTHER_CLOCK, interleaved, main, median, paired_ratio, summary

FIGURE = "lora_request_overhead"
GOAL = ("<=", 1.05)
RANK = 32
WAN_MODULES = (
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "ffn.0",
    "ffn.2",
)


def _adapter(model, path: str) -> int:
    """A community-layout Wan LoRA file of rank RANK for `model`; returns its number of adapted modules."""
    import torch
    from safetensors.torch import save_file

    from sora_model.lora import LoraFile

    g = torch.Generator().manual_seed(0)
    modules = dict(model.named_modules())
    ours = {
        "self_attn.q": ("attn.qkv", 3),
        "self_attn.k": ("attn.qkv", 3),
        "self_attn.v": ("attn.qkv", 3),
        "self_attn.o": ("attn.proj", 1),
        "cross_attn.q": ("cross_attn.q", 1),
        "cross_attn.k": ("cross_attn.kv", 2),
        "cross_attn.v": ("cross_attn.kv", 2),
        "cross_attn.o": ("cross_attn.proj", 1),
        "ffn.0": ("mlp.0", 1),
        "ffn.2": ("mlp.2", 1),
    }
    tensors = {}
    for i in range(len(model.blocks)):
        for name in WAN_MODULES:
            target, parts = ours[name]
            linear = modules[f"blocks.{i}.{target}"]
            stem = f"diffusion_model.blocks.{i}.{name}"
            tensors[f"{stem}.lora_A.weight"] = 0.01 * torch.randn(RANK, linear.in_features, generator=g)
            tensors[f"{stem}.lora_B.weight"] = 0.01 * torch.randn(linear.out_features // parts, RANK, generator=g)
            tensors[f"{stem}.alpha"] = torch.tensor(float(RANK))
    save_file(tensors, path)
    return len(LoraFile(path).entries)


def run(quick: bool) -> dict:
    import torch

    from sora_model.adapters import AdapterCache
    from sora_model.config import DiffusionConfig, PipelineConfig, SampleConfig, dit_preset
    from sora_model.pipeline import TextToVideoPipeline

    torch.set_num_threads(1)  # a replica's CPU share (Ray sets its OMP threads to its num_cpus)
    torch.manual_seed(0)
    config = PipelineConfig(
        model=dit_preset("Wan2.1-T2V-1.3B", depth=2, text_dim=384, in_channels=3),
        sample=SampleConfig(num_frames=2, height=32, width=32, fps=8),
        diffusion=DiffusionConfig(num_sampling_steps=4),
    )
    pipe = TextToVideoPipeline.from_config(config)
    request = {"num_frames": 2, "height": 32, "width": 32, "steps": 4, "guidance_scale": 4.0, "seed": 3}
    prompt = "a red circle moving left"
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        path = f"{tmp}/style.safetensors"
        modules = _adapter(pipe.model, path)
        adapters = AdapterCache(pipe.model, {"style": path}, max_bytes=1 << 30)
        started = time.perf_counter()
        adapters.get("style")  # the miss: read, map and bind (then resident)
        load_s = time.perf_counter() - started

        def call(name: str | None):
            def go() -> None:
                with adapters.applied(name):
                    pipe(prompt, **request)

            return go

        times = interleaved({"base": call(None), "lora": call("style")}, reps=5 if quick else 9, warmup=1, clock="cpu")
        wall = dict(LAST_OTHER_CLOCK)
    return {
        "value": round(paired_ratio(times["lora"], times["base"]), 4),
        "compared": (
            f"CPU s per request, rank-{RANK} Wan LoRA resident and applied unmerged ({median(times['lora']):.3f}) / "
            f"base model ({median(times['base']):.3f}); Wan-1.3B width, 2 layers, 512 tokens, 4 CFG steps, 1 thread"
        ),
        "details": {
            "wall_clock_ratio": round(paired_ratio(wall["lora"], wall["base"]), 4),
            "cpu_s": {k: summary(v, 3) for k, v in times.items()},
            "wall_s": {k: summary(v, 3) for k, v in wall.items()},
            "adapter": {
                "rank": RANK,
                "modules": modules,
                "layout": "diffusion_model.blocks.N.<module>.lora_A/B + alpha",
                "resident_bytes": adapters.bytes,
                "first_load_s": round(load_s, 3),
            },
            "model": "Wan2.1-T2V-1.3B width, 2 layers",
            "tokens": 512,
            "request": request,
            "torch_threads": 1,
            "path": (
                "generator sampling call (AdapterCache.applied + TextToVideoPipeline.__call__), no Serve round trip"
            ),
        },
    }


if __name__ == "__main__":
    sys.exit(main(sys.modules[__name__]))
