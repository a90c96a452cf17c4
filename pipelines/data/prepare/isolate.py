"""Running the video decoder where a native crash or a hang cannot take a worker's other work down.

FFmpeg and decord are C/C++: a malformed file can segfault or loop forever inside them, and a Ray task
that dies that way loses its whole batch (and, retried, dies again). Each worker process therefore keeps
one decoder child process and sends it one call at a time (probe a file, decode a clip) over a pipe.
A call that does not answer within the time limit has its child killed; a child that dies answers
nothing. Either way the call raises `DecoderFailed` (reason "decoder timed out" / "decoder crashed"),
the input becomes a reject with that reason, and the next call starts a fresh child.

The child is forked from the worker (milliseconds: the decoder libraries are already imported), so the
isolation costs one pipe round trip per clip (~0.1 ms against 2+ ms of decoding).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable
from typing import Any

DECODE_TIMEOUT_S = 120.0
"""Seconds one call (probe a file, decode a clip) may take: a 64-frame 4K clip decodes in a few seconds
even on a busy core, so two minutes without an answer is a hang."""


class DecoderFailed(Exception):
    """The decoder child crashed or hung on this input; `reason` is the reject reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _serve(conn: Any) -> None:
    """The child's loop: (fn, args) -> (True, result) or (False, exception)."""
    import faulthandler

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the worker, which kills us
    faulthandler.disable()  # a crash here is reported by the parent as the input's reject, not as a stack dump
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send((True, fn(*args)))
        except Exception as err:  # noqa: BLE001 - handed back to the caller as the input's failure
            # Class, reason and message rather than the exception: exceptions with their own __init__
            # (VideoReadError) do not survive pickling with their attributes.
            conn.send((False, (type(err), getattr(err, "reason", None), str(err))))


def _restore(cls: type, reason: str | None, message: str) -> Exception:
    """The child's exception, rebuilt without calling its __init__."""
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    if reason is not None:
        err.reason = reason
    return err


class IsolatedCalls:
    """`calls(fn, *args)`: fn(*args) in this process's decoder child, with a time limit."""

    def __init__(self, timeout_s: float = DECODE_TIMEOUT_S):
        self.timeout_s = timeout_s
        self._proc: Any = None
        self._conn: Any = None

    def _start(self) -> None:
        ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), daemon=True, name="sora-decoder")
        self._proc.start()
        child.close()

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(5)
            self._conn.close()
        self._proc = self._conn = None

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._proc is None or not self._proc.is_alive():
            self.stop()
            self._start()
        try:
            self._conn.send((fn, args))
            ready = self._conn.poll(self.timeout_s)
            if ready:
                ok, value = self._conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            ready, ok, value = True, None, None
        if not ready:
            self.stop()
            raise DecoderFailed("decoder timed out", f"no answer from the decoder within {self.timeout_s:g}s (killed)")
        if ok is None:
            self._proc.join(1)
            code = self._proc.exitcode
            self.stop()
            how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
            raise DecoderFailed("decoder crashed", f"the decoder process died ({how})")
        if not ok:
            raise _restore(*value)
        return value

    def __del__(self) -> None:
        try:
            self.stop()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


_CALLS: dict[float, IsolatedCalls] = {}


def isolated(timeout_s: float = DECODE_TIMEOUT_S) -> IsolatedCalls:
    """This process's decoder child (one per time limit, normally one)."""
    if timeout_s not in _CALLS:
        _CALLS[timeout_s] = IsolatedCalls(timeout_s)
    return _CALLS[timeout_s]
