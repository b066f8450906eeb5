"""`stip`: the user side's command line.

    stip generate "Once upon a time" --max-new-tokens 32 [--stream] [--temperature 0.8 --seed 1]
    stip embed "a sentence" "another"          # one JSON array per line
    stip demo ...                               # the three-party demo (user_client.demo)
    stip audit [--quick]                        # the attack lab: a curious P2, measured (attack_lab)

Connection options fall back to the STIP_CLIENT_* environment variables (DEVELOPER_URL,
CLOUD_URL, DEPLOYMENT_ID, CREDENTIAL, CACHE_DIR); prefer the environment for the credential,
since command lines are visible to other local users. Exit status: 0 on success, 1 on a
STIP error, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from user_client.client import StipClient
from user_client.errors import StipError

log = logging.getLogger("stip.client")


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

    gen = sub.add_parser("generate", help="generate text from a prompt")
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

    emb = sub.add_parser("embed", help="sentence embeddings, one JSON array per line")
    emb.add_argument("texts", nargs="+", metavar="TEXT")
    emb.add_argument("--no-normalize", action="store_true", help="skip L2 normalisation")
    emb.add_argument("--batch-size", type=int, default=32)
    _connection_options(emb)

    sub.add_parser("demo", help="run the three-party demo (options: stip demo --help)", add_help=False)
    sub.add_parser("audit", help="measure what a curious P2 recovers (scenarios: stip audit --help)", add_help=False)
    return parser


def _client(args: argparse.Namespace) -> StipClient:
    return StipClient(
        args.developer_url,
        cloud_url=args.cloud_url,
        deployment_id=args.deployment,
        credential=args.credential,
        cache_dir=args.cache_dir,
        timeout=args.timeout,
        verify=args.ca_bundle,
    )


def _generate(args: argparse.Namespace) -> None:
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop or None,
        eos=not args.no_eos,
    )
    with _client(args) as client:
        if args.stream:
            for piece in client.stream(args.prompt, **options):  # type: ignore[arg-type]
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            sys.stdout.write(client.generate(args.prompt, **options) + "\n")  # type: ignore[arg-type]


def _embed(args: argparse.Namespace) -> None:
    with _client(args) as client:
        vectors = client.embed(args.texts, normalize=not args.no_normalize, batch_size=args.batch_size)
    for row in vectors.tolist():
        sys.stdout.write(json.dumps(row) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from user_client.demo import main as demo_main  # lazily: it pulls in the services

        return int(demo_main(argv[1:]) or 0)
    if argv and argv[0] == "audit":
        from attack_lab.cli import main as audit_main  # lazily: torch, transformers, the corpus

        return int(audit_main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            _generate(args)
        else:
            _embed(args)
    except ValueError as e:  # missing settings, bad sampling options
        parser.error(str(e))
    except StipError as e:
        sys.stderr.write(f"stip: error: {e.message}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
