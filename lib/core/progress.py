"""Progress and cancellation of the request being served, for work that runs over many slices or images.

A long task (One-Prompt on a whole volume, SAMauto, TP-DRSeg's classes) calls `current().advance()` once per
step. That is where it reports how far it is, where a cancelled request stops, and where it lets the server hand
the device to a click that is waiting (the server's scheduler installs that as a step hook). The state travels in
a context variable, not in the request: MONAI Label deep-copies requests, and a task called outside the server
(tests, training) gets a progress that nobody watches.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from typing import Callable


class Cancelled(Exception):
    """The request was cancelled (by its client, or with DELETE /jobs/{id}) before its work finished."""


class Progress:
    def __init__(self):
        self.stage = ""
        self.done = 0
        self.total: int | None = None
        self.started = time.time()
        self.cancel_requested = threading.Event()
        self.step_hooks: list[Callable[[], None]] = []

    def begin(self, total: int | None, stage: str = "") -> None:
        """A new stage of `total` steps (None: unknown)."""
        self.stage, self.done, self.total = stage, 0, total
        self.step()

    def advance(self, steps: int = 1) -> None:
        """`steps` more steps are done."""
        self.done += steps
        self.step()

    def step(self) -> None:
        """A point where the work may stop (raises Cancelled) or pause for more urgent work."""
        if self.cancel_requested.is_set():
            raise Cancelled("cancelled")
        for hook in self.step_hooks:
            hook()
        if self.cancel_requested.is_set():  # cancelled while paused
            raise Cancelled("cancelled")

    def cancel(self) -> None:
        self.cancel_requested.set()

    def as_dict(self) -> dict:
        fraction = None if not self.total else round(min(1.0, self.done / self.total), 4)
        elapsed = time.time() - self.started
        return {"stage": self.stage, "done": self.done, "total": self.total, "fraction": fraction,
                "elapsed_s": round(elapsed, 1),
                "eta_s": round(elapsed * (1 - fraction) / fraction, 1) if fraction else None}


_current: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("progress", default=None)


def current() -> Progress:
    """The progress of the request being served on this thread (a fresh, unwatched one outside the server)."""
    progress = _current.get()
    return Progress() if progress is None else progress


@contextlib.contextmanager
def watching(progress: Progress):
    """Serve one request with `progress` as its current progress."""
    token = _current.set(progress)
    try:
        yield progress
    finally:
        _current.reset(token)
