"""The frame of a bench part that runs entirely in netns (cluster, fixed): measure, always tear
down (also on Ctrl-C or SIGTERM), check the host was left as found, print the table, and write
the part's BENCHMARKS.md section only when every measurement succeeded.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from bench import report
from bench.harness import IP_FORWARD, no_interrupts, sigterm_as_interrupt

Progress = Callable[[str], None]


class PartFigures(Protocol):
    failures: list[str]
    warnings: list[str]


def run_netns_part(
    what: str,
    fig: PartFigures,
    run: Callable[[Any, Path, Progress], None],
    part_report: ModuleType,
    env: Callable[[], dict[str, str]],
    *,
    workdir_prefix: str,
    no_write: bool,
    command: str,
    say: Progress,
) -> int:
    """Exit status as the other parts: 0 measured and clean, 1 failed, 130 interrupted.
    `part_report` has rows, HEADER, details, section, START and END."""
    status = 0
    workdir = Path(tempfile.mkdtemp(prefix=workdir_prefix))
    forward_before = IP_FORWARD.read_text()  # everything is in netns: a check
    try:
        with sigterm_as_interrupt():
            run(fig, workdir, say)
    except KeyboardInterrupt:
        say("interrupted")
        status = 130
    except Exception as exc:  # noqa: BLE001 - reported after the clean-up
        say(f"{what} bench failed: {exc!r}")
        status = 1
    finally:
        with no_interrupts():
            shutil.rmtree(workdir, ignore_errors=True)
            if IP_FORWARD.read_text() != forward_before:
                IP_FORWARD.write_text(forward_before)
                fig.failures.append("the host's net.ipv4.ip_forward changed (put back)")
            say(f"{what} part cleaned up")
    table = part_report.rows(fig)
    print()
    print(report.text_table(table, part_report.HEADER))
    for line in part_report.details(fig):
        print(f"  {line}")
    if fig.warnings:
        print(f"\nmoor-ipamd logged {len(fig.warnings)} warning(s)/error(s); the first ones:")
        for line in fig.warnings[:5]:
            print(f"  {line[:300]}")
    for failure in fig.failures:
        print(failure, file=sys.stderr)
    status = status or (1 if fig.failures else 0)
    if no_write or status:
        print(f"\nBENCHMARKS.md {what} section not updated")
        return status
    section = part_report.section(fig, table, {**report.environment(), **env()}, command)
    report.write_benchmarks(section, markers=(part_report.START, part_report.END))
    print(f"\nwrote the {what} section of {report.BENCHMARKS}")
    return 0
