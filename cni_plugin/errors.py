"""CNI error codes and the one exception type that carries them to stdout.

Every failure a CNI caller can see is a `CNIError`. The protocol layer turns it into the spec's
`{cniVersion, code, msg, details}` JSON on stdout with a non-zero exit; anything else that escapes
becomes code 999 so a bug never prints a traceback where a runtime expects JSON.
"""

from __future__ import annotations

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
INTERNAL = 999


class CNIError(Exception):
    """A failure with a CNI error code; `details` is free text for operators."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version: str) -> dict[str, object]:
        out: dict[str, object] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

    def __repr__(self) -> str:
        return f"CNIError({self.code}, {self.msg!r}, {self.details!r})"
