"""`stip-developer`: serve P1, transform a model offline, and administer a running P1.

    stip-developer serve [--host H] [--port P] [--data-dir DIR]
    stip-developer transform MODEL_DIR --out OUT_DIR
    stip-developer register MODEL_DIR [--name NAME]
    stip-developer deploy MODEL_ID --cloud-url URL [--wait]
    stip-developer rotate DEPLOYMENT_ID [--wait]
    stip-developer issue-credential DEPLOYMENT_ID [--name NAME] [--ttl-s S] [--json]
    stip-developer status DEPLOYMENT_ID
    (also: models, deployments, credentials, revoke-credential)

Client subcommands take `--developer-url` (env STIP_DEVELOPER_URL) and the admin token from
`--admin-token-file`, `--admin-token`, STIP_DEVELOPER_ADMIN_TOKEN_FILE or
STIP_DEVELOPER_ADMIN_TOKEN. Exit codes: 0 success, 1 a failed request or job, 2 bad usage,
configuration or model directory.
"""

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from tqdm.auto import tqdm

from developer_service.client import ClientError, DeveloperAdminClient
from developer_service.errors import StateError
from developer_service.schemas import DeploymentStatus
from developer_service.settings import DEFAULT_URL, load_client_settings, load_settings
from shared.errors import CheckpointError, KeyFormatError, UnsupportedModel

log = logging.getLogger("stip.developer.cli")

EXIT_FAILED = 1
EXIT_USAGE = 2


class CliError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message, self.exit_code = message, exit_code


def _emit(value: BaseModel | list[Any] | dict[str, Any]) -> None:
    """Results go to stdout as JSON; progress and messages go to stderr."""
    if isinstance(value, BaseModel):
        data: Any = value.model_dump(mode="json")
    elif isinstance(value, list):
        data = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    else:
        data = value
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _settings_error(e: ValidationError) -> CliError:
    problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in e.errors())
    return CliError(f"invalid configuration: {problems}", EXIT_USAGE)


# --- serve -------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from developer_service.app import create_app
    from developer_service.service import STATE_FILE
    from developer_service.store import Store

    try:
        settings = load_settings(host=args.host, port=args.port, data_dir=args.data_dir, log_level=args.log_level)
    except ValidationError as e:
        raise _settings_error(e) from None
    _configure_logging(settings.log_level)
    state = settings.data_dir.expanduser() / STATE_FILE
    if state.exists():
        try:
            Store(state)  # refuse to start over an unreadable state, before binding the port
        except StateError as e:
            raise CliError(e.message, EXIT_USAGE) from None
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        ssl_certfile=str(settings.tls_certfile) if settings.tls_certfile else None,
        ssl_keyfile=str(settings.tls_keyfile) if settings.tls_keyfile else None,
        timeout_graceful_shutdown=30,
    )
    return 0


# --- transform (offline) ---------------------------------------------------------------------


def cmd_transform(args: argparse.Namespace) -> int:
    from shared.checkpoint import transform_model_dir

    _configure_logging("WARNING")
    try:
        result = transform_model_dir(
            args.model_dir,
            args.out,
            key_version=args.key_version,
            shard_bytes=args.shard_bytes,
            progress=not args.quiet,
            overwrite=args.overwrite,
        )
    except (CheckpointError, UnsupportedModel, KeyFormatError) as e:
        raise CliError(str(e), EXIT_USAGE) from None
    except OSError as e:
        raise CliError(f"{e.strerror or e}: {e.filename}" if e.filename else str(e), EXIT_USAGE) from None
    _emit(
        {
            "out_dir": str(result.out_dir),
            "family": result.family,
            "key_version": result.key.user.key_version,
            "fingerprint": result.key.user.fingerprint,
            "cloud_files": [str(f) for f in result.cloud_files],
        }
    )
    return 0


# --- client subcommands ----------------------------------------------------------------------


def _client(args: argparse.Namespace) -> DeveloperAdminClient:
    try:
        settings = load_client_settings(
            url=args.developer_url,
            admin_token=args.admin_token,
            admin_token_file=args.admin_token_file,
            ca_bundle=args.ca_bundle,
            timeout_s=args.timeout,
        )
    except ValidationError as e:
        raise _settings_error(e) from None
    if settings.admin_token is None:
        raise CliError("no admin token: pass --admin-token-file or set STIP_DEVELOPER_ADMIN_TOKEN(_FILE)", EXIT_USAGE)
    return DeveloperAdminClient(
        settings.url,
        admin_token=settings.admin_token.get_secret_value(),
        timeout_s=settings.timeout_s,
        ca_bundle=settings.ca_bundle,
    )


class _ProgressView:
    """One tqdm bar per stage of a deployment job, fed by polling."""

    UNITS = {"transforming": ("tensor", False), "pushing": ("B", True)}

    def __init__(self) -> None:
        self.stage: str | None = None
        self.bar: Any = None

    def __call__(self, status: DeploymentStatus) -> None:
        p = status.progress
        if p.stage != self.stage:
            self.close()
            self.stage = p.stage
            unit, scale = self.UNITS.get(p.stage, ("", False))
            self.bar = tqdm(total=p.total or None, desc=p.stage, unit=unit, unit_scale=scale, file=sys.stderr)
        if self.bar is not None:
            if p.total and self.bar.total != p.total:
                self.bar.total = p.total
            self.bar.n = p.done
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _wait(p1: DeveloperAdminClient, status: DeploymentStatus, args: argparse.Namespace) -> DeploymentStatus:
    view = _ProgressView()
    try:
        return p1.wait(status.deployment_id, poll_s=args.poll_s, timeout_s=args.wait_timeout, on_status=view)
    finally:
        view.close()


def _finish_job(final: DeploymentStatus, expected_version: int | None) -> int:
    _emit(final)
    if final.status == "active" and final.error is None and final.key_version == expected_version:
        return 0
    sys.stderr.write(f"error: {final.error or f'deployment is {final.status}'}\n")
    return EXIT_FAILED


def cmd_register(args: argparse.Namespace, p1: DeveloperAdminClient) -> int:
    # P1 reads the directory on its own machine: send an absolute path.
    _emit(p1.register(os.path.abspath(args.model_dir), name=args.name))
    return 0


def cmd_models(args: argparse.Namespace, p1: DeveloperAdminClient) -> int:
    _emit(p1.models())
    return 0


def cmd_deploy(args: argparse.Namespace, p1: DeveloperAdminClient) -> int:
    status = p1.deploy(args.model_id, cloud_url=args.cloud_url, mode=args.mode)
    if not args.wait:
        _emit(status)
        return 0
    return _finish_job(_wait(p1, status, args), status.pending_key_version)


def cmd_rotate(args: argparse.Namespace, p1: DeveloperAdminClient) -> int:
    status = p1.rotate(args.deployment_id)
    if not args.wait:
        _emit(status)
        return 0
    return _finish_job(_wait(p1, status, args), status.pending_key_version)


def cmd_status(args: argparse.Namespace, p1: DeveloperAdminClient) -> int:
    _emit(p1.deployment(args.deployment_id))
    return 0


def cmd_deployments(args: argparse.Namespace, p1: DeveloperAdminClient) -> int:
    _emit(p1.deployments())
    return 0


def cmd_issue_credential(args: argparse.Namespace, p1: DeveloperAdminClient) -> int:
    issued = p1.issue_credential(args.deployment_id, name=args.name, ttl_s=args.ttl_s)
    if args.json:
        _emit(issued)
    else:
        sys.stdout.write(issued.credential + "\n")
        sys.stderr.write(f"user {issued.user_id} on {issued.deployment_id}, expires at {issued.expires_at}\n")
    return 0


def cmd_credentials(args: argparse.Namespace, p1: DeveloperAdminClient) -> int:
    _emit(p1.credentials(args.deployment_id))
    return 0


def cmd_revoke(args: argparse.Namespace, p1: DeveloperAdminClient) -> int:
    _emit(p1.revoke_credential(args.deployment_id, args.user_id))
    return 0


# --- parser ------------------------------------------------------------------------------------


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stip-developer", description="STIP developer service (P1).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run P1 (settings from STIP_DEVELOPER_* variables)")
    serve.add_argument("--host", help="bind address (STIP_DEVELOPER_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (STIP_DEVELOPER_PORT, default 8001)")
    serve.add_argument("--data-dir", type=Path, help="state and keys (STIP_DEVELOPER_DATA_DIR)")
    serve.add_argument("--log-level", help="STIP_DEVELOPER_LOG_LEVEL, default INFO")
    serve.set_defaults(run=cmd_serve)

    transform = sub.add_parser("transform", help="transform a model directory offline")
    transform.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    transform.add_argument(
        "--out", type=Path, required=True, metavar="OUT_DIR", help="writes OUT/{cloud,user,developer}"
    )
    transform.add_argument("--key-version", type=int, default=1)
    transform.add_argument("--shard-bytes", type=int, default=2 << 30, help="size of the cloud shards")
    transform.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    transform.add_argument("--quiet", action="store_true", help="no progress bar")
    transform.set_defaults(run=cmd_transform)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--developer-url", help=f"P1's URL (STIP_DEVELOPER_URL, default {DEFAULT_URL})")
    common.add_argument("--admin-token", help="prefer --admin-token-file: arguments show in `ps`")
    common.add_argument("--admin-token-file", type=Path)
    common.add_argument("--ca-bundle", type=Path, help="CA file to verify P1's TLS certificate")
    common.add_argument("--timeout", type=float, help="seconds per request (default 60)")

    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--wait", action="store_true", help="follow the job's progress until it ends")
    waiting.add_argument("--wait-timeout", type=float, default=None, help="give up waiting after S seconds")
    waiting.add_argument("--poll-s", type=float, default=0.5, help=argparse.SUPPRESS)

    def client_command(
        name: str, run: Callable[..., int], help: str, *parents: argparse.ArgumentParser
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, parents=[common, *parents])
        p.set_defaults(run=run, client=True)
        return p

    p = client_command("register", cmd_register, "register a model directory on P1's machine")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--name")
    client_command("models", cmd_models, "list registered models")
    p = client_command("deploy", cmd_deploy, "deploy a model to P2 (key version 1)", waiting)
    p.add_argument("model_id", metavar="MODEL_ID")
    p.add_argument("--cloud-url", required=True, help="P2's URL, as P1 reaches it")
    p.add_argument(
        "--mode",
        choices=("embeds", "token"),
        default="embeds",
        help="token: P2 also gets the permuted token table and generates (needs STIP_DEVELOPER_ALLOW_TOKEN_MODE=true)",
    )
    p = client_command("rotate", cmd_rotate, "new key set and new θ′ for a deployment", waiting)
    p.add_argument("deployment_id", metavar="DEPLOYMENT_ID")
    p = client_command("status", cmd_status, "a deployment's status and progress")
    p.add_argument("deployment_id", metavar="DEPLOYMENT_ID")
    client_command("deployments", cmd_deployments, "list deployments")
    p = client_command("issue-credential", cmd_issue_credential, "issue a user credential (printed on stdout)")
    p.add_argument("deployment_id", metavar="DEPLOYMENT_ID")
    p.add_argument("--name", default="user")
    p.add_argument("--ttl-s", type=int, default=None, help="lifetime (default: P1's STIP_DEVELOPER_CREDENTIAL_TTL_S)")
    p.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    p = client_command("credentials", cmd_credentials, "list a deployment's credentials (no tokens)")
    p.add_argument("deployment_id", metavar="DEPLOYMENT_ID")
    p = client_command("revoke-credential", cmd_revoke, "stop handing a user the key")
    p.add_argument("deployment_id", metavar="DEPLOYMENT_ID")
    p.add_argument("user_id", metavar="USER_ID")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "client", False):
            with _client(args) as p1:
                return int(args.run(args, p1))
        return int(args.run(args))
    except CliError as e:
        sys.stderr.write(f"error: {e.message}\n")
        return e.exit_code
    except ClientError as e:
        sys.stderr.write(f"error: {e.message}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
