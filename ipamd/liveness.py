"""Is an attachment's pod still there? Asked of the kernel, never of the store.

Two users: the leak GC frees an allocation whose pod is gone; the store guard puts back the
allocation of a pod that is still there after the store lost its record. A pod is there while its
netns exists (the same namespace as at ADD) or its host veth does.
"""

from __future__ import annotations

import errno
import os

from ipamd.model import Allocation


class IncompleteView(Exception):
    """Something could not be observed; this round must not release anything."""


def netns_alive(alloc: Allocation) -> bool:
    """True while the attachment's netns still exists (and is the same namespace)."""
    if not alloc.netns:
        return True  # nothing recorded: never call it a leak
    try:
        st = os.stat(alloc.netns)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return False
        raise IncompleteView(f"cannot stat {alloc.netns}: {exc}") from exc
    return not alloc.netns_inode or st.st_ino == alloc.netns_inode


def attachment_gone(alloc: Allocation, links: set[str]) -> bool:
    """Its netns and its host veth are both gone (`links`: the host's link names). Raises
    IncompleteView when the netns cannot be looked at."""
    return not netns_alive(alloc) and (not alloc.host_veth or alloc.host_veth not in links)
