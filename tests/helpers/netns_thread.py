"""Run datapath code inside a test netns, in-process: a fresh thread enters the netns with
setns(CLONE_NEWNET) and runs the calls there. The datapath's host sockets are per thread
(cni_plugin/datapath/nl.py), so every socket that thread opens lives in the test netns; they are
closed before the thread ends. The test process itself never leaves its own netns.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from cni_plugin.datapath.nl import close_host_ipr, drop_host_rtnl

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(name: str, fn: Callable[[], T], timeout: float = 60.0) -> T:
    """`fn()` run on a thread inside netns `name` (/run/netns/<name>); its result or exception."""
    box: dict[str, object] = {}

    def body() -> None:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {name} failed")
        finally:
            os.close(fd)
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc
        finally:
            close_host_ipr()
            drop_host_rtnl()

    thread = threading.Thread(target=body, name=f"in-{name}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"code in netns {name} did not finish in {timeout} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]
