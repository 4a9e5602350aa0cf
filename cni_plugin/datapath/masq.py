"""Node-wide source NAT for pod traffic leaving the pod network.

ONE chain per node for the whole pod network, jumped to once from nat POSTROUTING. The reference
bridge plugin installs a chain per container, which makes every ADD/DEL pay several iptables execs
and makes the nat table grow with the pod count; here ADD/DEL touch no iptables at all.

Chain layout for networks N1..Nk of one family (RETURN rules first, so traffic between two pod
networks is never masqueraded whatever the order of the networks):
    -s Ni -d Nj -j RETURN          for every i, j (pod to pod)
    -s Ni -d 224.0.0.0/4 -j RETURN  (ff00::/8 for IPv6; multicast stays unmasqueraded)
    -s Ni -j MASQUERADE
The check costs two execs per family (`-S <chain>` and `-S POSTROUTING`); a repair is one
atomic `iptables-restore --noflush`, so there is no window with a half-filled chain.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Network

from cni_plugin.iptypes import IPNetwork

from .errors import DatapathError, IptablesError

__all__ = ["MasqueradeRules"]

_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
_TIMEOUT = 30.0
_WAIT = ("--wait=10",)  # "-w 10" would be misparsed by some iptables-restore builds
_MAX_CHAIN_LEN = 28


def _find(binary: str) -> str | None:
    found = shutil.which(binary)
    if found:
        return found
    for d in _SBIN_DIRS:
        path = os.path.join(d, binary)
        if os.access(path, os.X_OK):
            return path
    return None


def _quote(value: str) -> str:
    """Quote like iptables-save (xtables_save_string) so expected lines compare equal to `-S`."""
    plain = set("_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    if value and all(c in plain for c in value):
        return value
    escaped = "".join("\\" + c if c in "\"\\'" else c for c in value)
    return f'"{escaped}"'


class _Family:
    def __init__(self, version: int) -> None:
        self.version = version
        self.iptables = "iptables" if version == 4 else "ip6tables"
        self.restore = f"{self.iptables}-restore"
        self.multicast = "224.0.0.0/4" if version == 4 else "ff00::/8"


_FAMILIES = {4: _Family(4), 6: _Family(6)}


class MasqueradeRules:
    """The node's masquerade rule set, in nat chain `chain` (one per node, not per pod)."""

    def __init__(self, chain: str = "MOOR-MASQ") -> None:
        if not chain or len(chain) > _MAX_CHAIN_LEN or any(c.isspace() for c in chain):
            raise ValueError(f"invalid iptables chain name {chain!r}")
        self.chain = chain

    # -- rule text ---------------------------------------------------------------------------

    def _jump_line(self) -> str:
        comment = _quote("moor: masquerade pod traffic leaving the pod network")
        return f"-A POSTROUTING -m comment --comment {comment} -j {self.chain}"

    def _chain_lines(self, fam: _Family, networks: Sequence[IPNetwork]) -> list[str]:
        c = self.chain
        lines = []
        for src in networks:
            for dst in networks:
                comment = _quote(f"moor: no masquerade from {src} to {dst}")
                lines.append(f"-A {c} -s {src} -d {dst} -m comment --comment {comment} -j RETURN")
            comment = _quote(f"moor: no masquerade of multicast from {src}")
            lines.append(
                f"-A {c} -s {src} -d {fam.multicast} -m comment --comment {comment} -j RETURN"
            )
        for src in networks:
            comment = _quote(f"moor: masquerade {src}")
            lines.append(f"-A {c} -s {src} -m comment --comment {comment} -j MASQUERADE")
        return lines

    # -- execution ---------------------------------------------------------------------------

    def _run(
        self, fam: _Family, args: Sequence[str], stdin: str | None = None, restore: bool = False
    ) -> subprocess.CompletedProcess[str]:
        binary = _find(fam.restore if restore else fam.iptables)
        if binary is None:
            raise DatapathError(f"{fam.restore if restore else fam.iptables} not found")
        try:
            return subprocess.run(
                [binary, *_WAIT, *args],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise DatapathError(f"{binary} {' '.join(args)} timed out") from e

    def _list(self, fam: _Family, chain: str) -> list[str] | None:
        """`-S chain` of the nat table, or None when the chain (or the table) does not exist."""
        proc = self._run(fam, ["-t", "nat", "-S", chain])
        if proc.returncode == 1:
            return None
        if proc.returncode != 0:
            raise IptablesError(f"{fam.iptables} -t nat -S {chain}", proc.returncode, proc.stderr)
        return [line for line in proc.stdout.splitlines() if line.startswith("-A ")]

    def _state(self, fam: _Family, networks: Sequence[IPNetwork]) -> tuple[bool, list[str]]:
        """(chain holds exactly the expected rules, every POSTROUTING rule that jumps to it)."""
        rules = self._list(fam, self.chain)
        postrouting = self._list(fam, "POSTROUTING") or []
        jumps = [line for line in postrouting if line.endswith(f" -j {self.chain}")]
        return rules == self._chain_lines(fam, networks), jumps

    @staticmethod
    def _split(networks: Sequence[IPNetwork]) -> dict[int, list[IPNetwork]]:
        by_version: dict[int, list[IPNetwork]] = {4: [], 6: []}
        for n in networks:
            if n not in by_version[n.version]:
                by_version[n.version].append(n)
        return by_version

    # -- public API --------------------------------------------------------------------------

    def is_installed(self, networks: Sequence[IPv4Network | IPv6Network]) -> bool:
        """True when, for every family in `networks`, the chain holds exactly the expected rules
        and POSTROUTING jumps to it exactly once."""
        for version, nets in self._split(networks).items():
            if not nets:
                continue
            correct, jumps = self._state(_FAMILIES[version], nets)
            if not correct or jumps != [self._jump_line()]:
                return False
        return True

    def ensure(self, networks: Sequence[IPv4Network | IPv6Network]) -> bool:
        """Make the rule set match `networks`; returns True when something had to be changed.

        Cheap when already correct (two `-S` execs per family, no writes). A family with no network
        in `networks` is left untouched (use remove() to drop everything).
        """
        changed = False
        for version, nets in self._split(networks).items():
            if nets:
                changed |= self._ensure_family(_FAMILIES[version], nets)
        return changed

    def _ensure_family(self, fam: _Family, nets: Sequence[IPNetwork]) -> bool:
        correct, jumps = self._state(fam, nets)
        jump = self._jump_line()
        if correct and jumps == [jump]:
            return False
        # ":CHAIN" in --noflush mode creates the chain or flushes it; the whole table commits
        # atomically, so traffic never sees a partially filled chain.
        lines = ["*nat", f":{self.chain} - [0:0]", *self._chain_lines(fam, nets)]
        if jumps != [jump]:  # missing, duplicated or foreign-looking jumps: replace them all
            lines += [line.replace("-A ", "-D ", 1) for line in jumps]
            lines.append(jump)
        lines.append("COMMIT")
        proc = self._run(fam, ["--noflush"], stdin="\n".join(lines) + "\n", restore=True)
        if proc.returncode != 0:
            raise IptablesError(f"{fam.restore} --noflush", proc.returncode, proc.stderr)
        return True

    def remove(self) -> None:
        """Delete the POSTROUTING jump(s) and the chain, for both families; absent parts are fine."""
        for fam in _FAMILIES.values():
            if _find(fam.iptables) is None:
                continue
            for line in self._list(fam, "POSTROUTING") or []:
                if line.endswith(f" -j {self.chain}"):
                    self._run(fam, ["-t", "nat", *shlex.split(line.replace("-A ", "-D ", 1))])
            if self._list(fam, self.chain) is not None:
                self._run(fam, ["-t", "nat", "-F", self.chain])
                proc = self._run(fam, ["-t", "nat", "-X", self.chain])
                if proc.returncode != 0 and self._list(fam, self.chain) is not None:
                    raise IptablesError(
                        f"{fam.iptables} -t nat -X {self.chain}", proc.returncode, proc.stderr
                    )
