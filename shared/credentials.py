"""User credentials: short signed tokens that P2 verifies offline.

P1 signs with its Ed25519 private key; P2 holds only the public key (it arrives with each
weight push, authenticated by P1's push token), so P2 checks a credential without calling
P1 and without any key material. A token reads `stip1.<payload>.<signature>`, both parts
base64url; the payload is JSON: {"sub", "dep", "iat", "exp", "jti"}.

Each credential has exactly one string: its parts are decoded strictly (the urlsafe alphabet
only, no padding, no junk, unused bits zero) and must re-encode to themselves, so a
credential cannot be malleated into a second string that verifies (one that a list of
revoked or logged tokens would not recognise).
"""

import base64
import binascii
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import CredentialError

PREFIX = "stip1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def b64url_decode(text: str) -> bytes:
    """Strict, canonical base64url without padding: ValueError for any other spelling of the bytes."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error:
        raise ValueError("not unpadded base64url") from None
    if _b64(raw) != text:  # non-zero unused bits: another string for the same bytes
        raise ValueError("not canonical base64url")
    return raw


@dataclass(frozen=True)
class Claims:
    sub: str  # the user's id on P1
    dep: str  # the deployment the credential is for
    iat: int
    exp: int
    jti: str  # unique id, so P1 can list and revoke


class Signer:
    """P1's signing key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key

    @classmethod
    def generate(cls) -> "Signer":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> "Signer":
        if path.exists():
            return cls(Ed25519PrivateKey.from_private_bytes(path.read_bytes()))
        signer = cls.generate()
        from cryptography.hazmat.primitives import serialization

        raw = signer._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        return signer

    @property
    def public_key(self) -> str:
        """The verification key, base64url of the raw 32 bytes: safe to publish."""
        from cryptography.hazmat.primitives import serialization

        raw = self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return _b64(raw)

    def issue(self, *, subject: str, deployment_id: str, ttl_s: int, now: int | None = None) -> tuple[str, Claims]:
        iat = int(time.time()) if now is None else now
        claims = Claims(sub=subject, dep=deployment_id, iat=iat, exp=iat + ttl_s, jti=secrets.token_hex(8))
        payload = _b64(json.dumps(claims.__dict__, separators=(",", ":")).encode())
        signature = _b64(self._key.sign(f"{PREFIX}.{payload}".encode()))
        return f"{PREFIX}.{payload}.{signature}", claims


def verify(token: str, public_key: str, *, deployment_id: str, now: int | None = None) -> Claims:
    """Check a credential's signature, expiry and deployment. Raises CredentialError."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise CredentialError("malformed credential")
    try:
        payload, signature = b64url_decode(parts[1]), b64url_decode(parts[2])
    except ValueError:
        raise CredentialError("malformed credential: its parts must be canonical unpadded base64url") from None
    try:
        key = Ed25519PublicKey.from_public_bytes(b64url_decode(public_key))
        key.verify(signature, f"{PREFIX}.{parts[1]}".encode())
    except (InvalidSignature, ValueError):
        raise CredentialError("credential signature is invalid") from None
    try:
        claims = Claims(**json.loads(payload))
    except (ValueError, TypeError, RecursionError):
        raise CredentialError("malformed credential") from None
    if claims.dep != deployment_id:
        raise CredentialError(
            f"credential is for another deployment ({claims.dep!r}, not {deployment_id!r}): use it with "
            f"{claims.dep!r}, or ask the model owner for a credential for {deployment_id!r}"
        )
    if (int(time.time()) if now is None else now) >= claims.exp:
        raise CredentialError("credential has expired")
    return claims
