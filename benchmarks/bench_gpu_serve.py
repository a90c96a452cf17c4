"""GPU figure for serving (issue 15): clips/s of the generator's pipeline in bf16 at batch sizes 1, 2, 4, 8.

    python -m benchmarks.bench_gpu_serve [--quick] [--json PATH]

What a GPU replica's dynamic batching gains: the generator deployment hands `TextToVideoPipeline` one call
per shape group of up to 8 requests (`pipelines/serve/generator.py`), each prompt with its own seed and
guidance. This runs that call directly (Ray's wheel does not travel to the GPU machines): a DiT-B/2-sized
model in pixel space with patch 1x8x8 (fresh weights in bf16: cost does not depend on their values),
16 frames at 256x256 (16 x 32 x 32 = 16k tokens per clip), 20 Euler steps with classifier-free guidance, a
MiniLM-shaped random text encoder. `batching_gain_8_over_1` = clips/s at batch 8 / clips/s at batch 1.
Exits 0 with a message where there is no CUDA device.
"""

from __future__ import annotations

import statistics
import sys

from benchmarks.common import main

FIGURE = "gpu_serve_batching"
GOAL = (">=", 0.0)  # descriptive: the issue asks for the figures, not a target
BATCHES = (1, 2, 4, 8)


def run(quick: bool) -> dict:
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu_serve: no CUDA device here; not measured (run this on a GPU machine)", file=sys.stderr)
        return {
            "value": None,
            "compared": "generator clips/s by batch size: not measured (no GPU)",
            "details": {"cuda": False},
        }
    from benchmarks.gpu_common import cuda_timed, peak_gib, random_text_encoder
    from sora_model.config import DiffusionConfig, PipelineConfig, SampleConfig, dit_preset
    from sora_model.pipeline import TextToVideoPipeline

    frames, size, steps = 16, 256, 20
    cfg = PipelineConfig(
        model=dit_preset("DiT-B/2", patch_size=(1, 8, 8), in_channels=3, text_dim=384),
        diffusion=DiffusionConfig(num_sampling_steps=steps, guidance_scale=4.0),
        sample=SampleConfig(num_frames=frames, height=size, width=size),
    )
    pipe = TextToVideoPipeline.from_config(cfg, device="cuda", text_encoder=random_text_encoder())
    pipe.set_precision("bf16")
    details: dict = {"device": torch.cuda.get_device_name(0), "frames": frames, "size": size, "steps": steps}
    for b in BATCHES:
        prompts = [f"a red circle moving left w{i}" for i in range(b)]

        def call(prompts=prompts, b=b):
            pipe(prompts, seed=list(range(b)), num_frames=frames, height=size, width=size, steps=steps)

        call()  # warm-up (kernels, allocator)
        torch.cuda.reset_peak_memory_stats()
        sec = statistics.median(cuda_timed(call, 2 if quick else 4))
        details[f"clips_per_s_batch_{b}"] = round(b / sec, 3)
        details[f"seconds_batch_{b}"] = round(sec, 3)
        details[f"peak_gib_batch_{b}"] = peak_gib()
    gain = details[f"clips_per_s_batch_{BATCHES[-1]}"] / details["clips_per_s_batch_1"]
    details["batching_gain_8_over_1"] = round(gain, 3)
    return {
        "value": round(gain, 3),
        "compared": "generator clips/s at batch 8 / at batch 1, bf16 (details: each batch)",
        "details": details,
    }


if __name__ == "__main__":
    sys.exit(main(sys.modules[__name__]))
