"""pipelines/console.py: library output goes to the log, our lines to the terminal; a failure names the log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import logging, sys, warnings
from pipelines import cli, console
from pipelines.cli import UserError

def noisy(args):
    console.start(args.log, command="sora noisy")
    print("library stdout line")
    print("library stderr line", file=sys.stderr)
    logging.getLogger("ray").warning("a Ray warning")
    warnings.warn("a deprecation", DeprecationWarning)
    import os; os.write(2, b"C++ core line\n")
    console.say("[sora noisy] step 1/1")
    with console.progress(total=3, desc="work") as bar:
        bar.update(3)
    if args.fail:
        raise RuntimeError("boom in the middle")
    return 0

p = cli.build_parser()
sub = p._subparsers._group_actions[0]
n = sub.add_parser("noisy")
n.add_argument("--log")
n.add_argument("--fail", action="store_true")
n.set_defaults(func=noisy)
cli.build_parser = lambda: p
sys.exit(cli.main(sys.argv[1:]))
"""


def run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    log = tmp_path / "logs" / "noisy.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "always"}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, "noisy", "--log", str(log), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_library_output_goes_to_the_log_and_ours_to_the_terminal(tmp_path):
    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    terminal = proc.stdout + proc.stderr
    for noise in ("library stdout line", "library stderr line", "a Ray warning", "a deprecation", "C++ core line"):
        assert noise not in terminal, noise
    log = (tmp_path / "logs" / "noisy.log").read_text()
    for noise in ("library stdout line", "library stderr line", "a Ray warning", "a deprecation", "C++ core line"):
        assert noise in log, noise
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("sora noisy: library logs") and str(tmp_path / "logs" / "noisy.log") in lines[0]
    assert "[sora noisy] step 1/1" in lines
    assert "work: 100%" in proc.stderr and "\r" not in proc.stderr  # off a TTY: whole lines, no redraws


def test_a_failure_names_the_log_and_shows_its_last_lines(tmp_path):
    proc = run(tmp_path, "--fail")
    assert proc.returncode == 1
    err = proc.stderr.splitlines()
    assert err[-1 - sum(1 for ln in err if ln.startswith("    "))].startswith(
        f"  log: {tmp_path / 'logs' / 'noisy.log'}"
    )
    assert any("RuntimeError: boom in the middle" in ln for ln in err if ln.startswith("    "))  # the traceback's end
    assert "sora noisy: failed: RuntimeError: boom in the middle" in proc.stderr


def test_remote_progress_lines_become_one_bar(capsys):
    from pipelines import console

    bar = console.RemoteProgress(total=4, initial=1, desc="train")
    bar.set_description("images (1/2)")
    for _ in range(3):
        bar.update()
    bar.close()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(console.REMOTE_MARK)]
    states = [json.loads(ln[len(console.REMOTE_MARK) :]) for ln in lines]
    assert states[0]["n"] == 1 and states[-1]["n"] == 4 and states[-1]["closed"]
    assert states[-1]["desc"] == "images (1/2)"
    assert len(states) <= 5  # throttled: a start, the description, the last step, the close


def test_ctrl_c_under_a_library_handler_still_ends_in_keyboard_interrupt():
    """Ray Train's fit() installs its own SIGINT handler (a graceful abort) and returns; the block raises anyway."""
    import signal
    import time

    import pytest

    from pipelines import console

    calls = []
    before = signal.getsignal(signal.SIGINT)

    def fit() -> str:
        signal.signal(signal.SIGINT, lambda s, f: calls.append(s))  # the library's handler, left installed
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        return "aborted gracefully"

    with pytest.raises(KeyboardInterrupt):
        with console.interruptible():
            fit()
    assert calls == [signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is before and signal.signal.__module__ == "signal"
    with console.interruptible():  # no Ctrl-C: nothing raised
        pass
