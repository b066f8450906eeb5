"""The engines benchmark: embeds mode and token mode on P2's two engines (issue 12).

    python -m bench.engines            # needs the vLLM environment: make vllm-env

It builds a random Llama, transforms it for token mode (so one θ′ serves both modes), starts two
P2 processes on loopback, one per engine (`STIP_CLOUD_ENGINE=transformers` and `vllm`), pushes
θ′ to each with a P1 signing key of its own, and measures greedy decoding as a user sees it:

- embeds mode: a session, the prompt's rows x·π, then one round trip per token (one new row,
  `output=topk`, k=1; the user embeds the returned token and permutes it);
- token mode: one `generate` request on relabelled ids.

Each for one user, for eight concurrent users, and for one user through a proxy adding 20 ms
of round trip (10 ms each way; bench.run's counting proxy). Figures are per token after the
first: (t(n) - t(1)) / (n - 1), prefill excluded; eight users: per user, and tokens/s for all.
It prints a table, then as its LAST line one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from bench.run import ModelSize
from stip_demo.models import random_causal_lm

ENGINES = ("transformers", "vllm")
MODES = ("embeds", "token")
SCENARIOS = ("1 user", "8 users", "1 user + 20 ms RTT")
DEPLOYMENT = "bench-llama"
PROMPT = 16
# head_dim 64 (vLLM's CPU attention takes 32, 64, 80, ...), GQA 8:2, untied
SIZE = ModelSize("random Llama, engines bench", 512, 4, 8, 2, 1024)
CONFIG: dict[str, Any] = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    **SIZE.config(),
    vocab_size=2048,
    tie_word_embeddings=False,
    max_position_embeddings=256,
)


class User:
    """One user's greedy decoding against one P2, over HTTP, in either mode."""

    def __init__(self, url: str, credential: str, table: torch.Tensor, pi: torch.Tensor, pi_c: torch.Tensor) -> None:
        import httpx

        self.http = httpx.Client(base_url=url, timeout=600.0, headers={"Authorization": f"Bearer {credential}"})
        self.table, self.pi, self.pi_c = table, pi, pi_c  # the user's embedding module and key

    def close(self) -> None:
        self.http.close()

    def _rows(self, ids: list[int]) -> bytes:
        from shared import api, wire

        x = self.table[torch.tensor([ids])][..., self.pi]  # (1, S, d) permuted by π
        return wire.encode({api.INPUTS_EMBEDS: x})

    def embeds(self, prompt: list[int], n: int) -> list[int]:
        from shared import api, wire

        path = f"/v1/deployments/{DEPLOYMENT}"
        session = self.http.post(f"{path}/sessions").json()["session_id"]
        out, ids = [], prompt
        try:
            for _ in range(n):
                reply = self.http.post(
                    f"{path}/forward",
                    content=self._rows(ids),
                    params={"session_id": session, "output": "topk", "k": 1},
                    headers={"Content-Type": wire.CONTENT_TYPE},
                )
                reply.raise_for_status()
                tensors, _ = wire.decode(reply.content)
                token = int(self.pi_c[tensors[api.TOPK_INDICES].reshape(-1)[0]])
                out.append(token)
                ids = [token]
        finally:
            self.http.delete(f"/v1/sessions/{session}")
        return out

    def token(self, prompt: list[int], n: int) -> list[int]:
        relabelled = torch.argsort(self.pi_c)[torch.tensor(prompt)].tolist()
        reply = self.http.post(
            f"/v1/deployments/{DEPLOYMENT}/generate", json={"input_ids": relabelled, "max_tokens": n}
        )
        reply.raise_for_status()
        return [int(self.pi_c[j]) for j in reply.json()["ids"]]


def per_token(users: Sequence[User], mode: str, n: int, repeats: int) -> tuple[float, list[list[int]]]:
    """ms per token after the first, per user, with every user decoding at once."""
    prompts = [[(7 * u + 3 * i) % CONFIG["vocab_size"] for i in range(PROMPT)] for u in range(len(users))]

    def wall(k: int) -> tuple[float, list[list[int]]]:
        outs: list[list[int]] = [[] for _ in users]

        def go(u: int) -> None:
            outs[u] = getattr(users[u], mode)(prompts[u], k)

        threads = [threading.Thread(target=go, args=(u,)) for u in range(len(users))]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - start, outs

    first = statistics.median(wall(1)[0] for _ in range(repeats))
    runs = [wall(n) for _ in range(repeats)]
    whole = statistics.median(r[0] for r in runs)
    return (whole - first) / (n - 1) * 1000, runs[0][1]


@contextmanager
def p2(engine: str, work: Path, push_token: str, vllm_python: Path) -> Iterator[str]:
    """A P2 process on one engine; yields its URL."""
    from tests.e2e.processes import CLOUD, free_port, start, stop, wait_ready

    data = work / f"p2-{engine}"
    port = free_port()
    env = {"STIP_CLOUD_PUSH_TOKEN": push_token, "STIP_CLOUD_DEVICE": "cpu", "STIP_CLOUD_ENGINE": engine}
    if engine == "vllm":
        env |= {
            "STIP_CLOUD_VLLM_PYTHON": str(vllm_python),
            "STIP_CLOUD_VLLM_KV_CACHE_GIB": "1",
            "STIP_CLOUD_VLLM_CPU_THREADS_BIND": os.environ.get("STIP_CLOUD_VLLM_CPU_THREADS_BIND", "nobind"),
        }
    proc = start(CLOUD, env, work / f"p2-{engine}.log", host="127.0.0.1", port=port, data_dir=data)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=120)
        yield url
    finally:
        stop(proc)


def push(url: str, push_token: str, files: list[Path], metadata: dict[str, str]) -> None:
    import httpx

    from shared import api, wire

    _, chunks = wire.concat_files(files, metadata)
    body = b"".join(chunks)
    headers = {
        "Authorization": f"Bearer {push_token}",
        api.DIGEST_HEADER: hashlib.sha256(body).hexdigest(),
        "Content-Type": wire.CONTENT_TYPE,
    }
    reply = httpx.put(f"{url}/v1/deployments/{DEPLOYMENT}/weights", content=body, headers=headers, timeout=900.0)
    if reply.status_code != 200:
        raise RuntimeError(f"push to {url} failed: {reply.status_code} {reply.text[:300]}")


def run(work: Path, n: int, repeats: int, log: Callable[[str], None]) -> dict[str, float]:
    import secrets

    from bench.run import counting_proxy
    from shared import api
    from shared.checkpoint import transform_model_dir
    from shared.credentials import Signer

    # absolute(), never resolve(): a venv's python is a link to the base interpreter
    vllm_python = Path(os.environ.get("STIP_CLOUD_VLLM_PYTHON", ".venv-vllm/bin/python")).absolute()
    if not vllm_python.is_file():
        raise SystemExit(f"the vLLM environment is missing ({vllm_python}): build it with `make vllm-env`")
    model: Any = random_causal_lm(CONFIG, seed=0)
    model.save_pretrained(work / "model")
    result = transform_model_dir(work / "model", work / "out", key_version=1, progress=False, mode="token")
    key = result.key
    table = model.get_input_embeddings().weight.detach()
    with torch.no_grad():
        plain_prompt = torch.tensor([[(3 * i) % CONFIG["vocab_size"] for i in range(PROMPT)]])
        plain = model.generate(plain_prompt, max_new_tokens=n, do_sample=False, eos_token_id=None)[0, PROMPT:].tolist()
    signer, push_token = Signer.generate(), secrets.token_urlsafe(24)
    config = json.loads((result.out_dir / "cloud" / "config.json").read_text())
    metadata = {
        api.PUSH_DEPLOYMENT: DEPLOYMENT,
        api.PUSH_FAMILY: result.family,
        api.PUSH_CONFIG: json.dumps(config),
        api.PUSH_KEY_VERSION: "1",
        api.PUSH_VERIFY_KEY: signer.public_key,
        api.PUSH_MODE: "token",
    }
    figures: dict[str, float] = {}
    for engine in ENGINES:
        with ExitStack() as stack:
            url = stack.enter_context(p2(engine, work, push_token, vllm_python))
            started = time.perf_counter()
            push(url, push_token, result.cloud_files, metadata)
            log(f"{engine}: θ′ pushed and serving in {time.perf_counter() - started:.1f} s")
            wan = stack.enter_context(counting_proxy(int(url.rsplit(":", 1)[1]), one_way_delay_s=0.010))
            urls = {"1 user": [url], "8 users": [url] * 8, "1 user + 20 ms RTT": [f"http://127.0.0.1:{wan.port}"]}
            for scenario in SCENARIOS:
                users = []
                for i, u in enumerate(urls[scenario]):
                    credential, _ = signer.issue(subject=f"user-{i}", deployment_id=DEPLOYMENT, ttl_s=3600)
                    users.append(User(u, credential, table, key.pi, key.pi_c))
                try:
                    for mode in MODES:
                        ms, outs = per_token(users, mode, n, repeats)
                        if scenario == "1 user" and outs[0] != plain:
                            log(f"WARNING: {engine} {mode} differs from plaintext greedy")
                        figures[f"{engine}.{mode}.{scenario}.ms_per_token"] = ms
                        figures[f"{engine}.{mode}.{scenario}.tokens_per_s"] = len(users) * 1000 / ms
                        log(f"{engine:12s} {mode:7s} {scenario:20s} {ms:8.2f} ms/token per user")
                finally:
                    for user in users:
                        user.close()
    return figures


def format_table(figures: dict[str, float]) -> str:
    lines = [f"{'engine':12s} {'mode':7s} {'scenario':20s} {'ms/token/user':>14s} {'tokens/s (all)':>15s}"]
    for engine in ENGINES:
        for mode in MODES:
            for scenario in SCENARIOS:
                key = f"{engine}.{mode}.{scenario}"
                if f"{key}.ms_per_token" in figures:
                    lines.append(
                        f"{engine:12s} {mode:7s} {scenario:20s} {figures[key + '.ms_per_token']:14.2f} "
                        f"{figures[key + '.tokens_per_s']:15.1f}"
                    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engines", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the model, θ′ and logs here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stip-engines-")))
        work.mkdir(parents=True, exist_ok=True)
        figures = run(work, args.tokens, args.repeats, log)
    print(format_table(figures))
    print(json.dumps({k: round(v, 3) for k, v in figures.items()}, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
