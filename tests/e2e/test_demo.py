"""The main job end to end: `sora demo` on the smoke recipe, then a second run that reuses every step; Ctrl-C in
the middle of training, then a run that resumes it. The terminal shows our lines only; libraries print to the log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
MAX_LINES = 100
"""The whole run, written to a file (no TTY), stays under this many lines."""
LIBRARY_NOISE = (
    "INFO",
    "WARNING",
    "logging_progress",
    "(RayTrainWorker",
    "pid=",
    "DeprecationWarning",
    "deepspeed",
    "Failed to query",
)


def demo_command(out: Path, *extra: str) -> tuple[list[str], dict[str, str]]:
    cmd = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "demo",
        "--out",
        str(out),
        "--recipe",
        str(ROOT / "cluster/recipes/smoke-cpu.yaml"),
        "--videos-per-combination",
        "1",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return cmd, env


def run_demo(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd, env = demo_command(out, *extra)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)


def assert_reads_cleanly(proc: subprocess.CompletedProcess, out: Path) -> None:
    """Our lines only, under MAX_LINES together; the log holds what the libraries printed."""
    terminal = (proc.stdout + proc.stderr).splitlines()
    print(f"terminal: {len(proc.stdout.splitlines())} stdout + {len(proc.stderr.splitlines())} stderr lines")
    assert len(terminal) < MAX_LINES, f"{len(terminal)} lines:\n" + "\n".join(terminal)
    noisy = [ln for ln in terminal if any(n in ln for n in LIBRARY_NOISE)]
    assert not noisy, noisy
    log = out / "logs" / "demo.log"
    assert proc.stdout.splitlines()[0].endswith(str(log)) and log.stat().st_size > 0


def test_demo_runs_end_to_end_and_reuses_its_steps(tmp_path):
    out = tmp_path / "demo"
    first = run_demo(out, "--port", str(free_port()))
    assert first.returncode == 0, first.stderr[-3000:]
    assert_reads_cleanly(first, out)
    report = out / "report"
    assert f"7/7 report: {report / 'report.html'}" in first.stdout
    for name in (
        "report.md",
        "report.html",
        "samples.gif",
        "samples.png",
        "samples.mp4",
        "loss.png",
        "metrics.json",
        "served.mp4",
    ):
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
    assert_reads_cleanly(second, out)
    from tests.e2e.test_report_html import CHROMIUM, check_images_load

    if CHROMIUM:
        check_images_load(report / "report.html", expect=3)


def test_ctrl_c_in_training_stops_with_one_line_and_the_next_run_resumes_it(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) once training has checkpointed."""
    out = tmp_path / "demo"
    cmd, env = demo_command(out, "--no-serve")
    ckpts = out / "run" / "ray_results" / "smoke-cpu"
    with open(tmp_path / "first.out", "w") as stdout, open(tmp_path / "first.err", "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
        deadline = time.time() + 1200
        snapshot = ckpts / "checkpoint_manager_snapshot.json"  # Ray Train lists a checkpoint once registered
        while (
            time.time() < deadline
            and proc.poll() is None
            and "checkpoint_" not in (snapshot.read_text() if snapshot.is_file() else "")
        ):
            time.sleep(1)
        assert proc.poll() is None, (tmp_path / "first.err").read_text()[-3000:]
        assert snapshot.is_file(), "training never checkpointed"
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=300)
    err = (tmp_path / "first.err").read_text()
    assert code == 130, err
    assert not (out / ".steps" / "train.json").exists()  # interrupted, not finished
    last = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln and "step/s" not in ln]
    assert (
        last[-1] == f"sora demo: interrupted; log: {out / 'logs' / 'demo.log'}; run the same command again to resume"
    ), err
    assert sum("interrupted" in ln for ln in err.splitlines()) == 1
    # The same command again: synth and prepare reused, training resumed from its checkpoint, the demo finishes.
    second = run_demo(out, "--no-serve")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "2/7 prepared data: reusing" in second.stdout
    assert "(resuming)" in second.stdout
    assert "resumed at step" in second.stderr, second.stderr  # rank 0's own line, forwarded to the terminal
    runs = [json.loads(ln) for ln in (out / "run" / "run.json").read_text().splitlines()]
    assert [r["resume"] for r in runs] == [False, True]
    assert (out / "report" / "report.html").is_file()


@pytest.mark.parametrize(
    "args,message",
    [(["--minutes", "2"], "--minutes must be at least"), (["--seed", "-1"], "--seed must be in [0, 2**32)")],
)
def test_demo_bad_input_is_one_line(args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "demo", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr
