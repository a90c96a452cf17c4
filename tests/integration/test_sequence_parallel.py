"""Ulysses sequence parallelism and every DiT entry point under DeepSpeed ZeRO-3: two Ray Train workers on CPU.

One TorchTrainer run (gloo) does the checks inside its workers, against a plain single-process DiT with the
same weights in the same process; a failed check fails the run, and the largest differences come back as
metrics. Tolerance (fp32): loss within 1e-5 relative, every gradient within rtol 1e-4, atol 1e-6.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

TEXT_DIM = 16


def _checks(config: dict) -> None:
    import json
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from pipelines.train.sequence_parallel import install_ulysses, new_groups, sequence_parallel_forward
    from sora_model.config import DiffusionConfig, LossConfig, dit_preset
    from sora_model.diffusion import build_diffusion
    from sora_model.dit import DiT
    from sora_model.patch import grid_positions, patchify

    world = dist.get_world_size()
    cfg = dit_preset("DiT-tiny", text_dim=TEXT_DIM, temporal_windows=(2, 0), absolute_positions=True)

    def fresh() -> DiT:
        torch.manual_seed(0)
        model = DiT(cfg)
        with torch.no_grad():  # make the zero-initialised parts non-zero so every path is checked
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        return model

    reference = fresh().train()
    model = fresh().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 2 * world,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config, dist_init_required=False)
    assert any(hasattr(p, "ds_tensor") for p in engine.module.parameters())  # ZeRO-3 really partitioned it

    # The same batch on every rank: T' = 5 with window 2 is ragged; 80 tokens per clip, 40 per rank.
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 3, 5, 8, 8, generator=g)
    tokens, pooled = torch.randn(2, 6, TEXT_DIM, generator=g), torch.randn(2, TEXT_DIM, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 3:] = False
    drop = torch.tensor([False, True])
    diffusion = build_diffusion(DiffusionConfig())
    loss_cfg = LossConfig()

    def loss_of(fn):
        return diffusion.training_losses(fn, x0, loss_cfg, generator=torch.Generator().manual_seed(2), num_tokens=80)[
            "loss"
        ]

    # 1. Sequence parallel (Ulysses, sp = world) under ZeRO-3 vs the single-process model.
    group, _, _ = new_groups(world, world)
    install_ulysses(engine.module, group)

    def sp_fn(x_t, t):
        return sequence_parallel_forward(
            engine, x_t, t, tokens, mask, pooled, drop, group, cfg.patch_size, cfg.in_channels
        )

    loss = loss_of(sp_fn)
    engine.backward(loss * world)  # DeepSpeed averages over the world; each rank holds its piece's share
    ref_loss = loss_of(lambda x_t, t: reference(x_t, t, tokens, mask, pooled, drop_text=drop))
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()), (loss.item(), ref_loss.item())
    worst = 0.0
    for (name, p), ref in zip(engine.module.named_parameters(), reference.parameters()):
        grad = safe_get_full_grad(p)
        torch.testing.assert_close(grad, ref.grad, rtol=1e-4, atol=1e-6, msg=name)
        worst = max(worst, float((grad - ref.grad).abs().max()))
    engine.module.set_attention_hook(None)

    # 2. Every entry point with partitioned weights: video forward, packed forward, forward_tokens (padded,
    # with the null condition), each called as users call them.
    reference.eval()
    engine.module.eval()
    t = torch.tensor([300.0, 600.0])
    with torch.no_grad():
        out = engine(x0, t, tokens, mask, pooled, drop_text=drop)
        torch.testing.assert_close(out, reference(x0, t, tokens, mask, pooled, drop_text=drop), rtol=1e-5, atol=1e-6)
        small = torch.randn(1, 3, 2, 4, 4, generator=g)
        grids = ((5, 4, 4), (2, 2, 2))
        packed = torch.cat([patchify(x0[:1], cfg.patch_size)[0], patchify(small, cfg.patch_size)[0]])
        torch.testing.assert_close(
            engine(packed, t, tokens, mask, pooled, drop_text=drop, grids=grids),
            reference(packed, t, tokens, mask, pooled, drop_text=drop, grids=grids),
            rtol=1e-5,
            atol=1e-6,
        )
        padded = torch.zeros(2, 80, cfg.patch_dim)
        padded[0] = patchify(x0[:1], cfg.patch_size)[0]
        padded[1, :8] = patchify(small, cfg.patch_size)[0]
        positions = torch.zeros(2, 80, 3, dtype=torch.long)
        positions[0], positions[1, :8] = grid_positions((5, 4, 4)), grid_positions((2, 2, 2))
        token_mask = torch.zeros(2, 80, dtype=torch.bool)
        token_mask[0], token_mask[1, :8] = True, True
        args = (padded, t, tokens, mask, pooled, positions, token_mask)
        torch.testing.assert_close(
            engine.module.forward_tokens(*args, drop_text=drop),
            reference.forward_tokens(*args, drop_text=drop),
            rtol=1e-5,
            atol=1e-6,
        )
    if dist.get_rank() == 0:  # Ray Train v2 keeps metrics only with checkpoints: hand the figures back in a file
        with open(config["out"], "w") as f:
            json.dump({"loss": loss.item(), "reference_loss": ref_loss.item(), "max_grad_diff": worst}, f)


def test_ulysses_and_entry_points_under_zero3_on_two_workers(tmp_path):
    import json
    import sys

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        trainer = TorchTrainer(
            _checks,
            train_loop_config={"out": str(tmp_path / "figures.json")},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(
                storage_path=str(tmp_path), worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}}
            ),
        )
        trainer.fit()
    finally:
        ray.shutdown()
    metrics = json.loads((tmp_path / "figures.json").read_text())
    assert abs(metrics["loss"] - metrics["reference_loss"]) <= 1e-5 * abs(metrics["reference_loss"])
    assert metrics["max_grad_diff"] <= 1e-4
