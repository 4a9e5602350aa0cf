"""What every moorctl command shares: tables, times, and the error moorctl finds itself.

A module of its own so that the command modules (ipamd/cli.py, ipamd/cli_fixed.py) share one
`CliError` also when moorctl runs as `python -m ipamd.cli` (then cli.py is `__main__`).
"""

from __future__ import annotations

import time


class CliError(Exception):
    """A problem moorctl finds itself (bad argument), reported like a daemon error."""


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def when(since: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "-"


def pod_text(namespace: str, name: str) -> str:
    """`namespace/name`; a pod without a namespace (podman) is its name alone; none: empty."""
    if not name:
        return ""
    return f"{namespace}/{name}" if namespace else name
