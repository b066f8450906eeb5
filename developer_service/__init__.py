"""P1, the developer service: model registry, key generation, transform, push to P2, user keys.

`create_app(settings)` builds the FastAPI app; `DeveloperService` holds the logic;
`DeveloperAdminClient` talks to a running P1; the `stip-developer` CLI wraps all three.
"""

from developer_service.client import ClientError, DeveloperAdminClient
from developer_service.settings import DeveloperSettings, load_settings

__all__ = ["ClientError", "DeveloperAdminClient", "DeveloperSettings", "create_app", "load_settings"]


def __getattr__(name: str) -> object:
    # create_app pulls in FastAPI and torch; import it on first use only.
    if name == "create_app":
        from developer_service.app import create_app

        return create_app
    raise AttributeError(name)
