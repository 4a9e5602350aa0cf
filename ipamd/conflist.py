"""Installing the CNI conflist on the node: only once the daemon can serve ADD.

kubelet reports a node Ready when /etc/cni/net.d holds a conflist. Written by an init container,
that happens before the daemon serves: every sandbox then fails until it does (flannel's
install-cni writes it first). So the daemon writes it itself (`--cni-conflist`, from
`--cni-conflist-source`), the first time it is ready, atomically (a temp name in the same
directory, fsynced, then renamed: kubelet never reads half a file), and puts it back if it
vanishes or differs. It stays through restarts and store outages (STATUS answers 50 then, and
ADD 11: the node keeps its pods); `--remove-conflist-on-exit` removes it when moor leaves the
node.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile

log = logging.getLogger(__name__)


class ConflistInstaller:
    def __init__(self, dest: str, source: str) -> None:
        self.dest = dest
        self.source = source

    def content(self) -> bytes:
        """The source, checked to be a conflist (JSON with a plugins list)."""
        with open(self.source, "rb") as f:
            data = f.read()
        parsed = json.loads(data)
        if not isinstance(parsed, dict) or not isinstance(parsed.get("plugins"), list):
            raise ValueError(f"{self.source} is not a CNI conflist (no plugins list)")
        return data

    def ensure(self) -> bool:
        """Write the conflist if it is missing or differs; whether it was written."""
        data = self.content()
        try:
            with open(self.dest, "rb") as f:
                if f.read() == data:
                    return False
        except FileNotFoundError:
            pass
        directory = os.path.dirname(self.dest) or "."
        fd, tmp = tempfile.mkstemp(prefix=".moor-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.rename(tmp, self.dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        log.info("installed the CNI conflist %s", self.dest)
        return True

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dest)
            log.info("removed the CNI conflist %s", self.dest)
