"""The CNI protocol layer: env + stdin in, (exit code, stdout, stderr) out. No netlink, no store.

It takes the environment and stdin as values so tests drive it without a process, and the daemon
drives it with what the shim forwarded. It owns the protocol rules: which env each verb needs, the
version gates (CHECK >= 0.4.0, GC and STATUS >= 1.1.0), and turning every failure into the spec's
error JSON on stdout. A bug becomes code 999 with the traceback on stderr, never a half-written
stdout.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from cni_plugin.args import CniArgs, parse_cni_args
from cni_plugin.errors import (
    DECODING_FAILURE,
    INCOMPATIBLE_VERSION,
    INTERNAL,
    INVALID_ENVIRONMENT,
    CNIError,
    brief,
    to_cni_error,
)
from cni_plugin.naming import container_id_problem, ifname_problem, is_unicode_text
from cni_plugin.netconf import (
    SUPPORTED_VERSIONS,
    NetConf,
    config_version,
    decode_config,
    parse_netconf,
    version_tuple,
)
from cni_plugin.result import Result

VERBS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")
REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "GC": (),
    "STATUS": (),
}
# The env values the daemon reads (CNI_PATH is not: moor execs nothing).
ENV_KEYS = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS")
ABOUT = "moor CNI plugin (bridge datapath + node IPAM daemon)"


@dataclass(frozen=True)
class Attachment:
    container_id: str
    ifname: str


@dataclass
class Request:
    """One CNI call, validated. `netns_fd` is the pod netns opened by the shim, if it could."""

    command: str
    container_id: str
    netns: str
    ifname: str
    args: CniArgs
    conf: NetConf
    netns_fd: int | None = None
    netns_errno: int = 0
    # GC only: None when the runtime sent no attachments key at all.
    valid_attachments: frozenset[Attachment] | None = None
    env: Mapping[str, str] = field(default_factory=dict)


class Handlers(Protocol):
    def add(self, req: Request) -> Result: ...
    def delete(self, req: Request) -> None: ...
    def check(self, req: Request) -> None: ...
    def status(self, req: Request) -> None: ...
    def gc(self, req: Request) -> None: ...


@dataclass
class Reply:
    code: int
    stdout: bytes = b""
    stderr: bytes = b""


def version_reply() -> bytes:
    """VERSION ignores stdin and answers with the newest version, as the reference skel does."""
    return _dump(
        {"cniVersion": SUPPORTED_VERSIONS[-1], "supportedVersions": list(SUPPORTED_VERSIONS)}
    )


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=4) + "\n").encode()


def _check_env(command: str, env: Mapping[str, str]) -> None:
    """Every CNI_* value the daemon reads is UTF-8 text and valid for its verb; else code 4."""
    for key in ENV_KEYS:
        value = env.get(key, "")
        if not is_unicode_text(value):
            raise CNIError(INVALID_ENVIRONMENT, f"{key} {value!r} is not valid UTF-8")
    missing = [k for k in REQUIRED_ENV[command] if not env.get(k)]
    if missing:
        raise CNIError(INVALID_ENVIRONMENT, f"required env variables [{','.join(missing)}] missing")
    container_id = env.get("CNI_CONTAINERID", "")
    if container_id and (problem := container_id_problem(container_id)):
        raise CNIError(INVALID_ENVIRONMENT, f"CNI_CONTAINERID: {problem}")
    ifname = env.get("CNI_IFNAME", "")
    if command in ("ADD", "CHECK", "DEL") and (problem := ifname_problem(ifname)):
        raise CNIError(INVALID_ENVIRONMENT, f"CNI_IFNAME: {problem}")


def _valid_attachments(data: dict[str, Any]) -> frozenset[Attachment] | None:
    """GC's attachment list: a list of {"containerID": str, "ifname": str} (code 6 otherwise).

    null is what libcni sends for an empty Go slice, so it is the empty list."""
    for key in ("cni.dev/valid-attachments", "cni.dev/attachments"):
        if key in data:
            items = data[key]
            if items is None:
                return frozenset()
            if not isinstance(items, list):
                raise CNIError(DECODING_FAILURE, f"{key} must be a list")
            out = set()
            for item in items:
                cid = item.get("containerID") if isinstance(item, dict) else None
                ifname = item.get("ifname") if isinstance(item, dict) else None
                if not isinstance(cid, str) or not isinstance(ifname, str):
                    raise CNIError(
                        DECODING_FAILURE,
                        f"malformed {key} entry {brief(item)}: "
                        "containerID and ifname must be strings",
                    )
                out.add(Attachment(cid, ifname))
            return frozenset(out)
    return None


@dataclass(frozen=True)
class Stdin:
    """stdin decoded exactly once: the config object, or the reason it is not one.

    Decoding never raises, so an error found later (even in the env) is stamped with the version
    the request asked for, without parsing hostile input a second time outside any guard.
    """

    data: dict[str, Any] | None
    error: CNIError | None = None

    @classmethod
    def decode(cls, raw: bytes) -> Stdin:
        try:
            return cls(decode_config(raw))
        except CNIError as exc:
            return cls(None, exc)

    @property
    def version(self) -> str:
        """The version to stamp on an error: the config's when moor speaks it, else the newest."""
        version = self.data.get("cniVersion") if self.data is not None else None
        return version if version in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[-1]


def parse_request(
    env: Mapping[str, str],
    stdin: bytes | Stdin,
    netns_fd: int | None = None,
    netns_errno: int = 0,
) -> Request:
    """Validate env and config for a non-VERSION verb; raises CNIError with the spec's code."""
    command = env.get("CNI_COMMAND", "")
    if command not in REQUIRED_ENV:
        raise CNIError(INVALID_ENVIRONMENT, f"unknown CNI_COMMAND: {command!r}")
    _check_env(command, env)
    config = stdin if isinstance(stdin, Stdin) else Stdin.decode(stdin)
    if config.error is not None:
        raise config.error
    assert config.data is not None
    data = config.data
    cni_version = config_version(data)
    minimum = {"CHECK": (0, 4, 0), "GC": (1, 1, 0), "STATUS": (1, 1, 0)}.get(command)
    if minimum and version_tuple(cni_version) < minimum:
        raise CNIError(
            INCOMPATIBLE_VERSION,
            f"config version does not allow {command}",
            f"config is {cni_version}, {command} needs {'.'.join(map(str, minimum))} or later",
        )
    conf = parse_netconf(data, cni_version)
    args = (
        parse_cni_args(env.get("CNI_ARGS", "")) if command in ("ADD", "DEL", "CHECK") else CniArgs()
    )
    return Request(
        command=command,
        container_id=env.get("CNI_CONTAINERID", ""),
        netns=env.get("CNI_NETNS", ""),
        ifname=env.get("CNI_IFNAME", ""),
        args=args,
        conf=conf,
        netns_fd=netns_fd,
        netns_errno=netns_errno,
        valid_attachments=_valid_attachments(data) if command == "GC" else None,
        env=env,
    )


def run(
    env: Mapping[str, str],
    stdin: bytes,
    handlers: Handlers,
    netns_fd: int | None = None,
    netns_errno: int = 0,
) -> Reply:
    """Run one CNI call end to end and return what the executable must print and exit with.

    One except clause for everything: `to_cni_error` decides the code (errors.py ERROR_TABLE).
    """
    command = env.get("CNI_COMMAND", "")
    if not command:
        about = f"{ABOUT}\nCNI protocol versions supported: {', '.join(SUPPORTED_VERSIONS)}\n"
        return Reply(0, b"", about.encode())
    if command == "VERSION":
        return Reply(0, version_reply())
    stamp = SUPPORTED_VERSIONS[-1]
    try:
        config = Stdin.decode(stdin)
        stamp = config.version
        req = parse_request(env, config, netns_fd, netns_errno)
        if req.command == "ADD":
            result = handlers.add(req)
            if req.conf.mode == "main":
                result = result.merged_after(req.conf.prev_result)  # chained: pass prevResult on
            rendered = result.render(req.conf.cni_version, abbreviated=req.conf.mode == "ipam")
            return Reply(0, _dump(rendered))
        {
            "DEL": handlers.delete,
            "CHECK": handlers.check,
            "STATUS": handlers.status,
            "GC": handlers.gc,
        }[req.command](req)
        return Reply(0)
    except Exception as exc:  # noqa: BLE001 - the protocol boundary: every failure must become JSON
        err = to_cni_error(exc)
        trace = b""
        if err.code == INTERNAL and not isinstance(exc, CNIError):
            trace = traceback.format_exc().encode("utf-8", "backslashreplace")
        return Reply(1, _dump(err.to_dict(stamp)), trace)
