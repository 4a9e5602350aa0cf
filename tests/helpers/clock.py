"""A wall clock the test moves by hand, so lease expiry is instant and deterministic."""

from __future__ import annotations

import threading


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds
