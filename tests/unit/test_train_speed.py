"""What the trainer does for speed and memory: selective activation checkpointing, the FLOPs and peak MFU divides,
and the recipe fields that set them. Each failed (or did not exist) before issue 27."""

from __future__ import annotations

import pytest
import torch

from pipelines.train.parallelize import checkpoint_blocks, selected_blocks
from sora_model.config import ConfigError, dit_preset
from sora_model.dit import DiT

TEXT_DIM = 16


@pytest.mark.parametrize(
    ("depth", "fraction", "expected"),
    [(6, 0.0, []), (6, 0.5, [1, 3, 5]), (6, 1 / 3, [2, 5]), (6, 1.0, [0, 1, 2, 3, 4, 5]), (4, 0.75, [1, 2, 3])],
)
def test_the_fraction_picks_blocks_spread_over_depth(depth, fraction, expected):
    assert selected_blocks(depth, fraction) == expected
    assert len(selected_blocks(24, fraction)) == round(24 * fraction)


def _model() -> DiT:
    torch.manual_seed(0)
    model = DiT(dit_preset("DiT-tiny", text_dim=TEXT_DIM, depth=4))
    with torch.no_grad():  # zero-initialised gates would hide the blocks' gradients
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _grads(model: DiT) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    video = torch.randn(2, 3, 2, 8, 8, generator=gen)  # (B, C, T, H, W)
    tokens, pooled = torch.randn(2, 5, TEXT_DIM, generator=gen), torch.randn(2, TEXT_DIM, generator=gen)
    mask = torch.ones(2, 5, dtype=torch.bool)
    model.train()
    model(video, torch.tensor([0.3, 0.7]), tokens, mask, pooled).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_selected_blocks_recompute_in_the_backward_and_the_gradients_do_not_change():
    """Half the blocks run their forward twice (once more in the backward), the others once; same gradients."""
    plain, selective = _model(), _model()
    assert checkpoint_blocks(selective.blocks, 0.5) == [1, 3]
    assert checkpoint_blocks(selective.blocks, 0.5) == [1, 3]  # applied again: no second wrapper
    calls = [0] * len(selective.blocks)
    for i, block in enumerate(selective.blocks):
        # before forward: a recompute stops early
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    expected = _grads(plain)
    got = _grads(selective)
    assert calls == [1, 2, 1, 2]
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)
    assert [n for n, _ in selective.named_parameters()] == [n for n, _ in plain.named_parameters()]  # names unchanged
    with torch.no_grad():
        calls[:] = [0] * 4
        _ = selective.eval()
        selective(
            torch.randn(1, 3, 2, 8, 8),
            torch.tensor([0.5]),
            torch.randn(1, 5, TEXT_DIM),
            torch.ones(1, 5, dtype=torch.bool),
            torch.randn(1, TEXT_DIM),
        )
    assert calls == [1, 1, 1, 1]  # inference: nothing to recompute


def test_flops_per_token_follow_the_width_depth_and_sequence():
    from pipelines.train.metrics import train_flops_per_token

    cfg = dit_preset("DiT-L/2", text_dim=4096)
    base = train_flops_per_token(cfg, 8192, 300)
    d, depth = cfg.hidden_size, cfg.depth
    # 6 x the block's matmul parameters
    dense = 3 * depth * (12 * d * d + 4 * d * (cfg.ffn_dim or int(d * cfg.mlp_ratio)))
    attention = 3 * depth * 4 * 8192 * d  # self-attention's scores and weighted sum: 4 N D a block
    assert dense < base - attention < 1.1 * dense  # the rest: caption cross-attention, patch embedding and head
    # less the caption K/V, shared by more tokens
    assert train_flops_per_token(cfg, 16384, 300) - base == pytest.approx(attention, rel=0.01)


@pytest.mark.parametrize(
    ("name", "bf16", "override", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", True, None, 989.0),
        ("NVIDIA L40S", True, None, 362.0),
        ("NVIDIA L40", True, None, 181.0),
        ("NVIDIA A100-SXM4-80GB", False, None, 19.5),
        ("cpu", False, None, 0.1),
        ("NVIDIA H100", True, 500.0, 500.0),
    ],
)
def test_peak_comes_from_the_recipe_or_the_device_name(name, bf16, override, expected):
    from pipelines.train.metrics import peak_tflops

    assert peak_tflops(name, bf16, override) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("checkpoint_fraction", 1.5, r"checkpoint_fraction must be in \[0, 1\], got 1.5"),
        ("checkpoint_fraction", -0.1, r"checkpoint_fraction must be in \[0, 1\]"),
        ("peak_tflops", 0, "peak_tflops must be > 0, got 0"),
    ],
)
def test_recipe_speed_fields_are_checked(field, value, message):
    import yaml

    from pipelines.train.recipe import parse_recipe

    data = yaml.safe_load(open("cluster/recipes/smoke-cpu.yaml"))
    assert parse_recipe(data).checkpoint_fraction == 0.0
    with pytest.raises(ConfigError, match=message):
        parse_recipe({**data, field: value})


def _steps(prof, n: int) -> None:
    a = torch.randn(64, 64)
    for _ in range(n):
        with torch.profiler.record_function("train_step"):
            (a @ a).sum()
        prof.step()


@pytest.mark.parametrize(("steps", "taken", "recorded"), [(2, 5, 2), (4, 3, 2)])
def test_profile_writes_a_trace_of_n_steps_after_a_warm_up(tmp_path, steps, taken, recorded):
    """N steps recorded after one warm-up; a run that ends sooner writes what it recorded when closed."""
    import json

    from pipelines.train.profile import StepProfiler

    prof = StepProfiler(steps, str(tmp_path), rank=1, device=torch.device("cpu"), start_step=7)
    _steps(prof, taken)
    prof.close()
    prof.close()  # a second close (stop, then finish) writes nothing more
    assert prof.written == "profile/rank1-step8.json" and sorted(p.name for p in (tmp_path / "profile").iterdir()) == [
        "rank1-step8.json"
    ]
    events = json.loads((tmp_path / prof.written).read_text())["traceEvents"]
    marks = {e["name"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#")}
    assert {f"ProfilerStep#{k}" for k in range(1, recorded + 1)} <= marks  # (+ the empty step a close cuts short)
    assert sum(e.get("name") == "train_step" for e in events) == recorded  # the warm-up step's work is not in it


def test_profile_out_of_range_is_a_one_line_error(tmp_path, capfd):
    from pipelines.cli import main as sora

    rc = sora(
        [
            "train",
            "--recipe",
            "cluster/recipes/smoke-cpu.yaml",
            "--data",
            str(tmp_path),
            "--run-dir",
            str(tmp_path / "r"),
            "--profile",
            "99",
        ]
    )
    out = capfd.readouterr()
    err = out.out + out.err
    assert rc != 0 and "--profile must be between 1 and the recipe's 14 steps, got 99" in err and "Traceback" not in err
