"""Fixed pod IPs: who a pod is (identity), which incarnation of it (generation), and the binding
record that ties a fixed IP to an identity across restarts and node moves.

- **Identity**: `namespace/name` from CNI_ARGS (K8S_POD_NAMESPACE, K8S_POD_NAME). podman sends
  only the name; plain cnitool sends none: then the container ID, which binds an IP to one
  container only (nothing to be sticky about).
- **Generation**: the pod UID plus the container ID. A recreated pod (new UID) or a new sandbox of
  the same pod (new container ID) is a new generation; the newest one asking for the IP wins it, in
  one compare-and-swap, and the generations it replaced are remembered (`retired`) so that a late
  request of an old one is refused rather than taking the IP back.
- **Binding** (`<prefix>/fixed/<ip>`): one per fixed IP, the one source of truth for who may hold
  it, who holds it now (generation, attachment handle, node) and what happens when the holder
  lets go: a reservation stays until `moorctl unreserve`; a sticky binding is retained for its
  retention period after the last DEL; a per-request binding ends with its attachment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from cni_plugin.ipam import AttachmentOwner
from cni_plugin.iptypes import IPAddress

RESERVATION, STICKY, REQUEST = "reservation", "sticky", "request"
SOURCES = (RESERVATION, STICKY, REQUEST)
RETIRED_KEPT = 8  # generations remembered per binding: enough for any restart storm in practice


@dataclass(frozen=True)
class Identity:
    """Who a pod is, whatever node or incarnation: see the module docstring."""

    namespace: str = ""
    name: str = ""
    container_id: str = ""

    @classmethod
    def of(cls, owner: AttachmentOwner) -> Identity:
        if owner.pod_name:
            return cls(owner.pod_namespace, owner.pod_name)
        return cls(container_id=owner.container_id)

    @classmethod
    def parse(cls, text: str) -> Identity:
        """`NAMESPACE/NAME` or `NAME` (as moorctl takes it); ValueError otherwise."""
        namespace, sep, name = text.rpartition("/")
        if not name or (sep and not namespace) or "/" in namespace:
            raise ValueError(f"{text!r} is not NAMESPACE/POD or POD")
        return cls(namespace, name)

    @property
    def named(self) -> bool:
        """A pod name is known: the identity outlives its containers (stickiness makes sense)."""
        return bool(self.name)

    @property
    def text(self) -> str:
        if self.name:
            return f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"container:{self.container_id}"


@dataclass(frozen=True)
class Generation:
    uid: str
    container_id: str

    @classmethod
    def of(cls, owner: AttachmentOwner) -> Generation:
        return cls(owner.pod_uid, owner.container_id)

    @property
    def text(self) -> str:
        return f"uid {self.uid or '-'}, container {self.container_id}"

    def to_dict(self) -> dict[str, str]:
        return {"uid": self.uid, "containerID": self.container_id}

    @classmethod
    def from_dict(cls, d: Any) -> Generation:
        if not isinstance(d, dict):
            raise ValueError(f"malformed generation {d!r}")
        return cls(str(d.get("uid", "")), str(d.get("containerID", "")))


@dataclass(frozen=True)
class FixedBinding:
    ip: IPAddress
    identity: Identity
    source: str
    retain: float = 0.0  # sticky: seconds the IP stays bound after the last DEL
    reserved_by: str = ""  # reservation: who made it (moorctl's user@host) and when
    reserved_at: float = 0.0
    generation: Generation | None = None  # the holder now; None when nobody holds it
    handle: tuple[str, str, str] | None = None  # the holder's attachment
    node: str = ""  # where the holder is (or was, last)
    host_veth: str = ""  # the holder's host-side interface on `node` (its /32 goes there)
    since: float = 0.0  # held since
    released_at: float = 0.0  # the last holder let go at (retention runs from here)
    retired: tuple[Generation, ...] = field(default=())

    @property
    def held(self) -> bool:
        return self.generation is not None

    @property
    def state(self) -> str:
        if self.held:
            return "held"
        return "reserved" if self.source == RESERVATION else "retained"

    def retained_until(self) -> float:
        """When a sticky binding nobody holds ends (0: it does not end by time)."""
        if self.held or self.source != STICKY:
            return 0.0
        return self.released_at + self.retain

    def held_by(self, generation: Generation, handle: tuple[str, str, str], node: str,
                host_veth: str, now: float) -> FixedBinding:  # fmt: skip
        """This binding held by `generation`; the generation it replaces is retired."""
        retired = self.retired
        if self.generation is not None and self.generation != generation:
            retired = (self.generation, *retired)[:RETIRED_KEPT]
        return replace(
            self, generation=generation, handle=handle, node=node, host_veth=host_veth,
            since=now if self.generation != generation else self.since, retired=retired,
        )  # fmt: skip

    def let_go(self, now: float) -> FixedBinding:
        """The holder released it: nobody holds it; its generation is retired."""
        retired = self.retired
        if self.generation is not None:
            retired = (self.generation, *retired)[:RETIRED_KEPT]
        return replace(
            self, generation=None, handle=None, host_veth="", released_at=now, retired=retired
        )

    # ---- JSON ---------------------------------------------------------------------------
    def to_json(self) -> bytes:
        d: dict[str, Any] = {
            "identity": {"namespace": self.identity.namespace, "name": self.identity.name,
                         "containerID": self.identity.container_id},
            "source": self.source,
            "retain": self.retain,
            "reservedBy": self.reserved_by,
            "reservedAt": self.reserved_at,
            "generation": self.generation.to_dict() if self.generation else None,
            "handle": list(self.handle) if self.handle else None,
            "node": self.node,
            "hostVeth": self.host_veth,
            "since": self.since,
            "releasedAt": self.released_at,
            "retired": [g.to_dict() for g in self.retired],
        }  # fmt: skip
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, ip: IPAddress, data: bytes) -> FixedBinding:
        d = json.loads(data)
        ident = d.get("identity") or {}
        source = d.get("source")
        if source not in SOURCES:
            raise ValueError(f"fixed binding of {ip}: unknown source {source!r}")
        handle = d.get("handle")
        if handle is not None and (not isinstance(handle, list) or len(handle) != 3):
            raise ValueError(f"fixed binding of {ip}: malformed handle {handle!r}")
        return cls(
            ip=ip,
            identity=Identity(
                str(ident.get("namespace", "")),
                str(ident.get("name", "")),
                str(ident.get("containerID", "")),
            ),
            source=source,
            retain=float(d.get("retain", 0)),
            reserved_by=str(d.get("reservedBy", "")),
            reserved_at=float(d.get("reservedAt", 0)),
            generation=Generation.from_dict(d["generation"]) if d.get("generation") else None,
            handle=tuple(str(p) for p in handle) if handle else None,  # type: ignore[arg-type]
            node=str(d.get("node", "")),
            host_veth=str(d.get("hostVeth", "")),
            since=float(d.get("since", 0)),
            released_at=float(d.get("releasedAt", 0)),
            retired=tuple(Generation.from_dict(g) for g in d.get("retired") or ()),
        )
