"""A paced two-way UDP stream between two pod netns, counting every datagram by its sequence
number, for tests that must show a change (a daemon restart) dropped nothing.

Each end is one `ip netns exec NS /usr/bin/python3 -S -c STREAM` process (as in traffic.py): it
binds its port, says "ready", and on "go" sends one numbered datagram every `interval` seconds to
the other end (paced on a fixed schedule, so a stall is caught up, not skipped) while a thread
records every arrival. On "stop" it stops sending, keeps receiving until the line has been quiet
for QUIET seconds, and prints what it sent and received. A send the kernel refuses (say the route
is gone: ENETUNREACH) is counted as an error, never retried. Both processes are killed by PID on
exit whatever happened.
"""

from __future__ import annotations

import json
import select
import subprocess
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from tests.helpers.traffic import PYTHON, in_netns

STREAM_PORT = 7788
QUIET = 0.5  # seconds without an arrival after "stop" before an end reports

STREAM = r"""
import json, socket, struct, sys, threading, time
port, peer, peer_port, interval, quiet = sys.argv[1:6]
port, peer_port, interval, quiet = int(port), int(peer_port), float(interval), float(quiet)
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
r.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: a slow reader never drops
r.bind(("0.0.0.0", port))
r.settimeout(0.05)
w = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # blocking: a full buffer waits, never fails
seqs, last, silence = [], [time.monotonic()], [0.0]
done = threading.Event()
def receive():
    while not done.is_set():
        try:
            data = r.recv(2048)
        except socket.timeout:
            continue
        now = time.monotonic()
        if seqs:
            silence[0] = max(silence[0], now - last[0])
        last[0] = now
        seqs.append(struct.unpack("!Q", data[:8])[0])
threading.Thread(target=receive, daemon=True).start()
print("ready", flush=True)
assert sys.stdin.readline().strip() == "go"
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
sent, errors, start, pad = 0, {}, time.monotonic(), b"\0" * 56
while not stop.is_set():
    try:
        w.sendto(struct.pack("!Q", sent) + pad, (peer, peer_port))
    except OSError as e:
        errors[str(e)] = errors.get(str(e), 0) + 1
    sent += 1
    delay = start + sent * interval - time.monotonic()
    if delay > 0:
        time.sleep(delay)
stopped = time.monotonic()
while time.monotonic() - max(last[0], stopped) < quiet and time.monotonic() - stopped < 10:
    time.sleep(quiet / 5)
done.set()
print(json.dumps({"sent": sent, "errors": errors, "seqs": seqs, "silence": silence[0]}), flush=True)
"""


@dataclass(frozen=True)
class Direction:
    """What one end sent and the other received, judged by sequence number."""

    src: str
    dst: str
    sent: int
    send_errors: dict[str, int]
    missing: list[int]  # sent and never received
    duplicates: int
    reordered: int  # arrived after a higher number: counted, not lost
    longest_silence_ms: float  # the longest time between two arrivals

    def problems(self) -> list[str]:
        """One line per kind of damage; [] when every datagram arrived exactly once."""
        where = f"{self.src} -> {self.dst}"
        out = []
        if self.sent == 0:
            out.append(f"{where}: nothing was sent")
        if self.missing:
            out.append(f"{where}: {len(self.missing)} of {self.sent} lost: {spans(self.missing)}")
        if self.duplicates:
            out.append(f"{where}: {self.duplicates} duplicated")
        if self.send_errors:
            out.append(f"{where}: sends refused: {self.send_errors}")
        return out


def spans(numbers: list[int]) -> str:
    """1,2,3,7 as "1-3, 7" (at most 10 spans), so a gap reads as when and how long."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    text = [f"{a}-{b}" if a != b else str(a) for a, b in runs[:10]]
    return ", ".join(text) + (f" (+{len(runs) - 10} more)" if len(runs) > 10 else "")


def judge(src: str, dst: str, sender: dict[str, Any], receiver: dict[str, Any]) -> Direction:
    seqs = receiver["seqs"]
    highest, reordered = -1, 0
    for seq in seqs:
        reordered += seq < highest
        highest = max(highest, seq)
    return Direction(
        src=src,
        dst=dst,
        sent=sender["sent"],
        send_errors=sender["errors"],
        missing=sorted(set(range(sender["sent"])) - set(seqs)),
        duplicates=len(seqs) - len(set(seqs)),
        reordered=reordered,
        longest_silence_ms=round(receiver["silence"] * 1000, 1),
    )


class UdpStream:
    """`with UdpStream(("ns-a", "10.x.1.2"), ("ns-b", "10.x.2.2")) as s:` streams both ways from
    the `with` on; `s.stop()` ends it and returns the two directions."""

    def __init__(
        self, a: tuple[str, str], b: tuple[str, str], interval: float = 0.001,
        port: int = STREAM_PORT,
    ) -> None:  # fmt: skip
        self.ends = (a[0], b[0])
        self.procs: list[subprocess.Popen] = []
        for (netns, _), (_, peer_ip) in ((a, b), (b, a)):
            argv = [PYTHON, "-S", "-c", STREAM, str(port), peer_ip, str(port), str(interval)]
            self.procs.append(
                subprocess.Popen(
                    in_netns(netns, *argv, str(QUIET)),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )

    def __enter__(self) -> UdpStream:
        try:
            for proc in self.procs:  # both bound before either sends: nothing meets a closed port
                self._expect(proc, "ready", 10.0)
            self._tell("go")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def stop(self) -> tuple[Direction, Direction]:
        """Stop sending, let the last datagrams land; (a -> b, b -> a)."""
        self._tell("stop")
        a, b = (json.loads(self._expect(proc, "", 30.0)) for proc in self.procs)
        na, nb = self.ends
        return judge(na, nb, a, b), judge(nb, na, b, a)

    def _tell(self, line: str) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(line + "\n")
            proc.stdin.flush()

    def _expect(self, proc: subprocess.Popen, want: str, timeout: float) -> str:
        """The next line of the end's stdout (which must be `want` when one is given)."""
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline().strip() if ready else ""
        if not line or (want and line != want):
            proc.kill()
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"UDP stream end failed (wanted {want or 'its report'}): {err}")
        return line

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
