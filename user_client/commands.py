"""The handlers of `stip generate`, `stip embed` and `stip classify` (the parser lives in user_client.cli).

Imported only once the arguments are parsed: this module may import the SDK (torch,
transformers) at the top.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import Any

from tqdm import tqdm

from user_client.client import StipClient
from user_client.sampling import SamplingParams


class DownloadBar:
    """The user bundle's download as a tqdm bar on stderr, in bytes (binary prefixes): the CLI's
    `on_download` for StipClient. A download that starts again (a retry) gets a new bar; a bar
    closes once its Content-Length has arrived, at 100%."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, done: int, total: int | None) -> None:
        if self.bar is None or done < self.bar.n:
            self.close()
            self.bar = tqdm(
                total=total,
                desc="user bundle",
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                smoothing=0,  # the rate is bytes over the time since the first byte
                file=sys.stderr,
            )
        if total is not None and done > total:  # a server that sent too small a Content-Length
            self.bar.total = done
        self.bar.update(done - self.bar.n)
        if total is not None and done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _client(args: argparse.Namespace) -> StipClient:
    return StipClient(
        args.developer_url,
        cloud_url=args.cloud_url,
        deployment_id=args.deployment,
        credential=args.credential,
        cache_dir=args.cache_dir,
        timeout=args.timeout,
        verify=args.ca_bundle,
        on_download=DownloadBar(),
    )


def generate(args: argparse.Namespace) -> int:
    """Print the completion (only the new text) and a newline; `--stream` prints it piece by piece."""
    params = SamplingParams(**{f.name: getattr(args, f.name) for f in fields(SamplingParams)})  # same dests
    stop, eos = args.stop or None, not args.no_eos
    with _client(args) as client:
        if args.stream:
            for piece in client.stream(args.prompt, params, stop=stop, eos=eos):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            sys.stdout.write(client.generate(args.prompt, params, stop=stop, eos=eos) + "\n")
    return 0


def embed(args: argparse.Namespace) -> int:
    """Print one JSON array (the text's embedding, L2-normalised unless --no-normalize) per line."""
    with _client(args) as client:
        vectors = client.embed(args.texts, normalize=not args.no_normalize, batch_size=args.batch_size)
    for row in vectors.tolist():
        sys.stdout.write(json.dumps(row) + "\n")
    return 0


def classify(args: argparse.Namespace) -> int:
    """Print one JSON object per image: its top classes with their scores (ViT deployments)."""
    from user_client.images import classify_command  # PIL and the image processor

    classify_command(_client(args), args.images, top_k=args.top_k, batch_size=args.batch_size)
    return 0
