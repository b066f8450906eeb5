"""`stip-cloud serve`: run P2 under uvicorn.

Every flag has an environment twin (`STIP_CLOUD_HOST`, `STIP_CLOUD_PORT`,
`STIP_CLOUD_DATA_DIR`, ...; see cloud_service.settings); a flag given wins.

Arguments are parsed (and `--help` answered) before pydantic, uvicorn, FastAPI or torch load.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError

    from cloud_service.settings import CloudSettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stip-cloud", description="STIP cloud service (P2)")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve transformed models over HTTP")
    serve.add_argument("--host", help="bind address (STIP_CLOUD_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (STIP_CLOUD_PORT, default 8002)")
    serve.add_argument("--data-dir", type=Path, help="pushed weights (STIP_CLOUD_DATA_DIR)")
    serve.add_argument("--device", help="auto, cpu, cuda or cuda:N (STIP_CLOUD_DEVICE, default auto)")
    serve.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="STIP_CLOUD_DTYPE")
    serve.add_argument("--log-level", help="STIP_CLOUD_LOG_LEVEL, default INFO")
    return parser


def settings_from_args(args: argparse.Namespace) -> CloudSettings:
    from cloud_service.settings import load_settings

    flags = ("host", "port", "data_dir", "device", "dtype", "log_level")
    return load_settings(**{name: getattr(args, name) for name in flags})


def _describe(e: ValidationError) -> str:
    # location and reason only: the input could be the push token
    return "\n".join(f"  {'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in e.errors())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from pydantic import ValidationError

    from cloud_service.app import create_app
    from stip_http.edge import serve

    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        parser.exit(2, f"stip-cloud: invalid settings:\n{_describe(e)}\n")
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(create_app(settings), settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
