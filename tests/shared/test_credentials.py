"""Signed user credentials: P2 verifies them offline with P1's public key only."""

import os
import stat

import pytest

from shared.credentials import Signer, b64url_decode, verify
from shared.errors import CredentialError
from tests.support import malleable, malleated


def test_issue_and_verify() -> None:
    signer = Signer.generate()
    token, claims = signer.issue(subject="alice", deployment_id="dep-1", ttl_s=60)
    assert verify(token, signer.public_key, deployment_id="dep-1") == claims
    assert claims.exp - claims.iat == 60


def test_refusals() -> None:
    signer, other = Signer.generate(), Signer.generate()
    token, _ = signer.issue(subject="alice", deployment_id="dep-1", ttl_s=60, now=1000)
    with pytest.raises(CredentialError, match="another deployment"):
        verify(token, signer.public_key, deployment_id="dep-2", now=1001)
    with pytest.raises(CredentialError, match="expired"):
        verify(token, signer.public_key, deployment_id="dep-1", now=1060)
    with pytest.raises(CredentialError, match="signature"):
        verify(token, other.public_key, deployment_id="dep-1", now=1001)
    head, payload, sig = token.split(".")
    forged_payload = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1]
    with pytest.raises(CredentialError):
        verify(f"{head}.{forged_payload}.{sig}", signer.public_key, deployment_id="dep-1", now=1001)
    for garbage in ("", "stip1", "stip1.a.b", "Bearer x", "stip1..", "x.y.z"):
        with pytest.raises(CredentialError):
            verify(garbage, signer.public_key, deployment_id="dep-1", now=1001)


def test_one_credential_has_one_string() -> None:
    """Every other spelling of a genuine credential's base64 (which a lenient decoder reads as the
    same signature) is refused as malformed; the canonical string verifies."""
    signer = Signer.generate()
    token = malleable(lambda: signer.issue(subject="alice", deployment_id="dep-1", ttl_s=60)[0])
    assert verify(token, signer.public_key, deployment_id="dep-1")
    accepted = []
    for kind, other in malleated(token).items():
        try:
            verify(other, signer.public_key, deployment_id="dep-1")
            accepted.append(kind)
        except CredentialError as e:
            assert "canonical unpadded base64url" in str(e), (kind, e)
    assert accepted == []


@pytest.mark.parametrize("text", ["QQ==", "QQ=", "QR", "Q", "Q Q", "Q+", "Q/", "QQ\n", "****QQ"])
def test_b64url_decode_is_strict(text: str) -> None:
    assert b64url_decode("QQ") == b"A" and b64url_decode("") == b""
    with pytest.raises(ValueError):
        b64url_decode(text)


def test_signing_key_is_owner_only_and_stable(tmp_path) -> None:
    path = tmp_path / "signing.key"
    a = Signer.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Signer.load_or_create(path).public_key == a.public_key
