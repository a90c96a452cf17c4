"""Bounded-memory export loading (issue 29 item 6), without Ray.

`dit_load.load_dit` builds the DiT on the meta device and reads each tensor of the export straight into its
inference dtype. Checked against the eager loader it replaces (an fp32 DiT, `load_file`, `load_state_dict`, then
`to_inference_dtype` / `merge_lora`), written out here: fp32 loads are bit-identical with identical outputs; bf16
loads hold exactly fp32 -> bf16 of every weight outside `FP32_MODULES` and the fp32 values inside; a LoRA merges
as `merge_lora` on the fp32 model does; nothing stays on the meta device; the safetensors reader agrees with the
safetensors library and refuses bad files with one line; and the host peak of a bf16 load stays near the bf16 bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sora_model.config import WAN_OPTIONS, PipelineConfig, TextEncoderConfig, dit_preset
from sora_model.dit import FP32_MODULES, DiT
from sora_model.dit_load import load_dit
from sora_model.export_io import MODEL_FILE, load_export_config, save_export
from sora_model.lora import merge_lora
from sora_model.pipeline import TextToVideoPipeline
from sora_model.text import build_text_encoder
from sora_model.weights_io import iter_tensors, read_header, write_tensors

TEXT_DIM = 384  # MiniLM's width, so the export also loads as a pipeline
CONFIGS = {
    "dit": dict(text_dim=TEXT_DIM),
    "wan": {**WAN_OPTIONS, "text_dim": TEXT_DIM, "in_channels": 4, "ffn_dim": 72},
}


def export(tmp_path: Path, kind: str, seed: int = 0) -> tuple[str, PipelineConfig]:
    """A tiny export with every weight perturbed (zero-initialised gates would hide a wrong tensor)."""
    config = PipelineConfig(model=dit_preset("DiT-tiny", **CONFIGS[kind]))
    torch.manual_seed(seed)
    model = DiT(config.model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    folder = str(tmp_path / f"{kind}-{seed}")
    save_export(folder, config, model.state_dict())
    return folder, config


def eager_load(folder: str, dtype: torch.dtype | None = None, lora: str | None = None) -> DiT:
    """The loader before issue 29."""
    config = load_export_config(folder)
    model = DiT(config.model)
    model.load_state_dict(load_file(os.path.join(folder, MODEL_FILE)))
    if lora is not None:
        merge_lora(model, lora)
    return model if dtype is None else model.to_inference_dtype(dtype)


def inputs(cfg) -> tuple:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, 2, 8, 8, generator=g)
    text = torch.randn(2, 6, TEXT_DIM, generator=g)
    return x, torch.tensor([900.0, 250.0]), text, torch.ones(2, 6, dtype=torch.bool), text.mean(1)


def all_tensors(model: DiT) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_fp32_meta_load_equals_the_eager_load(tmp_path, kind):
    folder, config = export(tmp_path, kind)
    ours, theirs = load_dit(config, os.path.join(folder, MODEL_FILE)).eval(), eager_load(folder).eval()
    a, b = all_tensors(ours), all_tensors(theirs)
    assert sorted(a) == sorted(b)
    for name, t in a.items():
        assert not t.is_meta and t.dtype == torch.float32 and torch.equal(t, b[name]), name
        assert isinstance(t, torch.nn.Parameter) == isinstance(b[name], torch.nn.Parameter), name
    with torch.no_grad():
        assert torch.equal(ours(*inputs(config.model)), theirs(*inputs(config.model)))


def test_buffers_after_meta_init_match_an_eager_model(tmp_path):
    """Every buffer, persistent or not, is materialised and equals an eager model's (the DiT computes its positions
    and RoPE tables in forward; a buffer added later must not come back empty or random from the meta device)."""
    folder, config = export(tmp_path, "wan")
    ours, theirs = load_dit(config, os.path.join(folder, MODEL_FILE)), DiT(config.model)
    eager = dict(theirs.named_buffers())
    assert sorted(dict(ours.named_buffers())) == sorted(eager)
    for name, buf in ours.named_buffers():
        assert not buf.is_meta and torch.equal(buf, eager[name]), name
    assert not any(t.is_meta for t in ours.state_dict().values())


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_bf16_load_follows_the_precision_policy(tmp_path, kind):
    folder, config = export(tmp_path, kind)
    ours = load_dit(config, os.path.join(folder, MODEL_FILE), dtype=torch.bfloat16).eval()
    fp32 = load_file(os.path.join(folder, MODEL_FILE))
    kept = 0
    for name, t in ours.named_parameters():
        fp32_part = any(part in FP32_MODULES for part in name.split(".")[:-1])
        kept += fp32_part
        assert t.dtype == (torch.float32 if fp32_part else torch.bfloat16), name
        assert torch.equal(t, fp32[name].to(t.dtype)), name  # cast once from fp32, never through bf16
    assert kept > 0 and ours.dtype == torch.bfloat16
    theirs = eager_load(folder, torch.bfloat16).eval()  # `to_inference_dtype` keeps the same policy
    assert all(torch.equal(t, dict(theirs.named_parameters())[n]) for n, t in ours.named_parameters())
    assert theirs.to_inference_dtype(torch.bfloat16) is theirs and all(
        torch.equal(t, dict(theirs.named_parameters())[n]) for n, t in ours.named_parameters()
    ), "a second to_inference_dtype changed weights"
    with torch.no_grad():
        out, ref = ours(*inputs(config.model)), eager_load(folder).eval()(*inputs(config.model))
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()  # bf16 rounding of the weights, not a wrong tensor


def test_lora_merges_in_fp32_before_the_cast(tmp_path):
    peft = pytest.importorskip("peft")
    folder, config = export(tmp_path, "wan")
    lora_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["attn.qkv", "mlp.0"], init_lora_weights=False)
    torch.manual_seed(3)
    peft.get_peft_model(DiT(config.model), lora_cfg).save_pretrained(str(tmp_path / "adapter"))
    adapter = str(tmp_path / "adapter")
    weights = os.path.join(folder, MODEL_FILE)
    for dtype in (torch.float32, torch.bfloat16):
        ours, theirs = load_dit(config, weights, adapter, dtype), eager_load(folder, None, adapter)
        if dtype == torch.bfloat16:
            theirs.to_inference_dtype(dtype)
        ref = dict(theirs.named_parameters())
        for name, t in ours.named_parameters():
            assert t.dtype == ref[name].dtype and torch.equal(t, ref[name]), (dtype, name)
        changed = ours.blocks[0].attn.qkv.weight.float() - load_file(weights)["blocks.0.attn.qkv.weight"]
        assert changed.abs().max() > 1e-3  # the adapter did land


def test_misfit_export_fails_with_one_line(tmp_path):
    folder, config = export(tmp_path, "dit")
    state = load_file(os.path.join(folder, MODEL_FILE))
    state["blocks.0.mlp.0.weight"] = state["blocks.0.mlp.0.weight"][:-1].contiguous()
    save_file(state, os.path.join(folder, MODEL_FILE))
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.0\.weight has shape"):
        load_dit(config, os.path.join(folder, MODEL_FILE))
    del state["blocks.0.mlp.0.weight"]
    save_file(state, os.path.join(folder, MODEL_FILE))
    with pytest.raises(ValueError, match=r"missing \['blocks\.0\.mlp\.0\.weight'\]"):
        load_dit(config, os.path.join(folder, MODEL_FILE))


def test_reader_agrees_with_safetensors_and_refuses_bad_files(tmp_path, monkeypatch):
    import sora_model.weights_io as wio

    monkeypatch.setattr(wio, "CHUNK_BYTES", 64)  # many pieces per tensor, and a last short one
    g = torch.Generator().manual_seed(0)
    state = {
        "a": torch.randn(7, 13, generator=g),
        "b": torch.randn(5, generator=g).bfloat16(),
        "c": torch.arange(4),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
    }
    save_file(state, str(tmp_path / "x.safetensors"))
    got = dict(iter_tensors(str(tmp_path / "x.safetensors")))
    assert sorted(got) == sorted(state) and all(
        torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in state.items()
    )
    cast = dict(
        iter_tensors(str(tmp_path / "x.safetensors"), lambda n, d: torch.bfloat16 if d.is_floating_point else d)
    )
    assert torch.equal(cast["a"], state["a"].bfloat16()) and cast["c"].dtype == torch.int64
    # write_tensors' file reads back with the safetensors library
    write_tensors(
        str(tmp_path / "y.safetensors"), {k: (tuple(v.shape), v.dtype) for k, v in state.items()}, state.items()
    )
    back = load_file(str(tmp_path / "y.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in state.items())
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="truncated"):
        list(iter_tensors(str(tmp_path / "short.safetensors")))
    (tmp_path / "junk.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"not json" * 2)
    with pytest.raises(ValueError, match="is not a safetensors file"):
        read_header(str(tmp_path / "junk.safetensors"))


def test_pipeline_load_bf16_and_precision_names(tmp_path):
    folder, _ = export(tmp_path, "dit")
    encoder = build_text_encoder(TextEncoderConfig())
    pipe = TextToVideoPipeline.load(folder, precision="bf16", text_encoder=encoder)
    assert pipe.model.dtype == torch.bfloat16 and pipe.model.t_embedder.mlp[0].weight.dtype == torch.float32
    assert next(pipe.text_encoder.model.parameters()).dtype == torch.float32  # bf16 text encoder on GPU only
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, int8, got 'fp16'"):
        TextToVideoPipeline.load(folder, precision="fp16", text_encoder=encoder)


def test_text_encoder_loads_in_the_dtype_asked():
    fp32 = build_text_encoder(TextEncoderConfig(max_length=16))
    bf16 = build_text_encoder(TextEncoderConfig(max_length=16), dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    a, b = fp32.encode(["a red circle"]), bf16.encode(["a red circle"])
    assert b.tokens.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(a.tokens[a.mask], b.tokens[b.mask], dim=-1)
    assert cos.min() > 0.98


CHILD = """
import json, os, sys, torch
from sora_model.dit_load import load_dit
from sora_model.export_io import MODEL_FILE, load_export_config
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
folder = sys.argv[1]
config = load_export_config(folder)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
model = load_dit(config, os.path.join(folder, MODEL_FILE), dtype=torch.bfloat16)
print(json.dumps([status("VmHWM") - before, sum(p.numel() * p.element_size() for p in model.parameters())]))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_bf16_load_peak_stays_near_the_bf16_bytes(tmp_path):
    """~100 MB of bf16 weights from an fp32 file: the eager loader peaked near 4x that; this one near 1x."""
    cfg = dit_preset("DiT-tiny", hidden_size=1024, depth=4, num_heads=8, text_dim=TEXT_DIM)
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape), torch.float32) for k, v in DiT(cfg).state_dict().items()}
    folder = tmp_path / "export"
    folder.mkdir()
    write_tensors(str(folder / MODEL_FILE), shapes, ((k, torch.full(s, 0.01)) for k, (s, _) in shapes.items()))
    from sora_model.config import to_dict

    (folder / "config.json").write_text(json.dumps({"format_version": 1, **to_dict(PipelineConfig(model=cfg))}))
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, check=True, cwd=root
    )
    peak, nbytes = json.loads(out.stdout.strip().splitlines()[-1])
    assert nbytes > 90e6
    assert peak / nbytes < 1.5, (peak, nbytes)


def _zero3_rank(rank: int, world: int, export_dir: str, port: int, bf16: bool, out: str) -> None:
    """One rank: `build_model` from init_from under ZeRO-3, then what each rank holds and what it gathers."""
    import types

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world)
    )
    os.environ["DS_ACCELERATOR"] = "cpu"
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed

    from pipelines.train.finetune import build_model

    cfg = load_export_config(export_dir).model
    lora = types.SimpleNamespace(rank=4, scale_alpha=4, targets=["attn.qkv"], dropout=0.0)
    recipe = types.SimpleNamespace(seed=0, init_from=export_dir, lora=lora, model_config=lambda: cfg)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }
    model = build_model(recipe, config)
    whole = {n: p.data.numel() for n, p in model.named_parameters() if ".lora_" not in n}
    mine = sum(p.ds_tensor.numel() for n, p in model.named_parameters() if ".lora_" not in n)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3),
        config=config,
        dist_init_required=False,
    )
    base, bad = load_file(os.path.join(export_dir, MODEL_FILE)), []
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            if ".lora_" not in name and not torch.equal(p.data, base[name.replace(".base_layer", "")].to(p.data.dtype)):
                bad.append(name)
    dtypes = sorted({str(p.dtype) for p in engine.module.parameters()})
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"whole": sum(whole.values()), "mine": mine, "bad": bad, "dtypes": dtypes}, f)
    dist.destroy_process_group()
    # The results are written: leave without the interpreter's teardown, where a library thread still running
    # (DeepSpeed's CPU comm, gloo) can make C++ call std::terminate ("terminate called without an active exception",
    # SIGABRT: seen once in 903 tests).
    os._exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True])
def test_zero3_init_from_keeps_only_each_ranks_partition(tmp_path, bf16):
    """Under ZeRO-3 no rank materialises the model: before `deepspeed.initialize` each holds no whole base weight,
    only its partition (half of them with 2 ranks), and the gathered weights are the export's, in the engine's dtype
    (adapters too)."""
    import socket

    import torch.multiprocessing as mp

    folder, _ = export(tmp_path, "dit")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank")
    mp.spawn(_zero3_rank, args=(2, folder, port, bf16, out), nprocs=2)
    base = load_file(os.path.join(folder, MODEL_FILE))
    total = sum(v.numel() for v in base.values())
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    for r in ranks:
        assert r["whole"] == 0 and r["bad"] == []
        assert r["dtypes"] == (["torch.bfloat16"] if bf16 else ["torch.float32"])
        assert r["mine"] <= total / 2 + len(base)  # its half, each tensor padded to a multiple of 2
    assert sum(r["mine"] for r in ranks) >= total
