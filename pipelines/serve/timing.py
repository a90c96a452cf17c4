"""Where one pipeline call's time goes, measured from outside the pipeline: its text-encoder calls, each denoising
step and the decode. `time_parts` wraps the loaded pipeline's encoder and autoencoder once (the pipeline unchanged);
the generator sets the running call's `CallTimer` on a thread-local while it samples, and its progress callback marks
each step. The figures go back to the ingress in the job's metrics.JobReport.
"""

from __future__ import annotations

import threading
import time
from typing import Any


class CallTimer:
    """Where one pipeline call's time goes: text-encoder calls, each denoising step, the decode (filled by
    the wrappers `time_parts` puts around the pipeline's encoder and autoencoder)."""

    def __init__(self) -> None:
        self.text_encode_s: list[float] = []
        self.step_s: list[float] = []
        self.vae_decode_s: float | None = None
        self.mark = time.perf_counter()

    def step(self) -> None:
        now = time.perf_counter()
        self.step_s.append(now - self.mark)
        self.mark = now


def time_parts(pipe: Any, local: threading.local) -> None:
    """Wrap the pipeline's text encoder and decoder (from outside, the pipeline unchanged) so the running
    call's CallTimer (`local.call`, None between calls) sees how long each took."""
    encoder, autoencoder = pipe.text_encoder, pipe.autoencoder
    encode, decode = encoder.encode, autoencoder.decode

    def timed_encode(texts: list[str]) -> Any:
        started = time.perf_counter()
        try:
            return encode(texts)
        finally:
            timer = getattr(local, "call", None)
            if timer is not None:
                timer.text_encode_s.append(time.perf_counter() - started)
                timer.mark = time.perf_counter()  # the first step is timed from here

    def timed_decode(latents: Any) -> Any:
        started = time.perf_counter()
        try:
            return decode(latents)
        finally:
            timer = getattr(local, "call", None)
            if timer is not None:
                timer.vae_decode_s = time.perf_counter() - started

    encoder.encode = timed_encode
    autoencoder.decode = timed_decode
