"""Pick a backend from the `--store` URL, so callers never import a backend directly."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote, urlsplit

from ipamd.store.base import Store


def open_store(url: str, **kw: Any) -> Store:
    """`sqlite:///abs/path.db` or `etcd://host:port[,host:port...]`; `kw` goes to the backend.

    The SQLite parent directory is created 0700 when missing: the state is the node's IPAM
    truth and nothing but the daemon should write it.
    """
    if not isinstance(url, str):
        raise TypeError(f"store URL must be str, not {type(url).__name__}")
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower()
    if sep and scheme == "sqlite":
        return _open_sqlite(url, **kw)
    if sep and scheme == "etcd":
        return _open_etcd(url, **kw)
    raise ValueError(
        f"unsupported store URL {url!r}: expected sqlite:///absolute/path.db or etcd://host:port"
    )


def _open_sqlite(url: str, **kw: Any) -> Store:
    from ipamd.store.sqlite import SqliteStore

    parts = urlsplit(url)
    path = unquote(parts.path)
    if parts.netloc or parts.query or parts.fragment or not os.path.isabs(path):
        raise ValueError(
            f"bad sqlite store URL {url!r}: expected sqlite:///absolute/path.db"
            " (three slashes, absolute path, no host, query or fragment)"
        )
    if path.endswith("/"):
        raise ValueError(f"bad sqlite store URL {url!r}: the path names a directory")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
        os.chmod(parent, 0o700)  # makedirs' mode is filtered by the umask
    return SqliteStore(path, **kw)


def _open_etcd(url: str, **kw: Any) -> Store:
    """TLS options (`ca_file`, `cert_file`, `key_file`) and `timeout` come in `kw`."""
    from ipamd.store.etcd import EtcdStore, parse_endpoints

    rest = url.partition("://")[2]
    if not rest or any(c in rest for c in "/?#@"):
        raise ValueError(
            f"bad etcd store URL {url!r}: expected etcd://host:port[,host:port...]"
            " (the key prefix is --key-prefix, TLS files are --etcd-cafile/certfile/keyfile)"
        )
    try:
        endpoints = parse_endpoints(rest)
    except ValueError as exc:
        raise ValueError(f"bad etcd store URL {url!r}: {exc}") from exc
    return EtcdStore(endpoints, **kw)
