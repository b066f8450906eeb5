"""The kinds of domain error both services raise (plain exceptions: no HTTP imported here).

A service's own exceptions derive from one of these (`class BadInput(CloudError, kinds.BadInput)`),
and `stip_http.errors.ERRORS`, the one table, gives each kind its HTTP status and error code.
"""


class BadInput(Exception):
    """The request names or carries something unusable (a shape, a digest, a path, a URL)."""


class Unauthorized(Exception):
    """A missing, malformed, forged, unknown, expired or revoked credential or token."""


class Forbidden(Exception):
    """A genuine credential used outside its scope, or a feature the operator did not enable."""


class NotFound(Exception):
    pass


class Conflict(Exception):
    """The request clashes with the current state (a job in flight, a lower key version ...)."""


class KeyOutdated(Exception):
    """Tensors (or a session) permuted with a key version the service no longer serves."""


class SessionExpired(Exception):
    pass


class TooManySessions(Exception):
    pass


class TooManyRequests(Exception):
    """A per-user quota of requests in flight is reached."""


class ResponseTooLarge(Exception):
    """What the request asks for back would exceed the service's bound."""


class NotReady(Exception):
    """The service cannot answer this yet (still loading, or a setting it needs is missing)."""


class Internal(Exception):
    """A failure that is the service's own; its message is still meant for the caller."""
