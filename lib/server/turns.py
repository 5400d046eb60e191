"""Whose turn it is on a device: one request computes at a time, in arrival order, and a long request gives the
device up at each of its steps to whoever is waiting.

Two models running at once on one device share its cores or its memory bandwidth and both slow down, and a second
copy of the weights per worker is what the server must not have. So requests take turns. A click (one slice, a
fraction of a second) keeps its turn to the end; a whole-volume job (minutes) steps through `Progress`, and at each
step it goes to the back of the queue if anyone waits, so a click waits at most one step of a long job.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque

from lib.core.progress import Cancelled, Progress


class DeviceTurns:
    def __init__(self, name: str = "device"):
        self.name = name
        self._changed = threading.Condition()
        self._queue: deque = deque()
        self._holder = None
        self.turns = 0
        self.handovers = 0  # how often a long job let a waiting request go first
        self.waited_s = 0.0

    @contextlib.contextmanager
    def turn(self, progress: Progress):
        """Hold the device for one request; `progress`'s steps hand it over to waiting requests."""
        self._acquire(progress)
        held = [True]

        def hand_over():
            with self._changed:
                if not self._queue:
                    return
                self.handovers += 1
            held[0] = False
            self._release()
            self._acquire(progress)  # to the back of the queue; a cancel while waiting raises here
            held[0] = True

        progress.step_hooks.append(hand_over)
        try:
            yield
        finally:
            progress.step_hooks.remove(hand_over)
            if held[0]:
                self._release()

    def waiting(self) -> int:
        with self._changed:
            return len(self._queue)

    def stats(self) -> dict:
        with self._changed:
            return {"busy": self._holder is not None, "waiting": len(self._queue), "turns": self.turns,
                    "handovers": self.handovers, "waited_s": round(self.waited_s, 1)}

    def _acquire(self, progress: Progress) -> None:
        ticket = object()
        start = time.perf_counter()
        with self._changed:
            self._queue.append(ticket)
            try:
                while self._holder is not None or self._queue[0] is not ticket:
                    if progress.cancel_requested.is_set():
                        raise Cancelled("cancelled while waiting for the device")
                    self._changed.wait(timeout=0.5)
            except BaseException:
                self._queue.remove(ticket)
                self._changed.notify_all()
                raise
            self._queue.popleft()
            self._holder = ticket
            self.turns += 1
            self.waited_s += time.perf_counter() - start

    def _release(self) -> None:
        with self._changed:
            self._holder = None
            self._changed.notify_all()
