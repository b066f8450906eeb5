"""The benchmark's pieces on its tiny configuration, so `python -m bench.run` cannot rot.

The whole run (services, 8 clients, the proxies) is what `python -m bench.run --quick` does; here
each piece runs on the tiny model: the plaintext timings, P2's forward on θ′ against the stock
class, the counting and delaying proxy, and the output (a table, then one JSON line).
"""

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from bench import run as bench


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[bench.Plan, Path]:
    plan = bench.plan_for("tiny")
    return plan, bench.make_model(tmp_path_factory.mktemp("bench") / "model", plan.size, positions=128)


def test_plaintext_and_p2_forward_pieces(tiny: tuple[bench.Plan, Path], tmp_path: Path) -> None:
    plan, model_dir = tiny
    plain = bench.Plain(model_dir)
    ids = torch.randint(1000, 30000, (1, plan.prompt_tokens))
    assert plain.generate(ids, 3).shape == (1, plan.prompt_tokens + 3)
    assert isinstance(bench.per_token(lambda k: plain.generate(ids, k), 3, 1), float)  # a difference: noisy
    mb_per_s, p2_ms, ratio = bench.forward_ratio(model_dir, tmp_path / "out", plan)
    assert mb_per_s > 0 and p2_ms > 0
    assert 0.2 < ratio < 5  # the same network: far from either bound, even on a loaded machine


def test_counting_proxy_counts_both_ways_and_adds_latency() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def echo() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(1024):
                conn.sendall(data * 2)

    threading.Thread(target=echo, daemon=True).start()
    with (
        bench.counting_proxy(port, one_way_delay_s=0.010) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port)) as s,
    ):
        start = time.perf_counter()
        s.sendall(b"hello")
        got = b""
        while len(got) < 10:
            got += s.recv(1024)
        rtt = time.perf_counter() - start
    server.close()
    assert got == b"hellohello"
    assert (proxy.up, proxy.down) == (5, 10)
    assert rtt >= 0.020


def test_output_ends_with_one_json_line_of_every_figure(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    figures = {k: float(i + 1) for i, k in enumerate(bench.FIGURES)}
    fake = bench.Results("m", 1.0, 2.0, 2.1, 1.9, 50, 200, 48, 180, 10, 11, 1.8, 1.9, 0.3, 0.4, figures)
    monkeypatch.setattr(bench, "run", lambda plan, work, log: fake)
    assert bench.main(["--size", "tiny"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    last = json.loads(lines[-1])
    assert set(bench.FIGURES) <= set(last) and last["e2e_decode_ratio"] == 1.0
    assert any("overhead per step" in line for line in lines[:-1])  # the table came first
