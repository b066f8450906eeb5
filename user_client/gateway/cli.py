"""`stip gateway`: serve the OpenAI API on this machine in front of STIP deployments.

    stip gateway --deployment llama=dep-3df1198cf446 --deployment minilm=dep-9bb7:MINILM_CREDENTIAL
    stip gateway --config gateway.toml --port 8400

Flags win over the STIP_GATEWAY_* variables; the SDK reads STIP_CLIENT_* (see `settings`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from user_client.errors import StipError
from user_client.gateway.settings import ConfigError, GatewaySettings

log = logging.getLogger("stip.gateway")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stip gateway",
        description="An OpenAI-compatible server on this machine: prompts and answers stay here, "
        "P2 computes on x·π. Settings: STIP_GATEWAY_* and STIP_CLIENT_* variables.",
    )
    p.add_argument("--host", help="bind address (STIP_GATEWAY_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (STIP_GATEWAY_PORT, default 8400)")
    p.add_argument("--config", type=Path, help="TOML file of [models.NAME] tables (STIP_GATEWAY_CONFIG)")
    p.add_argument(
        "--deployment",
        action="append",
        default=[],
        metavar="NAME=DEPLOYMENT_ID[:CREDENTIAL_ENV]",
        help="serve a deployment as model NAME, its credential in the variable CREDENTIAL_ENV "
        "(default STIP_CLIENT_CREDENTIAL); repeatable",
    )
    p.add_argument("--api-key-file", type=Path, help="the gateway's own API key (STIP_GATEWAY_API_KEY[_FILE])")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides: dict[str, object] = {
        k: v
        for k, v in (
            ("host", args.host),
            ("port", args.port),
            ("config", args.config),
            ("api_key_file", args.api_key_file),
        )
        if v is not None
    }
    try:
        settings = GatewaySettings(**overrides)  # type: ignore[arg-type]
        if args.deployment:
            settings.deployments = ",".join([settings.deployments, *args.deployment]).strip(",")
        settings.check_exposure()
        level = logging.DEBUG if args.verbose > 1 else getattr(logging, settings.log_level.upper(), logging.INFO)
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        import uvicorn

        from user_client.gateway.app import create_app

        app = create_app(settings)
    except (ConfigError, ValidationError, ValueError) as e:
        parser.error(str(e))
    except StipError as e:
        sys.stderr.write(f"stip gateway: error: {e.message}\n")
        return 1
    log.info("OpenAI-compatible gateway on http://%s:%d/v1", settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=logging.getLevelName(level).lower())
    return 0
