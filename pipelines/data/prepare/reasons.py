"""Why an input was rejected: the one-line reason and detail of an exception raised while reading it (probe and
decode both report through this)."""

from __future__ import annotations

from pipelines.data.prepare.isolate import DecoderFailed
from pipelines.data.prepare.storage import StorageError
from sora_model.video import VideoReadError

VIDEO_ERROR_REASONS = {
    # sora_model.video.VideoReadError.reason -> our reject reason
    "missing file": "missing",
    "empty file": "empty",
    "not a video": "not a video",
    "truncated/undecodable": "truncated",
    "no video stream": "unreadable",
}


def reject_reason(err: BaseException, default: str = "unreadable") -> tuple[str, str]:
    """(reject reason, one-line detail) of an exception raised while reading an input."""
    if isinstance(err, VideoReadError):
        return VIDEO_ERROR_REASONS.get(err.reason, default), str(err)
    if isinstance(err, (StorageError, DecoderFailed)):
        return err.reason, str(err)
    return default, f"{type(err).__name__}: {err}"
