"""P2, the cloud service: receives θ′ from P1, runs it on permuted inputs from P3.

`create_app(settings)` builds the FastAPI application; `stip-cloud serve` runs it.
"""

from cloud_service.app import create_app
from cloud_service.settings import CloudSettings, load_settings

__all__ = ["CloudSettings", "create_app", "load_settings"]
