"""The SDK's exception tree. Every error the client raises on purpose is a `StipError`.

    StipError                 base: `message`, `code` (the service's stable error code), `status`
    ├── AuthError             401 / 403: missing, invalid, expired or other deployment's credential
    ├── KeyOutdated           409 key_outdated that a bundle refetch could not cure
    ├── NotFound              404: unknown deployment or session
    ├── SessionExpired        410: the P2 session expired or was evicted (or lost in a P2 restart)
    ├── RateLimited           429: e.g. too many open sessions; `retry_after` in seconds if given
    ├── BadRequest            400 / 413 / 422: the service rejected the input
    ├── ServerError           5xx
    ├── TransportError        the connection failed or timed out
    └── BundleError           the user bundle is malformed, unsafe or fails verification

Messages name what went wrong in words; they never carry tensor values or key material.
"""

from __future__ import annotations


class StipError(Exception):
    """Base class. `code` is the service's error code (shared.api.E_*), `status` the HTTP status."""

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code!r}, status={self.status!r})"


class AuthError(StipError):
    """The credential was refused (401) or does not grant this deployment (403)."""


class KeyOutdated(StipError):
    """P2 no longer serves the key version of our bundle, and refetching it did not help.

    The client refetches the bundle from P1 on its own when P2 answers `key_outdated`; this is
    raised only when P1 still hands out the version P2 rejects (a rotation in progress), or when
    a caller-managed session was opened under a key that has since been replaced.
    """


class NotFound(StipError):
    """404: the deployment (or session) does not exist."""


class SessionExpired(StipError):
    """410: the P2 session expired (idle timeout) or was evicted; open a new one.

    Also raised for a 404 on a session that P2 no longer knows (P2 keeps sessions in memory, so
    a restart ends them all); `status` then says 404.
    """


class RateLimited(StipError):
    """429: the service refuses more work for now (e.g. too many sessions)."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message, code=code, status=status)
        self.retry_after = retry_after


class BadRequest(StipError):
    """400 / 413 / 422: the request was malformed, too large or of the wrong shape."""


class ServerError(StipError):
    """5xx: the service failed or is not ready."""


class TransportError(StipError):
    """The connection failed, was reset or timed out before a response arrived."""


class BundleError(StipError):
    """The user bundle from P1 is malformed, unsafe to extract, or fails verification."""


__all__ = [
    "AuthError",
    "BadRequest",
    "BundleError",
    "KeyOutdated",
    "NotFound",
    "RateLimited",
    "ServerError",
    "SessionExpired",
    "StipError",
    "TransportError",
]
