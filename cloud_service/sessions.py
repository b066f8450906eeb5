"""Sessions: a user's KV cache on P2, so each generation step sends one new row.

A session holds the stock model's cache object, the attention mask accumulated over every
forward so far (B, length) and the key version it was created under. Sessions are bounded
in number and in approximate cache memory, in all and per user (a deployment and a credential
subject: one user cannot take every slot); an idle one expires after the TTL. An expired
session leaves a small tombstone, so its owner hears "expired" (410) rather than "unknown".

Each session has a short random token (SESSION_TOKEN_BYTES, base64url), returned once when it
is opened: its forward steps may authenticate with it instead of the user credential (a
decode step's credential header was a quarter of its bytes). The session keeps the claims of the
credential that opened it, so P2 keeps checking their expiry and revocation on every step
(`CloudService.authorize_step`). The token is compared in constant time and is bound to its
session: `authenticate` answers only for the session it was issued with.

Thread-safe: forwards run in worker threads. Callers serialise forwards of one deployment
(its model lock), so a session is never extended by two threads at once.
"""

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cloud_service.errors import KeyOutdated, SessionExpired, TooManySessions, UnknownSession
from shared.credentials import Claims

SESSION_TOKEN_BYTES = 16  # 22 base64url characters on the wire

Clock = Callable[[], float]


@dataclass
class Session:
    session_id: str
    deployment_id: str
    subject: str  # the credential's `sub`: only that user may use the session
    key_version: int
    last_used: float
    cache: Any = None  # the stock model's cache object; None before the first forward
    mask: torch.Tensor | None = None  # (B, length) int64 on the model's device
    cache_bytes: int = 0  # measured after each forward
    reserved: int = 0  # reserved for a forward in flight
    stale: bool = False  # its key version was replaced: the cache is freed
    claims: Claims | None = None  # of the credential that opened it: checked on every token step
    verify_key: str = ""  # P1's key that verified those claims
    token: str = field(default_factory=lambda: secrets.token_urlsafe(SESSION_TOKEN_BYTES), repr=False)

    @property
    def length(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    @property
    def batch(self) -> int | None:
        return None if self.mask is None else int(self.mask.shape[0])


@dataclass(frozen=True)
class Tombstone:
    deployment_id: str
    subject: str


class SessionStore:
    def __init__(
        self,
        *,
        max_sessions: int,
        idle_ttl_s: float,
        memory_bytes: int,
        max_per_user: int | None = None,
        memory_bytes_per_user: int | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.max_sessions, self.idle_ttl_s, self.memory_bytes = max_sessions, idle_ttl_s, memory_bytes
        # one user (deployment, credential subject) may hold at most this much of the above
        self.max_per_user = max_per_user or max_sessions
        self.memory_bytes_per_user = memory_bytes_per_user or memory_bytes
        self.clock = clock
        self._live: dict[str, Session] = {}
        self._expired: OrderedDict[str, Tombstone] = OrderedDict()
        self._lock = threading.Lock()

    # --- bookkeeping ---------------------------------------------------------------------

    @property
    def count(self) -> int:
        return len(self._live)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used()

    def _used(self) -> int:
        return sum(s.cache_bytes + s.reserved for s in self._live.values())

    def _of_user(self, deployment_id: str, subject: str) -> list[Session]:
        return [s for s in self._live.values() if s.deployment_id == deployment_id and s.subject == subject]

    def _evict_expired(self) -> int:
        now = self.clock()
        gone = [sid for sid, s in self._live.items() if now - s.last_used > self.idle_ttl_s]
        for sid in gone:
            s = self._live.pop(sid)
            s.cache, s.mask = None, None  # free the cache now, not when the last reference goes
            self._expired[sid] = Tombstone(s.deployment_id, s.subject)
        while len(self._expired) > 4 * self.max_sessions:
            self._expired.popitem(last=False)
        return len(gone)

    def evict_expired(self) -> int:
        with self._lock:
            return self._evict_expired()

    # --- lifecycle -----------------------------------------------------------------------

    def create(
        self,
        *,
        deployment_id: str,
        subject: str,
        key_version: int,
        claims: Claims | None = None,
        verify_key: str = "",
    ) -> Session:
        """A new session; `claims` (verified under `verify_key`) let its token authenticate its steps."""
        with self._lock:
            full = len(self._live) >= self.max_sessions or self._used() >= self.memory_bytes
            mine = self._of_user(deployment_id, subject)
            if full or len(mine) >= self.max_per_user or _held(mine) >= self.memory_bytes_per_user:
                self._evict_expired()  # expired sessions count toward no limit, global or per user
            if len(self._live) >= self.max_sessions:
                raise TooManySessions(
                    f"the limit of {self.max_sessions} sessions (STIP_CLOUD_MAX_SESSIONS) is reached; retry later"
                )
            if self._used() >= self.memory_bytes:
                raise TooManySessions(
                    "the KV cache memory for sessions (STIP_CLOUD_SESSION_MEMORY_BYTES) is exhausted; retry later"
                )
            mine = self._of_user(deployment_id, subject)
            if len(mine) >= self.max_per_user:
                raise TooManySessions(
                    f"this user holds {len(mine)} sessions, the per-user limit (STIP_CLOUD_MAX_SESSIONS_PER_USER="
                    f"{self.max_per_user}): end one, or wait for an idle one to expire"
                )
            if _held(mine) >= self.memory_bytes_per_user:
                raise TooManySessions(self._user_memory_message())
            session = Session(
                session_id=secrets.token_urlsafe(18),
                deployment_id=deployment_id,
                subject=subject,
                key_version=key_version,
                last_used=self.clock(),
                claims=claims,
                verify_key=verify_key,
            )
            self._live[session.session_id] = session
            return session

    def lookup(self, session_id: str, *, touch: bool = True) -> Session | Tombstone:
        """The live session (touched, unless `touch` is false) or its tombstone; UnknownSession when neither."""
        with self._lock:
            session = self._live.get(session_id)
            if session is not None and self.clock() - session.last_used > self.idle_ttl_s:
                self._evict_expired()
                session = None
            if session is not None:
                if touch:
                    session.last_used = self.clock()
                return session
            tomb = self._expired.get(session_id)
            if tomb is not None:
                return tomb
        raise UnknownSession("unknown session")

    def authenticate(self, session_id: str, token: str) -> Session | None:
        """The live session `session_id` when `token` is its token (compared in constant time),
        else None: unknown, expired, ended, or another session's token."""
        try:
            found = self.lookup(session_id, touch=False)
        except UnknownSession:
            return None
        if isinstance(found, Tombstone) or found.claims is None:
            return None
        return found if secrets.compare_digest(token.encode(), found.token.encode()) else None

    def get(self, session_id: str) -> Session:
        found = self.lookup(session_id)
        if isinstance(found, Tombstone):
            raise SessionExpired(f"the session expired after {self.idle_ttl_s:g} s idle; create a new one")
        return found

    def delete(self, session_id: str) -> None:
        with self._lock:
            session = self._live.pop(session_id, None)
            if session is not None:
                session.cache, session.mask = None, None
            self._expired.pop(session_id, None)

    def drop_deployment(self, deployment_id: str) -> int:
        """End every live session of a deployment (it is being deleted); they answer 404 afterwards."""
        with self._lock:
            ended = [sid for sid, s in self._live.items() if s.deployment_id == deployment_id]
            for sid in ended:
                session = self._live.pop(sid)
                session.cache, session.mask = None, None
            return len(ended)

    def drop_stale(self, deployment_id: str, active_version: int) -> int:
        """Free the caches of a deployment's sessions under older key versions (after a rotation)."""
        n = 0
        with self._lock:
            for s in self._live.values():
                if s.deployment_id == deployment_id and s.key_version != active_version and not s.stale:
                    s.stale, s.cache, s.mask, s.cache_bytes = True, None, None, 0
                    n += 1
        return n

    # --- memory of a forward in flight ----------------------------------------------------

    def reserve(self, session: Session, nbytes: int) -> tuple[Any, torch.Tensor | None]:
        """Reserve cache memory for new tokens (TooManySessions past the bound) and return the
        session's (cache, mask) as one consistent snapshot.

        A rotation (`drop_stale`), a delete and an expiry free a session's cache under this
        store's lock, without the deployment's: a forward that passed its checks before one of
        them hears it here (KeyOutdated, UnknownSession) rather than running on a freed cache
        with the old mask, which gave wrong outputs.
        """
        with self._lock:
            mine = self._of_user(session.deployment_id, session.subject)
            if self._used() + nbytes > self.memory_bytes or _held(mine) + nbytes > self.memory_bytes_per_user:
                self._evict_expired()
            if session.stale:
                raise KeyOutdated(
                    f"key version {session.key_version} of this session was replaced while the request "
                    "waited: fetch the current user key and start a new session"
                )
            if self._live.get(session.session_id) is not session:
                raise UnknownSession("the session ended while the request waited")
            if self._used() + nbytes > self.memory_bytes:
                raise TooManySessions(
                    "the KV cache memory for sessions (STIP_CLOUD_SESSION_MEMORY_BYTES) is exhausted; "
                    "end a session or retry later"
                )
            if _held(self._of_user(session.deployment_id, session.subject)) + nbytes > self.memory_bytes_per_user:
                raise TooManySessions(self._user_memory_message())
            session.reserved += nbytes
            return session.cache, session.mask

    def commit(self, session: Session, *, cache: Any, mask: torch.Tensor, nbytes: int) -> bool:
        """Store the extended cache; False when the session ended or went stale meanwhile."""
        with self._lock:
            session.reserved = 0
            if session.stale or self._live.get(session.session_id) is not session:
                return False
            session.cache, session.mask, session.cache_bytes = cache, mask, nbytes
            session.last_used = self.clock()
            return True

    def release(self, session: Session) -> None:
        with self._lock:
            session.reserved = 0

    def _user_memory_message(self) -> str:
        return (
            f"this user's sessions hold the per-user KV cache memory (STIP_CLOUD_SESSION_MEMORY_BYTES_PER_USER="
            f"{self.memory_bytes_per_user} bytes): end a session, or send shorter sequences"
        )


def _held(sessions: list[Session]) -> int:
    return sum(s.cache_bytes + s.reserved for s in sessions)
