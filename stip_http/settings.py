"""Helpers the services' settings share (pure: no HTTP)."""

from pathlib import Path

from pydantic import SecretStr


def resolve_secret(env_name: str, value: SecretStr | None, file: Path | None) -> SecretStr | None:
    """A secret from its variable or from the file `{env_name}_FILE` names (docker secrets).

    Both at once, an unreadable or empty file, or an empty value is an error naming the variable.
    """
    if file is not None:
        if value is not None:
            raise ValueError(f"set {env_name} or {env_name}_FILE, not both")
        try:
            text = file.read_text().strip()
        except OSError as e:
            raise ValueError(f"{env_name}_FILE: cannot read {file}: {e.strerror}") from None
        if not text:
            raise ValueError(f"{env_name}_FILE: {file} is empty")
        return SecretStr(text)
    if value is not None and not value.get_secret_value().strip():
        raise ValueError(f"{env_name} is empty")
    return value
