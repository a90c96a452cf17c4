"""Manifests: JSONL, CSV or a folder of videos with NAME.txt captions, local or an fsspec URI -> entries.

A manifest of millions of rows is never held by one process. The driver streams it once (`scan_manifest`:
its sha256, its row count and the byte offsets of at most MAX_CHUNK_OFFSETS chunk starts); each chunk is
then parsed where it is read, by a plain Ray task of the grouping stage (`group.parse_split` ->
`parse_chunks` -> `parse_chunk`). A folder manifest is listed on the
driver (a listing is what defines it), its captions read by the tasks.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.data.prepare.options import CAPTION_COLUMNS, VIDEO_EXTENSIONS, PrepareError

MAX_CHUNK_OFFSETS = 4096
"""Chunk starts the scan keeps at most: when full, every other one is dropped and the step doubles, so the
driver's memory does not grow with the manifest."""
CHUNK_ROWS_MAX = 20_000
"""Manifest rows per parse task at most (a few MB of entries per block)."""
SCAN_BLOCK = 1 << 20
"""Bytes read per call while scanning (a remote manifest is streamed, never read whole)."""


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _strip_file_scheme(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def _resolve(path: str, base: str) -> str:
    path = _strip_file_scheme(path.strip())
    if _is_uri(path) or os.path.isabs(path):
        return path
    if _is_uri(base):
        return base.rstrip("/") + "/" + path
    return os.path.normpath(os.path.join(base, path))


def _entry(line: int, path: Any, caption: Any, base: str, start_s: Any = None, end_s: Any = None) -> dict[str, Any]:
    row = {"line": line, "path": "", "source": "", "caption": "", "start_s": None, "end_s": None, "error": ""}
    if not isinstance(path, str) or not path.strip():
        row["error"] = "no 'path'"
        return row
    row["path"], row["source"] = path, _resolve(path, base)
    row["caption"] = caption.strip() if isinstance(caption, str) else ""
    for key, value in (("start_s", start_s), ("end_s", end_s)):
        if value in (None, ""):
            continue
        try:
            row[key] = float(value)
        except (TypeError, ValueError):
            row["error"] = f"{key} '{value}' is not a number"
    return row


@dataclass
class ManifestScan:
    """What the driver knows about a manifest after one streaming pass: enough to split it into chunks."""

    manifest: str
    kind: str
    """'jsonl', 'csv' or 'folder'."""
    base: str
    """Folder that relative paths are resolved against (a URI prefix for a remote manifest)."""
    sha256: str
    num_rows: int
    """Data rows (non-empty lines; files of a folder): the denominator of progress."""
    offsets: list[tuple[int, int]] = field(default_factory=list)
    """(byte offset, line number) of chunk starts, every `step` rows; (index, line) for a folder."""
    end: int = 0
    """Byte size of the file (number of files for a folder): the end of the last chunk."""
    step: int = 1
    """Rows between two kept offsets."""
    fields: list[str] = field(default_factory=list)
    """CSV header, lower-cased."""
    files: list[str] = field(default_factory=list)
    """Folder manifests: the media files, relative to the folder, sorted."""

    def chunks(self, target_rows: int) -> list[tuple[int, int, int]]:
        """(start, end, first line) of read chunks of about `target_rows` rows each (in order)."""
        every = max(1, min(target_rows, CHUNK_ROWS_MAX) // self.step)
        starts = self.offsets[::every]
        ends = [s for s, _ in starts[1:]] + [self.end]
        return [(s, e, line) for (s, line), e in zip(starts, ends, strict=True) if e > s]


def _open(manifest: str):
    if _is_uri(manifest):
        import fsspec

        return fsspec.open(manifest, "rb").open()
    return open(manifest, "rb")


def scan_manifest(manifest: str) -> ManifestScan:
    """One streaming pass over the manifest: sha256, rows and chunk offsets (PrepareError if unreadable)."""
    manifest = _strip_file_scheme(manifest)
    if not _is_uri(manifest) and os.path.isdir(manifest):
        return _scan_folder(manifest)
    if not _is_uri(manifest) and not os.path.exists(manifest):
        raise PrepareError(f"manifest {manifest} not found")
    base = manifest.rsplit("/", 1)[0] if _is_uri(manifest) else os.path.dirname(os.path.abspath(manifest))
    kind = "csv" if manifest.lower().endswith(".csv") else "jsonl"
    scan = ManifestScan(manifest=manifest, kind=kind, base=base, sha256="", num_rows=0)
    digest = hashlib.sha256()
    step, pos, line, in_quotes = 1, 0, 0, False
    try:
        with _open(manifest) as f:
            pending = b""
            while True:
                block = f.read(SCAN_BLOCK)
                digest.update(block)
                lines = (pending + block).split(b"\n")
                pending = lines.pop() if block else b""
                for raw in lines:
                    start, pos, line = pos, pos + len(raw) + 1, line + 1
                    if kind == "csv" and line == 1:
                        scan.fields = _csv_header(raw, manifest)
                        continue
                    if in_quotes or not raw.strip():  # a quoted CSV field may span lines: never cut inside it
                        in_quotes ^= kind == "csv" and raw.count(b'"') % 2 == 1
                        continue
                    in_quotes = kind == "csv" and raw.count(b'"') % 2 == 1
                    if scan.num_rows % step == 0:
                        scan.offsets.append((start, line))
                        if len(scan.offsets) > MAX_CHUNK_OFFSETS:
                            scan.offsets, step = scan.offsets[::2], step * 2
                    scan.num_rows += 1
                if not block:
                    break
    except (FileNotFoundError, OSError) as err:
        raise PrepareError(f"cannot read manifest {manifest}: {' '.join(str(err).split())}") from None
    if not scan.num_rows:
        raise PrepareError(f"manifest {manifest} has no entries")
    scan.sha256, scan.end, scan.step = digest.hexdigest(), pos, step
    return scan


def _csv_header(raw: bytes, manifest: str) -> list[str]:
    text = raw.decode("utf-8-sig", errors="replace")
    fields = [f.strip().lower() for f in next(csv.reader([text]), [])]
    if "path" not in fields or not any(c in fields for c in CAPTION_COLUMNS):
        raise PrepareError(f"CSV manifest {manifest} needs columns 'path' and 'caption' (or 'text'); it has {fields}")
    return fields


def parse_chunk(scan: ManifestScan, start: int, end: int, first_line: int) -> list[dict[str, Any]]:
    """The entries of one chunk {line, path, source, caption, start_s, end_s, error}, read where it runs."""
    if scan.kind == "folder":
        return [_folder_entry(scan, i, line) for line, i in enumerate(range(start, end), start=first_line)]
    from pipelines.data.prepare.storage import with_retries

    def read() -> bytes:  # a ranged read; retried with backoff on throttling or a dropped connection
        with _open(scan.manifest) as f:
            f.seek(start)
            return f.read(end - start)

    data = with_retries(read, scan.manifest)
    text = data.decode("utf-8-sig" if start == 0 else "utf-8", errors="replace")
    if scan.kind == "csv":
        return _parse_csv(text, scan, first_line)
    return _parse_jsonl(text, scan.base, first_line)


def read_manifest(manifest: str) -> tuple[list[dict[str, Any]], str]:
    """Every entry of a manifest and its sha256, in one process (tests, small manifests; `prepare` streams).

    A malformed entry keeps its line with `error` set (it becomes a reject, the run goes on); a manifest
    that cannot be read at all is a PrepareError.
    """
    scan = scan_manifest(manifest)
    return [e for s, e, line in scan.chunks(CHUNK_ROWS_MAX) for e in parse_chunk(scan, s, e, line)], scan.sha256


def _parse_jsonl(text: str, base: str, first_line: int = 1) -> list[dict[str, Any]]:
    entries = []
    for line, raw in enumerate(text.split("\n"), start=first_line):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            row = _entry(line, None, None, base)
            row["error"] = f"not JSON: {err.msg}"
            entries.append(row)
            continue
        if not isinstance(obj, dict):
            row = _entry(line, None, None, base)
            row["error"] = "not a JSON object"
            entries.append(row)
            continue
        caption = obj.get("caption", obj.get("text"))
        entries.append(_entry(line, obj.get("path"), caption, base, obj.get("start_s"), obj.get("end_s")))
    return entries


def _parse_csv(text: str, scan: ManifestScan, first_line: int) -> list[dict[str, Any]]:
    caption_col = next(c for c in CAPTION_COLUMNS if c in scan.fields)
    entries = []
    reader = csv.reader(io.StringIO(text))
    prev = 0
    for values in reader:
        if not any(v.strip() for v in values):
            prev = reader.line_num
            continue
        line, prev = first_line + prev, reader.line_num  # a record's first physical line
        row = dict(zip(scan.fields, values, strict=False))
        entries.append(
            _entry(line, row.get("path"), row.get(caption_col), scan.base, row.get("start_s"), row.get("end_s"))
        )
    return entries


def _scan_folder(folder: str) -> ManifestScan:
    """Every video/image under `folder` (recursively, sorted), captioned by NAME.txt beside it."""
    from sora_model.video import IMAGE_EXTENSIONS

    root = Path(folder).resolve()
    media = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS
    )
    if not media:
        raise PrepareError(f"folder manifest {folder} holds no videos or images ({', '.join(VIDEO_EXTENSIONS)})")
    digest = hashlib.sha256()
    files = []
    for path in media:
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace") if txt.exists() else ""
        rel = path.relative_to(root).as_posix()
        digest.update(f"{rel}\0{caption}\0".encode())
        files.append(rel)
    n = len(files)
    return ManifestScan(
        manifest=str(root),
        kind="folder",
        base=str(root),
        sha256=digest.hexdigest(),
        num_rows=n,
        offsets=[(i, i + 1) for i in range(n)],
        end=n,
        files=files,
    )


def _folder_entry(scan: ManifestScan, index: int, line: int) -> dict[str, Any]:
    rel = scan.files[index]
    txt = Path(scan.base, rel).with_suffix(".txt")
    caption = txt.read_text(encoding="utf-8", errors="replace") if txt.exists() else ""
    return _entry(line, rel, caption, scan.base)


def entry_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("line", pa.int64()),
            ("path", pa.string()),
            ("source", pa.string()),
            ("caption", pa.string()),
            ("start_s", pa.float64()),
            ("end_s", pa.float64()),
            ("error", pa.string()),
        ]
    )


def parse_chunks(chunks: Any, scan: list[Any], done: list[Any]) -> Any:
    """Chunk descriptors {start, end, line} -> manifest entries, without finished lines (group.parse_split)."""
    import numpy as np
    import pyarrow as pa

    from pipelines.data.prepare.state import shared

    info: ManifestScan = shared(scan[0])
    rows = [e for c in chunks.to_pylist() for e in parse_chunk(info, c["start"], c["end"], c["line"])]
    if done[0] is not None and rows:
        finished = shared(done[0])["lines"]
        keep = ~np.isin(np.asarray([r["line"] for r in rows], dtype=np.int64), finished)
        rows = [r for r, k in zip(rows, keep, strict=True) if k]
    return pa.Table.from_pylist(rows, schema=entry_schema())
