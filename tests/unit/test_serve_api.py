"""The serving stage without Ray: request schemas and limits, OpenAI error shapes, the job store,
the settings tree, and the Serve config YAML against Ray's own schema."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml

from pipelines.serve import api
from pipelines.serve.api import ApiError, ModelCard
from pipelines.serve.config import (
    RUNTIME_KEYS,
    Limits,
    ServeSettings,
    Tier,
    apply_user_config,
    hash_key,
    load_settings,
)
from sora_model.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CARD = ModelCard(
    num_frames=8,
    height=32,
    width=32,
    fps=8,
    steps=30,
    guidance_scale=4.0,
    sampler="euler",
    samplers=("euler", "heun"),
    spatial_multiple=4,
    frame_multiple=1,
)


def settings(**kw) -> ServeSettings:
    return ServeSettings(model="/nonexistent/export", **kw)


def resolve(fields: dict, tier: Tier | None = None, s: ServeSettings | None = None) -> api.GenerationParams:
    return api.resolve(api.parse_create(fields), CARD, s or settings(), tier or Tier(), random_seed=123)


def rejects(
    fields: dict, param: str, *words: str, tier: Tier | None = None, s: ServeSettings | None = None
) -> ApiError:
    with pytest.raises(ApiError) as info:
        resolve(fields, tier, s)
    err = info.value
    assert 400 <= err.status < 500
    assert err.param == param, (err.param, err.message)
    for w in words:
        assert w in err.message, err.message
    body = err.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return err


# -- requests --------------------------------------------------------------------------------------


def test_defaults_come_from_the_model():
    p = resolve({"prompt": "  a red circle moving left "})
    assert (p.prompt, p.num_frames, p.height, p.width, p.steps, p.guidance_scale, p.sampler) == (
        "a red circle moving left",
        8,
        32,
        32,
        30,
        4.0,
        "euler",
    )
    assert p.seed == 123 and p.model == "sora-ray" and p.size == "32x32" and p.seconds == "1"


def test_openai_fields_and_extensions():
    # What the SDK's multipart form sends: every value a string.
    p = resolve(
        {
            "prompt": "x",
            "model": "sora-2",
            "seconds": "2",
            "size": "64x16",
            "steps": "12",
            "guidance_scale": "2.5",
            "seed": "7",
            "sampler": "heun",
            "negative_prompt": "blur",
        }
    )
    assert (p.num_frames, p.width, p.height, p.steps, p.guidance_scale, p.seed, p.sampler, p.negative_prompt) == (
        16,
        64,
        16,
        12,
        2.5,
        7,
        "heun",
        "blur",
    )
    assert p.model == "sora-2" and p.seconds == "2"
    assert resolve({"prompt": "x", "seconds": "2", "num_frames": 3}).num_frames == 3  # num_frames wins
    assert resolve({"prompt": "x", "num_frames": 4}).seconds == "0.5"


def test_preview_model_and_tier_defaults():
    assert resolve({"prompt": "x", "model": "sora-ray-preview"}).steps == settings().preview_steps
    assert resolve({"prompt": "x"}, tier=Tier(default_steps=5)).steps == 5
    assert resolve({"prompt": "x"}, tier=Tier(max_steps=10)).steps == 10  # the default is clipped to the tier


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"prompt": ""}, "prompt", ["empty"]),
        ({"prompt": "   "}, "prompt", ["empty"]),
        ({"prompt": "x" * 2001}, "prompt", ["2001", "2000", "limits.max_prompt_chars"]),
        ({"prompt": "x", "negative_prompt": "n" * 3000}, "negative_prompt", ["limits.max_prompt_chars"]),
        ({"prompt": "x", "size": "-16x16"}, "size", ["WIDTHxHEIGHT"]),
        ({"prompt": "x", "size": "0x16"}, "size", ["positive"]),
        ({"prompt": "x", "size": "16by16"}, "size", ["WIDTHxHEIGHT"]),
        ({"prompt": "x", "size": "100000x100000"}, "size", ["limits.max_side"]),
        ({"prompt": "x", "size": "1024x1024"}, "size", ["1048576", "limits.max_pixels"]),
        ({"prompt": "x", "size": "30x32"}, "size", ["multiples of 4"]),
        ({"prompt": "x", "num_frames": 0}, "num_frames", ["at least 1"]),
        ({"prompt": "x", "num_frames": -3}, "num_frames", ["at least 1"]),
        ({"prompt": "x", "num_frames": 10**6}, "num_frames", ["limits.max_frames"]),
        ({"prompt": "x", "seconds": "-1"}, "seconds", ["> 0"]),
        ({"prompt": "x", "seconds": "abc"}, "seconds", ["number"]),
        ({"prompt": "x", "seconds": "1e9"}, "seconds", ["limits.max_seconds"]),
        ({"prompt": "x", "steps": 0}, "steps", ["limits.max_steps"]),
        ({"prompt": "x", "steps": 10**6}, "steps", ["limits.max_steps"]),
        ({"prompt": "x", "guidance_scale": 100}, "guidance_scale", ["limits.max_guidance"]),
        ({"prompt": "x", "guidance_scale": "nan"}, "guidance_scale", ["between"]),
        ({"prompt": "x", "sampler": "dpm++"}, "sampler", ["euler, heun"]),
        ({"prompt": "x", "sampler": "ddpm"}, "sampler", ["euler, heun"]),
        ({"prompt": "x", "seed": -1}, "seed", ["between 0"]),
        ({"prompt": "x", "seed": 2**64}, "seed", ["between 0"]),
        ({"prompt": "x", "model": "gpt-4"}, "model", ["does not exist", "sora-ray"]),
        ({"prompt": "x", "input_reference": b"\x89PNG"}, "input_reference", ["cannot use"]),
    ],
)
def test_limits_name_the_parameter_and_the_limit(fields, param, words):
    rejects(fields, param, *words)


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({}, "prompt", "missing_required_parameter"),
        ({"prompt": 3}, "prompt", "invalid_type"),
        ({"prompt": ["a"]}, "prompt", "invalid_type"),
        ({"prompt": "x", "steps": "abc"}, "steps", "invalid_type"),
        ({"prompt": "x", "seed": 1.5}, "seed", "invalid_type"),
        ({"prompt": "x", "num_frames": {"a": 1}}, "num_frames", "invalid_type"),
        ({"prompt": "x", "resolution": 5}, "resolution", "unknown_parameter"),
    ],
)
def test_wrong_types_and_unknown_fields(fields, param, code):
    with pytest.raises(ApiError) as info:
        api.parse_create(fields)
    assert info.value.status == 400 and info.value.param == param and info.value.code == code


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"prompt": "x", "steps": True}, "steps", "invalid_type"),
        ({"prompt": "x", "num_frames": 8.0}, "num_frames", "invalid_type"),
        ({"prompt": "x", "seed": 2.0}, "seed", "invalid_type"),
        ({"prompt": "x", "guidance_scale": "2.5"}, "guidance_scale", "invalid_type"),
        ({"prompt": "x", "guidance_scale": False}, "guidance_scale", "invalid_type"),
        ({"prompt": "x", "seconds": True}, "seconds", "invalid_type"),
        ({"prompt": "x", "steps": "4"}, "steps", "invalid_type"),
        ({"prompt": "\ud800 lone surrogate"}, "prompt", "invalid_encoding"),
        ({"prompt": "x", "negative_prompt": "\udfff"}, "negative_prompt", "invalid_encoding"),
        ({"prompt": "nul \x00 inside"}, "prompt", "invalid_encoding"),
        ({"prompt": "x", "model": "m" * 65}, "model", "string_above_max_length"),
        ({"prompt": "x", "size": "1" * 65}, "size", "string_above_max_length"),
    ],
)
def test_json_bodies_are_validated_strictly(fields, param, code):
    """A JSON value of the wrong type is a 400 naming the field, not silently coerced (forms stay lax: all strings)."""
    with pytest.raises(ApiError) as info:
        api.parse_create(fields, strict=True)
    assert info.value.status == 400 and info.value.param == param and info.value.code == code, info.value.message
    assert api.parse_create({"prompt": "x", "seconds": 4, "guidance_scale": 3}, strict=True).guidance_scale == 3.0


def test_bodies_with_invalid_unicode_or_non_numbers_are_400s():
    import asyncio

    class FakeRequest:
        def __init__(self, body: bytes, ctype: str) -> None:
            self.headers = {"content-type": ctype}
            self.body = body

        async def stream(self):
            for i in range(0, len(self.body), 7):
                yield self.body[i : i + 7]

    def read(body: bytes, ctype: str):
        return asyncio.run(api.read_create_fields(FakeRequest(body, ctype)))

    for body in (
        b'{"prompt": "x", "guidance_scale": NaN}',
        b'{"prompt": "x", "steps": Infinity}',
        b'{"prompt": "\xff\xfe"}',
    ):
        with pytest.raises(ApiError) as info:
            read(body, "application/json")
        assert info.value.status == 400 and info.value.code == "invalid_json", body
    with pytest.raises(ApiError) as info:  # url-encoded forms are a cross-site request without a preflight
        read(b"prompt=a+red+circle", "application/x-www-form-urlencoded")
    assert info.value.status == 415 and info.value.param == "Content-Type"
    req = httpx.Request("POST", "http://x", files={"prompt": (None, b"\xff\xfe bad")})
    with pytest.raises(ApiError) as info:
        read(req.read(), req.headers["content-type"])
    assert info.value.param == "prompt" and info.value.code == "invalid_encoding"
    # A streamed (chunked) body over the limit is cut off at the limit.
    big = FakeRequest(b"x" * 100, "application/json")
    with pytest.raises(ApiError) as info:
        asyncio.run(api.read_body(big, limit=50))
    assert info.value.status == 413 and "50" in info.value.message


def test_tier_tightens_limits():
    rejects({"prompt": "x", "steps": 20}, "steps", "10", tier=Tier(max_steps=10))
    rejects({"prompt": "x", "size": "64x64"}, "size", "1024", tier=Tier(max_pixels=1024))
    rejects({"prompt": "x", "num_frames": 16}, "num_frames", "8", tier=Tier(max_frames=8))


def test_global_cap_applies_over_a_generous_tier():
    rejects({"prompt": "x", "steps": 200}, "steps", "100", tier=Tier(max_steps=500))


def test_configured_samplers_and_causal_frames():
    s = settings(limits=Limits(samplers=["euler"]))
    rejects({"prompt": "x", "sampler": "heun"}, "sampler", "euler", s=s)
    card = ModelCard(**{**CARD.__dict__, "frame_multiple": 4, "causal_frames": True})
    assert card.check_frames(9) is None and "1 + a multiple of 4" in card.check_frames(8)


def test_cache_key_covers_every_parameter():
    a = resolve({"prompt": "x", "seed": 1})
    assert a.cache_key() == resolve({"prompt": "x", "seed": 1}).cache_key()
    for change in (
        {"seed": 2},
        {"steps": 3},
        {"guidance_scale": 2},
        {"prompt": "y"},
        {"model": "sora-2"},
        {"size": "16x16"},
    ):
        assert resolve({"prompt": "x", "seed": 1, **change}).cache_key() != a.cache_key(), change
    assert a.shape_key == resolve({"prompt": "other", "seed": 9, "guidance_scale": 7}).shape_key
    assert a.shape_key != resolve({"prompt": "x", "negative_prompt": "n"}).shape_key


def test_multipart_parsing_matches_what_httpx_sends():
    req = httpx.Request(
        "POST",
        "http://x/v1/videos",
        data={"prompt": "a red circle é", "seconds": "4", "size": "32x32"},
        files={"input_reference": ("ref.png", b"\x89PNG\r\n", "image/png")},
    )
    body = req.read()
    fields = api.parse_multipart(body, req.headers["content-type"])
    assert fields == {"prompt": "a red circle é", "seconds": "4", "size": "32x32", "input_reference": b"\x89PNG\r\n"}
    with pytest.raises(ApiError):
        api.parse_multipart(b"garbage", "multipart/form-data")


def test_video_object_hides_internal_fields():
    job = {
        "id": "video_1",
        "object": "video",
        "model": "m",
        "status": "queued",
        "progress": 0,
        "created_at": 1,
        "size": "8x8",
        "seconds": "1",
        "num_frames": 8,
        "steps": 2,
        "guidance_scale": 1.0,
        "seed": 0,
        "sampler": "euler",
        "_owner": "k",
        "_params": {},
    }
    out = api.video_object(job)
    assert not any(k.startswith("_") for k in out) and out["error"] is None and out["completed_at"] is None


# -- downloads ------------------------------------------------------------------------------------


def test_range_headers():
    assert api.parse_range(None, 100) is None and api.parse_range("", 100) is None
    assert api.parse_range("bytes=0-9", 100) == (0, 9)
    assert api.parse_range("bytes=90-", 100) == (90, 99)
    assert api.parse_range("bytes=90-1000", 100) == (90, 99)
    assert api.parse_range("bytes=-10", 100) == (90, 99)
    assert api.parse_range("bytes=-1000", 100) == (0, 99)
    assert api.parse_range("bytes=0-1,5-6", 100) is None  # several ranges: the whole body (RFC 9110 allows it)
    assert api.parse_range("items=0-1", 100) is None
    for bad in ("bytes=100-", "bytes=5-2", "bytes=-0"):
        with pytest.raises(ApiError) as info:
            api.parse_range(bad, 100)
        assert info.value.status == 416 and info.value.headers["Content-Range"] == "bytes */100"


# -- settings and the Serve config ------------------------------------------------------------------


def test_settings_are_strict(tmp_path):
    s = load_settings({"model": "rel/export", "store": "rel/store"})
    assert Path(s.model).is_absolute() and Path(s.store).is_absolute()
    with pytest.raises(ConfigError, match="unknown key 'modle'"):
        load_settings({"modle": "x"})
    with pytest.raises(ConfigError, match="limits.max_steps"):
        load_settings({"model": "x", "limits": {"max_steps": "many"}})
    with pytest.raises(ConfigError, match="sha256"):
        load_settings({"model": "x", "api_keys": {"plaintext-key": "default"}})
    with pytest.raises(ConfigError, match="tier 'gold'"):
        load_settings({"model": "x", "api_keys": {hash_key("k"): "gold"}})
    assert load_settings({"model": "x", "api_keys": {hash_key("k"): "default"}}).api_keys
    with pytest.raises(ConfigError, match="tier 'gold'"):
        load_settings({"model": "x", "api_keys": {hash_key("k"): {"tier": "gold"}}})
    with pytest.raises(ConfigError, match="db must be an SQLAlchemy URL"):
        load_settings({"model": "x", "db": "mysql://host/db"})
    with pytest.raises(ConfigError, match="lease_ttl_s"):
        load_settings({"model": "x", "queue": {"lease_ttl_s": 0}})
    with pytest.raises(ConfigError, match="max_pending_per_key"):
        load_settings({"model": "x", "tiers": {"default": {"max_pending_per_key": 0}}})


def test_database_defaults_beside_the_store_and_owners_outlive_keys(tmp_path):
    s = load_settings({"model": "x", "store": str(tmp_path / "store")})
    assert s.db_url == f"sqlite:///{tmp_path}/store/jobs.db"
    assert load_settings({"model": "x", "db": "sqlite:///rel/jobs.db"}).db.startswith("sqlite:////")  # absolute
    assert load_settings({"model": "x", "store": "s3://b/v"}).db_url.endswith("/.cache/sora-ray/videos/jobs.db")
    old, new, bare = hash_key("old"), hash_key("new"), hash_key("bare")
    s = load_settings(
        {
            "model": "x",
            "tiers": {"default": {}, "pro": {}},
            "api_keys": {
                old: {"tier": "pro", "owner": "alice"},
                new: {"tier": "pro", "owner": "alice"},
                bare: "default",
            },
        }
    )
    assert s.key_entry(old) == s.key_entry(new) == ("pro", "alice")  # a rotated key keeps the owner
    assert s.key_entry(bare) == ("default", bare[:16]) and s.key_entry(hash_key("nope")) is None


def test_user_config_changes_only_runtime_settings():
    s = settings()
    changed = apply_user_config(s, {"limits": {"max_steps": 7}, "queue": {"max_pending_jobs": 3}}, RUNTIME_KEYS)
    assert changed.limits.max_steps == 7 and changed.queue.max_pending_jobs == 3 and changed.model == s.model
    assert s.limits.max_steps == 100  # the base is untouched, so a later reconfigure starts from it
    with pytest.raises(ConfigError, match="cannot change on a live replica"):
        apply_user_config(s, {"model": "other"}, RUNTIME_KEYS)


def test_hash_key_is_sha256():
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_local_serve_yaml_validates_with_ray_schema():
    from ray.serve.schema import ServeDeploySchema

    from pipelines.serve.commands import read_serve_config
    from pipelines.serve.config import GENERATOR_NAME, INGRESS_NAME

    path = ROOT / "cluster" / "serve" / "local.yaml"
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    app = schema.applications[0]
    assert app.import_path == "pipelines.serve.app:app_builder"
    assert {d.name for d in app.deployments} == {INGRESS_NAME, GENERATOR_NAME}
    args, deployments, http = read_serve_config(str(path))
    s = load_settings(args)  # the args are ServeSettings
    apply_user_config(s, deployments[INGRESS_NAME]["user_config"], RUNTIME_KEYS)
    apply_user_config(s, deployments[GENERATOR_NAME]["user_config"], ("batching",))
    gen = deployments[GENERATOR_NAME]
    assert gen["autoscaling_config"]["max_replicas"] >= gen["autoscaling_config"]["min_replicas"] >= 1
    assert gen["max_ongoing_requests"] >= gen["user_config"]["batching"]["max_batch_size"]
    assert http["port"] == 8000


def test_serve_cli_refuses_a_bad_database_in_one_line(tmp_path, capsys):
    from pipelines.cli import main

    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    assert main(["serve", "--model", str(export), "--db", "mysql://host/db"]) == 2
    assert "db must be an SQLAlchemy URL" in capsys.readouterr().err
    assert main(["serve", "--model", str(export), "--db", "postgresql://sora:secret@127.0.0.1:1/sora"]) == 2
    err = capsys.readouterr().err
    assert "cannot be used" in err and "secret" not in err and "***" in err and len(err.strip().splitlines()) == 1


# -- LoRA adapters and step caching per request ----------------------------------------------------

ADAPTER_CARD = ModelCard(
    num_frames=8,
    height=32,
    width=32,
    fps=8,
    steps=30,
    guidance_scale=4.0,
    sampler="euler",
    samplers=("euler",),
    spatial_multiple=4,
    frame_multiple=1,
    loras=("style", "anime"),
    lora_errors={"broken": "LoRA '/x/b.safetensors': key 'k' has shape (4, 8); blocks.0.attn.qkv expects (4, 32)"},
    step_caches=("teacache", "fbcache"),
    cache_thresholds={"teacache": 0.3, "fbcache": 0.1},
)


def resolve_card(fields: dict, card: ModelCard = ADAPTER_CARD) -> api.GenerationParams:
    return api.resolve(api.parse_create(fields), card, settings(), Tier(), random_seed=1)


def rejects_card(fields: dict, param: str, *words: str, card: ModelCard = ADAPTER_CARD) -> None:
    with pytest.raises(ApiError) as info:
        resolve_card(fields, card)
    assert info.value.status == 400 and info.value.param == param, info.value.message
    for w in words:
        assert w in info.value.message, info.value.message
    assert "\n" not in info.value.message


def test_lora_is_a_configured_name_or_a_400_naming_the_allowed_ones():
    assert resolve_card({"prompt": "x", "lora": "anime"}).lora == "anime"
    assert resolve_card({"prompt": "x"}).lora is None and resolve_card({"prompt": "x", "lora": ""}).lora is None
    rejects_card({"prompt": "x", "lora": "nope"}, "lora", "style, anime", "'nope'")
    rejects_card({"prompt": "x", "lora": "broken"}, "lora", "cannot be used", "expects (4, 32)")
    rejects_card({"prompt": "x", "lora": "style"}, "lora", "no loras", card=CARD)
    rejects_card({"prompt": "x", "lora": "s" * 65}, "lora", "too long")


def test_step_cache_and_threshold_are_checked_and_defaulted():
    p = resolve_card({"prompt": "x", "step_cache": "TeaCache"})
    assert (p.step_cache, p.cache_threshold) == ("teacache", 0.3)
    p = resolve_card({"prompt": "x", "step_cache": "fbcache", "cache_threshold": "0.05"})  # a form: strings
    assert (p.step_cache, p.cache_threshold) == ("fbcache", 0.05)
    assert resolve_card({"prompt": "x", "step_cache": "none"}).step_cache is None
    assert resolve_card({"prompt": "x", "step_cache": "fbcache", "cache_threshold": 0}).cache_threshold == 0.0
    rejects_card({"prompt": "x", "step_cache": "magcache"}, "step_cache", "none, teacache, fbcache", "'magcache'")
    rejects_card({"prompt": "x", "cache_threshold": 0.1}, "cache_threshold", "needs a 'step_cache'")
    rejects_card({"prompt": "x", "step_cache": "teacache", "cache_threshold": -1}, "cache_threshold", ">= 0")
    rejects_card({"prompt": "x", "step_cache": "teacache", "cache_threshold": "inf"}, "cache_threshold", "finite")
    rejects_card(
        {"prompt": "x", "step_cache": "teacache"}, "step_cache", "must be one of none for this model", card=CARD
    )
    with pytest.raises(ApiError) as info:
        api.parse_create({"prompt": "x", "cache_threshold": "0.1"}, strict=True)  # JSON: a string is no number
    assert info.value.param == "cache_threshold"


def test_adapter_and_step_cache_split_batches_and_cache_keys():
    base = resolve_card({"prompt": "x", "seed": 1})
    others = [
        resolve_card({"prompt": "x", "seed": 1, **extra})
        for extra in (
            {"lora": "style"},
            {"lora": "anime"},
            {"step_cache": "teacache"},
            {"step_cache": "fbcache"},
            {"step_cache": "fbcache", "cache_threshold": 0.2},
        )
    ]
    assert len({base.shape_key, *(p.shape_key for p in others)}) == 1 + len(others)
    ident = {"weights": "a" * 64, "lora": None, "precision": "fp32", "adapters": {"style": "1" * 64, "anime": "2" * 64}}
    keys = {api.result_cache_key(p, "alice", ident) for p in [base, *others]}
    assert len(keys) == 1 + len(others)
    style = others[0]
    replaced = {**ident, "adapters": {**ident["adapters"], "style": "3" * 64}}  # the file under the name changed
    assert api.result_cache_key(style, "alice", replaced) != api.result_cache_key(style, "alice", ident)
    # ... which leaves the keys of requests not naming that adapter as they were
    assert api.result_cache_key(base, "alice", replaced) == api.result_cache_key(base, "alice", ident)
    assert api.result_cache_key(others[1], "alice", replaced) == api.result_cache_key(others[1], "alice", ident)
    job = api.new_job(style)
    assert (job["lora"], job["step_cache"]) == ("style", None) and api.video_object({**job})["lora"] == "style"


def test_loras_config_is_checked_at_startup(tmp_path):
    (tmp_path / "style.safetensors").write_bytes(b"")
    s = load_settings(
        {"model": str(tmp_path), "loras": {"style": str(tmp_path / "style.safetensors")}, "lora_cache_bytes": 1000}
    )
    assert s.loras == {"style": str(tmp_path / "style.safetensors")} and s.lora_cache_bytes == 1000
    for args, words in (
        ({"loras": {"style": str(tmp_path / "missing.safetensors")}}, "loras.style: '"),
        ({"loras": {"bad name": str(tmp_path / "style.safetensors")}}, "loras: name 'bad name'"),
        ({"loras": {"s3": "s3://bucket/style.safetensors"}}, "is a URI"),
        ({"lora_cache_bytes": 0}, "lora_cache_bytes must be >= 1"),
    ):
        with pytest.raises(ConfigError) as info:
            load_settings({"model": str(tmp_path), **args})
        assert words in str(info.value) and "\n" not in str(info.value)


# -- reference images (image-to-video) --------------------------------------------------------------

I2V_CARD = ModelCard(**{**CARD.__dict__, "image_inputs": (1,)})
FLF2V_CARD = ModelCard(**{**CARD.__dict__, "image_inputs": (2,)})


def png(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (24, 16)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_what_each_model_takes_and_the_400s_naming_the_field():
    import hashlib

    first, last = png(), png((0, 0, 255))
    p = resolve_card({"prompt": "x", "input_reference": first}, I2V_CARD)
    assert p.image == hashlib.sha256(first).hexdigest() and p.last_image is None
    p = resolve_card({"prompt": "x", "input_reference": first, "last_frame_reference": last}, FLF2V_CARD)
    assert (p.image, p.last_image) == (hashlib.sha256(first).hexdigest(), hashlib.sha256(last).hexdigest())
    assert resolve_card({"prompt": "x"}, CARD).image is None
    rejects_card({"prompt": "x", "input_reference": first}, "input_reference", "text only", card=CARD)
    rejects_card(
        {"prompt": "x", "last_frame_reference": last}, "last_frame_reference", "needs 'input_reference'", card=CARD
    )
    rejects_card(
        {"prompt": "x", "last_frame_reference": last},
        "last_frame_reference",
        "needs 'input_reference'",
        card=FLF2V_CARD,
    )
    rejects_card({"prompt": "x"}, "input_reference", "image-to-video", card=I2V_CARD)
    rejects_card(
        {"prompt": "x", "input_reference": first, "last_frame_reference": last},
        "last_frame_reference",
        "first-last-frame",
        card=I2V_CARD,
    )
    rejects_card(
        {"prompt": "x", "input_reference": first},
        "last_frame_reference",
        "send 'last_frame_reference'",
        card=FLF2V_CARD,
    )


def test_reference_forms_data_urls_and_byte_limit():
    import base64

    from pipelines.serve.requests import MAX_IMAGE_BYTES

    first = png()
    url = "data:image/png;base64," + base64.b64encode(first).decode()
    assert api.resolve_references(
        api.parse_create({"prompt": "x", "input_reference": {"image_url": url}}, strict=True), I2V_CARD
    ) == {"input_reference": first}
    assert api.resolve_references(api.parse_create({"prompt": "x", "input_reference": url}, strict=True), I2V_CARD) == {
        "input_reference": first
    }
    rejects_card(
        {"prompt": "x", "input_reference": {"image_url": "https://example.com/a.png"}},
        "input_reference",
        "remote URL",
        card=I2V_CARD,
    )
    rejects_card({"prompt": "x", "input_reference": {"file_id": "file_1"}}, "input_reference", "file_id", card=I2V_CARD)
    rejects_card(
        {"prompt": "x", "input_reference": "data:image/png;base64,@@@"}, "input_reference", "base64", card=I2V_CARD
    )
    rejects_card({"prompt": "x", "input_reference": 5}, "input_reference", "file part", card=I2V_CARD)
    rejects_card({"prompt": "x", "input_reference": b""}, "input_reference", "empty", card=I2V_CARD)
    big = b"\x89PNG" + bytes(MAX_IMAGE_BYTES)
    rejects_card(
        {"prompt": "x", "input_reference": big}, "input_reference", str(len(big)), str(MAX_IMAGE_BYTES), card=I2V_CARD
    )
    huge_url = "data:image/png;base64," + "A" * (MAX_IMAGE_BYTES * 2)
    rejects_card({"prompt": "x", "input_reference": huge_url}, "input_reference", str(MAX_IMAGE_BYTES), card=I2V_CARD)


def test_images_split_batches_and_cache_keys():
    a, b = png(), png((0, 200, 0))
    base = resolve_card({"prompt": "x", "seed": 1, "input_reference": a}, I2V_CARD)
    same = resolve_card({"prompt": "y", "seed": 2, "input_reference": a}, I2V_CARD)
    other = resolve_card({"prompt": "x", "seed": 1, "input_reference": b}, I2V_CARD)
    assert base.shape_key == same.shape_key and base.shape_key != other.shape_key
    assert base.cache_key() != other.cache_key()
    ident = {"weights": "w", "lora": None, "precision": "fp32", "adapters": {}}
    assert api.result_cache_key(base, "", ident) != api.result_cache_key(other, "", ident)
    last = resolve_card({"prompt": "x", "seed": 1, "input_reference": a, "last_frame_reference": b}, FLF2V_CARD)
    flipped = resolve_card({"prompt": "x", "seed": 1, "input_reference": b, "last_frame_reference": a}, FLF2V_CARD)
    assert last.shape_key != flipped.shape_key and last.cache_key() != flipped.cache_key()


def test_multipart_reference_parts_and_the_sdks_reference_object():
    req = httpx.Request(
        "POST",
        "http://x/v1/videos",
        data={"prompt": "p"},
        files={"input_reference": ("a.png", b"A", "image/png"), "last_frame_reference": ("b.png", b"B", "image/png")},
    )
    assert api.parse_multipart(req.read(), req.headers["content-type"]) == {
        "prompt": "p",
        "input_reference": b"A",
        "last_frame_reference": b"B",
    }
    # `videos.create(input_reference={"image_url": ...})` sends the object flattened into a form field.
    req = httpx.Request(
        "POST",
        "http://x/v1/videos",
        data={"prompt": "p", "input_reference[image_url]": "data:image/png;base64,QQ=="},
        files={"unused": ("u", b"", "text/plain")},
    )
    fields = api.parse_multipart(req.read(), req.headers["content-type"])
    assert fields["input_reference"] == {"image_url": "data:image/png;base64,QQ=="}
