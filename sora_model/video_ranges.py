"""Reading an open remote file by seeking, where `sora_model.video` reads a local one from its start."""

from __future__ import annotations

from typing import BinaryIO

from sora_model.video import VideoReadError, _name, _open_av, _require_video_stream


def frames_present_by_seeking(source: BinaryIO, need: int) -> None:
    """`require_frames_present` of an open file: seek (by the container's index) to the packet in decode position
    need - 1 and demux up to it. A file cut before it ends the demuxing first (FFmpeg reads past the end of the
    data); a whole file reads the header, the index and a few packets there. Positions are found by time (the
    first packet's dts + position / fps): on a variable frame rate the packet checked may be a few positions off,
    within the PACKET_REORDER_MARGIN the caller added."""
    import av

    path = _name(source)
    container = _open_av(source)
    with container:
        _require_video_stream(path, container)
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
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
            raise VideoReadError(path, "truncated/undecodable", f"reading the packets of frame {need - 1}: {err}") from None
    raise VideoReadError(path, "truncated/undecodable", f"the data ends before frame {need - 1}'s packet")
