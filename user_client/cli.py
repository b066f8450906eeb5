"""`stip`: the user side's command line.

    stip generate "Once upon a time" --max-new-tokens 32 [--stream] [--temperature 0.8 --seed 1]
    stip embed "a sentence" "another"          # one JSON array per line
    stip classify cat.jpg dog.png --top-k 3     # ViT: one JSON object per image
    stip demo ...                               # the three-party demo (stip_demo.demo)
    stip gateway --deployment llama=dep-...     # an OpenAI-compatible server (user_client.gateway)
    stip audit [--quick]                        # the attack lab: a curious P2, measured (attack_lab)

Connection options fall back to the STIP_CLIENT_* environment variables (DEVELOPER_URL,
CLOUD_URL, DEPLOYMENT_ID, CREDENTIAL, CACHE_DIR); prefer the environment for the credential,
since command lines are visible to other local users. Exit status: 0 on success, 1 on a
STIP error, 2 on a usage error.

This module imports only the standard library: arguments are parsed (and `--help` answered)
before torch or transformers load. A subcommand is a parser here plus a "module:function"
entry in COMMANDS; its handler module imports whatever it needs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

# subcommand -> "module:function(args: argparse.Namespace) -> int", imported after parsing
COMMANDS: dict[str, str] = {
    "generate": "user_client.commands:generate",
    "embed": "user_client.commands:embed",
    "classify": "user_client.commands:classify",
}
# subcommands that parse their own arguments: "module:function(argv: list[str]) -> int"
PASSTHROUGH: dict[str, str] = {
    "demo": "stip_demo.cli:main",
    "gateway": "user_client.gateway.cli:main",
    "audit": "attack_lab.cli:main",
}


def _connection_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection (default: STIP_CLIENT_* environment variables)")
    g.add_argument("--developer-url", help="P1's base URL (STIP_CLIENT_DEVELOPER_URL)")
    g.add_argument("--cloud-url", help="P2's base URL; default: the one the bundle names")
    g.add_argument("--deployment", help="deployment id (STIP_CLIENT_DEPLOYMENT_ID)")
    g.add_argument("--credential", help="user credential (better: STIP_CLIENT_CREDENTIAL)")
    g.add_argument("--cache-dir", help="bundle cache directory (STIP_CLIENT_CACHE_DIR)")
    g.add_argument("--timeout", type=float, help="seconds per HTTP request")
    g.add_argument("--ca-bundle", help="CA bundle to verify TLS certificates with")
    g.add_argument("-v", "--verbose", action="count", default=0, help="log to stderr (-vv: debug)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stip", description="STIP user side: private inference on a permuted model.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="generate text from a prompt (prints the new text only)",
        description="Print the generated continuation of PROMPT (not the prompt) and a newline; "
        "with --stream, print it piece by piece as the tokens arrive.",
    )
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--no-eos", action="store_true", help="do not stop at the EOS token")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    _connection_options(gen)

    emb = sub.add_parser(
        "embed",
        help="sentence embeddings, one JSON array per line",
        description="Print one JSON array per TEXT, in order: its sentence embedding (mean-pooled, "
        "L2-normalised unless --no-normalize).",
    )
    emb.add_argument("texts", nargs="+", metavar="TEXT")
    emb.add_argument("--no-normalize", action="store_true", help="skip L2 normalisation")
    emb.add_argument("--batch-size", type=int, default=32)
    _connection_options(emb)

    cls = sub.add_parser("classify", help="classify images (ViT deployments), one JSON object per image")
    cls.add_argument("images", nargs="+", metavar="IMAGE")
    cls.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    cls.add_argument("--batch-size", type=int, default=32)
    _connection_options(cls)

    sub.add_parser("demo", help="run the three-party demo (options: stip demo --help)", add_help=False)
    sub.add_parser("gateway", help="serve the OpenAI API locally (options: stip gateway --help)", add_help=False)
    sub.add_parser("audit", help="measure what a curious P2 recovers (scenarios: stip audit --help)", add_help=False)
    return parser


def load(target: str) -> Callable[..., int | None]:
    """Import "module:function" and return the function."""
    module, _, function = target.partition(":")
    handler: Callable[..., int | None] = getattr(importlib.import_module(module), function)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        return int(load(PASSTHROUGH[argv[0]])(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(getattr(args, "verbose", 0), logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from user_client.errors import StipError  # stdlib only

    try:
        return int(load(COMMANDS[args.command])(args) or 0)
    except ValueError as e:  # missing settings, bad sampling options: a usage error
        sys.stderr.write(f"stip {args.command}: error: {e}\n")
        return 2
    except StipError as e:
        sys.stderr.write(f"stip: error: {e.message}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
