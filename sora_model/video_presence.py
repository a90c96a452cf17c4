"""Whether a file holds the data of the frames a plan needs, checked by demuxing packets without decoding: a local
file from its start, an open remote file by seeking to the packets around the last frame needed."""

from __future__ import annotations

import os
from typing import BinaryIO

from sora_model.video import (
    Source,
    VideoReadError,
    _check_file,
    _check_indices,
    _is_image,
    _name,
    _open_av,
    _require_video_stream,
    _video_stream,
)

PACKET_REORDER_MARGIN = 16
"""Packets past a frame's index that `require_frames_present` also asks for: with B-frames a frame's packet
comes up to a few places after its display index (x264 reorders at most 16)."""


def require_frames_present(path: Source, index: int, num_frames: int) -> None:
    """Raise VideoReadError ("truncated/undecodable") unless the file holds the data of frames 0..index.

    Demuxes packets without decoding them (a fraction of a millisecond on a small clip, where decoding
    the frame costs milliseconds), so a file cut after a front index is caught at probe time for the
    price of reading it. A packet that is present but corrupt still fails later, in `read_frames`.
    An open file (`Source`) is checked by seeking instead (`frames_present_by_seeking`): only the packets
    around the last frame needed are read.
    """
    import av

    path = path if not isinstance(path, os.PathLike) else str(path)
    _check_file(path)
    if _is_image(_name(path)):
        _check_indices(_name(path), [index], 1)
        return
    need = min(int(index) + 1 + PACKET_REORDER_MARGIN, int(num_frames))
    if not isinstance(path, str):
        return frames_present_by_seeking(path, need)
    container = _open_av(path)
    count = 0
    with container:
        _require_video_stream(path, container)
        try:
            for packet in container.demux(container.streams.video[0]):
                count += bool(packet.size)  # the flush packet at the end is empty
                if count >= need:
                    return
        except (av.FFmpegError, OSError, ValueError) as err:
            raise VideoReadError(path, "truncated/undecodable", f"after packet {count}: {err}") from None
    raise VideoReadError(
        path, "truncated/undecodable", f"only {count} of {num_frames} frames' data present, frame {index} needed"
    )


def frames_present_by_seeking(source: BinaryIO, need: int) -> None:
    """`require_frames_present` of an open file: seek (by the container's index) to the packet in decode position
    need - 1 and demux up to it. A file cut before it ends the demuxing first (FFmpeg reads past the end of the
    data); a whole file reads the header, the index and a few packets there. Positions are found by time (the
    first packet's dts + position / fps): on a variable frame rate the packet checked may be a few positions off,
    within the PACKET_REORDER_MARGIN the caller added."""
    import av

    with _video_stream(source) as (path, container, stream, rate):
        try:
            first = next((p for p in container.demux(stream) if p.size and p.dts is not None), None)
        except (av.FFmpegError, OSError, ValueError) as err:
            raise VideoReadError(path, "truncated/undecodable", f"reading the first packet: {err}") from None
        if first is None or not rate or not stream.time_base:
            raise VideoReadError(path, "truncated/undecodable", "no packet with a timestamp")
        # Half a frame early: the packet at position need - 1 has dts >= target, the one before it does not.
        target = first.dts + int(round((need - 1.5) / float(rate) / float(stream.time_base)))
        if target <= first.dts:
            return
        try:
            container.seek(target, stream=stream, backward=True, any_frame=True)
            for packet in container.demux(stream):
                if packet.size and packet.dts is not None and packet.dts >= target:
                    return
        except (av.FFmpegError, OSError, ValueError) as err:
            raise VideoReadError(
                path, "truncated/undecodable", f"reading the packets of frame {need - 1}: {err}"
            ) from None
    raise VideoReadError(path, "truncated/undecodable", f"the data ends before frame {need - 1}'s packet")
