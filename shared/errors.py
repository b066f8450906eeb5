"""Exceptions of the protocol core. Services map them to HTTP statuses in one place each."""


class StipCoreError(Exception):
    """Base of every error the core raises. `code` is a stable machine-readable name, given
    with the class: `class BadTensor(StipCoreError, code="bad_tensor")`."""

    code = "stip_error"

    def __init_subclass__(cls, *, code: str, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.code = code


class UnsupportedModel(StipCoreError, code="unsupported_model"):
    """A family, architecture or option the protocol does not serve."""


class CheckpointError(StipCoreError, code="bad_checkpoint"):
    """A model directory or checkpoint is missing, truncated or inconsistent."""


class BadTensor(StipCoreError, code="bad_tensor"):
    """A tensor payload on the wire is malformed, of the wrong shape or dtype, or not finite."""


class PayloadTooLarge(BadTensor, code="payload_too_large"):
    """A tensor payload exceeds the size the receiver accepts."""


class KeyFormatError(StipCoreError, code="bad_key"):
    """A key file is malformed or does not match the model's sizes."""


class CredentialError(StipCoreError, code="invalid_credential"):
    """A signed credential is malformed, forged, expired or for another deployment."""
