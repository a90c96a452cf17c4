"""GPU figures (issue 17): a Wan2.1-T2V-1.3B-shaped DiT sampling 33 frames at 480x832, and one LoRA training step.

    python -m benchmarks.bench_gpu_wan [--json PATH]

Exits 0 with a message when no CUDA device is present. Needs torch, peft and safetensors only (no ray,
deepspeed, diffusers or decord): it imports `sora_model.config`, `sora_model.dit` and `sora_model.lora`.

The model is our DiT with Wan's options (`dit_preset("Wan2.1-T2V-1.3B")`: width 1536, 30 layers, 12 heads,
FFN 8960, 16 latent channels, patch 1x2x2, umT5 width 4096, 512 caption tokens attended whole, shared
modulation), random weights: cost does not depend on them. 33 frames at 480x832 are Wan-VAE latents
16 x 9 x 60 x 104, 9 x 30 x 52 = 14,040 tokens.

1. Sampling: bf16 weights (`DiT.to_inference_dtype`), one denoising step with classifier-free guidance
   (conditional and unconditional in one batch of 2, guidance mix, Euler update): seconds per step and
   peak GPU memory.
2. LoRA training: peft LoRA rank 32 on every block's attention (q/k/v/o, self and cross) and MLP projections
   (`sora_model.lora.LORA_TARGET_MODULES`), base frozen in bf16, gradient checkpointing, bf16 autocast,
   flow-matching MSE, AdamW on the adapter parameters only: seconds per step and peak GPU memory.

Warm-up 1, then the median of 3 timed steps each; well under 3 minutes on an H100.
"""

from __future__ import annotations

import statistics
import sys
import time

from benchmarks.common import main

FIGURE = "gpu_wan"
GOAL = (">=", 0.0)  # descriptive figures; no goal in the issue
FRAMES, HEIGHT, WIDTH = 33, 480, 832
LATENT = (16, 9, 60, 104)
"""Wan VAE: 1 + (33 - 1) / 4 = 9 latent frames, 480 / 8 x 832 / 8, 16 channels."""
TEXT_TOKENS = 512
LORA_RANK = 32
GUIDANCE = 5.0
WARMUP, TIMED = 1, 3


def _measure(step, device: str) -> tuple[list[float], float | None]:
    """Step times (1 warm-up, then TIMED timed) and peak GiB on cuda; one wall time and no peak elsewhere (CPU
    checks)."""
    if device != "cuda":
        return [_wall(step)], None
    import torch

    from benchmarks.gpu_common import cuda_timed, peak_gib

    for _ in range(WARMUP):
        step()
    torch.cuda.reset_peak_memory_stats()
    return cuda_timed(step, TIMED), peak_gib()


def wan_config(**kw):
    from sora_model.config import dit_preset

    return dit_preset("Wan2.1-T2V-1.3B", **kw)


def _text(batch: int, device, dtype):
    import torch

    tokens = torch.randn(batch, TEXT_TOKENS, 4096, device=device, dtype=dtype)
    mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.bool, device=device)
    pooled = torch.zeros(batch, 4096, device=device, dtype=dtype)  # unused: Wan has no pooled path
    return tokens, mask, pooled


def sampling(cfg, latent: tuple[int, ...], device: str = "cuda") -> dict:
    """Seconds per CFG denoising step and peak memory, bf16 weights."""
    import torch

    from sora_model.dit import DiT

    with torch.device(device):
        model = DiT(cfg).eval()
    model.to_inference_dtype(torch.bfloat16)
    x = torch.randn(1, *latent, device=device)
    text = _text(2, device, torch.bfloat16)  # conditional and negative prompt, one batch
    t = torch.full((2,), 999.0, device=device)

    @torch.no_grad()
    def step():
        out = model(torch.cat([x, x]), t, *text).float()  # (2, C, T, H, W)
        cond, uncond = out.chunk(2)
        x.add_(-0.02 * (uncond + GUIDANCE * (cond - uncond)))  # Euler: x + (t_next - t) * v

    times, peak = _measure(step, device)
    return {
        "seconds_per_step": round(statistics.median(times), 4),
        "peak_gib": None if peak is None else round(peak, 2),
        "params": model.num_parameters(),
    }


def lora_training(cfg, latent: tuple[int, ...], device: str = "cuda") -> dict:
    """Seconds per LoRA training step and peak memory: frozen bf16 base, fp32 adapters, autocast, checkpointing."""
    import peft
    import torch

    from sora_model.dit import DiT
    from sora_model.lora import LORA_TARGET_MODULES

    with torch.device(device):
        model = DiT(cfg).train()
    model.to_inference_dtype(torch.bfloat16)
    model.requires_grad_(False)
    lora = peft.LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=LORA_TARGET_MODULES, init_lora_weights=True
    )
    model = peft.inject_adapter_in_model(lora, model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    x0 = torch.randn(1, *latent, device=device)
    text = _text(1, device, torch.bfloat16)

    def step():
        noise = torch.randn_like(x0)
        t = torch.rand(1, device=device)
        xt = (1 - t) * x0 + t * noise
        with torch.autocast(device, dtype=torch.bfloat16):
            pred = model(xt, t * 1000, *text)
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times, peak = _measure(step, device)
    return {
        "seconds_per_step": round(statistics.median(times), 4),
        "peak_gib": None if peak is None else round(peak, 2),
        "adapter_params": sum(p.numel() for p in params),
    }


def _wall(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(quick: bool) -> dict:
    import torch

    if not torch.cuda.is_available():
        print(
            "bench_gpu_wan: no CUDA device here; the GPU figures are not measured (run this on a GPU machine)",
            file=sys.stderr,
        )
        return {
            "value": None,
            "compared": "Wan-1.3B-shaped GPU figures: not measured (no GPU)",
            "details": {"cuda": False},
        }
    sample = sampling(wan_config(), LATENT)
    torch.cuda.empty_cache()
    train = lora_training(wan_config(gradient_checkpointing=True), LATENT)
    tokens = LATENT[1] * (LATENT[2] // 2) * (LATENT[3] // 2)
    details = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "clip": f"{FRAMES} frames at {HEIGHT}x{WIDTH}, latents {'x'.join(map(str, LATENT))}, {tokens} tokens",
        "wan_1_3b_cfg_step_seconds_bf16": sample["seconds_per_step"],
        "wan_1_3b_sampling_peak_gib": sample["peak_gib"],
        "wan_1_3b_lora_r32_train_step_seconds": train["seconds_per_step"],
        "wan_1_3b_lora_train_peak_gib": train["peak_gib"],
        "params": sample["params"],
        "lora_adapter_params": train["adapter_params"],
        "timing": f"median of {TIMED} after {WARMUP} warm-up",
    }
    return {
        "value": details["wan_1_3b_cfg_step_seconds_bf16"],
        "compared": "Wan-1.3B-shaped GPU figures (see details)",
        "details": details,
    }


if __name__ == "__main__":
    sys.exit(main(sys.modules[__name__]))
