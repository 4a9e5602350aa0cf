"""The etcd v3 backend of the store contract, on etcd-sdk-python (module `pyetcd`).

Why pyetcd: it is the maintained fork of python-etcd3 (which no longer imports with protobuf 7),
it is synchronous like the rest of the daemon, and it passed put/get, create-if-absent,
mod_revision CAS, leases and watch against Debian's etcd 3.4 (see the issue note). We use its
endpoint/TLS/failover handling and its generated stubs, and build the requests ourselves: the
contract needs things its convenience wrappers drop (the txn header revision, deleted counts,
leases on txn puts, a watch that a `threading.Event` stops).

Failure model: every RPC has a deadline (`timeout`, capped by the deadline of the CNI request it
serves: base.call_timeout), and any transport failure becomes
`StoreUnavailable`, which callers treat as "try again later". The channel reconnects on its own
with a short backoff, so the daemon recovers when etcd returns without a restart.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
from pyetcd import etcdrpc
from pyetcd.client import Endpoint, MultiEndpointEtcd3Client
from pyetcd.etcdrpc import kv_pb2
from pyetcd.exceptions import NoServerAvailableError

from ipamd.store.base import (
    Compare,
    Delete,
    KeyValue,
    LeaseNotFound,
    Put,
    StoreBase,
    StoreError,
    StoreIdentity,
    StoreUnavailable,
    TxnResult,
    WatchCompacted,
    WatchEvent,
    call_timeout,
    check_key,
    check_lease_id,
    check_prefixes,
    check_start_revision,
    check_txn,
    prefix_range_end,
)

LIST_PAGE = 5000  # keys per range request when listing: keeps each response far below gRPC's limit
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
}
# Reconnect quickly after an outage (gRPC's default backoff grows to 120 s), and notice a dead
# peer on an idle connection.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 << 20),
]


def _b(s: str) -> bytes:
    return s.encode("utf-8")


def _kv(kv: Any) -> KeyValue:
    return KeyValue(
        kv.key.decode("utf-8", errors="surrogateescape"),
        bytes(kv.value),
        kv.create_revision,
        kv.mod_revision,
        kv.lease,
    )


class EtcdStore(StoreBase):
    def __init__(
        self,
        endpoints: Sequence[tuple[str, int]],
        *,
        timeout: float = 2.0,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        retry_after: float = 1.0,
    ) -> None:
        if not endpoints:
            raise ValueError("etcd store needs at least one host:port endpoint")
        if (cert_file is None) != (key_file is None):
            raise ValueError("--etcd-certfile and --etcd-keyfile go together")
        creds = None
        if ca_file is not None:
            creds = MultiEndpointEtcd3Client.get_secure_creds(ca_file, key_file, cert_file)
        self.timeout = timeout
        self._endpoints = [
            Endpoint(
                host,
                port,
                secure=creds is not None,
                creds=creds,
                time_retry=retry_after,
                opts=_CHANNEL_OPTIONS,
            )
            for host, port in endpoints
        ]
        self._client = MultiEndpointEtcd3Client(
            endpoints=self._endpoints, timeout=timeout, failover=True
        )
        self._closed = threading.Event()
        self._lock = threading.Lock()  # pyetcd's endpoint switch is not thread-safe

    def __repr__(self) -> str:
        return f"EtcdStore({', '.join(ep.netloc for ep in self._endpoints)})"

    # ---- plumbing ---------------------------------------------------------------------------
    def _stub(self, name: str) -> Any:
        """pyetcd's cached stub `name` on the current endpoint's channel; "watch" is a fresh one
        (pyetcd's own watcher is callback-based, with one thread per client that a single watch
        cannot stop)."""
        if self._closed.is_set():
            raise StoreUnavailable("etcd store is closed")
        try:
            with self._lock:
                if name == "watch":
                    return etcdrpc.WatchStub(self._client.channel)
                return getattr(self._client, name)
        except (NoServerAvailableError, ValueError) as exc:
            raise StoreUnavailable(f"no etcd endpoint available ({self})") from exc

    def _call(self, stub: str, method: str, request: Any) -> Any:
        rpc: Callable[..., Any] = getattr(self._stub(stub), method)
        try:
            return rpc(request, call_timeout(self.timeout))
        except grpc.RpcError as exc:
            raise self._error(exc) from exc

    def _error(self, exc: grpc.RpcError) -> StoreError:
        code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
        details: str = exc.details() or code.name  # type: ignore[attr-defined]
        if "lease not found" in details:
            return LeaseNotFound(details)
        if code in _TRANSIENT or self._closed.is_set():
            with self._lock:
                endpoint = self._client.endpoint_in_use
                if endpoint is not None and endpoint.in_use:
                    endpoint.fail()  # the next call tries another endpoint, if there is one
            return StoreUnavailable(f"etcd {code.name.lower()}: {details}")
        return StoreError(f"etcd {code.name.lower()}: {details}")

    # ---- core -------------------------------------------------------------------------------
    def get(self, key: str) -> KeyValue | None:
        r = self._call("kvstub", "Range", etcdrpc.RangeRequest(key=_b(check_key(key))))
        return _kv(r.kvs[0]) if r.kvs else None

    def get_with_identity(self, key: str) -> tuple[KeyValue | None, StoreIdentity]:
        """The response header names the cluster (etcd's cluster ID) and its revision."""
        r = self._call("kvstub", "Range", etcdrpc.RangeRequest(key=_b(check_key(key))))
        identity = StoreIdentity(f"{r.header.cluster_id:x}", int(r.header.revision))
        return (_kv(r.kvs[0]) if r.kvs else None), identity

    def list_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """All keys under `prefix`, paged, every page read at the first page's revision."""
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be str, not {type(prefix).__name__}")
        start = _b(prefix) or b"\0"
        end = prefix_range_end(_b(prefix)) or b"\0"
        out: list[KeyValue] = []
        revision = 0
        while True:
            r = self._call(
                "kvstub",
                "Range",
                etcdrpc.RangeRequest(key=start, range_end=end, limit=LIST_PAGE, revision=revision),
            )
            revision = revision or r.header.revision
            out.extend(_kv(kv) for kv in r.kvs)
            if not r.more or not r.kvs:
                return out, revision
            start = r.kvs[-1].key + b"\0"

    def txn(self, compares: Sequence[Compare], ops: Sequence[Put | Delete]) -> TxnResult:
        check_txn(compares, ops)
        request = etcdrpc.TxnRequest(
            compare=[self._compare(c) for c in compares],
            success=[self._op(op) for op in ops],
        )
        r = self._call("kvstub", "Txn", request)
        return TxnResult(r.succeeded, r.header.revision)

    @staticmethod
    def _compare(c: Compare) -> Any:
        if c.mod_revision == 0:  # absent: etcd's create_revision == 0 idiom
            return etcdrpc.Compare(
                result=etcdrpc.Compare.EQUAL,
                target=etcdrpc.Compare.CREATE,
                key=_b(c.key),
                create_revision=0,
            )
        return etcdrpc.Compare(
            result=etcdrpc.Compare.EQUAL,
            target=etcdrpc.Compare.MOD,
            key=_b(c.key),
            mod_revision=c.mod_revision,
        )

    @staticmethod
    def _op(op: Put | Delete) -> Any:
        if isinstance(op, Put):
            return etcdrpc.RequestOp(
                request_put=etcdrpc.PutRequest(key=_b(op.key), value=op.value, lease=op.lease)
            )
        return etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=_b(op.key)))

    def delete(self, key: str) -> bool:
        """Native: etcd reports how many keys a delete removed."""
        r = self._call("kvstub", "DeleteRange", etcdrpc.DeleteRangeRequest(key=_b(check_key(key))))
        return bool(r.deleted)

    def revision(self) -> int:
        r = self._call("kvstub", "Range", etcdrpc.RangeRequest(key=b"\0", count_only=True))
        return int(r.header.revision)

    # ---- leases -----------------------------------------------------------------------------
    def grant_lease(self, ttl: float) -> int:
        if not isinstance(ttl, int | float) or ttl <= 0:
            raise ValueError(f"lease TTL must be > 0 seconds, not {ttl!r}")
        r = self._call("leasestub", "LeaseGrant", etcdrpc.LeaseGrantRequest(TTL=math.ceil(ttl)))
        if r.error:
            raise StoreError(f"etcd refused a lease: {r.error}")
        return int(r.ID)

    def refresh_lease(self, lease_id: int) -> float:
        """One keepalive on a short-lived stream; etcd answers TTL 0 for an unknown lease."""
        check_lease_id(lease_id)
        stub = self._stub("leasestub")
        try:
            stream = stub.LeaseKeepAlive(
                iter([etcdrpc.LeaseKeepAliveRequest(ID=lease_id)]), call_timeout(self.timeout)
            )
            response = next(iter(stream), None)
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        if response is None:
            raise StoreUnavailable("etcd closed the keepalive stream without an answer")
        if response.TTL <= 0:
            raise LeaseNotFound(f"lease {lease_id:x} not found")
        return float(response.TTL)

    def revoke_lease(self, lease_id: int) -> None:
        check_lease_id(lease_id)
        self._call("leasestub", "LeaseRevoke", etcdrpc.LeaseRevokeRequest(ID=lease_id))

    def lease_ttl_remaining(self, lease_id: int) -> float | None:
        """etcd truncates to whole seconds, so a live lease can read 0: answer the middle of the
        second it is in (capped at the granted TTL) rather than claim it is already over."""
        check_lease_id(lease_id)
        r = self._call("leasestub", "LeaseTimeToLive", etcdrpc.LeaseTimeToLiveRequest(ID=lease_id))
        if r.TTL < 0:
            return None
        return min(r.TTL + 0.5, float(r.grantedTTL))

    # ---- watch ------------------------------------------------------------------------------
    def watch_prefixes(
        self, prefixes: Sequence[str], start_revision: int, stop: threading.Event
    ) -> Iterator[WatchEvent]:
        """One Watch stream with one watcher per prefix (see StoreBase.watch_prefixes).

        Returns once etcd has confirmed every watcher (a "created" answer each, within the RPC
        timeout), so a watcher etcd refused is an error here, never a prefix silently unwatched.
        Completeness does not hinge on it: every watcher starts at the explicit revision, so a
        change made while they are being created is replayed from history anyway.
        """
        ranges = check_prefixes(prefixes)
        start_revision = check_start_revision(start_revision)
        # "From now" is fixed here, not when the stream opens: a change made between this call
        # and the watchers' creation must still be seen.
        start_revision = start_revision or self.revision() + 1
        requests = [
            etcdrpc.WatchRequest(
                create_request=etcdrpc.WatchCreateRequest(
                    key=_b(prefix) or b"\0",
                    range_end=prefix_range_end(_b(prefix)) or b"\0",
                    start_revision=start_revision,
                )
            )
            for prefix in ranges
        ]
        return self._watch(requests, start_revision, stop)

    def _watch(
        self, requests: list[Any], start_revision: int, stop: threading.Event
    ) -> Iterator[WatchEvent]:
        ended = threading.Event()  # the stream is over: the send side closes, the helper returns
        confirmed = threading.Event()

        def send() -> Iterator[Any]:
            yield from requests
            ended.wait()  # keep the send side open: a half-close ends the watch

        call = self._stub("watch").Watch(send())
        deadline = time.monotonic() + call_timeout(self.timeout)
        threading.Thread(
            target=self._cancel_on,
            args=(stop, ended, confirmed, deadline, call),
            name="etcd-watch-stop",
            daemon=True,
        ).start()
        responses = iter(call)
        early: list[WatchEvent] = []  # events of a watcher etcd created before the last one
        created = 0
        try:
            while created < len(requests):
                response = next(responses, None)
                if response is None:
                    raise StoreUnavailable("etcd ended the watch stream before creating it")
                self._check(response, start_revision)
                created += response.created
                early.extend(self._events(response))
        except grpc.RpcError as exc:
            _end(call, ended)
            if stop.is_set():
                return iter(())
            error = self._error(exc)  # a transient one also moves the client to another endpoint
            if time.monotonic() >= deadline:
                raise StoreUnavailable("etcd did not confirm the watch in time") from exc
            raise error from exc
        except BaseException:
            _end(call, ended)
            raise
        confirmed.set()
        events = self._follow(call, responses, early, start_revision, stop, ended)
        weakref.finalize(events, _end, call, ended)  # dropped unread: the stream ends too
        return events

    def _follow(
        self,
        call: Any,
        responses: Iterator[Any],
        early: list[WatchEvent],
        start_revision: int,
        stop: threading.Event,
        ended: threading.Event,
    ) -> Iterator[WatchEvent]:
        try:
            yield from early
            for response in responses:
                self._check(response, start_revision)
                yield from self._events(response)
        except grpc.RpcError as exc:
            if not stop.is_set():
                raise self._error(exc) from exc
        finally:
            _end(call, ended)

    @staticmethod
    def _check(response: Any, start_revision: int) -> None:
        """Any one watcher compacted or cancelled ends the whole watch, as one watcher would."""
        if response.compact_revision:
            raise WatchCompacted(start_revision, response.compact_revision - 1)
        if response.canceled:
            raise StoreUnavailable(f"etcd cancelled the watch: {response.cancel_reason}")

    @staticmethod
    def _events(response: Any) -> Iterator[WatchEvent]:
        for ev in response.events:
            kind = "delete" if ev.type == kv_pb2.Event.DELETE else "put"
            yield WatchEvent(
                kind,
                ev.kv.key.decode("utf-8", errors="surrogateescape"),
                b"" if kind == "delete" else bytes(ev.kv.value),
                ev.kv.mod_revision,
            )

    @staticmethod
    def _cancel_on(
        stop: threading.Event,
        ended: threading.Event,
        confirmed: threading.Event,
        deadline: float,
        call: Any,
    ) -> None:
        """Cancel the stream when `stop` is set or etcd has not confirmed it by `deadline`;
        ending it also releases the send side, even if the iterator is never read again."""
        while not ended.is_set():
            if stop.wait(0.1) or (not confirmed.is_set() and time.monotonic() >= deadline):
                _end(call, ended)
                return

    # ---- lifecycle --------------------------------------------------------------------------
    def ping(self) -> None:
        self.revision()

    def compact(self, revision: int) -> None:
        """Discard history below `revision` (etcd Compact); tests use it for WatchCompacted."""
        self._call("kvstub", "Compact", etcdrpc.CompactionRequest(revision=revision, physical=True))

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._client.close()


def _end(call: Any, ended: threading.Event) -> None:
    """Cancel a watch stream and release its send side (idempotent)."""
    ended.set()
    call.cancel()


def parse_endpoints(spec: str) -> list[tuple[str, int]]:
    """`host:port[,host:port...]` -> [(host, port)]; a clear ValueError for anything else."""
    endpoints = []
    for part in spec.split(","):
        host, sep, port = part.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad etcd endpoint {part!r}: expected host:port")
        endpoints.append((host, int(port)))
    return endpoints
