"""Issue 15: the store's schema version. A daemon refuses a store whose schema is newer than it
knows, with one clear line; it moves an older store forward once, in place, under a store lock,
also when several daemons start on it at once (real etcd)."""

from __future__ import annotations

import json
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ipamd.network_config import SCHEMA_VERSION
from ipamd.store.keys import Keys
from ipamd.store.open import open_store
from tests.conftest import start_daemon
from tests.helpers.etcd import EtcdServer
from tests.helpers.moor import Daemon

pytestmark = pytest.mark.netns

NETWORK = "10.215.0.0/16"
OLD_CONFIG = {"network": NETWORK, "subnetLen": 24, "backend": "host-gw", "clusterID": "c0ffee"}


def write_config(url: str, prefix: str, config: dict) -> None:
    with open_store(url) as store:
        store.put(Keys(prefix).config(), json.dumps(config).encode())


def read_config(url: str, prefix: str) -> dict:
    with open_store(url) as store:
        kv = store.get(Keys(prefix).config())
        assert kv is not None
        assert store.get(prefix + "/locks/schema") is None  # the lock is gone again
        return json.loads(kv.value)


def test_a_store_with_a_newer_schema_is_refused_with_one_clear_line(tmp_path: Path) -> None:
    workdir = tmp_path / "msc1"
    workdir.mkdir()
    write_config(f"sqlite://{workdir}/store.db", "/moor", {**OLD_CONFIG, "schemaVersion": 99})
    d = Daemon(workdir=workdir, name="msc1", network=NETWORK, bridge="mscbr1")
    try:
        with pytest.raises(RuntimeError, match="exited 1") as err:
            d.start()
        assert (
            f"the store's schema is version 99, this moor-ipamd knows up to {SCHEMA_VERSION}"
            in str(err.value)
        )
    finally:
        d.cleanup_host()


def test_an_older_store_is_moved_forward_once_in_place(tmp_path: Path) -> None:
    workdir = tmp_path / "msc2"
    workdir.mkdir()
    url = f"sqlite://{workdir}/store.db"
    write_config(url, "/moor", OLD_CONFIG)  # no schemaVersion: version 1
    d = start_daemon(workdir, "msc2", NETWORK, "mscbr2")
    try:
        assert d.status()["ready"]
        config = read_config(url, "/moor")
        assert config["schemaVersion"] == SCHEMA_VERSION
        assert config["clusterID"] == "c0ffee" and config["network"] == NETWORK  # kept
        assert d.log_path.read_text().count("moved the store's schema from version 1") == 1
    finally:
        d.cleanup_host()


def test_daemons_starting_together_move_the_store_once(
    tmp_path: Path, etcd_server: EtcdServer
) -> None:
    prefix = f"/msc-{secrets.token_hex(4)}"
    write_config(etcd_server.url, prefix, OLD_CONFIG)
    daemons = [
        Daemon(
            workdir=tmp_path / f"msc{i}",
            name=f"msc{i}",
            network=NETWORK,
            bridge=f"mscbr{i}",
            store_url=etcd_server.url,
            key_prefix=prefix,
        )  # fmt: skip
        for i in (3, 4, 5)
    ]
    try:
        with ThreadPoolExecutor(len(daemons)) as pool:
            list(pool.map(lambda d: d.start(), daemons))
        assert read_config(etcd_server.url, prefix)["schemaVersion"] == SCHEMA_VERSION
        moved = sum(d.log_path.read_text().count("moved the store's schema") for d in daemons)
        assert moved == 1
    finally:
        for d in daemons:
            d.cleanup_host()
