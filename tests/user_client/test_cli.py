"""The `stip` command line, run in-process against the fake services."""

from __future__ import annotations

import argparse
import json
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import tqdm.std

from tests.user_client.conftest import CREDENTIAL, DEVELOPER_URL, World
from user_client import StipClient, cli, commands


@pytest.fixture
def run(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, str]]:
    def factory(*args: Any, **kw: Any) -> StipClient:
        kw.update(developer_transport=world.developer_transport, cloud_transport=world.cloud_transport)
        return StipClient(*args, **kw)

    monkeypatch.setattr(commands, "StipClient", factory)
    for name in ("DEVELOPER_URL", "DEPLOYMENT_ID", "DEPLOYMENT", "CREDENTIAL", "CLOUD_URL"):
        monkeypatch.delenv(f"STIP_CLIENT_{name}", raising=False)
    monkeypatch.setenv("STIP_CLIENT_CACHE_DIR", str(world.cache_dir))

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


CONNECT = ("--developer-url", DEVELOPER_URL, "--credential", CREDENTIAL)


def test_generate(run: Callable[..., tuple[int, str, str]], make_client: Callable[..., StipClient]) -> None:
    expected = make_client().generate("this is a test", max_new_tokens=8, eos=False)
    code, out, _ = run(
        "generate", "this is a test", "--deployment", "llama", *CONNECT, "--max-new-tokens", "8", "--no-eos"
    )
    assert code == 0 and out == expected + "\n"
    code, out, _ = run(
        "generate", "this is a test", "--deployment", "llama", *CONNECT, "--max-new-tokens", "8", "--no-eos", "--stream"
    )
    assert code == 0 and out == expected + "\n"
    args = ("--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "7")
    first = run("generate", "hi", "--deployment", "llama", *CONNECT, *args)
    assert first == run("generate", "hi", "--deployment", "llama", *CONNECT, *args)


def test_embed(run: Callable[..., tuple[int, str, str]], make_client: Callable[..., StipClient]) -> None:
    code, out, _ = run("embed", "first sentence", "second one", "--deployment", "minilm", *CONNECT)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 2 and len(rows[0]) == 384
    expected = make_client("minilm").embed(["first sentence", "second one"])
    assert max(abs(a - b) for a, b in zip(rows[1], expected[1].tolist(), strict=True)) < 1e-6


def test_errors(run: Callable[..., tuple[int, str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    # no credential anywhere: a usage error that names the flag and the variable, not the top-level usage
    code, _, err = run("generate", "x", "--deployment", "llama", "--developer-url", DEVELOPER_URL)
    assert code == 2 and "--credential" in err and "STIP_CLIENT_CREDENTIAL" in err and "usage:" not in err
    code, _, err = run("generate", "x", "--deployment", "nope", *CONNECT)
    assert code == 1 and "404" in err
    monkeypatch.setenv("STIP_CLIENT_DEPLOYMENT_ID", "llama")
    monkeypatch.setenv("STIP_CLIENT_CREDENTIAL", "wrong")
    code, _, err = run("generate", "x", "--developer-url", DEVELOPER_URL)
    assert code == 1 and "401" in err and "wrong" not in err


def test_demo_is_loaded_lazily(run: Callable[..., tuple[int, str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[argparse.Namespace] = []
    demo = types.ModuleType("stip_demo.demo")

    def run_demo(args: argparse.Namespace) -> int:
        seen.append(args)
        return 0

    demo.run_demo = run_demo  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "stip_demo.demo", demo)
    code, _, _ = run("demo", "--developer-url", "http://x", "--models-dir", "/m")
    assert code == 0 and [(a.developer_url, a.models_dir) for a in seen] == [("http://x", "/m")]


class Trickle(httpx.BaseTransport):
    """The fake P1's answers handed over in 64 KiB chunks, each one moving `clock` on by 0.1 s."""

    CHUNK = 64 << 10

    def __init__(self, inner: httpx.BaseTransport, clock: list[float]):
        self.inner, self.clock, self.sizes = inner, clock, []  # type: ignore[var-annotated]

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        body = response.read()
        self.sizes.append(len(body))

        def chunks() -> Iterator[bytes]:
            for start in range(0, len(body), self.CHUNK):
                self.clock[0] += 0.1
                yield body[start : start + self.CHUNK]

        return httpx.Response(response.status_code, headers=response.headers, content=chunks(), request=request)


def test_the_bundle_download_is_a_bar_in_bytes_that_completes(
    run: Callable[..., tuple[int, str, str]], world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])  # the bar's clock: moved by the download only
    trickle = Trickle(world.developer_transport, now)

    def factory(*args: Any, **kw: Any) -> StipClient:
        kw.update(developer_transport=trickle, cloud_transport=world.cloud_transport)
        return StipClient(*args, **kw)

    monkeypatch.setattr(commands, "StipClient", factory)
    code, out, err = run("embed", "first sentence", "--deployment", "minilm", *CONNECT)
    assert code == 0 and len(out.splitlines()) == 1
    (size,) = trickle.sizes
    assert size > 10 * Trickle.CHUNK  # the real MiniLM bundle: many chunks, a bar that moves
    final = [part for part in err.split("\r") if part.startswith("user bundle")][-1]
    total = tqdm.std.tqdm.format_sizeof(size, divisor=1024)
    rate = tqdm.std.tqdm.format_sizeof(size / now[0])  # the bytes over the time they took: no instant's rate
    assert final.startswith("user bundle: 100%") and f"| {total}/{total} [" in final, final
    assert final.rstrip().endswith(f", {rate}B/s]"), (final, rate)

    code, _, err = run("embed", "first sentence", "--deployment", "minilm", *CONNECT)
    assert code == 0 and "user bundle" not in err  # from the cache: nothing to download, no bar


def test_the_sdk_draws_no_bar_unless_asked(
    make_client: Callable[..., StipClient], capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[tuple[int, int | None]] = []
    make_client("minilm", on_download=lambda done, total: seen.append((done, total))).bundle  # noqa: B018
    assert "user bundle" not in capsys.readouterr().err
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] and seen[0][1] == seen[-1][1]  # bytes, to the total
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False))
