"""The import rules of the code base, read from the source with `ast` (nothing is imported).

- bin/moor, the CNI executable, imports only modules built into its interpreter: every exec pays
  for every import, and the host may have no Python packages at all.
- the static shim (shim/, built to build/moor for hosts without Python) uses Go's standard library
  only and no cgo: it builds offline and needs nothing on the host, not even a C library.
- only cni_plugin/datapath/nl.py imports pyroute2: one place owns sockets, dump retries and errno
  translation.
- cni_plugin never imports ipamd: the CNI layer owns its IPAM port (cni_plugin/ipam.py) and the
  daemon implements it.
- moorctl (ipamd/cli.py, ipamd/cli_*.py) never imports the store: it is a gRPC client, whatever
  the store is.
- the store imports nothing else of the daemon: it is the bottom layer.
- only the gRPC servicers, the server, the CLI and the generated stubs import the generated code.
Every import counts, also one under `if TYPE_CHECKING:` or inside a function.
"""

from __future__ import annotations

import ast
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIM = REPO / "bin" / "moor"
GO_SHIM = REPO / "shim"
PACKAGES = ("cni_plugin", "ipamd")
GENERATED = "ipamd/api/v1/"


def imports_of(path: Path) -> Iterator[str]:
    """Every module `path` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                yield f"{base}.{node.module}" if node.module else base
            else:
                yield node.module or ""


def sources(*roots: str) -> list[Path]:
    return sorted(
        p
        for root in roots
        for p in (REPO / root).rglob("*.py")
        if not str(p.relative_to(REPO)).startswith(GENERATED)
    )


def offenders(paths: list[Path], forbidden: str) -> list[str]:
    return [
        f"{p.relative_to(REPO)} imports {name}"
        for p in paths
        for name in imports_of(p)
        if name == forbidden or name.startswith(forbidden + ".")
    ]


def test_the_rules_see_every_kind_of_import(tmp_path: Path) -> None:
    """The reader itself: plain, from, relative, nested and TYPE_CHECKING imports all count."""
    pkg = REPO / "cni_plugin" / "datapath"
    sample = pkg / "_arch_probe.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\nimport a.b\nfrom .nl import x\nfrom .. import skel\n"
        "if TYPE_CHECKING:\n    from ipamd.node import NodeIpam\n"
        "def f():\n    import pyroute2\n"
    )
    try:
        found = set(imports_of(sample))
    finally:
        sample.unlink()
    assert {"a.b", "cni_plugin.datapath.nl", "cni_plugin", "ipamd.node", "pyroute2"} <= found


def test_shim_imports_only_interpreter_builtins() -> None:
    interpreter = SHIM.read_text().splitlines()[0].removeprefix("#!").split()[0]
    builtins = subprocess.run(
        [interpreter, "-S", "-c", "import sys; print(' '.join(sys.builtin_module_names))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    tree = ast.parse(SHIM.read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported, "the reader found no import in bin/moor"
    assert imported <= set(builtins), f"not built into {interpreter}: {imported - set(builtins)}"


def go_imports(path: Path) -> set[str]:
    """The import paths of one Go file (single imports and import blocks)."""
    text = path.read_text()
    found = set(re.findall(r'^import\s+(?:\w+\s+)?"([^"]+)"', text, re.MULTILINE))
    for block in re.findall(r"^import \((.*?)^\)", text, re.MULTILINE | re.DOTALL):
        found |= set(re.findall(r'^\s*(?:\w+\s+)?"([^"]+)"', block, re.MULTILINE))
    return found


def test_the_static_shim_uses_only_the_go_standard_library_and_no_cgo() -> None:
    sources = sorted(GO_SHIM.glob("*.go"))
    imported = set().union(*(go_imports(p) for p in sources))
    assert {"syscall", "os/signal"} <= imported, "the reader found the shim's imports"
    assert "C" not in imported, "cgo: the binary would need the host's C library"
    # a standard-library path has no dot in its first element; a module's does (github.com/...)
    assert {i for i in imported if "." in i.split("/")[0]} == set()
    assert "require" not in (GO_SHIM / "go.mod").read_text()
    assert "export CGO_ENABLED=0" in (GO_SHIM / "build.sh").read_text()


def test_only_the_netlink_module_imports_pyroute2() -> None:
    paths = [p for p in sources(*PACKAGES) if p != REPO / "cni_plugin/datapath/nl.py"]
    assert offenders(paths, "pyroute2") == []


def test_cni_plugin_never_imports_the_daemon() -> None:
    assert offenders(sources("cni_plugin"), "ipamd") == []


def test_moorctl_never_imports_the_store() -> None:
    moorctl = [REPO / "ipamd/cli.py", *sorted((REPO / "ipamd").glob("cli_*.py"))]
    assert len(moorctl) > 1 and offenders(moorctl, "ipamd.store") == []


LEAVES = ("cni_plugin.naming", "cni_plugin.iptypes")  # the one home of names and IP types


def test_the_store_imports_nothing_above_it() -> None:
    """ipamd/store is the bottom layer: of the project it may use only itself and the leaf
    modules that hold the naming rules and IP types, which import nothing of the project."""
    found = [
        f"{p.relative_to(REPO)} imports {name}"
        for p in sources("ipamd/store")
        for name in imports_of(p)
        if name.split(".")[0] in PACKAGES and not name.startswith(("ipamd.store", *LEAVES))
    ]
    assert found == []
    for leaf in LEAVES:
        path = REPO / (leaf.replace(".", "/") + ".py")
        assert [n for n in imports_of(path) if n.split(".")[0] in PACKAGES] == [], leaf


def test_only_the_grpc_edges_import_generated_code() -> None:
    edges = {
        "ipamd/service.py",
        "ipamd/admin.py",
        "ipamd/admin_fixed.py",
        "ipamd/server.py",
        "ipamd/cli.py",
        "ipamd/cli_fixed.py",
        "ipamd/cli_cluster.py",
        "ipamd/cli_health.py",
    }
    paths = [p for p in sources(*PACKAGES) if str(p.relative_to(REPO)) not in edges]
    assert offenders(paths, "ipamd.api") == []
