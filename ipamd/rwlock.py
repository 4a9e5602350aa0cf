"""A shared/exclusive lock: many allocations at once, or one reload of the free sets alone.

Writer-preferring: once a reload waits, new allocations wait behind it, so a steady stream of
allocations cannot starve it; the reload itself is short (one listing of the node's own subnets).
The shared side is on every allocation's path, so while no writer is about it costs one plain
lock acquisition on entry and one on exit; only a writer waits on the condition.
"""

from __future__ import annotations

import threading
from types import TracebackType


class SharedExclusiveLock:
    def __init__(self) -> None:
        self._mutex = threading.Lock()  # guards the three counters below
        self._changed = threading.Condition(self._mutex)
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self.shared = _Shared(self)
        self.exclusive = _Exclusive(self)

    def acquire_shared(self) -> None:
        with self._mutex:
            while self._writer or self._writers_waiting:
                self._changed.wait()
            self._readers += 1

    def release_shared(self) -> None:
        with self._mutex:
            self._readers -= 1
            if self._readers == 0 and self._writers_waiting:
                self._changed.notify_all()

    def acquire_exclusive(self) -> None:
        with self._mutex:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._changed.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True

    def release_exclusive(self) -> None:
        with self._mutex:
            self._writer = False
            self._changed.notify_all()


class _Shared:
    """`with lock.shared:` (a plain object, cheaper than a generator context manager)."""

    def __init__(self, lock: SharedExclusiveLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire_shared()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lock.release_shared()


class _Exclusive:
    def __init__(self, lock: SharedExclusiveLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire_exclusive()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lock.release_exclusive()
