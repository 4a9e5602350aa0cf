"""Host veth deletion after DEL has answered: the kernel's ~16 ms, off the runtime's clock.

DEL replies once the IPAM release is durable; the runtime deletes the pod netns right after, which
destroys the pair anyway. So the host veth goes in the background, on one thread (the kernel
serialises link deletion under its rtnl lock; more threads would only queue there), at most
BACKLOG of them queued (a burst of DELs past that deletes inline, at the kernel's pace), and the
attachment's lock, which DEL hands over, is released when the deletion is done: an ADD of the same
attachment waits for it instead of meeting a half-deleted link.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from cni_plugin.datapath import veth

log = logging.getLogger(__name__)
BACKLOG = 8  # deletions queued at most (~16-20 ms each): past it DEL deletes inline
Done = Callable[[], None]
Step = Callable[[], None]


class HostVethReaper:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[str, Step, Done] | None] = queue.SimpleQueue()
        self._pending = 0
        self._idle = threading.Condition()  # guards _pending
        self._thread = threading.Thread(target=self._run, name="veth-reaper", daemon=True)
        self._thread.start()

    def submit(self, host_veth: str, done: Done, first: Step = lambda: None) -> None:
        """Delete `host_veth` soon; `done()` runs afterwards whatever happened. `first` runs
        before the deletion (the tests' fault hook)."""
        with self._idle:
            self._pending += 1
        self._queue.put((host_veth, first, done))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            host_veth, first, done = item
            try:
                first()
                self.delete_now(host_veth)
            finally:
                done()
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    @staticmethod
    def delete_now(host_veth: str) -> None:
        """Delete it here and now; a failure is logged, as DEL has released the IP already (the
        runtime's netns deletion takes the pair anyway)."""
        try:
            veth.delete_host_veth_if_exists(host_veth)
        except Exception:  # noqa: BLE001 - logged, see above
            log.exception("deleting host veth %s after DEL failed", host_veth)

    def full(self) -> bool:
        """As many deletions queued as it takes on: the caller deletes inline instead, so the
        backlog (and what an ADD into a reused netns may wait for) stays short."""
        with self._idle:
            return self._pending >= BACKLOG

    def busy(self) -> bool:
        """Deletions are queued or running."""
        with self._idle:
            return self._pending > 0

    def drain(self, timeout: float) -> bool:
        """Wait until every submitted deletion is done (shutdown, tests); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self.drain(timeout)
        self._queue.put(None)
        self._thread.join(timeout)
