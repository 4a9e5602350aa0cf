"""The audit trail of fixed pod IPs: one log line per change an operator or the daemon made.

Every line is `AUDIT <action> key=value ...` on the logger `moor.audit`, e.g.

    AUDIT reserve ip=10.244.250.7 pod=prod/db-0 by=alice@ops1 uid=0

and the daemon's log format puts the time in front of it. Values an operator typed (a pod regex, a
name) or a client sent (the actor) are quoted as JSON strings when they hold anything but
printable ASCII without spaces, quotes or backslashes, so one change is always exactly one line
and no input can forge another line or field. The logger is pinned at INFO, so `--log-level
warning` still keeps the audit trail.
"""

from __future__ import annotations

import json
import logging
import re

log = logging.getLogger("moor.audit")
log.setLevel(logging.INFO)

_PLAIN = re.compile(r"[\x21-\x7e]+", re.ASCII)
_ACTION = re.compile(r"[a-z][a-z-]*", re.ASCII)


def field(value: object) -> str:
    """One value as it appears after `key=`: bare when safe, else a JSON string."""
    text = "" if value is None else str(value)
    if _PLAIN.fullmatch(text) and not any(c in text for c in '"\\='):
        return text
    return json.dumps(text, ensure_ascii=True)


def line(action: str, **fields: object) -> str:
    """`AUDIT <action> k=v ...` (fields in the order given; None values left out)."""
    if not _ACTION.fullmatch(action):
        raise ValueError(f"audit action {action!r} must be lower-case words joined by '-'")
    parts = [f"{key}={field(value)}" for key, value in fields.items() if value is not None]
    return " ".join(["AUDIT", action, *parts])


def audit(action: str, **fields: object) -> None:
    """Log one change: `audit("reserve", ip=ip, pod="prod/db-0", by="alice@ops1", uid=0)`."""
    log.info("%s", line(action, **fields))
