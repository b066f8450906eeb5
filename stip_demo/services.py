"""P2 and P1 as separate processes on loopback ports, for the demo, the benchmarks and the tests."""

import os
import secrets
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from shared.api import HEALTH_READY_PATH


def _script(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def wait_ready(
    url: str, proc: subprocess.Popen[bytes] | None, timeout: float = 180.0, *, verify: bool | ssl.SSLContext = True
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the service for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url + HEALTH_READY_PATH, timeout=2, verify=verify).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} was not ready after {timeout:.0f} s")


@contextmanager
def _process(cmd: list[str], env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("ab") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Services:
    developer_url: str
    cloud_url: str
    admin_token: str
    procs: list[subprocess.Popen[bytes]]


@contextmanager
def local_services(work: Path, *, cloud_env: dict[str, str] | None = None) -> Iterator[Services]:
    """P2 and P1 as separate processes on loopback, with fresh tokens and data directories.

    `cloud_env` adds `STIP_CLOUD_*` settings for P2 (the load benchmark shortens the session TTL).
    """
    admin, push = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    cloud_port, dev_port = free_port(), free_port()
    cloud_url, dev_url = f"http://127.0.0.1:{cloud_port}", f"http://127.0.0.1:{dev_port}"
    host = ["--host", "127.0.0.1"]
    with ExitStack() as stack:
        cloud = stack.enter_context(
            _process(
                [_script("stip-cloud"), "serve", *host, "--port", str(cloud_port), "--data-dir", str(work / "cloud")],
                {**(cloud_env or {}), "STIP_CLOUD_PUSH_TOKEN": push},
                work / "cloud.log",
            )
        )
        dev = stack.enter_context(
            _process(
                [_script("stip-developer"), "serve", *host, "--port", str(dev_port), "--data-dir", str(work / "dev")],
                {"STIP_DEVELOPER_ADMIN_TOKEN": admin, "STIP_DEVELOPER_PUSH_TOKEN": push},
                work / "developer.log",
            )
        )
        wait_ready(cloud_url, cloud)
        wait_ready(dev_url, dev)
        yield Services(dev_url, cloud_url, admin, [cloud, dev])
