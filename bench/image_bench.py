"""`python -m bench.image_bench`: the node image's build time, size and start-to-ready time.

Not a part of `python -m bench` (it does not write BENCHMARKS.md; the figures there are copied
from its output by hand). What it measures:
- build: `ensure_image` (image/build.py, `make image`'s code) on the shared cache, cached or not
  as the cache stands; with `--cold`, again on an empty cache of its own (mmdebstrap, the Python
  packages from the index, everything), removed afterwards;
- size: podman's image size (the layers unpacked), the docker-archive `make image --archive`
  writes, and that archive gzipped (about what a registry transfers);
- start to ready, `--runs` times, alternating with moor-ipamd run from the checkout as a plain
  process (same interpreter, same flags, same etcd): from just before `podman run` (or the
  spawn) until `Ipam.Status` answers ready over the mounted socket, polled every 5 ms in process.
  Each start is a node's first: a fresh key prefix in etcd and an empty state dir.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import grpc

from image import build
from ipamd.api.v1 import ipam_pb2, ipam_pb2_grpc
from tests.helpers.etcd import EtcdServer
from tests.helpers.image_node import ImageNode
from tests.helpers.moor import Daemon
from tests.helpers.podman import mounts_under

NETWORK = "10.212.0.0/16"


def ready_after(socket: str, t0: float, alive: Callable[[], bool], timeout: float = 60.0) -> float:
    """Seconds from `t0` until Ipam.Status on `socket` answers ready."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(socket):
        if not alive() or time.monotonic() > deadline:
            raise RuntimeError("no gRPC socket")
        time.sleep(0.005)
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        stub = ipam_pb2_grpc.IpamStub(channel)
        while True:
            with contextlib.suppress(grpc.RpcError):
                if stub.Status(ipam_pb2.StatusRequest(), timeout=5).ready:
                    return time.perf_counter() - t0
            if not alive() or time.monotonic() > deadline:
                raise RuntimeError("not ready")
            time.sleep(0.005)


def image_start(built: build.Built, etcd: EtcdServer, workdir: Path, i: int) -> float:
    node = ImageNode(workdir=workdir, image=built.tag, image_store=built.store,
                     container=f"mim-bench-{os.getpid()}-{i}", node_name="mim",
                     store_url=etcd.url, key_prefix=f"/mim-bench-{i}", network=NETWORK,
                     masq_chain="MIM-MASQ")  # fmt: skip
    try:
        t0 = time.perf_counter()
        node.start()
        return ready_after(node.grpc_socket, t0, lambda: node.inspect()["State"]["Running"])
    finally:
        node.cleanup()


def native_start(etcd: EtcdServer, workdir: Path, i: int) -> float:
    daemon = Daemon(workdir=workdir, name="mim", network=NETWORK, bridge="mimbr0",
                    store_url=etcd.url, key_prefix=f"/mim-native-{i}", fault_injection=False,
                    log_level="info")  # fmt: skip
    try:
        t0 = time.perf_counter()
        daemon.spawn()
        proc = daemon.proc
        assert proc is not None
        return ready_after(daemon.grpc_socket, t0, lambda: proc.poll() is None)
    finally:
        daemon.cleanup_host()


def gzip_size(path: Path) -> int:
    """Bytes of `path` gzipped at level 6, streamed."""
    z, out = zlib.compressobj(6, zlib.DEFLATED, 31), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            out += len(z.compress(chunk))
    return out + len(z.flush())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.image_bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="starts of each kind")
    parser.add_argument("--cold", action="store_true", help="also build on an empty cache")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    built = build.ensure_image()
    print(f"shared cache: {'reused' if built.cached else 'built'} in {built.seconds:.1f} s")
    again = build.ensure_image()
    print(f"shared cache, second call: reused={again.cached} in {again.seconds:.2f} s")
    if args.cold:
        cold_cache = Path(tempfile.mkdtemp(prefix="mim-cold-", dir="/var/tmp"))
        try:
            cold = build.ensure_image(cache=cold_cache)
            print(f"cold (empty cache, base included): {cold.seconds:.1f} s")
        finally:
            for mount in reversed(mounts_under(cold_cache)):
                subprocess.run(["umount", "-l", mount], capture_output=True)
            shutil.rmtree(cold_cache, ignore_errors=True)
    archive = build.save_archive(built)
    print(f"size: {built.size / 1e6:.1f} MB (podman), archive {archive.stat().st_size / 1e6:.1f}"
          f" MB, gzipped {gzip_size(archive) / 1e6:.1f} MB")  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="mim-bench-"))
    etcd = EtcdServer(workdir / "etcd")
    etcd.start()
    image_s, native_s = [], []
    try:
        for i in range(args.runs):
            image_s.append(image_start(built, etcd, workdir / f"image-{i}", i))
            native_s.append(native_start(etcd, workdir / f"native-{i}", i))
            print(f"run {i}: image {image_s[-1]:.2f} s, native {native_s[-1]:.2f} s")
    finally:
        etcd.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    for name, xs in (("image", image_s), ("native", native_s)):
        print(f"start to ready, {name}: median {statistics.median(xs):.2f} s, "
              f"min {min(xs):.2f}, max {max(xs):.2f} ({len(xs)} runs)")  # fmt: skip
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
