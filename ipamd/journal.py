"""The release journal: DELs that could not reach the store, kept on disk until they are applied.

A DEL must not fail because etcd is briefly away (kubelet would retry it forever, and a pod's
teardown would hang), and its release must not be lost either (the IP would leak). So while the
store is unreachable a release is appended here, fsynced, and the DEL succeeds; a retry loop in
the daemon applies the entries once the store answers again, and the file survives a restart.

Entries are keyed by handle (network, container ID, ifname). Applying one is the allocator's
ordinary owner-checked release, so a stale entry never frees an IP that someone else holds.
An ADD for a journaled handle applies that entry first, so the DEL before it is never lost or
reordered; like any ADD it needs the store, and answers "try again later" without it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

Handle = tuple[str, str, str]


@dataclass(frozen=True)
class JournaledRelease:
    handle: Handle
    ip: str  # what the node believed the handle held, for logs and `moorctl`
    at: float


class ReleaseJournal:
    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: dict[Handle, JournaledRelease] = {}
        self._load()

    def _load(self) -> None:
        try:
            with open(self.path) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return
        for line in lines:
            try:
                d = json.loads(line)
                entry = JournaledRelease(
                    (str(d["network"]), str(d["containerID"]), str(d["ifname"])),
                    str(d.get("ip", "")),
                    float(d["at"]),
                )
            except (ValueError, KeyError, TypeError):
                log.warning("release journal %s: skipping unreadable line %r", self.path, line)
                continue
            if d.get("done"):
                self._entries.pop(entry.handle, None)
            else:
                self._entries[entry.handle] = entry

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, handle: object) -> bool:
        with self._lock:
            return handle in self._entries

    def entry(self, handle: Handle) -> JournaledRelease | None:
        with self._lock:
            return self._entries.get(handle)

    def pending(self) -> list[JournaledRelease]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.at)

    def record(self, handle: Handle, ip: str) -> None:
        """Durably remember a release to apply later (fsynced before the DEL answers)."""
        entry = JournaledRelease(handle, ip, self.clock())
        with self._lock:
            self._entries[handle] = entry
            self._append(entry, done=False)

    def done(self, handle: Handle) -> None:
        """The release was applied, or an ADD took the handle back: forget it."""
        with self._lock:
            entry = self._entries.pop(handle, None)
            if entry is None:
                return
            if self._entries:
                self._append(entry, done=True)
            else:
                self._truncate()

    def _append(self, entry: JournaledRelease, *, done: bool) -> None:
        network, cid, ifname = entry.handle
        line = json.dumps(
            {
                "network": network,
                "containerID": cid,
                "ifname": ifname,
                "ip": entry.ip,
                "at": entry.at,
                "done": done,
            },
            separators=(",", ":"),
        )
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    def _truncate(self) -> None:
        """Nothing pending: start the file afresh, so it never grows without bound."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
