"""Prepare's settings: the constants of the on-disk format, buckets, and the typed options of a run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.data.prepare.isolate import DECODE_TIMEOUT_S
from sora_model.config import AutoencoderConfig, ImageEncoderConfig, TextEncoderConfig, to_dict

FORMAT_VERSION = 2
"""2: text_tokens (and each extra caption's) stored at their true length, zero-padded to text_mask's at load.
A run of format 1 is not resumed by this code (its shards' columns would differ)."""
DATASET_INFO = "dataset.json"
RUN_STATE = "_run.json"
REJECTS = "rejects.jsonl"
STATS_LOG = "stats.log"
NULL_PROMPT = "null_prompt.safetensors"
"""The empty prompt's embedding, written first when the model needs it (pipelines/data/null_prompt.py)."""
DECODE_REJECTS_DIR = "_rejects"
SHARD_PREFIX = "part-"
SHARD_SUFFIX = ".parquet"
TMP_PREFIX = ".tmp-"
COLUMNS = (
    "clip_id",
    "source",
    "start_s",
    "fps",
    "caption",
    "patches",
    "grid",
    "text_tokens",
    "text_mask",
    "text_pooled",
    "extra_captions",
    "extra_text_tokens",
    "extra_text_mask",
    "extra_text_pooled",
    "lines",
    "line_clips",
    "source_fps",
    "repeated_frames",
    "text_truncated",
)
"""A shard's columns. The first ten are one clip with its first caption (what every reader knows); the
`extra_*` lists hold a multi-caption clip's other captions; `lines`/`line_clips` are what resume reads;
`source_fps` (the file's average rate), `repeated_frames` (clip frames that repeat the previous source frame)
and `text_truncated` (the clip's captions cut to max_length tokens) are for curation."""
DTYPES = {
    "patches": "float32",
    "grid": "int32",
    "text_tokens": "float16, true length (padded to text_mask's at load)",
    "text_mask": "bool",
    "text_pooled": "float32",
    "extra_text_tokens": "list of float16",
    "extra_text_mask": "list of bool",
    "extra_text_pooled": "list of float32",
    "lines": "list of int64",
    "line_clips": "list of int32",
    "source_fps": "float32",
    "repeated_frames": "int32",
    "text_truncated": "int32",
}
IMAGE_CONDITION_COLUMNS = ("image_condition", "image_features")
"""`--image-conditioning`'s columns, after all others: `image_condition` (N, Pc) float32, the mask and the latents of
the clip's conditioning video patchified as `patches` are (Pc = (mask + latent channels) x pt x ph x pw), and
`image_features` (images x Ti, Di) float16, the image encoder's penultimate features of the clip's first (and last)
frame (absent for an export without an image encoder: Wan2.2 I2V). `sora_model.i2v_condition` builds both, as
sampling does."""
IMAGE_CONDITION_DTYPES = {"image_condition": "float32", "image_features": "float16"}
TOKENS_PAD_KEY = "pad_to"
"""Field metadata of the caption-token columns: tokens per caption once padded (text_mask's width), so a reader
that does not read text_mask pads every shard alike."""
DEFAULT_PATCH = (1, 4, 4)
"""The DiT-demo model's patch. Tokens are cut at prepare time, so this must equal the recipe's model.patch_size."""
VIDEO_EXTENSIONS = (
    ".mp4",
    ".m4v",
    ".mov",
    ".mkv",
    ".webm",
    ".avi",
    ".mpg",
    ".mpeg",
    ".ts",
    ".flv",
    ".3gp",
    ".ogv",
    ".gif",
)
"""What a folder manifest picks up (with IMAGE_EXTENSIONS); a JSONL/CSV manifest may name any file."""
CAPTION_COLUMNS = ("caption", "text")
PARQUET_COMPRESSION = "zstd"
"""zstd shrinks float32 pixel tokens ~2x against snappy's ~1.2x at similar read speed."""
TEXT_BATCH_SIZE = 64
GPU_DTYPE = "bfloat16"
"""Weights of the caption encoder and the VAE when a stage runs on a GPU: bf16 halves their memory and runs on
tensor cores, with fp32's range (T5 overflows in fp16). On CPU they stay fp32 (bf16 matmuls are slow there)."""
"""Captions per text-encoder call: short captions, so a large batch keeps the matmuls efficient."""
MANIFEST_CHUNKS_PER_CPU = 4
"""Manifest chunks (parse tasks, and so sorted blocks to plan) per CPU: enough that planning spreads over
the cluster and decoding starts after the first few blocks, few enough that a task outweighs its cost."""
DECODE_BATCH_ROWS = 64
"""Clips per decode task (and at most per shard on the identity path): large enough to amortise a task's
fixed cost (Arrow tables, the Parquet file: at 4 clips of 16x32x32 it outweighed decoding), small enough
that the first shards are written while later files are still being probed."""
DECODE_BATCH_BYTES = 128 * 2**20
"""The floor of the decode budget: decoded pixels per decode task on a node too small to tell, or when the
budget from memory comes out lower (a task always holds at least one clip anyway)."""
DECODE_BATCH_BYTES_MAX = 4 * 2**30
"""The cap of the decode budget: past a few GiB a batch no longer amortises anything, it only delays the first shard."""
DECODE_MEMORY_FRACTION = 0.25
"""Share of a decode task's slice of its node's memory (Ray's `memory` resource, what is left for tasks after
the object store, divided by the node's CPUs: one decode task per CPU) given to its decoded pixels. The rest
covers the batch's other copies (the stacked array, the Arrow column, the patchified rows: about 3x the pixels)
and the decoder's own buffers. A 128 GiB, 16-CPU node (~90 GiB of task memory) gives ~1.4 GiB per task, 15 clips
of 81x480x832 where a fixed 128 MiB allowed one."""


def decode_batch_bytes(
    nodes: Sequence[dict[str, Any]], workers: int | None = None, override_mib: int | None = None
) -> int:
    """Decoded-pixel bytes per decode task: `override_mib` (--decode-batch-mib) when given; else
    DECODE_MEMORY_FRACTION of the smallest per-task memory over the cluster's alive nodes (`ray.nodes()`:
    `Resources` memory ÷ CPUs, or ÷ `workers` when fewer tasks run at once), between DECODE_BATCH_BYTES
    and DECODE_BATCH_BYTES_MAX. Tasks may land on any node, so the smallest node decides."""
    if override_mib is not None:
        return override_mib * 2**20
    per_task = []
    for node in nodes:
        res = node.get("Resources", {})
        if node.get("Alive", True) and res.get("CPU", 0) >= 1 and res.get("memory", 0) > 0:
            tasks = min(res["CPU"], workers) if workers else res["CPU"]
            per_task.append(res["memory"] / tasks)
    if not per_task:
        return DECODE_BATCH_BYTES
    return int(min(DECODE_BATCH_BYTES_MAX, max(DECODE_BATCH_BYTES, DECODE_MEMORY_FRACTION * min(per_task))))


DEFAULT_MAX_UPSCALE = 1.0
"""Largest factor a source may be scaled up by to fill its bucket (`--max-upscale`): 1.0 never upscales, since an
upscaled clip teaches the model blur at the bucket's resolution; 2.0 accepts a 240p source for a 480p bucket."""
DEFAULT_MAX_FPS_RATIO = 1.5
"""Largest clip fps / source fps (`--max-fps-ratio`). Nearest-frame sampling repeats source frames when the clip
runs faster than the source: at 1.5 one clip frame in three repeats its neighbour (a 24 fps source for 30 fps
clips, 1.25, passes; a 15 fps one, 2.0, would show every frame twice and is rejected as "low fps"). Every clip
records its `source_fps` and `repeated_frames` either way."""
ASPECT_TOLERANCE = 1e-3
"""Aspect ratios closer than this (in log space) count as equal when choosing a bucket."""

REJECT_REASONS = (
    "missing",
    "empty",
    "truncated",
    "not a video",
    "unreadable",
    "too short",
    "no caption",
    "bad entry",
    "duplicate",
    "decoder crashed",
    "decoder timed out",
    "upscaled",
    "low fps",
)


class PrepareError(ValueError):
    """Bad input or a refused output folder; the CLI prints it as one line (exit 2)."""


class StorageFailed(PrepareError):
    """The run stopped because its own storage failed (a full disk, an I/O error, a store that stayed unreachable);
    no input was rejected for it, and the same command resumes. One line, exit 2."""


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Bucket:
    """A clip shape: frames x height x width (pixels, before any autoencoder)."""

    frames: int
    height: int
    width: int

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @classmethod
    def parse(cls, text: str) -> Bucket:
        parts = text.strip().lower().split("x")
        try:
            f, h, w = (int(p) for p in parts)
        except ValueError:
            raise PrepareError(f"bucket '{text}' must be FRAMESxHEIGHTxWIDTH, e.g. 8x32x32") from None
        if min(f, h, w) < 1:
            raise PrepareError(f"bucket '{text}' needs positive frames, height and width")
        return cls(f, h, w)


def parse_buckets(text: str | Sequence[str]) -> list[Bucket]:
    items = text.split(",") if isinstance(text, str) else [t for s in text for t in s.split(",")]
    buckets = sorted({Bucket.parse(t) for t in items if t.strip()})
    if not buckets:
        raise PrepareError("--buckets is empty; give e.g. 1x32x32,8x32x32")
    return buckets


def parse_patch(text: str) -> tuple[int, int, int]:
    b = Bucket.parse(text)
    return (b.frames, b.height, b.width)


@dataclass(frozen=True)
class ImageConditioning:
    """What `--image-conditioning` stores per clip for an image-to-video export (`from_export.apply_export`)."""

    images: int
    """Conditioning frames per clip: 1 (the first: I2V) or 2 (the first and the last: FLF2V)."""
    encoder: ImageEncoderConfig | None
    """The export's image encoder, absolute paths; None: latents only (an I2V model without one, Wan2.2 I2V)."""

    def settings(self) -> dict[str, Any]:
        return {"images": self.images, "image_encoder": None if self.encoder is None else to_dict(self.encoder)}


@dataclass
class PrepareOptions:
    manifest: str
    out: str
    buckets: list[Bucket]
    fps: float | None = None
    """Clip frame rate; None keeps each source's own rate (consecutive frames)."""
    clips_per_video: int = 1
    """Clips taken per video, `stride_s` apart; 0 takes every clip that fits."""
    stride_s: float | None = None
    """Seconds between clip starts; None means one clip length (clips touch, never overlap)."""
    patch: tuple[int, int, int] = DEFAULT_PATCH
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    rows_per_file: int = 256
    overwrite: bool = False
    workers: int | None = None
    """Decode tasks at once at most; None: no cap (one per free CPU, and more as an autoscaler adds CPUs)."""
    decode_batch_mib: int | None = None
    """Decoded pixels per decode task, MiB (`--decode-batch-mib`); None: from the nodes' memory
    (`decode_batch_bytes`)."""
    vae_batch_clips: int | None = None
    """Clips per VAE encode call (`--vae-batch-clips`); None: from the GPU's free memory (encode.vae_batch_clips)."""
    progress: bool = True
    caption_actors: int | None = None
    """Caption-encoder actors; None: one per GPU of the cluster, and on a CPU-only cluster 0, which runs the
    caption stage as tasks keeping the encoder loaded per worker process (an actor's start is a new
    process importing torch and loading the encoder, on the path of every clip of a run)."""
    decode_timeout_s: float = DECODE_TIMEOUT_S
    """Seconds a probe or a clip's decode may take before the input is rejected as "decoder timed out"."""
    null_prompt: bool = False
    """Also write OUT/null_prompt.safetensors, the embedding of "" (`--from-export` of an empty-prompt model, Wan)."""
    max_upscale: float = DEFAULT_MAX_UPSCALE
    """Inputs that would be scaled up more than this to fill their bucket are rejected ("upscaled")."""
    max_fps_ratio: float = DEFAULT_MAX_FPS_RATIO
    """Inputs whose fps is below the clip fps by more than this factor are rejected ("low fps")."""
    scratch: str | None = None
    """Local folder (on every worker) where remote inputs are copied while a stage reads them; None: the system's
    temp folder. A full scratch disk stops the run (it is not the input's fault)."""
    curate: bool = False
    """Add the curation columns (scene, motion, phash; prepare/curate.py): clips never span a scene cut, and
    `sora data filter` can drop static clips and near-duplicates later without decoding."""
    image_conditioning: ImageConditioning | None = None
    """Also store each clip's image-to-video condition (IMAGE_CONDITION_COLUMNS); None: the columns of a T2V run."""

    def __post_init__(self) -> None:
        if self.fps is not None and not self.fps > 0:
            raise PrepareError(f"--fps must be > 0, got {self.fps}")
        if self.clips_per_video < 0:
            raise PrepareError(f"--clips-per-video must be >= 0, got {self.clips_per_video}")
        if self.stride_s is not None and not self.stride_s > 0:
            raise PrepareError(f"--stride must be > 0 seconds, got {self.stride_s}")
        if self.caption_actors is not None and self.caption_actors < 0:
            raise PrepareError(f"--caption-actors must be >= 0, got {self.caption_actors}")
        if not self.decode_timeout_s > 0:
            raise PrepareError(f"--decode-timeout must be > 0 seconds, got {self.decode_timeout_s}")
        if self.decode_batch_mib is not None and self.decode_batch_mib < 1:
            raise PrepareError(f"--decode-batch-mib must be >= 1 MiB, got {self.decode_batch_mib}")
        if self.vae_batch_clips is not None and self.vae_batch_clips < 1:
            raise PrepareError(f"--vae-batch-clips must be >= 1, got {self.vae_batch_clips}")
        if self.rows_per_file < 1:
            raise PrepareError(f"--rows-per-file must be >= 1, got {self.rows_per_file}")
        if any(p < 1 for p in self.patch):
            raise PrepareError(f"--patch must be three positive ints, got {self.patch}")
        if not self.max_upscale >= 1:
            raise PrepareError(f"--max-upscale must be >= 1 (1 never upscales), got {self.max_upscale}")
        if not self.max_fps_ratio >= 1:
            raise PrepareError(f"--max-fps-ratio must be >= 1 (1 never repeats a frame), got {self.max_fps_ratio}")

    def settings(self, manifest_sha256: str) -> dict[str, Any]:
        """Everything that decides the rows' content: a resume must see the same settings."""
        return {
            "format_version": FORMAT_VERSION,
            "manifest_sha256": manifest_sha256,
            "buckets": [b.name for b in self.buckets],
            "fps": self.fps,
            "clips_per_video": self.clips_per_video,
            "stride_s": self.stride_s,
            "patch": list(self.patch),
            "text_encoder": self.text_encoder.embedding_settings(),
            "autoencoder": to_dict(self.autoencoder),
            "max_upscale": self.max_upscale,
            "max_fps_ratio": self.max_fps_ratio,
            # Only when on, so the settings (and the hash a resume checks) of runs without it stay as they were.
            **({"curate": True} if self.curate else {}),
            **({"image_conditioning": self.image_conditioning.settings()} if self.image_conditioning else {}),
        }


TOKENIZER_UNBOUNDED = 10**6
"""A tokenizer's model_max_length at or above this is transformers' "no limit" sentinel (int(1e30))."""


def encoder_max_length(name_or_path: str, tokenizer_path: str | None = None) -> int:
    """The most tokens the text encoder takes: its tokenizer's model_max_length, else its position table.

    The packaged `minilm` answers TextEncoderConfig's max_length (the demo recipes train with it); a folder
    answers from its tokenizer_config.json / config.json (T5 and umT5: 512; CLIP: 77)."""
    import json
    from pathlib import Path

    from sora_model.text import MINILM_NAME

    if name_or_path == MINILM_NAME:
        return TextEncoderConfig().max_length
    folder = Path(name_or_path)
    found: list[int] = []
    for tok in (Path(tokenizer_path) if tokenizer_path else folder, folder.parent / "tokenizer"):
        f = tok / "tokenizer_config.json"
        if f.is_file():
            n = json.loads(f.read_text()).get("model_max_length")
            if isinstance(n, (int, float)) and 0 < n < TOKENIZER_UNBOUNDED:
                found.append(int(n))
            break
    if not found and (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
        config = config.get("text_config", config)
        found += [int(config[k]) for k in ("max_position_embeddings", "n_positions") if isinstance(config.get(k), int)]
    if not found:
        raise PrepareError(
            f"cannot tell how many tokens the text encoder {name_or_path} takes (no model_max_length in "
            "its tokenizer_config.json, no max_position_embeddings in its config.json); pass --max-text-length"
        )
    return found[0]
