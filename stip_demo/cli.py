"""`stip demo`'s arguments, parsed before the demo itself (torch, transformers, the services) loads,
so that `stip demo --help` and its usage errors answer at once. The demo is stip_demo.demo."""

from __future__ import annotations

import argparse

DESCRIPTION = "`stip demo`: the three parties end to end, checked against plaintext inference."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stip demo", description=DESCRIPTION)
    p.add_argument("--developer-url", help="attach to a running P1 (with --cloud-url)")
    p.add_argument("--cloud-url", help="attach to a running P2 (with --developer-url)")
    p.add_argument("--admin-token", help="P1's admin token when attaching (or STIP_CLIENT_ADMIN_TOKEN[_FILE])")
    p.add_argument("--ca-bundle", help="CA bundle verifying both services' TLS certificates (or STIP_CLIENT_VERIFY)")
    p.add_argument("--models-dir", help="where the random demo model is written (must be visible to P1)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from stip_demo.demo import run_demo  # torch, transformers, the SDK

    return run_demo(args)
