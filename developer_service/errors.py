"""P1's domain exceptions. The service raises these; each derives from a kind of
stip_http.kinds, which stip_http.errors.ERRORS (the one table) maps to HTTP.

Messages are meant for the caller: they name what went wrong and never carry a token,
a tensor value or key material.
"""

from stip_http import kinds


class DeveloperError(Exception):
    """Base of P1's errors."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(DeveloperError, kinds.BadInput):
    """The request is well-formed but names something unusable (a path, a URL)."""


class InvalidModel(BadRequest):
    """A model directory is missing, unreadable or not a Hugging Face checkpoint."""


class Unauthorized(DeveloperError, kinds.Unauthorized):
    """A missing, malformed, unknown, expired or revoked token."""


class Forbidden(DeveloperError, kinds.Forbidden):
    """A valid credential used outside its scope (another deployment)."""


class NotFound(DeveloperError, kinds.NotFound):
    pass


class UnknownModel(NotFound):
    pass


class UnknownDeployment(NotFound):
    pass


class UnknownCredential(NotFound):
    pass


class Conflict(DeveloperError, kinds.Conflict):
    pass


class JobRunning(Conflict):
    """A deployment already has a transform/push job in flight."""


class NoActiveVersion(Conflict):
    """A deployment has no key version active on P2 yet."""


class NotConfigured(DeveloperError, kinds.NotReady):
    """The service lacks a setting this request needs (admin token, push token)."""


class StateError(DeveloperError):
    """The persisted state under the data directory is unreadable."""


class PushFailed(DeveloperError):
    """P2 refused or did not acknowledge a weight push."""


class JobCancelled(DeveloperError):
    """P1 is shutting down; a running job stops at its next checkpoint."""
