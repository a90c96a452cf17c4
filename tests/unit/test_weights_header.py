"""`weights_io.read_header` on hand-written bad safetensors headers: each is a one-line ValueError naming the file
and what is wrong (never a KeyError or TypeError from deep in the reader), before any tensor is read."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from sora_model.weights_io import iter_tensors, read_header

GOOD = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}


def write(path, header, data: bytes = bytes(24)):
    """A safetensors file with this header (any JSON value) and these data bytes."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return str(path)


def entry(**changes):
    return {"a": {**GOOD["a"], **changes}}


def without(key):
    return {"a": {k: v for k, v in GOOD["a"].items() if k != key}}


BAD = [
    ("list", ["a", "b"], "its header is a JSON list, not an object"),
    ("number", 7, "its header is a JSON int, not an object"),
    ("entry-string", {"a": "F32"}, "tensor 'a' has a header entry 'F32', not an object"),
    ("no-dtype", without("dtype"), "tensor 'a' has dtype None"),
    ("bad-dtype", entry(dtype="F8"), "tensor 'a' has dtype 'F8', not one of"),
    ("unhashable-dtype", entry(dtype=["F32"]), "tensor 'a' has dtype \\['F32'\\]"),
    ("no-shape", without("shape"), "tensor 'a' has shape None, not a list of non-negative integers"),
    ("shape-string", entry(shape="2x3"), "tensor 'a' has shape '2x3'"),
    ("shape-negative", entry(shape=[-2, 3]), "tensor 'a' has shape \\[-2, 3\\]"),
    ("shape-float", entry(shape=[2.0, 3]), "tensor 'a' has shape \\[2.0, 3\\]"),
    ("no-offsets", without("data_offsets"), "tensor 'a' has data_offsets None, not \\[begin, end\\]"),
    ("offsets-three", entry(data_offsets=[0, 12, 24]), "tensor 'a' has data_offsets \\[0, 12, 24\\]"),
    ("offsets-strings", entry(data_offsets=["0", "24"]), "tensor 'a' has data_offsets \\['0', '24'\\]"),
    ("offsets-bool", entry(data_offsets=[False, 24]), "tensor 'a' has data_offsets \\[False, 24\\]"),
    ("offsets-wrong-size", entry(data_offsets=[0, 20]), "tensor 'a' holds 20 bytes, its shape \\(2, 3\\) needs 24"),
    ("offsets-reversed", entry(data_offsets=[24, 0]), "tensor 'a' holds -24 bytes"),
    (
        "offsets-past-file",
        entry(data_offsets=[24, 48]),
        "is truncated: tensor 'a' ends at data byte 48, the file holds 24",
    ),
]


@pytest.mark.parametrize(("case", "header", "words"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_header_is_one_line_naming_the_file_and_the_fault(tmp_path, case, header, words):
    path = write(tmp_path / f"{case}.safetensors", header)
    for read in (lambda: read_header(path), lambda: list(iter_tensors(path))):
        with pytest.raises(ValueError, match=words) as err:
            read()
        assert str(err.value).startswith(path) and "\n" not in str(err.value), str(err.value)


def test_a_good_header_and_metadata_read_as_before(tmp_path):
    path = write(tmp_path / "good.safetensors", {"__metadata__": {"format": "pt"}, **GOOD})
    header, start = read_header(path)
    assert header == GOOD and start == 8 + len(json.dumps({"__metadata__": {"format": "pt"}, **GOOD}).encode())
    (name, tensor), *rest = iter_tensors(path)
    assert name == "a" and not rest and torch.equal(tensor, torch.zeros(2, 3))
    empty = write(tmp_path / "empty.safetensors", {"e": {"dtype": "I8", "shape": [0], "data_offsets": [0, 0]}}, b"")
    assert read_header(empty)[0]["e"]["shape"] == [0]
