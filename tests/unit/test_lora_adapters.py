"""LoRA adapters, without Ray: every file layout loads onto our DiT (peft folders written by peft itself, diffusers
keys, the community Wan layouts `diffusion_model.blocks.N...lora_A/B` and kohya's `lora_unet_..._lora_down/up` with
alpha), the unmerged apply equals the merged weights W + scale * B @ A (1e-5), the LRU evicts by bytes, and bad
files fail with one line naming the key and the expected shape.

The merged references are built here from the layouts' own documented meaning (Wan's q/k/v into our fused rows,
Wan's output rows into our patch order), not from the code under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sora_model.adapters import AdapterCache
from sora_model.config import dit_preset
from sora_model.convert_wan import output_row_order
from sora_model.dit import DiT
from sora_model.lora import LORA_TARGET_MODULES, LoraFile, merge_lora

TOL = 1e-5
TEXT_DIM = 16
RANK = 4


def tiny_dit(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(dit_preset("DiT-tiny", text_dim=TEXT_DIM, in_channels=4)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # zero-initialised gates and output layer would hide a misplaced update
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def inputs(batch: int = 2) -> tuple:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 2, 8, 8, generator=g)
    text = torch.randn(batch, 6, TEXT_DIM, generator=g)
    return (
        x,
        torch.tensor([900.0, 250.0])[:batch],
        text,
        torch.ones(batch, 6, dtype=torch.bool),
        torch.zeros(batch, TEXT_DIM),
    )


def forward(model: DiT) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs())


# Wan module (original code's name, diffusers' name) -> (our Linear, part, parts), for block 0..depth-1 and the head.
WAN_MODULES = [
    ("self_attn.q", "attn1.to_q", "attn.qkv", 0, 3),
    ("self_attn.k", "attn1.to_k", "attn.qkv", 1, 3),
    ("self_attn.v", "attn1.to_v", "attn.qkv", 2, 3),
    ("self_attn.o", "attn1.to_out.0", "attn.proj", 0, 1),
    ("cross_attn.q", "attn2.to_q", "cross_attn.q", 0, 1),
    ("cross_attn.k", "attn2.to_k", "cross_attn.kv", 0, 2),
    ("cross_attn.v", "attn2.to_v", "cross_attn.kv", 1, 2),
    ("cross_attn.o", "attn2.to_out.0", "cross_attn.proj", 0, 1),
    ("ffn.0", "ffn.net.0.proj", "mlp.0", 0, 1),
    ("ffn.2", "ffn.net.2", "mlp.2", 0, 1),
]


def wan_lora(model: DiT, seed: int, alpha: float | None) -> list[tuple[str, str, torch.Tensor, torch.Tensor, float]]:
    """Random adapters for every Wan Linear of `model`'s blocks and the head:
    (original name, diffusers name, A, B, alpha)."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    out = []
    names = [
        (f"blocks.{i}.{o}", f"blocks.{i}.{d}", f"blocks.{i}.{ours}", parts)
        for i in range(len(model.blocks))
        for o, d, ours, _, parts in WAN_MODULES
    ]
    names.append(("head.head", "proj_out", "final_layer.linear", 1))
    for original, diffusers_name, ours, parts in names:
        linear = modules[ours]
        a = 0.3 * torch.randn(RANK, linear.in_features, generator=g)
        b = 0.3 * torch.randn(linear.out_features // parts, RANK, generator=g)
        out.append((original, diffusers_name, a, b, alpha))
    return out


def merged_reference(model: DiT, lora: list, rslora: bool = False) -> DiT:
    """`model` with each Wan adapter merged by hand: W[rows of its part] += alpha / r * B @ A (head rows reordered)."""
    ref = tiny_dit()
    ref.load_state_dict(model.state_dict())
    modules = dict(ref.named_modules())
    by_original = {
        f"blocks.{i}.{o}": (f"blocks.{i}.{ours}", part, parts)
        for i in range(len(ref.blocks))
        for o, _, ours, part, parts in WAN_MODULES
    }
    by_original["head.head"] = ("final_layer.linear", 0, 1)
    with torch.no_grad():
        for original, _, a, b, alpha in lora:
            target, part, parts = by_original[original]
            rank = a.shape[0]
            scale = (alpha if alpha is not None else rank) / (rank**0.5 if rslora else rank)
            delta = scale * b @ a  # (out / parts, in)
            weight = modules[target].weight
            if target == "final_layer.linear":
                delta = delta[output_row_order(ref.cfg.patch_size, ref.cfg.in_channels)]
            n = delta.shape[0]
            weight[part * n : (part + 1) * n] += delta
    return ref


def write_layout(path: Path, lora: list, layout: str) -> Path:
    tensors = {}
    for original, diffusers_name, a, b, alpha in lora:
        if layout == "wan":  # diffusion_model.blocks.0.self_attn.q.lora_A.weight (+ .alpha)
            stem, down, up = f"diffusion_model.{original}", "lora_A", "lora_B"
        elif layout == "wan_down_up":
            stem, down, up = f"diffusion_model.{original}", "lora_down", "lora_up"
        elif layout == "kohya":  # lora_unet_blocks_0_self_attn_q.lora_down.weight (+ .alpha)
            stem, down, up = "lora_unet_" + original.replace(".", "_"), "lora_down", "lora_up"
        else:  # diffusers' save_lora_weights: transformer.blocks.0.attn1.to_q.lora_A.weight
            stem, down, up = f"transformer.{diffusers_name}", "lora_A", "lora_B"
        tensors[f"{stem}.{down}.weight"] = a
        tensors[f"{stem}.{up}.weight"] = b
        if alpha is not None:
            tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize(
    "layout,alpha", [("wan", 8.0), ("wan_down_up", 2.0), ("kohya", 8.0), ("kohya", None), ("diffusers", None)]
)
def test_community_layouts_apply_unmerged_as_the_merged_model(tmp_path: Path, layout: str, alpha: float | None) -> None:
    model = tiny_dit()
    lora = wan_lora(model, seed=3, alpha=alpha)
    path = write_layout(tmp_path / "style.safetensors", lora, layout)
    reference = forward(merged_reference(model, lora))
    base = forward(model)
    cache = AdapterCache(model, {"style": str(path)}, max_bytes=1 << 24)
    with cache.applied("style"):
        unmerged = forward(model)
    assert (unmerged - reference).abs().max().item() <= TOL
    assert (base - reference).abs().max().item() > 1e-2  # the adapter changes the output
    assert torch.equal(forward(model), base)  # and leaves the base model as it was afterwards
    merged = tiny_dit()
    assert len(merge_lora(merged, path)) == 2 * 7 + 1  # 2 blocks x (qkv, proj, q, kv, proj, mlp.0, mlp.2) + head
    assert (forward(merged) - reference).abs().max().item() <= TOL


def test_peft_folder_applies_unmerged_as_peft_merges_it(tmp_path: Path) -> None:
    """An adapter written by peft on our DiT (rsLoRA, an alpha pattern): unmerged equals peft's merge_and_unload."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=RANK,
        lora_alpha=8,
        use_rslora=True,
        alpha_pattern={"mlp.2": 2},
        target_modules=LORA_TARGET_MODULES,
        init_lora_weights=False,
    )
    adapted = peft.get_peft_model(tiny_dit(), config)
    adapted.save_pretrained(str(tmp_path / "adapter"))
    merged = adapted.merge_and_unload()  # peft's own W + scale * B @ A
    model = tiny_dit()
    cache = AdapterCache(model, {"a": str(tmp_path / "adapter")}, max_bytes=1 << 24)
    with cache.applied("a"):
        unmerged = forward(model)
    assert (unmerged - forward(merged)).abs().max().item() <= TOL
    assert (forward(model) - forward(merged)).abs().max().item() > 1e-2
    assert LoraFile(tmp_path / "adapter").config["use_rslora"] is True


def test_two_adapters_resident_apply_each_their_own(tmp_path: Path) -> None:
    model = tiny_dit()
    one, two = wan_lora(model, seed=5, alpha=4.0), wan_lora(model, seed=6, alpha=4.0)
    paths = {
        "one": str(write_layout(tmp_path / "one.safetensors", one, "wan")),
        "two": str(write_layout(tmp_path / "two.safetensors", two, "kohya")),
    }
    cache = AdapterCache(model, paths, max_bytes=1 << 24)
    for name, lora in (("one", one), ("two", two), ("one", one)):
        with cache.applied(name):
            assert (forward(model) - forward(merged_reference(model, lora))).abs().max().item() <= TOL
    assert cache.resident == ["two", "one"] and (cache.hits, cache.misses, cache.evictions) == (1, 2, 0)


def test_lru_evicts_least_recently_used_by_bytes(tmp_path: Path) -> None:
    model = tiny_dit()
    paths = {
        n: str(write_layout(tmp_path / f"{n}.safetensors", wan_lora(model, seed=i, alpha=None), "wan"))
        for i, n in enumerate("abc")
    }
    size = AdapterCache(model, paths, max_bytes=1 << 30).check("a")
    assert size > 0
    cache = AdapterCache(model, paths, max_bytes=2 * size + size // 2)  # room for two
    for name in ("a", "b", "a", "c"):  # c evicts b, the least recently used
        with cache.applied(name):
            pass
    assert cache.resident == ["a", "c"] and cache.evictions == 1 and cache.bytes == 2 * size <= cache.max_bytes
    with cache.applied("b"):  # b again evicts a
        pass
    assert cache.resident == ["c", "b"] and cache.evictions == 2
    small = AdapterCache(model, paths, max_bytes=size - 1)
    with pytest.raises(ValueError, match="over the adapter budget") as err:
        small.check("a")
    assert small.check_all().keys() == {"a", "b", "c"} and "\n" not in str(err.value)


def one_line_error(path: Path, model: DiT | None = None) -> str:
    with pytest.raises(ValueError) as err:
        LoraFile(path).place(model or tiny_dit())
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    model = tiny_dit()
    a, b = torch.zeros(RANK, 32), torch.zeros(32, RANK)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01not a safetensors file at all")
    assert "not a readable safetensors file" in one_line_error(tmp_path / "garbage.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(
        (write_layout(tmp_path / "ok.safetensors", wan_lora(model, 1, None), "wan")).read_bytes()[:100]
    )
    assert "not a readable safetensors file" in one_line_error(tmp_path / "cut.safetensors")
    save_file({"diffusion_model.blocks.0.self_attn.q.weight": a}, str(tmp_path / "full.safetensors"))
    assert "key 'diffusion_model.blocks.0.self_attn.q.weight' is no LoRA weight" in one_line_error(
        tmp_path / "full.safetensors"
    )
    save_file({"diffusion_model.blocks.0.norm3.diff_b": torch.zeros(32)}, str(tmp_path / "diff.safetensors"))
    assert "diff/diff_b" in one_line_error(tmp_path / "diff.safetensors")
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": a}, str(tmp_path / "half.safetensors"))
    assert "has no matching lora_B/lora_up" in one_line_error(tmp_path / "half.safetensors")
    save_file(
        {
            "diffusion_model.blocks.7.self_attn.q.lora_A.weight": a,
            "diffusion_model.blocks.7.self_attn.q.lora_B.weight": b,
        },
        str(tmp_path / "deep.safetensors"),
    )
    assert "targets 'blocks.7.self_attn.q', which is no Linear of this DiT" in one_line_error(
        tmp_path / "deep.safetensors"
    )
    save_file(
        {"lora_unet_blocks_0_nothing_here.lora_down.weight": a, "lora_unet_blocks_0_nothing_here.lora_up.weight": b},
        str(tmp_path / "kohya.safetensors"),
    )
    assert "no Linear of this DiT" in one_line_error(tmp_path / "kohya.safetensors")
    wide = torch.zeros(RANK, 48)
    save_file(
        {
            "diffusion_model.blocks.0.self_attn.k.lora_A.weight": wide,
            "diffusion_model.blocks.0.self_attn.k.lora_B.weight": b,
        },
        str(tmp_path / "shape.safetensors"),
    )
    message = one_line_error(tmp_path / "shape.safetensors")
    assert (
        "'diffusion_model.blocks.0.self_attn.k.lora_A.weight' has shape (4, 48); blocks.0.attn.qkv expects (4, 32)"
        in message
    )
    save_file(
        {
            "transformer.blocks.0.attn1.to_k.lora_A.weight": a,
            "transformer.blocks.0.attn1.to_k.lora_B.weight": torch.zeros(96, RANK),
        },
        str(tmp_path / "rows.safetensors"),
    )
    assert "has shape (96, 4); blocks.0.attn.qkv expects (32, 4)" in one_line_error(tmp_path / "rows.safetensors")
    (tmp_path / "folder").mkdir()
    assert "without adapter_model.safetensors" in one_line_error(tmp_path / "folder")
    assert "not found" in one_line_error(tmp_path / "missing.safetensors")


def test_unknown_adapter_name_and_bad_file_on_use_are_value_errors(tmp_path: Path) -> None:
    model = tiny_dit()
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    cache = AdapterCache(model, {"bad": str(tmp_path / "bad.safetensors")}, max_bytes=1 << 20)
    with pytest.raises(ValueError, match="unknown LoRA 'nope'; configured: bad"):
        with cache.applied("nope"):
            pass
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        with cache.applied("bad"):
            pass
    assert set(cache.check_all()) == {"bad"} and cache.resident == []


def test_fused_projection_with_some_parts_adapted(tmp_path: Path) -> None:
    """Only q and v of the fused q/k/v (and only v of the cross k/v): the rows of k stay the base model's."""
    model = tiny_dit()
    lora = [
        entry
        for entry in wan_lora(model, seed=9, alpha=6.0)
        if entry[0].endswith(("self_attn.q", "self_attn.v", "cross_attn.v"))
    ]
    path = write_layout(tmp_path / "qv.safetensors", lora, "wan")
    cache = AdapterCache(model, {"qv": str(path)}, max_bytes=1 << 24)
    with cache.applied("qv") as bound:
        unmerged = forward(model)
    assert (unmerged - forward(merged_reference(model, lora))).abs().max().item() <= TOL
    # no padded blocks
    assert bound.nbytes == cache.check("qv") == 4 * sum(a.numel() + b.numel() for _, _, a, b, _ in lora)
