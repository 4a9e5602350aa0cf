"""Replay of the DELs the shim spooled while the daemon was down.

The daemon replays them before it serves anything, so no ADD can race a stale DEL. A DEL that
still fails (say, its config is invalid) moves to `failed/` so it cannot block the daemon forever,
and is logged for an operator. So does any entry the daemon cannot decode or run, whatever is
wrong with it (not a regular file, unreadable, too big, not the wire format, not a DEL, a bug):
replay never raises, so a broken spool never stops the daemon from starting.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable

from cni_plugin.skel import Reply
from cni_plugin.wire import WireError, WireRequest, decode_request

log = logging.getLogger(__name__)
FAILED = "failed"
# The shim's spool entry is the request it would have sent; the CNI endpoint takes at most 4 MiB.
MAX_ENTRY = 4 << 20


class BadEntry(Exception):
    """A spool entry that is not a request the daemon could run."""


def replay_spool(spool_dir: str, run: Callable[[WireRequest], Reply]) -> tuple[int, int]:
    """Run every spooled DEL in order; returns (replayed, failed). Never raises."""
    try:
        names = sorted(n for n in os.listdir(spool_dir) if not n.startswith(".") and n != FAILED)
    except FileNotFoundError:
        return 0, 0
    except OSError as exc:
        log.error("cannot list the DEL spool %s: %s; nothing replayed", spool_dir, exc)
        return 0, 0
    done = failed = 0
    for name in names:
        path = os.path.join(spool_dir, name)
        try:
            reply = _replay_one(path, run)
        except BadEntry as exc:
            reply = Reply(1, str(exc).encode())
        except Exception as exc:  # noqa: BLE001 - one broken entry must not stop the daemon
            log.exception("replaying spooled DEL %s raised", name)
            reply = Reply(1, f"internal error: {exc.__class__.__name__}: {exc}".encode())
        if reply.code == 0:
            _unlink_quietly(path)
            done += 1
            continue
        failed += 1
        where = _move_to_failed(spool_dir, name)
        log.error(
            "spooled DEL %s failed%s: %s",
            name,
            f" and was moved to {where}" if where else " and could not be moved to failed/",
            reply.stdout.decode(errors="replace").strip(),
        )
    if names:
        log.info("replayed %d spooled DEL(s), %d failed", done, failed)
    return done, failed


def _replay_one(path: str, run: Callable[[WireRequest], Reply]) -> Reply:
    try:
        request = decode_request(_read_entry(path))
    except WireError as exc:
        raise BadEntry(str(exc)) from exc
    if request.env.get("CNI_COMMAND") != "DEL":
        raise BadEntry(f"not a DEL: CNI_COMMAND={request.env.get('CNI_COMMAND', '')!r}")
    return run(request)


def _read_entry(path: str) -> bytes:
    """The entry's bytes, if it is a regular file of at most MAX_ENTRY bytes.

    lstat first, so a FIFO or a device is never opened (opening a FIFO would block the start);
    O_NOFOLLOW|O_NONBLOCK and fstat again, so a swap after the lstat changes nothing.
    """
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise BadEntry("not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise BadEntry(f"cannot open: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadEntry("not a regular file")
        if st.st_size > MAX_ENTRY:
            raise BadEntry(f"{st.st_size} bytes, more than the {MAX_ENTRY} a request may have")
        chunks = []
        size = 0
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_ENTRY:
                raise BadEntry(f"more than the {MAX_ENTRY} bytes a request may have")
        return b"".join(chunks)
    except OSError as exc:
        raise BadEntry(f"cannot read: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        log.error("cannot remove replayed spool entry %s: %s", path, exc)


def _failed_dir(spool_dir: str) -> str:
    """`<spool>/failed`, a directory; something else under that name is moved into it."""
    failed = os.path.join(spool_dir, FAILED)
    try:
        os.mkdir(failed, 0o700)
    except FileExistsError:
        if stat.S_ISDIR(os.lstat(failed).st_mode):
            return failed
        aside = os.path.join(spool_dir, f".{FAILED}-{time.time_ns()}")
        os.rename(failed, aside)
        os.mkdir(failed, 0o700)
        os.rename(aside, os.path.join(failed, FAILED))
    return failed


def _move_to_failed(spool_dir: str, name: str) -> str:
    """Move entry `name` into failed/ (under a free name); the relative path, or "" on failure."""
    try:
        failed = _failed_dir(spool_dir)
        for n in range(100):
            target = name if n == 0 else f"{name}.{n}"
            if os.path.lexists(os.path.join(failed, target)):
                continue
            os.rename(os.path.join(spool_dir, name), os.path.join(failed, target))
            return f"{FAILED}/{target}"
        raise OSError(errno.EEXIST, "no free name in failed/")
    except OSError as exc:
        log.error("cannot move spool entry %s to %s/: %s", name, FAILED, exc)
        return ""
