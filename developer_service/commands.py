"""The handlers of `stip-developer` (the parser lives in developer_service.cli).

Imported only once the arguments are parsed, so this module imports httpx, pydantic and tqdm
at the top; `serve` and `transform` import FastAPI and torch inside their handlers.
"""

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from tqdm.auto import tqdm

from developer_service.client import ClientError, DeveloperAdminClient
from developer_service.errors import StateError
from developer_service.schemas import DeploymentStatus
from developer_service.settings import load_client_settings, load_settings
from shared.errors import CheckpointError, KeyFormatError, UnsupportedModel

log = logging.getLogger("stip.developer.cli")

EXIT_FAILED = 1
EXIT_USAGE = 2


class CliError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message, self.exit_code = message, exit_code


def _emit(value: BaseModel | list[Any] | dict[str, Any]) -> int:
    """Results go to stdout as JSON; progress and messages go to stderr. Returns 0, the exit status."""
    if isinstance(value, BaseModel):
        data: Any = value.model_dump(mode="json")
    elif isinstance(value, list):
        data = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    else:
        data = value
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    return 0


def _settings_error(e: ValidationError) -> CliError:
    problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in e.errors())
    return CliError(f"invalid configuration: {problems}", EXIT_USAGE)


# --- serve -------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:

    from developer_service.app import create_app
    from developer_service.service import STATE_FILE
    from developer_service.store import Store
    from stip_http.edge import serve

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
    serve(create_app(settings), settings)
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


# --- example-model (offline) -----------------------------------------------------------------


def cmd_example_model(args: argparse.Namespace) -> int:
    """Write the demo's small decoder with RANDOM parameters; print its directory on stdout."""
    import transformers

    from stip_demo.models import EXAMPLE_MODELS

    transformers.utils.logging.disable_progress_bar()

    out: Path = args.out.expanduser().resolve()
    if out.exists():
        raise CliError(f"{out} already exists: name a new directory (example-model writes a fresh one)", EXIT_USAGE)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        EXAMPLE_MODELS[args.family](out, seed=args.seed)
    except ModuleNotFoundError as e:  # MiniLM's tokenizer: the demo extra
        raise CliError(str(e), EXIT_USAGE) from None
    sys.stderr.write(
        f"WARNING: {out} holds a {args.family} model with RANDOM weights, for trying STIP out: it generates "
        "gibberish by design (its tokenizer is MiniLM's WordPiece). Register it with "
        f"`stip-developer register {out}`.\n"
    )
    sys.stdout.write(f"{out}\n")
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
    """One tqdm bar per stage of a deployment job (tensors transformed, bytes pushed, tensor bytes
    P2 has loaded), fed by polling.

    A bar starts at the count already done when it is first seen (so its rate is real), and a
    stage the job has moved past is shown complete before its bar closes: polling may miss the
    last update of a stage, never its end. A P2 that reports no load progress leaves the loading
    bar with the elapsed time only.
    """

    UNITS = {"transforming": ("tensor", False), "pushing": ("B", True), "loading": ("B", True)}
    LABELS = {"loading": "loading on P2"}  # P2 builds the model on θ′ and runs its test forward

    def __init__(self) -> None:
        self.stage: str | None = None
        self.bar: Any = None

    def __call__(self, status: DeploymentStatus) -> None:
        p = status.progress
        if p.stage != self.stage:
            self.close(complete=p.stage != "failed")
            self.stage = p.stage
            if p.stage in self.UNITS:
                unit, scale = self.UNITS[p.stage]
                self.bar = tqdm(
                    total=p.total or None,
                    initial=p.done,
                    desc=self.LABELS.get(p.stage, p.stage),
                    unit=unit,
                    unit_scale=scale,
                    unit_divisor=1024 if scale else 1000,
                    smoothing=0,  # the rate is the average since the bar appeared: polls arrive in jumps
                    file=sys.stderr,
                )
                return
        if self.bar is not None:
            if p.total and self.bar.total != p.total:
                self.bar.total = p.total
            if p.done > self.bar.n:
                self.bar.update(p.done - self.bar.n)

    def close(self, *, complete: bool = True) -> None:
        if self.bar is not None:
            if complete and self.bar.total and self.bar.n < self.bar.total:
                self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()
            self.bar = None


def _wait(p1: DeveloperAdminClient, status: DeploymentStatus, args: argparse.Namespace) -> DeploymentStatus:
    view = _ProgressView()
    final: DeploymentStatus | None = None
    try:
        final = p1.wait(status.deployment_id, poll_s=args.poll_s, timeout_s=args.wait_timeout, on_status=view)
        return final
    finally:
        view.close(complete=final is not None and final.status == "active")


def _finish_job(final: DeploymentStatus, expected_version: int | None) -> int:
    _emit(final)
    if final.status == "active" and final.error is None and final.key_version == expected_version:
        return 0
    sys.stderr.write(f"error: {final.error or f'deployment is {final.status}'}\n")
    return EXIT_FAILED


def cmd_register(args: argparse.Namespace, p1: DeveloperAdminClient) -> int:
    # P1 reads the directory on its own machine: send an absolute path.
    return _emit(p1.register(os.path.abspath(args.model_dir), name=args.name))


def cmd_models(args: argparse.Namespace, p1: DeveloperAdminClient) -> int:
    return _emit(p1.models())


def cmd_deploy(args: argparse.Namespace, p1: DeveloperAdminClient) -> int:
    return _job_started(p1, p1.deploy(args.model_id, cloud_url=args.cloud_url, mode=args.mode), args)


def cmd_rotate(args: argparse.Namespace, p1: DeveloperAdminClient) -> int:
    return _job_started(p1, p1.rotate(args.deployment_id), args)


def _job_started(p1: DeveloperAdminClient, status: DeploymentStatus, args: argparse.Namespace) -> int:
    """A deploy or rotation P1 accepted: its status now, or with --wait its outcome."""
    if not args.wait:
        return _emit(status)
    return _finish_job(_wait(p1, status, args), status.pending_key_version)


def cmd_status(args: argparse.Namespace, p1: DeveloperAdminClient) -> int:
    return _emit(p1.deployment(args.deployment_id))


def cmd_deployments(args: argparse.Namespace, p1: DeveloperAdminClient) -> int:
    return _emit(p1.deployments())


def cmd_issue_credential(args: argparse.Namespace, p1: DeveloperAdminClient) -> int:
    issued = p1.issue_credential(args.deployment_id, name=args.name, ttl_s=args.ttl_s)
    if args.json:
        _emit(issued)
    else:
        sys.stdout.write(issued.credential + "\n")
        expires = datetime.fromtimestamp(issued.expires_at, tz=UTC).isoformat(timespec="seconds")
        sys.stderr.write(f"user {issued.user_id} on {issued.deployment_id}, expires {expires}\n")
    return 0


def cmd_credentials(args: argparse.Namespace, p1: DeveloperAdminClient) -> int:
    return _emit(p1.credentials(args.deployment_id))


def cmd_revoke(args: argparse.Namespace, p1: DeveloperAdminClient) -> int:
    return _emit(p1.revoke_credential(args.deployment_id, args.user_id))


def cmd_delete_deployment(args: argparse.Namespace, p1: DeveloperAdminClient) -> int:
    result = p1.delete_deployment(args.deployment_id)
    _emit(result)
    if not result.cloud_deleted:
        sys.stderr.write(
            f"{args.deployment_id} is deleted on P1 (keys and credentials); P2 has not confirmed yet: P1 keeps "
            f"asking in the background (`stip-developer status {args.deployment_id}` shows why)\n"
        )
    return 0


def cmd_delete_model(args: argparse.Namespace, p1: DeveloperAdminClient) -> int:
    return _emit(p1.delete_model(args.model_id))


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run(args: argparse.Namespace, handler: Callable[..., int]) -> int:
    """Run a parsed command: client commands get a DeveloperAdminClient; errors become exit codes."""
    try:
        if getattr(args, "client", False):
            with _client(args) as p1:
                return int(handler(args, p1))
        return int(handler(args))
    except CliError as e:
        sys.stderr.write(f"error: {e.message}\n")
        return e.exit_code
    except ClientError as e:
        sys.stderr.write(f"error: {e.message}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
