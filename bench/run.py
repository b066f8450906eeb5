"""The performance benchmark: STIP beside plaintext, in one run, on loopback.

    python -m bench.run --quick        # a smaller random Llama, under three minutes on 2 cores
    python -m bench.run                # the random Llama of GPT-2-small size (issue 14)

It builds a random Llama (MiniLM's tokenizer, GQA), starts P2 and P1 as separate processes on
loopback (`stip_demo.services.local_services`, as `benchmarks.load` does), deploys it, and measures:

- plaintext greedy decode (stock `generate()`, KV cache), one stream and batch 8;
- the same decode through the SDK and P2 (its session's KV cache), one stream and 8 concurrent
  clients, and one stream through a proxy adding 20 ms of round trip (10 ms each way);
- P2's forward on θ′ against the stock class on θ, same inputs, in this process;
- the bytes each decode step puts on the wire (counted by the proxy), a 512-token prefill, and
  the offline transform's speed.

Decode figures are per token after the first (prefill excluded): (t(n) - t(1)) / (n - 1) for a
generation of n new tokens against one of 1. It prints a table, then as its LAST line one JSON
object with the figures (keys in `FIGURES`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

FIGURES = (
    "e2e_decode_ratio",
    "overhead_ms_per_step",
    "p2_forward_ratio",
    "batch8_throughput_ratio",
    "plain_batch8_ratio",
    "wire_up_bytes_per_token",
    "wire_down_bytes_per_token",
    "prefill_ratio",
    "transform_mb_per_s",
    "wan20_ms_per_token",
)


@dataclass(frozen=True)
class ModelSize:
    """A random Llama's size; the fields after `name` are its config.json keys."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    def config(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k != "name"}


SIZES = {
    "gpt2-small": ModelSize("random Llama, GPT-2-small size", 768, 12, 12, 4, 3072),
    "quick": ModelSize("random Llama, small (--quick)", 256, 4, 8, 4, 1024),
    "tiny": ModelSize("random Llama, tiny (tests)", 64, 2, 4, 2, 128),
}


@dataclass(frozen=True)
class Plan:
    size: ModelSize
    new_tokens: int = 32  # decode length per generation
    prompt_tokens: int = 8
    prefill_tokens: int = 512
    streams: int = 8  # concurrent clients / plaintext batch
    repeats: int = 3  # each timing is the median of this many runs
    dtype: str = "float32"  # P2's STIP_CLOUD_DTYPE
    threads: int | None = None  # torch threads in this process and in P2


def plan_for(name: str) -> Plan:
    if name == "quick":
        return Plan(SIZES["quick"], new_tokens=16, repeats=2)
    if name == "tiny":
        return Plan(SIZES["tiny"], new_tokens=6, prefill_tokens=64, streams=4, repeats=1)
    return Plan(SIZES["gpt2-small"])


# --- the model ------------------------------------------------------------------------------


def make_model(path: Path, size: ModelSize, positions: int) -> Path:
    """A random Llama with the demo's tokenizer (GQA, tied head), saved as a local HF directory."""
    from stip_demo.models import make_random_decoder

    sizes = dict(size.config(), max_position_embeddings=positions, tie_word_embeddings=True)
    return make_random_decoder(path, "llama", kind="Llama", seed=0, **sizes)


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of `repeats` calls (after one untimed warm-up)."""
    fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def per_token(run: Callable[[int], Any], n: int, repeats: int) -> float:
    """Seconds per decoded token after the first: (t(n) - t(1)) / (n - 1)."""
    return (timed(lambda: run(n), repeats) - timed(lambda: run(1), repeats)) / (n - 1)


# --- plaintext ------------------------------------------------------------------------------


class Plain:
    def __init__(self, model_dir: Path) -> None:
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        return self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> None:
        self.model(input_ids=ids, logits_to_keep=1)  # type: ignore[operator]


# --- P2's forward against the stock class, in this process --------------------------------


@torch.no_grad()
def forward_ratio(model_dir: Path, out: Path, plan: Plan) -> tuple[float, float, float]:
    """(transform MB/s, P2's decode step on θ′ in ms, the ratio to the stock class on θ)."""
    import transformers

    from shared.checkpoint import transform_model_dir
    from shared.permutation import permute
    from shared.runtime import load_cloud_model

    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    t0 = time.perf_counter()
    result = transform_model_dir(model_dir, out, progress=False)
    mb_per_s = size / (1 << 20) / (time.perf_counter() - t0)
    config = json.loads((out / "cloud" / "config.json").read_text())
    cloud = load_cloud_model(config, result.cloud_files, dtype=plan.dtype)
    stock = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, plan.prompt_tokens + plan.new_tokens, config["hidden_size"], generator=g) * 0.02
    xp = permute(x, result.key.pi)

    def stock_decode() -> None:
        cache = None
        for t in range(plan.prompt_tokens, x.shape[1]):
            step = x[:, :t] if cache is None else x[:, t - 1 : t]
            out = stock(inputs_embeds=step, cache=cache, use_cache=True, logits_to_keep=1)
            cache = out.cache

    def cloud_decode() -> None:
        cache = None
        for t in range(plan.prompt_tokens, xp.shape[1]):
            step = xp[:, :t] if cache is None else xp[:, t - 1 : t]
            cache = cloud.forward(step, torch.ones(1, t, dtype=torch.long), cache, last_only=True).cache

    steps = plan.new_tokens
    t_stock = timed(stock_decode, plan.repeats) / steps
    t_cloud = timed(cloud_decode, plan.repeats) / steps
    return mb_per_s, t_cloud * 1000, t_cloud / t_stock


# --- the wire: a proxy that counts bytes and adds latency ----------------------------------


def counting_proxy(target_port: int, one_way_delay_s: float = 0.0) -> Any:
    """A loopback proxy (tests/e2e/proxy.py's LoopbackProxy) counting bytes each way, each chunk
    delayed by `one_way_delay_s` (20 ms of round trip: 0.010)."""
    from tests.e2e.proxy import LoopbackProxy

    class Counting(LoopbackProxy):
        def __init__(self) -> None:
            super().__init__(target_port)
            self.up = 0  # bytes to P2
            self.down = 0  # bytes from P2
            self.connections = 0  # TCP connections the client opened

        def __exit__(self, *exc: object) -> None:
            async def cancel() -> None:  # the connections still open end here, not at interpreter exit
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            with suppress(Exception):
                asyncio.run_coroutine_threadsafe(cancel(), self._loop).result(5)
            super().__exit__(*exc)

        async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                client_w.close()
                return

            async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, up: bool) -> None:
                with suppress(ConnectionError, asyncio.CancelledError):
                    while data := await r.read(1 << 16):
                        if up:
                            self.up += len(data)
                        else:
                            self.down += len(data)
                        if one_way_delay_s:
                            await asyncio.sleep(one_way_delay_s)
                        w.write(data)
                        await w.drain()
                with suppress(Exception):
                    w.close()

            with suppress(asyncio.CancelledError):  # cancelled when the proxy stops
                await asyncio.gather(pipe(client_r, server_w, True), pipe(server_r, client_w, False))

    return Counting()


# --- the run --------------------------------------------------------------------------------


@dataclass
class Results:
    model: str
    parameters_m: float
    plain_ms_per_token: float
    stip_ms_per_token: float
    p2_forward_ms: float
    plain_b1_tokens_per_s: float
    plain_b8_tokens_per_s: float
    stip_1_tokens_per_s: float
    stip_8_tokens_per_s: float
    plain_prefill_ms: float
    stip_prefill_ms: float
    p2_model_ms: float  # P2's stock-model forward per decode step, from its metrics
    p2_request_ms: float  # P2's whole forward request per step (parse, scheduling, model, encoding)
    sdk_ms_per_step: float  # client-side work of a step (embed, permute, encode, decode, un-permute)
    http_ms: float  # a round trip of a small request to P2 (GET of the deployment)
    figures: dict[str, float]
    connections: int = 0  # TCP connections one client opened for three generations (reuse: 1)


def sdk_step_ms(client: Any, repeats: int = 200) -> float:
    """The client's own work per decode step, without the network: embed one token, permute,
    encode the body, decode a top-1 answer, un-permute."""
    from shared import api, wire

    bundle = client.bundle
    ids = torch.tensor([[2023]])
    answer = wire.encode({api.TOPK_VALUES: torch.zeros(1, 1, 1), api.TOPK_INDICES: torch.zeros(1, 1, 1).long()})

    def step() -> None:
        x = client._embed_permuted(bundle, ids, position_offset=3, token_type_ids=None)
        wire.encode({api.INPUTS_EMBEDS: x})
        out, _ = wire.decode(answer)
        bundle.key.pi_c[out[api.TOPK_INDICES]]

    return timed(lambda: _repeat(step, repeats), 1) / repeats * 1000


def metric_sum(cloud_url: str, name: str) -> float:
    """The sum over every label set of one of P2's /metrics series (0 when absent)."""
    import httpx

    text = httpx.get(f"{cloud_url}/metrics", timeout=10.0).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.split("{")[0].split(" ")[0] == name)


def p2_step_ms(cloud_url: str, generate: Callable[[int], Any], n: int) -> tuple[float, float]:
    """P2's own time per decode step, from its metrics: (the stock model's forward, the whole
    forward request: parse, scheduling, model, encoding), each (Δ(n) - Δ(1)) / (n - 1)."""
    names = ("stip_cloud_model_seconds_sum", "stip_cloud_forward_seconds_sum")
    spent: dict[int, list[float]] = {}
    for k in (1, n):
        before = [metric_sum(cloud_url, m) for m in names]
        generate(k)
        spent[k] = [metric_sum(cloud_url, m) - b for m, b in zip(names, before, strict=True)]
    model, whole = ((spent[n][i] - spent[1][i]) / (n - 1) * 1000 for i in range(2))
    return model, whole


def _repeat(fn: Callable[[], Any], n: int) -> None:
    for _ in range(n):
        fn()


def run(plan: Plan, work: Path, log: Callable[[str], None]) -> Results:
    import transformers

    from benchmarks.load import deploy_model
    from developer_service.client import DeveloperAdminClient
    from stip_demo.services import local_services
    from user_client import StipClient

    transformers.utils.logging.set_verbosity_error()
    positions = max(1024, plan.prefill_tokens + plan.new_tokens + 16)
    model_dir = make_model(work / "model", plan.size, positions)
    plain = Plain(model_dir)
    n_params = sum(p.numel() for p in plain.model.parameters()) / 1e6
    log(f"model: {plan.size.name}, {n_params:.1f} M parameters, P2 dtype {plan.dtype}")
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(1000, 30000, (1, plan.prompt_tokens), generator=g)
    prompts = [
        [int(t) for t in row] for row in torch.randint(1000, 30000, (plan.streams, plan.prompt_tokens), generator=g)
    ]
    long_prompt = torch.randint(1000, 30000, (1, plan.prefill_tokens), generator=g)
    n, reps = plan.new_tokens, plan.repeats

    log("plaintext: generate(), one stream and batched ...")
    plain_tok = per_token(lambda k: plain.generate(prompt, k), n, reps)
    batch = torch.tensor(prompts)
    plain_b1 = n / timed(lambda: plain.generate(prompt, n), reps)
    plain_b8 = plan.streams * n / timed(lambda: plain.generate(batch, n), reps)
    plain_prefill = timed(lambda: plain.prefill(long_prompt), reps)

    log("P2's forward on θ′ against the stock class on θ, and the transform ...")
    mb_per_s, p2_ms, p2_ratio = forward_ratio(model_dir, work / "transformed", plan)

    log("STIP: P2 and P1 on loopback ...")
    cloud_env = {"STIP_CLOUD_LOG_LEVEL": "WARNING", "STIP_CLOUD_DTYPE": plan.dtype, "STIP_CLOUD_DEVICE": "cpu"}
    if plan.threads:
        cloud_env["OMP_NUM_THREADS"] = str(plan.threads)
    with ExitStack() as stack:
        (work / "services").mkdir(exist_ok=True)
        services = stack.enter_context(local_services(work / "services", cloud_env=cloud_env))
        admin = stack.enter_context(DeveloperAdminClient(services.developer_url, admin_token=services.admin_token))
        dep = deploy_model(admin, model_dir, name="bench-llama", cloud_url=services.cloud_url)
        cloud_port = int(services.cloud_url.rsplit(":", 1)[1])

        def client(cloud_url: str | None = None) -> Any:
            credential = admin.issue_credential(dep, name="bench").credential
            return stack.enter_context(
                StipClient(
                    services.developer_url,
                    cloud_url=cloud_url or services.cloud_url,
                    deployment_id=dep,
                    credential=credential,
                    cache_dir=work / "client-cache",
                )
            )

        def gen(c: Any, ids: Sequence[int], k: int) -> list[int]:
            return list(c.generate_ids(ids, max_new_tokens=k, temperature=0.0, eos=False))

        one = client()
        first = [int(t) for t in prompt[0]]
        expected = plain.generate(prompt, n)[0, plan.prompt_tokens :].tolist()
        got = gen(one, first, n)
        if plan.dtype == "float32" and got != expected:
            raise RuntimeError("STIP's greedy tokens differ from plaintext generate(): the benchmark is void")
        if got != expected:  # half precision rounds differently from the fp32 original: said, not fatal
            same = sum(a == b for a, b in zip(got, expected, strict=True))
            log(f"P2 in {plan.dtype}: {same}/{n} greedy tokens equal to the fp32 plaintext")
        log("STIP: one stream ...")
        stip_tok = per_token(lambda k: gen(one, first, k), n, reps)
        stip_1 = n / timed(lambda: gen(one, first, n), reps)
        model_ms, p2_request_ms = p2_step_ms(services.cloud_url, lambda k: gen(one, first, k), n)
        sdk_ms = sdk_step_ms(one)
        http = one._cloud_http()
        info = f"/v1/deployments/{dep}"
        http_ms = timed(lambda: _repeat(lambda: http.request("GET", info, idempotent=True), 20), 1) / 20 * 1000

        log(f"STIP: {plan.streams} concurrent clients ...")
        clients = [client() for _ in range(plan.streams)]
        for c in clients:
            c.bundle  # noqa: B018  (fetched before the clock starts)

        def concurrent() -> None:
            errors: list[BaseException] = []
            barrier = threading.Barrier(len(clients))

            def go(c: Any, ids: list[int]) -> None:
                try:
                    barrier.wait(30)
                    gen(c, ids, n)
                except BaseException as e:
                    errors.append(e)

            threads = [threading.Thread(target=go, args=(c, p)) for c, p in zip(clients, prompts, strict=True)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            if errors:
                raise errors[0]

        stip_8 = plan.streams * n / timed(concurrent, reps)

        log("STIP: the prefill of a long prompt ...")
        long_ids = [int(t) for t in long_prompt[0]]

        def prefill() -> None:
            with one.session() as s:
                one.forward_topk(torch.tensor([long_ids]), k=1, session=s)

        stip_prefill = timed(prefill, reps)

        log("STIP: bytes on the wire, and 20 ms of round trip ...")
        proxy = stack.enter_context(counting_proxy(cloud_port))
        counted = client(f"http://127.0.0.1:{proxy.port}")
        gen(counted, first, 1)
        up0, down0 = proxy.up, proxy.down
        gen(counted, first, 1)
        up1, down1 = proxy.up - up0, proxy.down - down0
        gen(counted, first, n)
        up_n, down_n = proxy.up - up0 - up1, proxy.down - down0 - down1
        wire_up, wire_down = (up_n - up1) / (n - 1), (down_n - down1) / (n - 1)
        connections = proxy.connections
        wan = stack.enter_context(counting_proxy(cloud_port, one_way_delay_s=0.010))
        far = client(f"http://127.0.0.1:{wan.port}")
        wan_tok = per_token(lambda k: gen(far, first, k), n, max(1, reps - 1))

    figures = {
        "e2e_decode_ratio": plain_tok / stip_tok,
        "overhead_ms_per_step": (stip_tok * 1000) - model_ms,
        "p2_forward_ratio": p2_ratio,
        "batch8_throughput_ratio": stip_8 / stip_1,
        "plain_batch8_ratio": plain_b8 / plain_b1,
        "wire_up_bytes_per_token": wire_up,
        "wire_down_bytes_per_token": wire_down,
        "prefill_ratio": plain_prefill / stip_prefill,
        "transform_mb_per_s": mb_per_s,
        "wan20_ms_per_token": wan_tok * 1000,
    }
    return Results(
        model=plan.size.name,
        parameters_m=n_params,
        plain_ms_per_token=plain_tok * 1000,
        stip_ms_per_token=stip_tok * 1000,
        p2_forward_ms=p2_ms,
        plain_b1_tokens_per_s=plain_b1,
        plain_b8_tokens_per_s=plain_b8,
        stip_1_tokens_per_s=stip_1,
        stip_8_tokens_per_s=stip_8,
        plain_prefill_ms=plain_prefill * 1000,
        stip_prefill_ms=stip_prefill * 1000,
        p2_model_ms=model_ms,
        p2_request_ms=p2_request_ms,
        sdk_ms_per_step=sdk_ms,
        http_ms=http_ms,
        figures=figures,
        connections=connections,
    )


def format_table(r: Results, plan: Plan) -> str:
    rows = [
        (
            "model",
            f"{r.model} ({r.parameters_m:.1f} M parameters, P2 {plan.dtype}, CPU, {torch.get_num_threads()} threads)",
        ),
        ("decode, one stream: plaintext / STIP", f"{r.plain_ms_per_token:.2f} / {r.stip_ms_per_token:.2f} ms/token"),
        ("P2's forward per decode step (θ′, in this process)", f"{r.p2_forward_ms:.2f} ms"),
        ("P2's model forward per decode step (P2's metrics)", f"{r.p2_model_ms:.2f} ms"),
        (
            "overhead per step: P2 framing / SDK work / HTTP and the rest",
            f"{r.p2_request_ms - r.p2_model_ms:.2f} / {r.sdk_ms_per_step:.2f} / "
            f"{r.stip_ms_per_token - r.p2_request_ms - r.sdk_ms_per_step:.2f} ms",
        ),
        ("HTTP round trip of a small GET to P2", f"{r.http_ms:.2f} ms"),
        (
            f"throughput, 1 vs {plan.streams} streams: plaintext",
            f"{r.plain_b1_tokens_per_s:.1f} / {r.plain_b8_tokens_per_s:.1f} tokens/s",
        ),
        (
            f"throughput, 1 vs {plan.streams} streams: STIP",
            f"{r.stip_1_tokens_per_s:.1f} / {r.stip_8_tokens_per_s:.1f} tokens/s",
        ),
        (
            f"prefill of {plan.prefill_tokens} tokens: plaintext / STIP",
            f"{r.plain_prefill_ms:.1f} / {r.stip_prefill_ms:.1f} ms",
        ),
    ]
    rows.append(("TCP connections of one client, 3 generations", str(r.connections)))
    rows += [(k, f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}") for k, v in r.figures.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller model and fewer tokens (under 3 minutes)")
    p.add_argument("--size", choices=sorted(SIZES), help="the model size (default: gpt2-small; quick with --quick)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="P2's dtype")
    p.add_argument("--threads", type=int, help="torch threads here and in P2 (default: torch's own choice)")
    p.add_argument("--work-dir", type=Path, help="keep models and logs here (default: a temporary directory)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = args.size or ("quick" if args.quick else "gpt2-small")
    plan = plan_for(name)
    plan = Plan(**{**asdict(plan), "size": plan.size, "dtype": args.dtype, "threads": args.threads})
    if plan.threads:
        torch.set_num_threads(plan.threads)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    with work_dir(args.work_dir) as work:
        started = time.perf_counter()
        results = run(plan, work, log)
        log(f"done in {time.perf_counter() - started:.0f} s")
    print(format_table(results, plan))
    print(json.dumps({k: round(v, 4) for k, v in results.figures.items()} | {"model": results.model}))
    return 0


@contextmanager
def work_dir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="stip-bench-") as tmp:
        yield Path(tmp)


if __name__ == "__main__":
    sys.exit(main())
