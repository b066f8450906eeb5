"""Weight-push integrity over real sockets: P2 (uvicorn in a thread of this process, the real
HTTP stack) under cut, corrupted, invalid, duplicate, unauthorised and concurrent pushes.

In every case: the version that was active keeps answering exactly until a complete, verified
push replaces it; a partial or refused upload never becomes active; and afterwards the data
directory holds exactly `active.json` and the active version's file (no temp file, no other
version). Regression kept here: a complete push whose sender left before P2 switched to it (P1
crashed, or gave up waiting) is not activated, so P1 never writes off a version that P2 then
serves.
"""

import hashlib
import json
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import transformers
import uvicorn
from safetensors.torch import load_file, save_file

from cloud_service.app import create_app
from cloud_service.service import CloudService
from developer_service.errors import JobCancelled, PushFailed
from developer_service.push import Pusher, PushRequest
from shared import wire
from shared.api import (
    DIGEST_HEADER,
    E_BAD_INPUT,
    E_CONFLICT,
    E_KEY_OUTDATED,
    E_UNAUTHORIZED,
    INPUTS_EMBEDS,
    KEY_VERSION_HEADER,
    LOGITS,
    META_KEY_VERSION,
    PUSH_CONFIG,
    PUSH_FAMILY,
    PUSH_KEY_VERSION,
    PUSH_VERIFY_KEY,
    DeploymentInfo,
)
from shared.credentials import Signer
from shared.permutation import permute, unpermute
from tests.cloud_service.helpers import CONFIG, DEPLOYMENT, PUSH_TOKEN, Deployed, settings_for
from tests.e2e.processes import wait_for
from tests.support import max_abs_diff, random_causal_lm

TOL = 1e-4
SEED = 20231763


# --- material: a tiny random Llama under key versions 1 and 2 ---------------------------------


@dataclass
class Versions:
    original: transformers.PreTrainedModel
    v1: Deployed
    v2: Deployed
    signer: Signer
    work: Path

    def of(self, version: int) -> Deployed:
        return self.v1 if version == 1 else self.v2

    def credential(self, subject: str = "alice") -> str:
        token, _ = self.signer.issue(subject=subject, deployment_id=DEPLOYMENT, ttl_s=3600)
        return token

    def metadata(self, version: int, **changes: str) -> dict[str, str]:
        return self.of(version).metadata(self.signer, **changes)

    def tensors(self, version: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in self.of(version).result.cloud_files:
            out.update(load_file(str(f)))
        return out

    def body_of(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
        """A push body made of `tensors` (one shard), as P1's concat_files streams it."""
        path = self.work / f"shard-{random.getrandbits(32):08x}.safetensors"
        save_file(tensors, str(path))
        _, chunks = wire.concat_files([path], metadata)
        body = b"".join(chunks)
        path.unlink()
        return body


@pytest.fixture(scope="module")
def m(tmp_path_factory: pytest.TempPathFactory) -> Versions:
    work = tmp_path_factory.mktemp("push-integrity")
    model = random_causal_lm(CONFIG, seed=3)
    model.save_pretrained(work / "llama")
    # small shards for v1: its body concatenates several files
    v1 = Deployed.transform(work / "llama", work / "v1", 1, shard_bytes=20_000)
    return Versions(model, v1, Deployed.transform(work / "llama", work / "v2", 2), Signer.generate(), work)


def sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


# --- P2 on a real socket ------------------------------------------------------------------------


@dataclass
class LiveP2:
    url: str
    port: int
    data: Path
    service: CloudService
    http: httpx.Client

    def push(
        self, body: bytes | Iterator[bytes], digest: str, *, token: str | None = PUSH_TOKEN, **headers: str
    ) -> httpx.Response:
        h = {DIGEST_HEADER: digest, "Content-Type": wire.CONTENT_TYPE, **headers}
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        return self.http.put(f"/v1/deployments/{DEPLOYMENT}/weights", content=body, headers=h)

    def version(self) -> int | None:
        r = self.http.get(f"/v1/deployments/{DEPLOYMENT}")
        return DeploymentInfo.model_validate_json(r.content).key_version if r.status_code == 200 else None

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.data)) for p in self.data.rglob("*") if p.is_file())

    def temps(self) -> list[Path]:
        return list((self.data / "tmp").iterdir())

    def pushes(self, outcome: str) -> float:
        value = self.service.metrics.registry.get_sample_value("stip_cloud_pushes_total", {"outcome": outcome})
        return value or 0.0

    def settle(self, rejected: float, timeout: float = 10.0) -> None:
        """Wait until P2 has refused `rejected` pushes in all and removed their temp files."""
        wait_for(lambda: self.pushes("rejected") >= rejected and not self.temps(), timeout, "P2 to drop the push")


@contextmanager
def live_p2(data: Path, **overrides: object) -> Iterator[LiveP2]:
    app = create_app(settings_for(data, **overrides))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "uvicorn to start")
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=30) as http:
            wait_for(lambda: http.get("/health/ready").status_code == 200, 30, "P2 to be ready")
            yield LiveP2(url, port, data, app.state.service, http)
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def expected_files(version: int) -> list[str]:
    return [f"deployments/{DEPLOYMENT}/active.json", f"deployments/{DEPLOYMENT}/v{version}.safetensors"]


IDS = torch.tensor([[3, 14, 15, 9, 26, 5]])


def forward_body(m: Versions, version: int, ids: torch.Tensor = IDS) -> bytes:
    with torch.no_grad():
        x = m.original.get_input_embeddings()(ids)  # (B, S, d) plaintext, P3's side
    return wire.encode({INPUTS_EMBEDS: permute(x, m.of(version).pi)})


def reference(m: Versions, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return m.original(input_ids=ids).logits  # (B, S, V)


def check_answer(m: Versions, version: int, response: httpx.Response, ref: torch.Tensor) -> None:
    assert response.status_code == 200, response.text
    tensors, meta = wire.decode(response.content)
    assert meta[META_KEY_VERSION] == str(version)
    assert max_abs_diff(unpermute(tensors[LOGITS], m.of(version).pi_c), ref) <= TOL


def serves(p2: LiveP2, m: Versions, version: int) -> None:
    """`version` is active, answers exactly, and is alone on disk."""
    assert p2.version() == version
    headers = {"Authorization": f"Bearer {m.credential()}", KEY_VERSION_HEADER: str(version)}
    r = p2.http.post(f"/v1/deployments/{DEPLOYMENT}/forward", content=forward_body(m, version), headers=headers)
    check_answer(m, version, r, reference(m))
    assert p2.files() == expected_files(version)


def error_code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


@pytest.fixture
def p2(tmp_path: Path, m: Versions) -> Iterator[LiveP2]:
    """A P2 on a real socket, serving key version 1."""
    with live_p2(tmp_path / "data") as p:
        body, digest = m.v1.body(m.signer)
        assert p.push(body, digest).status_code == 200
        serves(p, m, 1)
        yield p


# --- raw HTTP, to cut a body where we like ------------------------------------------------------


def send_raw_push(
    p2: LiveP2, body: bytes, cut: int, digest: str, *, reset: bool = False, wait_started: bool = True
) -> None:
    """PUT announcing `len(body)` bytes, send the first `cut`, then drop the connection (FIN or RST)."""
    head = (
        f"PUT /v1/deployments/{DEPLOYMENT}/weights HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {PUSH_TOKEN}\r\n{DIGEST_HEADER}: {digest}\r\n"
        f"Content-Type: {wire.CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    s = socket.create_connection(("127.0.0.1", p2.port))
    try:
        s.sendall(head + body[:cut])
        if wait_started:  # the handler runs (its temp file exists) before the connection drops
            wait_for(lambda: bool(p2.temps()), 10, "P2 to start receiving")
        if reset:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        s.close()


def cut_points(body: bytes, seed: int) -> list[int]:
    """Seeded cut points: the edges of the length prefix, the header and the data, and random ones."""
    rng = random.Random(seed)
    header_end = 8 + struct.unpack("<Q", body[:8])[0]
    fixed = [0, 1, 7, 8, 9, header_end - 1, header_end, header_end + 1, len(body) - 1]
    spread = [rng.randrange(9, header_end) for _ in range(2)] + [rng.randrange(header_end, len(body)) for _ in range(6)]
    return sorted(set(fixed + spread))


def test_uploads_cut_anywhere_never_activate_and_leave_nothing(p2: LiveP2, m: Versions) -> None:
    body, digest = m.v2.body(m.signer)
    cuts = cut_points(body, SEED)
    assert len(cuts) >= 12
    for i, cut in enumerate(cuts):
        rejected = p2.pushes("rejected")
        send_raw_push(p2, body, cut, digest, reset=bool(i % 2))
        p2.settle(rejected + 1)
        assert p2.version() == 1, f"cut at {cut} of {len(body)}"
        assert p2.files() == expected_files(1), f"cut at {cut} of {len(body)}"
    serves(p2, m, 1)
    assert p2.pushes("activated") == 1  # v1 only


def test_a_pusher_cancelled_midway_leaves_nothing(p2: LiveP2, m: Versions) -> None:
    """P1 shutting down in the middle of a push: its body generator stops, the connection drops."""
    cancelled = threading.Event()
    rejected = p2.pushes("rejected")

    def on_progress(done: int, total: int) -> None:
        if done:  # the header went out: stop before the tensors
            cancelled.set()

    request = PushRequest(p2.url, DEPLOYMENT, 2, list(m.v2.result.cloud_files), m.metadata(2))
    with httpx.Client(timeout=10) as client, pytest.raises(JobCancelled):
        Pusher(client, PUSH_TOKEN, attempts=1, cancelled=cancelled).push(request, on_progress)
    p2.settle(rejected + 1)
    serves(p2, m, 1)


@dataclass
class SlowLoads:
    """Loads of θ′ begun and ended: once every push is settled and no load is running, whatever
    P2 was going to do with those pushes (switch or not) is done, so an absence can be asserted."""

    begun: int = 0
    ended: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, *, end: bool) -> None:
        with self.lock:
            if end:
                self.ended += 1
            else:
                self.begun += 1

    def idle(self) -> bool:
        with self.lock:
            return self.begun == self.ended


def slow_load(p2: LiveP2, monkeypatch: pytest.MonkeyPatch, seconds: float) -> SlowLoads:
    """Loading θ′ takes `seconds` (a large model): the window between the last byte and the switch."""
    load = p2.service._load
    loads = SlowLoads()

    def slow(*args: Any) -> Any:
        loads.count(end=False)
        try:
            time.sleep(seconds)
            return load(*args)
        finally:
            loads.count(end=True)

    monkeypatch.setattr(p2.service, "_load", slow)
    return loads


def settled_without_a_switch(p2: LiveP2, loads: SlowLoads, rejected: float, activated: float) -> None:
    """Wait (bounded) until P2 has refused the pushes and finished every load, then check that
    none of them was activated."""
    p2.settle(rejected)
    wait_for(loads.idle, 10, "P2 to finish loading")
    assert p2.pushes("activated") == activated, "P2 activated a push whose sender had gone"


def test_a_complete_push_whose_sender_left_is_not_activated(
    p2: LiveP2, m: Versions, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: P1 sent every byte, then crashed while P2 was still loading. P1's restart then
    finds the old version on P2 and writes the new one off (deleting its keys); P2 must not switch
    to it afterwards."""
    loads = slow_load(p2, monkeypatch, 0.5)
    body, digest = m.v2.body(m.signer)
    rejected, activated = p2.pushes("rejected"), p2.pushes("activated")
    send_raw_push(p2, body, len(body), digest)
    settled_without_a_switch(p2, loads, rejected + 1, activated)
    serves(p2, m, 1)

    # control: the same push with its sender waiting activates, slow load and all
    r = p2.push(body, digest)
    assert r.status_code == 200, r.text
    serves(p2, m, 2)


def test_a_pusher_that_gives_up_waiting_finds_the_old_version_still_active(
    p2: LiveP2, m: Versions, monkeypatch: pytest.MonkeyPatch
) -> None:
    """P1's read timeout is shorter than P2's load: every attempt is abandoned, P1 reports the push
    failed, and P2 still serves v1 afterwards (before the fix P2 switched behind P1's back)."""
    loads = slow_load(p2, monkeypatch, 0.6)
    request = PushRequest(p2.url, DEPLOYMENT, 2, list(m.v2.result.cloud_files), m.metadata(2))
    rejected, activated = p2.pushes("rejected"), p2.pushes("activated")
    with httpx.Client(timeout=httpx.Timeout(0.25, connect=5)) as client, pytest.raises(PushFailed):
        Pusher(client, PUSH_TOKEN, attempts=2, backoff_s=0.01).push(request)
    settled_without_a_switch(p2, loads, rejected + 2, activated)
    serves(p2, m, 1)


def test_a_corrupted_byte_is_a_digest_mismatch(p2: LiveP2, m: Versions) -> None:
    body, digest = m.v2.body(m.signer)
    header_end = 8 + struct.unpack("<Q", body[:8])[0]
    rng = random.Random(SEED)
    for pos in [0, 5, 8, 40, header_end - 2, header_end, rng.randrange(header_end, len(body)), len(body) - 1]:
        bad = bytearray(body)
        bad[pos] ^= 1 << rng.randrange(8)
        r = p2.push(bytes(bad), digest)
        assert r.status_code == 400 and error_code(r) == E_BAD_INPUT, (pos, r.text)
        assert "SHA-256 does not match" in r.json()["error"]["message"]
    serves(p2, m, 1)


def _rewrite_header(body: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """The same data region under an edited JSON header (re-padded to 8 bytes)."""
    n = struct.unpack("<Q", body[:8])[0]
    header = json.loads(body[8 : 8 + n])
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body[8 + n :]


def invalid_bodies(m: Versions) -> dict[str, bytes]:
    """Bodies that are not a usable θ′ of key version 2; each is sent with its own, matching digest."""
    body, _ = m.v2.body(m.signer)
    n = struct.unpack("<Q", body[:8])[0]
    tensors = m.tensors(2)
    first = sorted(tensors)[0]
    weight = next(k for k in sorted(tensors) if tensors[k].dim() == 2)

    def overlap(h: dict[str, Any]) -> None:
        names = [k for k in h if k != "__metadata__"]
        h[names[1]]["data_offsets"] = h[names[0]]["data_offsets"]

    def wrong_dtype(h: dict[str, Any]) -> None:
        h[first]["dtype"] = "F16"

    def index_tensor(h: dict[str, Any]) -> None:
        h[first]["dtype"] = "I32"  # same size as F32: a permutation could travel like this

    def drop_metadata_key(h: dict[str, Any]) -> None:
        del h["__metadata__"][PUSH_VERIFY_KEY]

    wrong_shape = dict(tensors)
    wrong_shape[weight] = torch.randn(tensors[weight].shape[0] + 1, tensors[weight].shape[1])
    missing = {k: v for k, v in tensors.items() if k != weight}
    extra = dict(tensors) | {"model.layers.0.mlp.extra.weight": torch.randn(4, 4)}
    same = dict(tensors)
    embedding = m.original.get_input_embeddings().weight.detach().clone()  # type: ignore[operator]
    config = json.loads(m.metadata(2)[PUSH_CONFIG])
    return {
        "empty body": b"",
        "length prefix only": body[:8],
        "header longer than the body": struct.pack("<Q", len(body)) + body[8:],
        "header not JSON": body[:8] + b"x" + body[9:],
        "header truncated": body[: 8 + n // 2],
        "data region cut short": body[:-1000],
        "data region with trailing bytes": body + b"\0" * 8,
        "overlapping tensors": _rewrite_header(body, overlap),
        "dtype that does not fit the offsets": _rewrite_header(body, wrong_dtype),
        "an integer tensor": _rewrite_header(body, index_tensor),
        "no verification key": _rewrite_header(body, drop_metadata_key),
        "a weight of the wrong shape": m.body_of(wrong_shape, m.metadata(2)),
        "a weight missing": m.body_of(missing, m.metadata(2)),
        "an unexpected tensor": m.body_of(extra, m.metadata(2)),
        "key version 0": m.body_of(same, m.metadata(2, **{PUSH_KEY_VERSION: "0"})),
        "key version not a number": m.body_of(same, m.metadata(2, **{PUSH_KEY_VERSION: "two"})),
        "config not an object": m.body_of(same, m.metadata(2, **{PUSH_CONFIG: "[1, 2]"})),
        "config of another size": m.body_of(
            same, m.metadata(2, **{PUSH_CONFIG: json.dumps(config | {"hidden_size": 48})})
        ),
        "another family": m.body_of(same, m.metadata(2, **{PUSH_FAMILY: "gpt2"})),
        # regression: labelled gpt2, the Llama embedding table escaped the embedding check
        "another family, with the embedding table": m.body_of(
            dict(tensors) | {"model.embed_tokens.weight": embedding}, m.metadata(2, **{PUSH_FAMILY: "gpt2"})
        ),
    }


def test_a_body_whose_digest_matches_but_is_no_valid_theta_prime_is_refused(p2: LiveP2, m: Versions) -> None:
    for what, body in invalid_bodies(m).items():
        r = p2.push(body, sha(body))
        assert r.status_code == 400 and error_code(r) == E_BAD_INPUT, (what, r.status_code, r.text)
        assert p2.version() == 1, what
        assert p2.files() == expected_files(1), what
    serves(p2, m, 1)


def test_duplicate_pushes(p2: LiveP2, m: Versions) -> None:
    body, digest = m.v2.body(m.signer)
    # the same new version three times at once: one activation, every sender hears "active"
    results: list[httpx.Response] = []

    def one() -> None:
        with httpx.Client(base_url=p2.url, timeout=30) as c:
            h = {"Authorization": f"Bearer {PUSH_TOKEN}", DIGEST_HEADER: digest}
            results.append(c.put(f"/v1/deployments/{DEPLOYMENT}/weights", content=body, headers=h))

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [200, 200, 200]
    assert {r.json()["sha256"] for r in results} == {digest}
    assert p2.pushes("activated") == 2 and p2.pushes("unchanged") == 2  # v1, then v2 once
    serves(p2, m, 2)

    # again later: idempotent, the file is not even rewritten
    stat = (p2.data / expected_files(2)[1]).stat()
    again = p2.push(body, digest)
    assert again.status_code == 200 and again.json() == results[0].json()
    after = (p2.data / expected_files(2)[1]).stat()
    assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)

    # the same version with other bytes, and an older version: conflicts
    other, other_digest = m.v2.body(m.signer, note="other bytes")
    r = p2.push(other, other_digest)
    assert r.status_code == 409 and error_code(r) == E_CONFLICT, r.text
    old, old_digest = m.v1.body(m.signer)
    r = p2.push(old, old_digest)
    assert r.status_code == 409 and error_code(r) == E_CONFLICT, r.text
    serves(p2, m, 2)


def test_pushes_without_the_push_token_are_refused_before_any_byte_is_stored(p2: LiveP2, m: Versions) -> None:
    body, digest = m.v2.body(m.signer)
    wrong = {
        "no token": None,
        "a wrong token": "not-the-push-token",
        "P1's admin token": "admin-" + PUSH_TOKEN,  # another secret of P1's: P2 does not know it
        "the push token with a suffix": PUSH_TOKEN + "x",
        "a prefix of the push token": PUSH_TOKEN[:-1],
        "a user credential": m.credential(),
    }
    for what, token in wrong.items():
        r = p2.push(body, digest, token=token)
        assert r.status_code == 401 and error_code(r) == E_UNAUTHORIZED, (what, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    r = p2.push(body, digest, token=None, Authorization=f"Basic {PUSH_TOKEN}")
    assert r.status_code == 401, r.text

    # a large body with a wrong token: refused up front, the sender still hears 401, nothing stored
    big = b"\0" * (16 << 20)

    def stream() -> Iterator[bytes]:
        for i in range(0, len(big), 1 << 20):
            yield big[i : i + (1 << 20)]

    r = p2.push(stream(), sha(big), token="not-the-push-token", **{"Content-Length": str(len(big))})
    assert r.status_code == 401, r.text
    assert not p2.temps()
    # P1's pusher with a wrong token: a clear refusal, not retried, not "cannot reach P2"
    request = PushRequest(p2.url, DEPLOYMENT, 2, list(m.v2.result.cloud_files), m.metadata(2))
    with httpx.Client(timeout=10) as client, pytest.raises(PushFailed, match="HTTP 401"):
        Pusher(client, "not-the-push-token", attempts=3, backoff_s=0.01).push(request)
    assert p2.pushes("rejected") == 0  # refused before the push began: no temp file was even made
    serves(p2, m, 1)


# --- a push under traffic -----------------------------------------------------------------------


@dataclass
class Answer:
    sent: float
    received: float
    version: int  # key version the request was permuted with
    status: int
    code: str | None = None


def test_a_new_version_takes_over_under_concurrent_traffic(p2: LiveP2, m: Versions) -> None:
    """Users send forwards (stateless and in sessions) while v2 streams in slowly. Each user keeps
    v1 until P2 answers key_outdated, then switches to v2. Every answer is exact; the only errors
    are one key_outdated per user, after the switch; v1 answers until the switch, v2 after it."""
    body, digest = m.v2.body(m.signer)
    refs = {ids_len: reference(m, IDS[:, :ids_len]) for ids_len in range(1, IDS.shape[1] + 1)}
    stop = threading.Event()
    failures: list[str] = []
    logs: dict[str, list[Answer]] = {}
    push_window: list[float] = []

    def stateless(name: str) -> None:
        version, log = 1, logs.setdefault(name, [])
        with httpx.Client(base_url=p2.url, timeout=30) as c:
            while not stop.is_set():
                headers = {"Authorization": f"Bearer {m.credential(name)}", KEY_VERSION_HEADER: str(version)}
                sent = time.monotonic()
                r = c.post(f"/v1/deployments/{DEPLOYMENT}/forward", content=forward_body(m, version), headers=headers)
                log.append(Answer(sent, time.monotonic(), version, r.status_code, _code(r)))
                if r.status_code == 409 and _code(r) == E_KEY_OUTDATED and version == 1:
                    version = 2
                    continue
                try:
                    check_answer(m, version, r, refs[IDS.shape[1]])
                except AssertionError as e:
                    failures.append(f"{name}: {e}")
                    return

    def in_sessions(name: str) -> None:
        """Generation-like: one row per step into a session, a new session every few steps."""
        version, log = 1, logs.setdefault(name, [])
        auth = {"Authorization": f"Bearer {m.credential(name)}"}
        with httpx.Client(base_url=p2.url, timeout=30) as c:
            while not stop.is_set():
                headers = auth | {KEY_VERSION_HEADER: str(version)}
                sent = time.monotonic()
                r = c.post(f"/v1/deployments/{DEPLOYMENT}/sessions", headers=headers)
                if r.status_code != 201:
                    log.append(Answer(sent, time.monotonic(), version, r.status_code, _code(r)))
                if r.status_code == 409 and _code(r) == E_KEY_OUTDATED and version == 1:
                    version = 2
                    continue
                if r.status_code != 201:
                    failures.append(f"{name}: session: {r.status_code} {r.text}")
                    return
                session = r.json()["session_id"]
                for step in range(IDS.shape[1]):
                    sent = time.monotonic()
                    r = c.post(
                        f"/v1/deployments/{DEPLOYMENT}/forward",
                        content=forward_body_at(m, version, step),
                        headers=headers,
                        params={"session_id": session, "output": "last"},
                    )
                    log.append(Answer(sent, time.monotonic(), version, r.status_code, _code(r)))
                    if r.status_code == 409 and _code(r) == E_KEY_OUTDATED and version == 1:
                        version = 2  # the session's cache is of the old key: a new session
                        break
                    try:
                        check_answer(m, version, r, refs[step + 1][:, -1:])
                    except AssertionError as e:
                        failures.append(f"{name} step {step}: {e}")
                        return
                c.delete(f"/v1/sessions/{session}", headers=auth)

    def slow_body() -> Iterator[bytes]:
        push_window.append(time.monotonic())
        step = 4096
        for i in range(0, len(body), step):
            time.sleep(0.02)
            yield body[i : i + step]

    users = [threading.Thread(target=stateless, args=(f"u{i}",), name=f"u{i}") for i in range(2)]
    users.append(threading.Thread(target=in_sessions, args=("s0",), name="s0"))

    def answered(version: int) -> bool:  # every user has had an answer under `version` (or failed)
        names = [t.name for t in users]
        return bool(failures) or all(
            any(a.version == version and a.status == 200 for a in logs.get(n, [])) for n in names
        )

    for t in users:
        t.start()
    wait_for(lambda: answered(1), 30, "every user to be served by v1")
    r = p2.push(slow_body(), digest, **{"Content-Length": str(len(body))})
    push_window.append(time.monotonic())
    wait_for(lambda: answered(2), 30, "every user to be served by v2")
    stop.set()
    for t in users:
        t.join(30)
    assert r.status_code == 200, r.text
    assert failures == []

    start, done = push_window
    for name, log in logs.items():
        statuses = [(a.version, a.status) for a in log]
        errors = [a for a in log if a.status != 200]
        # the only failure: one key_outdated, on the switch from v1 to v2
        assert [(a.version, a.status, a.code) for a in errors] == [(1, 409, E_KEY_OUTDATED)], (name, statuses)
        switch = log.index(errors[0])
        assert all(a.version == 1 and a.status == 200 for a in log[:switch])
        assert all(a.version == 2 and a.status == 200 for a in log[switch + 1 :])
        assert log[switch].sent >= start  # v1 answered every request sent before the push began
        assert log[switch].received <= done + 0.3
        served_during_push = [a for a in log[:switch] if a.sent > start]
        assert served_during_push, f"{name}: no v1 answer while v2 streamed in"
        assert any(a.version == 2 for a in log), name
    serves(p2, m, 2)


def forward_body_at(m: Versions, version: int, step: int) -> bytes:
    """Row `step` of IDS, embedded and permuted (RoPE positions are P2's cache's business)."""
    return forward_body(m, version, IDS[:, step : step + 1])


def _code(r: httpx.Response) -> str | None:
    if r.status_code < 400:
        return None
    try:
        return str(r.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


def test_p2_restarted_after_refused_pushes_serves_the_same_version(tmp_path: Path, m: Versions) -> None:
    """What survives a restart is exactly the active version: refused pushes leave no trace."""
    data = tmp_path / "data"
    with live_p2(data) as p:
        body, digest = m.v1.body(m.signer)
        assert p.push(body, digest).status_code == 200
        new, new_digest = m.v2.body(m.signer)
        send_raw_push(p, new, len(new) // 2, new_digest)
        p.settle(1)
        bad = invalid_bodies(m)["a weight of the wrong shape"]
        assert p.push(bad, sha(bad)).status_code == 400
    with live_p2(data) as p:
        serves(p, m, 1)
        assert p.push(new, new_digest).status_code == 200
    with live_p2(data) as p:
        serves(p, m, 2)


def test_a_session_step_racing_the_switch_never_gets_a_wrong_answer(
    p2: LiveP2, m: Versions, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the switch to v2 frees the caches of v1's sessions under the session store's
    lock. A v1 session step that had already passed its checks, and waited for that lock to
    reserve memory, ran on the freed cache with the full mask: 200, key version 1, wrong logits.
    Now the step sees the session dropped and answers key_outdated."""
    name = "racer"
    auth = {"Authorization": f"Bearer {m.credential(name)}", KEY_VERSION_HEADER: "1"}
    session = p2.http.post(f"/v1/deployments/{DEPLOYMENT}/sessions", headers=auth).json()["session_id"]
    url, params = f"/v1/deployments/{DEPLOYMENT}/forward", {"session_id": session, "output": "last"}
    for step in range(3):
        r = p2.http.post(url, content=forward_body_at(m, 1, step), headers=auth, params=params)
        check_answer(m, 1, r, reference(m, IDS[:, : step + 1])[:, -1:])

    store = p2.service.sessions
    reserve = store.reserve

    def switch_first(*args: Any, **kwargs: Any) -> Any:
        store.drop_stale(DEPLOYMENT, 2)  # what the switch to v2 does, landing just now
        return reserve(*args, **kwargs)

    monkeypatch.setattr(store, "reserve", switch_first)
    r = p2.http.post(url, content=forward_body_at(m, 1, 3), headers=auth, params=params)
    assert r.status_code == 409 and error_code(r) == E_KEY_OUTDATED, (r.status_code, r.text[:200])


def test_a_forward_that_fails_inside_the_model_leaves_the_session_as_it_was(
    p2: LiveP2, m: Versions, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: after a failure inside the model (out of memory, a device error) the session's
    cache is cut back to where it was. transformers 5's `crop` takes a negative count, so the
    rollback always failed and reset the session: the next step ran from position 0 (session
    length 1, wrong logits)."""
    auth = {"Authorization": f"Bearer {m.credential('bob')}", KEY_VERSION_HEADER: "1"}
    session = p2.http.post(f"/v1/deployments/{DEPLOYMENT}/sessions", headers=auth).json()["session_id"]
    url, params = f"/v1/deployments/{DEPLOYMENT}/forward", {"session_id": session, "output": "last"}
    r = p2.http.post(url, content=forward_body(m, 1, IDS[:, :3]), headers=auth, params=params)
    check_answer(m, 1, r, reference(m, IDS[:, :3])[:, -1:])

    model = p2.service.deployment(DEPLOYMENT).model
    forward = model.forward

    def fails_after_the_cache_grew(*args: Any, **kwargs: Any) -> Any:
        forward(*args, **kwargs)  # every layer appended this step's keys and values
        raise RuntimeError("device lost")

    monkeypatch.setattr(model, "forward", fails_after_the_cache_grew)
    r = p2.http.post(url, content=forward_body_at(m, 1, 3), headers=auth, params=params)
    assert r.status_code == 500, r.text
    monkeypatch.setattr(model, "forward", forward)
    r = p2.http.post(url, content=forward_body_at(m, 1, 3), headers=auth, params=params)
    check_answer(m, 1, r, reference(m, IDS[:, :4])[:, -1:])
    assert wire.decode(r.content)[1]["session_length"] == "4"
