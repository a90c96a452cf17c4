"""Step caching (TeaCache, First-Block-Cache) on a tiny export: exact at threshold 0, skips and stays close above it,
both CFG branches in every cached call, state per sampling call, never in training, bad requests refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import make_tiny_export

import sora_model.pipeline as pipeline_module
from sora_model.config import dit_preset
from sora_model.pipeline import TextToVideoPipeline
from sora_model.step_cache import (
    DIT_TEACACHE_COEFFICIENTS,
    STEP_CACHE_METHODS,
    WAN_TEACACHE_COEFFICIENTS,
    StepCache,
    build_step_cache,
    check_step_cache,
    fit_coefficients,
)

PROMPTS = ["a red circle moving left", "a blue square moving up", "a green triangle moving down"]
SEEDS = [0, 1, 2]
STEPS = 10
SPLIT_BUDGET = 64
"""CPU tokens per call small enough that the tiny export's 3 prompts x 2 branches take several calls."""


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> TextToVideoPipeline:
    return TextToVideoPipeline.load(str(make_tiny_export(tmp_path_factory.mktemp("export"))))


def sample(pipe: TextToVideoPipeline, **options) -> tuple[torch.Tensor, list]:
    stats: list = []
    latents = pipe.sample_latents(PROMPTS, seed=SEEDS, steps=STEPS, cache_stats=stats.append, **options)
    return latents, stats


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / b.abs().mean())


@pytest.mark.parametrize("split", [False, True], ids=["one-call", "split-calls"])
@pytest.mark.parametrize("method", STEP_CACHE_METHODS)
def test_threshold_zero_equals_uncached_bitwise(pipe, method, split, monkeypatch):
    if split:
        monkeypatch.setattr(pipeline_module, "CPU_TOKENS_PER_CALL", SPLIT_BUDGET)
    uncached, none_stats = sample(pipe)
    cached, stats = sample(pipe, step_cache=method, cache_threshold=0)
    assert none_stats == []  # no cache, no stats
    assert torch.equal(cached, uncached)
    calls_per_step = 3 if split else 1  # one prompt's two branches per call when split
    assert stats[0].calls == STEPS * calls_per_step and stats[0].skipped == 0


@pytest.mark.parametrize("method", STEP_CACHE_METHODS)
def test_positive_threshold_skips_calls_and_stays_close(pipe, method):
    uncached, _ = sample(pipe)
    skipped = []
    for threshold in (0.1, 0.4):
        cached, stats = sample(pipe, step_cache=method, cache_threshold=threshold)
        assert 0 < stats[0].skipped <= STEPS - 2  # the first and last calls always compute
        assert 0 < relative_error(cached, uncached) < 0.03
        skipped.append(stats[0].skipped)
    assert skipped[1] >= skipped[0]


def test_default_threshold_per_method(pipe):
    for method in STEP_CACHE_METHODS:
        _, stats = sample(pipe, step_cache=method)
        assert stats[0].threshold == check_step_cache(method, None)[1] > 0


def test_each_call_holds_both_cfg_branches_of_its_prompts(pipe, monkeypatch):
    """Split into several calls, every call has a prompt's conditional and unconditional rows together (the same
    x, one caption kept and one dropped), so a call's skip decision covers both branches."""
    monkeypatch.setattr(pipeline_module, "CPU_TOKENS_PER_CALL", SPLIT_BUDGET)
    seen = []

    def record(module, args, kwargs):
        seen.append((args[0].clone(), kwargs["drop_text"].clone()))

    handle = pipe.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        _, stats = sample(pipe, step_cache="fbcache", cache_threshold=0.4)
    finally:
        handle.remove()
    assert len(seen) == stats[0].calls and stats[0].skipped > 0
    for x, drop in seen:
        k = x.shape[0] // 2
        assert x.shape[0] == 2 * k and torch.equal(x[:k], x[k:])
        assert not drop[:k].any() and drop[k:].all()


def test_a_skip_covers_every_row_of_the_call():
    """A call either reuses the cached residual for all rows (cond and uncond alike) or runs the blocks for all."""
    torch.manual_seed(0)

    class Add(torch.nn.Module):
        def forward(self, x, c, *args):
            return x + c

    blocks = torch.nn.ModuleList([Add(), Add(), Add()])
    cache = StepCache("fbcache", 0.5, keep_first=1, keep_last=0)
    cache.begin()
    x = torch.randn(4, 5, 3)
    first = cache.run_blocks(blocks, x, torch.ones(1, 1, 3))
    assert torch.allclose(first, x + 3)
    later = cache.run_blocks(blocks, x, torch.full((1, 1, 3), 1.1))  # first block's residual moved by 10%
    assert cache.stats.skipped == 1
    assert torch.allclose(later, x + 1.1 + 2.0)  # every row: fresh first block, cached rest (2 x the old c)


def test_state_is_per_sampling_call_and_removed_after(pipe):
    first, _ = sample(pipe, step_cache="teacache", cache_threshold=0.4)
    again, _ = sample(pipe, step_cache="teacache", cache_threshold=0.4)
    assert torch.equal(first, again) and pipe.model.step_cache is None

    def fail(step, total):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        pipe.sample_latents(PROMPTS[0], steps=STEPS, step_cache="fbcache", callback=fail)
    assert pipe.model.step_cache is None


def test_a_model_in_training_never_uses_the_cache(pipe):
    model = pipe.model
    cache = StepCache("teacache", 1e9, keep_first=1, keep_last=0)  # would skip every call after the first
    cache.begin()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, model.cfg.in_channels, 4, 16, 16, generator=g)
    tokens, mask = torch.randn(2, 3, model.cfg.text_dim, generator=g), torch.ones(2, 3)
    pooled = torch.randn(2, model.cfg.text_dim, generator=g)
    with torch.no_grad():
        expected = [model(x, torch.full((2,), t), tokens, mask, pooled) for t in (900.0, 800.0)]
        model.step_cache = cache
        try:
            model.train()
            got = [model(x, torch.full((2,), t), tokens, mask, pooled) for t in (900.0, 800.0)]
        finally:
            model.eval()
            model.step_cache = None
    assert all(torch.equal(a, b) for a, b in zip(got, expected)) and cache.stats.calls == 0


@pytest.mark.parametrize(
    ("method", "threshold", "message"),
    [
        ("bogus", None, "step_cache must be one of none, teacache, fbcache, got 'bogus'"),
        ("teacache", -0.1, "cache_threshold must be a finite number >= 0"),
        ("fbcache", math.nan, "cache_threshold must be a finite number >= 0"),
        ("teacache", math.inf, "cache_threshold must be a finite number >= 0"),
        (None, 0.1, "cache_threshold needs a step_cache"),
        ("none", 0.1, "cache_threshold needs a step_cache"),
    ],
)
def test_bad_names_and_thresholds_are_refused(pipe, method, threshold, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        pipe.sample_latents(PROMPTS[0], steps=2, step_cache=method, cache_threshold=threshold)
    assert pipe.model.step_cache is None


def test_none_and_case_are_accepted(pipe):
    uncached, _ = sample(pipe)
    off, stats = sample(pipe, step_cache="none")
    assert torch.equal(off, uncached) and stats == []
    assert check_step_cache(" TeaCache ", 0) == ("teacache", 0.0)


def test_wan_exports_take_the_published_wan_coefficients():
    wan = build_step_cache("teacache", None, dit_preset("Wan2.1-T2V-1.3B"))
    assert (
        wan.coefficients == WAN_TEACACHE_COEFFICIENTS[(1536, 16)]
        and wan.indicator == "modulation"
        and wan.keep_first == 5
    )
    ours = build_step_cache("teacache", None, dit_preset("DiT-tiny", text_dim=384))
    assert ours.coefficients == DIT_TEACACHE_COEFFICIENTS and ours.indicator == "modulated_input"
    assert build_step_cache(None, None, dit_preset("DiT-tiny")) is None


def test_fit_coefficients_recovers_a_polynomial_and_record_mode_feeds_it(pipe):
    xs = np.linspace(0.01, 0.5, 20)
    truth = (3.0, -2.0, 1.0, 0.5, 0.01)
    fitted = fit_coefficients([(x, float(np.polyval(truth, x))) for x in xs])
    assert np.allclose(fitted, truth, atol=1e-6)
    cache = StepCache("teacache", 0.0, record=True)
    uncached, _ = sample(pipe)
    recorded, stats = sample(pipe, step_cache=cache)
    assert torch.equal(recorded, uncached) and stats[0] is cache.stats
    assert len(cache.records) == STEPS - 1 and all(a > 0 and b > 0 for a, b in cache.records)
    with pytest.raises(ValueError, match="carries its own threshold"):
        sample(pipe, step_cache=cache, cache_threshold=0.1)
    with pytest.raises(ValueError, match="more than 4 records"):
        fit_coefficients(cache.records[:3])
