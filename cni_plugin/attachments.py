"""One lock per attachment (container ID, ifname): work on one attachment never interleaves.

ADD, DEL and CHECK of one attachment, the replay of a journaled or spooled DEL, the GC's release
and the daemon's store re-assertion all take the attachment's lock, so a DEL cannot free the IP
that a running ADD is about to configure, and a late replay cannot free what a new ADD took.

The lock is a plain `threading.Lock`, not an RLock, on purpose: DEL hands it to the background
deletion of the host veth, which releases it from another thread once the kernel is done; an ADD
of the same attachment waits for that. Entries live only while someone holds or waits for them,
so the table does not grow with the number of pods ever seen.
"""

from __future__ import annotations

import threading
from types import TracebackType

from cni_plugin.errors import TRY_AGAIN_LATER, CNIError

Key = tuple[str, str]  # (container ID, ifname): the attachment, whatever the network
WAIT = 5.0  # seconds anything waits for an attachment busy with a CNI verb (never past a deadline)


class AttachmentBusy(CNIError):
    """The attachment's lock was not free within the time the caller had (code 11)."""

    def __init__(self, key: Key) -> None:
        super().__init__(
            TRY_AGAIN_LATER,
            f"attachment {key[0]}/{key[1]} is busy with another request; try again later",
        )


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0  # holders and waiters; guarded by AttachmentLocks._table_lock


class AttachmentLocks:
    def __init__(self) -> None:
        self._table_lock = threading.Lock()  # guards _entries and every _Entry.users
        self._entries: dict[Key, _Entry] = {}

    def acquire(self, key: Key, timeout: float) -> None:
        """Take the attachment's lock, waiting at most `timeout` seconds (AttachmentBusy)."""
        with self._table_lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry()
            entry.users += 1
        if entry.lock.acquire(timeout=max(0.0, timeout)):
            return
        self._leave(key, entry)
        raise AttachmentBusy(key)

    def release(self, key: Key) -> None:
        """Give the lock back; any thread may, so DEL's background deletion can."""
        with self._table_lock:
            entry = self._entries[key]
        entry.lock.release()
        self._leave(key, entry)

    def _leave(self, key: Key, entry: _Entry) -> None:
        with self._table_lock:
            entry.users -= 1
            if entry.users == 0:
                del self._entries[key]

    def hold(self, key: Key, timeout: float) -> _Held:
        """`with locks.hold(key, timeout):` the attachment's lock for the block."""
        return _Held(self, key, timeout)

    def busy(self) -> int:
        """How many attachments are held or waited for (tests and shutdown)."""
        with self._table_lock:
            return len(self._entries)


class _Held:
    """The context manager of `hold` (a plain object: it is on every verb's path)."""

    __slots__ = ("locks", "key", "timeout")

    def __init__(self, locks: AttachmentLocks, key: Key, timeout: float) -> None:
        self.locks, self.key, self.timeout = locks, key, timeout

    def __enter__(self) -> None:
        self.locks.acquire(self.key, self.timeout)

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.locks.release(self.key)
