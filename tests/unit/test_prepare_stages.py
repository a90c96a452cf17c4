"""The stages of `sora data prepare`, one at a time, without Ray: manifest chunks, planning with several
captions per clip, caption columns, the loader's caption draw, retries."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from pipelines.data.prepare import manifest as manifest_mod
from pipelines.data.prepare.options import Bucket
from pipelines.data.prepare.probe import PlanInputs
from pipelines.data.prepare.storage import StorageError, StorageUnavailable, with_retries
from sora_model.video import write_video


def test_scan_keeps_bounded_offsets_and_chunks_cover_every_row(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_mod, "MAX_CHUNK_OFFSETS", 16)
    rows = [json.dumps({"path": f"v{i % 7}.mp4", "caption": f"c {i}", "start_s": i % 5}) for i in range(5000)]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(rows[:10]) + "\n\n" + "\n".join(rows[10:]))  # a blank line, no final newline
    scan = manifest_mod.scan_manifest(str(path))
    assert scan.num_rows == 5000 and len(scan.offsets) <= 16 + 1 and scan.step >= 5000 // 17
    chunks = scan.chunks(700)
    assert 2 <= len(chunks) <= 16
    entries = [e for s, e, line in chunks for e in manifest_mod.parse_chunk(scan, s, e, line)]
    assert [e["caption"] for e in entries] == [f"c {i}" for i in range(5000)]
    assert entries[9]["line"] == 10 and entries[10]["line"] == 12  # physical line numbers, blank line skipped
    csv = tmp_path / "m.csv"
    csv.write_text('path,caption\na.mp4,"two\nlines"\nb.mp4,z\n\nc.mp4,w\n')
    got, _ = manifest_mod.read_manifest(str(csv))
    assert [(e["line"], e["caption"]) for e in got] == [(2, "two\nlines"), (4, "z"), (6, "w")]


def test_grouping_puts_every_row_of_a_source_in_one_block(tmp_path):
    from pipelines.data.prepare.group import merge, parse_split, partition_of

    rows = [json.dumps({"path": f"v{i % 13}.mp4", "caption": f"c {i}"}) for i in range(400)] + [
        '{"caption": "no path"}'
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(rows) + "\n")
    scan = manifest_mod.scan_manifest(str(path))
    chunks = scan.chunks(60)
    pieces = [parse_split(s, e, line, scan, [None], 4) for s, e, line in chunks]
    blocks = [merge(*[p[k] for p in pieces]) for k in range(4)]
    assert sum(b.num_rows for b in blocks) == 401  # every row once, the bad entry too
    homes = {}
    for k, block in enumerate(blocks):
        for src in block.column("source").to_pylist():
            assert homes.setdefault(src, k) == k  # one block per source
        assert block.column("source").to_pylist() == sorted(block.column("source").to_pylist())
    assert len(homes) == 14 and partition_of("a.mp4", 0, 7) == partition_of("a.mp4", 99, 7)  # stable, by source


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("v") / "clip.mp4"
    frames = np.random.default_rng(0).integers(0, 255, (16, 32, 32, 3), dtype=np.uint8)
    write_video(str(path), frames, fps=8)
    return str(path)


def _entry(line, source, caption, start_s=None):
    return {
        "line": line,
        "path": source,
        "source": source,
        "caption": caption,
        "start_s": start_s,
        "end_s": None,
        "error": "",
    }


def test_several_captions_of_one_clip_are_one_plan(video):
    plan = PlanInputs([Bucket(8, 32, 32)], fps=8, clips_per_video=1, stride_s=None)
    plans, rejects = plan(
        [
            _entry(3, video, "a red circle"),
            _entry(7, video, "a circle in red"),
            _entry(9, video, "a red circle"),
            _entry(11, video, "later", start_s=1.0),
            _entry(12, video, ""),
        ]
    )
    by_start = {p["start_s"]: p for p in plans}
    assert set(by_start) == {0.0, 1.0}
    assert by_start[0.0]["captions"] == ["a red circle", "a circle in red"] and by_start[0.0]["lines"] == [3, 7]
    assert by_start[0.0]["line_clips"] == [1, 1] and by_start[1.0]["captions"] == ["later"]
    assert [(r["line"], r["reason"]) for r in rejects] == [(9, "duplicate"), (12, "no caption")]
    assert "line 3" in rejects[0]["detail"]


def test_a_missing_file_rejects_every_row_that_names_it(tmp_path):
    plan = PlanInputs([Bucket(8, 32, 32)], fps=8, clips_per_video=1, stride_s=None)
    missing = str(tmp_path / "nope.mp4")
    plans, rejects = plan([_entry(1, missing, "a"), _entry(2, missing, "b")])
    assert plans == [] and [(r["line"], r["reason"]) for r in rejects] == [(1, "missing"), (2, "missing")]


def test_caption_columns_and_the_loaders_draw():
    from pipelines.data.load import draw_captions
    from pipelines.data.prepare.captions import EmbedCaptions
    from pipelines.data.prepare.encode import by_bucket
    from sora_model.config import TextEncoderConfig

    embed = EmbedCaptions(TextEncoderConfig())
    table = pa.table(
        {
            "clip_id": ["a", "b", "c", "d"],
            "bucket": ["x", "y", "x", "x"],
            "captions": [["one"], ["two", "three"], ["one", "four", "five"], ["six"]],
        }
    )
    rows = embed(table)
    assert rows.column("caption").to_pylist() == ["one", "two", "one", "six"]
    assert rows.column("extra_captions").to_pylist() == [[], ["three"], ["four", "five"], []]
    alone = embed.embed(["four"])
    extra_c = np.asarray(rows.column("extra_text_tokens").to_pylist()[2][0], dtype=np.float16)
    n = int(alone["mask"][0].sum())  # stored at its true length (format 2); the encoder's padding is zeros
    assert len(extra_c) == n < alone["tokens"].shape[1] and not alone["tokens"][0, n:].any()
    np.testing.assert_array_equal(extra_c, alone["tokens"][0, :n])  # the extra caption's own embedding, fp16
    # A slice (what Ray Data hands a stage) split by bucket keeps each row's own embeddings.
    parts = by_bucket(rows.slice(1, 3))
    assert parts["x"].column("clip_id").to_pylist() == ["c", "d"]
    assert parts["x"].column("text_tokens").to_pylist() == rows.column("text_tokens").to_pylist()[2:]
    # The loader's draw: every caption of a clip comes up, each with its own embedding.
    seen: dict[str, set] = {"a": set(), "c": set()}
    batch = rows.drop_columns(["bucket"])
    rng = np.random.default_rng(0)
    for _ in range(60):
        out = draw_captions(batch, rng)
        for i, cid in enumerate(batch.column("clip_id").to_pylist()):
            if cid in seen:
                seen[cid].add(str(out["caption"][i]))
            if out["caption"][i] == "four":
                np.testing.assert_array_equal(out["text_tokens"][i], alone["tokens"][0])
        assert "extra_captions" not in out and out["text_tokens"].shape == (4, 32, 384)
    assert seen == {"a": {"one"}, "c": {"one", "four", "five"}}


def test_transient_errors_are_retried_then_stop_the_run_and_only_the_inputs_own_faults_reject_it():
    import errno

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("503 SlowDown: please reduce your request rate")
        return "ok"

    def raising(err):
        def fn():
            calls.append(1)
            raise err

        return fn

    assert with_retries(flaky, "s3://b/k", backoff_s=0.001) == "ok" and len(calls) == 3
    # Still failing after the retries: the store is down, not the input; the run stops (nothing rejected).
    with pytest.raises(StorageUnavailable, match="after 4 tries"):
        with_retries(raising(ConnectionError("reset by peer")), "s3://b/k", retries=4, backoff_s=0.001)
    calls.clear()
    with pytest.raises(StorageUnavailable, match="after 3 tries"):
        with_retries(
            raising(OSError(errno.EAGAIN, "Resource temporarily unavailable")), "s3://b/k", retries=3, backoff_s=0.001
        )
    assert len(calls) == 3
    # A full or failing disk: no retry, the run stops.
    for code in (errno.ENOSPC, errno.EIO):
        calls.clear()
        with pytest.raises(StorageUnavailable, match=f"Errno {code}"):
            with_retries(raising(OSError(code, os.strerror(code))), "s3://b/k", backoff_s=0.001)
        assert len(calls) == 1
    # The input's own faults are its reject.
    with pytest.raises(StorageError) as err:
        with_retries(raising(FileNotFoundError("s3://b/k")), "s3://b/k")
    assert err.value.reason == "missing"
    with pytest.raises(StorageError) as err:
        with_retries(raising(PermissionError(errno.EACCES, "Forbidden")), "s3://b/k")
    assert err.value.reason == "unreadable"


def test_the_default_caption_length_is_the_encoders_own_maximum(tmp_path):
    from pipelines.data.commands import add_prepare_arguments
    from pipelines.data.prepare.args import options_from_args
    from pipelines.data.prepare.options import PrepareError, encoder_max_length

    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5"}))  # relative positions: no table
    (t5 / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text(
        json.dumps({"model_type": "clip", "text_config": {"max_position_embeddings": 77}})
    )
    # transformers' "unbounded"
    (clip / "tokenizer_config.json").write_text(json.dumps({"model_max_length": int(1e30)}))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"model_type": "t5"}))
    assert encoder_max_length(str(t5)) == 512 and encoder_max_length(str(clip)) == 77
    with pytest.raises(PrepareError, match="pass --max-text-length"):
        encoder_max_length(str(bare))
    assert encoder_max_length("minilm") == 32  # the packaged demo encoder: what its recipes train with

    import argparse

    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    base = ["--manifest", "m.jsonl", "--out", "o", "--resolution", "32", "--frames", "8"]
    assert options_from_args(parser.parse_args([*base, "--text-encoder", str(t5)])).text_encoder.max_length == 512
    assert (
        options_from_args(
            parser.parse_args([*base, "--text-encoder", str(t5), "--max-text-length", "226"])
        ).text_encoder.max_length
        == 226
    )
    opts = options_from_args(
        parser.parse_args([*base, "--max-upscale", "2", "--max-fps-ratio", "3", "--scratch", "/nvme"])
    )
    assert (opts.max_upscale, opts.max_fps_ratio, opts.scratch) == (2.0, 3.0, "/nvme")
    assert opts.settings("x")["max_upscale"] == 2.0  # part of what a resume must match; the scratch folder is not
    assert "scratch" not in opts.settings("x")


def _segfault(path: str) -> None:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)  # what a decoder bug does to its process


def _hang(path: str) -> None:
    import time

    time.sleep(3600)


def test_a_decoder_crash_or_hang_is_the_inputs_reject_and_work_goes_on(video):
    from pipelines.data.prepare.decode import decode_frames, decode_rows
    from pipelines.data.prepare.isolate import DecoderFailed, IsolatedCalls
    from pipelines.data.prepare.storage import LocalFiles
    from sora_model.video import probe_video

    calls = IsolatedCalls(timeout_s=2.0)
    with pytest.raises(DecoderFailed, match="died \\(signal SIGSEGV\\)") as err:
        calls(_segfault, video)
    assert err.value.reason == "decoder crashed"
    assert calls(probe_video, video).num_frames == 16  # a fresh child answers the next call
    with pytest.raises(DecoderFailed, match="within 2s") as err:
        calls(_hang, video)
    assert err.value.reason == "decoder timed out"
    want = decode_frames(video, [0, 1], 32, 32)
    np.testing.assert_array_equal(calls(decode_frames, video, [0, 1], 32, 32), want)
    calls.stop()

    # Through decode_rows: the bad clip is a reject with the reason, the others are decoded.
    rows = [
        {
            "clip_id": f"clip{i}",
            "source": video,
            "path": "v.mp4",
            "start_s": float(i),
            "indices": [i, i + 1] if i != 5 else [5],
            "lines": [i + 1],
            "line_clips": [3],
        }
        for i in (0, 5, 2)
    ]
    kept, pixels, rejects = decode_rows(rows, Bucket(2, 32, 32), LocalFiles(), _crashes_on_frame_5)
    assert kept == [0, 2] and pixels.shape == (2, 2, 32, 32, 3)
    np.testing.assert_array_equal(pixels[1], decode_frames(video, [2, 3], 32, 32))
    assert [(r["line"], r["reason"], r["clip_id"], r["line_clips"]) for r in rejects] == [
        (6, "decoder crashed", "clip5", 3)
    ]


def _crashes_on_frame_5(local, indices, height, width):
    from pipelines.data.prepare.decode import decode_frames

    if indices == [5]:
        _segfault(local)
    return decode_frames(local, indices, height, width)


def test_autoencoder_batches_are_sized_by_bytes(monkeypatch):
    from pipelines.data.prepare import encode
    from sora_model.config import AutoencoderConfig

    patchify = encode.Patchify(AutoencoderConfig(), (1, 4, 4))
    clip = (4, 16, 16, 3)
    monkeypatch.setattr(encode, "VAE_BATCH_BYTES", 2 * int(np.prod(clip)) * 4 + 1)  # two clips of float32 input
    calls = []
    real = patchify.autoencoder.encode
    monkeypatch.setattr(patchify.autoencoder, "encode", lambda x: calls.append(tuple(x.shape)) or real(x))
    pixels = np.random.default_rng(0).integers(0, 255, (5, *clip), dtype=np.uint8)
    tokens, grid = patchify(pixels)
    assert [c[0] for c in calls] == [2, 2, 1] and grid == (4, 4, 4)
    whole, _ = encode.Patchify(AutoencoderConfig(), (1, 4, 4))(pixels)
    np.testing.assert_array_equal(tokens, whole)
    monkeypatch.undo()
    big = (64, 1024, 1024, 3)  # 805 MB of float32 input per clip: 64 of them would be a 50 GB batch
    assert patchify.rows_per_call((64, *big)) == encode.VAE_BATCH_BYTES // (int(np.prod(big)) * 4) == 2
