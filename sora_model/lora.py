"""LoRA adapters on the DiT: the file layouts we read, where each adapted module lands in our DiT, and merging.

Layouts (all safetensors; JSON for the config, nothing unpickled):
- peft / diffusers: a folder with `adapter_config.json` (rank, alpha, rsLoRA, patterns) and
  `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight`, `.lora_B.weight`), what peft's
  `save_pretrained` and training here (`pipelines/train/finetune.py`) write; diffusers' `save_lora_weights` keys
  (`transformer.<module>.lora_A.weight`) in a single file too.
- community Wan LoRAs (single `.safetensors` files, as ComfyUI, DiffSynth and musubi-tuner write them):
  `diffusion_model.blocks.N.self_attn.q.lora_A.weight` / `.lora_B.weight` (or `lora_down` / `lora_up`) with an
  optional `.alpha`, and kohya's `lora_unet_blocks_N_self_attn_q.lora_down.weight` / `.lora_up.weight` / `.alpha`.

Module names may be ours (`blocks.0.attn.qkv`, `LORA_TARGET_MODULES`), diffusers' WanTransformer3DModel's
(`blocks.0.attn1.to_q`) or the original Wan code's (`blocks.0.self_attn.q`, mapped to diffusers' names here and
then through `convert_wan.wan_linear_target`): a q, k or v adapter updates its rows of our fused projection, an
output-projection adapter's rows are reordered like the converted weights. Scale: alpha / r (alpha / sqrt(r) under
rsLoRA), alpha from the module's `.alpha`, else peft's `lora_alpha` / `alpha_pattern`, else r (scale 1, kohya's rule).

`LoraFile` reads only the header first (keys and shapes), so a file is checked against a model without loading it;
`bind` gives, per target Linear, a `LoraUpdate` (A (R, in) and B with the scale folded in; a fused projection's
parts each over their own rows): `merge_lora` adds B @ A to the weight, `adapters.AdapterCache` applies it unmerged.
Every problem is a one-line ValueError naming the file, the key and what was expected.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .convert_wan import output_row_order, wan_linear_target

LORA_TARGET_MODULES = r"blocks\.\d+\.(attn\.(qkv|proj)|cross_attn\.(q|kv|proj)|mlp\.(0|2))"
"""peft `target_modules` (a regex on module names) for every block's attention projections (self: fused q/k/v
and output; cross: q, fused k/v and output) and MLP projections: where LoRA fine-tuning of video DiTs puts
adapters (diffusers' and DiffSynth's Wan recipes target the same projections)."""
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIXES = ("base_model.model.", "transformer.", "model.diffusion_model.", "diffusion_model.")
"""What peft (`save_pretrained`), diffusers (`save_lora_weights`) and the Wan community files put before module
names."""
KOHYA_PREFIX = "lora_unet_"
_DOTTED = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.[^.]+)?\.weight")
_KOHYA = re.compile(rf"{KOHYA_PREFIX}(?P<module>[^.]+)\.(?:(?P<kind>lora_down|lora_up)\.weight|(?P<alpha>alpha))")
_ALPHA = re.compile(r"(?P<module>.+)\.alpha")
_KIND = {"lora_A": "A", "lora_down": "A", "lora_B": "B", "lora_up": "B"}
WAN_ORIGINAL_NAMES: list[tuple[str, str]] = [
    (r"blocks\.(\d+)\.self_attn\.q", r"blocks.\1.attn1.to_q"),
    (r"blocks\.(\d+)\.self_attn\.k", r"blocks.\1.attn1.to_k"),
    (r"blocks\.(\d+)\.self_attn\.v", r"blocks.\1.attn1.to_v"),
    (r"blocks\.(\d+)\.self_attn\.o", r"blocks.\1.attn1.to_out.0"),
    (r"blocks\.(\d+)\.cross_attn\.k", r"blocks.\1.attn2.to_k"),
    (r"blocks\.(\d+)\.cross_attn\.v", r"blocks.\1.attn2.to_v"),
    (r"blocks\.(\d+)\.cross_attn\.o", r"blocks.\1.attn2.to_out.0"),
    (r"blocks\.(\d+)\.ffn\.0", r"blocks.\1.ffn.net.0.proj"),
    (r"blocks\.(\d+)\.ffn\.2", r"blocks.\1.ffn.net.2"),
    (r"text_embedding\.0", "condition_embedder.text_embedder.linear_1"),
    (r"text_embedding\.2", "condition_embedder.text_embedder.linear_2"),
    (r"time_embedding\.0", "condition_embedder.time_embedder.linear_1"),
    (r"time_embedding\.2", "condition_embedder.time_embedder.linear_2"),
    (r"time_projection\.1", "condition_embedder.time_proj"),
    (r"head\.head", "proj_out"),
]
"""The original Wan code's Linear names (`wan/modules/model.py`, what community LoRAs use) -> diffusers' names, as
diffusers' `_convert_non_diffusers_wan_lora_to_diffusers` maps them. `cross_attn.q` is left out: it is our name too,
for the same module."""


@dataclass(frozen=True)
class LoraEntry:
    """One adapted module as the file names it: the keys of its A (down), B (up) and alpha, and their shapes."""

    module: str
    a_key: str
    b_key: str
    alpha_key: str | None
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]


@dataclass(frozen=True)
class Placement:
    """Where an entry lands: our Linear `target`, its output rows `part` of `parts`, Wan's patch row order or not."""

    entry: LoraEntry
    target: str
    part: int
    parts: int
    reorder: bool


def _strip(key: str) -> str:
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


class LoraFile:
    """A LoRA adapter on disk: a peft folder or a single safetensors file, its header read (tensors not loaded)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        root = Path(path)
        self.config: dict = {}
        if root.is_dir():
            if not (root / ADAPTER_WEIGHTS).is_file():
                raise ValueError(
                    f"LoRA '{path}' is a folder without {ADAPTER_WEIGHTS} (give a peft adapter folder "
                    "or a .safetensors file)"
                )
            if (root / ADAPTER_CONFIG).is_file():
                self.config = self._read_config(root / ADAPTER_CONFIG)
            self.weights = str(root / ADAPTER_WEIGHTS)
        elif root.is_file():
            self.weights = str(root)
        else:
            raise ValueError(f"LoRA '{path}' not found: give a peft adapter folder or a .safetensors file")
        self.entries = self._parse(self._header())

    def _read_config(self, path: Path) -> dict:
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"LoRA '{self.path}': {ADAPTER_CONFIG} is not valid JSON ({err})") from None
        if not isinstance(config, dict):
            raise ValueError(f"LoRA '{self.path}': {ADAPTER_CONFIG} must hold a JSON object")
        if config.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"LoRA '{self.path}' is a {config.get('peft_type')} adapter; only LoRA applies to the DiT")
        for flag in ("use_dora", "fan_in_fan_out", "lora_bias"):
            if config.get(flag):
                raise ValueError(f"LoRA '{self.path}' sets {flag}, which is not supported")
        return config

    def _header(self) -> dict[str, tuple[int, ...]]:
        """{key: shape} from the safetensors header; a file that is not one is a one-line error."""
        try:
            with safe_open(self.weights, framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - no __iter__
        except (SafetensorError, OSError, ValueError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(
                f"LoRA '{self.path}': {self.weights} is not a readable safetensors file ({first})"
            ) from None

    def _parse(self, header: dict[str, tuple[int, ...]]) -> dict[str, LoraEntry]:
        parts: dict[str, dict[str, str]] = {}
        for key in header:
            m = _KOHYA.fullmatch(key)
            if m:
                module, kind = "_" + m["module"], "alpha" if m["alpha"] else _KIND[m["kind"]]  # "_": a kohya flat name
            elif (m := _DOTTED.fullmatch(_strip(key))) is not None:
                module, kind = m["module"], _KIND[m["kind"]]
            elif (m := _ALPHA.fullmatch(_strip(key))) is not None:
                module, kind = m["module"], "alpha"
            else:
                hint = " (full-weight diff/diff_b keys are not LoRA)" if key.endswith((".diff", ".diff_b")) else ""
                raise ValueError(
                    f"LoRA '{self.path}': key '{key}' is no LoRA weight (lora_A/lora_B, "
                    f"lora_down/lora_up or alpha){hint}"
                )
            if kind in parts.setdefault(module, {}):
                raise ValueError(f"LoRA '{self.path}': key '{key}' repeats {module}'s {kind} (one adapter per file)")
            parts[module][kind] = key
        entries = {}
        for module, keys in parts.items():
            if "A" not in keys or "B" not in keys:
                have = next(iter(keys.values()))
                raise ValueError(
                    f"LoRA '{self.path}': key '{have}' has no matching "
                    f"{'lora_B/lora_up' if 'A' in keys else 'lora_A/lora_down'} weight"
                )
            a, b = header[keys["A"]], header[keys["B"]]
            if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                raise ValueError(
                    f"LoRA '{self.path}': key '{keys['B']}' has shape {b} for '{keys['A']}' of shape {a}; expected "
                    f"(out, {a[0] if a else 'r'})"
                )
            if keys.get("alpha") and math.prod(header[keys["alpha"]]) != 1:
                raise ValueError(
                    f"LoRA '{self.path}': key '{keys['alpha']}' has shape {header[keys['alpha']]}; expected a scalar"
                )
            entries[module] = LoraEntry(module, keys["A"], keys["B"], keys.get("alpha"), a, b)
        if not entries:
            raise ValueError(f"LoRA '{self.path}' holds no LoRA weights")
        return entries

    # -- where it lands in a model ------------------------------------------------------------------

    def place(self, model: nn.Module) -> list[Placement]:
        """Each entry's target in `model` (a DiT), shapes checked; ValueError naming the key and the expected shape."""
        modules = dict(model.named_modules())
        placements = []
        for entry in self.entries.values():
            found = _resolve(entry.module, modules)
            if found is None:
                raise ValueError(
                    f"LoRA '{self.path}': key '{entry.a_key}' targets '{entry.module.lstrip('_')}', which is no Linear "
                    "of this DiT nor of a Wan transformer"
                )
            target, part, parts, reorder = found
            linear = modules[target]
            rank = entry.a_shape[0]
            expect_a, expect_b = (rank, linear.in_features), (linear.out_features // parts, rank)
            if entry.a_shape != expect_a:
                raise ValueError(
                    f"LoRA '{self.path}': key '{entry.a_key}' has shape {entry.a_shape}; {target} expects {expect_a}"
                )
            if entry.b_shape != expect_b:
                raise ValueError(
                    f"LoRA '{self.path}': key '{entry.b_key}' has shape {entry.b_shape}; {target} expects {expect_b}"
                )
            placements.append(Placement(entry, target, part, parts, reorder))
        return placements

    def scale(self, entry: LoraEntry, alpha: float | None) -> float:
        rank = entry.a_shape[0]
        if alpha is None:
            name = entry.module.lstrip("_")
            default = float(self.config.get("lora_alpha", rank))
            alpha = _pattern_value(self.config.get("alpha_pattern") or {}, name, default)
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def bound_bytes(self, model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
        """Bytes `bind` will hold for `model` (checked from the header, nothing loaded)."""
        modules = dict(model.named_modules())
        total = 0
        for target, group in _by_target(self.place(model)).items():
            rank = sum(p.entry.a_shape[0] for p in group)
            linear = modules[target]
            b_rows = (
                rank * linear.out_features
                if _padded(group)
                else sum(p.entry.b_shape[0] * p.entry.b_shape[1] for p in group)
            )
            total += rank * linear.in_features + b_rows
        return total * torch.finfo(dtype).bits // 8

    @torch.no_grad()
    def bind(
        self, model: nn.Module, dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ) -> dict[str, LoraUpdate]:
        """{our Linear: its LoraUpdate} with each scale folded into B, on `device` (the Linear's when None; a model on
        the meta device takes one), in `dtype` (fp32 when None).
        The Linear's output then gains update(x), exactly what merging scale * B_i @ A_i into its rows would add."""
        modules = dict(model.named_modules())
        cfg = getattr(model, "cfg", None)
        dtype = dtype or torch.float32
        out = {}
        with safe_open(self.weights, framework="pt") as f:
            for target, group in _by_target(self.place(model)).items():
                linear, where = modules[target], device or _device(modules[target])
                a_all, b_all, col = [], [], 0
                for p in group:
                    e = p.entry
                    a, b = f.get_tensor(e.a_key).float(), f.get_tensor(e.b_key).float()  # (r, in), (out / parts, r)
                    alpha = float(f.get_tensor(e.alpha_key).float().reshape(())) if e.alpha_key else None
                    b = self.scale(e, alpha) * b
                    if p.reorder and cfg is not None:
                        b = b[output_row_order(cfg.patch_size, cfg.in_channels)]  # Wan's output rows in our patch order
                    a_all.append(a)
                    b_all.append((p.part, p.parts, col, col + a.shape[0], b))
                    col += a.shape[0]
                a_cat = torch.cat(a_all).to(where, dtype).contiguous()  # (R, in)
                if _padded(group):  # one B (out, R): each adapter fills its rows and its columns
                    full = torch.zeros(linear.out_features, col)
                    for part, _, c0, c1, b in b_all:
                        full[part * b.shape[0] : (part + 1) * b.shape[0], c0:c1] = b
                    out[target] = LoraUpdate(a_cat, full.to(where, dtype).contiguous(), ())
                else:  # a fused projection's parts (q, k, v): each B only over its own rows, none padded
                    parts = [None] * group[0].parts
                    for part, _, c0, c1, b in b_all:
                        parts[part] = (c0, c1, b.to(where, dtype).contiguous())
                    out[target] = LoraUpdate(a_cat, None, tuple(parts), linear.out_features // group[0].parts)
        return out


@dataclass(frozen=True)
class LoraUpdate:
    """What an adapter adds to one of our Linears: x -> B (A x). A (R, in) stacks the ranks of every adapter module that
    lands on this Linear; B is one (out, R) matrix, or, for the parts of a fused projection (q/k/v of `attn.qkv`), one
    (out / parts, r) matrix per part in row order (None where the adapter leaves that part alone), so no FLOP goes into
    zero blocks."""

    a: torch.Tensor
    b: torch.Tensor | None
    parts: tuple[tuple[int, int, torch.Tensor] | None, ...]
    part_rows: int = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)"""
        h = torch.nn.functional.linear(x.to(self.a.dtype), self.a)  # (..., R)
        if self.b is not None:
            return torch.nn.functional.linear(h, self.b)  # (..., out)
        pieces = [
            h.new_zeros(*h.shape[:-1], self.part_rows)
            if p is None
            else torch.nn.functional.linear(h[..., p[0] : p[1]], p[2])
            for p in self.parts
        ]
        return torch.cat(pieces, dim=-1)  # (..., out)

    def add_to(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + update(x), accumulated into `out` in place where that is safe (inference, same dtype): B's GEMM then
        adds into the Linear's output (BLAS beta = 1) instead of writing a delta and adding it in a second pass."""
        if torch.is_grad_enabled() or out.dtype != self.a.dtype or not out.is_contiguous():
            return out + self(x).to(out.dtype)
        o = out.view(-1, out.shape[-1])  # (M, out)
        h = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]).to(self.a.dtype), self.a)  # (M, R)
        if self.b is not None:
            o.addmm_(h, self.b.t())
        else:
            for i, p in enumerate(self.parts):
                if p is not None:
                    o[:, i * self.part_rows : (i + 1) * self.part_rows].addmm_(h[:, p[0] : p[1]], p[2].t())
        return out

    def weight(self) -> torch.Tensor:
        """The merged update of the Linear's weight, B @ A: (out, in)."""
        if self.b is not None:
            return self.b @ self.a
        rows = [
            self.a.new_zeros(self.part_rows, self.a.shape[1]) if p is None else p[2] @ self.a[p[0] : p[1]]
            for p in self.parts
        ]
        return torch.cat(rows)  # (out, in)

    @property
    def nbytes(self) -> int:
        tensors = [self.a, *([self.b] if self.b is not None else [p[2] for p in self.parts if p is not None])]
        return sum(t.numel() * t.element_size() for t in tensors)


def _by_target(placements: list[Placement]) -> dict[str, list[Placement]]:
    grouped: dict[str, list[Placement]] = {}
    for p in placements:
        grouped.setdefault(p.target, []).append(p)
    return grouped


def _padded(group: list[Placement]) -> bool:
    """Whether a target's adapters need one padded B: a whole-Linear adapter, parts counted differently, or a part
    twice."""
    parts = [p.part for p in group]
    return any(p.parts == 1 for p in group) or len({p.parts for p in group}) > 1 or len(set(parts)) != len(parts)


def _pattern_value(patterns: dict, name: str, default: float) -> float:
    """peft's rank/alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", name):
            return float(value)
    return default


def _device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")  # a dynamically quantised Linear (CPU only) has no parameters


def _is_linear(module: nn.Module | None) -> bool:
    return module is not None and hasattr(module, "in_features") and hasattr(module, "out_features")


def _resolve_dotted(name: str, modules: dict[str, nn.Module]) -> tuple[str, int, int, bool] | None:
    if _is_linear(modules.get(name)):
        return name, 0, 1, False
    for pattern, diffusers_name in WAN_ORIGINAL_NAMES:
        if re.fullmatch(pattern, name):
            name = re.sub(pattern, diffusers_name, name)
            break
    target = wan_linear_target(name)
    if target is None or not _is_linear(modules.get(target[0])):
        return None
    return target[0], target[1], target[2], target[0] == "final_layer.linear"


def _resolve(module: str, modules: dict[str, nn.Module]) -> tuple[str, int, int, bool] | None:
    """(our Linear, part, parts, Wan row order) of a module name; kohya's flat names ("_" + name with "_" for ".")
    try each way of reading their underscores as dots and take the one that names a Linear."""
    if not module.startswith("_"):
        return _resolve_dotted(module, modules)
    pieces = module[1:].split("_")
    if len(pieces) > 12:
        return None
    for seps in product((".", "_"), repeat=len(pieces) - 1):
        name = pieces[0] + "".join(s + p for s, p in zip(seps, pieces[1:], strict=True))
        found = _resolve_dotted(name, modules)
        if found is not None:
            return found
    return None


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(adapter config, {module name as the file names it: (A (r, in), B (out, r))}) of a LoRA file or folder."""
    lora = LoraFile(folder)
    with safe_open(lora.weights, framework="pt") as f:
        pairs = {e.module.lstrip("_"): (f.get_tensor(e.a_key), f.get_tensor(e.b_key)) for e in lora.entries.values()}
    return lora.config, pairs


@torch.no_grad()
def merge_lora(model: nn.Module, path: str | Path) -> list[str]:
    """Merge a LoRA adapter (folder or file) into `model` (a DiT) in place: W += scale * B @ A, in fp32; returns the
    names of the changed Linears. Inference then costs what the base model costs."""
    bound = LoraFile(path).bind(model)
    modules = dict(model.named_modules())
    for target, update in bound.items():
        weight = modules[target].weight
        weight.add_(update.weight().to(weight.dtype))  # (out, in)
    return sorted(bound)
