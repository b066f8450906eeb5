"""`StipClient`: the user side (P3) of STIP.

P3 holds the user bundle (π, π_c, the embedding module, the tokenizer) and never sends a token
id, a permutation or the embedding module anywhere. One forward pass:

    ids (B, S) --embed--> x (B, S, d) --x·π--> P2 --> logits·π_c (B, S', V) --·π_cᵀ--> logits
                                                  --> hidden·π   (B, S, d)  --·πᵀ-->   hidden

Generation opens a P2 session (P2 keeps the KV cache), sends the prompt once and then one new
row per step; sampling happens here. Key rotation: when P2 answers `409 key_outdated` the client
refetches the bundle from P1; a stateless call (`forward`, `embed`) is then retried once,
transparently. A generation cannot keep its session (the session's cache was computed under the
old key), so it opens a new session under the new key and re-sends the prompt plus every token
generated so far as one prefill, then carries on: the output continues where it was, and the
sampler's random state is unaffected, so the tokens are those an uninterrupted run would give.
An expired session (410), or one that P2 lost in a restart (404 on the session), is recovered the
same way, without a refetch. A step that fails in transit (`TransportError`: the connection broke
after the request may have reached P2) is never sent again, since P2 may already have extended the
session with it: the generation raises. Connections that could not be opened, and a P2 answering
`503 not_ready` while it reloads after a restart, are retried with backoff for every call.

On a token-mode deployment (`client.mode == "token"`, PROTOCOL.md section 7) `generate` and
`stream` instead send the prompt's ids relabelled by π_c in one request and P2 generates
(user_client.token_mode).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple, TypeVar, Unpack

import httpx
import torch
from pydantic import SecretStr, ValidationError

from shared import api, wire
from shared.errors import BadTensor
from shared.permutation import permute, unpermute
from shared.pooling import normalize as l2_normalize
from shared.pooling import pool
from stip_http.tls import tls_verify
from user_client import generation
from user_client import images as images_
from user_client._http import ByteProgress, Http
from user_client.bundle import Bundle, BundleCache
from user_client.errors import AuthError, KeyOutdated, NotFound, SessionExpired, StipError, TransportError
from user_client.generation import SamplingKwargs, Step, sampling_params
from user_client.sampling import SamplingParams
from user_client.settings import ClientSettings

WIRE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}  # P2 dtypes sent as they are

log = logging.getLogger("stip.client")

T = TypeVar("T")
TokenIds = Sequence[int] | Sequence[Sequence[int]] | torch.Tensor
USER_AGENT = "stip-client/0.1"
ROTATION_WAIT_S = 30.0  # default wait for P1 to hand out the key P2 switched to
ROTATION_POLL_S, MAX_ROTATION_POLL_S = 0.05, 1.0  # P1 polled from every 50 ms, backing off to 1 s
DEFAULT_CONNECT_TIMEOUT = 10.0


class TopK(NamedTuple):
    """The k best logits per position, in plaintext: `token_ids` are real token ids."""

    values: torch.Tensor  # (B, S', k) float
    token_ids: torch.Tensor  # (B, S', k) int64


class Session:
    """A P2 session: the KV cache of one sequence. Positions continue across calls.

    Use as a context manager (the session is deleted on exit) or call `close()`. `length` is the
    number of positions P2 holds; the next forward's rows start at that position.
    """

    def __init__(
        self,
        client: StipClient,
        *,
        session_id: str,
        deployment_id: str,
        key_version: int,
        idle_ttl_s: int,
        token: str | None = None,
    ):
        self._client = client
        self._token = token  # P2's session token: the steps send it instead of the credential
        self.session_id = session_id
        self.deployment_id = deployment_id
        self.key_version = key_version
        self.idle_ttl_s = idle_ttl_s
        self.length = 0
        self.closed = False

    def __repr__(self) -> str:
        return (
            f"Session(id={self.session_id!r}, key_version={self.key_version}, "
            f"length={self.length}, closed={self.closed})"
        )

    def close(self) -> None:
        self._client.close_session(self)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client._close_session_quietly(self)


class StipClient:
    """SDK of the STIP user side. Thread-safe; each generation uses its own P2 session.

    Arguments not given come from `STIP_CLIENT_*` environment variables (see
    `user_client.settings`). `transport` serves both services (tests pass an in-process one);
    `developer_transport` / `cloud_transport` override it per party. `verify` is a bool, an
    `ssl.SSLContext` or the path of a CA bundle (file or directory). `retries` applies to
    idempotent calls (bundle download, deletes and stateless forward passes), with exponential
    backoff starting at `backoff` seconds. `on_download(done, total)` follows each bundle
    download in bytes (total: its Content-Length, or None); the `stip` CLI draws its bar with it.
    `rotation_wait_s`: how long a client whose key P2 no longer accepts waits for P1 to hand out
    the new one (during a rotation P2 switches first, P1 a moment later), polling P1's headers.
    """

    def __init__(
        self,
        developer_url: str | None = None,
        *,
        cloud_url: str | None = None,
        deployment_id: str | None = None,
        credential: str | SecretStr | None = None,
        cache_dir: str | Path | None = None,
        transport: httpx.BaseTransport | None = None,
        developer_transport: httpx.BaseTransport | None = None,
        cloud_transport: httpx.BaseTransport | None = None,
        timeout: float | httpx.Timeout | None = None,
        verify: bool | str | os.PathLike[str] | ssl.SSLContext | None = None,
        retries: int | None = None,
        backoff: float = 0.5,
        settings: ClientSettings | None = None,
        on_download: ByteProgress | None = None,
        rotation_wait_s: float = ROTATION_WAIT_S,
    ):
        env = settings or ClientSettings()
        self.developer_url = developer_url or env.developer_url
        if not self.developer_url:
            raise ValueError(
                "developer_url is required: pass developer_url= (stip: --developer-url) "
                "or set STIP_CLIENT_DEVELOPER_URL"
            )
        dep = deployment_id or env.deployment_id
        if not dep:
            raise ValueError(
                "deployment_id is required: pass deployment_id= (stip: --deployment) or set STIP_CLIENT_DEPLOYMENT_ID"
            )
        self.deployment_id: str = dep
        if isinstance(credential, str):
            credential = SecretStr(credential)
        secret = credential or env.credential
        if secret is None or not secret.get_secret_value():
            raise ValueError(
                "credential is required: pass credential= (stip: --credential) or set STIP_CLIENT_CREDENTIAL"
            )
        self._credential = secret
        self._explicit_cloud_url = cloud_url or env.cloud_url
        root = Path(cache_dir).expanduser() if cache_dir is not None else env.resolved_cache_dir()
        self.cache = BundleCache(root, self.deployment_id)
        if timeout is None:
            timeout = env.timeout
        self._timeout = (
            timeout
            if isinstance(timeout, httpx.Timeout)
            else httpx.Timeout(timeout, connect=min(DEFAULT_CONNECT_TIMEOUT, timeout))
        )
        verify = env.verify if verify is None else verify
        self._verify = tls_verify(verify)
        self._retries = env.retries if retries is None else retries
        self._backoff = backoff
        self._on_download = on_download
        self._rotation_wait_s = rotation_wait_s
        self._cloud_transport = cloud_transport or transport
        self._developer = self._http("P1", self.developer_url, developer_transport or transport)
        self._cloud: Http | None = None
        if self._explicit_cloud_url:
            self._cloud = self._http("P2", self._explicit_cloud_url, self._cloud_transport)
        self._bundle: Bundle | None = None
        self._wire_dtypes: dict[int, torch.dtype] = {}  # key version -> dtype of x·π on the wire
        self._embeds_only = False  # `client.mode = "embeds"` on a token-mode deployment
        self._lock = threading.RLock()
        self._sessions: set[Session] = set()
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"StipClient(developer_url={self.developer_url!r}, "
            f"deployment_id={self.deployment_id!r}, cloud_url={self.cloud_url!r})"
        )

    # --- lifecycle ----------------------------------------------------------------------------

    def _http(self, party: str, base_url: str, transport: httpx.BaseTransport | None) -> Http:
        client = httpx.Client(
            base_url=base_url,
            transport=transport,
            timeout=self._timeout,
            verify=self._verify,
            headers={
                "Authorization": f"Bearer {self._credential.get_secret_value()}",
                "User-Agent": USER_AGENT,
            },
            follow_redirects=False,
        )
        for name in ("Accept", "Accept-Encoding", "Connection"):  # httpx's defaults: bytes on every step, no use
            client.headers.pop(name, None)
        return Http(client, party=party, retries=self._retries, backoff=self._backoff)

    def close(self) -> None:
        """Delete the sessions still open and close the connections."""
        if self._closed:
            return
        for session in list(self._sessions):
            self._close_session_quietly(session)
        self._developer.client.close()
        if self._cloud is not None:
            self._cloud.client.close()
        self._closed = True

    def __enter__(self) -> StipClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- the bundle ---------------------------------------------------------------------------

    @property
    def bundle(self) -> Bundle:
        """The user bundle: from the local cache, else fetched from P1 (once)."""
        with self._lock:
            if self._bundle is not None:
                return self._bundle
            cached = self.cache.load_latest()
            return self._use(cached or self.cache.fetch(self._developer, on_progress=self._on_download))

    def refresh_bundle(self) -> Bundle:
        """Fetch the bundle from P1 again (e.g. after a key rotation) and use it."""
        with self._lock:
            return self._use(self.cache.fetch(self._developer, on_progress=self._on_download))

    def _use(self, bundle: Bundle) -> Bundle:
        if self._cloud is None:
            url = bundle.manifest.cloud_url
            if not url:
                raise StipError("no cloud URL: the bundle names none; pass cloud_url= or set STIP_CLIENT_CLOUD_URL")
            self._cloud = self._http("P2", url, self._cloud_transport)
        if self._bundle is None or self._bundle.manifest.mode != bundle.manifest.mode:
            log.info(
                "deployment %s: %s mode%s",
                self.deployment_id,
                bundle.manifest.mode,
                " (P2 generates on token ids relabelled by pi_c; see SECURITY.md)"
                if bundle.manifest.mode == "token"
                else " (P2 receives x·pi only)",
            )
        self._bundle = bundle
        return bundle

    @property
    def mode(self) -> Literal["embeds", "token"]:
        """How generation talks to P2: "token" on a deployment P1 created in token mode (one request
        of relabelled ids per generation), else "embeds" (x·π, one round trip per token). Setting
        "embeds" uses embeds mode, which every deployment serves, on a token-mode one too."""
        return "embeds" if self._embeds_only else self.bundle.manifest.mode

    @mode.setter
    def mode(self, value: Literal["embeds", "token"]) -> None:
        if value not in ("embeds", "token"):
            raise ValueError(f"mode is 'embeds' or 'token', not {value!r}")
        if value == "token" and self.bundle.manifest.mode != "token":
            raise ValueError(f"deployment {self.deployment_id} serves embeds mode only (P1 enables token mode)")
        self._embeds_only = value == "embeds"

    @property
    def cloud_url(self) -> str | None:
        return str(self._cloud.client.base_url) if self._cloud is not None else None

    @property
    def key_version(self) -> int:
        return self.bundle.key_version

    def _cloud_http(self) -> Http:
        if self._cloud is None:
            self.bundle  # noqa: B018 (loading the bundle sets P2 up from its manifest)
        if self._cloud is None:
            raise StipError("no cloud URL is known")
        return self._cloud

    def _refresh_after_outdated(self, stale: Bundle, cause: StipError | None = None) -> Bundle:
        """P2 rejected `stale`'s key: refetch, unless another thread already did.

        A rotation activates the new key on P2 before P1 hands it out (P1 commits once P2 has
        answered the push), so P1 may still serve `stale` for a moment: poll P1 (headers only)
        with backoff for up to `rotation_wait_s` before giving up.
        """
        deadline = time.monotonic() + self._rotation_wait_s
        delay = ROTATION_POLL_S
        while True:
            with self._lock:
                current = self._bundle
                if current is not None and current.key_version != stale.key_version:
                    return current
                fresh = self.cache.fetch_if_changed(self._developer, stale.key_version, on_progress=self._on_download)
                if fresh is not None:
                    self._use(fresh)
                    break
            left = deadline - time.monotonic()
            if left <= 0:
                reason = f"{cause.message}; " if cause is not None else ""
                raise KeyOutdated(
                    f"{reason}P2 no longer accepts key version {stale.key_version} and P1 still hands it "
                    f"out after {self._rotation_wait_s:g} s: the deployment is probably being rotated, retry shortly",
                    code=api.E_KEY_OUTDATED,
                    status=409,
                ) from cause
            time.sleep(min(delay, left))
            delay = min(2 * delay, MAX_ROTATION_POLL_S)
        log.info(
            "deployment %s rotated its key: version %d -> %d",
            self.deployment_id,
            stale.key_version,
            fresh.key_version,
        )
        return fresh

    def _stateless(self, call: Callable[[Bundle], T]) -> T:
        """Run a stateless call; on key_outdated refetch the bundle and retry it once."""
        bundle = self.bundle
        try:
            return call(bundle)
        except KeyOutdated as e:
            return call(self._refresh_after_outdated(bundle, e))

    # --- sessions -----------------------------------------------------------------------------

    def open_session(self) -> Session:
        """Open a P2 session (a KV cache for one sequence). Close it, or use it in a `with`.

        If P2 serves another key version than our bundle's, the bundle is refetched once.
        """
        bundle = self.bundle
        for attempt in range(2):
            try:
                session = self._create_session(bundle)
            except KeyOutdated as e:
                if attempt:
                    raise
                bundle = self._refresh_after_outdated(bundle, e)
                continue
            if session.key_version == bundle.key_version:
                return session
            self._close_session_quietly(session)
            mismatch = KeyOutdated(
                f"P2 opened a session under key version {session.key_version}, "
                f"the bundle has version {bundle.key_version}",
                code=api.E_KEY_OUTDATED,
            )
            if attempt:
                raise mismatch
            bundle = self._refresh_after_outdated(bundle, mismatch)
        raise AssertionError("unreachable")  # pragma: no cover

    def _create_session(self, bundle: Bundle) -> Session:
        path = api.path(api.SESSIONS_PATH, deployment_id=self.deployment_id)
        resp = self._cloud_http().request(
            "POST",
            path,
            idempotent=False,
            headers={api.KEY_VERSION_HEADER: str(bundle.key_version)},
        )
        try:
            created = api.SessionCreated.model_validate_json(resp.content)
        except ValidationError:
            raise StipError(f"P2 POST {path}: malformed session response") from None
        session = Session(
            self,
            session_id=created.session_id,
            deployment_id=created.deployment_id,
            key_version=created.key_version,
            idle_ttl_s=created.idle_ttl_s,
            token=created.session_token,  # None from a P2 that hands out no session tokens
        )
        self._sessions.add(session)
        return session

    def close_session(self, session: Session, *, retries: int | None = None) -> None:
        """Delete a session on P2; one that already expired counts as closed. `retries`
        overrides the client's retry count for this call (0: a single attempt)."""
        if session.closed:
            return
        session.closed = True
        self._sessions.discard(session)
        path = api.path(api.SESSION_PATH, session_id=session.session_id)
        with suppress(NotFound, SessionExpired):  # already gone counts as closed
            self._cloud_http().request("DELETE", path, idempotent=True, retries=retries)

    def _close_session_quietly(self, session: Session) -> None:
        """Best effort, one attempt: a session P2 no longer answers for expires after its idle
        TTL, and the error that ended a generation is not held back by retries of the cleanup."""
        try:
            self.close_session(session, retries=0)
        except StipError as e:
            log.warning("could not delete session %s: %s", session.session_id, e.message)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """`with client.session() as s:` opens a P2 session and deletes it at the end."""
        s = self.open_session()
        try:
            yield s
        finally:
            self._close_session_quietly(s)

    # --- forward passes -----------------------------------------------------------------------

    def _check_ids(self, bundle: Bundle, ids: torch.Tensor) -> None:
        n = bundle.n_tokens
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
            raise ValueError(f"token ids must lie in [0, {n})")

    def _embed_permuted(
        self,
        bundle: Bundle,
        ids: torch.Tensor,
        *,
        position_offset: int,
        token_type_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """Token ids (B, S) -> x·π (B, S, d), computed here with the bundle's embedding module."""
        self._check_ids(bundle, ids)
        try:
            x = bundle.family.embed(
                bundle.embedding,
                bundle.config,
                ids,
                position_offset=position_offset,
                token_type_ids=token_type_ids,
            )
        except (BadTensor, ValueError) as e:
            raise ValueError(str(e)) from None
        return permute(x, bundle.key.pi)  # (B, S, d) permuted by π

    def _post_forward(
        self,
        bundle: Bundle,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        *,
        session: Session | None,
        output: str,
        k: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """POST x·π to P2; return its (still permuted) tensors after checking the metadata."""
        tensors = {api.INPUTS_EMBEDS: x.to(self._wire_dtype(bundle))}
        if mask is not None:
            tensors[api.ATTENTION_MASK] = mask.to(torch.int64)
        params: dict[str, str | int] = {"output": output}
        if k is not None:
            params["k"] = k
        if session is not None:
            params["session_id"] = session.session_id
        path = api.path(api.FORWARD_PATH, deployment_id=self.deployment_id)
        headers = {"Content-Type": wire.CONTENT_TYPE, api.KEY_VERSION_HEADER: str(bundle.key_version)}
        body = wire.encode(tensors)
        try:
            resp = self._send_forward(path, params, body, headers, session)
        except NotFound as e:
            if session is None:
                raise
            # P2 keeps sessions in memory: after a restart it no longer knows this one
            raise SessionExpired(
                f"{e.message}: P2 lost session {session.session_id} (it restarted, or the session was "
                "deleted); open a new session",
                code=e.code,
                status=e.status,
            ) from e
        except TransportError as e:
            if session is None:
                raise
            raise TransportError(
                f"{e.message}; the step may have reached P2 and extended the session, so it is not sent "
                "again: the session's state is unknown, open a new one",
                code=e.code,
                status=e.status,
            ) from e
        try:
            out, meta = wire.decode(resp.content)
        except BadTensor as e:
            raise StipError(f"P2 POST {path}: malformed response body: {e}") from None
        if meta.get(api.META_DEPLOYMENT, self.deployment_id) != self.deployment_id:
            raise StipError(f"P2 answered for deployment {meta[api.META_DEPLOYMENT]!r}")
        version = meta.get(api.META_KEY_VERSION)
        if version is not None and version != str(bundle.key_version):
            raise StipError(f"P2 answered under key version {version}, the request used {bundle.key_version}")
        self._wire_dtypes[bundle.key_version] = WIRE_DTYPES.get(meta.get(api.META_DTYPE, ""), torch.float32)
        if session is not None:
            expected = session.length + x.shape[1]
            reported = meta.get(api.META_SESSION_LENGTH)
            if reported is not None and reported != str(expected):
                raise StipError(f"P2 reports a session length of {reported}, the client expected {expected}")
            session.length = expected
        return out

    def _send_forward(
        self, path: str, params: dict[str, str | int], body: bytes, headers: dict[str, str], session: Session | None
    ) -> httpx.Response:
        """POST one forward. A session's step authenticates with the session's token (22 characters
        instead of the credential's 240 on every step), which P2 checks as it would the credential."""
        http = self._cloud_http()
        if session is None or session._token is None:
            # a stateless forward is a pure function of its input: it may be resent
            return http.request("POST", path, idempotent=session is None, params=params, content=body, headers=headers)
        try:
            return http.request(
                "POST", path, idempotent=False, params=params, content=body, headers=_bearer(headers, session._token)
            )
        except AuthError as e:
            if e.status != 401:
                raise
        # P2 refused the token at the door (a 401 precedes any work on the step): the session ended
        # or expired, or so did the credential. Once more with the credential, whose answer says
        # which (SessionExpired, NotFound, AuthError); the session's later steps send it too.
        session._token = None
        return http.request("POST", path, idempotent=False, params=params, content=body, headers=headers)

    def _wire_dtype(self, bundle: Bundle) -> torch.dtype:
        """The dtype x·π travels in: P2's own when it runs in half precision (it rounds x·π to it
        on arrival, so sending it rounded changes no output and halves the bytes), else fp32.

        P2 names its dtype in every forward answer's metadata; until the first answer of this
        key version, fp32.
        """
        return self._wire_dtypes.get(bundle.key_version, torch.float32)

    def _session_bundle(self, session: Session) -> Bundle:
        if session._client is not self:
            raise ValueError("the session belongs to another client")
        if session.closed:
            raise ValueError("the session is closed")
        bundle = self.bundle
        if session.key_version != bundle.key_version:
            raise KeyOutdated(
                f"the session was opened under key version {session.key_version}, the key is now "
                f"version {bundle.key_version}: open a new session",
                code=api.E_KEY_OUTDATED,
            )
        return bundle

    @staticmethod
    def _expect(out: dict[str, torch.Tensor], name: str, shape: tuple[int | None, ...]) -> torch.Tensor:
        t = out.get(name)
        if t is None:
            raise StipError(f"P2's response lacks the tensor {name!r}")
        if t.dim() != len(shape) or any(s is not None and s != a for s, a in zip(shape, t.shape, strict=True)):
            raise StipError(f"P2 returned {name!r} of shape {tuple(t.shape)}, expected {shape}")
        return t

    def _forward_once(
        self,
        bundle: Bundle,
        ids: torch.Tensor,
        mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        session: Session | None = None,
        output: Literal["all", "last"] = "all",
    ) -> torch.Tensor:
        offset = session.length if session is not None else 0
        x = self._embed_permuted(bundle, ids, position_offset=offset, token_type_ids=token_type_ids)
        b, s = ids.shape
        if bundle.is_encoder:
            out = self._post_forward(bundle, x, mask, session=session, output="all")
            hidden = self._expect(out, api.HIDDEN_STATES, (b, s, bundle.key.pi.numel()))
            hidden = unpermute(hidden.float(), bundle.key.pi)  # y = y′·πᵀ
            return hidden[:, -1:] if output == "last" else hidden
        out = self._post_forward(bundle, x, mask, session=session, output=output)
        logits = self._expect(out, api.LOGITS, (b, 1 if output == "last" else s, bundle.vocab_size))
        return unpermute(logits.float(), bundle.key.pi_c)  # o = o′·π_cᵀ

    def forward(
        self,
        token_ids: TokenIds,
        *,
        attention_mask: TokenIds | None = None,
        token_type_ids: TokenIds | None = None,
        session: Session | None = None,
        output: Literal["all", "last"] = "all",
    ) -> torch.Tensor:
        """One forward pass: plaintext logits (B, S', V) for decoders (S' = 1 with
        output="last"), hidden states (B, S, d) for encoders.

        `token_ids` is (B, S) or (S,). With a `session`, the rows extend its KV cache (positions
        continue at `session.length`) and `attention_mask` covers the new tokens only.
        """
        ids = _as_batch(token_ids, "token_ids")
        mask = _as_batch(attention_mask, "attention_mask") if attention_mask is not None else None
        types = _as_batch(token_type_ids, "token_type_ids") if token_type_ids is not None else None
        for name, t in (("attention_mask", mask), ("token_type_ids", types)):
            if t is not None and t.shape != ids.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, token_ids {tuple(ids.shape)}")
        if output not in ("all", "last"):
            raise ValueError(f"output must be 'all' or 'last', got {output!r}")
        if session is not None:
            return self._forward_once(self._session_bundle(session), ids, mask, types, session, output)
        return self._stateless(lambda b: self._forward_once(b, ids, mask, types, None, output))

    def forward_topk(
        self,
        token_ids: TokenIds,
        *,
        k: int,
        attention_mask: TokenIds | None = None,
        session: Session | None = None,
    ) -> TopK:
        """The k largest logits of the last position with their plaintext token ids: (B, 1, k).

        Decoders only. P2 returns the values and indices in the permuted space; the token of
        index j is `pi_c[j]`. Only k values per row cross the network instead of the vocabulary.
        """
        if k < 1:
            raise ValueError("k must be >= 1")
        ids = _as_batch(token_ids, "token_ids")
        mask = _as_batch(attention_mask, "attention_mask") if attention_mask is not None else None

        def call(bundle: Bundle) -> TopK:
            if bundle.is_encoder:
                raise ValueError("forward_topk needs a decoder deployment")
            offset = session.length if session is not None else 0
            x = self._embed_permuted(bundle, ids, position_offset=offset, token_type_ids=None)
            out = self._post_forward(bundle, x, mask, session=session, output="topk", k=k)
            values = self._expect(out, api.TOPK_VALUES, (ids.shape[0], None, k))
            index = self._expect(out, api.TOPK_INDICES, tuple(values.shape))
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= bundle.vocab_size):
                raise StipError("P2 returned top-k indices outside the vocabulary")
            return TopK(values=values.float(), token_ids=bundle.key.pi_c[index.long()])

        if session is not None:
            return call(self._session_bundle(session))
        return self._stateless(call)

    # --- generation ---------------------------------------------------------------------------

    def _eos_ids(self, eos: bool | int | Sequence[int]) -> frozenset[int]:
        if eos is True:
            return self.bundle.eos_token_ids()
        if eos is False:
            return frozenset()
        if isinstance(eos, int):
            return frozenset({eos})
        return frozenset(int(e) for e in eos)

    def _prompt_ids(self, prompt: str, add_special_tokens: bool) -> list[int]:
        # No padding and no truncation: a tokenizer.json may pad every input to a fixed length.
        enc = self.bundle.tokenizer(prompt, add_special_tokens=add_special_tokens, padding=False, truncation=False)
        return [int(i) for i in enc["input_ids"]]

    def generate_ids(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        params: SamplingParams | None = None,
        *,
        stop: Sequence[str] | None = None,
        eos: bool | int | Sequence[int] = True,
        **sampling: Unpack[SamplingKwargs],
    ) -> list[int]:
        """Generate from token ids; return the NEW token ids (an EOS that ended it included).

        Same sampling as `generate`; with the same processors and seed it matches
        `transformers`' `generate` token for token.
        """
        prompt = _as_prompt(input_ids)
        params, eos_ids = sampling_params(params, sampling), self._eos_ids(eos)
        if stop:
            ids: list[int] = []
            for _ in generation.text_stream(self, prompt, params, eos_ids, stop, ids):
                pass
            return ids
        return [step.token_id for step in generation.token_stream(self, prompt, params, eos_ids)]

    def generate_steps(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        params: SamplingParams | None = None,
        *,
        eos: bool | int | Sequence[int] = True,
        full_scores: bool = False,
        **sampling: Unpack[SamplingKwargs],
    ) -> Generator[Step, None, None]:
        """Generate from token ids, yielding each new token with its plaintext logits (`Step`).

        The same draw as `generate_ids` (without stop strings: detokenise with
        `sampling.TextAssembler`). `full_scores=True` makes every step's `scores` the whole
        vocabulary's logits, e.g. for log-probabilities; closing the iterator deletes the P2 session.
        """
        return generation.token_stream(
            self, _as_prompt(input_ids), sampling_params(params, sampling), self._eos_ids(eos), full_scores=full_scores
        )

    def stream(
        self,
        prompt: str,
        params: SamplingParams | None = None,
        *,
        stop: Sequence[str] | None = None,
        eos: bool | int | Sequence[int] = True,
        add_special_tokens: bool = True,
        **sampling: Unpack[SamplingKwargs],
    ) -> Iterator[str]:
        """Generate text, yielding pieces as they become final (see `generate`).

        Breaking out of the loop (or closing the iterator) deletes the P2 session.
        """
        prompt_ids = self._prompt_ids(prompt, add_special_tokens)
        return generation.text_stream(
            self, prompt_ids, sampling_params(params, sampling), self._eos_ids(eos), stop or ()
        )

    def generate(
        self,
        prompt: str,
        params: SamplingParams | None = None,
        *,
        stop: Sequence[str] | None = None,
        eos: bool | int | Sequence[int] = True,
        add_special_tokens: bool = True,
        **sampling: Unpack[SamplingKwargs],
    ) -> str:
        """Generate a continuation of `prompt` and return it (without the prompt).

        `params` (a `SamplingParams`), or its fields as keywords (`max_new_tokens=16,
        temperature=0.7`; keywords override the fields of `params`). temperature 0 is greedy;
        otherwise the HF processors repetition penalty, temperature, top-k, top-p apply, in that
        order, and a `seed` makes the draw reproducible. Stops after `max_new_tokens`, on an EOS
        token (`eos=True`: the bundle's; False: never; or ids), at the first of the `stop`
        strings (excluded from the text), or when the context is full.
        """
        return "".join(
            self.stream(prompt, params, stop=stop, eos=eos, add_special_tokens=add_special_tokens, **sampling)
        )

    # --- sentence embeddings ------------------------------------------------------------------

    def embed(self, texts: str | Sequence[str], *, normalize: bool = True, batch_size: int = 32) -> torch.Tensor:
        """Sentence embeddings (n, d) from an encoder deployment, as sentence-transformers
        computes them: tokenize (truncated to the model's max_seq_length), forward, pool with
        the attention mask (mode from the bundle's pooling config, mean by default), and
        L2-normalise when `normalize`."""
        bundle = self.bundle
        if not bundle.is_encoder:
            raise ValueError(f"embed needs an encoder; {bundle.family.name} is a decoder")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        items = [texts] if isinstance(texts, str) else list(texts)
        d = int(bundle.key.pi.numel())
        if not items:
            return torch.empty(0, d)
        pooling = bundle.pooling()
        max_length = bundle.embed_max_length()
        chunks = []
        for start in range(0, len(items), batch_size):
            enc = bundle.tokenizer(
                items[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            ids, mask = enc["input_ids"], enc["attention_mask"]
            types = enc.get("token_type_ids")
            hidden = self._stateless(partial(self._forward_once, ids=ids, mask=mask, token_type_ids=types))
            chunks.append(pool(hidden, mask, pooling.mode))
        out = torch.cat(chunks)
        return l2_normalize(out) if normalize else out

    # --- images (ViT deployments) ---------------------------------------------------------------

    def _image_batches(
        self, images: images_.Images, batch_size: int, call: Callable[[Bundle, torch.Tensor], T]
    ) -> list[T]:
        """Preprocess here, batch by batch, and run `call(bundle, pixels)` on each (n, C, H, W)."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        bundle = self.bundle
        if not hasattr(bundle.family, "embed_images"):
            raise ValueError(f"images need a ViT deployment; {bundle.family.name} takes token ids")
        items = images_.as_list(images)
        if not items:
            raise ValueError("no images given")
        out = []
        for start in range(0, len(items), batch_size):
            pixels = images_.pixel_values(bundle, items[start : start + batch_size])
            out.append(self._stateless(lambda b, px=pixels: call(b, px)))  # type: ignore[misc]
        return out

    def _post_images(self, bundle: Bundle, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pixels (n, C, H, W) -> x (n, 1 + N, d) with the bundle's embedding module -> P2 gets x·π."""
        try:
            x = bundle.family.embed_images(bundle.embedding, bundle.config, pixels)  # type: ignore[attr-defined]
        except BadTensor as e:
            raise ValueError(str(e)) from None
        return self._post_forward(bundle, permute(x, bundle.key.pi), None, session=None, output="all")

    def _class_logits(self, bundle: Bundle, pixels: torch.Tensor) -> torch.Tensor:
        if bundle.is_encoder:
            raise ValueError(f"classify needs a ViTForImageClassification; {bundle.family.name} has no classifier")
        out = self._post_images(bundle, pixels)
        logits = self._expect(out, api.LOGITS, (pixels.shape[0], 1, bundle.vocab_size))  # permuted by π_c
        return unpermute(logits[:, 0].float(), bundle.key.pi_c)  # (n, C)

    def _image_embedding(self, bundle: Bundle, pixels: torch.Tensor) -> images_.ImageEmbedding:
        if not bundle.is_encoder:
            raise ValueError(f"embed_images needs a ViTModel deployment; {bundle.family.name} is a classifier")
        out = self._post_images(bundle, pixels)
        n, d = pixels.shape[0], int(bundle.key.pi.numel())
        hidden = unpermute(self._expect(out, api.HIDDEN_STATES, (n, None, d)).float(), bundle.key.pi)
        pooled = out.get(api.POOLED)
        if pooled is not None:
            pooled = unpermute(self._expect(out, api.POOLED, (n, d)).float(), bundle.key.pi)
        return images_.ImageEmbedding(hidden, pooled)

    def image_logits(self, images: images_.Images, *, batch_size: int = 32) -> torch.Tensor:
        """Plaintext class logits (n, C) of a ViT classifier deployment, in id2label's order.

        `images`: paths, PIL images, numpy arrays or tensors, one or a list. The bundle's image
        processor runs here; P2 receives x·π only, and returns logits permuted by π_c."""
        return torch.cat(self._image_batches(images, batch_size, self._class_logits))

    def classify(
        self, images: images_.Images, *, top_k: int | None = 5, batch_size: int = 32
    ) -> list[list[images_.Classification]]:
        """Per image, its `top_k` classes (None: all), best first: (label, score, class_id), the
        scores as transformers' image-classification pipeline computes them (softmax, or
        sigmoid for multi-label models)."""
        if top_k is not None and top_k < 1:
            raise ValueError("top_k must be >= 1")
        logits = self.image_logits(images, batch_size=batch_size)
        return images_.top_classes(self.bundle, logits, top_k)

    def embed_images(self, images: images_.Images, *, batch_size: int = 32) -> images_.ImageEmbedding:
        """A ViTModel deployment's plaintext hidden states (n, 1 + N, d) and pooled output (n, d)."""
        parts = self._image_batches(images, batch_size, self._image_embedding)
        pooled = [p.pooled for p in parts]
        return images_.ImageEmbedding(
            torch.cat([p.hidden_states for p in parts]),
            None if any(p is None for p in pooled) else torch.cat(pooled),  # type: ignore[arg-type]
        )


def _bearer(headers: dict[str, str], token: str) -> dict[str, str]:
    """`headers` with `Authorization: Bearer <token>` in place of the client's credential."""
    return {**headers, "Authorization": f"Bearer {token}"}


def _as_batch(value: Any, name: str) -> torch.Tensor:
    """(B, S) int64 from a tensor or nested lists; a single sequence becomes (1, S)."""
    t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must hold integers")
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[1] == 0:
        raise ValueError(f"{name} must be (batch, seq) with seq >= 1, got {tuple(t.shape)}")
    return t.to(torch.long)


def _as_prompt(value: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(value, torch.Tensor):
        if value.dim() == 2 and value.shape[0] == 1:
            value = value[0]
        if value.dim() != 1:
            raise ValueError("generate_ids takes one sequence: (S,) or (1, S)")
        return [int(i) for i in value.tolist()]
    return [int(i) for i in value]
