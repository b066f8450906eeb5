"""Bounded load on loopback: concurrent SDK clients against P2, beside the plaintext baseline.

    python -m benchmarks.load --clients 32 --requests 400

Without URLs it starts P2 and P1 as separate processes on loopback ports (like `stip demo`),
with a short session idle TTL, registers a small random Llama (GQA, tied head) and
all-MiniLM-L6-v2 and deploys both. Then:

1. the plaintext baseline: the same requests on the original models in this process, one after
   the other and in `--clients` threads (greedy `generate()`; mean-pooled, normalised embeddings);
2. the load: `--clients` threads, each its own `StipClient` (half generate, half embed, as the
   `--generate-share` says), share a fixed list of `--requests` requests; every result is
   compared with the plaintext one;
3. expiry: `--abandon` sessions are opened by clients that then vanish without deleting them (a
   crashed process); when that fills P2's `--max-sessions`, one more generation must be refused
   with 429 (`RateLimited`); then the sessions must expire after the idle TTL and P2's
   `stip_cloud_active_sessions` gauge return to 0.

It prints latency (p50/p99) per kind, throughput, errors by type (429 `RateLimited` is the only
intended one), mismatches against plaintext, and P2's resident memory (VmRSS from
/proc/<pid>/status) at baseline, at its peak, after the load and after the sessions expired.
Only loopback services are started; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import httpx
import torch

from shared.api import METRICS_PATH, SESSION_PATH, SESSIONS_PATH
from stip_demo.demo import SENTENCES
from user_client import RateLimited, StipClient, StipError

MIB = 1 << 20
Kind = Literal["generate", "embed"]
KINDS: tuple[Kind, ...] = ("generate", "embed")
MIN_COSINE = 0.99999

CORPUS = [  # the demo's sentences and a few of other lengths
    *SENTENCES,
    "The cloud runs the same network on permuted weights.",
    "Permutations hide the order of the coordinates, not their values.",
    "A considerably longer sentence, with punctuation, numbers like 1763 and several clauses, to pad a batch.",
    "Short.",
]


# --- configuration and results ------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    clients: int = 32
    requests: int = 200
    generate_share: float = 0.5  # share of the requests (and of the clients) that generate
    max_new_tokens: int = 16
    embed_batch: int = 4  # sentences per embed request
    max_sessions: int = 256  # STIP_CLOUD_MAX_SESSIONS of a self-started P2
    session_ttl_s: int = 4  # STIP_CLOUD_SESSION_IDLE_TTL_S of a self-started P2
    abandon: int = 8  # sessions left open by vanished clients, after the load
    plaintext_threads: bool = True  # also run the plaintext baseline in `clients` threads
    deadline_s: float = 600.0  # bound on the load phase; requests not started by then are skipped
    seed: int = 0


@dataclass(frozen=True)
class Request:
    kind: Kind
    prompt_ids: tuple[int, ...] = ()  # generate
    sentences: tuple[str, ...] = ()  # embed


@dataclass
class Outcome:
    kind: Kind
    latency_s: float
    error: str | None = None  # "RateLimited 429", "TransportError", ... ; None on success
    output: Any = None  # generated ids (list[int]) or embeddings (tensor [n, d])


@dataclass
class KindFigures:
    requests: int
    ok: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    per_s: float  # completed requests per second of the phase's wall time


@dataclass
class PhaseFigures:
    name: str
    wall_s: float
    kinds: dict[str, KindFigures]
    errors: dict[str, int] = field(default_factory=dict)
    mismatches: int = 0
    tokens_per_s: float = 0.0  # generated tokens per second
    sentences_per_s: float = 0.0

    @property
    def requests_per_s(self) -> float:
        return sum(k.ok for k in self.kinds.values()) / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class CloudFigures:
    """P2's VmRSS in MiB (None when its pid is unknown), its live-session gauge and counters."""

    before_load: float | None = None
    peak_load: float | None = None
    after_load: float | None = None
    peak: float | None = None
    after_expiry: float | None = None
    sessions_peak: float | None = None
    sessions_after_load: float | None = None
    sessions_opened: float | None = None  # by the load (P2's POST .../sessions answered 201)
    sessions_deleted: float | None = None  # by the load's clients (DELETE /v1/sessions/... answered 204)
    # deletes P2 answered 410: the session had idled past the TTL first (a step's wait under load)
    sessions_expired_first: float | None = None
    sessions_abandoned: float | None = None
    abandon_s: float | None = None  # opening the abandoned sessions took this long (they age meanwhile)
    sessions_after_expiry: float | None = None
    expiry_s: float | None = None  # from the last abandoned session's use to the gauge reading 0
    threads_before: int | None = None  # P2's OS threads
    threads_after: int | None = None


@dataclass
class Report:
    options: Options
    plain_sequential: PhaseFigures
    plain_threaded: PhaseFigures | None
    protocol: PhaseFigures
    memory: CloudFigures
    saturation: str | None  # what the extra generation got while every session slot was taken
    recovered: bool | None  # a generation succeeded again after the sessions expired
    unexpected_errors: dict[str, int]  # every error of the load that is not an intended 429


# --- the workload -------------------------------------------------------------------------


def make_requests(options: Options, tokenizer: Any) -> list[Request]:
    """A fixed, seeded mix: generation prompts of 4-12 tokens, embed batches of the corpus."""
    g = torch.Generator().manual_seed(options.seed)
    n_gen = round(options.requests * options.generate_share)
    out: list[Request] = []
    for i in range(options.requests):
        pick = [CORPUS[int(j)] for j in torch.randint(0, len(CORPUS), (max(1, options.embed_batch),), generator=g)]
        if i * n_gen // options.requests != (i + 1) * n_gen // options.requests:  # spread evenly
            ids = tokenizer(" ".join(pick), add_special_tokens=False)["input_ids"]
            length = int(torch.randint(4, 13, (1,), generator=g))
            out.append(Request("generate", prompt_ids=tuple(int(t) for t in ids[:length])))
        else:
            out.append(Request("embed", sentences=tuple(pick)))
    return out


def split_clients(options: Options, requests: Sequence[Request]) -> dict[Kind, int]:
    """Clients per kind, proportional to the requests of each kind (at least one where needed)."""
    n_gen = sum(r.kind == "generate" for r in requests)
    n_emb = len(requests) - n_gen
    if not n_gen or not n_emb:
        return {"generate": options.clients if n_gen else 0, "embed": options.clients if n_emb else 0}
    gen = min(options.clients - 1, max(1, round(options.clients * n_gen / len(requests))))
    return {"generate": gen, "embed": options.clients - gen}


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of the values, or None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def summarise(name: str, outcomes: Sequence[Outcome], wall_s: float, mismatches: int = 0) -> PhaseFigures:
    kinds: dict[str, KindFigures] = {}
    for kind in KINDS:
        mine = [o for o in outcomes if o.kind == kind]
        if not mine:
            continue
        ok = [o.latency_s * 1000 for o in mine if o.error is None]
        kinds[kind] = KindFigures(
            requests=len(mine),
            ok=len(ok),
            p50_ms=percentile(ok, 50),
            p99_ms=percentile(ok, 99),
            max_ms=max(ok) if ok else None,
            per_s=len(ok) / wall_s if wall_s > 0 else 0.0,
        )
    errors = Counter(o.error for o in outcomes if o.error is not None)
    tokens = sum(len(o.output) for o in outcomes if o.error is None and o.kind == "generate")
    sentences = sum(int(o.output.shape[0]) for o in outcomes if o.error is None and o.kind == "embed")
    return PhaseFigures(
        name=name,
        wall_s=wall_s,
        kinds=kinds,
        errors=dict(sorted(errors.items())),
        mismatches=mismatches,
        tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        sentences_per_s=sentences / wall_s if wall_s > 0 else 0.0,
    )


def error_name(e: BaseException) -> str:
    """The label an error is counted under: the SDK's exception class and the HTTP status."""
    status = getattr(e, "status", None)
    name = type(e).__name__ if isinstance(e, StipError) else f"unexpected {type(e).__name__}"
    return f"{name} {status}" if status else name


def is_intended(label: str) -> bool:
    return label == f"{RateLimited.__name__} 429"


# --- P2's memory and gauges ---------------------------------------------------------------


def _proc_status(pid: int | None, field: str) -> int | None:
    """An integer field of /proc/<pid>/status (Linux); None when it cannot be read."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_mib(pid: int | None) -> float | None:
    """VmRSS of a process in MiB; None when it cannot be read."""
    kb = _proc_status(pid, "VmRSS")
    return None if kb is None else kb / 1024


def thread_count(pid: int | None) -> int | None:
    return _proc_status(pid, "Threads")


def gauge(cloud_url: str, name: str = "stip_cloud_active_sessions", *, timeout: float = 10.0) -> float:
    """One unlabelled gauge of P2's /metrics."""
    text = httpx.get(cloud_url + METRICS_PATH, timeout=timeout).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise ValueError(f"{name} is not in P2's /metrics")


def requests_counted(cloud_url: str, endpoint: str, method: str, status: int) -> float:
    """P2's `stip_cloud_requests_total` for one route template, method and status (0 if none yet)."""
    text = httpx.get(cloud_url + METRICS_PATH, timeout=10.0).text
    labels = (f'endpoint="{endpoint}"', f'method="{method}"', f'status="{status}"')
    total = 0.0
    for line in text.splitlines():
        if line.startswith("stip_cloud_requests_total{") and all(label in line for label in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total


SESSIONS_ROUTE = (SESSIONS_PATH, "POST", 201)
SESSION_DELETE_ROUTE = (SESSION_PATH, "DELETE", 204)
SESSION_GONE_ROUTE = (SESSION_PATH, "DELETE", 410)  # a delete of a session P2 had expired


class Sampler:
    """Samples P2's RSS (every `every_s`) and its session gauge (every 4th sample) in a thread."""

    def __init__(self, pid: int | None, cloud_url: str, every_s: float = 0.05) -> None:
        self.pid, self.cloud_url, self.every_s = pid, cloud_url, every_s
        self.rss_peak: float | None = None
        self.sessions_peak: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="p2-sampler", daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.every_s):
            if self.pid is not None and (rss := rss_mib(self.pid)) is not None:
                self.rss_peak = rss if self.rss_peak is None else max(self.rss_peak, rss)
            if n % 4 == 0:
                try:
                    live = gauge(self.cloud_url, timeout=2.0)
                except (httpx.HTTPError, ValueError):
                    live = None
                if live is not None:
                    self.sessions_peak = live if self.sessions_peak is None else max(self.sessions_peak, live)
            n += 1

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# --- running requests ---------------------------------------------------------------------


def run_threads(
    work: Sequence[Sequence[Request]],
    handler: Callable[[int], Callable[[Request], Any]],
    *,
    deadline_s: float,
    check: Callable[[Request, Any], bool] | None = None,
) -> tuple[list[Outcome], float, int]:
    """Run each list of requests in a thread of its own; `handler(i)` builds thread i's callable
    (outside the timed part). Returns the outcomes, the wall time and the mismatch count."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    ready = threading.Barrier(len(work) + 1)
    go = threading.Event()
    failed_setup: list[BaseException] = []
    mismatches = [0]
    deadline = [0.0]

    def worker(i: int) -> None:
        try:
            call = handler(i)
        except BaseException as e:  # reported after the barrier
            failed_setup.append(e)
            ready.wait()
            return
        ready.wait()
        go.wait()
        mine: list[Outcome] = []
        for request in work[i]:
            if time.monotonic() > deadline[0]:
                break
            start = time.perf_counter()
            try:
                output = call(request)
            except Exception as e:
                mine.append(Outcome(request.kind, time.perf_counter() - start, error=error_name(e)))
                continue
            mine.append(Outcome(request.kind, time.perf_counter() - start, output=output))
            if check is not None and not check(request, output):
                with lock:
                    mismatches[0] += 1
        with lock:
            outcomes.extend(mine)

    threads = [threading.Thread(target=worker, args=(i,), name=f"load-{i}", daemon=True) for i in range(len(work))]
    for t in threads:
        t.start()
    ready.wait()  # every client is built: the clock starts
    deadline[0] = time.monotonic() + deadline_s
    start = time.perf_counter()
    go.set()
    for t in threads:
        t.join(timeout=deadline_s + 120)
    if failed_setup:
        raise RuntimeError(f"{len(failed_setup)} client(s) failed to start: {failed_setup[0]!r}")
    if any(t.is_alive() for t in threads):
        raise RuntimeError("load threads did not finish within the deadline")
    return outcomes, time.perf_counter() - start, mismatches[0]


def deal(requests: Sequence[Request], kind: Kind, n: int) -> list[list[Request]]:
    """The requests of one kind dealt round-robin to n clients."""
    mine = [r for r in requests if r.kind == kind]
    return [mine[i::n] for i in range(n)] if n else []


# --- the plaintext baseline ---------------------------------------------------------------


class Plaintext:
    """The original models in this process: greedy `generate()` and sentence embeddings."""

    def __init__(self, llama_dir: Path, minilm_dir: Path, max_new_tokens: int) -> None:
        import transformers

        self.max_new_tokens = max_new_tokens
        self.llama = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
        self.bert = transformers.AutoModel.from_pretrained(minilm_dir).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
        self.expected: dict[Request, Any] = {}

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[int]) -> list[int]:
        ids = torch.tensor([list(prompt_ids)])
        out = self.llama.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        return [int(t) for t in out[0, ids.shape[1] :]]

    @torch.no_grad()
    def embed(self, sentences: Sequence[str]) -> torch.Tensor:
        from shared.pooling import mean_pool, normalize

        enc = self.tokenizer(list(sentences), padding=True, truncation=True, max_length=256, return_tensors="pt")
        return normalize(mean_pool(self.bert(**enc).last_hidden_state, enc["attention_mask"]))

    def __call__(self, request: Request) -> Any:
        return self.generate(request.prompt_ids) if request.kind == "generate" else self.embed(request.sentences)

    def check(self, request: Request, output: Any) -> bool:
        """Whether a private result equals the plaintext one (ids exactly; cosine for embeddings)."""
        expected = self.expected[request]
        if request.kind == "generate":
            return bool(output == expected)
        cosine = torch.nn.functional.cosine_similarity(output.float(), expected, dim=-1)
        return bool(cosine.min() >= MIN_COSINE)


# --- the cluster --------------------------------------------------------------------------


@dataclass
class Cluster:
    developer_url: str
    cloud_url: str
    admin: Any  # developer_service.client.DeveloperAdminClient
    cloud_pid: int | None
    deployments: dict[Kind, str]
    model_dirs: dict[Kind, Path]
    cache_dir: Path
    credentials: dict[Kind, list[str]] = field(default_factory=dict)

    def credential(self, kind: Kind, name: str) -> str:
        return str(self.admin.issue_credential(self.deployments[kind], name=name).credential)

    def client(self, kind: Kind, credential: str, **kwargs: Any) -> StipClient:
        return StipClient(
            self.developer_url,
            cloud_url=self.cloud_url,
            deployment_id=self.deployments[kind],
            credential=credential,
            cache_dir=self.cache_dir,
            **kwargs,
        )


def deploy_model(admin: Any, path: Path, *, name: str, cloud_url: str, timeout_s: float = 600) -> str:
    """Register a local model on P1 and deploy it to P2; the deployment id once it is active."""
    model = admin.register(path, name=name)
    dep = admin.deploy(model.model_id, cloud_url=cloud_url)
    status = admin.wait(dep.deployment_id, timeout_s=timeout_s)
    if status.status != "active":
        raise RuntimeError(f"deploying {path.name} failed: {status.error}")
    return str(dep.deployment_id)


@contextmanager
def cluster(
    work: Path,
    options: Options,
    *,
    developer_url: str | None = None,
    cloud_url: str | None = None,
    admin_token: str | None = None,
    cloud_pid: int | None = None,
) -> Iterator[Cluster]:
    """Deploy the two models on running services, or on P2 and P1 started here on loopback."""
    from developer_service.client import DeveloperAdminClient
    from stip_demo.models import make_random_llama, minilm_path
    from stip_demo.services import local_services

    with ExitStack() as stack:
        if developer_url and cloud_url:
            if not admin_token:
                raise SystemExit("attaching to running services needs P1's admin token (--admin-token)")
            dev, cloud = developer_url.rstrip("/"), cloud_url.rstrip("/")
        else:
            cloud_env = {
                "STIP_CLOUD_MAX_SESSIONS": str(options.max_sessions),
                "STIP_CLOUD_SESSION_IDLE_TTL_S": str(options.session_ttl_s),
                "STIP_CLOUD_LOG_LEVEL": "WARNING",
            }
            services = stack.enter_context(local_services(work, cloud_env=cloud_env))
            dev, cloud, admin_token = services.developer_url, services.cloud_url, services.admin_token
            cloud_pid = services.procs[0].pid
        admin = stack.enter_context(DeveloperAdminClient(dev, admin_token=admin_token))
        dirs: dict[Kind, Path] = {
            "generate": make_random_llama(work / "models" / "random-llama"),
            "embed": minilm_path(),
        }
        deployments = {
            kind: deploy_model(admin, path, name=f"load-{kind}", cloud_url=cloud) for kind, path in dirs.items()
        }
        c = Cluster(dev, cloud, admin, cloud_pid, deployments, dirs, work / "client-cache")
        for kind in KINDS:  # fetch each bundle once: the load's clients read it from the cache
            with c.client(kind, c.credential(kind, "load-warmup")) as client:
                client.bundle  # noqa: B018
        yield c


# --- the benchmark ------------------------------------------------------------------------


def abandon_sessions(c: Cluster, n: int, prompt_ids: Sequence[int]) -> float:
    """Open n sessions with a prefill each from clients that then vanish without deleting them.

    Every session must still be live when the last one is open (the saturation check needs all
    the slots taken), so the slow part, a credential from P1 and a bundle loaded per client, is
    done first, and only the opening and the prefill, all clients at once, run against the idle TTL.
    Returns the seconds those took (the oldest session's idle time when the last is open).
    """
    clients: list[tuple[StipClient, httpx.HTTPTransport]] = []
    for i in range(n):
        transport = httpx.HTTPTransport()
        client = c.client("generate", c.credential("generate", f"load-crashed-{i}"), transport=transport)
        client.bundle  # noqa: B018  (from the cache, before the sessions open)
        clients.append((client, transport))

    def abandon(pair: tuple[StipClient, httpx.HTTPTransport]) -> None:
        client, transport = pair
        session = client.open_session()
        client.forward(torch.tensor([list(prompt_ids)]), session=session, output="last")
        transport.close()  # the process died: its connections drop, its sessions stay on P2

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=n or 1) as pool:
        list(pool.map(abandon, clients))
    return time.monotonic() - start


def run_benchmark(options: Options, c: Cluster, *, log: Callable[[str], None] = lambda _: None) -> Report:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(c.model_dirs["generate"])
    requests = make_requests(options, tokenizer)
    per_kind = split_clients(options, requests)

    log("plaintext baseline: the original models in this process ...")
    plain = Plaintext(c.model_dirs["generate"], c.model_dirs["embed"], options.max_new_tokens)
    prompt = next((r.prompt_ids for r in requests if r.kind == "generate"), (2023, 2003, 1037, 3231))
    plain.generate(prompt)  # first-use costs, untimed
    plain.embed(CORPUS[:2])
    start = time.perf_counter()
    seq: list[Outcome] = []
    for r in requests:
        t0 = time.perf_counter()
        plain.expected[r] = plain(r)
        seq.append(Outcome(r.kind, time.perf_counter() - t0, output=plain.expected[r]))
    plain_sequential = summarise("plaintext, sequential", seq, time.perf_counter() - start)
    plain_threaded = None
    if options.plaintext_threads:
        work = deal(requests, "generate", per_kind["generate"]) + deal(requests, "embed", per_kind["embed"])
        outcomes, wall, bad = run_threads(work, lambda i: plain, deadline_s=options.deadline_s, check=plain.check)
        plain_threaded = summarise(f"plaintext, {len(work)} threads", outcomes, wall, bad)

    memory = CloudFigures()
    with c.client("generate", c.credential("generate", "load-probe")) as probe:
        probe.generate_ids(prompt, max_new_tokens=2, temperature=0.0, eos=False)  # first-use allocations on P2
    with c.client("embed", c.credential("embed", "load-probe")) as probe:
        probe.embed(CORPUS[:2])
    memory.before_load = rss_mib(c.cloud_pid)
    memory.threads_before = thread_count(c.cloud_pid)

    log(f"the load: {options.clients} clients, {len(requests)} requests ...")
    work, kinds = [], []
    for kind in KINDS:
        for share in deal(requests, kind, per_kind[kind]):
            work.append(share)
            kinds.append(kind)
    creds = {kind: [c.credential(kind, f"load-{kind}-{i}") for i in range(per_kind[kind])] for kind in KINDS}
    clients: list[StipClient] = []

    def handler(i: int) -> Callable[[Request], Any]:
        kind = kinds[i]
        client = c.client(kind, creds[kind].pop())
        clients.append(client)
        client.bundle  # noqa: B018  (loaded from the cache before the clock starts)
        if kind == "generate":
            return lambda r: client.generate_ids(
                r.prompt_ids, max_new_tokens=options.max_new_tokens, temperature=0.0, eos=False
            )
        return lambda r: client.embed(list(r.sentences))

    opened = requests_counted(c.cloud_url, *SESSIONS_ROUTE)
    deleted = requests_counted(c.cloud_url, *SESSION_DELETE_ROUTE)
    gone = requests_counted(c.cloud_url, *SESSION_GONE_ROUTE)
    sampler = Sampler(c.cloud_pid, c.cloud_url)
    try:
        with sampler:
            outcomes, wall, bad = run_threads(work, handler, deadline_s=options.deadline_s, check=plain.check)
    finally:
        for client in clients:
            client.close()
    protocol = summarise(f"STIP over HTTP, {len(work)} clients", outcomes, wall, bad)
    memory.peak_load, memory.sessions_peak = sampler.rss_peak, sampler.sessions_peak
    memory.after_load = rss_mib(c.cloud_pid)
    memory.threads_after = thread_count(c.cloud_pid)
    memory.sessions_after_load = gauge(c.cloud_url)
    memory.sessions_opened = requests_counted(c.cloud_url, *SESSIONS_ROUTE) - opened
    memory.sessions_deleted = requests_counted(c.cloud_url, *SESSION_DELETE_ROUTE) - deleted
    memory.sessions_expired_first = requests_counted(c.cloud_url, *SESSION_GONE_ROUTE) - gone

    log(f"expiry: {options.abandon} sessions left open by vanished clients ...")
    saturation: str | None = None
    recovered: bool | None = None
    late_credential = c.credential("generate", "load-late")
    with Sampler(c.cloud_pid, c.cloud_url) as after, c.client("generate", late_credential) as late:
        late.bundle  # noqa: B018  (ready before the abandoned sessions start to age)
        memory.abandon_s = abandon_sessions(c, options.abandon, prompt)
        abandoned_at = time.monotonic()
        memory.sessions_abandoned = gauge(c.cloud_url)
        if memory.sessions_abandoned >= options.max_sessions:
            try:
                late.generate_ids(prompt, max_new_tokens=2, temperature=0.0, eos=False)
                saturation = "accepted"
            except StipError as e:
                saturation = error_name(e)
        # the sweeper runs every max(1, min(30, ttl/4)) s: allow the TTL, two sweeps and slack
        limit = abandoned_at + options.session_ttl_s + 2 * max(1.0, min(30.0, options.session_ttl_s / 4)) + 10
        while (live := gauge(c.cloud_url)) > 0 and time.monotonic() < limit:
            time.sleep(0.1)
        memory.expiry_s = time.monotonic() - abandoned_at
        memory.sessions_after_expiry = live
        if options.abandon:  # the slots are free again: a generation goes through, still exact
            again = late.generate_ids(prompt, max_new_tokens=options.max_new_tokens, temperature=0.0, eos=False)
            recovered = again == plain.generate(prompt)
    time.sleep(0.5)
    memory.after_expiry = rss_mib(c.cloud_pid)
    peaks = [v for v in (memory.peak_load, after.rss_peak, memory.after_expiry) if v is not None]
    memory.peak = max(peaks) if peaks else None

    unexpected = {k: v for k, v in protocol.errors.items() if not is_intended(k)}
    return Report(
        options=options,
        plain_sequential=plain_sequential,
        plain_threaded=plain_threaded,
        protocol=protocol,
        memory=memory,
        saturation=saturation,
        recovered=recovered,
        unexpected_errors=unexpected,
    )


# --- output -------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _n(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f} MiB"


def format_report(report: Report) -> str:
    o = report.options
    lines = [
        f"workload: {o.requests} requests ({o.generate_share:.0%} generate: random Llama, {o.max_new_tokens} new "
        f"tokens, greedy; the rest embed: all-MiniLM-L6-v2, {o.embed_batch} sentences), {o.clients} clients",
        "",
        f"{'phase':<32} {'kind':<9} {'ok/req':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'req/s':>7}",
    ]
    phases = [report.plain_sequential, report.plain_threaded, report.protocol]
    for phase in (p for p in phases if p is not None):
        for kind, k in phase.kinds.items():
            lines.append(
                f"{phase.name:<32} {kind:<9} {f'{k.ok}/{k.requests}':>9} {_ms(k.p50_ms):>8} {_ms(k.p99_ms):>8} "
                f"{_ms(k.max_ms):>8} {k.per_s:>7.1f}"
            )
        lines.append(
            f"{'':<32} {'all':<9} wall {phase.wall_s:.2f} s, {phase.requests_per_s:.1f} req/s, "
            f"{phase.tokens_per_s:.0f} generated tokens/s, {phase.sentences_per_s:.0f} sentences/s"
            + (f", {phase.mismatches} mismatches" if phase.mismatches else "")
        )
    p = report.protocol
    errors = ", ".join(f"{k}: {v}" for k, v in p.errors.items()) or "none"
    unexpected = ", ".join(f"{k}: {v}" for k, v in report.unexpected_errors.items()) or "none"
    m = report.memory
    lines += [
        "",
        f"errors under load: {errors} (unexpected: {unexpected}); results different from plaintext: {p.mismatches}",
        f"P2 sessions: {_n(m.sessions_opened)} opened and {_n(m.sessions_deleted)} deleted by the load's clients "
        f"(and {_n(m.sessions_expired_first)} deleted after they had expired), "
        f"peak {_n(m.sessions_peak)} live, {_n(m.sessions_after_load)} live after the load; "
        f"{_n(m.sessions_abandoned)} abandoned (opened in {_ms(m.abandon_s)} s), "
        f"{_n(m.sessions_after_expiry)} live {_ms(m.expiry_s)} s later (idle TTL {o.session_ttl_s} s)",
    ]
    if report.saturation is not None:
        lines.append(f"with all {o.max_sessions} session slots taken, one more generation got: {report.saturation}")
    if report.recovered is not None:
        lines.append(f"after expiry, a new generation {'succeeded' if report.recovered else 'FAILED'}")
    lines.append(
        f"P2 VmRSS: {_mib(m.before_load)} before the load, peak {_mib(m.peak_load)} during it, "
        f"{_mib(m.after_load)} after it, {_mib(m.after_expiry)} after the sessions expired (peak {_mib(m.peak)}); "
        f"threads {_n(m.threads_before)} before the load, {_n(m.threads_after)} after it"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    d = Options()
    p = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=d.clients, help="concurrent SDK clients (threads)")
    p.add_argument("--requests", type=int, default=d.requests, help="requests in all (a fixed count)")
    p.add_argument("--generate-share", type=float, default=d.generate_share, help="share of generate requests")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--embed-batch", type=int, default=d.embed_batch, help="sentences per embed request")
    p.add_argument("--max-sessions", type=int, default=d.max_sessions, help="P2's STIP_CLOUD_MAX_SESSIONS")
    p.add_argument(
        "--session-ttl",
        dest="session_ttl_s",
        type=int,
        default=d.session_ttl_s,
        help="P2's STIP_CLOUD_SESSION_IDLE_TTL_S",
    )
    p.add_argument("--abandon", type=int, default=d.abandon, help="sessions left open by vanished clients")
    p.add_argument(
        "--no-plaintext-threads",
        dest="plaintext_threads",
        action="store_false",
        help="skip the threaded plaintext baseline",
    )
    p.add_argument("--deadline", dest="deadline_s", type=float, default=d.deadline_s, help="bound on the load phase, s")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--developer-url", help="attach to a running P1 (with --cloud-url and --admin-token)")
    p.add_argument("--cloud-url", help="attach to a running P2; its --max-sessions/--session-ttl must be given")
    p.add_argument("--admin-token", default=os.environ.get("STIP_CLIENT_ADMIN_TOKEN"), help="P1's admin token")
    p.add_argument("--cloud-pid", type=int, help="P2's process id, for its VmRSS when attached")
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if bool(args.developer_url) != bool(args.cloud_url):
        raise SystemExit("give both --developer-url and --cloud-url, or neither")
    options = Options(**{f.name: getattr(args, f.name) for f in fields(Options)})  # dests are its fields

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="stip-load-") as tmp:
        say(f"starting/attaching the services (work dir {tmp}) ...")
        with cluster(
            Path(tmp),
            options,
            developer_url=args.developer_url,
            cloud_url=args.cloud_url,
            admin_token=args.admin_token,
            cloud_pid=args.cloud_pid,
        ) as c:
            report = run_benchmark(options, c, log=say)
    print(format_report(report))
    if args.json:
        print(json.dumps(asdict(report), indent=2, default=str))
    ok = not report.unexpected_errors and not report.protocol.mismatches
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
