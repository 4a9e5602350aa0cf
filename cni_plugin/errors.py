"""CNI error codes, the one exception type that carries them to stdout, and the one table that
maps every other exception onto a code.

Every failure a CNI caller can see is a `CNIError`. The protocol layer (`skel.run`) has a single
except clause that calls `to_cni_error`: a CNIError passes through, a known failure class gets its
documented code (the table below), and anything else is 999, a bug in moor, with the traceback on
stderr. A bad input must never reach 999: validate it where it enters, or give its failure class a
row here.
"""

from __future__ import annotations

import reprlib

from cni_plugin.datapath.errors import DatapathError, InvalidSetting, NetnsError

# Codes 0-99 are the spec's (SPEC.md "Error" table); 100+ are moor's own.
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_NETWORK_CONFIG = 7
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50
LIMITED_CONNECTIVITY = 51

# moor's own codes, documented in SPEC-NOTES.md.
POOL_EXHAUSTED = 100
DUPLICATE_ATTACHMENT = 101
INTERFACE_EXISTS = 102
CHECK_FAILED = 103
DATAPATH_FAILURE = 104
FIXED_IP_UNAVAILABLE = 105
STALE_GENERATION = 106
ADDRESS_CONFLICT = 107  # the ARP probe (`arpProbe`) found the IP in use by another host
INTERNAL = 999


class CNIError(Exception):
    """A failure with a CNI error code; `details` is free text for operators."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version: str) -> dict[str, object]:
        out: dict[str, object] = {
            "cniVersion": cni_version,
            "code": self.code,
            "msg": printable(self.msg),
        }
        if self.details:
            out["details"] = printable(self.details)
        return out

    def __repr__(self) -> str:
        return f"CNIError({self.code}, {self.msg!r}, {self.details!r})"


MAX_MESSAGE = 4096  # characters of msg/details: an error quoting hostile input stays small
_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother = 3, 80, 80


def brief(value: object) -> str:
    """A bounded repr of a config value for a message: never deep (no RecursionError on a value
    nested a thousand levels), never long."""
    return _BRIEF.repr(value)


def printable(text: str) -> str:
    """`text` bounded, without lone surrogates (an invalid-UTF-8 value quoted raw in a message would
    turn into a `\\udcxx` escape that strict JSON readers such as Go's replace or refuse)."""
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 3] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# Failure classes that are not a CNIError, by class (the most specific class in the MRO wins), as
# (code, message prefix). Keep it in step with the error table in SPEC-NOTES.md.
ERROR_TABLE: dict[type[BaseException], tuple[int, str]] = {
    # The pod netns fd is not a usable network namespace (e.g. CNI_NETNS is a regular file).
    NetnsError: (INVALID_ENVIRONMENT, "CNI_NETNS is not a usable network namespace"),
    # The kernel refused a setting the request chose: the veth's MTU or MAC once the fd and the
    # bridge were ruled out, or a route of the config (datapath/veth.py).
    InvalidSetting: (INVALID_NETWORK_CONFIG, "the kernel refused a setting of the request"),
    # Everything else in the datapath (netlink, iptables, missing privileges, a bridge name taken
    # by another kind of link). LinkExists/PodInterfaceExists of the veth create are mapped by
    # plugin.py with more context (101/102) before they get here.
    DatapathError: (DATAPATH_FAILURE, "datapath failure"),
    # The IPAM port's errors (cni_plugin/ipam.py), the attachment lock's AttachmentBusy and the
    # request's DeadlineExceeded are CNIErrors that carry their codes: they need no row here.
}


def to_cni_error(exc: BaseException) -> CNIError:
    """The CNI error for any exception; INTERNAL (999) only for what no row covers: a bug."""
    if isinstance(exc, CNIError):
        return exc
    for cls in type(exc).__mro__:
        row = ERROR_TABLE.get(cls)
        if row is not None:
            code, prefix = row
            return CNIError(code, f"{prefix}: {exc}")
    return CNIError(INTERNAL, f"internal error: {exc.__class__.__name__}: {exc}")
