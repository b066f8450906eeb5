"""P2's domain exceptions. The service raises these; each derives from a kind of
stip_http.kinds, which stip_http.errors.ERRORS (the one table) maps to HTTP.

Messages are meant for the caller: they name what went wrong (a tensor's name, shape or
dtype, a limit) and never carry a tensor value, a credential or key material.
"""

from stip_http import kinds


class CloudError(Exception):
    """Base of P2's errors."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadInput(CloudError, kinds.BadInput):
    """A request body, header or option that P2 cannot use (shape, dtype, d, a digest ...)."""


class Unauthorized(CloudError, kinds.Unauthorized):
    """A missing, malformed, forged or expired credential or push token."""


class Forbidden(CloudError, kinds.Forbidden):
    """A genuine credential used outside its scope (another deployment, another user's session)."""


class NotFound(CloudError, kinds.NotFound):
    pass


class UnknownDeployment(NotFound):
    pass


class UnknownSession(NotFound):
    pass


class SessionExpired(CloudError, kinds.SessionExpired):
    """The session was idle longer than its TTL; its KV cache is gone."""


class KeyOutdated(CloudError, kinds.KeyOutdated):
    """Tensors (or a session) permuted with a key version P2 no longer serves."""


class VersionConflict(CloudError, kinds.Conflict):
    """A push of a key version lower than the active one, or the same version with other bytes."""


class SenderGone(CloudError, kinds.BadInput):
    """The pushing client disconnected before its push was activated: nothing changed."""


class TooManySessions(CloudError, kinds.TooManySessions):
    """The session count or the KV cache memory bound is reached."""


class NotReady(CloudError, kinds.NotReady):
    """P2 is still reloading its deployments from disk."""


class PushesDisabled(CloudError, kinds.Forbidden):
    """No push token is configured, so P2 accepts no weights."""


class Internal(CloudError, kinds.Internal):
    """A failure that is P2's own (out of memory while loading ...)."""


class TooManyForwards(CloudError, kinds.TooManyRequests):
    """One user has as many forwards in flight as STIP_CLOUD_MAX_FORWARDS_PER_USER allows."""


class ResponseTooLarge(CloudError, kinds.ResponseTooLarge):
    """The outputs a forward asks for would exceed STIP_CLOUD_MAX_RESPONSE_BYTES."""
