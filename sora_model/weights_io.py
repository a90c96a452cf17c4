"""safetensors files read and written one tensor at a time, in bounded memory.

`safetensors.torch.load_file` returns every tensor at once in the file's dtype, and its memory map keeps each page it
has read resident until the file closes: loading an fp32 export into a bf16 model held the fp32 file, the fp32
tensors and then the bf16 copy. Here each tensor is read with a plain `readinto` (the page cache holds the file,
not this process), cast to the dtype asked for and handed on before the next is read: the peak is the result plus
the largest tensor of the file. `write_tensors` is the same for writing (tensors produced one by one).

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20
CHUNK_BYTES = 4 << 20


def read_header(path: str) -> tuple[dict[str, dict], int]:
    """({name: {"dtype", "shape", "data_offsets"}}, byte offset of the data) of a safetensors file; a one-line
    ValueError naming the file and what is wrong when it is not one: a header that is not a JSON object, an entry
    without a known dtype, a shape of non-negative ints or [begin, end] offsets that hold that shape, or offsets past
    the end of the file (a truncated file)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file: shorter than its 8-byte header length")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"{path} is not a safetensors file: header length {size} exceeds {MAX_HEADER_BYTES}")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({err})") from None
        data_bytes = os.fstat(f.fileno()).st_size - 8 - size
    if not isinstance(header, dict):
        raise ValueError(
            f"{path} is not a safetensors file: its header is a JSON {type(header).__name__}, not an object"
        )
    header.pop("__metadata__", None)
    for name, entry in header.items():
        _check_entry(path, name, entry, data_bytes)
    return header, 8 + size


def _check_entry(path: str, name: str, entry: object, data_bytes: int) -> None:
    """A ValueError naming the file, the tensor and the field when one header entry is malformed."""

    def is_int(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(entry, dict):
        raise ValueError(f"{path}: tensor '{name}' has a header entry {entry!r:.80}, not an object")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"{path}: tensor '{name}' has dtype {dtype!r}, not one of {sorted(DTYPES)}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(is_int(d) for d in shape):
        raise ValueError(f"{path}: tensor '{name}' has shape {shape!r:.80}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets):
        raise ValueError(f"{path}: tensor '{name}' has data_offsets {offsets!r:.80}, not [begin, end] byte offsets")
    begin, end = offsets
    needed = math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()
    if end - begin != needed:
        raise ValueError(f"{path}: tensor '{name}' holds {end - begin} bytes, its shape {tuple(shape)} needs {needed}")
    if end > data_bytes:
        raise ValueError(
            f"{path} is truncated: tensor '{name}' ends at data byte {end}, the file holds {max(data_bytes, 0)} bytes"
        )


def iter_tensors(
    path: str,
    dtype_of: Callable[[str, torch.dtype], torch.dtype] | None = None,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each tensor of the file, in file order, each in `dtype_of(name, stored dtype)` (the stored
    dtype when None) on `device`. A tensor read in its stored dtype is read straight into its result; one cast on the
    way is read in pieces of CHUNK_BYTES through one reused buffer, so no whole-tensor copy in the file's dtype is
    ever allocated (nor left in the heap for the allocator to fragment)."""
    header, start = read_header(path)
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    chunk: torch.Tensor | None = None
    with open(path, "rb", buffering=0) as f:
        for name, entry in items:
            stored = DTYPES[entry["dtype"]]
            begin = entry["data_offsets"][0]
            shape = tuple(entry["shape"])
            target = stored if dtype_of is None else dtype_of(name, stored)
            out = torch.empty(shape, dtype=target)  # read_header checked that [begin, end) holds the shape
            width = torch.empty((), dtype=stored).element_size()
            f.seek(start + begin)
            flat = out.view(-1)
            if target == stored:
                _read_into(f, flat, path, name)
            else:
                step = max(1, CHUNK_BYTES // width)
                if chunk is None or chunk.dtype != stored:
                    chunk = torch.empty(step, dtype=stored)
                for i in range(0, flat.numel(), step):
                    piece = chunk[: min(step, flat.numel() - i)]
                    _read_into(f, piece, path, name)
                    flat[i : i + piece.numel()].copy_(piece)
            yield name, out.to(device)
            del out, flat


def _read_into(f, tensor: torch.Tensor, path: str, name: str) -> None:
    """Fill a contiguous 1-d tensor from the file's current position."""
    if not tensor.numel():
        return
    view = memoryview(tensor.view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise ValueError(f"{path} is truncated inside tensor '{name}'")
        done += got


def write_tensors(
    path: str, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], tensors: Iterable[tuple[str, torch.Tensor]]
) -> None:
    """Write a safetensors file whose tensors (`shapes`: name -> (shape, dtype), in this order) come one at a time
    from `tensors` (the same names in the same order): one tensor in memory at a time, not the whole file."""
    header, offset = {}, 0
    for name, (shape, dtype) in shapes.items():
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for (name, tensor), expected in zip(tensors, shapes, strict=True):
            shape, dtype = shapes[expected]
            if name != expected or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(
                    f"write_tensors: got '{name}' {tuple(tensor.shape)} {tensor.dtype}, expected "
                    f"'{expected}' {shape} {dtype}"
                )
            f.write(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy())


__all__ = ["DTYPES", "iter_tensors", "read_header", "write_tensors"]
