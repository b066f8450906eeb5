"""P2, the cloud service: receives θ′ from P1, runs it on permuted inputs from P3.

`create_app(settings)` builds the FastAPI application; `stip-cloud serve` runs it.
"""

from typing import TYPE_CHECKING

from shared.lazy import lazy_attributes

if TYPE_CHECKING:
    from cloud_service.app import create_app
    from cloud_service.settings import CloudSettings, load_settings

# Imported on first use (FastAPI, torch), so `stip-cloud --help` stays fast.
__getattr__ = lazy_attributes(
    __name__,
    {
        "create_app": "cloud_service.app",
        "CloudSettings": "cloud_service.settings",
        "load_settings": "cloud_service.settings",
    },
)

__all__ = ["CloudSettings", "create_app", "load_settings"]
