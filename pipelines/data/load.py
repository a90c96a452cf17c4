"""Reading prepared datasets back: a Ray Dataset for training, plain numpy for tests and notebooks.

    from pipelines.data.load import load_prepared, read_prepared, read_dataset_info, list_buckets

    ds = load_prepared("data/prepared", bucket="8x32x32")   # ray.data.Dataset, iter_torch_batches-ready
    for batch in ds.iter_torch_batches(batch_size=16):
        batch["patches"]        # (B, N, P) float32
    arrays = read_prepared("data/prepared")                 # dict of numpy arrays, no Ray

A clip listed with several captions (multi-caption datasets) is one row holding all of them; each time a
row is read for training, `load_prepared` draws one of its captions at random (uniformly) into `caption`,
`text_tokens`, `text_mask` and `text_pooled`, so each epoch pairs the clip with a fresh caption.

Prepared data may live in a local folder or under an fsspec URI (`s3://bucket/prepared`, where `sora data
prepare --out` wrote it); remote shards are read through fsspec (credentials and endpoint from the environment,
as for prepare).

A prepared folder holds one sub-folder per bucket (`<frames>x<height>x<width>`). Clips of different
buckets have different token counts, so a dataset is read one bucket at a time (one per curriculum
stage); `bucket=None` is allowed when the folder has exactly one non-empty bucket. Several folders
(`sora train --data A,B`) are read as one dataset when their patch size, channels, autoencoder, text encoder and
the bucket's token grid agree.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.data.prepare.options import DATASET_INFO, RUN_STATE, SHARD_PREFIX, SHARD_SUFFIX, TOKENS_PAD_KEY
from sora_model.config import ConfigError

TENSOR_COLUMNS = ("patches", "grid", "text_tokens", "text_mask", "text_pooled")
TRAIN_COLUMNS = (*TENSOR_COLUMNS, "start_s", "fps")
"""What `load_prepared` reads by default: every numeric column, so `iter_torch_batches` works as is
(strings cannot become tensors; ask for `clip_id`/`caption`/`source` with `columns=` and `iter_batches`)."""
SCALAR_COLUMNS = ("clip_id", "source", "start_s", "fps", "caption")
MUST_AGREE = ("patch_size", "in_channels", "patch_dim", "autoencoder")
"""dataset.json keys that must match across folders read together (text encoder is checked too)."""


def _is_uri(path: str | Path) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def _root(path: str | Path) -> str | Path:
    """A URI stays a string ("s3://b/x" would become "s3:/b/x" as a Path); a local path becomes a Path."""
    return str(path).rstrip("/") if _is_uri(path) else Path(path)


def _fs(path: str) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    return url_to_fs(path)


def open_parquet(path: str) -> Any:
    """A pyarrow ParquetFile of a local shard or a remote one (read through fsspec)."""
    import pyarrow.parquet as pq

    if not _is_uri(path):
        return pq.ParquetFile(path)
    fs, p = _fs(path)
    return pq.ParquetFile(fs.open(p, "rb"))


class RemoteAccessError(ConfigError):
    """Prepared data under a URI this process cannot read: no credentials, access denied, endpoint unreachable."""


BUCKETED = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
"""fsspec protocols whose first path component is a bucket (container), checked apart from the folder."""


def _endpoint() -> str:
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f" at {url}" if url else ""


def remote_failure(uri: str, err: BaseException) -> RemoteAccessError | None:
    """The one-line error for a failed read of `uri` that the user's settings must fix, else None.

    botocore's errors are matched by name: s3fs raises them unwrapped, and other stores' libraries are not imported
    here.
    """
    name = type(err).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return RemoteAccessError(
            f"{uri}: no credentials for {uri.split('://', 1)[0]}:// ({name}); set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for an S3-compatible store"
        )
    if isinstance(err, PermissionError):
        return RemoteAccessError(f"{uri}: access denied{_endpoint()} ({' '.join(str(err).split())})")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "InvalidEndpointError") or isinstance(
        err, ConnectionError
    ):
        return RemoteAccessError(
            f"{uri}: the store cannot be reached{_endpoint()} ({' '.join(str(err).split())}); "
            "check AWS_ENDPOINT_URL and the network"
        )
    return None


def _check_bucket(root: str, fs: Any, path: str) -> None:
    """A FileNotFoundError naming the bucket when the bucket itself is missing (not only the folder)."""
    protocol, bucket = root.split("://", 1)[0], path.split("/", 1)[0]
    if protocol in BUCKETED and not fs.exists(bucket):
        raise FileNotFoundError(f"{root}: bucket '{bucket}' does not exist{_endpoint()}")


def read_dataset_info(path: str | Path) -> dict[str, Any]:
    """The dataset.json of a prepared folder (or URI); a one-line FileNotFoundError when it is not one."""
    if _is_uri(path):
        root = str(path).rstrip("/")
        fs, p = _fs(f"{root}/{DATASET_INFO}")
        try:
            text = fs.cat_file(p).decode()
        except FileNotFoundError:
            _check_bucket(root, fs, p)
            if fs.exists(_fs(f"{root}/{RUN_STATE}")[1]):
                raise FileNotFoundError(
                    f"{root} holds an interrupted `sora data prepare` run (no {DATASET_INFO} yet); re-run the same "
                    "command to finish it"
                ) from None
            raise FileNotFoundError(
                f"{root} is not a prepared dataset (no {DATASET_INFO}); make one with `sora data prepare`"
            ) from None
        except Exception as err:  # noqa: BLE001 - credentials, permissions and endpoints become one line naming the URI
            raise remote_failure(root, err) or err from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{root}/{DATASET_INFO} is not valid JSON: {err}") from None
    folder = Path(path)
    info_path = folder / DATASET_INFO
    if not info_path.is_file():
        if (folder / RUN_STATE).is_file():
            raise FileNotFoundError(
                f"{folder} holds an interrupted `sora data prepare` run (no {DATASET_INFO} yet); re-run the same "
                "command to finish it"
            )
        what = "does not exist" if not folder.exists() else f"has no {DATASET_INFO}"
        raise FileNotFoundError(f"{folder} is not a prepared dataset ({what}); make one with `sora data prepare`")
    try:
        return json.loads(info_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{info_path} is not valid JSON: {err}") from None


def list_buckets(path: str | Path) -> list[dict[str, Any]]:
    """The buckets of a prepared folder as recorded in dataset.json ({frames, height, width, grid, num_clips, path,
    name})."""
    return read_dataset_info(path)["buckets"]


def _bucket_name(bucket: str | Sequence[int] | None) -> str | None:
    if bucket is None or isinstance(bucket, str):
        return bucket
    f, h, w = bucket
    return f"{f}x{h}x{w}"


def _select_bucket(path: str | Path, info: dict[str, Any], bucket: str | Sequence[int] | None) -> dict[str, Any]:
    name = _bucket_name(bucket)
    buckets = info["buckets"]
    names = ", ".join(f"{b['name']} ({b['num_clips']} clips)" for b in buckets)
    if name is None:
        full = [b for b in buckets if b["num_clips"] > 0]
        if len(full) != 1:
            raise ValueError(f"{path} has {len(full)} non-empty buckets; pass bucket= one of: {names}")
        return full[0]
    for b in buckets:
        if b["name"] == name:
            return b
    raise ValueError(f"{path} has no bucket {name}; it has: {names}")


def bucket_files(
    path: str | Path, bucket: str | Sequence[int] | None = None
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(dataset info, bucket info, sorted shard paths or URIs) of one bucket of a prepared folder or URI."""
    folder = _root(path)
    info = read_dataset_info(folder)
    b = _select_bucket(folder, info, bucket)
    if isinstance(folder, str):
        fs, p = _fs(f"{folder}/{b['path']}")
        protocol = folder.split("://", 1)[0]
        files = sorted(f"{protocol}://{f}" for f in fs.glob(f"{p}/{SHARD_PREFIX}*{SHARD_SUFFIX}"))
    else:
        files = sorted(str(p) for p in (folder / b["path"]).glob(f"{SHARD_PREFIX}*{SHARD_SUFFIX}"))
    return info, b, files


def text_encoder_identity(info: dict[str, Any]) -> dict[str, Any]:
    """What decides a prepared dataset's text embeddings (hidden_layer -1 for data written before it existed)."""
    te = info.get("text_encoder", {})
    return {
        "name_or_path": te.get("name_or_path"),
        "dim": te.get("dim"),
        "hidden_layer": int(te.get("hidden_layer", -1)),
    }


def _check_compatible(infos: list[tuple[str | Path, dict[str, Any], dict[str, Any]]]) -> None:
    (p0, i0, b0), *rest = infos
    for p, i, b in rest:
        for key in MUST_AGREE:
            if i[key] != i0[key]:
                raise ValueError(
                    f"{p} and {p0} differ in {key} ({i[key]} vs {i0[key]}); they cannot be read as one dataset"
                )
        if text_encoder_identity(i) != text_encoder_identity(i0):
            raise ValueError(f"{p} and {p0} use different text encoders; they cannot be read as one dataset")
        if b["grid"] != b0["grid"]:
            raise ValueError(f"{p} bucket {b['name']} has grid {b['grid']}, {p0} has {b0['grid']}: token counts differ")


def _column_to_numpy(column: Any, pad_to: int | None = None) -> np.ndarray:
    """Arrow column of (nested) fixed-size lists -> ndarray (rows, d1, ..., dk); strings/numbers -> 1-d.

    Caption tokens stored at their true length (a list of fixed-size lists, format 2) come back zero-padded to
    `pad_to` rows each (the longest in the column when None): (rows, pad_to, D), as format 1 stored them."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_list(arr.type) and pa.types.is_fixed_size_list(arr.type.value_type):
        return _pad_ragged(arr, pad_to)
    shape = [len(arr)]
    typ = arr.type
    while pa.types.is_fixed_size_list(typ):
        shape.append(typ.list_size)
        typ = typ.value_type
    if len(shape) == 1:
        return arr.to_numpy(zero_copy_only=False)
    flat = arr
    for _ in range(len(shape) - 1):
        flat = flat.flatten()
    return flat.to_numpy(zero_copy_only=False).reshape(shape)


def _pad_ragged(arr: Any, pad_to: int | None) -> np.ndarray:
    """list<fixed_size_list<D>> (rows of n_i items) -> (rows, pad_to, D) with zeros after each row's items."""
    offsets = arr.offsets.to_numpy().astype(np.int64)  # (rows + 1,), not rebased when the array is a slice
    lengths = np.diff(offsets)
    values = _column_to_numpy(arr.flatten())  # (sum n_i, D): only this slice's items
    length = int(lengths.max(initial=0)) if pad_to is None else pad_to
    if int(lengths.max(initial=0)) > length:
        raise ValueError(f"a caption holds {int(lengths.max())} tokens, more than the {length} its mask has room for")
    out = np.zeros((len(arr), length, *values.shape[1:]), dtype=values.dtype)
    rows = np.repeat(np.arange(len(arr)), lengths)
    out[rows, np.arange(len(values)) - np.repeat(offsets[:-1] - offsets[0], lengths)] = values
    return out


def _token_length(table: Any) -> int | None:
    """Tokens per caption once padded: text_mask's width, else what the token field's metadata says (prepare
    writes it), else None (the longest caption present)."""
    import pyarrow as pa

    if "text_mask" in table.column_names and pa.types.is_fixed_size_list(typ := table.schema.field("text_mask").type):
        return typ.list_size
    if "text_tokens" in table.column_names:
        meta = table.schema.field("text_tokens").metadata or {}
        if TOKENS_PAD_KEY.encode() in meta:
            return int(meta[TOKENS_PAD_KEY.encode()])
    return None


def table_to_numpy(table: Any, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """A Parquet/Arrow table of prepared rows -> {column: ndarray}, tensor columns with their full shapes
    (caption tokens padded to the mask's length)."""
    names = columns or table.column_names
    pad = _token_length(table)
    return {name: _column_to_numpy(table.column(name), pad if name == "text_tokens" else None) for name in names}


def _to_tensors(batch: Any) -> dict[str, np.ndarray]:
    return table_to_numpy(batch)


EXTRA_OF = {
    "caption": "extra_captions",
    "text_tokens": "extra_text_tokens",
    "text_mask": "extra_text_mask",
    "text_pooled": "extra_text_pooled",
}
"""A clip's first caption's fields -> the list columns holding its other captions' (one list per row)."""


def draw_captions(batch: Any, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """A batch with extra-caption columns -> numpy, each row's caption fields replaced by one of its
    captions drawn uniformly (the first or an extra); the extra columns are dropped."""
    import pyarrow as pa

    rng = rng or np.random.default_rng()
    out = table_to_numpy(batch, [c for c in batch.column_names if not c.startswith("extra_")])
    extra = batch.column("extra_text_tokens")
    extra = extra.combine_chunks() if isinstance(extra, pa.ChunkedArray) else extra
    offsets = extra.offsets.to_numpy()  # (B + 1,), not rebased when the batch is a slice
    counts = np.diff(offsets)
    pick = np.floor(rng.random(len(counts)) * (counts + 1)).astype(np.int64)  # 0: the first caption, k: extra k-1
    rows = np.flatnonzero(pick > 0)
    if not len(rows):
        return out
    values = offsets[rows] - offsets[0] + pick[rows] - 1  # indices into the flattened extras of this batch
    for name, extra_name in EXTRA_OF.items():
        if name in out and extra_name in batch.column_names:
            col = batch.column(extra_name)
            col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
            pad = out[name].shape[1] if name == "text_tokens" else None  # the first caption's, padded already
            flat = _column_to_numpy(pa.concat_arrays([col]).flatten(), pad)  # (E, ...) every extra caption's values
            out[name] = out[name].copy()
            out[name][rows] = flat[values]
    return out


def load_prepared(
    path_or_paths: str | Path | Sequence[str | Path],
    bucket: str | Sequence[int] | None = None,
    columns: Sequence[str] | None = None,
) -> Any:
    """A `ray.data.Dataset` of one bucket of one or more prepared folders (a "A,B" string works too).

    Rows come out as numpy tensors of the shapes in `prepare`'s row contract, so `iter_torch_batches`
    gives (B, N, P) float32 patches, (B, L, D) float16 text tokens, and so on. `columns` defaults to
    TRAIN_COLUMNS (the numeric ones); pass `prepare.COLUMNS` for all of them.
    """
    import ray

    from pipelines.data.runtime import ensure_ray

    if isinstance(path_or_paths, (str, Path)):
        paths = [_root(p.strip()) for p in str(path_or_paths).split(",") if p.strip()]
    else:
        paths = [_root(p) for p in path_or_paths]
    if not paths:
        raise ValueError("no prepared dataset path given")
    infos, files = [], []
    for p in paths:
        info, b, fs = bucket_files(p, bucket)
        infos.append((p, info, b))
        files.extend(fs)
    _check_compatible(infos)
    if not files:
        raise ValueError(f"bucket {infos[0][2]['name']} holds no clips in {', '.join(map(str, paths))}")
    ensure_ray()
    wanted = list(columns or TRAIN_COLUMNS)
    multi = [EXTRA_OF[c] for c in EXTRA_OF if c in wanted]
    files, filesystem = _arrow_paths(files)
    if multi and all("extra_captions" in i.get("columns", ()) for _, i, _ in infos):
        # Multi-caption rows: read the other captions too and draw one per row each time the row is read.
        ds = ray.data.read_parquet(
            files,
            columns=wanted + ["extra_text_tokens", *[m for m in multi if m != "extra_text_tokens"]],
            filesystem=filesystem,
        )
        return ds.map_batches(draw_captions, batch_format="pyarrow", zero_copy_batch=True)
    ds = ray.data.read_parquet(files, columns=wanted, filesystem=filesystem)
    return ds.map_batches(_to_tensors, batch_format="pyarrow", zero_copy_batch=True)


def _arrow_paths(files: list[str]) -> tuple[list[str], Any]:
    """(paths, pyarrow filesystem) for Ray Data's reader: local files as they are (None: pyarrow's local
    filesystem); remote ones through the same fsspec filesystem prepare wrote them with, so its settings
    (endpoint, credentials from the environment) apply to the read too."""
    if not files or not _is_uri(files[0]):
        return files, None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = _fs(files[0])
    return [_fs(f)[1] for f in files], PyFileSystem(FSSpecHandler(fs))


def iter_prepared(
    path: str | Path, bucket: str | Sequence[int] | None = None, columns: Sequence[str] | None = None
) -> Iterator[dict[str, Any]]:
    """Rows of one bucket as dicts of numpy values, shard by shard, without Ray."""

    _, _, files = bucket_files(path, bucket)
    for f in files:
        arrays = table_to_numpy(open_parquet(f).read(columns=list(columns) if columns else None))
        n = len(next(iter(arrays.values())))
        for i in range(n):
            yield {k: v[i] for k, v in arrays.items()}


def read_prepared(
    path: str | Path, bucket: str | Sequence[int] | None = None, columns: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """One bucket of a prepared folder as {column: ndarray} (all rows, in shard order), without Ray."""
    import pyarrow as pa

    _, _, files = bucket_files(path, bucket)
    if not files:
        raise ValueError(f"{path}: the bucket holds no clips")
    table = pa.concat_tables([open_parquet(f).read(columns=list(columns) if columns else None) for f in files])
    return table_to_numpy(table)
