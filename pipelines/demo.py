"""`sora demo`: the embedded default, end to end on one machine with no GPU and no network.

    sora demo                           # sized for 15 minutes on 2 CPU cores; writes ./demo-output/
    sora demo --minutes 30 --out /tmp/demo
    ray job submit --working-dir . -- python -m pipelines.demo --out /mnt/shared/demo

Steps, each showing progress and each skipped on a second run when its output is already there
with the same settings (a changed `--minutes` retrains, a finished run is reused):

    1. synth     the shapes dataset, holding out some colour/shape/direction combinations
    2. prepare   Ray Data: one prepared folder per curriculum bucket (images, short clips, clips)
    3. train     Ray Train + DeepSpeed ZeRO-3 on 2 workers through cluster/recipes/demo-cpu.yaml
                 (stage steps scaled by --minutes), exporting OUT/run/export
    4. evaluate  attribute accuracy (seen / held-out), temporal consistency, diversity
    5. samples   the first seed's clip of seen and held-out prompts, labelled, as GIF, PNG and MP4
    6. serve     the Serve app on the export, one HTTP request through the OpenAI-style API, shut down
    7. report    OUT/report/report.html (open it) and report.md: the numbers, the labelled samples, the loss curve

The terminal shows one line per step and progress bars; what Ray, DeepSpeed and torch print goes to
OUT/logs/demo.log (`--verbose` shows it instead). A failed step names the log and shows its last lines;
Ctrl-C stops with one line, and the same command resumes (training from its last checkpoint).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RECIPE = Path(__file__).resolve().parents[1] / "cluster" / "recipes" / "demo-cpu.yaml"
DEFAULT_MINUTES = 15.0
"""The budget demo-cpu.yaml's step counts are sized for on 2 cores; --minutes scales training steps by minutes/15."""
FIXED_MINUTES = 3.0
"""Time the non-training steps take on 2 cores (Ray start, synth, prepare, DeepSpeed start, eval, serve)."""
HELD_OUT = (
    # Left out of training; every colour, shape and direction still appears in other combinations.
    "red triangle up",
    "green circle down",
    "blue square left",
    "yellow triangle right",
    "magenta square down",
    "cyan circle up",
    "white square right",
    "blue triangle left",
)
VIDEOS_PER_COMBINATION = 8
VIDEO_FRAMES = 8
"""Each video crosses 3/4 of the frame in 8 frames (2 px a frame): the long stage trains on whole videos,
where the motion is clear enough to learn and to judge."""
CLIPS_PER_VIDEO = 1
"""Every bucket takes each video's first frames: a caption describes a whole video (the shape starts by the
edge it leaves), so a clip cut from the middle, or a middle frame as an image, would teach the model that
where the shape is at time 0 does not depend on the direction, and it then draws still shapes."""
SEEN_EVAL_PROMPTS = 24
EVAL_SEEDS = 3
LOG = Path("logs") / "demo.log"
"""Under OUT: what Ray, DeepSpeed and torch print (appended run after run); the terminal shows our lines only."""


def _log(msg: str) -> None:
    from pipelines import console

    console.say(f"[sora demo] {msg}")


class Steps:
    """Markers in OUT/.steps/<name>.json: a step is done when its marker holds the same settings."""

    def __init__(self, out: Path):
        self.dir = out / ".steps"
        self.dir.mkdir(parents=True, exist_ok=True)

    def done(self, name: str, settings: dict[str, Any]) -> bool:
        path = self.dir / f"{name}.json"
        return path.is_file() and json.loads(path.read_text()).get("settings") == settings

    def mark(self, name: str, settings: dict[str, Any], result: dict[str, Any] | None = None) -> None:
        (self.dir / f"{name}.json").write_text(json.dumps({"settings": settings, "result": result or {}}, indent=2))

    def result(self, name: str) -> dict[str, Any]:
        path = self.dir / f"{name}.json"
        return json.loads(path.read_text()).get("result", {}) if path.is_file() else {}

    def forget(self, *names: str) -> None:
        for name in names:
            (self.dir / f"{name}.json").unlink(missing_ok=True)


def scaled_recipe(recipe_path: Path, minutes: float | None, out: Path, seed: int | None = None) -> tuple[Path, Any]:
    """The recipe, with every stage's steps scaled to the training share of `minutes` (None: as written) and its
    seed replaced by `seed` (None: as written)."""
    import yaml

    from pipelines.train.recipe import load_recipe, recipe_to_dict

    recipe = load_recipe(str(recipe_path))
    data = recipe_to_dict(recipe)
    if minutes is not None:
        scale = max(0.05, (minutes - FIXED_MINUTES) / (DEFAULT_MINUTES - FIXED_MINUTES))
        for stage in data["stages"]:
            stage["steps"] = max(10, round(stage["steps"] * scale))
            stage["checkpoint_every"] = max(10, stage["steps"] // 2)
    if seed is not None:
        data["seed"] = seed
    path = out / "recipe.yaml"
    note = f"scaled to --minutes {minutes:g}" if minutes is not None else "as written"
    note += f", seed {seed}" if seed is not None else ""
    path.write_text(f"# {recipe_path.name} {note}\n" + yaml.safe_dump(data, sort_keys=False))
    return path, load_recipe(str(path))


def eval_prompts() -> list[dict[str, Any]]:
    from pipelines.data import grammar

    held = [tuple(c.split()) for c in HELD_OUT]
    seen = [c for c in grammar.all_combinations() if c not in held]
    stride = max(1, len(seen) // SEEN_EVAL_PROMPTS)
    picked = seen[::stride][:SEEN_EVAL_PROMPTS]
    rows = [{"prompt": grammar.caption(*c), "held_out": False} for c in picked]
    rows += [{"prompt": grammar.caption(*c), "held_out": True} for c in held]
    return rows


def serve_smoke(export: str, out: Path, port: int) -> dict[str, Any]:
    """Start the Serve app on the export, create one video over HTTP, download it, shut Serve down."""
    import httpx
    from ray import serve

    from pipelines import console
    from pipelines.serve.app import app_builder

    store = out / "serve-store"
    t0 = time.perf_counter()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder({"model": export, "store": str(store)}), name="sora-demo", route_prefix="/", blocking=False)
    started = time.perf_counter() - t0
    base = f"http://127.0.0.1:{port}/v1"
    try:
        t1 = time.perf_counter()
        with httpx.Client(
            timeout=60, follow_redirects=True
        ) as client:  # a folder store answers a 307 to its file server
            video = (
                client.post(f"{base}/videos", json={"prompt": "a red circle moving right", "seed": 0})
                .raise_for_status()
                .json()
            )
            with console.progress(total=100, desc="serve: one request", unit="%") as bar:
                while video["status"] in ("queued", "in_progress"):
                    time.sleep(0.5)
                    video = client.get(f"{base}/videos/{video['id']}").raise_for_status().json()
                    bar.update(max(0, min(100, int(video.get("progress") or 0)) - bar.n))
                if video["status"] == "completed":
                    bar.update(100 - bar.n)
            if video["status"] != "completed":
                raise RuntimeError(f"the served request failed: {video.get('error')}")
            content = client.get(f"{base}/videos/{video['id']}/content").raise_for_status().content
        path = out / "report" / "served.mp4"
        path.write_bytes(content)
        return {
            "status": video["status"],
            "id": video["id"],
            "bytes": len(content),
            "file": str(path),
            "startup_s": round(started, 1),
            "request_s": round(time.perf_counter() - t1, 2),
        }
    finally:
        serve.shutdown()


def run_demo(
    out: Path,
    minutes: float,
    workers: int,
    serve_port: int | None,
    recipe_path: Path | None = None,
    videos_per_combination: int = VIDEOS_PER_COMBINATION,
    seed: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) every step; `recipe_path` replaces demo-cpu.yaml and is then not scaled by `minutes`;
    `seed` replaces the recipe's training seed (initialisation, data order, noise and caption dropout)."""
    from pipelines.data.runtime import ensure_ray

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "report").mkdir(exist_ok=True)
    steps = Steps(out)
    ensure_ray()
    summary: dict[str, Any] = {
        "minutes": minutes,
        "command": "sora " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["demo"] else "sora demo",
    }
    shapes = _synth_step(out, steps, summary, videos_per_combination)  # 1
    recipe_path, recipe = scaled_recipe(recipe_path or RECIPE, None if recipe_path else minutes, out, seed)
    folders, prepare_settings = _prepare_step(out, steps, summary, shapes, recipe)  # 2
    export = _train_step(out, steps, summary, recipe_path, recipe, folders, prepare_settings, workers)  # 3
    _eval_step(out, summary, export)  # 4 + 5
    if serve_port is not None:  # 6
        _log(f"6/7 serving the export with Ray Serve on port {serve_port} and making one request")
        summary["serve"] = serve_smoke(str(export), out, serve_port)
    else:
        _log("6/7 serving: skipped")
    summary["seconds"] = time.perf_counter() - t_start
    summary["workers"] = workers
    summary["seed"] = recipe.seed
    _report_step(out, summary, export)  # 7
    return summary


def _synth_step(out: Path, steps: Steps, summary: dict[str, Any], videos_per_combination: int) -> Path:
    """1. Synthesise the shapes dataset (held-out combinations left out); returns its folder."""
    from pipelines.data import grammar
    from pipelines.data.synth import synth

    num_videos = videos_per_combination * (len(grammar.all_combinations()) - len(HELD_OUT))
    synth_settings = {"videos": num_videos, "frames": VIDEO_FRAMES, "held_out": list(HELD_OUT)}
    shapes = out / "data" / "shapes"
    if not steps.done("synth", synth_settings):
        _log(f"1/7 synthesising {num_videos} videos, holding out {len(HELD_OUT)} combinations")
        steps.forget("prepare", "train")
        shutil.rmtree(shapes, ignore_errors=True)
        synth(str(shapes), num_videos, size=32, frames=VIDEO_FRAMES, fps=8, seed=0, exclude=list(HELD_OUT))
        steps.mark("synth", synth_settings)
    else:
        _log("1/7 synthetic videos: reusing " + str(shapes))
    summary["synth"] = synth_settings
    return shapes


def _prepare_step(
    out: Path, steps: Steps, summary: dict[str, Any], shapes: Path, recipe: Any
) -> tuple[dict[str, Path], dict]:
    """2. Prepare one folder per bucket the recipe's stages use; returns the folders and the step's settings."""
    from pipelines.data.prepare import Bucket, PrepareOptions, prepare

    buckets = sorted({b for s in recipe.stages for b in s.buckets})
    patch = tuple(recipe.model_config().patch_size)  # tokens are cut at prepare time, with the model's own patch
    prepare_settings = {
        "buckets": buckets,
        "synth": summary["synth"],
        "clips_per_video": CLIPS_PER_VIDEO,
        "text_encoder": recipe.text_encoder.embedding_settings(),
        "patch": list(patch),
    }
    folders = {b: out / "data" / b for b in buckets}
    if not steps.done("prepare", prepare_settings):
        steps.forget("train")
        counts = {}
        for i, name in enumerate(buckets, 1):
            t_bucket = time.perf_counter()
            # progress=False: a bucket takes seconds here, and a mid-run count line would read as the result
            result = prepare(
                PrepareOptions(
                    manifest=str(shapes / "captions.jsonl"),
                    out=str(folders[name]),
                    buckets=[Bucket.parse(name)],
                    clips_per_video=CLIPS_PER_VIDEO,
                    overwrite=True,
                    text_encoder=recipe.text_encoder,
                    progress=False,
                    patch=patch,
                )
            )
            counts[name] = result.get("num_clips", 0)
            _log(
                f"2/7 prepared bucket {name} with Ray Data ({i}/{len(buckets)}): {counts[name]} clips, "
                f"{result.get('num_rejected', 0)} rejected, {time.perf_counter() - t_bucket:.0f} s"
            )
        steps.mark("prepare", prepare_settings, counts)
    else:
        _log("2/7 prepared data: reusing " + ", ".join(map(str, folders.values())))
    summary["prepare"] = steps.result("prepare")
    return folders, prepare_settings


def _train_step(
    out: Path,
    steps: Steps,
    summary: dict[str, Any],
    recipe_path: Path,
    recipe: Any,
    folders: dict[str, Path],
    prepare_settings: dict,
    workers: int,
) -> Path:
    """3. Train (or resume, or reuse) the recipe on the prepared folders; returns the export folder."""
    from pipelines.train.trainer import TrainOptions, train
    from sora_model.export_io import CONFIG_FILE

    run_dir = out / "run"
    export = run_dir / "export"
    train_settings = {"recipe": recipe_path.read_text(), "workers": workers, "data": prepare_settings}
    if not steps.done("train", train_settings) or not (export / CONFIG_FILE).is_file():
        resume = (run_dir / "ray_results" / recipe.name).is_dir() and steps.result("train_started") == train_settings
        if not resume:
            shutil.rmtree(run_dir, ignore_errors=True)
        _log(
            f"3/7 training {recipe.total_steps} steps with Ray Train + DeepSpeed ZeRO-3 on {workers} workers"
            + (" (resuming)" if resume else "")
        )
        steps.mark("train_started", {}, train_settings)
        result = train(
            TrainOptions(
                recipe=str(recipe_path),
                data=[str(folders[b]) for b in sorted(folders)],
                run_dir=str(run_dir),
                workers=workers,
                resume=resume,
            )
        )
        steps.mark("train", train_settings, {"seconds": result["seconds"]})
    else:
        _log("3/7 trained model: reusing " + str(export))
    metrics = _read_metrics(run_dir / "metrics.csv")
    summary["train"] = {
        "seconds": steps.result("train").get("seconds", 0.0),
        "steps": recipe.total_steps,
        "stages": [f"{s.name} ({s.frames}x{s.resolution}², {s.steps} steps)" for s in recipe.stages],
        "first_loss": float(np.mean(metrics[:10])) if metrics else float("nan"),
        "final_loss": float(np.mean(metrics[-20:])) if metrics else float("nan"),
    }
    summary["recipe"] = str(recipe_path)
    summary["export"] = str(export)
    if (run_dir / "loss.png").is_file():
        shutil.copyfile(run_dir / "loss.png", out / "report" / "loss.png")
    return export


def _eval_step(out: Path, summary: dict[str, Any], export: Path) -> None:
    """4 + 5. Evaluate, then show the first seed's clip of some prompts (eval generated them; nothing is generated
    twice)."""
    from pipelines.demo_report import showcase
    from pipelines.evaluate.run import evaluate_export
    from sora_model.pipeline import TextToVideoPipeline

    pipe = TextToVideoPipeline.load(str(export))
    prompts = eval_prompts()
    _log(f"4/7 evaluating {len(prompts)} prompts x {EVAL_SEEDS} seeds")
    summary["eval"], clips = evaluate_export(
        str(export),
        prompts,
        seeds=EVAL_SEEDS,
        pipeline=pipe,
        out=str(out / "report" / "metrics.json"),
        return_clips=True,
    )
    shown = [k for k, p in enumerate(prompts) if not p["held_out"]][:8] + [
        k for k, p in enumerate(prompts) if p["held_out"]
    ]
    _log("5/7 writing the labelled samples of seen and held-out prompts")
    verdicts = [
        {a: summary["eval"]["per_prompt"][k]["clips"][0][a] for a in ("color", "shape", "direction")} for k in shown
    ]
    summary["samples"] = showcase(
        clips[shown, 0],
        [prompts[k]["prompt"] for k in shown],
        [prompts[k]["held_out"] for k in shown],
        out / "report",
        judged=verdicts,
    )


def _report_step(out: Path, summary: dict[str, Any], export: Path) -> None:
    """7. Write report.html, report.md and summary.json, and print the page's path with the headline figures."""
    from pipelines import console
    from pipelines.demo_report import write_html, write_report

    summary["log"] = str(console.log_path() or "")
    report = write_report(out, summary)
    page = write_html(out, summary)
    (out / "report" / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    acc = summary["eval"]["attribute_accuracy"]
    _log(f"7/7 report: {page} (open it in a browser; numbers also in {report.name})")
    for key in ("seen", "held_out"):
        a = acc.get(key) or {}
        if a:
            _log(
                f"    {key:8s}: colour {a['color']:.0%}  shape {a['shape']:.0%}  direction {a['direction']:.0%}  all "
                f"{a['all']:.0%}"
            )
    _log(
        f"    samples: {summary['samples']['gif']}, {summary['samples']['png']}; loss curve: "
        f"{out / 'report' / 'loss.png'}"
    )
    _log(f"    export:  {export}")


def _read_metrics(path: Path) -> list[float]:
    import csv

    if not path.is_file():
        return []
    with open(path) as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r.get("loss") not in (None, "", "nan")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-output", help="output folder (default %(default)s); a second run reuses it")
    p.add_argument(
        "--minutes",
        type=float,
        default=DEFAULT_MINUTES,
        help="time budget on 2 CPU cores (default %(default)s); scales the training steps",
    )
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port for the serving step (default %(default)s)")
    p.add_argument("--no-serve", action="store_true", help="skip the serving step")
    p.add_argument("--recipe", help="train this recipe as written instead of demo-cpu.yaml scaled by --minutes")
    p.add_argument(
        "--videos-per-combination",
        type=int,
        default=VIDEOS_PER_COMBINATION,
        help="synthetic videos per seen colour/shape/direction combination (default %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="training seed (default: the recipe's, 0 in demo-cpu.yaml); the data and eval prompts stay the same",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show what Ray, DeepSpeed and torch print here instead of in OUT/logs/demo.log",
    )


def run(args: argparse.Namespace) -> int:
    from pipelines.cli import UserError

    if args.minutes < FIXED_MINUTES + 1:
        raise UserError(
            f"--minutes must be at least {FIXED_MINUTES + 1:g} (the fixed steps alone take ~{FIXED_MINUTES:g}), got "
            f"{args.minutes:g}"
        )
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.videos_per_combination < 1:
        raise UserError(f"--videos-per-combination must be >= 1, got {args.videos_per_combination}")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must be in [0, 2**32), got {args.seed}")
    recipe = Path(args.recipe).resolve() if args.recipe else None
    if recipe is not None and not recipe.is_file():
        raise UserError(f"recipe not found: {args.recipe}")
    from pipelines import console

    out = Path(args.out).resolve()
    console.start(out / LOG, verbose=args.verbose, command="sora demo")
    run_demo(
        out,
        args.minutes,
        args.workers,
        None if args.no_serve else args.port,
        recipe,
        args.videos_per_combination,
        args.seed,
    )
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="the embedded default end to end: synth, prepare, train, generate, eval, serve"
    )
    add_arguments(p)
    p.set_defaults(func=run, resume_hint="run the same command again to resume")


if __name__ == "__main__":
    from pipelines.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
