"""Run the benchmarks and write benchmarks/results.json and benchmarks/RESULTS.md.

    python -m benchmarks.run                 # every figure, full sizes
    python -m benchmarks.run --quick         # sizes for a 2-core machine (`make bench`)
    python -m benchmarks.run --quick --only dit_infer_tokens_ratio_vs_latte

Each figure runs in its own subprocess (`python -m benchmarks.bench_<figure>`), so one figure's Ray
cluster or torch threads never leak into the next. With --only, the other figures already in
results.json are kept. A failed script is recorded as not measured; timings never fail the run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results.json"
RESULTS_MD = HERE / "RESULTS.md"
FIGURES = (
    "data_speedup_vs_decord_loop",
    "prepare_driver_rss_ratio_50k_over_500",
    "dit_train_tokens_ratio_vs_latte",
    "dit_infer_tokens_ratio_vs_latte",
    "frames_scaling_64_over_8",
    "zero3_param_mem_ratio",
    "sampler_nfe_for_ddpm_quality",
    "serve_batching_throughput_ratio",
    "serve_overhead_p50",
    "serve_poll_latency_ratio_100k_over_100",
    "serve_download_peak_rss_mb",
    "compile_train_step_ratio",
    "packed_vs_padded_tokens_ratio",
    "loader_feed_ratio",
    "resume_seconds_ratio_late_over_early",
    "zero3_step_ratio",
    "prepare_resume_exact",
    "bf16_fp32_loss_gap",
    "rehearse_seconds",
    "wan_forward_ratio_vs_diffusers",
    "caption_bytes_per_row",
    "lora_request_overhead",
    "step_cache_speedup",
    "step_cache_accuracy_drop",
    "decode_at_target_speedup",
    "parallel_sampling_overhead_cpu",
    "load_peak_rss_over_bf16_bytes",
)
GOALS = {
    "loader_feed_ratio": ">= 0.95",
    "resume_seconds_ratio_late_over_early": "<= 1.2",
    "data_speedup_vs_decord_loop": ">= 1.6",
    "prepare_driver_rss_ratio_50k_over_500": "<= 1.3",
    "dit_train_tokens_ratio_vs_latte": ">= 1.3",
    "dit_infer_tokens_ratio_vs_latte": ">= 1.3",
    "frames_scaling_64_over_8": "<= 10",
    "zero3_param_mem_ratio": "<= 0.55",
    "sampler_nfe_for_ddpm_quality": "<= 25",
    "serve_batching_throughput_ratio": ">= 1.5",
    "serve_overhead_p50": "<= 1.10",
    "serve_poll_latency_ratio_100k_over_100": "<= 1.2",
    "serve_download_peak_rss_mb": "<= 64",
    "compile_train_step_ratio": ">= 1.0",
    "packed_vs_padded_tokens_ratio": ">= 1.3",
    "zero3_step_ratio": ">= 1.2",
    "prepare_resume_exact": ">= 1.0",
    "bf16_fp32_loss_gap": "<= 0.01",
    "rehearse_seconds": "<= 90",
    "wan_forward_ratio_vs_diffusers": ">= 1.2",
    "caption_bytes_per_row": "<= 0.2",
    "step_cache_speedup": ">= 1.6",
    "step_cache_accuracy_drop": "<= 2.0",
    "lora_request_overhead": "<= 1.05",
    "decode_at_target_speedup": ">= 2",
    "parallel_sampling_overhead_cpu": ">= 1.0",
    "load_peak_rss_over_bf16_bytes": "<= 1.3",
}
GPU_FIGURES = (
    (
        "gpu_dit_l_tokens_per_s_bf16",
        "tokens/s of a DiT-L/2-sized training step, bf16, 9,216 tokens/sample (faster of eager and compiled)",
    ),
    ("gpu_dit_l_mfu_bf16", "model FLOPs utilisation of the same (issue 14 goal >= 0.45)"),
    ("gpu_dit_l_mfu_bf16_eager", "the same, eager (no torch.compile)"),
    ("gpu_zero3_vs_zero2_vs_ddp_step_time", "train-step time, ZeRO-3 vs ZeRO-2 vs DDP (needs >= 2 GPUs)"),
    ("gpu_generate_16x256x256_seconds", "seconds to generate 16 frames at 256x256 (DiT-L/8, 30 steps, CFG)"),
    (
        "gpu_flash_attention_every_scope",
        "`pytest -m gpu`: SDPA's flash kernel in every attention scope and packed batches",
    ),
    ("gpu_dit_xl_64k_tokens_peak_gib", "peak GiB, DiT-XL/2 forward + backward at 65,536 tokens, bf16, checkpointed"),
    (
        "gpu_serve_clips_per_s_by_batch",
        "generator pipeline clips/s at batch 1, 2, 4, 8 (DiT-B/8, 16x256x256 = 16k tokens, 20 steps, bf16)",
    ),
    (
        "gpu_vae_decode_81f_peak_gib_tiled_untiled",
        "peak GiB decoding 81 frames at 480x832, Wan VAE bf16: tiled, untiled",
    ),
    (
        "gpu_prepare_clips_per_s",
        "prepare stages on the GPU in bf16: Wan-VAE encode by shape, umT5-XXL captions at 512 tokens",
    ),
    (
        "gpu_wan_1_3b_cfg_step_seconds",
        "Wan2.1-1.3B-shaped DiT, 33x480x832 (14,040 tokens): seconds per CFG sampling step, bf16",
    ),
    ("gpu_wan_1_3b_lora_step_seconds", "the same model: seconds per LoRA r32 training step (checkpointed, bf16)"),
    (
        "gpu_parallel_sampling_speedup_81x720x1280",
        "Wan2.1-14B, 81x720x1280: sampling speedup of `sora generate --sequence-parallel N` over 1 GPU; goal >= 1.7x "
        "at 2 GPUs, >= 3x at 4 (not measured: no multi-GPU machine lent)",
    ),
)
TIMEOUT_S = 900
TIMEOUTS = {"rehearse_seconds": 3600}
"""Figures that run many trainings in one script (every recipe's rehearsal) get longer than TIMEOUT_S."""


def run_figure(name: str, quick: bool) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, "-m", f"benchmarks.bench_{name}", "--json", out] + (["--quick"] if quick else [])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=HERE.parent, capture_output=True, text=True, timeout=TIMEOUTS.get(name, TIMEOUT_S)
        )
        if proc.returncode == 0 and os.path.getsize(out):
            with open(out) as f:
                return json.load(f)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        error = f"exit {proc.returncode}: " + " | ".join(tail)
    except subprocess.TimeoutExpired:
        error = f"timed out after {TIMEOUTS.get(name, TIMEOUT_S)}s"
    finally:
        if os.path.exists(out):
            os.unlink(out)
    return {"figure": name, "value": None, "met": None, "error": error, "seconds": round(time.perf_counter() - t0, 1)}


def fmt(v) -> str:
    if v is None:
        return "not measured"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def write_markdown(results: dict) -> None:
    figs = results["figures"]
    lines = [
        "# Benchmark results",
        "",
        "Every figure is a ratio of two things measured side by side in one command (repetitions interleaved,",
        "medians), so load from other work on the machine cancels as far as it can. Regenerated by",
        "`python -m benchmarks.run` from `results.json`; each script's docstring says what it compares and why",
        "that is fair. Benchmarks never fail on timing: a goal not met is reported here, not raised.",
        "",
        "| figure | value | goal | met? | what was compared | machine | date | command |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in FIGURES:
        r = figs.get(name)
        if r is None:
            lines.append(f"| `{name}` | not measured | {GOALS[name]} | | (not run yet) | | | |")
            continue
        m = r.get("machine") or {}
        where = f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, load {m.get('load_avg_1m', '?')}"
        met = {True: "yes", False: "**no**", None: "n/a"}[r.get("met")]
        what = r.get("compared") or r.get("error", "")
        lines.append(
            f"| `{name}` | {fmt(r.get('value'))} | {GOALS[name]} | {met} | {what.replace('|', '/')} | {where} | "
            f"{(r.get('date') or '')[:16]} | `{r.get('run_command', '')}` |"
        )
    unmet = [(name, figs[name]) for name in FIGURES if name in figs and figs[name].get("met") is False]
    if unmet:
        lines += ["", "## Goals not met", ""]
        for name, r in unmet:
            lines.append(
                f"- `{name}` ({fmt(r.get('value'))}, goal {GOALS[name]}): {r.get('note') or 'no explanation recorded.'}"
            )
    gpu = results.get("gpu") or {}
    lines += ["", "## GPU figures", ""]
    if gpu.get("device"):
        lines += [
            f"Measured on {gpu['device']}, {gpu.get('date', '')}, with `{gpu.get('command', '')}`; every script's "
            "full output is under `gpu.details` in results.json.",
            "",
        ]
    lines += ["| figure | value | what | status |", "| --- | --- | --- | --- |"]
    for key, what in GPU_FIGURES:
        v = gpu.get(key)
        status = "measured" if v is not None else "not measured; run `benchmarks/run_gpu.sh OUT` on a GPU machine"
        lines.append(f"| `{key}` | {fmt(v)} | {what} | {status} |")
    if gpu.get("notes"):
        lines += ["", "What the GPU figures say:", ""] + [f"- {note}" for note in gpu["notes"]]
    lines += ["", "## Details", ""]
    for name in FIGURES:
        r = figs.get(name)
        if r is None:
            continue
        lines.append(f"### `{name}`")
        lines.append("")
        lines.append("```json")
        lines.append(json.dumps(r.get("details", r.get("error")), indent=1, default=str)[:4000])
        lines.append("```")
        lines.append("")
    RESULTS_MD.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description="Run the side-by-side benchmarks.")
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions, for 2-core machines")
    p.add_argument(
        "--only",
        action="append",
        choices=FIGURES,
        metavar="NAME",
        help=f"run only this figure (repeatable): {', '.join(FIGURES)}",
    )
    args = p.parse_args(argv)
    names = args.only or list(FIGURES)
    results = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    results.setdefault("figures", {})
    command = (
        "python -m benchmarks.run"
        + (" --quick" if args.quick else "")
        + "".join(f" --only {n}" for n in args.only or [])
    )
    t0 = time.perf_counter()
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        r = run_figure(name, args.quick)
        r["run_command"] = command
        results["figures"][name] = r
        print(
            f"[bench] {name}: {fmt(r.get('value'))} (goal {GOALS[name]}, "
            f"{r.get('seconds')}s){' ' + r['error'] if r.get('error') else ''}",
            file=sys.stderr,
            flush=True,
        )
        # Written after every figure, so an interrupted run keeps what it measured.
        results.update({name: r.get("value") for name, r in results["figures"].items()})
        results["machine"] = machine()
        results["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        results["command"] = command
        RESULTS_JSON.write_text(json.dumps(results, indent=2, default=str) + "\n")
        write_markdown(results)
    results["last_run_seconds"] = round(time.perf_counter() - t0, 1)
    RESULTS_JSON.write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_markdown(results)
    print(f"[bench] done in {results['last_run_seconds']}s; {RESULTS_MD}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
