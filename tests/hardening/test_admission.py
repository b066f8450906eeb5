"""What an anonymous or slow client can cost P2 and P1, measured on the real processes.

Each test replays an attack of the outside review (issue 10) against `stip-cloud serve` and
`stip-developer serve` started as separate processes on loopback (tests/e2e/processes.py):

- a few hundred MiB streamed, without a credential, to every route with a JSON body: refused
  before the body is read (401), and with the right credential but too large, after at most the
  body bound (413), while the service's peak resident memory (VmHWM, reset before the attack
  through /proc/PID/clear_refs) grows by less than PEAK_GROWTH_BOUND (shown with -s);
- 500 requests with invented methods and paths: /metrics does not grow (also in process, where
  every method reaches the application: httptools refuses unknown methods itself, h11 does not);
- stalled downloads of the user bundle: P1 holds at most two descriptors per stalled reader
  (its socket and the bundle's one file); connections that trickle their request head are
  closed after STIP_*_HEADER_TIMEOUT_S, and endless headers are cut, on both services.
"""

import os
import secrets
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from developer_service.client import DeveloperAdminClient
from stip_demo.models import make_random_llama
from tests.e2e.processes import CLOUD, DEVELOPER, free_port, start, stop, wait_ready

pytestmark = pytest.mark.timeout(300)

MIB = 1 << 20
ATTACK_BYTES = 256 * MIB  # streamed per route; a service that buffers it shows it in VmHWM
PEAK_GROWTH_BOUND = 48 * MIB  # what an attack may add to a service's peak RSS
ACCEPTED_BOUND = 32 * MIB  # what the client may get into the socket before it is refused (kernel buffers)
HEADER_TIMEOUT_S = 2


@dataclass
class Stack:
    cloud_url: str
    developer_url: str
    procs: dict[str, subprocess.Popen[bytes]]
    admin_token: str
    push_token: str
    deployment_id: str
    credential: str

    def pid(self, name: str) -> int:
        return self.procs[name].pid


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("admission")
    admin_token, push_token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    cloud_port, dev_port = free_port(), free_port()
    env_cloud = {"STIP_CLOUD_PUSH_TOKEN": push_token, "STIP_CLOUD_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S)}
    env_dev = {
        "STIP_DEVELOPER_ADMIN_TOKEN": admin_token,
        "STIP_DEVELOPER_PUSH_TOKEN": push_token,
        "STIP_DEVELOPER_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    }
    host = {"host": "127.0.0.1"}
    procs = {
        "cloud": start(CLOUD, env_cloud, work / "cloud.log", **host, port=cloud_port, data_dir=work / "cloud"),
        "developer": start(DEVELOPER, env_dev, work / "dev.log", **host, port=dev_port, data_dir=work / "dev"),
    }
    cloud_url, developer_url = f"http://127.0.0.1:{cloud_port}", f"http://127.0.0.1:{dev_port}"
    try:
        wait_ready(cloud_url, procs["cloud"])
        wait_ready(developer_url, procs["developer"])
        with DeveloperAdminClient(developer_url, admin_token=admin_token) as admin:
            model = admin.register(make_random_llama(work / "llama"), name="llama")
            dep = admin.deploy(model.model_id, cloud_url=cloud_url)
            status = admin.wait(dep.deployment_id, timeout_s=240)
            assert status.status == "active", status.error
            credential = str(admin.issue_credential(dep.deployment_id, name="reader").credential)
        yield Stack(cloud_url, developer_url, procs, admin_token, push_token, dep.deployment_id, credential)
    finally:
        stop(procs["developer"])
        stop(procs["cloud"])


# --- raw HTTP, so that the client decides how the body streams ----------------------------


@dataclass
class Outcome:
    status: int | None  # None: the server closed without an answer
    sent: int  # body bytes that got into the socket


def stream_body(
    url: str, method: str, path: str, *, total: int, token: str | None = None, chunked: bool = True
) -> Outcome:
    """Send a `total`-byte JSON body as fast as the server takes it; stop at its answer."""
    parts = urlsplit(url)
    head = [f"{method} {path} HTTP/1.1", f"Host: {parts.netloc}", "Content-Type: application/json"]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}")
    if token is not None:
        head.append(f"Authorization: Bearer {token}")
    sent = 0
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        piece = b'{"path": "' + b"a" * (MIB - 10)
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                break  # an answer (or a close) came back: the server refused the rest
            data = piece if sent + len(piece) <= total else piece[: total - sent]
            framed = b"%x\r\n%s\r\n" % (len(data), data) if chunked else data
            try:
                sock.sendall(framed)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                break
            sent += len(data)
        return Outcome(_status(sock), sent)


def _status(sock: socket.socket) -> int | None:
    sock.settimeout(10)
    line = b""
    try:
        while b"\r\n" not in line:
            more = sock.recv(4096)
            if not more:
                return None
            line += more
    except (ConnectionResetError, TimeoutError):
        return None if not line.startswith(b"HTTP/1.1 ") else int(line.split()[1])
    return int(line.split()[1])


def vm(pid: int, field: str) -> int:
    """A VmRSS / VmHWM line of /proc/PID/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak(pid: int) -> int:
    """Reset the process's VmHWM to its current RSS (Linux clear_refs "5"); returns that RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return vm(pid, "VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --- 1. unauthenticated memory exhaustion on JSON routes ------------------------------------


def json_routes(stack: Stack) -> list[tuple[str, str, str, str]]:
    """(service, method, path, the token that opens it) for every route with a JSON body."""
    dep = stack.deployment_id
    return [
        ("cloud", "PUT", f"/v1/deployments/{dep}/revocations", stack.push_token),
        ("developer", "POST", "/v1/models", stack.admin_token),
        ("developer", "POST", "/v1/deployments", stack.admin_token),
        ("developer", "POST", f"/v1/deployments/{dep}/users", stack.admin_token),
    ]


def url_of(stack: Stack, service: str) -> str:
    return stack.cloud_url if service == "cloud" else stack.developer_url


def test_a_large_body_without_a_credential_is_refused_before_it_is_read(stack: Stack) -> None:
    for service, method, path, _ in json_routes(stack):
        pid = stack.pid(service)
        before = reset_peak(pid)
        url = url_of(stack, service)
        outcomes = [stream_body(url, method, path, total=ATTACK_BYTES, chunked=chunked) for chunked in (True, False)]
        growth = vm(pid, "VmHWM") - before
        print(f"{service} {method} {path}: peak RSS +{growth / MIB:.1f} MiB")  # shown with -s
        assert growth <= PEAK_GROWTH_BOUND, f"{service} {method} {path}: peak RSS grew by {growth / MIB:.0f} MiB"
        # chunked: 401 before a byte of the body is read; declared too large: 413 at once
        assert [o.status for o in outcomes] == [401, 413], (service, path, outcomes)
        assert all(o.sent <= ACCEPTED_BOUND for o in outcomes), (service, path, outcomes)
    _assert_serving(stack)


def test_a_large_body_with_the_right_credential_is_cut_at_the_bound(stack: Stack) -> None:
    for service, method, path, token in json_routes(stack):
        pid = stack.pid(service)
        before = reset_peak(pid)
        url = url_of(stack, service)
        chunked = stream_body(url, method, path, total=ATTACK_BYTES, token=token)
        declared = stream_body(url, method, path, total=ATTACK_BYTES, token=token, chunked=False)
        growth = vm(pid, "VmHWM") - before
        print(f"{service} {method} {path}: peak RSS +{growth / MIB:.1f} MiB")  # shown with -s
        assert growth <= PEAK_GROWTH_BOUND, f"{service} {method} {path}: peak RSS grew by {growth / MIB:.0f} MiB"
        assert chunked.status == 413 and chunked.sent <= ACCEPTED_BOUND, (service, path, chunked)
        assert declared.status == 413 and declared.sent <= ACCEPTED_BOUND, (service, path, declared)
    # the 413 is the services' one error shape, naming the setting that raises the bound
    r = httpx.post(
        f"{stack.developer_url}/v1/models",
        content=b"x" * (2 * MIB),
        headers={"Authorization": f"Bearer {stack.admin_token}"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert "STIP_DEVELOPER_MAX_BODY_BYTES" in r.json()["error"]["message"]
    r = httpx.put(
        f"{stack.cloud_url}/v1/deployments/{stack.deployment_id}/revocations",
        content=b"x" * (2 * MIB),
        headers={"Authorization": f"Bearer {stack.push_token}"},
    )
    assert r.status_code == 413 and "STIP_CLOUD_MAX_JSON_BYTES" in r.json()["error"]["message"]
    _assert_serving(stack)


def _assert_serving(stack: Stack) -> None:
    for url in (stack.cloud_url, stack.developer_url):
        assert httpx.get(f"{url}/health/ready", timeout=10).status_code == 200
    r = httpx.get(f"{stack.cloud_url}/v1/deployments/{stack.deployment_id}", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "active"


# --- 5. metrics labels ----------------------------------------------------------------------


@pytest.mark.parametrize("service", ["cloud", "developer"])
def test_invented_methods_and_paths_do_not_grow_the_metrics(stack: Stack, service: str) -> None:
    url = url_of(stack, service)
    with httpx.Client(base_url=url, timeout=10) as client:

        def invent(n: int) -> None:
            """`n` requests, each with an invented method, path or both."""
            for i in range(n):
                method, path = "X" + secrets.token_hex(4).upper(), f"/{secrets.token_hex(6)}"
                # 404/405 from the application; with httptools, 400 from its parser (it knows the methods)
                if i % 3 == 0:
                    assert client.request(method, path).status_code in (400, 404, 405)
                elif i % 3 == 1:
                    assert client.request(method, "/health/live").status_code in (400, 405)
                else:
                    assert client.get(f"/v1{path}").status_code in (401, 404)

        invent(30)  # every label combination these requests can make exists now
        client.get("/metrics")  # and the scrape's own
        before = client.get("/metrics").text
        invent(500)
        after = client.get("/metrics").text
    assert _series(after) == _series(before), sorted(_series(after) - _series(before))[:5]
    grown = len(after) - len(before)  # only counts that gained digits
    assert grown < 4096, f"/metrics grew by {grown} bytes over 500 invented requests"


def _series(text: str) -> set[str]:
    """Each sample's name and labels, without its value."""
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


# --- 8. slow clients ------------------------------------------------------------------------


def test_stalled_bundle_downloads_hold_one_file_each(stack: Stack) -> None:
    """Readers that take the headers and then read nothing: P1's descriptors stay bounded."""
    pid = stack.pid("developer")
    parts = urlsplit(stack.developer_url)
    request = (
        f"GET /v1/deployments/{stack.deployment_id}/user-key HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Authorization: Bearer {stack.credential}\r\n\r\n"
    ).encode()
    n = 40
    base = open_fds(pid)
    readers = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that does not read
            sock.connect((parts.hostname, parts.port))
            sock.sendall(request)
            readers.append(sock)
        for sock in readers:  # each download started (its files are open): its first bytes came back
            sock.settimeout(30)
            assert sock.recv(12).startswith(b"HTTP/1.1 200")
        held = open_fds(pid) - base
        assert held <= 2 * n + 4, f"{n} stalled downloads hold {held} descriptors on P1"
    finally:
        for sock in readers:
            sock.close()
    # a download that reads works as before
    r = httpx.get(
        f"{stack.developer_url}/v1/deployments/{stack.deployment_id}/user-key",
        headers={"Authorization": f"Bearer {stack.credential}"},
        timeout=30,
    )
    assert r.status_code == 200 and len(r.content) == int(r.headers["content-length"])


@pytest.mark.parametrize("service", ["cloud", "developer"])
def test_a_request_head_that_trickles_is_cut_after_the_header_timeout(stack: Stack, service: str) -> None:
    parts = urlsplit(url_of(stack, service))
    pid = stack.pid(service)
    base = open_fds(pid)
    slow = []
    for _ in range(20):
        sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        slow.append(sock)
    idle = socket.create_connection((parts.hostname, parts.port), timeout=10)  # sends nothing at all
    slow.append(idle)
    try:
        deadline = time.monotonic() + HEADER_TIMEOUT_S + 10
        for sock in slow:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                assert sock.recv(1024) == b""
            except TimeoutError:
                pytest.fail(f"{service} kept a connection whose request head never completed")
        assert open_fds(pid) <= base + 2
    finally:
        for sock in slow:
            sock.close()
    assert httpx.get(f"{url_of(stack, service)}/health/live", timeout=10).status_code == 200


@pytest.mark.parametrize("service", ["cloud", "developer"])
def test_endless_request_headers_are_cut_at_the_header_bound(stack: Stack, service: str) -> None:
    parts = urlsplit(url_of(stack, service))
    pid = stack.pid(service)
    before = reset_peak(pid)
    sent = 0
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        line = b"X-Padding: " + b"a" * 4000 + b"\r\n"
        try:
            while sent < 64 * MIB and not select.select([sock], [], [], 0)[0]:
                sock.sendall(line)
                sent += len(line)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
    assert sent <= ACCEPTED_BOUND, f"{service} took {sent} bytes of headers"
    assert vm(pid, "VmHWM") - before <= PEAK_GROWTH_BOUND
    assert httpx.get(f"{url_of(stack, service)}/health/live", timeout=10).status_code == 200


# --- the metrics labels in process: every request reaches the application ---------------------


def _in_process_apps(tmp_path: Path) -> Iterator[tuple[str, TestClient]]:
    from cloud_service.app import create_app as create_cloud
    from developer_service.app import create_app as create_developer
    from tests.cloud_service.helpers import settings_for as cloud_settings
    from tests.developer_service.conftest import FakeCloud
    from tests.developer_service.conftest import settings_for as developer_settings

    with TestClient(create_cloud(cloud_settings(tmp_path / "cloud"))) as client:
        yield "cloud", client
    with TestClient(create_developer(developer_settings(tmp_path / "dev"), transport=FakeCloud().transport)) as client:
        yield "developer", client


def test_invented_methods_reaching_the_application_get_one_label(tmp_path: Path) -> None:
    """h11 (uvicorn without httptools) passes any method token to the application."""
    for service, client in _in_process_apps(tmp_path):
        for _ in range(10):
            client.request("X" + secrets.token_hex(4).upper(), f"/{secrets.token_hex(6)}")
            client.request("X" + secrets.token_hex(4).upper(), "/health/live")
        client.get("/metrics")
        before = client.get("/metrics").text
        for _ in range(250):  # 500 requests
            method = "X" + secrets.token_hex(4).upper()
            assert client.request(method, f"/{secrets.token_hex(6)}").status_code in (404, 405)
            assert client.request(method, "/health/live").status_code == 405
        after = client.get("/metrics").text
        assert _series(after) == _series(before), (service, sorted(_series(after) - _series(before))[:5])
        assert 'method="other"' in after and "unmatched" in after
