"""Reading one weights file of an export into a DiT, in bounded memory (what `TextToVideoPipeline.load` and a
LoRA fine-tune's base model use).

The DiT is built on the meta device (no random init, no memory); the file's header is checked against it (names and
shapes, one line naming the first mismatch); then each tensor is read, cast to its inference dtype, moved to the device
and assigned, one at a time (`weights_io.iter_tensors`).
"""

from __future__ import annotations

import os

import torch

from .config import PipelineConfig
from .dit import DiT, stored_dtype
from .lora import LoraFile
from .weights_io import iter_tensors, read_header


def load_dit(
    config: PipelineConfig,
    weights: str,
    lora: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> DiT:
    """A DiT of the export's config with the weights of one of its files, in bounded memory.

    The DiT is built on the meta device (no random init, no memory), then each tensor of the file is read, cast to
    its inference dtype (`dtype` for the weights, fp32 for the conditioning path: `dit.stored_dtype`), moved to
    `device` and assigned, one at a time (`weights_io.iter_tensors`): the host holds the model in `dtype` plus one
    tensor, and a GPU load passes no fp32 copy through either. A LoRA adapter is merged into each weight it targets
    in fp32, before the cast (as `merge_lora` on an fp32 model, then `to_inference_dtype`). The DiT holds no buffers
    (positions and RoPE tables are computed in `forward`), so nothing is left on the meta device.
    """
    if not os.path.isfile(weights):
        raise FileNotFoundError(
            f"'{os.path.dirname(weights)}' is not an export folder: {os.path.basename(weights)} is missing"
        )
    with torch.device("meta"):
        model = DiT(config.model)
    check_weights(model, weights)
    updates = {} if lora is None else {f"{t}.weight": u for t, u in LoraFile(lora).bind(model, device="cpu").items()}

    def dtype_of(name: str, stored: torch.dtype) -> torch.dtype:
        if name in updates:
            return torch.float32  # merged in fp32, then cast
        return stored_dtype(name, stored, dtype) if dtype != torch.float32 else torch.float32

    state = {}
    for name, tensor in iter_tensors(weights, dtype_of):
        if name in updates:
            tensor = tensor.add_(updates.pop(name).weight())  # (out, in)
            tensor = tensor.to(stored_dtype(name, tensor.dtype, dtype))
        state[name] = tensor.to(device)
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise AssertionError(f"load_dit left {left[:3]} on the meta device")
    return model


def check_weights(model: DiT, weights: str) -> None:
    """A ValueError (one line) unless the file's header holds exactly the model's tensors, each of its shape."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v["shape"]) for k, v in read_header(weights)[0].items()}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match config.json's model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    wrong = [k for k in expected if found[k] != expected[k]]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"{weights} does not match config.json's model: {k} has shape {found[k]}, expected {expected[k]}"
        )
