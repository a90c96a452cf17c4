"""report.html renders in headless Chromium (Debian's `chromium`) and every image on it loads."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def render_dom(page: Path) -> str:
    """The DOM after load (Chromium's virtual time lets the page's image check finish before the dump)."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (`make test` installs Debian's chromium with apt when run as root)")
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--allow-file-access-from-files",
        "--virtual-time-budget=10000",
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def check_images_load(page: Path, expect: int) -> None:
    dom = render_dom(page)
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    assert 'data-images="loaded"' in body.group(0), body.group(0)
    count = re.search(r'data-image-count="(\d+)"', body.group(0))
    assert count and int(count.group(1)) >= expect, body.group(0)


def fake_summary(out: Path) -> dict:
    from pipelines.data.synth import SynthSpec, make_video
    from pipelines.demo_report import showcase

    report = out / "report"
    report.mkdir(parents=True)
    spec = SynthSpec(size=16, frames=8)
    combos = [("red", "circle", "left"), ("blue", "square", "up"), ("green", "triangle", "down")]
    clips = np.stack([make_video(spec, i, c) for i, c in enumerate(combos)])
    prompts = ["a red circle moving left", "a blue square moving up", "a yellow triangle moving right"]
    samples = showcase(clips, prompts, [False, False, True], report)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.plot([1.0, 0.5, 0.3])
    plt.savefig(report / "loss.png")
    plt.close()
    acc = {"color": 1.0, "shape": 0.5, "direction": 0.5, "all": 0.5, "n": 4}
    return {
        "command": "sora demo",
        "seconds": 60.0,
        "samples": samples,
        "export": str(out / "run" / "export"),
        "log": "demo.log",
        "synth": {"videos": 3, "frames": 8, "held_out": ["yellow triangle right"]},
        "prepare": {"8x16x16": 3},
        "train": {
            "steps": 3,
            "stages": ["clips (8x16², 3 steps)"],
            "seconds": 30.0,
            "first_loss": 1.0,
            "final_loss": 0.3,
        },
        "recipe": "smoke-cpu.yaml",
        "eval": {
            "attribute_accuracy": {"seen": acc, "held_out": acc, "overall": acc},
            "temporal_consistency": 0.9,
            "diversity": 0.1,
            "num_clips": 8,
        },
    }


def test_report_html_shows_the_samples_the_loss_curve_and_the_table(tmp_path):
    from pipelines.demo_report import write_html, write_report

    summary = fake_summary(tmp_path)
    page = write_html(tmp_path, summary)
    write_report(tmp_path, summary)
    text = page.read_text()
    for src in ("samples.gif", "samples.png", "loss.png"):
        assert f'src="{src}"' in text or f"src='{src}'" in text, src
    assert "held-out combinations" in text and "<table>" in text
    assert (tmp_path / "report" / "report.md").is_file()
    assert summary["samples"]["rows"][2] == {
        "prompt": "a yellow triangle moving right",
        "held_out": True,
        "judged": {"color": "green", "shape": "triangle", "direction": "down"},
        "right": False,
    }
    check_images_load(page, expect=3)


def test_a_missing_image_is_caught(tmp_path):
    from pipelines.demo_report import write_html

    summary = fake_summary(tmp_path)
    page = write_html(tmp_path, summary)
    (tmp_path / "report" / "samples.gif").unlink()
    dom = render_dom(page)
    assert 'data-images="broken: samples.gif"' in dom


def test_showcase_labels_with_the_verdicts_the_evaluation_recorded(tmp_path):
    """The demo passes eval's own verdicts: the sheet says what eval judged, without judging the clips again."""
    from pipelines.data.synth import SynthSpec, make_video
    from pipelines.demo_report import showcase

    clips = np.stack([make_video(SynthSpec(size=16, frames=8), 0, ("red", "circle", "left"))])
    recorded = [{"color": "red", "shape": "square", "direction": "left"}]  # not what the clip shows: proves it is used
    samples = showcase(clips, ["a red circle moving left"], [False], tmp_path, judged=recorded)
    assert samples["rows"] == [
        {"prompt": "a red circle moving left", "held_out": False, "judged": recorded[0], "right": False}
    ]
    assert (tmp_path / "samples.txt").read_text() == "0: a red circle moving left (judged: red square left)\n"
