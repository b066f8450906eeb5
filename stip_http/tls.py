"""TLS on the client side, for P1 (pushing to P2) and P3 (the SDK): trust and its failures."""

import os
import ssl


def tls_verify(verify: bool | str | os.PathLike[str] | ssl.SSLContext) -> bool | ssl.SSLContext:
    """httpx's `verify` from ours: a bool, an SSL context, or the path of a CA file or directory."""
    if isinstance(verify, (bool, ssl.SSLContext)):
        return verify
    path = os.fspath(verify)
    try:
        if os.path.isdir(path):
            return ssl.create_default_context(capath=path)
        return ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"verify: cannot load the CA bundle {path!r}: {e}") from None


def certificate_refused(e: BaseException) -> bool:
    """Whether a connection failed because the server's TLS certificate did not verify
    (permanent: retrying cannot help)."""
    cause: BaseException | None = e
    for _ in range(8):  # httpx.ConnectError <- httpcore.ConnectError <- ssl.SSLCertVerificationError
        if cause is None:
            return False
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False
