"""`pdserve up` as a user runs it: a second one on the same port or data directory fails at
once naming it (and the first keeps serving); SIGKILL of `pdserve up` leaves no process of
its cluster behind; one of several gateways that dies is restarted while the others serve."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.client import Client
from tests.helpers import wait_until

pytestmark = pytest.mark.integration  # starts processes


def pdserve(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pdserve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def processes_of(data_dir: Path) -> list[str]:
    """Command lines of the running processes that name `data_dir` (every service of a
    `pdserve up` gets it, or a path under it)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(data_dir) in cmd and "pdserve" in cmd and state != "Z":
            out.append(f"{pid}: {cmd[:160]}")
    return out


def test_a_second_up_fails_and_the_first_dies_whole(tmp_path):
    data = tmp_path / "data"
    up = pdserve("up", "--port", "0", "--http-port", "-1", "--gateways", "2",
                 "--data-dir", str(data))
    lines: list[str] = []
    try:
        assert up.stdout is not None
        for line in up.stdout:
            lines.append(line)
            if line.startswith("serving on"):
                break
        assert lines and lines[-1].startswith("serving on"), "".join(lines)
        addresses = lines[-1].split()[2].rstrip(";")
        first_port = addresses.split(",")[0].rsplit(":", 1)[1]
        assert len(addresses.split(",")) == 2
        # The same data directory: refused at once, naming it and the holder.
        second = subprocess.run([sys.executable, "-m", "pdserve", "up", "--port", "0",
                                 "--data-dir", str(data)], capture_output=True, text=True,
                                timeout=60)
        assert second.returncode != 0
        assert f"--data-dir {data}" in second.stderr and f"pid {up.pid}" in second.stderr
        # The same port, another directory: the gateway cannot listen, and says so.
        third = subprocess.run([sys.executable, "-m", "pdserve", "up", "--port", first_port,
                                "--http-port", "-1", "--data-dir", str(tmp_path / "other")],
                               capture_output=True, text=True, timeout=120)
        assert third.returncode != 0
        assert re.search(rf"--port {first_port}: cannot listen", third.stderr), third.stderr
        assert not processes_of(tmp_path / "other")  # it stopped what it had started
        # The first cluster serves on through both gateways.
        with Client(addresses) as c:
            for _ in range(2):
                assert c.generate(prompt="Hello", max_tokens=2).completion_tokens == 2
        # One gateway dies: `pdserve up` restarts it on its port; the other serves meanwhile.
        [gw1] = [p for p in processes_of(data) if "--gateway-id gateway-1" in p]
        os.kill(int(gw1.split(":")[0]), signal.SIGKILL)
        with Client(addresses.split(",")[0]) as c:
            assert c.generate(prompt="Hello", max_tokens=2).completion_tokens == 2
        wait_until(lambda: [p for p in processes_of(data) if "--gateway-id gateway-1" in p
                            and not p.startswith(gw1.split(":")[0] + ":")], 60)
        with Client(addresses.split(",")[1]) as c:
            r = wait_until(lambda: _try(c), 60, interval_s=0.2)
            assert r.completion_tokens == 2
        assert up.poll() is None
        # SIGKILL of `pdserve up`: every service of its cluster goes with it.
        assert len(processes_of(data)) >= 6  # up, kvstore, 2 gateways, prefill, decode
        up.kill()
        up.wait(10)
        wait_until(lambda: not processes_of(data), 15,
                   what=lambda: "left behind: " + "; ".join(processes_of(data)))
    finally:
        if up.poll() is None:
            up.kill()
        up.wait(10)


def _try(c: Client):
    import grpc

    try:
        return c.generate(prompt="Hello", max_tokens=2)
    except grpc.RpcError:
        return None
