"""`stip-developer`: serve P1, transform a model offline, and administer a running P1.

    stip-developer serve [--host H] [--port P] [--data-dir DIR]
    stip-developer transform MODEL_DIR --out OUT_DIR [--overwrite]
    stip-developer example-model llama|gpt2|qwen2 DIR     # a small RANDOM decoder to try
    stip-developer register MODEL_DIR [--name NAME]
    stip-developer deploy MODEL_ID --cloud-url URL [--wait]
    stip-developer rotate DEPLOYMENT_ID [--wait]
    stip-developer issue-credential DEPLOYMENT_ID [--name NAME] [--ttl-s S] [--json]
    stip-developer status DEPLOYMENT_ID
    stip-developer delete-deployment DEPLOYMENT_ID / delete-model MODEL_ID
    (also: models, deployments, credentials, revoke-credential)

Client subcommands take `--developer-url` (env STIP_DEVELOPER_URL) and the admin token from
`--admin-token-file`, `--admin-token`, STIP_DEVELOPER_ADMIN_TOKEN_FILE or
STIP_DEVELOPER_ADMIN_TOKEN. Exit codes: 0 success, 1 a failed request or job, 2 bad usage,
configuration or model directory.

This module imports only the standard library: arguments are parsed (and `--help` answered)
before httpx, pydantic, FastAPI or torch load. Each subcommand names its handler as
"module:function" (`handler=` below); developer_service.commands runs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

COMMANDS = "developer_service.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stip-developer", description="STIP developer service (P1).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: str, help: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=list(parents))
        p.set_defaults(handler=handler)
        return p

    serve = command("serve", f"{COMMANDS}:cmd_serve", "run P1 (settings from STIP_DEVELOPER_* variables)")
    serve.add_argument("--host", help="bind address (STIP_DEVELOPER_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (STIP_DEVELOPER_PORT, default 8001)")
    serve.add_argument("--data-dir", type=Path, help="state and keys (STIP_DEVELOPER_DATA_DIR)")
    serve.add_argument("--log-level", help="STIP_DEVELOPER_LOG_LEVEL, default INFO")

    transform = command("transform", f"{COMMANDS}:cmd_transform", "transform a model directory offline")
    transform.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    transform.add_argument(
        "--out", type=Path, required=True, metavar="OUT_DIR", help="writes OUT/{cloud,user,developer}"
    )
    transform.add_argument("--key-version", type=int, default=1)
    transform.add_argument("--shard-bytes", type=int, default=2 << 30, help="size of the cloud shards")
    transform.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    transform.add_argument("--quiet", action="store_true", help="no progress bar")

    example = command(
        "example-model",
        f"{COMMANDS}:cmd_example_model",
        "write a small decoder with RANDOM weights (the demo's; it generates gibberish) to try the flow",
    )
    example.add_argument("family", choices=["llama", "gpt2", "qwen2"], metavar="llama|gpt2|qwen2")
    example.add_argument("out", type=Path, metavar="DIR", help="the model directory to write (must not exist)")
    example.add_argument("--seed", type=int, default=0, help="seed of the random parameters")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--developer-url", help="P1's URL (STIP_DEVELOPER_URL, default http://127.0.0.1:8001)")
    common.add_argument("--admin-token", help="prefer --admin-token-file: arguments show in `ps`")
    common.add_argument("--admin-token-file", type=Path)
    common.add_argument("--ca-bundle", type=Path, help="CA file to verify P1's TLS certificate")
    common.add_argument("--timeout", type=float, help="seconds per request (default 60)")

    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--wait", action="store_true", help="follow the job's progress until it ends")
    waiting.add_argument("--wait-timeout", type=float, default=None, help="give up waiting after S seconds")
    waiting.add_argument("--poll-s", type=float, default=0.5, help=argparse.SUPPRESS)

    def client_command(
        name: str, function: str, help: str, *parents: argparse.ArgumentParser
    ) -> argparse.ArgumentParser:
        p = command(name, f"{COMMANDS}:{function}", help, common, *parents)
        p.set_defaults(client=True)
        return p

    p = client_command("register", "cmd_register", "register a model directory on P1's machine")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--name")
    client_command("models", "cmd_models", "list registered models")
    p = client_command("deploy", "cmd_deploy", "deploy a model to P2 (key version 1)", waiting)
    p.add_argument("model_id", metavar="MODEL_ID")
    p.add_argument("--cloud-url", required=True, help="P2's URL, as P1 reaches it")
    p.add_argument(
        "--mode",
        choices=("embeds", "token"),
        default="embeds",
        help="token: P2 also gets the permuted token table and generates (needs STIP_DEVELOPER_ALLOW_TOKEN_MODE=true)",
    )
    p = client_command("rotate", "cmd_rotate", "new key set and new θ′ for a deployment", waiting)
    p.add_argument("deployment_id", metavar="DEPLOYMENT_ID")
    p = client_command("status", "cmd_status", "a deployment's status and progress")
    p.add_argument("deployment_id", metavar="DEPLOYMENT_ID")
    client_command("deployments", "cmd_deployments", "list deployments")
    p = client_command("issue-credential", "cmd_issue_credential", "issue a user credential (printed on stdout)")
    p.add_argument("deployment_id", metavar="DEPLOYMENT_ID")
    p.add_argument("--name", default="user")
    p.add_argument("--ttl-s", type=int, default=None, help="lifetime (default: P1's STIP_DEVELOPER_CREDENTIAL_TTL_S)")
    p.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    p = client_command("credentials", "cmd_credentials", "list a deployment's credentials (no tokens)")
    p.add_argument("deployment_id", metavar="DEPLOYMENT_ID")
    p = client_command("revoke-credential", "cmd_revoke", "stop handing a user the key")
    p.add_argument("deployment_id", metavar="DEPLOYMENT_ID")
    p.add_argument("user_id", metavar="USER_ID")
    p = client_command(
        "delete-deployment",
        "cmd_delete_deployment",
        "delete a deployment: its keys on P1, its credentials, and θ′ and its sessions on P2",
    )
    p.add_argument("deployment_id", metavar="DEPLOYMENT_ID")
    p = client_command("delete-model", "cmd_delete_model", "unregister a model no deployment uses")
    p.add_argument("model_id", metavar="MODEL_ID")
    return parser


def load(target: str) -> Callable[..., int]:
    """Import "module:function" and return the function."""
    module, _, function = target.partition(":")
    handler: Callable[..., int] = getattr(importlib.import_module(module), function)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = load(f"{COMMANDS}:run")
    return int(run(args, load(args.handler)))


if __name__ == "__main__":
    sys.exit(main())
