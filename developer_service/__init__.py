"""P1, the developer service: model registry, key generation, transform, push to P2, user keys.

`create_app(settings)` builds the FastAPI app; `DeveloperService` holds the logic;
`DeveloperAdminClient` talks to a running P1; the `stip-developer` CLI wraps all three.
"""

from typing import TYPE_CHECKING

from shared.lazy import lazy_attributes

if TYPE_CHECKING:
    from developer_service.app import create_app
    from developer_service.client import ClientError, DeveloperAdminClient
    from developer_service.settings import DeveloperSettings, load_settings

__all__ = ["ClientError", "DeveloperAdminClient", "DeveloperSettings", "create_app", "load_settings"]

# Imported on first use (httpx, pydantic, FastAPI, torch), so `stip-developer --help` stays fast.
__getattr__ = lazy_attributes(
    __name__,
    {
        "create_app": "developer_service.app",
        "ClientError": "developer_service.client",
        "DeveloperAdminClient": "developer_service.client",
        "DeveloperSettings": "developer_service.settings",
        "load_settings": "developer_service.settings",
    },
)
