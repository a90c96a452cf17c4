r"""`sora eval`: generate clips for a prompt list from an export and measure them.

    sora eval --model runs/demo/export --prompts prompts.jsonl --out metrics.json [--seeds 2] \
        [--features i3d.pt --reference data/shapes/videos] [--clip /models/clip-vit-b32] [--save-samples samples/]
    ray job submit --working-dir . -- python -m pipelines.evaluate.run --model /mnt/export --prompts prompts.txt

The prompts file is plain text (one prompt a line, `#` comments) or JSONL with `prompt` and optional
`attributes` ({color, shape, direction}) and `held_out` (true for combinations left out of training).
Prompts of the synthetic grammar are scored by the attribute detector even without `attributes`.

metrics.json (every metric that was not asked for or cannot be computed is null):
    version, model, prompts_file, num_prompts, num_seeds, num_clips, sampling {num_frames, height, width, steps,
    guidance_scale, seed},
    attribute_accuracy {overall, seen, held_out}: each {color, shape, direction, all, n} or null,
    temporal_consistency, frame_change, diversity, fid, fvd, fvd_features, num_reference_clips (with
    --reference), clip_score, clip_temporal_consistency, per_prompt [{prompt, held_out, attributes, diversity,
    clips: [{seed, color, shape, direction, confidence, correct, temporal_consistency, clip_score (with
    --clip)}]}], timing_s {generate, metrics}
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.data import grammar
from pipelines.evaluate import attributes as attr
from pipelines.evaluate import metrics as m

METRICS_VERSION = 1
DEFAULT_SEEDS = 2
"""Two seeds per prompt: the least that measures diversity, half the cost of more."""
DEFAULT_BATCH = 8
"""Clips generated per forward batch: enough to keep a CPU busy without large activations."""
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif")
ACCURACY_GROUPS = ("overall", "seen", "held_out")


@dataclass
class PromptSpec:
    prompt: str
    attributes: dict[str, str] | None = None
    """Ground truth for the detector; None when the prompt is outside the grammar."""
    held_out: bool = False


def _spec(item: str | Mapping | PromptSpec, where: str) -> PromptSpec:
    if isinstance(item, PromptSpec):
        return item
    if isinstance(item, str):
        return PromptSpec(item, grammar.parse_caption(item))
    if not isinstance(item, Mapping) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
        raise ValueError(f"{where}: each entry needs a non-empty string 'prompt'")
    truth = item.get("attributes")
    if truth is not None:
        missing = [a for a in grammar.ATTRIBUTES if a not in truth]
        if missing:
            raise ValueError(f"{where}: 'attributes' lacks {', '.join(missing)}")
        truth = {a: str(truth[a]) for a in grammar.ATTRIBUTES}
    else:
        truth = grammar.parse_caption(item["prompt"])
    return PromptSpec(item["prompt"], truth, bool(item.get("held_out", False)))


def load_prompts(path: str) -> list[PromptSpec]:
    """Read a prompts file: text lines, or JSONL objects with `prompt` [+ `attributes`, `held_out`]."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"prompts file not found: {path} (--prompts takes a text file, one prompt a line, or JSONL)"
        )
    with open(path, encoding="utf-8") as f:
        lines = [(k + 1, line.strip()) for k, line in enumerate(f)]
    lines = [(k, line) for k, line in lines if line and not line.startswith("#")]
    jsonl = path.endswith(".jsonl") or (lines and lines[0][1].startswith("{"))
    specs = []
    for k, line in lines:
        if jsonl:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{k} is not valid JSON: {err.msg}") from None
            specs.append(_spec(row, f"{path}:{k}"))
        else:
            specs.append(_spec(line, f"{path}:{k}"))
    if not specs:
        raise ValueError(f"{path} holds no prompts")
    return specs


def _reference_clips(folder: str, num_frames: int, height: int, width: int) -> np.ndarray:
    """Every video under `folder` as (N, T, H, W, 3) uint8, resized to the generated size."""
    import torch
    import torch.nn.functional as F

    from sora_model.video import read_video

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"reference folder not found: {folder} (--reference takes a folder of videos)")
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
    if len(paths) < 2:
        raise ValueError(
            f"--reference {folder} holds {len(paths)} videos ({', '.join(VIDEO_EXTENSIONS)}); FID/FVD need at least 2"
        )
    clips = []
    for p in paths:
        v = read_video(str(p))[:num_frames]  # (T', h, w, 3)
        if len(v) < num_frames:  # short reference clips hold their last frame
            v = np.concatenate([v, np.repeat(v[-1:], num_frames - len(v), axis=0)])
        if v.shape[1:3] != (height, width):
            x = torch.from_numpy(v).permute(0, 3, 1, 2).float()  # (T, 3, h, w)
            x = F.interpolate(x, size=(height, width), mode="area" if v.shape[1] >= height else "bilinear")
            v = x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        clips.append(v)
    return np.stack(clips)  # (N, T, H, W, 3)


def _accuracy_table(specs: Sequence[PromptSpec], dets: Sequence[Sequence[attr.Detection]]) -> dict[str, dict | None]:
    groups: dict[str, tuple[list, list]] = {g: ([], []) for g in ACCURACY_GROUPS}
    marked = any(s.held_out for s in specs)
    for spec, ds in zip(specs, dets, strict=True):
        if spec.attributes is None:
            continue
        names = ["overall"] + (["held_out" if spec.held_out else "seen"] if marked else [])
        for name in names:
            groups[name][0].extend(ds)
            groups[name][1].extend([spec.attributes] * len(ds))
    return {g: (attr.score(d, t) if d else None) for g, (d, t) in groups.items()}


def evaluate_export(
    export_dir: str,
    prompts: str | Sequence[str | Mapping | PromptSpec],
    *,
    seeds: int = DEFAULT_SEEDS,
    seed: int = 0,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = DEFAULT_BATCH,
    features: str | None = None,
    reference: str | None = None,
    clip: str | None = None,
    save_samples: str | None = None,
    out: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    pipeline=None,
    return_clips: bool = False,
) -> dict | tuple[dict, np.ndarray]:
    """Generate `seeds` clips per prompt (seeds seed, seed+1, ...) from an export and measure them.

    `prompts` is a prompts-file path or a list of prompts / {prompt, attributes, held_out} dicts.
    `pipeline` reuses an already loaded TextToVideoPipeline (then `export_dir` is only recorded).
    `return_clips`: also return the generated clips, (prompts, seeds, T, H, W, 3) uint8, for a caller that shows them.
    Returns the metrics dict (the module docstring lists its keys); writes it to `out` when given.
    Missing local files (export, prompts, features, reference, CLIP) raise FileNotFoundError before
    any clip is generated.
    """
    specs = _specs(prompts, seeds, batch_size, features, reference)
    extractor, scorer, pipeline = _load_local(export_dir, features, reference, clip, device, pipeline)
    sampling = _sampling(pipeline, num_frames, height, width, steps, guidance_scale, seed)
    # 1. Generate: every (prompt, seed) pair, batched; a clip does not depend on its batch-mates.
    jobs = [(k, seed + j) for k in range(len(specs)) for j in range(seeds)]
    t0 = time.perf_counter()
    clips = _generate(pipeline, specs, jobs, sampling, batch_size, progress)  # (P*S, T, H, W, 3)
    t_generate = time.perf_counter() - t0
    per_prompt_clips = clips.reshape(len(specs), seeds, *clips.shape[1:])  # (P, S, T, H, W, 3)

    # 2. Measure.
    t0 = time.perf_counter()
    result = {
        "version": METRICS_VERSION,
        "model": str(export_dir),
        "prompts_file": str(prompts) if isinstance(prompts, (str, os.PathLike)) else None,
        "num_prompts": len(specs),
        "num_seeds": seeds,
        "num_clips": len(jobs),
        "sampling": sampling,
    }
    result.update(_measure(specs, per_prompt_clips, seed, extractor, reference, scorer, sampling))
    result["timing_s"] = {"generate": round(t_generate, 3), "metrics": round(time.perf_counter() - t0, 3)}

    _write(result, specs, per_prompt_clips, seed, save_samples, out, fps=pipeline.config.sample.fps)
    return (result, per_prompt_clips) if return_clips else result


def _load_local(export_dir, features, reference, clip, device, pipeline) -> tuple[Any, Any, Any]:
    """(feature extractor, CLIP scorer, pipeline): everything local is read first, so a missing file fails in a
    second, not after generation."""
    from pipelines.evaluate.clip import ClipScorer
    from pipelines.evaluate.features import load_feature_extractor

    extractor = load_feature_extractor(features, device=device) if features else None
    if reference and not os.path.isdir(reference):
        raise FileNotFoundError(f"reference folder not found: {reference} (--reference takes a folder of videos)")
    scorer = ClipScorer(clip, device=device) if clip else None
    if pipeline is None:
        from sora_model.pipeline import TextToVideoPipeline

        pipeline = TextToVideoPipeline.load(export_dir, device=device)
    return extractor, scorer, pipeline


def _sampling(pipeline, num_frames, height, width, steps, guidance_scale, seed: int) -> dict[str, Any]:
    """The sampling options of every clip: the arguments given, else the export's defaults."""
    s, diffusion = pipeline.config.sample, pipeline.config.diffusion
    return {
        "num_frames": num_frames or s.num_frames,
        "height": height or s.height,
        "width": width or s.width,
        "steps": steps or diffusion.num_sampling_steps,
        "guidance_scale": diffusion.guidance_scale if guidance_scale is None else guidance_scale,
        "seed": seed,
    }


def _write(result: dict, specs, per_prompt_clips, seed: int, save_samples: str | None, out: str | None, fps) -> None:
    """The sample clips into `save_samples` (recorded in `result`), then the metrics JSON into `out`."""
    if save_samples:
        _save_samples(save_samples, specs, per_prompt_clips, seed, fps=fps)
        result["samples_dir"] = str(save_samples)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2, allow_nan=False, default=_json_default)


def _specs(prompts, seeds: int, batch_size: int, features: str | None, reference: str | None) -> list[PromptSpec]:
    """The prompts to evaluate, after the argument checks that need no file."""
    specs = load_prompts(prompts) if isinstance(prompts, (str, os.PathLike)) else [_spec(p, "prompts") for p in prompts]
    if not specs:
        raise ValueError("no prompts to evaluate")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if bool(features) != bool(reference):
        raise ValueError(
            "FID/FVD need both --features (a feature network file) and --reference (a folder of real videos)"
        )
    return specs


def _generate(
    pipeline, specs: Sequence[PromptSpec], jobs: list[tuple[int, int]], sampling: dict, batch_size: int, progress: bool
) -> np.ndarray:
    """Every (prompt index, seed) job's clip, in job order: (len(jobs), T, H, W, 3) uint8."""
    from pipelines import console

    clips = np.empty((len(jobs), sampling["num_frames"], sampling["height"], sampling["width"], 3), np.uint8)
    with console.progress(total=len(jobs), unit="clip", desc="eval: generate", disable=not progress) as bar:
        for i in range(0, len(jobs), batch_size):
            chunk = jobs[i : i + batch_size]
            clips[i : i + len(chunk)] = pipeline(
                [specs[k].prompt for k, _ in chunk],
                num_frames=sampling["num_frames"],
                height=sampling["height"],
                width=sampling["width"],
                steps=sampling["steps"],
                guidance_scale=sampling["guidance_scale"],
                seed=[sd for _, sd in chunk],
            )
            bar.update(len(chunk))
    return clips


def _measure(specs, per_prompt_clips: np.ndarray, seed: int, extractor, reference, scorer, sampling: dict) -> dict:
    """Every metric of the generated clips (P, S, T, H, W, 3): attributes, consistency, diversity, FID/FVD, CLIP."""
    seeds = per_prompt_clips.shape[1]
    clips = per_prompt_clips.reshape(-1, *per_prompt_clips.shape[2:])  # (P*S, T, H, W, 3)
    dets = [[attr.detect(c) for c in group] for group in per_prompt_clips]
    consistency = [[m.temporal_consistency(c) for c in group] for group in per_prompt_clips]
    diversities = [m.diversity(group) if seeds >= 2 else None for group in per_prompt_clips]
    result: dict = {
        "attribute_accuracy": _accuracy_table(specs, dets),
        "temporal_consistency": float(np.mean(consistency)),
        "frame_change": float(np.mean([m.frame_change(c) for c in clips])),
        "diversity": m.mean_over([d for d in diversities if d is not None]),
        "fid": None,
        "fvd": None,
        "fvd_features": None,
        "clip_score": None,
        "clip_temporal_consistency": None,
    }
    if extractor is not None:
        result.update(_reference_metrics(extractor, reference, clips, sampling))
    clip_scores: list[float] = []
    if scorer is not None:
        prompts_per_clip = [spec.prompt for spec in specs for _ in range(seeds)]
        clip_scores, clip_consistency = scorer.score(clips, prompts_per_clip)
        result["clip_score"] = float(np.mean(clip_scores))
        result["clip_temporal_consistency"] = float(np.mean(clip_consistency))
    result["per_prompt"] = [
        {
            "prompt": spec.prompt,
            "held_out": spec.held_out,
            "attributes": spec.attributes,
            "diversity": diversities[k],
            "clips": [
                {
                    "seed": seed + j,
                    **d.attributes(),
                    "confidence": round(d.confidence, 4),
                    "correct": (d.attributes() == spec.attributes) if spec.attributes else None,
                    "temporal_consistency": consistency[k][j],
                    **({"clip_score": clip_scores[k * seeds + j]} if clip_scores else {}),
                }
                for j, d in enumerate(dets[k])
            ],
        }
        for k, spec in enumerate(specs)
    ]
    return result


def _reference_metrics(extractor, reference: str, clips: np.ndarray, sampling: dict) -> dict:
    """FID over frames and FVD over clips against the reference folder's videos, at the generated size."""
    ref = _reference_clips(reference, sampling["num_frames"], sampling["height"], sampling["width"])
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731 - (N, T, H, W, 3) -> (N*T, H, W, 3)
    out: dict = {
        "fid": m.frechet_distance_from_features(
            extractor.frame_features(flat(clips)), extractor.frame_features(flat(ref))
        )
    }
    if len(clips) >= 2:
        out["fvd"] = m.frechet_distance_from_features(extractor.clip_features(clips), extractor.clip_features(ref))
        out["fvd_features"] = "video" if extractor.takes_video else "frame-stats"
    out["num_reference_clips"] = len(ref)
    return out


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _save_samples(folder: str, specs: Sequence[PromptSpec], clips: np.ndarray, seed: int, fps: float) -> None:
    """One GIF per clip (`PPP_sSEED_caption.gif`) and a grid GIF of every clip (rows = prompts)."""
    from sora_model.video import make_grid, write_video

    os.makedirs(folder, exist_ok=True)
    for k, spec in enumerate(specs):
        slug = "".join(c if c.isalnum() else "_" for c in spec.prompt.lower())[:60].strip("_")
        for j, clip in enumerate(clips[k]):
            write_video(os.path.join(folder, f"{k:03d}_s{seed + j}_{slug}.gif"), clip, fps=fps)
    p, s = clips.shape[:2]
    write_video(os.path.join(folder, "grid.gif"), make_grid(clips.reshape(p * s, *clips.shape[2:]), ncols=s), fps=fps)


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4g}"
    return str(x)


def format_table(result: Mapping) -> str:
    """The headline numbers as an aligned plain-text table."""
    lines = []
    acc = result.get("attribute_accuracy") or {}
    rows = [(g, acc[g]) for g in ACCURACY_GROUPS if acc.get(g)]
    if rows:
        lines.append(f"{'attribute accuracy':<20}{'n':>6}{'color':>8}{'shape':>8}{'direction':>11}{'all':>8}")
        for g, a in rows:
            lines.append(
                f"  {g:<18}{a['n']:>6}{a['color']:>8.1%}{a['shape']:>8.1%}{a['direction']:>11.1%}{a['all']:>8.1%}"
            )
        lines.append("")
    for key in (
        "temporal_consistency",
        "frame_change",
        "diversity",
        "fid",
        "fvd",
        "clip_score",
        "clip_temporal_consistency",
    ):
        lines.append(f"{key:<28}{_fmt(result.get(key)):>12}")
    lines.append(
        f"{'clips':<28}{result['num_clips']:>12}  ({result['num_prompts']} prompts x {result['num_seeds']} seeds)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.evaluate.run ...`: the same as `sora eval ...` (for `ray job submit`)."""
    from pipelines.cli import main as cli_main

    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
