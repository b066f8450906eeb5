"""P2's domain exceptions. The service raises these; api.py maps them to HTTP in one table.

Messages are meant for the caller: they name what went wrong (a tensor's name, shape or
dtype, a limit) and never carry a tensor value, a credential or key material.
"""


class CloudError(Exception):
    """Base of P2's errors."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadInput(CloudError):
    """A request body, header or option that P2 cannot use (shape, dtype, d, a digest ...)."""


class Unauthorized(CloudError):
    """A missing, malformed, forged or expired credential or push token."""


class Forbidden(CloudError):
    """A genuine credential used outside its scope (another deployment, another user's session)."""


class NotFound(CloudError):
    pass


class UnknownDeployment(NotFound):
    pass


class UnknownSession(NotFound):
    pass


class SessionExpired(CloudError):
    """The session was idle longer than its TTL; its KV cache is gone."""


class KeyOutdated(CloudError):
    """Tensors (or a session) permuted with a key version P2 no longer serves."""


class VersionConflict(CloudError):
    """A push of a key version lower than the active one, or the same version with other bytes."""


class SenderGone(CloudError):
    """The pushing client disconnected before its push was activated: nothing changed."""


class TooManySessions(CloudError):
    """The session count or the KV cache memory bound is reached."""


class NotReady(CloudError):
    """P2 is still reloading its deployments from disk."""


class PushesDisabled(CloudError):
    """No push token is configured, so P2 accepts no weights."""


class Internal(CloudError):
    """A failure that is P2's own (out of memory while loading ...)."""


class TooManyForwards(CloudError):
    """One user has as many forwards in flight as STIP_CLOUD_MAX_FORWARDS_PER_USER allows."""


class ResponseTooLarge(CloudError):
    """The outputs a forward asks for would exceed STIP_CLOUD_MAX_RESPONSE_BYTES."""
