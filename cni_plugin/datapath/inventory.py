"""Read-only views of host links, for CHECK and the daemon's leak GC.

A listing that fails raises; the leak GC treats that as an incomplete view and releases nothing.
"""

from __future__ import annotations

from cni_plugin.datapath.errors import LinkNotFound
from cni_plugin.datapath.nl import (
    LinkInfo,
    dump_retry,
    host_ipr,
    host_rtnl,
    link_info,
    link_kind,
    translate_errors,
)


def lookup_bridge(name: str) -> LinkInfo | None:
    """The bridge called `name` in the host netns, or None if absent or not a bridge."""
    try:
        with translate_errors(f"get link {name!r}"):
            msg = host_rtnl().get_link(name)
    except LinkNotFound:
        return None
    return link_info(msg) if link_kind(msg) == "bridge" else None


def host_link_names() -> set[str]:
    """Names of every link in the host netns (one dump)."""
    with translate_errors("dump host links"):
        return {str(m.get("IFLA_IFNAME")) for m in dump_retry(lambda: host_ipr().link("dump"))}
