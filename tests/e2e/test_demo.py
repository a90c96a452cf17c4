"""The main job end to end: `sora demo` on the smoke recipe, then a second run that reuses every step."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipelines.cli", "demo", "--out", str(out), "--recipe", str(ROOT / "cluster/recipes/smoke-cpu.yaml"),
           "--videos-per-combination", "1", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)


def test_demo_runs_end_to_end_and_reuses_its_steps(tmp_path):
    out = tmp_path / "demo"
    first = run_demo(out, "--port", str(free_port()))
    assert first.returncode == 0, first.stderr[-3000:]
    report = out / "report"
    for name in ("report.md", "samples.gif", "samples.png", "samples.mp4", "loss.png", "metrics.json", "served.mp4"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    assert (out / "run" / "export" / "model.safetensors").is_file()
    metrics = json.loads((report / "metrics.json").read_text())
    acc = metrics["attribute_accuracy"]
    assert acc["seen"]["n"] > 0 and acc["held_out"]["n"] > 0
    text = (report / "report.md").read_text()
    assert "held-out combinations" in text and "completed" in text
    assert (report / "served.mp4").read_bytes()[4:8] == b"ftyp"
    # Everything the first run did is reused: no synthesis, preparation or training the second time.
    second = run_demo(out, "--no-serve")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "1/7 synthetic videos: reusing" in second.stdout
    assert "2/7 prepared data: reusing" in second.stdout
    assert "3/7 trained model: reusing" in second.stdout


def test_demo_bad_input_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "demo", "--minutes", "2"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--minutes must be at least" in proc.stderr
