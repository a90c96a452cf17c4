"""What a person sees: our own lines and progress bars on the terminal; what libraries print goes to a log file.

Ray, Ray Data, Ray Train, Ray Serve, DeepSpeed, torch and transformers each print from their own loggers,
C++ cores, worker processes (forwarded to the driver by Ray's `log_to_driver`) and tqdm bars. Chasing each
one leaves gaps, so a command that calls `start()` moves the process's file descriptors 1 and 2 onto the
log file: everything written by anything in this process, or by a process it starts (Ray's raylet and
workers included), lands there. Our own lines are written to copies of the terminal's descriptors
taken before the move. `--verbose` keeps the terminal as it was (the libraries print there as before).

    from pipelines import console
    console.start("demo-output/logs/demo.log", verbose=args.verbose, command="sora demo")
    console.say("1/7 synthesising 76 videos")               # one line on the terminal, copied into the log
    with console.progress(total=400, desc="train") as bar:  # a tqdm bar on the terminal
        ...
    console.stop()                                           # cli.main does this, naming the log on failure

Training runs inside Ray Train workers: rank 0 reports its steps as `RemoteProgress` lines on its stdout,
which Ray forwards to the driver, where the handler `attach_ray()` installs turns them into a terminal bar
(and keeps them out of the log). Worker lines that start with `[sora ` are ours and reach the terminal too.

When no console is started (a library call, a test), `say` prints to stdout and `progress` is a plain
tqdm on stderr: behaviour outside the CLI is unchanged.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

REMOTE_MARK = "__sora_progress__ "
"""Prefix of the progress lines rank 0 prints; the driver's handler turns them into a bar."""
OUR_PREFIX = "[sora "
"""Worker lines with this prefix are ours (e.g. `[sora train] resumed at step 4`): shown on the terminal."""
NON_TTY_INTERVAL_S = 60.0
"""A bar written to a file or a pipe prints one line at most this often (a 15-minute run: ~15 lines)."""
REMOTE_INTERVAL_S = 0.5
"""Rank 0 reports progress at most this often (a GPU step can take 0.2 s; Ray forwards every line)."""
TAIL_LINES = 15
"""Lines of the log shown under a failure."""
SPAM = (
    # Ray Train V2's placement-group cleaner asks the State API (served by the dashboard, which a laptop run
    # leaves off) whether the controller lives, once a second, and warns each time it cannot: kept once.
    "Failed to query Ray Train Controller actor state",
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Console:
    """The terminal (copies of fd 1 and 2 from before the move) and the log file."""

    def __init__(self, log_path: Path, verbose: bool, command: str):
        import ray

        self.started_ray = not ray.is_initialized()  # only a Ray this command started is shut down at the end
        self.log_path = log_path
        self.verbose = verbose
        self.command = command
        self.lock = threading.Lock()
        sys.stdout.flush()
        sys.stderr.flush()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
        self.log.write(f"\n===== {command} {time.strftime('%Y-%m-%d %H:%M:%S')} (pid {os.getpid()}) =====\n")
        self.saved = (os.dup(1), os.dup(2))
        self.out: TextIO = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        self.err: TextIO = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
        self.tty = self.err.isatty()
        self.bars: dict[str, Any] = {}
        self.seen_spam: set[str] = set()
        self.detach_ray: Any = None
        self.said: list[tuple[float, str]] = []
        """Worker lines recently shown, with when."""
        if not verbose:
            os.dup2(self.log.fileno(), 1)
            os.dup2(self.log.fileno(), 2)

    def say(self, msg: str, err: bool = False) -> None:
        from tqdm import tqdm

        with self.lock, tqdm.external_write_mode(file=self.err):  # a bar being drawn steps aside for the line
            stream = self.err if err else self.out
            stream.write(msg + "\n")
            stream.flush()
            self.log.write(f"[console] {msg}\n")

    def said_recently(self, window_s: float = 10.0) -> set[str]:
        now = time.monotonic()
        self.said = [(t, s) for t, s in self.said if now - t < window_s]
        return {s for _, s in self.said}

    def restore(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for bar in list(self.bars.values()):
            bar.close()
        self.bars.clear()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        self.out.close()
        self.err.close()
        self.log.close()

    def tail(self, n: int = TAIL_LINES) -> list[str]:
        """The log's last `n` lines that are not ours, one line each, colour codes stripped."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                lines = [_ANSI.sub("", ln.rstrip()).replace("\r", " ") for ln in f]
        except OSError:
            return []
        lines = [ln for ln in lines if ln.strip() and not ln.startswith(("[console] ", "===== "))]
        return [ln if len(ln) <= 240 else ln[:237] + "..." for ln in lines[-n:]]


_active: Console | None = None


def start(log_path: str | os.PathLike, verbose: bool = False, command: str = "sora") -> Console:
    """Send what libraries print to `log_path` (appended) from now on, and name it on the terminal."""
    global _active
    if _active is not None:
        return _active
    _active = Console(Path(log_path).resolve(), verbose, command)
    if not verbose:
        # Nothing reads these bars in a file; Ray Data's non-TTY form logs a block of lines every few seconds.
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        try:
            import ray.data

            ray.data.DataContext.get_current().enable_progress_bars = False
        except ImportError:
            pass
    where = "library output shown here (--verbose)" if verbose else "library logs (--verbose shows them here)"
    _active.say(f"{command}: {where} → {_active.log_path}")
    return _active


def active() -> Console | None:
    return _active


def stop() -> None:
    """Put the terminal back. Ray is shut down first, still into the log: its exit prints otherwise reach the
    terminal."""
    global _active
    if _active is None:
        return
    con, _active = _active, None
    try:
        import ray

        if con.started_ray and ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - shutting down is best effort; the terminal must come back regardless
        pass
    if con.detach_ray is not None:  # a Ray that lives on (a test's, a notebook's) prints as before
        con.detach_ray()
    con.restore()


def library_bars() -> bool:
    """Whether libraries' own progress bars (Ray Data's) are wanted: not under a console, unless --verbose."""
    return _active is None or _active.verbose


def say(msg: str) -> None:
    """One line of ours: on the terminal (and in the log) under a console, else on stdout."""
    if _active is None:
        print(msg, flush=True)
    else:
        _active.say(msg)


def error(msg: str) -> None:
    """A line about a failure or an interrupt: any bar still drawn is closed first, so the line comes last."""
    if _active is None:
        print(msg, file=sys.stderr, flush=True)
        return
    for bar in list(_active.bars.values()):
        bar.close()
    _active.bars.clear()
    _active.say(msg, err=True)


def failure_lines(limit: int = TAIL_LINES) -> list[str]:
    """Where to look after a failure: the log's path and its last lines (nothing without a console)."""
    if _active is None:
        return []
    tail = _active.tail(limit)
    head = f"  log: {_active.log_path}" + (f"; its last {len(tail)} lines:" if tail else "")
    return [head, *(f"    {ln}" for ln in tail)]


def log_path() -> Path | None:
    return _active.log_path if _active is not None else None


def terminal() -> TextIO:
    """The stream progress bars draw on."""
    return _active.err if _active is not None else sys.stderr


def progress(**kwargs: Any) -> Any:
    """A tqdm bar on the terminal; written to a file or a pipe, one plain line at most every minute."""
    from tqdm import tqdm

    stream = terminal()
    if not stream.isatty():
        kwargs = {"mininterval": NON_TTY_INTERVAL_S, "file": _Lines(stream), "ncols": 100, **kwargs}
    else:
        kwargs = {"file": stream, "dynamic_ncols": True, **kwargs}
    return tqdm(**kwargs)


class _Lines:
    """tqdm's carriage-return redraws as whole lines, for logs that are read later."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.last = ""

    def write(self, s: str) -> None:
        text = s.replace("\r", "").strip()
        if text and text != self.last:
            self.last = text
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


_last_status = 0.0


def status(msg: str) -> None:
    """A progress note from a long loop: the terminal at most every 10 s (every minute off a TTY)."""
    global _last_status
    if _active is None:
        print(msg, file=sys.stderr, flush=True)
        return
    now = time.monotonic()
    if now - _last_status >= (10.0 if _active.tty else NON_TTY_INTERVAL_S):
        _last_status = now
        _active.say(msg, err=True)


# ---------------------------------------------------------------------------------------------
# Progress from Ray workers
# ---------------------------------------------------------------------------------------------


class RemoteProgress:
    """tqdm's interface for a Ray worker: prints state lines that the driver's console draws as one bar."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", name: str = "train"):
        self.name, self.total, self.n, self.desc, self.postfix = name, total, initial, desc, ""
        self.last = 0.0
        self._emit(force=True)

    def set_description(self, desc: str) -> None:
        self.desc = desc
        self._emit(force=True)

    def set_postfix(self, **kwargs: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        self._emit()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._emit(force=self.n >= self.total)

    def close(self) -> None:
        self._emit(force=True, closed=True)

    def _emit(self, force: bool = False, closed: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < REMOTE_INTERVAL_S:
            return
        self.last = now
        state = {
            "name": self.name,
            "n": self.n,
            "total": self.total,
            "desc": self.desc,
            "postfix": self.postfix,
            "closed": closed,
        }
        print(REMOTE_MARK + json.dumps(state), flush=True)


def _remote_update(con: Console, state: dict[str, Any]) -> None:
    bar = con.bars.get(state["name"])
    if bar is None:
        if state.get("closed"):
            return
        bar = con.bars[state["name"]] = progress(
            total=state["total"], initial=state["n"], desc=state["desc"], unit="step"
        )
    if state["desc"] and state["desc"] != bar.desc:
        bar.set_description(state["desc"], refresh=False)
    if state["postfix"]:
        bar.set_postfix_str(state["postfix"], refresh=False)
    bar.update(state["n"] - bar.n)
    if state.get("closed"):
        bar.close()
        del con.bars[state["name"]]


def attach_ray() -> None:
    """Route worker output that Ray forwards to this driver: our bars and lines to the terminal, the rest to
    Ray's own printer (the log), with the known once-a-second warnings kept once. Call after `ray.init`."""
    con = _active
    if con is None:
        return
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: its printer stays as it is, and the bar lines land in the log
        return
    names = [name for name, _ in dispatcher.handlers]
    if "sora_console" in names:
        return
    printers = [(name, h) for name, h in dispatcher.handlers if name == "ray_print_logs"]

    def handle(data: dict[str, Any]) -> None:
        kept = []
        for line in data.get("lines", []):
            if REMOTE_MARK in line:
                try:
                    _remote_update(con, json.loads(line.split(REMOTE_MARK, 1)[1]))
                except (ValueError, KeyError, TypeError):
                    pass
                continue
            spam = next((s for s in SPAM if s in line), None)
            if spam is not None:
                if spam in con.seen_spam:
                    continue
                con.seen_spam.add(spam)
                line += " (repeats once a second without a dashboard; later copies dropped by pipelines/console.py)"
            ours = line.strip()
            if not con.verbose and ours.startswith(OUR_PREFIX) and ours not in con.said_recently():
                # (Ray Train's workers can send a line twice: to their log file and to stderr.)
                con.said.append((time.monotonic(), ours))
                con.say(ours, err=True)
            kept.append(line)
        if kept:
            for _, printer in printers:
                printer({**data, "lines": kept})

    def detach() -> None:
        dispatcher.remove_handler("sora_console")
        for name, printer in printers:
            dispatcher.add_handler(name, printer)

    for name, _ in printers:
        dispatcher.remove_handler(name)
    dispatcher.add_handler("sora_console", handle)
    con.detach_ray = detach
    del ray_worker  # imported only to be sure the printer had been registered by ray.init


# ---------------------------------------------------------------------------------------------
# The flags every long-running command takes
# ---------------------------------------------------------------------------------------------

LOG_DIR = "sora-logs"


def add_arguments(p: Any, where: str | None = None) -> None:
    """`--verbose` and `--log` for a sub-command; `where` says where its log goes by default."""
    p.add_argument(
        "--verbose", action="store_true", help="show what Ray, DeepSpeed and torch print here instead of in the log"
    )
    p.add_argument("--log", metavar="FILE", help=f"the log file (default: {where or default_log_help()})")


def default_log_help() -> str:
    return f"{LOG_DIR}/COMMAND-DATE-TIME.log under the system's temp folder"


def default_log(command: str) -> Path:
    """A fresh log for a command that has no output folder of its own to hold one."""
    import tempfile

    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir()) / LOG_DIR / f"{command}-{stamp}-{os.getpid()}.log"


def start_for(args: Any, command: str, default: str | os.PathLike | None = None) -> Console:
    """`start()` from a sub-command's parsed `--verbose` / `--log`."""
    path = args.log or default or default_log(command.replace("sora ", "").replace(" ", "-"))
    return start(path, verbose=args.verbose, command=command)


class interruptible:
    """Ctrl-C inside this block ends in KeyboardInterrupt, also where a library handles SIGINT itself.

    Ray Train's `fit()` installs a SIGINT handler that aborts the run gracefully (workers stopped, checkpoints
    kept) and then either returns, raises the controller's death, or calls `sys.exit(0)`; and it leaves its
    handler installed after `fit()`. Here its handler still runs, but the block then raises KeyboardInterrupt
    (the CLI prints one line and exits 130), and the SIGINT handler from before the block is put back.
    """

    def __enter__(self) -> interruptible:
        import signal

        self.hit = False
        self.previous = signal.getsignal(signal.SIGINT)
        self._register = signal.signal

        def register(signum: int, handler: Any) -> Any:
            if signum == signal.SIGINT and callable(handler):
                inner = handler

                def handler(sig: int, frame: Any) -> None:
                    self.hit = True
                    inner(sig, frame)

            return self._register(signum, handler)

        signal.signal = register
        return self

    def __exit__(self, *exc: Any) -> bool:
        import signal

        signal.signal = self._register
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self.previous)
        if self.hit:
            raise KeyboardInterrupt
        return False
