"""Fine-tuning from an export, without Ray: `init_from` resolution and its one-line errors, LoRA injection
(only adapters train), adapter and merged exports (merged = base + adapter), `prepare --from-export` options
and the Wan VAE's 1 + 4k frame rule. The Ray Train runs are in tests/integration/test_train_finetune.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from helpers import make_tiny_wan_folder  # noqa: E402

from pipelines.cli import main  # noqa: E402
from pipelines.train.finetune import add_lora, build_model, write_lora_export  # noqa: E402
from pipelines.train.recipe import parse_recipe  # noqa: E402
from sora_model.config import ConfigError  # noqa: E402
from sora_model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter  # noqa: E402
from sora_model.pipeline import EMA_FILE, MODEL_FILE, TextToVideoPipeline, load_export_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    folder = make_tiny_wan_folder(tmp_path_factory.mktemp("wan") / "Wan2.1-tiny-Diffusers")
    out = tmp_path_factory.mktemp("export") / "wan-tiny"
    assert main(["convert", "--from-diffusers", str(folder), "--out", str(out)]) == 0
    return out


def recipe_dict(export: Path, **extra) -> dict:
    stage = {"name": "clips", "dataset": "5x32x32", "frames": 5, "resolution": 32, "steps": 4, "lr": 1e-3}
    return {"name": "ft", "init_from": str(export), "stages": [stage], **extra}


def test_init_from_gives_the_model_and_the_omitted_sections(export: Path) -> None:
    recipe = parse_recipe(recipe_dict(export, model={"overrides": {"gradient_checkpointing": True}}, lora={"rank": 4}))
    exported = load_export_config(str(export))
    model = recipe.model_config()
    assert model.gradient_checkpointing and not exported.model.gradient_checkpointing
    assert {**vars(model), "gradient_checkpointing": False} == vars(exported.model)
    assert recipe.text_encoder == exported.text_encoder and recipe.autoencoder == exported.autoencoder
    assert recipe.diffusion == exported.diffusion
    # What the workers receive parses to the same recipe without reading the export again.
    from pipelines.train.recipe import recipe_to_dict

    again = parse_recipe({**recipe_to_dict(recipe), "init_from": "/nowhere"})
    assert again.model_config() == model
    # A recipe's own section wins over the export's.
    own = parse_recipe(recipe_dict(export, diffusion={"shift": 5.0, "sampler": "euler"}))
    assert own.diffusion.shift == 5.0 and own.diffusion.num_sampling_steps == 30


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"init_from": "/tmp"}, "init_from: '/tmp' is not an export folder: config.json is missing"),
        ({"model": {"overrides": {"hidden_size": 64, "num_heads": 2}}}, "model.hidden_size is 64 but init_from"),
        ({"model": {"preset": "DiT-tiny"}}, "but init_from"),
        ({"model": {"preset": "Wan2.1-T2V-1.3B"}}, "model.in_channels"),
        ({"model": {"layers": 3}}, "unknown key 'model.layers'"),
        ({"init_from": None, "lora": {"rank": 4}}, "lora needs init_from"),
        ({"lora": {"rank": 0}}, "lora.rank must be >= 1"),
        ({"init_from": 3}, "init_from must be an export folder"),
    ],
)
def test_init_from_errors_are_one_line(export: Path, extra: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_recipe(recipe_dict(export, **extra))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_init_from_fails_sora_train_in_one_line(export: Path, tmp_path: Path, capfd) -> None:  # noqa: ANN001
    """A path that does not exist parses (shipped recipes hold placeholders) and fails `sora train` before any work."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tmp_path / "no-such-export")))
    parse_recipe(yaml.safe_load(recipe.read_text()))
    assert main(["train", "--recipe", str(recipe), "--data", str(tmp_path), "--run-dir", str(tmp_path / "run")]) == 2
    err = capfd.readouterr().err.strip()
    assert "no-such-export' does not exist" in err and "\n" not in err, err


def test_init_from_without_weights_is_one_line(export: Path, tmp_path: Path) -> None:
    (tmp_path / "cfg-only").mkdir()
    (tmp_path / "cfg-only" / "config.json").write_text((export / "config.json").read_text())
    with pytest.raises(ConfigError, match="has no model.safetensors"):
        parse_recipe(recipe_dict(tmp_path / "cfg-only"))


def test_lora_model_trains_only_adapters_and_starts_as_the_base(export: Path) -> None:
    recipe = parse_recipe(recipe_dict(export, lora={"rank": 4, "alpha": 8}))
    model = build_model(recipe)  # no process group: reads the weights itself
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 7  # A and B x 2 blocks x (qkv, proj, q, kv, proj, mlp.0, mlp.2)
    base = TextToVideoPipeline.load(str(export)).model
    x, t = torch.randn(1, 4, 2, 4, 4), torch.tensor([500.0])
    text, mask, pooled = torch.randn(1, 512, 16), torch.ones(1, 512, dtype=torch.bool), torch.zeros(1, 16)
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t, text, mask, pooled), base(x, t, text, mask, pooled))  # B = 0


def test_lora_targets_that_match_nothing_are_one_line(export: Path) -> None:
    recipe = parse_recipe(recipe_dict(export, lora={"rank": 4, "targets": ["no_such_module"]}))
    model = build_model(parse_recipe(recipe_dict(export)))
    with pytest.raises(ConfigError) as err:
        add_lora(model, recipe.lora, 0)
    assert "lora.targets" in str(err.value) and "\n" not in str(err.value)


def test_merged_export_is_base_plus_adapter(export: Path, tmp_path: Path) -> None:
    """A LoRA run's export: peft adapter folder (+ ema/) and merged/ whose weights are W + alpha/r B @ A (1e-5)."""
    from safetensors.torch import load_file

    recipe = parse_recipe(recipe_dict(export, lora={"rank": 4, "alpha": 8, "merge_export": True}))
    model = build_model(recipe)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ema = {n: 0.5 * w for n, w in weights.items()}
    folder = tmp_path / "export"
    write_lora_export(str(folder), recipe, weights, ema)

    config, pairs = read_adapter(folder)
    assert config["base_model_name_or_path"] == str(export.resolve()) and config["r"] == 4 and config["lora_alpha"] == 8
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS} <= {p.name for p in folder.iterdir()}
    assert (folder / "ema" / ADAPTER_WEIGHTS).is_file()
    base = load_file(str(export / MODEL_FILE))
    merged = load_file(str(folder / "merged" / MODEL_FILE))
    merged_ema = load_file(str(folder / "merged" / EMA_FILE))
    assert set(merged) == set(base)
    adapted = {f"{name}.weight" for name in pairs}
    for key, value in base.items():
        if key not in adapted:
            assert torch.equal(merged[key], value), key  # the base never moved
    for name, (a, b) in pairs.items():
        delta = merged[f"{name}.weight"] - base[f"{name}.weight"]
        assert (delta - 2.0 * b @ a).abs().max().item() <= 1e-5, name
        assert (merged_ema[f"{name}.weight"] - base[f"{name}.weight"] - 0.25 * 2.0 * b @ a).abs().max().item() <= 1e-5
    # The sample actor reads an adapter folder as its base with the adapter (what --lora does).
    from pipelines.train.finetune import adapter_base

    assert adapter_base(str(folder)) == (str(export.resolve()), str(folder)) and adapter_base(str(export)) == (
        str(export),
        None,
    )
    # Serving base + --lora gives what the merged export gives.
    pipe = TextToVideoPipeline.load(str(export), lora=str(folder))
    direct = TextToVideoPipeline.load(str(folder / "merged"), use_ema=False)
    x, t = torch.randn(1, 4, 2, 4, 4), torch.tensor([500.0])
    text, mask, pooled = torch.randn(1, 512, 16), torch.ones(1, 512, dtype=torch.bool), torch.zeros(1, 16)
    with torch.no_grad():
        assert (
            pipe.model(x, t, text, mask, pooled) - direct.model(x, t, text, mask, pooled)
        ).abs().max().item() <= 1e-5


def test_shipped_wan_recipe_parses_with_a_converted_export(export: Path, tmp_path: Path) -> None:
    """cluster/recipes/wan-1.3b-lora.yaml with its init_from pointed at a (tiny) converted export."""
    data = yaml.safe_load((ROOT / "cluster" / "recipes" / "wan-1.3b-lora.yaml").read_text())
    with pytest.raises(ConfigError, match="model.in_channels is 16 but init_from"):  # its preset is the 1.3B's
        parse_recipe({**data, "init_from": str(export)})
    recipe = parse_recipe({**data, "init_from": str(export), "model": {"overrides": data["model"]["overrides"]}})
    assert recipe.lora.rank == 32 and recipe.model_config().gradient_checkpointing
    assert recipe.stages[-1].shape == (33, 480, 832) and recipe.device == "cuda" and recipe.deepspeed.zero_stage == 3


def _manifest(tmp_path: Path) -> Path:
    """A manifest is scanned before the shapes are checked; its videos are never opened here."""
    path = tmp_path / "captions.jsonl"
    path.write_text(json.dumps({"path": "videos/0.mp4", "caption": "a red circle moving left"}) + "\n")
    return path


def test_prepare_from_export_takes_the_models_parts(export: Path, tmp_path: Path, capfd) -> None:  # noqa: ANN001
    import argparse

    from pipelines.data.commands import add_prepare_arguments
    from pipelines.data.prepare import options_from_args

    p = argparse.ArgumentParser()
    add_prepare_arguments(p)
    args = p.parse_args(["--manifest", "m.jsonl", "--out", "o", "--buckets", "5x32x32", "--from-export", str(export)])
    opts = options_from_args(args)
    exported = load_export_config(str(export))
    assert opts.text_encoder == exported.text_encoder and opts.text_encoder.max_length == 512
    assert opts.autoencoder == exported.autoencoder and opts.patch == (1, 2, 2) and opts.null_prompt
    # Contradictions and frame counts the Wan VAE cannot take: one line, exit 2, before any work.
    manifest = str(_manifest(tmp_path))
    base = [
        "data",
        "prepare",
        "--manifest",
        manifest,
        "--out",
        str(tmp_path / "out"),
        "--from-export",
        str(export),
        "--no-progress",
    ]
    for extra, message in [
        (["--buckets", "5x32x32", "--text-encoder", "minilm2"], "leave out --text-encoder"),
        (["--buckets", "8x32x32"], "frames must be 1 + a multiple of 4"),
        (["--resolution", "32", "--frames", "6"], "frames must be 1 + a multiple of 4"),
    ]:
        assert main([*base, *extra]) == 2
        err = capfd.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert not (tmp_path / "out" / "dataset.json").exists()
    assert json.loads((export / "config.json").read_text())["model"]["null_text"] == "empty_prompt"
