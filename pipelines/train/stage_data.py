"""Which prepared folder holds each stage's bucket(s), checked against the model and the stage.

    stage_data = resolve_stage_data(recipe, ["data/images", "data/clips"])   # stage name -> StageData

A stage names a bucket (`FRAMESxHEIGHTxWIDTH`, as `sora data prepare` writes it) or, for a mixed stage,
several; each is looked up in every `--data` root. Every error is one line naming the stage and the key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from pipelines.train.recipe import Recipe
from sora_model.config import ConfigError, DiTConfig

DATASET_INFO = "dataset.json"


@dataclass
class StageData:
    """Where a stage's clips are and what they look like."""

    paths: list[str]
    """Prepared dataset roots holding the bucket (passed to `pipelines.data.load.load_prepared`)."""
    bucket: str
    bucket_dirs: list[str]
    num_clips: int
    grid: tuple[int, int, int]
    """Tokens per clip along (T', H', W'); a mixed stage: those of the bucket it samples at."""
    info: dict[str, Any]
    shape: tuple[int, int, int] = (0, 0, 0)
    """(frames, height, width) of the bucket's clips."""
    parts: list[StageData] = field(default_factory=list)
    """A mixed stage's buckets, one StageData each (empty for a one-bucket stage)."""


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _abs_root(root: str) -> str:
    """A local root made absolute (replicas run elsewhere); a URI (s3://...) as written, without a trailing /."""
    return root.rstrip("/") if _is_uri(root) else os.path.abspath(root)


def read_info(root: str) -> dict[str, Any]:
    if _is_uri(root):  # prepared data in object storage (`sora data prepare --out s3://...`)
        from pipelines.data.load import read_dataset_info

        return read_dataset_info(root)
    path = os.path.join(root, DATASET_INFO)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"'{root}' is not a prepared dataset: {DATASET_INFO} is missing (run `sora data prepare`)"
        )
    with open(path) as f:
        return json.load(f)


def _is_root(path: str) -> bool:
    """Whether a stage's `dataset` names a prepared root (rather than a bucket name)."""
    if not _is_uri(path):
        return os.path.isfile(os.path.join(path, DATASET_INFO))
    try:
        read_info(path)
        return True
    except FileNotFoundError:
        return False


def _bucket_name(b: dict[str, Any]) -> str:
    return b.get("name") or f"{b['frames']}x{b['height']}x{b['width']}"


def resolve_stage_data(recipe: Recipe, roots: list[str]) -> dict[str, StageData]:
    """Find each stage's bucket(s) in the `--data` folders and check they fit the model and the stage.

    A stage's `dataset` is a bucket name (`8x32x32`) looked up in every root, or a path to a prepared
    root (then its only bucket is used). Errors name the stage and list the buckets that exist.
    """
    roots = [_abs_root(r) for r in roots]
    infos = {r: read_info(r) for r in roots}
    model = recipe.model_config()
    recipe.pipeline_config()  # what every export will hold, checked now (an I2V model needs its image encoder)
    out: dict[str, StageData] = {}
    for i, stage in enumerate(recipe.stages):
        parts = [_resolve_bucket(recipe, model, infos, roots, f"stages[{i}].dataset", name) for name in stage.buckets]
        want = stage.shape
        if not stage.mixed:
            if parts[0].shape != want:
                f, h, w = parts[0].shape
                raise ConfigError(f"stages[{i}] wants {stage.size_text} but bucket '{stage.dataset}' holds {f}x{h}x{w}")
            out[stage.name] = parts[0]
            continue
        if model.in_channels != model.predicted_channels:
            raise ConfigError(f"stages[{i}]: an image-to-video model trains one bucket per stage (dataset:), not mixed")
        shapes = {p.shape: p for p in parts}
        if want not in shapes:
            raise ConfigError(
                f"stages[{i}] samples at {stage.size_text}, which none of its datasets ({', '.join(stage.datasets)}) "
                "holds; set frames and resolution (or height and width) to one of them"
            )
        for p in parts:
            tokens = p.grid[0] * p.grid[1] * p.grid[2]
            if tokens > stage.tokens_per_batch:
                raise ConfigError(
                    f"stages[{i}].tokens_per_batch {stage.tokens_per_batch} is below the {tokens} tokens of one clip "
                    f"of bucket {p.bucket}; raise it to at least {tokens}"
                )
        out[stage.name] = StageData(
            paths=sorted({r for p in parts for r in p.paths}),
            bucket="+".join(p.bucket for p in parts),
            bucket_dirs=[d for p in parts for d in p.bucket_dirs],
            num_clips=sum(p.num_clips for p in parts),
            grid=shapes[want].grid,
            info=parts[0].info,
            shape=want,
            parts=parts,
        )
    return out


IMAGE_FLAG = "sora data prepare --from-export EXPORT_DIR --image-conditioning"
"""How to prepare data an image-to-video model trains on (named by every error about its missing columns)."""


def image_columns(model: DiTConfig) -> tuple[str, ...]:
    """The prepared columns an image-to-video model trains on beside the usual ones (none for text-to-video)."""
    if model.in_channels == model.predicted_channels:
        return ()
    return ("image_condition", "image_features") if model.image_dim is not None else ("image_condition",)


def _check_image_conditioning(model: DiTConfig, info: dict[str, Any], where: str) -> None:
    """An image-to-video model (its input: noisy latents, then the condition's mask and latents) against the data."""
    if int(info["in_channels"]) != model.predicted_channels:
        raise ConfigError(
            f"{where}: the data has {info['in_channels']} channels, the model predicts {model.predicted_channels}"
        )
    columns = info.get("columns") or []
    for column in image_columns(model):
        if column not in columns:
            raise ConfigError(
                f"{where}: the model is image-to-video but the data has no '{column}' column; prepare "
                f"it with `{IMAGE_FLAG}`"
            )
    cond = info.get("image_conditioning") or {}
    if int(cond.get("channels", 0)) + model.predicted_channels != model.in_channels:
        raise ConfigError(
            f"{where}: the data's image condition has {cond.get('channels')} channels, the model reads "
            f"{model.in_channels - model.predicted_channels} beside its noisy latents (model.in_channels "
            f"{model.in_channels})"
        )
    if model.image_dim is None:
        return
    got = (cond.get("images"), cond.get("image_tokens"), cond.get("image_dim"))
    if got != (model.image_count, model.image_tokens, model.image_dim):
        raise ConfigError(
            f"{where}: the data's image features are (images, tokens, width) {got}, the model reads "
            f"{(model.image_count, model.image_tokens, model.image_dim)}; prepare with the model's own export "
            f"({IMAGE_FLAG})"
        )


Hit = tuple[str, dict[str, Any], dict[str, Any]]
"""(root, the root's prepared info, one bucket of it)."""


def _find_bucket(infos: dict[str, dict[str, Any]], roots: list[str], where: str, name: str) -> list[Hit]:
    """Every root's non-empty bucket called `name`, or the one bucket of the prepared folder `name`; a one-line
    ConfigError when there is none."""
    hits: list[Hit] = []
    if _is_root(name):
        root = _abs_root(name)
        info = infos.get(root) or read_info(root)
        if len(info["buckets"]) != 1:
            names = ", ".join(_bucket_name(b) for b in info["buckets"])
            raise ConfigError(f"{where} '{name}' holds several buckets ({names}); name one instead")
        hits.append((root, info, info["buckets"][0]))
    else:
        empty = []
        for root, info in infos.items():
            for b in info["buckets"]:
                if _bucket_name(b) == name:
                    (hits if int(b["num_clips"]) > 0 else empty).append((root, info, b))
        if not hits and empty:
            raise ConfigError(f"{where} '{name}' holds no clips in {', '.join(r for r, _, _ in empty)}")
    if not hits:
        have = sorted({_bucket_name(b) for info in infos.values() for b in info["buckets"]})
        raise ConfigError(
            f"{where} '{name}' is not a bucket of the data ({', '.join(roots)}); buckets there: "
            f"{', '.join(have) or 'none'}"
        )
    return hits


def _check_fits(recipe: Recipe, model: DiTConfig, hits: list[Hit], where: str) -> None:
    """The found bucket against the model (patch, channels, image condition) and the recipe's text encoder."""
    _, info, _ = hits[0]
    if tuple(info["patch_size"]) != tuple(model.patch_size):
        raise ConfigError(
            f"{where}: the data was prepared with patch {info['patch_size']} but model.patch_size is "
            f"{list(model.patch_size)}"
        )
    if model.in_channels != model.predicted_channels:
        for root, root_info, _ in hits:  # every root read for this bucket must carry the condition
            _check_image_conditioning(model, root_info, where if len(hits) == 1 else f"{where} ({root})")
    elif int(info["in_channels"]) != model.in_channels:
        raise ConfigError(
            f"{where}: the data has {info['in_channels']} channels but model.in_channels is {model.in_channels}"
        )
    data_layer = int(info.get("text_encoder", {}).get("hidden_layer", -1))
    if data_layer != recipe.text_encoder.hidden_layer:
        raise ConfigError(
            f"{where}: the data's captions were embedded from text encoder layer {data_layer} but "
            f"text_encoder.hidden_layer is {recipe.text_encoder.hidden_layer}; prepare with "
            f"--text-hidden-layer {recipe.text_encoder.hidden_layer}"
        )
    text_dim = int(info.get("text_encoder", {}).get("dim", model.text_dim))
    if text_dim != model.text_dim:
        raise ConfigError(
            f"{where}: the data's text embeddings have width {text_dim} but model.text_dim is {model.text_dim}"
        )


def _resolve_bucket(
    recipe: Recipe, model: DiTConfig, infos: dict[str, dict[str, Any]], roots: list[str], where: str, name: str
) -> StageData:
    """One bucket, by name in every root or by a prepared folder's path, checked against the model and the recipe."""
    hits = _find_bucket(infos, roots, where, name)
    _check_fits(recipe, model, hits, where)
    _, info, bucket = hits[0]
    num = sum(int(b["num_clips"]) for _, _, b in hits)
    if num < 1:
        raise ConfigError(f"{where} '{name}' holds no clips")
    return StageData(
        paths=[r for r, _, _ in hits],
        bucket=_bucket_name(bucket),
        bucket_dirs=[
            f"{r}/{b.get('path', _bucket_name(b))}" if _is_uri(r) else os.path.join(r, b.get("path", _bucket_name(b)))
            for r, _, b in hits
        ],
        num_clips=num,
        grid=tuple(int(g) for g in bucket["grid"]),
        info=info,
        shape=(int(bucket["frames"]), int(bucket["height"]), int(bucket["width"])),
    )
