"""Shared test fixtures' building blocks: the tiny export and the smoke-recipe data several modules use."""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def make_tiny_export(folder: Path) -> Path:
    """DiT-tiny, 4 frames of 16x16, 4 steps; weights perturbed so clips depend on prompt and seed."""
    from sora_model.config import DiffusionConfig, PipelineConfig, SampleConfig, dit_preset
    from sora_model.pipeline import TextToVideoPipeline

    config = PipelineConfig(
        model=dit_preset("DiT-tiny", text_dim=384),
        sample=SampleConfig(num_frames=4, height=16, width=16, fps=8),
        diffusion=DiffusionConfig(num_sampling_steps=4),
    )
    pipe = TextToVideoPipeline.from_config(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an untrained model gives constant clips; perturb so seeds matter
        for p in pipe.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    pipe.save(str(folder))
    return folder


WAN_TEXT_DIM, WAN_CHANNELS = 16, 4
WAN_LATENTS_MEAN, WAN_LATENTS_STD = [0.1, -0.2, 0.3, 0.0], [0.5, 1.0, 2.0, 1.5]


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """Random values everywhere (norm weights, biases and tables too), so a misplaced weight cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def tiny_wan_transformer() -> torch.nn.Module:
    import diffusers

    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=WAN_CHANNELS,
        out_channels=WAN_CHANNELS,
        text_dim=WAN_TEXT_DIM,
        freq_dim=32,
        ffn_dim=48,
        num_layers=2,
        rope_max_seq_len=32,
    )
    perturb(model, 0)
    return model.eval()


def write_tiny_vae(folder: Path) -> Path:
    """A tiny random diffusers AutoencoderKL (4 latent channels, 4x down) saved to `folder`, seeded."""
    import diffusers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    )
    vae.save_pretrained(str(folder))
    return folder


def make_tiny_wan_folder(folder: Path) -> Path:
    """A tiny Wan2.1 text-to-video pipeline folder (`save_pretrained`, nothing downloaded): umT5 with MiniLM's
    tokenizer, a Wan VAE with latent stats (8x spatial, 4x temporal), FlowMatchEuler with shift 3."""
    import diffusers
    import transformers

    from sora_model.text import minilm_path

    torch.manual_seed(0)
    text_encoder = transformers.UMT5EncoderModel(
        transformers.UMT5Config(vocab_size=30522, d_model=WAN_TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    )
    vae = diffusers.AutoencoderKLWan(
        base_dim=8,
        z_dim=WAN_CHANNELS,
        dim_mult=[1, 1, 2, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        latents_mean=WAN_LATENTS_MEAN,
        latents_std=WAN_LATENTS_STD,
    )
    diffusers.WanPipeline(
        tokenizer=transformers.AutoTokenizer.from_pretrained(minilm_path()),
        text_encoder=text_encoder.eval(),
        transformer=tiny_wan_transformer(),
        vae=vae.eval(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
    ).save_pretrained(str(folder))
    return folder


I2V_IMAGE_DIM, I2V_IMAGE_TOKENS = 24, 17  # a 32 px CLIP with 8 px patches: 16 patches + the class token
I2V_IN_CHANNELS = 2 * WAN_CHANNELS + 4  # noise, 4 mask channels, conditioning latents


def make_tiny_i2v_folder(folder: Path, flf2v: bool) -> Path:
    """A tiny WanImageToVideoPipeline folder (FLF2V with `flf2v`): the T2V helper's umT5, tokenizer and Wan VAE, a tiny
    CLIP (CLIPVisionModel, 32 px), a 12-channel WanTransformer3DModel with `image_dim`, FlowMatchEuler with shift 3."""
    import diffusers
    import transformers

    from sora_model.text import minilm_path

    t2v = make_tiny_wan_folder(folder.parent / f"{folder.name}-t2v")
    torch.manual_seed(0)
    clip = transformers.CLIPVisionModel(
        transformers.CLIPVisionConfig(
            hidden_size=I2V_IMAGE_DIM,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    )
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=I2V_IN_CHANNELS,
        out_channels=WAN_CHANNELS,
        text_dim=WAN_TEXT_DIM,
        freq_dim=32,
        ffn_dim=48,
        num_layers=2,
        rope_max_seq_len=32,
        image_dim=I2V_IMAGE_DIM,
        added_kv_proj_dim=32,
        pos_embed_seq_len=2 * I2V_IMAGE_TOKENS if flf2v else None,
    )
    perturb(transformer, 1)
    diffusers.WanImageToVideoPipeline(
        tokenizer=transformers.AutoTokenizer.from_pretrained(minilm_path()),
        text_encoder=transformers.UMT5EncoderModel.from_pretrained(str(t2v / "text_encoder")).eval(),
        vae=diffusers.AutoencoderKLWan.from_pretrained(str(t2v / "vae")).eval(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        image_processor=transformers.CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        image_encoder=clip.eval(),
        transformer=transformer.eval(),
    ).save_pretrained(str(folder))
    return folder


def make_tiny_i2v_export(base: Path, flf2v: bool = False) -> Path:
    """`sora convert --from-diffusers` of a tiny I2V (or FLF2V) folder made under `base`; the export's path."""
    from pipelines.cli import main

    folder = make_tiny_i2v_folder(base / "Wan-tiny-I2V-Diffusers", flf2v=flf2v)
    assert main(["convert", "--from-diffusers", str(folder), "--out", str(base / "export")]) == 0
    return base / "export"


def smoke_training_data(base: Path) -> str:
    """DIR_images,DIR_clips for smoke-cpu.yaml (24 synthetic 16x16 videos), made once under `base`."""
    from pipelines.cli import main

    images, clips = base / "images", base / "clips"
    if not (clips / "dataset.json").is_file():
        synth = ["data", "synth", "--out", str(base / "shapes"), "--num-videos", "24", "--size", "16", "--frames", "8"]
        assert main([*synth, "--no-progress"]) == 0
        manifest = str(base / "shapes" / "captions.jsonl")
        for out, frames in ((images, "1"), (clips, "8")):
            prepare = [
                "data",
                "prepare",
                "--manifest",
                manifest,
                "--out",
                str(out),
                "--resolution",
                "16",
                "--frames",
                frames,
            ]
            assert main([*prepare, "--no-progress"]) == 0
    return f"{images},{clips}"


def wait_done(http, video_id: str, timeout: float = 120) -> dict:
    """Poll a video job over HTTP (an httpx.Client with base_url) until it is completed or failed."""
    deadline = time.time() + timeout
    job: dict = {}
    while time.time() < deadline:
        job = http.get(f"/v1/videos/{video_id}").json()
        if job["status"] in ("completed", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"{video_id} did not finish: {job}")


@contextmanager
def patched_environ(**env: str) -> Iterator[None]:
    """Set environment variables for the block (as a deployment would: Ray workers started inside inherit them)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_port() -> int:
    """A loopback port free now, for a server a test starts: picked outside the kernel's ephemeral range.

    `bind(("127.0.0.1", 0))` hands out a port of that range, the same range every outgoing connection takes its
    local port from; between the pick and the server's own bind (seconds, when the server is a Ray head making
    dozens of connections as it starts) a connection can take it and the server fails to start.
    """
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    ports = [
        p for p in range(10000, 65536) if not low <= p <= high
    ]  # below 10000: well-known defaults (Ray's 6379, 8265)
    for port in random.sample(ports, min(200, len(ports))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # the range covers (nearly) every port: the kernel's pick is all there is
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
