"""`stip demo`: the three parties end to end, checked against plaintext inference.

Without URLs it starts P2 (`stip-cloud serve`) and P1 (`stip-developer serve`) as separate
processes on loopback ports; with `--developer-url` and `--cloud-url` it attaches to running
services (docker compose does that). Then, as P1's admin, it registers all-MiniLM-L6-v2 and a
small randomly initialised Llama-family model (GQA, tied head; its text is gibberish by
design), deploys both, issues credentials, and, as P3, runs private embedding with a
similarity search and private greedy generation through the SDK. Every result is compared
with plaintext inference on the original model; any mismatch exits non-zero. It prints what
each party saw (shapes and bytes, never values) and the timings.
"""

import argparse
import logging
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from shared import wire
from shared.pooling import mean_pool, normalize
from stip_demo.models import make_random_llama, minilm_path
from stip_demo.services import Services, local_services, wait_ready
from stip_http.tls import tls_verify
from user_client.client import StipClient
from user_client.settings import ClientSettings

log = logging.getLogger("stip.demo")

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "Secure inference keeps both the model and the data private.",
]
QUERY = "A man rides a horse."
PROMPT = "the secure transformer inference protocol"
MIN_COSINE = 0.99999
RANDOM_LLAMA = "random-llama-gqa"
# --- what each party saw ------------------------------------------------------------------


@dataclass
class Seen:
    """Requests one party received from the user: counts, bytes, tensor shapes; never values."""

    requests: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    shapes: dict[str, int] = field(default_factory=dict)  # "inputs_embeds F32[1, 7, 128]" -> count


class Recorder(httpx.BaseTransport):
    """An httpx transport that notes what crosses it, then forwards to the real network."""

    def __init__(self, seen: Seen, **kwargs: Any) -> None:
        self.seen, self.inner = seen, httpx.HTTPTransport(**kwargs)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        self.seen.requests += 1
        self.seen.bytes_in += len(body)
        if request.headers.get("content-type") == wire.CONTENT_TYPE and body:
            infos, _, _ = wire.parse_header(body, body_size=len(body))
            for name, info in infos.items():
                label = f"{name} {info.dtype}{list(info.shape)}"
                self.seen.shapes[label] = self.seen.shapes.get(label, 0) + 1
        response = self.inner.handle_request(request)
        content = response.read()
        self.seen.bytes_out += len(content)
        return httpx.Response(response.status_code, headers=response.headers, content=content, request=request)

    def close(self) -> None:
        self.inner.close()


# --- the demo -----------------------------------------------------------------------------


class Mismatch(Exception):
    pass


def _say(text: str = "") -> None:
    print(text, flush=True)


def _deploy(admin: Any, path: Path, cloud_url: str, name: str) -> str:
    model = admin.register(path, name=name)
    dep = admin.deploy(model.model_id, cloud_url=cloud_url)
    last = [""]

    def show(status: Any) -> None:
        progress = status.progress
        unit = " bytes" if progress.stage in ("pushing", "loading", "done") else " tensors"
        counts = f" {progress.done:,}/{progress.total:,}{unit}" if progress.total else ""
        line = f"    {name}: {progress.stage}{counts}"
        if line != last[0]:
            _say(line)
            last[0] = line

    t0 = time.perf_counter()
    status = admin.wait(dep.deployment_id, poll_s=0.3, on_status=show)
    if status.status != "active":
        raise Mismatch(f"deployment of {name} ended {status.status}: {status.error}")
    _say(
        f"  P1 -> P2: {name} deployed as {status.deployment_id}, key v{status.key_version} "
        f"({time.perf_counter() - t0:.1f} s, family {status.family})"
    )
    return str(status.deployment_id)


def run_embedding(client: StipClient) -> dict[str, float]:
    import transformers

    texts = [*SENTENCES, QUERY]
    _ = client.bundle  # fetch the user key first, so the timing below is inference only
    t0 = time.perf_counter()
    private = client.embed(texts)
    t_private = time.perf_counter() - t0
    # plaintext reference: the original BertModel, mean pooling and L2 norm as sentence-transformers
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path(), trust_remote_code=False)
    model = transformers.BertModel.from_pretrained(minilm_path()).eval()
    t0 = time.perf_counter()
    enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        plain = normalize(mean_pool(model(**enc).last_hidden_state, enc["attention_mask"]))
    t_plain = time.perf_counter() - t0
    cos = torch.nn.functional.cosine_similarity(private, plain, dim=-1)
    _say(
        f"  {len(texts)} sentences embedded privately, d={private.shape[1]}; "
        f"min cosine to plaintext {float(cos.min()):.8f}"
    )
    if float(cos.min()) < MIN_COSINE:
        raise Mismatch(f"private embeddings differ from plaintext (min cosine {float(cos.min()):.6f})")
    scores = private[:-1] @ private[-1]
    order = torch.argsort(scores, descending=True)
    if not torch.equal(order, torch.argsort(plain[:-1] @ plain[-1], descending=True)):
        raise Mismatch("similarity ranking differs from plaintext")
    _say(f"  similarity search for {QUERY!r}:")
    for i in order[:3].tolist():
        _say(f"    {float(scores[i]):.3f}  {SENTENCES[i]}")
    return {"embed_private_s": t_private, "embed_plain_s": t_plain}


def greedy_reference(model: Any, ids: list[int], n: int) -> list[int]:
    """Plaintext inference to compare STIP's greedy generation with: the stock `generate()`,
    greedy, exactly `n` new tokens after `ids` (no stop on EOS)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return list(out[0, len(ids) :].tolist())


def run_generation(client: StipClient, model_dir: Path, max_new_tokens: int) -> dict[str, float]:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    _ = client.bundle
    t0 = time.perf_counter()
    private = client.generate_ids(ids, max_new_tokens=max_new_tokens, temperature=0.0, eos=False)
    t_private = time.perf_counter() - t0
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    t0 = time.perf_counter()
    plain = greedy_reference(model, ids, max_new_tokens)
    t_plain = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(private, plain, strict=False))
    _say(f"  greedy generation, {len(private)} tokens with P2's KV cache: {same}/{len(plain)} equal to plaintext")
    _say(f"    (random weights, gibberish by design) {tok.decode(private)[:100]!r}")
    if private != plain:
        raise Mismatch(f"generation differs from plaintext at token {same}")
    return {"gen_private_s": t_private, "gen_plain_s": t_plain, "tokens": float(len(private))}


def _report(seen: dict[str, Seen], timings: dict[str, float]) -> None:
    _say("\nWhat each party saw (shapes and bytes, never values):")
    for party, s in seen.items():
        _say(f"  {party}: {s.requests} requests, {s.bytes_in:,} bytes received, {s.bytes_out:,} bytes sent back")
        for label, count in sorted(s.shapes.items()):
            _say(f"      {count:4d} x {label}")
    sent = {label.split()[0] for label in seen["P2 (cloud)"].shapes}
    if not sent <= {"inputs_embeds", "attention_mask"}:
        raise Mismatch(f"the user sent P2 tensors other than x·π and its mask: {sorted(sent)}")
    _say("  P2 received only x·π (inputs_embeds) and attention masks: no permutation, no embedding, no token id.")
    _say("\nTimings (this machine, CPU unless P2 has a GPU):")
    _say(
        f"  embedding of {len(SENTENCES) + 1} sentences: private {timings['embed_private_s']:.3f} s, "
        f"plaintext {timings['embed_plain_s']:.3f} s"
    )
    n = timings["tokens"]
    _say(
        f"  generation: private {timings['gen_private_s']:.2f} s ({timings['gen_private_s'] / n * 1000:.0f} ms/token "
        f"over HTTP), plaintext {timings['gen_plain_s']:.2f} s"
    )


def run(args: argparse.Namespace) -> int:
    from developer_service.client import DeveloperAdminClient

    minilm = minilm_path()  # before any service starts: without the demo extra, the error names the pip command
    # TLS: --ca-bundle, else STIP_CLIENT_VERIFY, verifies both services for every client below
    verify = tls_verify(args.ca_bundle if args.ca_bundle else ClientSettings().verify)
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stip-demo-")))
        models_dir = Path(args.models_dir) if args.models_dir else work / "models"
        models_dir.mkdir(parents=True, exist_ok=True)
        if args.developer_url and args.cloud_url:
            admin_token = args.admin_token or _token_from_env()
            services = Services(args.developer_url.rstrip("/"), args.cloud_url.rstrip("/"), admin_token, [])
            wait_ready(services.developer_url, None, verify=verify)
            _say(f"Attached to P1 at {services.developer_url} and P2 at {services.cloud_url}")
        elif args.developer_url or args.cloud_url:
            raise SystemExit("give both --developer-url and --cloud-url, or neither")
        else:
            _say("Starting P2 (stip-cloud serve) and P1 (stip-developer serve) as separate processes ...")
            services = stack.enter_context(local_services(work))
            _say(f"  P2 at {services.cloud_url}, P1 at {services.developer_url}; logs in {work}")

        llama_dir = make_random_llama(models_dir / RANDOM_LLAMA)
        admin = stack.enter_context(
            DeveloperAdminClient(
                services.developer_url,
                admin_token=services.admin_token,
                transport=httpx.HTTPTransport(verify=verify),
            )
        )
        _say("\nP1 (developer): register, draw keys, transform, push θ′ to P2")
        minilm_dep = _deploy(admin, minilm, services.cloud_url, "all-MiniLM-L6-v2")
        llama_dep = _deploy(admin, llama_dir, services.cloud_url, "random-llama-gqa (RANDOM weights)")

        seen = {"P1 (developer), user channel": Seen(), "P2 (cloud)": Seen()}
        cache = work / "client-cache"
        timings: dict[str, float] = {}
        for dep, task in ((minilm_dep, "embed"), (llama_dep, "generate")):
            credential = admin.issue_credential(dep, name="demo-user").credential
            client = StipClient(
                services.developer_url,
                cloud_url=services.cloud_url,
                deployment_id=dep,
                credential=credential,
                cache_dir=cache,
                developer_transport=Recorder(seen["P1 (developer), user channel"], verify=verify),
                cloud_transport=Recorder(seen["P2 (cloud)"], verify=verify),
            )
            with client:
                if task == "embed":
                    _say("\nP3 (user): private sentence embeddings with all-MiniLM-L6-v2")
                    timings |= run_embedding(client)
                else:
                    _say("\nP3 (user): private generation with random-llama-gqa")
                    timings |= run_generation(client, llama_dir, args.max_new_tokens)
        _report(seen, timings)
    _say("\nAll private results equal plaintext inference." + (" Services stopped." if services.procs else ""))
    return 0


def _token_from_env() -> str:
    if token := os.environ.get("STIP_CLIENT_ADMIN_TOKEN"):
        return token
    if path := os.environ.get("STIP_CLIENT_ADMIN_TOKEN_FILE"):
        return Path(path).read_text().strip()
    raise SystemExit(
        "attaching to running services needs P1's admin token: --admin-token or STIP_CLIENT_ADMIN_TOKEN(_FILE)"
    )


def main(argv: list[str] | None = None) -> int:
    """`stip demo` (and `python -m stip_demo.demo`): arguments parsed by stip_demo.cli."""
    from stip_demo.cli import main as cli_main

    return cli_main(argv)


def run_demo(args: argparse.Namespace) -> int:
    """The demo with its parsed arguments: one clear line on failure, not a traceback."""
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        return run(args)
    except Mismatch as e:
        print(f"\nMISMATCH: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a demo ends with one clear line, not a traceback
        log.debug("demo failed", exc_info=True)
        print(f"\ndemo failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
