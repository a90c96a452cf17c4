"""`init_from` weights that cannot load fail `sora train` before any work, in one line naming the file (issue 27).

Before: only an OSError on rank 0 became a message; a truncated or non-safetensors file raised the reader's own
error inside a worker (retried `max_failures` times), and a file of another model's shapes was found only there.
Now the driver reads the file's header (no tensor) against the model built on the meta device.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from pipelines.cli import main
from pipelines.train.finetune import check_init_weights, load_init_weights
from pipelines.train.recipe import parse_recipe
from sora_model.config import ConfigError, PipelineConfig, dit_preset
from sora_model.dit import DiT
from sora_model.pipeline import MODEL_FILE, save_export

ROOT = Path(__file__).resolve().parents[2]


def _cfg(**kw):
    return dit_preset("DiT-tiny", text_dim=384, patch_size=(1, 4, 4), **kw)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = DiT(_cfg())
    out = tmp_path_factory.mktemp("export") / "tiny"
    save_export(str(out), PipelineConfig(model=_cfg()), model.state_dict())
    return out


def _copy(export: Path, tmp_path: Path) -> Path:
    out = tmp_path / "broken"
    shutil.copytree(export, out)
    return out


def test_a_fitting_export_passes_and_loads(export):
    check_init_weights(_cfg(), str(export))
    model = DiT(_cfg())
    load_init_weights(model, str(export))  # single process: rank 0 reads
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), DiT(_cfg()).state_dict().values()))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("garbage", "cannot read {path}: "),
        ("truncated", "cannot read {path}: "),
        ("missing", "cannot read {path}: "),
        ("empty", "cannot read {path}: "),
    ],
)
def test_an_unreadable_file_is_one_line_naming_it(export, tmp_path, damage, message):
    folder = _copy(export, tmp_path)
    weights = folder / MODEL_FILE
    data = weights.read_bytes()
    if damage == "garbage":
        weights.write_bytes(b"\x07" * 4096)
    elif damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(b"")
    expected = message.format(path=weights)
    for check in (lambda: check_init_weights(_cfg(), str(folder)), lambda: load_init_weights(DiT(_cfg()), str(folder))):
        with pytest.raises((ConfigError, ValueError)) as err:
            check()
        assert str(err.value).startswith(f"init_from: {expected}") and "\n" not in str(err.value), str(err.value)
        # the header check says SafetensorError, the streaming loader "not a safetensors file" (or its size)
        assert damage == "missing" or "afetensor" in str(err.value) or "bytes" in str(err.value), str(err.value)


def test_weights_of_another_model_are_one_line_naming_the_file_and_tensors(export):
    with pytest.raises(ConfigError) as err:
        check_init_weights(_cfg(depth=3), str(export))
    text = str(err.value)
    assert text.startswith(f"init_from: {export / MODEL_FILE} does not fit its config.json's model (missing ")
    assert "blocks.2." in text and "\n" not in text
    with pytest.raises(ConfigError, match=r"wrong shape \d+: .*!="):
        check_init_weights(_cfg(hidden_size=64, num_heads=2), str(export))


def test_sora_train_stops_on_a_damaged_export_before_ray(export, tmp_path, capfd):
    folder = _copy(export, tmp_path)
    (folder / MODEL_FILE).write_bytes(b"not safetensors")
    data = yaml.safe_load((ROOT / "cluster" / "recipes" / "smoke-cpu.yaml").read_text())
    data.pop("model")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**data, "init_from": str(folder)}))
    parse_recipe(yaml.safe_load(recipe.read_text()))  # parses: the config.json is fine
    assert main(["train", "--recipe", str(recipe), "--data", str(tmp_path), "--run-dir", str(tmp_path / "run")]) == 2
    out = capfd.readouterr()
    err = (out.out + out.err).strip()
    assert f"init_from: cannot read {folder / MODEL_FILE}" in err and "Traceback" not in err, err
