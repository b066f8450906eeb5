"""P2's logic, testable without HTTP: weight pushes, deployments, sessions, forward passes.

P2 holds θ′ (transformed weights, no embedding module), P1's public verification key per
deployment, and per session a KV cache of permuted activations. It never holds or accepts a
permutation, an embedding table or a token id: a push with an integer tensor or a non-zero
embedding table is refused, and a forward body carries only `inputs_embeds` and
`attention_mask`. The one exception is a deployment P1 created in token mode (PROTOCOL.md
section 7, cloud_service.generation): its push, marked so in the metadata, carries the permuted
token table E′, and P2 generates on ids relabelled by π_c.

Concurrency: forwards of a deployment run in its scheduler's thread (cloud_service.batching),
which batches concurrent requests into one forward of the stock model; request threads only
parse and check bodies. Pushes of one deployment are serialised by an async lock, stream to a temporary file, and
switch the registry entry in one assignment once the new model is loaded, so the old
version serves until then.
"""

import asyncio
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

import anyio
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from safetensors import safe_open

from cloud_service import engines, generation
from cloud_service.batching import Batcher, BatchItem, InputShape, Job, batchable, forward_batch
from cloud_service.errors import (
    BadInput,
    CloudError,
    Forbidden,
    Internal,
    KeyOutdated,
    NotFound,
    PushesDisabled,
    SenderGone,
    SessionExpired,
    Unauthorized,
    UnknownDeployment,
    UnknownSession,
    VersionConflict,
)
from cloud_service.metrics import Metrics
from cloud_service.schemas import ForwardOptions, ForwardResult, PushManifest
from cloud_service.sessions import Clock, Session, SessionStore, Tombstone
from cloud_service.settings import CloudSettings
from cloud_service.storage import Storage, valid_deployment_id
from shared import credentials, wire
from shared.api import (
    ATTENTION_MASK,
    HIDDEN_STATES,
    INPUTS_EMBEDS,
    LOGITS,
    META_DEPLOYMENT,
    META_DTYPE,
    META_KEY_VERSION,
    META_SESSION_LENGTH,
    POOLED,
    PUSH_CONFIG,
    PUSH_DEPLOYMENT,
    PUSH_FAMILY,
    PUSH_KEY_VERSION,
    PUSH_MODE,
    PUSH_VERIFY_KEY,
    TOPK_INDICES,
    TOPK_VALUES,
    DeploymentDeleted,
    DeploymentInfo,
    LoadProgress,
    Mode,
    PushResult,
    Revocations,
    RevocationsResult,
    Revoked,
    SessionCreated,
)
from shared.credentials import Claims
from shared.errors import CredentialError, PayloadTooLarge, StipCoreError
from shared.families import CloudOutput, Family, detect_family, get_family
from shared.families.base import CausalLMFamily
from shared.model_config import ModelConfig
from shared.runtime import CloudModel

log = logging.getLogger("stip.cloud")

INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WEIGHT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
FLUSH_BYTES = 4 << 20  # push bytes buffered before each write to disk
HEX64 = frozenset("0123456789abcdef")
INLINE_PARSE_BYTES = 64 << 10  # forward bodies parsed on the event loop: a thread hop costs more
VERIFIED_CREDENTIALS = 4096  # verified credentials remembered (least recently used dropped)


@dataclass
class Deployment:
    """One active key version of a deployment: θ′ on the device and P1's verification key."""

    deployment_id: str
    key_version: int
    sha256: str
    verify_key: str  # P1's Ed25519 public key (base64url): verifies user credentials
    model: CloudModel | engines.VllmModel  # the engine running θ′ (cloud_service.engines)
    keeps_cache: bool  # decoder with a KV cache: sessions are possible
    max_positions: int | None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    batcher: Batcher | None = field(default=None, repr=False)  # its scheduler, made on first use
    mode: Mode = "embeds"  # "token": θ′ holds E′ and serves generate (cloud_service.generation)

    @property
    def family(self) -> Family:
        return self.model.family

    @property
    def kv_bytes_per_token(self) -> int:
        """Approximate KV cache bytes one token of one batch row adds (keys and values, all layers)."""
        dims = self.model.dims
        itemsize = torch.empty((), dtype=self.model.dtype).element_size()
        return 2 * dims.n_layers * dims.n_kv_heads * dims.head_dim * itemsize

    def info(self) -> DeploymentInfo:
        dims = self.model.dims
        return DeploymentInfo(
            deployment_id=self.deployment_id,
            family=self.family.name,
            d_model=dims.d_model,
            d_out=dims.d_out,
            n_layers=dims.n_layers,
            key_version=self.key_version,
            status="active",
            device=str(self.model.device),
            dtype=str(self.model.dtype).removeprefix("torch."),
            max_positions=self.max_positions,
            mode=self.mode,
        )


class _Verified:
    """A bounded LRU map (deployment, verify key, token) -> Claims of verified credentials.

    Only a signature that verified is remembered, under the exact token and the key that
    verified it (a push with another P1 key misses); the caller still checks expiry and
    revocation on every use.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str, str], Claims] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, str]) -> Claims | None:
        with self._lock:
            claims = self._items.get(key)
            if claims is not None:
                self._items.move_to_end(key)
            return claims

    def put(self, key: tuple[str, str, str], claims: Claims) -> None:
        with self._lock:
            self._items[key] = claims
            while len(self._items) > self.size:
                self._items.popitem(last=False)


@dataclass
class _Request(InputShape):
    """A parsed, checked forward request waiting for the scheduler."""

    x: torch.Tensor  # (B, S, d) permuted by π, as received
    mask: torch.Tensor | None  # (B, S) int64, the new rows only
    options: ForwardOptions
    claims: Claims
    start: float  # perf_counter when it arrived


@dataclass
class _Step:
    """A request in the scheduler's hands: its batch item and, for a session, the session."""

    request: _Request
    item: BatchItem
    session: Session | None = None
    broken: bool = False  # its cache could not be restored after a failed forward


def resolve_device(name: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"STIP_CLOUD_DEVICE={name}, but no CUDA device is available")
    return torch.device(name)


class CloudService:
    def __init__(self, settings: CloudSettings, *, metrics: Metrics | None = None, clock: Clock = time.monotonic):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.device = resolve_device(settings.device)
        self.storage = Storage(settings.data_dir)
        self.sessions = SessionStore(
            max_sessions=settings.max_sessions,
            idle_ttl_s=settings.session_idle_ttl_s,
            memory_bytes=settings.session_memory_bytes,
            max_per_user=settings.max_sessions_per_user,
            memory_bytes_per_user=settings.session_memory_bytes_per_user,
            clock=clock,
        )
        self.ready = False
        self._deployments: dict[str, Deployment] = {}
        self._revoked: dict[str, dict[str, int]] = {}  # deployment -> {jti: expires_at}, from P1
        self._revocations_lock = threading.Lock()
        self._push_locks: dict[str, anyio.Lock] = {}
        self._installing: dict[str, LoadProgress] = {}  # pushes past their last byte, for P1 to poll
        self._batchers_lock = threading.Lock()
        # credentials whose signature verified, so a generation's steps skip the Ed25519 check
        self._verified: _Verified = _Verified(VERIFIED_CREDENTIALS)
        self.metrics.bind(
            sessions=lambda: self.sessions.count,
            cache_bytes=lambda: self.sessions.used_bytes,
            deployments=lambda: len(self._deployments),
        )

    # --- startup -------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the data directory and delete what an interrupted push left (blocking)."""
        self.storage.prepare()

    def load_all(self) -> None:
        """Load every active deployment from disk (blocking).

        A deployment whose file is missing or does not load is logged and skipped: it is
        unknown (404) until P1 pushes it again; the others serve.
        """
        for record in self.storage.active_records():
            path = self.storage.path(record)
            try:
                if not path.is_file() or path.stat().st_size != record.size:
                    raise BadInput(f"{path.name} is missing or not of the recorded size")
                manifest = inspect_push(path, record.deployment_id)
                if manifest.key_version != record.key_version:
                    raise BadInput(f"{path.name} holds key version {manifest.key_version}")
                dep = self._load(path, manifest, record.sha256)
            except Exception as e:  # one bad deployment never keeps the others from serving
                message = getattr(e, "message", None) or f"{type(e).__name__}: {_short(e)}"
                log.error("deployment %s not reloaded: %s", record.deployment_id, message)
                continue
            self._deployments[dep.deployment_id] = dep
            self._revoked[dep.deployment_id] = _unexpired(self.storage.read_revocations(dep.deployment_id))
            log.info(
                "deployment %s reloaded: %s, key version %d, on %s",
                dep.deployment_id,
                dep.family.name,
                dep.key_version,
                dep.model.device,
            )

    async def start(self) -> None:
        """Load the deployments in a worker thread, then declare the service ready."""
        await anyio.to_thread.run_sync(self.load_all)
        self.ready = True
        log.info("ready: %d deployment(s)", len(self._deployments))

    def close(self) -> None:
        """Stop what the engines run outside this process (vLLM servers), at shutdown (blocking)."""
        self.ready = False
        engines.close_models([dep.model for dep in self._deployments.values()])

    # --- deployments and credentials ----------------------------------------------------

    def deployment(self, deployment_id: str) -> Deployment:
        dep = self._deployments.get(deployment_id)
        if dep is None:
            raise UnknownDeployment(f"unknown deployment {deployment_id!r}")
        return dep

    @property
    def deployment_count(self) -> int:
        return len(self._deployments)

    def authorize_push(self, token: str | None) -> None:
        expected = self.settings.push_token
        if expected is None:
            raise PushesDisabled("this service accepts no weights: STIP_CLOUD_PUSH_TOKEN is not set")
        if not token or not secrets.compare_digest(token.encode(), expected.get_secret_value().encode()):
            raise Unauthorized("a valid push token is required: Authorization: Bearer <push token>")

    def authorize_user(self, dep: Deployment, token: str | None) -> Claims:
        """Verify a user credential offline against the deployment's key (401, or 403 for another deployment)."""
        if not token:
            raise Unauthorized("a user credential is required: Authorization: Bearer <credential>")
        cached = self._verified.get((dep.deployment_id, dep.verify_key, token))
        if cached is not None:  # signature checked before: expiry and revocation are checked on every use
            return self._in_force(dep, cached)
        try:
            claims = credentials.verify(token, dep.verify_key, deployment_id=dep.deployment_id)
        except CredentialError as e:
            other = _claimed_deployment(token)
            if other is None or other == dep.deployment_id:
                raise Unauthorized(f"invalid user credential: {e}") from None
        else:
            if claims.jti in self._revoked.get(dep.deployment_id, {}):
                raise Unauthorized("the user credential has been revoked by the model owner")
            self._verified.put((dep.deployment_id, dep.verify_key, token), claims)
            return claims
        # Signed for another deployment: genuine (403) or not (401)?
        peer = self._deployments.get(other)
        try:
            credentials.verify(token, peer.verify_key if peer else dep.verify_key, deployment_id=other)
        except CredentialError as e:
            raise Unauthorized(f"invalid user credential: {e}") from None
        raise Forbidden(
            f"the credential is for another deployment ({other!r}, not {dep.deployment_id!r}): use it with "
            f"{other!r}, or ask the model owner for a credential for {dep.deployment_id!r}"
        )

    def authorize_step(self, dep: Deployment, token: str | None, session_id: str | None) -> Claims:
        """`authorize_user` for a forward, which may also carry the token of its session instead
        of the credential (sessions.py): a token without a dot (a credential has two) with a
        `session_id` is checked against that session of this deployment, then the claims of the
        credential that opened it against expiry and revocation, as for the credential itself."""
        if session_id is None or not token or "." in token:
            return self.authorize_user(dep, token)
        session = self.sessions.authenticate(session_id, token)
        if session is None or session.claims is None or session.deployment_id != dep.deployment_id:
            raise Unauthorized(
                "invalid session token: it opens only the live session it was issued with (the session_token "
                "of POST /v1/deployments/{id}/sessions); otherwise send the user credential: "
                "Authorization: Bearer <credential>"
            )
        if session.verify_key != dep.verify_key:
            raise Unauthorized("the session was opened under another key of the model owner: open a new session")
        return self._in_force(dep, session.claims)

    def _in_force(self, dep: Deployment, claims: Claims) -> Claims:
        """Claims whose signature verified earlier, checked again for expiry and revocation."""
        if int(time.time()) >= claims.exp:
            raise Unauthorized("invalid user credential: credential has expired")
        if claims.jti in self._revoked.get(dep.deployment_id, {}):
            raise Unauthorized("the user credential has been revoked by the model owner")
        return claims

    def set_revocations(self, deployment_id: str, revocations: Revocations) -> RevocationsResult:
        """Replace a deployment's revoked credentials with P1's list, durably (blocking: disk).

        P2 checks credentials offline; this list is how a revocation on P1 reaches it before the
        credential expires. Entries already expired are dropped: the signature check refuses those.
        """
        self.deployment(deployment_id)  # 404: P1 sends the list again after its next push
        live = _unexpired(revocations)
        kept = Revocations(revoked=[Revoked(jti=j, expires_at=e) for j, e in sorted(live.items())])
        with self._revocations_lock:  # two lists in flight: the file and the dict end up the same one
            self.storage.write_revocations(deployment_id, kept)
            self._revoked[deployment_id] = live
        log.info("deployment %s: %d revoked credential(s) refused until they expire", deployment_id, len(live))
        return RevocationsResult(deployment_id=deployment_id, revoked=len(live))

    async def delete_deployment(self, deployment_id: str) -> DeploymentDeleted:
        """Forget a deployment (P1 deleted it): unload θ′, end its sessions, remove its files.

        The caller has checked the push token. Idempotent while files remain; UnknownDeployment
        (404, which P1 takes as done) when there is neither a loaded deployment nor a directory.
        """
        if not valid_deployment_id(deployment_id):
            raise UnknownDeployment(f"unknown deployment {deployment_id!r}")
        async with self._push_locks.setdefault(deployment_id, anyio.Lock()):  # not during a push's switch
            dep = self._deployments.pop(deployment_id, None)
            ended = self.sessions.drop_deployment(deployment_id)
            with self._revocations_lock:
                self._revoked.pop(deployment_id, None)
            removed = await anyio.to_thread.run_sync(self.storage.remove_deployment, deployment_id)
        if dep is None and not removed:
            raise UnknownDeployment(f"unknown deployment {deployment_id!r}")
        if dep is not None:
            await anyio.to_thread.run_sync(engines.close_model, dep.model)
        if dep is not None and dep.model.device.type == "cuda":
            del dep  # requests still in flight keep their reference until they finish
            torch.cuda.empty_cache()
        log.info("deployment %s deleted: θ′ unloaded and removed, %d session(s) ended", deployment_id, ended)
        return DeploymentDeleted(deployment_id=deployment_id, sessions_ended=ended)

    def check_key_version(self, dep: Deployment, key_version: int | None) -> None:
        if key_version is not None and key_version != dep.key_version:
            raise KeyOutdated(
                f"tensors permuted with key version {key_version}, but {dep.deployment_id!r} serves "
                f"key version {dep.key_version}: fetch the current user key"
            )

    # --- weight push ---------------------------------------------------------------------

    async def push(
        self,
        deployment_id: str,
        chunks: AsyncIterator[bytes],
        *,
        digest: str | None,
        content_length: int | None = None,
        key_version: int | None = None,
        sender_gone: Callable[[], Awaitable[bool]] | None = None,
    ) -> PushResult:
        """Receive θ′ (one safetensors body) and activate it once complete, verified and loaded.

        The caller has checked the push token. Nothing becomes active, and no file stays
        behind, unless every step succeeds. `sender_gone` (the HTTP layer's disconnect check)
        is asked once the new model is loaded: a push whose sender is no longer there to hear
        the answer is not activated (SenderGone), so a P1 that crashed, or gave up waiting,
        never finds a version active that it has already written off.
        """
        if not valid_deployment_id(deployment_id):
            raise BadInput("a deployment id is 1-128 letters, digits, '.', '_' or '-', not starting with '.'")
        digest = (digest or "").strip().lower()
        if len(digest) != 64 or not set(digest) <= HEX64:
            raise BadInput("header X-Stip-Sha256 must carry the body's SHA-256 as 64 hex digits")
        limit = self.settings.max_push_bytes
        if content_length is not None and content_length > limit:
            raise PayloadTooLarge(f"push of {content_length} bytes exceeds the limit of {limit}")
        temp = self.storage.new_temp()
        try:
            size, actual = await self._receive(chunks, temp, limit)
            if not secrets.compare_digest(actual, digest):
                raise BadInput("the body's SHA-256 does not match X-Stip-Sha256: incomplete or altered push")
            manifest = await anyio.to_thread.run_sync(inspect_push, temp, deployment_id)
            if key_version is not None and key_version != manifest.key_version:
                raise BadInput(f"header key version {key_version} differs from the body's {manifest.key_version}")
            self._report(manifest, "verifying")
            async with self._push_locks.setdefault(deployment_id, anyio.Lock()):
                result = await self._install(temp, manifest, actual, size, sender_gone)
        except BaseException:
            self.metrics.pushes.labels("rejected").inc()
            raise
        finally:
            temp.unlink(missing_ok=True)  # gone already when it became the version file
            self._installing.pop(deployment_id, None)
        return result

    def push_progress(self, deployment_id: str) -> LoadProgress:
        """Where the push of `deployment_id` that P2 is installing stands (P1 polls it)."""
        progress = self._installing.get(deployment_id)
        if progress is None:
            raise NotFound(f"P2 is installing no push of {deployment_id!r} now")
        return progress

    def _report(self, manifest: PushManifest, stage: str, done: int = 0, total: int = 0) -> None:
        self._installing[manifest.deployment_id] = LoadProgress.model_validate(
            {
                "deployment_id": manifest.deployment_id,
                "key_version": manifest.key_version,
                "stage": stage,
                "done": done,
                "total": total,
            }
        )

    async def _install(
        self,
        temp: Path,
        manifest: PushManifest,
        sha256: str,
        size: int,
        sender_gone: Callable[[], Awaitable[bool]] | None = None,
    ) -> PushResult:
        """Under the deployment's push lock: check the version, load, then switch atomically."""
        deployment_id, key_version = manifest.deployment_id, manifest.key_version
        current = self._deployments.get(deployment_id)
        if current is not None:
            if key_version < current.key_version:
                raise VersionConflict(f"key version {key_version} is older than the active {current.key_version}")
            if key_version == current.key_version:
                if not secrets.compare_digest(current.sha256, sha256):
                    raise VersionConflict(f"key version {key_version} is already active with other weights")
                self.metrics.pushes.labels("unchanged").inc()
                return PushResult(deployment_id=deployment_id, key_version=key_version, status="active", sha256=sha256)
        await _check_sender(sender_gone, key_version)
        dep = await anyio.to_thread.run_sync(self._load, temp, manifest, sha256)
        try:
            await _check_sender(sender_gone, key_version)  # the last moment before the switch
            loaded = self._installing[deployment_id].total
            self._report(manifest, "activating", loaded, loaded)
            record = await anyio.to_thread.run_sync(
                lambda: self.storage.activate(temp, deployment_id=deployment_id, key_version=key_version, sha256=sha256)
            )
        except BaseException:
            await anyio.to_thread.run_sync(engines.close_model, dep.model)  # never activated: no engine left behind
            raise
        self._deployments[deployment_id] = dep  # the switch: new requests see the new version
        dropped = self.sessions.drop_stale(deployment_id, key_version)
        await anyio.to_thread.run_sync(self.storage.remove_inactive, record)
        if current is not None:  # the old version's engine (a vLLM server) ends once the new one serves
            await anyio.to_thread.run_sync(engines.close_model, current.model)
        if current is not None and current.model.device.type == "cuda":
            del current  # requests still in flight keep their reference until they finish
            torch.cuda.empty_cache()
        self.metrics.pushes.labels("activated").inc()
        log.info(
            "deployment %s: key version %d active (%s, %d bytes, sha256 %s...)%s",
            deployment_id,
            key_version,
            dep.family.name,
            size,
            sha256[:12],
            f"; {dropped} session(s) of the old version ended" if dropped else "",
        )
        return PushResult(deployment_id=deployment_id, key_version=key_version, status="active", sha256=sha256)

    async def _receive(self, chunks: AsyncIterator[bytes], temp: Path, limit: int) -> tuple[int, str]:
        """Stream the body into `temp` while hashing it; PayloadTooLarge past `limit`."""
        h = hashlib.sha256()
        size = 0
        buf = bytearray()
        f = temp.open("wb")
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"push exceeds the limit of {limit} bytes")
                buf += chunk
                if len(buf) >= FLUSH_BYTES:
                    data, buf = bytes(buf), bytearray()
                    await anyio.to_thread.run_sync(_write, f, h, data)
            await anyio.to_thread.run_sync(_write, f, h, bytes(buf), True)
        finally:
            f.close()
            self.metrics.push_bytes.inc(size)
        return size, h.hexdigest()

    def _load(self, path: Path, manifest: PushManifest, sha256: str) -> Deployment:
        """Build the stock class on θ′ and run one test forward (blocking)."""
        model: CloudModel | engines.VllmModel | None = None
        try:
            name = f"engine-{manifest.deployment_id}-v{manifest.key_version}-{secrets.token_hex(4)}"
            work_dir = self.storage.tmp_dir / name  # a vLLM server's model dir and log (removed with it)
            model = engines.load_model(
                self.settings,
                manifest,
                path,
                self.device,
                work_dir=work_dir,
                on_progress=partial(self._report, manifest, "loading"),
            )
            # a reload at start has no push in progress, and a vLLM server reports no loading progress
            progress = self._installing.get(manifest.deployment_id)
            loaded = progress.total if progress is not None else 0
            self._report(manifest, "testing", loaded, loaded)
            x = torch.zeros(1, 1, model.dims.d_model)
            probe = model.forward(x, torch.ones(1, 1, dtype=torch.long), None, last_only=True)
            if manifest.mode == "token" and isinstance(model, CloudModel):
                generation.prepare(model.model)
        except BaseException as e:
            if model is not None:
                engines.close_model(model)
            if isinstance(e, (StipCoreError, CloudError)) or not isinstance(e, Exception):
                raise
            if isinstance(e, torch.OutOfMemoryError):
                raise Internal(f"out of memory while loading {manifest.deployment_id!r} on {self.device}") from None
            raise BadInput(f"the pushed model cannot be loaded: {type(e).__name__}: {_short(e)}") from None
        keeps_cache = not model.family.is_encoder and probe.cache is not None
        max_positions = ModelConfig.from_json(manifest.config).max_position_embeddings  # checked by family.dims
        return Deployment(
            deployment_id=manifest.deployment_id,
            key_version=manifest.key_version,
            sha256=sha256,
            verify_key=manifest.verify_key,
            model=model,
            keeps_cache=keeps_cache,
            max_positions=max_positions,
            mode=manifest.mode,
        )

    # --- sessions ------------------------------------------------------------------------

    def create_session(self, dep: Deployment, claims: Claims) -> SessionCreated:
        if not dep.keeps_cache:
            raise BadInput(
                f"the {dep.family.name} model of {dep.deployment_id!r} keeps no KV cache: "
                "send each sequence whole, without a session"
            )
        session = self.sessions.create(
            deployment_id=dep.deployment_id,
            subject=claims.sub,
            key_version=dep.key_version,
            claims=claims,
            verify_key=dep.verify_key,
        )
        return SessionCreated(
            session_id=session.session_id,
            session_token=session.token,
            deployment_id=dep.deployment_id,
            key_version=dep.key_version,
            idle_ttl_s=int(self.sessions.idle_ttl_s),
        )

    def delete_session(self, session_id: str, token: str | None) -> None:
        if not token:
            raise Unauthorized("a user credential is required: Authorization: Bearer <credential>")
        found = self.sessions.lookup(session_id, touch=False)
        dep = self._deployments.get(found.deployment_id)
        if dep is None:
            raise UnknownSession("unknown session")
        claims = self.authorize_user(dep, token)
        if claims.sub != found.subject:
            raise Forbidden("the session belongs to another user")
        self.sessions.delete(session_id)
        if dep.batcher is not None:
            dep.batcher.forget(session_id)
        if isinstance(found, Tombstone):
            raise SessionExpired("the session had already expired")

    def _session_for(self, dep: Deployment, session_id: str, claims: Claims) -> Session:
        session = self.sessions.get(session_id)
        if session.deployment_id != dep.deployment_id:
            raise UnknownSession(f"unknown session for deployment {dep.deployment_id!r}")
        if session.subject != claims.sub:
            raise Forbidden("the session belongs to another user")
        if session.stale or session.key_version != dep.key_version:
            raise KeyOutdated(
                f"the session was created under key version {session.key_version}; "
                f"{dep.deployment_id!r} now serves key version {dep.key_version}: fetch the current "
                "user key and start a new session"
            )
        return session

    # --- forward -------------------------------------------------------------------------

    def forward(self, dep: Deployment, body: bytes, options: ForwardOptions, claims: Claims) -> ForwardResult:
        """One forward pass (blocking: run it in a worker thread). Body and result are safetensors."""
        return self.submit_forward(dep, body, options, claims).result()

    async def forward_async(
        self,
        dep: Deployment,
        body: bytes,
        options: ForwardOptions,
        claims: Claims,
        *,
        limiter: anyio.CapacityLimiter | None = None,
    ) -> ForwardResult:
        """`forward` for the event loop: parsed (in a worker thread unless the body is small, like
        a decode step's), then awaited without holding a thread while the scheduler runs it."""
        if len(body) <= INLINE_PARSE_BYTES:
            future = self.submit_forward(dep, body, options, claims)
        else:
            future = await anyio.to_thread.run_sync(self.submit_forward, dep, body, options, claims, limiter=limiter)
        return await asyncio.wrap_future(future)

    def submit_forward(
        self, dep: Deployment, body: bytes, options: ForwardOptions, claims: Claims
    ) -> "Future[ForwardResult]":
        """Parse and check a forward body (blocking, cheap), then queue it for the deployment's
        scheduler (cloud_service.batching), which runs it batched with concurrent requests."""
        start = time.perf_counter()
        tensors, _ = wire.decode(body, max_bytes=self.settings.max_body_bytes)
        x, mask = self._check_inputs(dep, tensors)
        self._check_options(dep, options)
        request = _Request(x=x, mask=mask, options=options, claims=claims, start=start)
        return self._batcher(dep).submit(
            Job(rows=request.rows, seq=request.seq, session_id=options.session_id, payload=request)
        )

    def _batcher(self, dep: Deployment) -> Batcher:
        with self._batchers_lock:
            if dep.batcher is None:
                s = self.settings
                dep.batcher = Batcher(
                    partial(self._run_batch, dep),
                    max_rows=s.batch_max_rows,
                    max_tokens=s.batch_max_tokens,
                    max_wait_s=s.batch_wait_ms / 1000,
                    name=f"stip-batcher-{dep.deployment_id}",
                )
            return dep.batcher

    # --- forward execution (the scheduler's thread) ---------------------------------------

    def _run_batch(self, dep: Deployment, jobs: list[Job]) -> None:
        """Run the jobs the scheduler gathered: one batched forward where exact, else one by one.

        Settles every job's future. A batched forward that fails is retried request by request,
        so each request hears its own outcome.
        """
        steps: list[tuple[Job, _Step]] = []
        for job in jobs:
            try:
                steps.append((job, self._begin(dep, job.payload)))
            except BaseException as e:
                job.future.set_exception(e)
        if isinstance(dep.model, engines.VllmModel):
            self._run_on_engine(dep, dep.model, steps)
            return
        items = [step.item for _, step in steps]
        if batchable(dep.model, items, dep.max_positions):
            try:
                with dep.lock:
                    started = time.perf_counter()
                    outs = forward_batch(dep.model, items)
                    self.metrics.model_seconds.observe(time.perf_counter() - started)
                    self.metrics.batch_rows.observe(sum(item.rows for item in items))
            except Exception as e:
                log.warning(
                    "batched forward of %d requests failed (%s); running them one by one", len(items), type(e).__name__
                )
                for _, step in steps:
                    if step.session is not None and not _rollback(step.item.cache, step.item.past):
                        step.broken = True
            else:
                for (job, step), out in zip(steps, outs, strict=True):
                    self._settle(dep, job, step, out)
                return
        for job, step in steps:
            try:
                if step.broken:
                    raise Internal("the session's cache was lost in a failed batch; start a new session")
                with dep.lock:
                    started = time.perf_counter()
                    out = self._run_alone(dep, step)
                    self.metrics.model_seconds.observe(time.perf_counter() - started)
                    self.metrics.batch_rows.observe(step.item.rows)
            except BaseException as e:
                if step.session is not None:
                    self.sessions.release(step.session)
                    if step.broken:
                        self.sessions.delete(step.session.session_id)
                job.future.set_exception(e)
                continue
            self._settle(dep, job, step, out)

    def _run_on_engine(self, dep: Deployment, model: engines.VllmModel, steps: list[tuple[Job, "_Step"]]) -> None:
        """vLLM batches by itself (continuous batching): the gathered requests go to it at once."""

        def one(job: Job, step: "_Step") -> None:
            item, options = step.item, step.request.options
            try:
                started = time.perf_counter()
                new = item.mask if item.mask is not None else torch.ones(item.rows, item.seq, dtype=torch.long)
                mask = new if item.held is None else torch.cat([item.held, new], dim=1)  # (B, past + S)
                top_k = options.k if options.output == "topk" else None  # the engine sends k logits, not V
                out = model.forward(item.x, mask, item.cache, last_only=options.output != "all", top_k=top_k)
                self.metrics.model_seconds.observe(time.perf_counter() - started)
            except BaseException as e:
                if step.session is not None:
                    self.sessions.release(step.session)
                job.future.set_exception(e)
                return
            self._settle(dep, job, step, out)

        if len(steps) == 1:
            one(*steps[0])
            return
        self.metrics.batch_rows.observe(sum(step.item.rows for _, step in steps))
        threads = [threading.Thread(target=one, args=pair, name="stip-engine-request") for pair in steps]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _begin(self, dep: Deployment, request: "_Request") -> "_Step":
        """Checks that depend on the session's state, and its cache snapshot (reserved memory)."""
        device, dtype = dep.model.device, dep.model.dtype
        x = request.x.to(device, dtype)
        mask = request.mask.to(device) if request.mask is not None else None
        last_only = request.options.output != "all"
        if request.options.session_id is None:
            self._check_positions(dep, 0, request.seq)
            if mask is not None:
                _check_rows(mask)
            return _Step(request, BatchItem(x=x, mask=mask, last_only=last_only))
        session = self._session_for(dep, request.options.session_id, request.claims)
        batch, seq = request.rows, request.seq
        # cache and mask read together, under the session store's lock (a rotation may free them)
        cache, held = self.sessions.reserve(session, dep.kv_bytes_per_token * batch * seq)  # held: (B, past)
        try:
            past = 0 if held is None else int(held.shape[1])
            if held is not None and held.shape[0] != batch:
                raise BadInput(f"the session holds {held.shape[0]} rows; this request has {batch}")
            self._check_positions(dep, past, seq)
            new = mask if mask is not None else torch.ones(batch, seq, dtype=torch.long, device=device)
            _check_rows(new if held is None else torch.cat([held, new], dim=1))
        except BaseException:
            self.sessions.release(session)
            raise
        item = BatchItem(x=x, mask=mask, cache=cache, held=held, last_only=last_only, keep_cache=True)
        return _Step(request, item, session)

    def _run_alone(self, dep: Deployment, step: "_Step") -> CloudOutput:
        """One request's forward without padding (the caller holds the model lock)."""
        item = step.item
        if step.session is None:
            return dep.model.forward(item.x, item.mask, None, last_only=item.last_only)
        new = (
            item.mask
            if item.mask is not None
            else torch.ones(item.rows, item.seq, dtype=torch.long, device=item.x.device)
        )
        full = new if item.held is None else torch.cat([item.held, new], dim=1)  # (B, past + S)
        try:
            return dep.model.forward(item.x, full, item.cache, last_only=item.last_only)
        except BaseException:
            if not _rollback(item.cache, item.past):  # a cache in an unknown state must not serve another step
                step.broken = True
            raise

    def _settle(self, dep: Deployment, job: Job, step: "_Step", out: CloudOutput) -> None:
        """Store a session's extended cache, encode the answer and hand it to the waiting request."""
        request, item = step.request, step.item
        try:
            length = request.seq
            if step.session is not None:
                new = (
                    item.mask
                    if item.mask is not None
                    else torch.ones(item.rows, item.seq, dtype=torch.long, device=item.x.device)
                )
                full = new if item.held is None else torch.cat([item.held, new], dim=1)
                nbytes = _cache_nbytes(out.cache) or (
                    step.session.cache_bytes + dep.kv_bytes_per_token * item.rows * item.seq
                )
                self.sessions.commit(step.session, cache=out.cache, mask=full, nbytes=nbytes)
                length = item.past + item.seq
            outputs = self._outputs(dep, out, request.options, request.x.dtype)
            meta = {
                META_DEPLOYMENT: dep.deployment_id,
                META_KEY_VERSION: str(dep.key_version),
                META_SESSION_LENGTH: str(length),
                META_DTYPE: str(dep.model.dtype).removeprefix("torch."),
            }
            body = wire.encode(outputs, meta)
            mask = request.mask
            tokens = request.rows * request.seq if mask is None else int(mask.sum())
            self.metrics.tokens.inc(tokens)
            self.metrics.forward_seconds.labels(request.options.output).observe(time.perf_counter() - request.start)
            job.future.set_result(
                ForwardResult(body=body, key_version=dep.key_version, session_length=length, tokens=tokens)
            )
        except BaseException as e:
            job.future.set_exception(e)

    def _check_inputs(
        self, dep: Deployment, tensors: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        unexpected = sorted(set(tensors) - {INPUTS_EMBEDS, ATTENTION_MASK})
        if unexpected:
            raise BadInput(
                f"unexpected tensors {unexpected}: a forward body carries only "
                f"{INPUTS_EMBEDS!r} and optionally {ATTENTION_MASK!r}"
            )
        x = tensors.get(INPUTS_EMBEDS)
        if x is None:
            raise BadInput(f"the body lacks {INPUTS_EMBEDS!r}")
        if x.dtype not in INPUT_DTYPES:
            raise BadInput(f"{INPUTS_EMBEDS} must be float32, float16 or bfloat16, not {wire.dtype_name(x.dtype)}")
        d = dep.model.dims.d_model
        if x.dim() != 3:
            raise BadInput(f"{INPUTS_EMBEDS} must have shape [batch, seq, {d}], got shape {list(x.shape)}")
        batch, seq, width = x.shape
        if width != d:
            raise BadInput(f"{INPUTS_EMBEDS} has d={width}, the model of {dep.deployment_id!r} has d={d}")
        if batch < 1 or seq < 1:
            raise BadInput(f"{INPUTS_EMBEDS} is empty: shape {list(x.shape)}")
        if batch > self.settings.max_batch:
            raise BadInput(f"batch of {batch} rows exceeds the limit of {self.settings.max_batch}")
        mask = tensors.get(ATTENTION_MASK)
        if mask is None:
            return x, None
        if mask.dtype.is_complex:
            raise BadInput(f"{ATTENTION_MASK} must hold 0 and 1")
        if tuple(mask.shape) != (batch, seq):
            raise BadInput(
                f"{ATTENTION_MASK} must have shape [{batch}, {seq}] like {INPUTS_EMBEDS}, got {list(mask.shape)}"
            )
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise BadInput(f"{ATTENTION_MASK} must hold only 0 (padding) and 1 (token)")
        return x, mask.to(torch.long)

    def _check_options(self, dep: Deployment, options: ForwardOptions) -> None:
        if options.output == "topk":
            if dep.family.is_encoder:
                raise BadInput("output=topk applies to logits; this encoder returns hidden states")
            d_out = dep.model.dims.d_out
            if options.k is None:
                raise BadInput("output=topk needs k")
            if not 1 <= options.k <= d_out:
                raise BadInput(f"k must lie in 1..{d_out}, got {options.k}")
        elif options.k is not None:
            raise BadInput("k applies only to output=topk")
        if options.session_id is not None and not dep.keeps_cache:
            raise BadInput(f"the {dep.family.name} model of {dep.deployment_id!r} keeps no KV cache: no sessions")

    def _check_positions(self, dep: Deployment, past: int, seq: int) -> None:
        if dep.max_positions is not None and past + seq > dep.max_positions:
            where = f"{past} cached + {seq} new" if past else f"{seq}"
            raise BadInput(f"{where} positions exceed the model's {dep.max_positions}")

    def _outputs(
        self, dep: Deployment, out: CloudOutput, options: ForwardOptions, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        y = out.output  # (B, S, d_out) permuted by π_c (logits) or π (hidden states)
        if dep.family.is_encoder:
            hidden = y if options.output == "all" else y[:, -1:]
            tensors = {HIDDEN_STATES: hidden.to(dtype)}
            if out.pooled is not None:
                tensors[POOLED] = out.pooled.to(dtype)  # (B, d) permuted by π
            return tensors
        if options.output == "all":
            return {LOGITS: y.to(dtype)}
        last = y[:, -1:]  # (B, 1, V)
        if options.output == "last":
            return {LOGITS: last.to(dtype)}
        k = int(options.k or 1)
        if k == 1:  # greedy decoding: a max takes half the time of a topk (ties: the first index, as argmax)
            values, indices = last.float().max(dim=-1, keepdim=True)  # indices in the permuted space
        else:
            values, indices = torch.topk(last.float(), k, dim=-1)
        return {TOPK_VALUES: values.to(dtype), TOPK_INDICES: indices.to(torch.int64)}


# --- push inspection -----------------------------------------------------------------------


def inspect_push(path: Path, deployment_id: str) -> PushManifest:
    """Check a pushed body's header and metadata (blocking). Raises BadInput / BadTensor.

    Refused: missing metadata, another deployment, an unknown family, a config the family
    cannot read, a malformed verification key, any non-float tensor (a permutation is an
    int64 vector) and any embedding table that is not all zero (GPT-2's cloud position table
    is zero by design) — unless the metadata marks a token-mode push of a decoder, which must
    then carry every embedding table (E′, and GPT-2's positions permuted by π).
    """
    infos, meta, _ = wire.read_header(path)
    missing = [
        k for k in (PUSH_DEPLOYMENT, PUSH_FAMILY, PUSH_CONFIG, PUSH_KEY_VERSION, PUSH_VERIFY_KEY) if k not in meta
    ]
    if missing:
        raise BadInput(f"the push's safetensors __metadata__ lacks {missing}")
    if meta[PUSH_DEPLOYMENT] != deployment_id:
        raise BadInput(f"the body is for deployment {meta[PUSH_DEPLOYMENT]!r}, pushed to {deployment_id!r}")
    family = get_family(meta[PUSH_FAMILY])
    try:
        config = json.loads(meta[PUSH_CONFIG])
    except json.JSONDecodeError:
        raise BadInput(f"{PUSH_CONFIG} is not valid JSON") from None
    if not isinstance(config, dict):
        raise BadInput(f"{PUSH_CONFIG} is not a JSON object")
    try:
        key_version = int(meta[PUSH_KEY_VERSION])
    except ValueError:
        raise BadInput(f"{PUSH_KEY_VERSION} is not an integer") from None
    if key_version < 1:
        raise BadInput(f"{PUSH_KEY_VERSION} must be at least 1")
    verify_key = meta[PUSH_VERIFY_KEY]
    _check_verify_key(verify_key)
    try:
        family.dims(config)
        detected = detect_family(config)
    except StipCoreError:
        raise
    except Exception as e:
        raise BadInput(f"{PUSH_CONFIG} is not a {family.name} config: {type(e).__name__}: {_short(e)}") from None
    if detected.name != family.name:
        # the model is built from the config, the embedding check uses the family's names:
        # both must name the same model, or a mislabelled body could carry its embedding table
        raise BadInput(f"{PUSH_FAMILY} is {family.name!r}, but {PUSH_CONFIG} describes a {detected.name} model")
    if not infos:
        raise BadInput("the push holds no tensors")
    ints = sorted(n for n, i in infos.items() if i.dtype not in WEIGHT_DTYPES)
    if ints:
        raise BadInput(f"P2 accepts floating-point weights only, never an index tensor: {ints[:5]}")
    embedding = family.embedding_names(config)
    suspects = sorted(n for n in infos if any(n == e or n.endswith("." + e) for e in embedding))
    mode = meta.get(PUSH_MODE, "embeds")
    if mode not in ("embeds", "token"):
        raise BadInput(f"{PUSH_MODE} must be 'embeds' or 'token', not {mode[:32]!r}")
    if mode == "token":
        if family.is_encoder or not isinstance(family, CausalLMFamily):
            raise BadInput(f"token mode needs a decoder; the {family.name} family is not one")
        absent = sorted(set(embedding) - set(infos))
        if absent:
            raise BadInput(f"a token-mode push must carry the permuted tables {absent}")
    elif suspects:
        with safe_open(str(path), "pt") as f:
            nonzero = [n for n in suspects if bool(f.get_tensor(n).any())]
        if nonzero:
            raise BadInput(f"P2 never accepts the embedding module: {nonzero}")
    return PushManifest(
        deployment_id=deployment_id,
        family=family.name,
        config=config,
        key_version=key_version,
        verify_key=verify_key,
        mode="token" if mode == "token" else "embeds",
    )


def _check_verify_key(text: str) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(credentials.b64url_decode(text))
    except ValueError:
        raise BadInput(f"{PUSH_VERIFY_KEY} is not a base64url Ed25519 public key") from None


# --- small helpers ---------------------------------------------------------------------------


async def _check_sender(sender_gone: Callable[[], Awaitable[bool]] | None, key_version: int) -> None:
    if sender_gone is not None and await sender_gone():
        raise SenderGone(f"the sender disconnected before key version {key_version} was activated; nothing changed")


def _write(f: IO[bytes], h: "hashlib._Hash", data: bytes, final: bool = False) -> None:
    h.update(data)
    f.write(data)
    if final:
        f.flush()
        os.fsync(f.fileno())


def _unexpired(revocations: Revocations) -> dict[str, int]:
    now = int(time.time())
    return {r.jti: r.expires_at for r in revocations.revoked if r.expires_at > now}


def _claimed_deployment(token: str) -> str | None:
    """The `dep` claim of a credential, unverified: only to tell 403 from 401."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(credentials.b64url_decode(parts[1]))
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep
        return None
    dep = payload.get("dep") if isinstance(payload, dict) else None
    return dep if isinstance(dep, str) else None


def _check_rows(mask: torch.Tensor) -> None:
    if not bool((mask.sum(dim=-1) > 0).all()):
        raise BadInput(f"every row of {ATTENTION_MASK} needs at least one token (a 1)")


def _cache_nbytes(cache: Any) -> int:
    """Bytes of the tensors a KV cache holds (transformers' Cache layers, or nested tuples)."""
    if cache is None:
        return 0
    if isinstance(cache, torch.Tensor):
        return cache.numel() * cache.element_size()
    layers = getattr(cache, "layers", None)
    if layers is not None:
        total = 0
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    if isinstance(cache, (tuple, list)):
        return sum(_cache_nbytes(c) for c in cache)
    return 0


def _rollback(cache: Any, length: int) -> bool:
    """After a failed forward, cut every layer of the cache back to `length` positions.

    False when that cannot be done (the caller then ends the session). transformers 5's
    `crop(n)` takes the number of tokens to remove, as a negative count, per layer: a layer the
    failed forward had not reached yet keeps its length.
    """
    if cache is None or isinstance(cache, torch.Tensor):  # a tensor: the vLLM engine's rows, never extended in place
        return True
    try:
        for layer in cache.layers:
            keys = getattr(layer, "keys", None)
            if isinstance(keys, torch.Tensor) and keys.dim() >= 2 and keys.shape[-2] > length:
                layer.crop(length - int(keys.shape[-2]))
        return all(
            not isinstance(getattr(layer, "keys", None), torch.Tensor) or layer.keys.shape[-2] == length
            for layer in cache.layers
        )
    except Exception:
        return False


def _short(e: BaseException, limit: int = 300) -> str:
    text = str(e).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


__all__ = ["CloudService", "Deployment", "inspect_push", "resolve_device"]
