"""`sora train --recipe R --rehearse [--run-dir D]`: a recipe's own settings, at tiny size, on 2 CPU workers.

    sora train --recipe cluster/recipes/article-5stage.yaml --rehearse --run-dir /tmp/rehearse-article
    python -m pipelines.train.trainer --recipe cluster/recipes/wan-1.3b-lora.yaml --rehearse

What a cluster run would do first and find out an hour in: the recipe's precision (bf16 where it says bf16, or
`auto` on cuda), ZeRO stage, optimizer and parameter offload, sequence-parallel degree (2 here, when the recipe
uses it), packed mixed-bucket stages, LoRA, EMA, `init_from` (a tiny export of the recipe's architecture is
written and loaded), gradient checkpointing and every stage in order, then one lost worker and the restart from
its last checkpoint. It runs through `sora train`'s own path (`trainer.train`: Ray Train + DeepSpeed).

What shrinks: model widths and depth (the architecture's options stay), clip sizes (every distinct frame count
and side of the recipe maps to a small one, in order, so distinct buckets stay distinct), steps, batch sizes and
the data (the synthetic shapes, `sora data synth` + `sora data prepare` per bucket the recipe names). Text
encoders and VAEs given as local folders are stood in for by the packaged MiniLM and pixel space. The rest of
the settings are the recipe's. The run ends with one line: what ran, and what cannot be rehearsed on CPU.

    D/data/shapes/  D/data/prepared/  D/init/ (init_from recipes)  D/recipe.yaml  D/run/ (the training run)
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from typing import Any

import yaml

from sora_model.config import ConfigError

WIDTH, HEADS, FFN = 32, 2, 64
"""Tiny model: width 32, 2 heads (so sequence parallelism of 2 divides them), MLP 64 where the recipe names one."""
FRAMES_STEP, FRAMES_MAX = 2, 8
SIDE_MIN, SIDE_STEP, SIDE_MAX = 16, 4, 28
"""The i-th distinct frame count of a recipe's video stages becomes 2 (i + 1) frames (at most 8; 1 + 4k counts,
a causal VAE's, become 5 or 9); the i-th distinct clip side 16 + 4 i pixels (at most 28). Images stay 1 frame."""
SYNTH_SIZE, SYNTH_FRAMES, SYNTH_VIDEOS = 32, 9, 8
"""The synthetic videos every bucket is cut from: large and long enough for all of them, 8 clips per bucket."""
STEPS, LAST_STEPS = 2, 3
"""Steps per stage; the last stage takes 3, checkpointing each, and its second step's end loses a worker."""
MICRO_BATCH, GRAD_ACCUM = 2, 2
"""At most 2 clips a micro-batch and 2 micro-batches a step (accumulation still runs where the recipe has it)."""
MINILM = "minilm"
MINILM_DIM = 384
"""The width of MiniLM's token embeddings: the tiny model's `text_dim`."""
CLIP_DIM, CLIP_SIZE, CLIP_PATCH = 24, 32, 8
"""An image-to-video recipe's tiny CLIP image encoder: width 24 at 32 px in 8 px patches (16 patches + the class
token = 17 feature tokens per image), random, written into the tiny init export beside its processor."""
WORKERS = 2
REHEARSAL_TIMEOUT_S = 180
"""The process-group timeout of a rehearsal (a recipe's own is sized for a cluster: usually 1800 s)."""


def _round_up(n: int, k: int) -> int:
    return max(k, math.ceil(n / k) * k)


class Shrink:
    """Maps a recipe's clip sizes to tiny ones, keeping their order and which are alike."""

    def __init__(self, stages: list[dict[str, Any]], patch: tuple[int, int, int]):
        shapes = [
            self.parse(b) for s in stages for b in ([s["dataset"]] if s.get("dataset") else s.get("datasets", []))
        ]
        shapes += [(s["frames"], *self.stage_hw(s)) for s in stages]
        self.patch = patch
        self.frames = {f: i for i, f in enumerate(sorted({f for f, _, _ in shapes if f > 1}))}
        self.sides = {v: i for i, v in enumerate(sorted({v for _, h, w in shapes for v in (h, w)}))}

    @staticmethod
    def parse(bucket: str) -> tuple[int, int, int]:
        try:
            f, h, w = (int(v) for v in bucket.split("x"))
        except ValueError:
            raise ConfigError(
                f"--rehearse needs stages that name buckets FRAMESxHEIGHTxWIDTH, got '{bucket}'"
            ) from None
        return f, h, w

    @staticmethod
    def stage_hw(stage: dict[str, Any]) -> tuple[int, int]:
        return stage.get("height") or stage["resolution"], stage.get("width") or stage["resolution"]

    def frame(self, f: int) -> int:
        if f == 1:
            return 1
        i = self.frames[f]
        if f % 4 == 1:  # 1 + 4k: a causal VAE's clip lengths keep their form
            return 1 + 4 * min(i + 1, 2)
        return _round_up(min(FRAMES_STEP * (i + 1), FRAMES_MAX), self.patch[0])

    def side(self, v: int, p: int) -> int:
        return _round_up(min(SIDE_MIN + SIDE_STEP * self.sides[v], SIDE_MAX), p)

    def shape(self, f: int, h: int, w: int) -> tuple[int, int, int]:
        return self.frame(f), self.side(h, self.patch[1]), self.side(w, self.patch[2])

    def bucket(self, name: str) -> str:
        return "x".join(map(str, self.shape(*self.parse(name))))

    def tokens(self, name: str) -> int:
        f, h, w = self.parse(name)
        return (f // self.patch[0]) * (h // self.patch[1]) * (w // self.patch[2])


def _tiny_model(cfg: Any) -> dict[str, Any]:
    """The DiTConfig fields that shrink: widths, heads, depth (enough blocks for every temporal window), pixel space."""
    depth = max(2, len(cfg.temporal_windows))
    if cfg.attention == "factorized":
        depth = 2 * max(1, len(cfg.temporal_windows))
    out = {"hidden_size": WIDTH, "num_heads": HEADS, "depth": depth, "in_channels": 3}
    if cfg.ffn_dim is not None:
        out["ffn_dim"] = FFN
    if cfg.in_channels != cfg.predicted_channels:  # I2V in pixel space: 3 noisy, 1 mask (no time compression), 3 image
        out.update(in_channels=3 + 1 + 3, out_channels=3)
    if cfg.image_dim is not None:
        out.update(image_dim=CLIP_DIM, image_tokens=(CLIP_SIZE // CLIP_PATCH) ** 2 + 1)
    return out


def _cpu_run(out: dict[str, Any], full: Any) -> dict[str, Any]:
    """The recipe mapping `out` as a two-worker CPU run of `full` (the parsed recipe): its own run settings capped."""
    # A tiny run that stalls in a collective or a rendezvous should fail in minutes, not wait out the recipe's
    # cluster-size timeout (1800 s) once per retry: both are capped; the one injected loss needs one retry.
    out.update(
        device="cpu",
        workers=WORKERS,
        cpus_per_worker=None,
        max_failures=min(2, max(1, full.max_failures)),
        process_group_timeout_s=min(REHEARSAL_TIMEOUT_S, full.process_group_timeout_s),
    )
    ds = dict(out.get("deepspeed") or {})
    ds["bf16"] = full.bf16  # `auto` resolved against the recipe's own device
    if full.deepspeed.hpz_partition_size > WORKERS:
        ds["hpz_partition_size"] = WORKERS
    out["deepspeed"] = ds
    if full.sequence_parallel_size > 1:
        out["sequence_parallel_size"] = WORKERS
    out["sample"] = {**(out.get("sample") or {}), "steps": 1, "num_gpus": 0.0, "num_cpus": None}
    return out


def _shrink_stage(stage: dict[str, Any], shrink: Shrink, last: bool) -> dict[str, Any]:
    s = copy.deepcopy(stage)
    frames, height, width = shrink.shape(s["frames"], *shrink.stage_hw(s))
    s.pop("resolution", None)
    s.update(
        frames=frames,
        height=height,
        width=width,
        steps=LAST_STEPS if last else STEPS,
        checkpoint_every=1 if last else 0,
        micro_batch=min(s.get("micro_batch", 1), MICRO_BATCH),
        grad_accum=min(s.get("grad_accum", 1), GRAD_ACCUM),
        warmup_steps=min(s.get("warmup_steps", 0), 1),
        sample_prompts=list(s.get("sample_prompts") or [])[:1],
    )
    if s.get("datasets"):
        buckets = list(dict.fromkeys(shrink.bucket(b) for b in s["datasets"]))
        s["datasets"] = buckets
        s["tokens_per_batch"] = 2 * max(shrink.tokens(b) for b in buckets)  # room for two of the largest clips
    else:
        s["dataset"] = shrink.bucket(s["dataset"])
    return s


class Plan:
    """The tiny recipe (a mapping, as YAML holds it), the buckets to prepare, and what could not be rehearsed."""

    def __init__(self, data: dict[str, Any], init_export: str | None):
        from pipelines.train.recipe import parse_recipe

        self.source = data
        full = parse_recipe(
            {k: v for k, v in data.items() if k != "init_from"} | ({"lora": None} if data.get("lora") else {})
        )
        self.name, self.device, self.bf16 = full.name, full.device, full.bf16
        self.full = full
        model = full.model_config()
        self.model_cfg = model
        self.not_cpu: list[str] = []
        out = _cpu_run(copy.deepcopy(data), full)
        tiny = _tiny_model(model)
        self.image = model.in_channels != model.predicted_channels
        if self.image and not data.get("init_from"):
            raise ConfigError(
                "--rehearse: an image-to-video recipe rehearses from init_from (an I2V export made by sora convert)"
            )
        text = {
            "name_or_path": MINILM,
            "max_length": full.text_encoder.max_length,
            "hidden_layer": full.text_encoder.hidden_layer,
        }
        tiny["text_dim"] = MINILM_DIM
        if init_export is not None:  # the export gives model, text encoder and autoencoder; only runtime options here
            self._from_init_export(out, data, init_export)
        else:
            model_spec = dict(out.get("model") or {})
            model_spec["overrides"] = {**(model_spec.get("overrides") or {}), **tiny}
            out["model"] = model_spec
            out["text_encoder"] = {**(out.get("text_encoder") or {}), **text}
            out["autoencoder"] = {"kind": "identity"}
        if out.get("lora"):
            out["lora"] = {**out["lora"], "rank": min(int(out["lora"].get("rank", 16)), WIDTH)}
        self.tiny_model = {**_model_dict(model), **tiny}
        self.text = text
        shrink = Shrink(data["stages"], tuple(model.patch_size))
        n = len(data["stages"])
        out["stages"] = [_shrink_stage(s, shrink, i == n - 1) for i, s in enumerate(data["stages"])]
        self.recipe = out
        self.buckets = sorted(
            {b for s in out["stages"] for b in ([s["dataset"]] if s.get("dataset") else s["datasets"])}
        )
        self._note_stand_ins(full)

    def _from_init_export(self, out: dict[str, Any], data: dict[str, Any], init_export: str) -> None:
        """The tiny recipe `out` starts from the tiny export of the recipe's architecture: it gives the model, text
        encoder and autoencoder, so only the recipe's runtime options stay; the end line names what stood in."""
        from pipelines.train.model_spec import RUNTIME_FIELDS

        overrides = (data.get("model") or {}).get("overrides") or {}
        out["model"] = {"overrides": {k: v for k, v in overrides.items() if k in RUNTIME_FIELDS}}
        out["init_from"] = init_export
        for key in ("text_encoder", "autoencoder"):
            out.pop(key, None)
        has_image = self.model_cfg.image_dim is not None
        parts = "text encoder, VAE and image encoder" if has_image else "text encoder and VAE"
        self.not_cpu.append(
            f"init_from {data['init_from']}'s weights, {parts} (a tiny export of its architecture stood in)"
        )

    def _note_stand_ins(self, full: Any) -> None:
        """What the CPU rehearsal stands in for or cannot run, as the end line names it."""
        if full.text_encoder.name_or_path != MINILM:
            self.not_cpu.append(f"text encoder {full.text_encoder.name_or_path} (MiniLM stood in)")
        if full.autoencoder.kind != "identity":
            self.not_cpu.append(f"autoencoder {full.autoencoder.kind} {full.autoencoder.path} (pixel space stood in)")
        if full.device == "cuda":
            self.not_cpu += ["flash attention (SDPA's CUDA kernels)", "NCCL collectives"]
            if full.data.pin_memory:
                self.not_cpu.append("pinned-memory host-to-device copies")
        if full.deepspeed.hpz_partition_size > WORKERS:
            self.not_cpu.append(f"ZeRO++ hpZ groups of {full.deepspeed.hpz_partition_size} (rehearsed as {WORKERS})")

    def crash_step(self) -> int:
        """The global step after which the last worker dies: the last stage's second step (its first is
        checkpointed)."""
        return sum(s["steps"] for s in self.recipe["stages"]) - 1


def _model_dict(cfg: Any) -> dict[str, Any]:
    from sora_model.config import to_dict

    return to_dict(cfg)


def write_init_export(plan: Plan, folder: str) -> str:
    """A tiny export of the recipe's architecture (what `init_from` would name), seeded, weights away from zero."""
    import torch

    from sora_model.config import (
        AutoencoderConfig,
        DiTConfig,
        ImageEncoderConfig,
        PipelineConfig,
        SampleConfig,
        TextEncoderConfig,
        from_dict,
    )
    from sora_model.dit import DiT
    from sora_model.pipeline import save_export

    cfg = from_dict(DiTConfig, {**plan.tiny_model, "gradient_checkpointing": False}, "model")
    seed = plan.full.seed
    torch.manual_seed(plan.full.seed)
    model = DiT(cfg)
    g = torch.Generator().manual_seed(plan.full.seed)
    with torch.no_grad():  # a pretrained model's outputs are not zero: neither are this one's
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    last = plan.recipe["stages"][-1]
    config = PipelineConfig(
        model=cfg,
        diffusion=plan.full.diffusion,
        text_encoder=from_dict(TextEncoderConfig, plan.text, "text_encoder"),
        autoencoder=AutoencoderConfig(),
        sample=SampleConfig(num_frames=last["frames"], height=last["height"], width=last["width"]),
        image_encoder=ImageEncoderConfig() if cfg.image_dim is None else write_tiny_image_encoder(folder, seed),
    )
    return save_export(folder, config, model.state_dict())


def write_tiny_image_encoder(export: str, seed: int) -> Any:
    """A random tiny CLIPVisionModel and its CLIPImageProcessor in EXPORT/image_encoder and EXPORT/image_processor
    (where `sora convert` puts a WanImageToVideoPipeline's); returns the export's ImageEncoderConfig (relative)."""
    import torch
    import transformers

    from sora_model.config import ImageEncoderConfig

    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(
        hidden_size=CLIP_DIM,
        intermediate_size=2 * CLIP_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=CLIP_SIZE,
        patch_size=CLIP_PATCH,
    )
    clip = transformers.CLIPVisionModel(config)
    clip.save_pretrained(os.path.join(export, "image_encoder"))
    crop = {"height": CLIP_SIZE, "width": CLIP_SIZE}
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": CLIP_SIZE}, crop_size=crop)
    processor.save_pretrained(os.path.join(export, "image_processor"))
    return ImageEncoderConfig(path="image_encoder", processor_path="image_processor")


def prepare_data(plan: Plan, root: str, shapes: str | None = None) -> list[str]:
    """The synthetic shapes (`sora data synth`, reused from `shapes` when given) prepared into every bucket the
    tiny recipe names, one `sora data prepare` each (prepare gives each video to one bucket; every bucket needs
    them all), with the recipe's patch size and text encoder settings. Returns the prepared folders."""
    from pipelines.cli import main

    shapes = shapes or os.path.join(root, "shapes")
    if not os.path.isfile(os.path.join(shapes, "captions.jsonl")):
        synth = [
            "data",
            "synth",
            "--out",
            shapes,
            "--num-videos",
            str(SYNTH_VIDEOS),
            "--size",
            str(SYNTH_SIZE),
            "--frames",
            str(SYNTH_FRAMES),
            "--no-progress",
        ]
        if main(synth) != 0:
            raise RuntimeError("sora data synth failed")
    init = plan.recipe.get("init_from")
    if init:  # text encoder, autoencoder and patch from the export; it also stores the empty prompt's embedding
        settings = ["--from-export", init] + (["--image-conditioning"] if plan.image else [])
    else:
        settings = [
            "--patch",
            "x".join(map(str, plan.model_cfg.patch_size)),
            "--text-encoder",
            plan.text["name_or_path"],
            "--max-text-length",
            str(plan.text["max_length"]),
            "--text-hidden-layer",
            str(plan.text["hidden_layer"]),
        ]
    folders = []
    for bucket in plan.buckets:
        out = os.path.join(root, bucket)
        args = [
            "data",
            "prepare",
            "--manifest",
            os.path.join(shapes, "captions.jsonl"),
            "--out",
            out,
            "--buckets",
            bucket,
            "--no-progress",
            *settings,
        ]
        if main(args) != 0:
            raise RuntimeError(f"sora data prepare failed for bucket {bucket}")
        folders.append(out)
    return folders


def ran_line(plan: Plan, recipe: Any, seconds: float, crash: int, resumed: int) -> str:
    """The one line: what ran, and what cannot be rehearsed on CPU."""
    ds = recipe.deepspeed
    offload = [n for n, on in (("optimizer", ds.offload_optimizer), ("params", ds.offload_params)) if on]
    stages = ", ".join(f"{s.name} {'+'.join(s.buckets)}" + (" packed" if s.mixed else "") for s in recipe.stages)
    parts = [
        f"{len(recipe.stages)} stages ({stages})",
        f"ZeRO-{ds.zero_stage}" + (f" offload {'+'.join(offload)}" if offload else ""),
        "bf16" if recipe.bf16 else "fp32",
    ]
    if ds.hpz_partition_size > 1:
        parts.append(f"hpZ {ds.hpz_partition_size}")
    if recipe.sequence_parallel_size > 1:
        parts.append(f"sequence parallel {recipe.sequence_parallel_size}")
    if any(s.mixed for s in recipe.stages):
        parts.append("packing")
    if recipe.lora is not None:
        parts.append(f"LoRA r{recipe.lora.rank}")
    if recipe.init_from:
        parts.append("init_from a tiny export")
    model = recipe.model_config()
    if model.in_channels != model.predicted_channels:
        parts.append("image-to-video from the first " + ("and last frames" if model.image_count == 2 else "frame"))
    if recipe.ema.enabled:
        parts.append(f"EMA {recipe.ema.decay:g}" + (" with warm-up" if recipe.ema.warmup else ""))
    if recipe.model_config().gradient_checkpointing:
        parts.append("gradient checkpointing")
    elif recipe.checkpoint_fraction > 0:
        parts.append(f"selective checkpointing {recipe.checkpoint_fraction:g}")
    if recipe.compile:
        parts.append("torch.compile")
    parts.append(f"worker killed after step {crash}, resumed from step {resumed}")
    missing = "; ".join(plan.not_cpu) if plan.not_cpu else "nothing"
    return (
        f"rehearsed {plan.name} in {seconds:.0f}s on {WORKERS} CPU workers: {', '.join(parts)}; "
        f"not rehearsable on CPU: {missing}"
    )


def rehearse(recipe_path: str, run_dir: str | None = None, shapes: str | None = None) -> str:
    """Rehearse a recipe under `run_dir` (a new temporary folder when None); returns the one line, raises on a fault.

    `shapes`: a folder of synthetic videos to reuse (made there when missing), so several rehearsals share one."""
    from pipelines.cli import UserError
    from pipelines.train.recipe import load_recipe, parse_recipe
    from pipelines.train.trainer import CRASH_ENV, TrainOptions, train

    t0 = time.perf_counter()
    if not os.path.isfile(recipe_path):
        raise UserError(f"recipe not found: {recipe_path}")
    with open(recipe_path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
        load_recipe(recipe_path)  # its own one-line error
    root = run_dir or tempfile.mkdtemp(prefix="sora-rehearse-")
    if os.path.exists(root) and os.listdir(root):
        raise UserError(f"--run-dir {root} exists and is not empty; choose a new folder for the rehearsal")
    os.makedirs(root, exist_ok=True)
    init = os.path.join(root, "init") if data.get("init_from") else None
    plan = Plan(data, init)
    if init:
        write_init_export(plan, init)
    path = os.path.join(root, "recipe.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(plan.recipe, f, sort_keys=False)
    recipe = parse_recipe(plan.recipe, path)
    prepared = prepare_data(plan, os.path.join(root, "data"), shapes)
    run = os.path.join(root, "run")
    crash = plan.crash_step()
    saved = os.environ.get(CRASH_ENV)
    os.environ[CRASH_ENV] = str(crash)
    try:
        summary = train(TrainOptions(recipe=path, data=prepared, run_dir=run, workers=WORKERS, device="cpu"))
    finally:
        os.environ.pop(CRASH_ENV) if saved is None else os.environ.__setitem__(CRASH_ENV, saved)
    resumed = _check_run(run, recipe, crash, summary)
    return ran_line(plan, recipe, time.perf_counter() - t0, crash, resumed)


def _check_run(run: str, recipe: Any, crash: int, summary: dict[str, Any]) -> int:
    """The run went where a rehearsal must: every step once, the worker lost and restored, an export at the end."""
    import csv

    if not os.path.isfile(os.path.join(run, ".injected_crash")):
        raise RuntimeError(f"rehearsal: no worker was lost at step {crash}; the kill-and-resume did not run")
    start = json.loads(open(os.path.join(run, "workers.json")).read())["start"]
    if not start.startswith("resumed at step "):
        raise RuntimeError(f"rehearsal: after the lost worker the run did not restart from a checkpoint ({start})")
    with open(os.path.join(run, "metrics.csv"), newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    if steps != list(range(1, recipe.total_steps + 1)):
        raise RuntimeError(f"rehearsal: steps logged {steps}, expected 1..{recipe.total_steps} once each")
    if not summary.get("export"):
        raise RuntimeError("rehearsal: the run wrote no final export")
    return int(start.split()[-1])


def run(args: Any) -> int:
    """`sora train --rehearse`: the flags a rehearsal makes its own are refused in one line."""
    from pipelines import console
    from pipelines.cli import UserError

    for flag, value in (
        ("--data", args.data),
        ("--resume", args.resume),
        ("--stop-at-step", args.stop_at_step),
        ("--workers", args.workers),
        ("--device", args.device),
    ):
        if value:
            raise UserError(f"--rehearse makes its own data, workers ({WORKERS}) and device (cpu); drop {flag}")
    console.start_for(args, "sora train --rehearse")
    line = rehearse(args.recipe, args.run_dir)
    console.say(line)
    return 0
