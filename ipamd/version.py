"""moor's release, as the installed package says (one home: setup.cfg)."""

from __future__ import annotations

from importlib import metadata


def daemon_version() -> str:
    try:
        return metadata.version("moor")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"
