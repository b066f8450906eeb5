"""Crashes with real processes: P2 and P1 started from their console scripts, killed with
SIGKILL at chosen moments, restarted on the same data directories.

A fault proxy in front of P2 holds bytes at a chosen point of a chosen request (mid-body, the
last bytes of a body, or the answer), so each crash lands where the test means it to, with a
tiny random Llama. After every restart the state must be consistent: P1 reports the version P2
serves (fully old or fully new), no half-written file is left on either side, an interrupted job
is reported as interrupted, a user bundle fetched from P1 gives exact results against P2, and a
new rotation succeeds.

The SDK side: a stateless forward rides out a P2 restart (retries with backoff); a generation
whose session P2 lost in a restart starts again in a new session (documented, transparent); a
generation whose step may have reached P2 before it died fails with TransportError and that
step is not sent again.
"""

import asyncio
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
import transformers
from prometheus_client.parser import text_string_to_metric_families

from developer_service.client import DeveloperAdminClient
from shared.api import DeploymentStatus
from stip_demo.models import copy_tokenizer
from tests.developer_service.conftest import LLAMA
from tests.e2e.processes import CLOUD, DEVELOPER, free_port, start, stop, wait_for, wait_ready
from tests.e2e.proxy import LoopbackProxy
from tests.support import max_abs_diff, random_causal_lm
from user_client import StipClient
from user_client._http import Http
from user_client.errors import ServerError, TransportError

PROMPT = [5, 17, 33, 2, 41, 8]
NEW_TOKENS = 8

# --- a proxy that holds bytes where a test wants a crash ----------------------------------------


@dataclass
class Gate:
    """One-shot: attached to the next request whose head contains `marker`."""

    marker: bytes
    kind: str  # "after": forward `n` body bytes, hold the rest; "tail": hold the last `n`; "answer"
    n: int = 0
    drop_on_close: bool = True  # the sender went away: drop what is held and close towards P2
    held: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()


class _Conn:
    def __init__(self) -> None:
        self.pos = 0  # bytes received from the client so far
        self.scan = b""  # client bytes received since a gate was armed (to find the request head)
        self.limit: int | None = None  # forward client bytes up to here, hold the rest
        self.gate: Gate | None = None
        self.held = bytearray()
        self.answer_gate: Gate | None = None


class FaultProxy(LoopbackProxy):
    """TCP proxy in front of P2 (127.0.0.1:<port> -> target) with one-shot gates."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self._armed: Gate | None = None
        self._lock = threading.Lock()

    def arm(self, gate: Gate) -> Gate:
        with self._lock:
            self._armed = gate
        return gate

    def disarm(self) -> None:
        with self._lock:
            gate, self._armed = self._armed, None
        if gate is not None:
            gate.release()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            cw.close()
            return
        conn = _Conn()
        await asyncio.gather(self._upstream(cr, sw, conn), self._downstream(sr, cw, conn))

    async def _upstream(self, cr: asyncio.StreamReader, sw: asyncio.StreamWriter, conn: _Conn) -> None:
        with suppress(ConnectionError, asyncio.CancelledError):
            while data := await cr.read(1 << 16):
                before = conn.pos
                conn.pos += len(data)
                if conn.gate is None and conn.answer_gate is None:
                    self._attach_from(conn, data)
                if conn.limit is not None and conn.gate is not None and not conn.gate.released.is_set():
                    keep = max(0, min(len(data), conn.limit - before))
                    sw.write(data[:keep])
                    conn.held += data[keep:]
                    if conn.pos >= conn.limit:
                        conn.gate.held.set()
                else:
                    if conn.held:
                        sw.write(bytes(conn.held))
                        conn.held.clear()
                    sw.write(data)
                await sw.drain()
            # the client closed its side
            gate = conn.gate
            if gate is not None and conn.held and not gate.drop_on_close:
                while not gate.released.is_set():
                    await asyncio.sleep(0.01)
                sw.write(bytes(conn.held))  # the bytes still in flight arrive, then the close
                await sw.drain()
        with suppress(Exception):
            sw.close()

    def _attach_from(self, conn: _Conn, data: bytes) -> None:
        """Find the armed gate's request in the client stream (its head may span chunks)."""
        with self._lock:
            gate = self._armed
        if gate is None:
            conn.scan = b""
            return
        conn.scan += data
        start = conn.pos - len(conn.scan)  # stream offset of conn.scan[0]
        at = conn.scan.find(gate.marker)
        if at < 0:
            conn.scan = conn.scan[-4096:]
            return
        end = conn.scan.find(b"\r\n\r\n", at)
        if end < 0:
            return
        with self._lock:
            if self._armed is not gate:
                return
            self._armed = None
        head = conn.scan[at:end].decode("latin-1")
        conn.scan = b""
        if gate.kind == "answer":
            conn.answer_gate = gate
            return
        length = 0
        for line in head.split("\r\n"):
            if line.lower().startswith("content-length:"):
                length = int(line.split(":", 1)[1])
        body_start = start + end + 4
        conn.gate = gate
        conn.limit = body_start + gate.n if gate.kind == "after" else body_start + length - gate.n

    async def _downstream(self, sr: asyncio.StreamReader, cw: asyncio.StreamWriter, conn: _Conn) -> None:
        held = bytearray()
        with suppress(ConnectionError, asyncio.CancelledError):
            while data := await sr.read(1 << 16):
                gate = conn.answer_gate
                if gate is not None and not gate.released.is_set():
                    held += data  # P2 answered; the answer is held back
                    gate.held.set()
                    continue
                if held:
                    cw.write(bytes(held))
                    held.clear()
                cw.write(data)
                await cw.drain()
        # P2 closed (or died): whatever answer was held never reaches the client
        with suppress(Exception):
            cw.close()


# --- the cluster -----------------------------------------------------------------------------


@dataclass
class Cluster:
    work: Path
    admin: DeveloperAdminClient
    proxy: FaultProxy
    cloud_port: int
    dev_port: int
    env_cloud: dict[str, str]
    env_dev: dict[str, str]
    model_id: str
    model: transformers.PreTrainedModel
    expected: list[int]  # greedy continuation of PROMPT by the original model
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def cloud_url(self) -> str:
        return f"http://127.0.0.1:{self.cloud_port}"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"

    @property
    def developer_url(self) -> str:
        return f"http://127.0.0.1:{self.dev_port}"

    def start(self, which: str, *, wait: bool = True) -> None:
        if which == "cloud":
            proc = start(
                CLOUD, self.env_cloud, self.work / "cloud.log", host="127.0.0.1", port=self.cloud_port,
                data_dir=self.work / "cloud",
            )  # fmt: skip
            url = self.cloud_url
        else:
            proc = start(
                DEVELOPER, self.env_dev, self.work / "dev.log", host="127.0.0.1", port=self.dev_port,
                data_dir=self.work / "dev",
            )  # fmt: skip
            url = self.developer_url
        self.procs[which] = proc
        if wait:
            wait_ready(url, proc, timeout=60)

    def kill(self, which: str) -> None:
        """SIGKILL: no shutdown handler runs, files stay as they are."""
        proc = self.procs.pop(which)
        proc.kill()
        proc.wait(10)

    def client(self, dep: str, cache: str, **kwargs: object) -> StipClient:
        credential = self.admin.issue_credential(dep, name=f"faults-{cache}").credential
        return StipClient(
            self.developer_url,
            deployment_id=dep,
            credential=credential,
            cache_dir=self.work / "caches" / cache,
            **kwargs,  # type: ignore[arg-type]
        )

    # --- what is on disk -----------------------------------------------------------------

    def p1_versions(self, dep: str) -> list[str]:
        d = self.work / "dev" / "deployments" / dep
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def p2_files(self, dep: str) -> list[str]:
        d = self.work / "cloud" / "deployments" / dep
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def p2_temps(self) -> list[str]:
        return sorted(p.name for p in (self.work / "cloud" / "tmp").iterdir())

    def p2_pushes(self) -> dict[str, float]:
        """P2's pushes so far by outcome (activated, unchanged, rejected), from its /metrics."""
        text = httpx.get(f"{self.cloud_url}/metrics", timeout=10).text
        return {
            sample.labels["outcome"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "stip_cloud_pushes_total"
        }

    def p2_version(self, dep: str) -> int | None:
        r = httpx.get(f"{self.cloud_url}/v1/deployments/{dep}", timeout=10)
        return int(r.json()["key_version"]) if r.status_code == 200 else None

    def wait_job(self, dep: str) -> DeploymentStatus:
        return self.admin.wait(dep, poll_s=0.1, timeout_s=60)

    def assert_consistent(self, dep: str, version: int | None, cache: str) -> None:
        """Both sides at `version` (None: nothing deployed), nothing else on disk, and a fresh
        user bundle from P1 gives exact greedy tokens against P2."""
        status = self.admin.deployment(dep)
        assert status.status not in ("pending", "rotating") and status.pending_key_version is None, status
        assert status.key_version == version, status
        assert self.p2_version(dep) == version
        p1_files = [f"v{version}"] if version else []
        p2_files = ["active.json", f"v{version}.safetensors"] if version else []
        # the status turns final just before the superseded version dir is deleted: allow for that
        with suppress(TimeoutError):
            wait_for(lambda: self.p1_versions(dep) == p1_files, 5, "P1 to prune")
        assert self.p1_versions(dep) == p1_files
        # revoked.json: P1's revocation list, sent after a push, unless P1 died before sending it
        assert [f for f in self.p2_files(dep) if f != "revoked.json"] == p2_files
        assert self.p2_temps() == []
        if version is not None:
            with self.client(dep, cache) as client:
                assert client.key_version == version
                assert client.generate_ids(PROMPT, max_new_tokens=NEW_TOKENS, eos=False) == self.expected


def _model_dir(root: Path) -> tuple[Path, transformers.PreTrainedModel]:
    path = root / "llama"
    model = random_causal_lm(LLAMA, seed=5)
    model.save_pretrained(path)
    copy_tokenizer(path)
    return path, model


@pytest.fixture(autouse=True)
def _disarm_after_each_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that fails while the proxy holds a request must not stall the next ones."""
    yield
    if "cluster" in request.fixturenames:
        request.getfixturevalue("cluster").proxy.disarm()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("faults")
    admin_token, push_token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    cloud_port, dev_port = free_port(), free_port()
    path, model = _model_dir(work)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([PROMPT]),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    expected = out[0, len(PROMPT) :].tolist()
    with FaultProxy(cloud_port) as proxy:
        c = Cluster(
            work=work,
            admin=DeveloperAdminClient(f"http://127.0.0.1:{dev_port}", admin_token=admin_token),
            proxy=proxy,
            cloud_port=cloud_port,
            dev_port=dev_port,
            env_cloud={"STIP_CLOUD_PUSH_TOKEN": push_token},
            env_dev={
                "STIP_DEVELOPER_ADMIN_TOKEN": admin_token,
                "STIP_DEVELOPER_PUSH_TOKEN": push_token,
                "STIP_DEVELOPER_PUSH_ATTEMPTS": "2",
                "STIP_DEVELOPER_PUSH_RETRY_BACKOFF_S": "0.2",
            },
            model_id="",
            model=model,
            expected=expected,
        )
        c.start("cloud", wait=False)  # both at once: P1 needs P2 only to deploy
        c.start("developer", wait=False)
        try:
            wait_ready(c.cloud_url, c.procs["cloud"], timeout=60)
            wait_ready(c.developer_url, c.procs["developer"], timeout=60)
            c.model_id = c.admin.register(path, name="faults-llama").model_id
            yield c
        finally:
            proxy.disarm()
            for proc in c.procs.values():
                stop(proc)
            c.admin.close()


def deploy(c: Cluster) -> str:
    """A fresh deployment through the proxy, active at key version 1."""
    status = c.admin.deploy(c.model_id, cloud_url=c.proxy_url)
    assert c.wait_job(status.deployment_id).status == "active"
    return status.deployment_id


def push_marker(dep: str) -> bytes:
    return f"PUT /v1/deployments/{dep}/weights".encode()


# --- P2 crashes ------------------------------------------------------------------------------


def test_p2_killed_during_a_push(cluster: Cluster) -> None:
    c = cluster
    dep = deploy(c)
    gate = c.proxy.arm(Gate(push_marker(dep), "after", n=20_000))
    c.admin.rotate(dep)
    assert gate.held.wait(30), "the push did not start"
    # P2 opens its temp file once the bytes it has been let through reach the handler
    wait_for(lambda: bool(c.p2_temps()), 10, "P2 to receive the push into a temp file")
    c.kill("cloud")
    # P1 retries, cannot reach P2, and reports the rotation failed; version 1 stays
    status = c.wait_job(dep)
    assert status.status == "active" and status.key_version == 1
    assert status.error and "rotation to key version 2 failed" in status.error and "P2" in status.error
    assert c.p2_temps(), "SIGKILL left the partial push behind"
    c.start("cloud")  # ... which the restart removes
    c.assert_consistent(dep, 1, "p2-push-1")
    # a new rotation succeeds (versions are never reused: 3)
    c.admin.rotate(dep)
    assert c.wait_job(dep).status == "active"
    c.assert_consistent(dep, 3, "p2-push-3")


class Hooked(httpx.HTTPTransport):
    """The SDK's transport to P2, recording each attempt and calling `before` first."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, str]] = []
        self.before: Callable[[httpx.Request], None] | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.before is not None:
            self.before(request)
        self.sent.append((request.method, str(request.url)))
        return super().handle_request(request)


def test_p2_restarted_between_generation_steps_and_under_stateless_calls(cluster: Cluster) -> None:
    """P2 dies between two steps of a generation and comes back: the SDK waits for it (connect
    errors and 503 not_ready retried), hears that P2 lost the session (404) and starts again in a
    new session. A stateless forward sent while P2 is down succeeds once it is back."""
    c = cluster
    dep = deploy(c)
    transport = Hooked()
    steps = [0]
    restarted = threading.Event()
    stateless: list[torch.Tensor | BaseException] = []

    def restart_later() -> None:
        time.sleep(0.3)
        c.start("cloud")
        restarted.set()

    def stateless_forward(client: StipClient) -> None:
        try:
            stateless.append(client.forward(torch.tensor([PROMPT])))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            stateless.append(e)

    sdk = dict(cloud_url=c.cloud_url, cloud_transport=transport, retries=8, backoff=0.25)  # P2 direct
    with c.client(dep, "between-steps", **sdk) as client:
        client.bundle  # noqa: B018 - fetched before P2 goes away

        def before(request: httpx.Request) -> None:
            if "session_id=" in str(request.url):
                steps[0] += 1
                if steps[0] == 3:  # between the second and the third step
                    transport.before = None
                    c.kill("cloud")
                    threading.Thread(target=stateless_forward, args=(client,)).start()
                    threading.Thread(target=restart_later).start()

        transport.before = before
        tokens = client.generate_ids(PROMPT, max_new_tokens=NEW_TOKENS, eos=False)
        assert restarted.wait(60)
        wait_for(lambda: bool(stateless), 60, "the stateless forward")
    assert tokens == c.expected
    sessions = [u for m, u in transport.sent if m == "POST" and u.endswith("/sessions")]
    assert len(sessions) == 2  # the lost session, then the new one
    result = stateless[0]
    assert isinstance(result, torch.Tensor), result
    with torch.no_grad():
        ref = c.model(input_ids=torch.tensor([PROMPT])).logits
    assert max_abs_diff(result, ref) <= 1e-4


def test_p2_killed_while_a_generation_step_is_in_flight(cluster: Cluster) -> None:
    """P2 computed a step and died before its answer left: the SDK cannot know whether the
    session moved on, so it raises TransportError and does not send that step again."""
    c = cluster
    dep = deploy(c)
    transport = Hooked()
    with c.client(dep, "in-flight", cloud_transport=transport, retries=8, backoff=0.25) as client:
        gate = c.proxy.arm(Gate(b"session_id=", "answer"))
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                client.generate_ids(PROMPT, max_new_tokens=NEW_TOKENS, eos=False)
            except BaseException as e:  # noqa: BLE001
                failure.append(e)

        worker = threading.Thread(target=generate)
        worker.start()
        assert gate.held.wait(30), "no session step reached P2"
        c.kill("cloud")
        worker.join(60)
        assert len(failure) == 1 and isinstance(failure[0], TransportError), failure
        steps = [u for m, u in transport.sent if m == "POST" and "session_id=" in u]
        assert len(steps) == 1  # sent once, never again
        c.start("cloud")
        assert client.generate_ids(PROMPT, max_new_tokens=NEW_TOKENS, eos=False) == c.expected


# --- P1 crashes ------------------------------------------------------------------------------


def test_p1_killed_during_a_deployment(cluster: Cluster) -> None:
    c = cluster
    gate = c.proxy.arm(Gate(b"PUT /v1/deployments/", "after", n=20_000))
    dep = c.admin.deploy(c.model_id, cloud_url=c.proxy_url).deployment_id
    assert gate.held.wait(30), "the push did not start"
    c.kill("developer")
    wait_for(lambda: not c.p2_temps(), 10, "P2 to drop the cut push")
    c.start("developer")
    status = c.admin.deployment(dep)
    assert status.status == "failed" and status.key_version is None
    assert status.error and "interrupted" in status.error and "key version 1" in status.error
    c.assert_consistent(dep, None, "p1-deploy-none")
    assert c.p2_files(dep) == [] and c.p2_version(dep) is None
    with c.client(dep, "p1-deploy-bundle") as client, pytest.raises(Exception, match="no active key version"):
        client.bundle  # noqa: B018
    # deploying again (a rotation of the failed deployment) succeeds
    c.admin.rotate(dep)
    assert c.wait_job(dep).status == "active"
    c.assert_consistent(dep, 2, "p1-deploy-2")


@pytest.mark.parametrize("moment", ["mid-body", "last-bytes-in-flight", "p2-switched", "p2-switched-then-p2-down"])
def test_p1_killed_during_a_rotation(cluster: Cluster, moment: str) -> None:
    """Killed mid-body or with the last bytes still in flight: fully old (v1) on both sides and
    the rotation reported as interrupted. Killed after P2 switched: P1 adopts v2 on restart, also
    when P2 is down at that moment (P1 decides nothing until P2 can answer)."""
    c = cluster
    dep = deploy(c)
    if moment == "mid-body":
        gate = Gate(push_marker(dep), "after", n=20_000)
    elif moment == "last-bytes-in-flight":
        gate = Gate(push_marker(dep), "tail", n=64, drop_on_close=False)
    else:
        gate = Gate(push_marker(dep), "answer")
    c.proxy.arm(gate)
    c.admin.rotate(dep)
    assert gate.held.wait(30), "the push did not get that far"
    c.kill("developer")
    if moment == "p2-switched-then-p2-down":
        c.kill("cloud")
        c.start("developer")
        # regression: P1 used to write v2 off here (deleting its keys) while P2 would serve it
        status = c.admin.deployment(dep)
        assert status.status == "rotating" and status.key_version == 1 and status.pending_key_version == 2
        assert status.error and "asking P2" in status.error
        assert c.p1_versions(dep) == ["v1", "v2"]
        c.start("cloud")
        assert c.wait_job(dep).key_version == 2
    else:
        c.start("developer")  # recovery asks P2 which version it serves
    if moment == "last-bytes-in-flight":
        assert c.p2_temps(), "P2 still waits for the last bytes"
        pushes = c.p2_pushes()
        gate.release()  # they arrive after P1's restart, followed by the close of the dead sender
        wait_for(lambda: not c.p2_temps(), 10, "P2 to finish with the push")
        # P2's decision on it, whichever it is: counted as refused (its sender is gone), never activated
        wait_for(lambda: c.p2_pushes() != pushes, 10, "P2 to count the push's outcome")
        assert c.p2_pushes().get("activated") == pushes.get("activated"), "P2 activated a push whose sender died"
    version = 2 if moment.startswith("p2-switched") else 1
    status = c.admin.deployment(dep)
    if version == 1:
        assert status.error and "interrupted" in status.error and "key version 2" in status.error, status
    else:
        assert status.error is None, status
    c.assert_consistent(dep, version, f"p1-rotate-{moment}")
    c.admin.rotate(dep)
    assert c.wait_job(dep).status == "active"
    c.assert_consistent(dep, 3, f"p1-rotate-{moment}-3")


# --- the SDK's retry rules, without processes --------------------------------------------------


def _http(handler: Callable[[httpx.Request], httpx.Response]) -> Http:
    return Http(
        httpx.Client(transport=httpx.MockTransport(handler), base_url="http://p2"), party="P2", retries=3, backoff=0
    )


def test_a_503_not_ready_is_retried_for_every_call_other_failures_only_for_idempotent_ones() -> None:
    """Regression: a session step or a session creation answered 503 not_ready by a P2 still
    reloading after a restart failed at once; P2 refuses such a request before doing anything."""
    calls: list[str] = []

    def not_ready_once(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if len(calls) == 1:
            return httpx.Response(503, json={"error": {"code": "not_ready", "message": "loading"}})
        return httpx.Response(200, json={})

    assert _http(not_ready_once).request("POST", "/step", idempotent=False).status_code == 200
    assert calls == ["POST", "POST"]

    for status, code in [(503, "internal"), (500, "internal"), (502, None)]:
        calls.clear()

        def failing(request: httpx.Request, status: int = status, code: str | None = code) -> httpx.Response:
            calls.append(request.method)
            return httpx.Response(status, json={"error": {"code": code, "message": "x"}} if code else None)

        with pytest.raises(ServerError):
            _http(failing).request("POST", "/step", idempotent=False)
        assert calls == ["POST"], status  # may have reached P2's model: not resent
        calls.clear()
        with pytest.raises(ServerError):
            _http(failing).request("POST", "/forward", idempotent=True)
        assert len(calls) == 4  # idempotent: retried

    calls.clear()

    def broken(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)

    with pytest.raises(TransportError):
        _http(broken).request("POST", "/step", idempotent=False)
    assert calls == ["POST"]
