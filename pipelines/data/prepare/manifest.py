"""Manifests: JSONL, CSV or a folder of videos with NAME.txt captions, local or an fsspec URI -> entries."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

from pipelines.data.prepare.options import CAPTION_COLUMNS, VIDEO_EXTENSIONS, PrepareError


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


def read_manifest(manifest: str) -> tuple[list[dict[str, Any]], str]:
    """Entries {line, path, source, caption, start_s, end_s, error} and the manifest's sha256.

    A malformed entry keeps its line with `error` set (it becomes a reject, the run goes on); a manifest
    that cannot be read at all is a PrepareError.
    """
    manifest = _strip_file_scheme(manifest)
    if not _is_uri(manifest) and os.path.isdir(manifest):
        return _read_folder(manifest)
    if _is_uri(manifest):
        import fsspec

        try:
            with fsspec.open(manifest, "rb") as f:
                data = f.read()
        except (FileNotFoundError, OSError) as err:
            raise PrepareError(f"cannot read manifest {manifest}: {err}") from None
        base = manifest.rsplit("/", 1)[0]
    else:
        if not os.path.exists(manifest):
            raise PrepareError(f"manifest {manifest} not found")
        data = Path(manifest).read_bytes()
        base = os.path.dirname(os.path.abspath(manifest))
    sha = hashlib.sha256(data).hexdigest()
    text = data.decode("utf-8-sig", errors="replace")
    if manifest.lower().endswith(".csv"):
        entries = _parse_csv(text, manifest, base)
    else:
        entries = _parse_jsonl(text, base)
    if not entries:
        raise PrepareError(f"manifest {manifest} has no entries")
    return entries, sha


def _parse_jsonl(text: str, base: str) -> list[dict[str, Any]]:
    entries = []
    for line, raw in enumerate(text.splitlines(), start=1):
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


def _parse_csv(text: str, manifest: str, base: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip().lower() for f in reader.fieldnames or []]
    caption_col = next((c for c in CAPTION_COLUMNS if c in fields), None)
    if "path" not in fields or caption_col is None:
        raise PrepareError(f"CSV manifest {manifest} needs columns 'path' and 'caption' (or 'text'); it has {fields}")
    entries = []
    for line, raw in enumerate(reader, start=2):  # line 1 is the header
        row = {(k or "").strip().lower(): v for k, v in raw.items()}
        entries.append(_entry(line, row.get("path"), row.get(caption_col), base, row.get("start_s"), row.get("end_s")))
    return entries


def _read_folder(folder: str) -> tuple[list[dict[str, Any]], str]:
    """Every video/image under `folder` (recursively, sorted), captioned by NAME.txt beside it."""
    from sora_model.video import IMAGE_EXTENSIONS

    root = Path(folder).resolve()
    media = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)
    if not media:
        raise PrepareError(f"folder manifest {folder} holds no videos or images ({', '.join(VIDEO_EXTENSIONS)})")
    digest = hashlib.sha256()
    entries = []
    for line, path in enumerate(media, start=1):
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace") if txt.exists() else ""
        rel = path.relative_to(root).as_posix()
        digest.update(f"{rel}\0{caption}\0".encode())
        entries.append(_entry(line, rel, caption, str(root)))
    return entries, digest.hexdigest()
