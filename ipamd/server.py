"""The gRPC server, with the standard health service, on a root-only unix socket: the private one
that ipamd/grpc_gate.py relays root's connections to (grpc-python cannot check the peer's uid).

Services: moor.ipam.v1.Ipam (this node's IPAM), moor.ipam.v1.Admin (cluster-wide operations,
answered also while the node waits for `moorctl network init`) and grpc.health.v1.Health.

Health: SERVING while the node can serve ADD (store reachable and a subnet lease held), else
NOT_SERVING; a timer in the daemon keeps it current.
"""

from __future__ import annotations

import os
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ipamd.admin import AdminServicer
from ipamd.api.v1 import ipam_pb2_grpc
from ipamd.service import IpamServicer

SERVICE_NAME = "moor.ipam.v1.Ipam"


class GrpcServer:
    def __init__(
        self,
        socket_path: str,
        servicer: IpamServicer,
        admin: AdminServicer | None = None,
        workers: int = 8,
    ) -> None:
        self.socket_path = socket_path
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc")
        )
        ipam_pb2_grpc.add_IpamServicer_to_server(servicer, self.server)
        if admin is not None:
            ipam_pb2_grpc.add_AdminServicer_to_server(admin, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.socket_path), mode=0o700, exist_ok=True)
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        old = os.umask(0o077)  # the socket file is created 0600: root only
        try:
            self.server.add_insecure_port(f"unix:{self.socket_path}")
            self.server.start()
        finally:
            os.umask(old)

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def stop(self, grace: float = 2.0) -> None:
        self.server.stop(grace).wait()
