"""Image-to-video through the Serve app on a local Ray: a tiny Wan2.1 I2V export (a WanImageToVideoPipeline folder
written here and converted by `sora convert --from-diffusers`). The official SDK sends `input_reference` as a file
part; a second request with another image goes as JSON with a base64 data: URL at the same moment (the two may share
a dynamic batch; the generator splits batches by image). Each served clip equals the clip sampled here, directly, with
the same seed and image (the lossless PNG thumbnail within 2 levels, the MP4 by its mean); the two images give two
different clips. Bad images and fields the export cannot use are 400s naming the field, answered before any job
exists."""

from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import make_tiny_i2v_export, wait_done
from serve_services import frames_of, serve_app, thumbnail_of

pytestmark = pytest.mark.slow
pytest.importorskip("diffusers")

PORT = 8331
BASE = f"http://127.0.0.1:{PORT}"
PROMPT = "a red circle rolls to the right"
SAMPLING = {"num_frames": 9, "steps": 3, "guidance_scale": 5.0}
SIZE = (48, 32)  # width, height: the export's defaults (81 x 480 x 832) are far too big for a CPU test
GENERATOR = {
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
    "ray_actor_options": {"num_cpus": 1},
    "user_config": {"batching": {"max_batch_size": 4, "batch_wait_timeout_s": 1.0}},
}


def png_of(seed: int, size: tuple[int, int]) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from pipelines.serve.config import load_settings

    export = make_tiny_i2v_export(tmp_path_factory.mktemp("i2v"))
    store = tmp_path_factory.mktemp("store")
    settings = load_settings({"model": str(export), "store": str(store), "queue": {"poll_after_ms": 100}})
    with serve_app(settings, PORT, GENERATOR):
        yield {"export": export, "store": store, "tmp": tmp_path_factory.mktemp("clips")}


@pytest.fixture(scope="module")
def http(service):
    with httpx.Client(base_url=BASE, timeout=120, follow_redirects=True) as client:
        yield client


def direct_clip(export: Path, image: bytes, seed: int) -> np.ndarray:
    """The clip sampled here from the export, with the same request: (T, H, W, 3) uint8."""
    from PIL import Image

    from sora_model.pipeline import TextToVideoPipeline

    pipe = TextToVideoPipeline.load(str(export))
    return pipe(PROMPT, height=SIZE[1], width=SIZE[0], seed=seed, image=Image.open(io.BytesIO(image)), **SAMPLING)[0]


def test_sdk_flow_with_input_reference_equals_direct_sampling(service, http):
    from openai import OpenAI

    sdk = OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=120)
    images = {"sdk": png_of(1, (28, 40)), "json": png_of(2, (64, 24))}  # other sizes and aspects than the clip's
    data_url = "data:image/png;base64," + base64.b64encode(images["json"]).decode()
    ids: dict[str, str] = {}

    def by_json() -> None:
        body = {
            "prompt": PROMPT,
            "size": f"{SIZE[0]}x{SIZE[1]}",
            "seed": 5,
            "input_reference": {"image_url": data_url},
            **SAMPLING,
        }
        r = httpx.post(f"{BASE}/v1/videos", json=body, timeout=60)
        assert r.status_code == 200, r.text
        ids["json"] = r.json()["id"]

    other = threading.Thread(target=by_json)
    other.start()  # sent with the SDK's request: one batch (batch_wait_timeout_s 1) unless the first is claimed alone
    video = sdk.videos.create(
        prompt=PROMPT,
        size=f"{SIZE[0]}x{SIZE[1]}",
        input_reference=("first.png", images["sdk"], "image/png"),
        extra_body={**SAMPLING, "seed": 5},
    )
    other.join()
    ids["sdk"] = video.id
    video = sdk.videos.poll(video.id, poll_interval_ms=100)
    assert video.status == "completed" and video.error is None, video
    assert wait_done(http, ids["json"])["status"] == "completed"
    served = {}
    for name, job_id in ids.items():
        clip = direct_clip(service["export"], images[name], 5)
        thumb = thumbnail_of(sdk.videos.download_content(job_id, variant="thumbnail").content)
        assert np.abs(thumb - clip[0].astype(np.int16)).max() <= 2, name  # the lossless first frame
        served[name] = frames_of(sdk.videos.download_content(job_id).content, service["tmp"] / f"{name}.mp4")
        expected = frames_of(encoded_mp4(clip, service["tmp"] / name), service["tmp"] / f"{name}-direct.mp4")
        assert served[name].shape == (9, SIZE[1], SIZE[0], 3)
        assert np.abs(served[name] - expected).mean() <= 0.5, name  # H.264 may move a block by several levels
    assert np.abs(served["sdk"] - served["json"]).mean() > 5  # each request got its own image
    # The same request again is a result-cache hit (the key holds the image's digest): completed at once.
    again = httpx.post(
        f"{BASE}/v1/videos",
        json={"prompt": PROMPT, "size": f"{SIZE[0]}x{SIZE[1]}", "seed": 5, "input_reference": data_url, **SAMPLING},
        timeout=60,
    ).json()
    assert again["status"] == "completed" and again["id"] != ids["json"], again
    # Done with them: the reference images leave the store (right after each completion); the clips stay.
    deadline = time.monotonic() + 10
    while list((service["store"] / "inputs").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list((service["store"] / "inputs").iterdir())


def encoded_mp4(clip: np.ndarray, folder: Path) -> bytes:
    from pipelines.serve.finish import encode_clip

    folder.mkdir()
    mp4, _ = encode_clip(clip, 16, str(folder))
    return Path(mp4).read_bytes()


def test_bad_images_and_unusable_fields_are_400s_before_any_job(service, http):
    import openai

    sdk = openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=60)
    before = http.get("/v1/videos", params={"limit": 100}).json()["data"]
    good = png_of(3, (32, 32))
    cases = [
        ({}, "input_reference", "image-to-video"),
        (
            {"input_reference": ("a.png", good[: len(good) // 2], "image/png")},
            "input_reference",
            "truncated or corrupt",
        ),
        (
            {"input_reference": ("a.gif", b"GIF89a" + bytes(40), "image/gif")},
            "input_reference",
            "not a PNG, JPEG or WebP",
        ),
        (
            {"input_reference": ("a.png", good, "image/png"), "last_frame_reference": ("b.png", good, "image/png")},
            "last_frame_reference",
            "first-last-frame",
        ),
        ({"last_frame_reference": ("b.png", good, "image/png")}, "last_frame_reference", "needs 'input_reference'"),
    ]
    form = {"prompt": PROMPT, "size": f"{SIZE[0]}x{SIZE[1]}", **SAMPLING}
    for files, param, words in cases:
        r = http.post("/v1/videos", data=form, files=files) if files else http.post("/v1/videos", json=form)
        assert r.status_code == 400, (param, r.text)
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], err
    with pytest.raises(openai.BadRequestError) as info:  # a decompression bomb through the SDK: a 400 naming the field
        sdk.videos.create(
            prompt=PROMPT,
            size=f"{SIZE[0]}x{SIZE[1]}",
            input_reference=("bomb.png", bomb_png(), "image/png"),
            extra_body=SAMPLING,
        )
    assert info.value.body["param"] == "input_reference" and "pixels" in info.value.body["message"]
    assert http.get("/v1/videos", params={"limit": 100}).json()["data"] == before


def bomb_png() -> bytes:
    """PNG bytes whose header declares 60000 x 60000 pixels (3.6 gigapixels) over a few bytes of data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(1024))) + chunk(b"IEND", b"")
    )
