"""Exceptions of the protocol core. Services map them to HTTP statuses in one place each."""


class StipCoreError(Exception):
    """Base of every error the core raises. `code` is a stable machine-readable name."""

    code = "stip_error"


class UnsupportedModel(StipCoreError):
    code = "unsupported_model"


class CheckpointError(StipCoreError):
    """A model directory or checkpoint is missing, truncated or inconsistent."""

    code = "bad_checkpoint"


class BadTensor(StipCoreError):
    """A tensor payload on the wire is malformed, of the wrong shape or dtype, or not finite."""

    code = "bad_tensor"


class PayloadTooLarge(BadTensor):
    code = "payload_too_large"


class KeyFormatError(StipCoreError):
    code = "bad_key"


class CredentialError(StipCoreError):
    """A signed credential is malformed, forged, expired or for another deployment."""

    code = "invalid_credential"
