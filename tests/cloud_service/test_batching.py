"""Continuous batching on P2 (cloud_service.batching) against the stock models.

Every row of a batched forward must equal what the stock class gives alone: sessions with KV
caches of different lengths, prefills beside decode steps, left-padded stateless requests in
the same batch, on a Llama with GQA and on GPT-2 (learned positions on the user side), and
right-padded BERT forwards of different lengths. Then the scheduler itself, and concurrent
sessions through P2's service equal to stock `generate()`.
"""

import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
import transformers
from fastapi.testclient import TestClient

from cloud_service import service as service_module
from cloud_service.batching import Batcher, BatchItem, Job, batchable, forward_batch
from cloud_service.errors import Unauthorized
from cloud_service.schemas import ForwardOptions
from cloud_service.service import CloudService, Deployment
from shared import wire
from shared.api import INPUTS_EMBEDS, LOGITS, META_DTYPE, Revocations, Revoked
from shared.credentials import Claims, Signer
from shared.families import get_family
from shared.families.gpt2 import WTE
from shared.permutation import permute, unpermute
from shared.runtime import CloudModel
from tests.cloud_service.helpers import DEPLOYMENT, Deployed, decoded, embeds, forward, serving
from tests.shared.encoder_models import tiny_bert
from tests.shared.test_bert import deploy as deploy_bert
from tests.support import TINY_GPT2, TINY_LLAMA, assert_close, deploy_decoder, left_padded, random_causal_lm

GPT2 = dict(TINY_GPT2, bos_token_id=None, eos_token_id=None)
DECODERS = {"llama": (TINY_LLAMA, "model.embed_tokens.weight"), "gpt2": (GPT2, WTE)}


class Protocol:
    """P1's transform, P2's θ′ in a CloudModel, P3's embedding: a decoder through the protocol."""

    def __init__(self, name: str) -> None:
        config, embed_name = DECODERS[name]
        self.family = get_family(config["model_type"])
        self.original = random_causal_lm(config, seed=3)
        _, self.config, self.key, cloud, self.user = deploy_decoder(self.family, self.original, embed_name)
        self.cloud = CloudModel(self.family, self.config, cloud, torch.device("cpu"), torch.float32)

    def x(self, ids: torch.Tensor, offset: int | torch.Tensor = 0) -> torch.Tensor:
        """P3: ids (B, S) -> x·π (B, S, d), learned positions from `offset`."""
        return permute(self.family.embed(self.user, self.config, ids, position_offset=offset), self.key.pi)

    def plain(self, logits: torch.Tensor) -> torch.Tensor:
        return unpermute(logits, self.key.pi_c)

    @torch.no_grad()
    def stock_logits(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        positions = None
        if mask is not None:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return self.original(input_ids=ids, attention_mask=mask, position_ids=positions).logits


@pytest.fixture(scope="module", params=sorted(DECODERS))
def protocol(request: pytest.FixtureRequest) -> Protocol:
    return Protocol(request.param)


def test_sessions_of_different_lengths_decode_together(protocol: Protocol) -> None:
    """Three sessions (pasts 3, 7 and none: a prefill of 5 beside decode steps) and a
    left-padded stateless request, four batched steps: each row as the stock model alone."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 61, (1, n), generator=g) for n in (3, 7)]
    sessions = []
    for ids in prompts:  # prefilled alone, as P2 does when a session starts by itself
        out = protocol.cloud.forward(protocol.x(ids), torch.ones_like(ids), None, last_only=True)
        sessions.append({"ids": ids, "cache": out.cache, "next": protocol.plain(out.output)[:, -1].argmax(-1)})
    late = torch.randint(1, 61, (1, 5), generator=g)  # its prefill joins the batch at step 0
    sessions.append({"ids": late[:, :0], "cache": None, "pending": late})
    free_ids, free_mask = left_padded(2, 4, 61, seed=9)
    for _ in range(4):
        items = []
        for s in sessions:
            new = s.pop("pending", None)
            if new is None:
                new = s["next"].view(1, 1)
            s["new"] = new
            past = s["ids"].shape[1]
            held = torch.ones(1, past, dtype=torch.long) if past else None
            items.append(
                BatchItem(
                    x=protocol.x(new, past), mask=None, cache=s["cache"], held=held, last_only=True, keep_cache=True
                )
            )
        offsets = -(free_mask == 0).sum(-1)  # P3's learned positions for a left-padded batch
        items.append(BatchItem(x=protocol.x(free_ids, offsets), mask=free_mask, last_only=False))
        assert batchable(protocol.cloud, items, 64)
        outs = forward_batch(protocol.cloud, items)
        for s, out in zip(sessions, outs, strict=False):
            s["ids"] = torch.cat([s["ids"], s["new"]], dim=1)
            ref = protocol.stock_logits(s["ids"])[:, -1:]
            assert_close(ref, protocol.plain(out.output))
            assert out.cache.get_seq_length() == s["ids"].shape[1]  # its own positions only, no padding
            s["cache"], s["next"] = out.cache, protocol.plain(out.output)[:, -1].argmax(-1)
        stateless = protocol.plain(outs[-1].output)
        assert stateless.shape == (2, 4, 61) and outs[-1].cache is None
        ref = protocol.stock_logits(free_ids, free_mask)
        assert_close(ref[free_mask.bool()], stateless[free_mask.bool()])
    for s, prompt in zip(sessions[:2], prompts, strict=True):  # greedy tokens as stock generate()
        expected = protocol.original.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False, pad_token_id=0
        )
        assert torch.equal(torch.cat([s["ids"], s["next"].view(1, 1)], dim=1), expected)


def test_positions_past_the_model_run_alone(protocol: Protocol) -> None:
    """A batch whose padded span would pass the position limit is not stacked."""
    ids = torch.randint(1, 61, (1, 10))
    cache = protocol.cloud.forward(protocol.x(ids), torch.ones_like(ids), None).cache
    long = BatchItem(x=protocol.x(ids[:, :1], 10), mask=None, cache=cache, held=torch.ones(1, 10, dtype=torch.long))
    prefill = BatchItem(x=protocol.x(ids), mask=None)
    assert batchable(protocol.cloud, [long, prefill], 20)
    assert not batchable(protocol.cloud, [long, prefill], 19)
    assert not batchable(protocol.cloud, [prefill], 64)  # one request: nothing to stack


@torch.no_grad()
def test_bert_rows_of_different_lengths() -> None:
    model, config = tiny_bert(seed=2)
    family = get_family("bert")
    key, _, user, cloud_model = deploy_bert(model, config)
    cloud = CloudModel(family, config, cloud_model.eval(), torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(4)
    shapes = [(1, 9, None), (2, 4, [4, 2]), (1, 6, None)]  # rows, seq, right-padded lengths
    items, refs = [], []
    for rows, seq, lengths in shapes:
        ids = torch.randint(0, 61, (rows, seq), generator=g)
        mask = None if lengths is None else (torch.arange(seq)[None] < torch.tensor(lengths)[:, None]).long()
        x = permute(family.embed(user, config, ids), key.pi)
        items.append(BatchItem(x=x, mask=mask))
        refs.append(model(input_ids=ids, attention_mask=mask))
    assert batchable(cloud, items, 24)
    for item, ref, out in zip(items, refs, forward_batch(cloud, items), strict=True):
        real = item.mask.bool() if item.mask is not None else torch.ones(item.rows, item.seq, dtype=torch.bool)
        assert_close(ref.last_hidden_state[real], unpermute(out.output, key.pi)[real])
        assert_close(ref.pooler_output, unpermute(out.pooled, key.pi))


# --- the scheduler ---------------------------------------------------------------------------


def test_scheduler_one_step_per_session_and_bounds() -> None:
    seen: list[list[str]] = []
    gate = threading.Event()

    def execute(jobs: list[Job]) -> None:
        gate.wait(5)  # the first batch runs while the rest queue up
        seen.append([j.payload for j in jobs])
        for j in jobs:
            j.future.set_result(j.payload)

    batcher = Batcher(execute, max_rows=3, max_tokens=100, max_wait_s=0.0, idle_s=0.2)
    first = batcher.submit(Job(rows=1, seq=1, session_id="a", payload="a1"))
    time.sleep(0.05)
    futures: list[Future] = [first]
    for payload, sid, rows in [("a2", "a", 1), ("b1", "b", 1), ("c1", None, 2), ("d1", None, 1)]:
        futures.append(batcher.submit(Job(rows=rows, seq=1, session_id=sid, payload=payload)))
    gate.set()
    assert [f.result(5) for f in futures] == ["a1", "a2", "b1", "c1", "d1"]
    # a2 and b1 fit (2 rows); c1 (2 rows) would pass max_rows=3, d1 fits: arrival order kept
    assert seen == [["a1"], ["a2", "b1", "d1"], ["c1"]]
    deadline = time.monotonic() + 5
    while batcher._thread is not None and time.monotonic() < deadline:  # the idle thread ends
        time.sleep(0.05)
    assert batcher._thread is None


def test_scheduler_waits_only_for_as_many_as_last_time() -> None:
    sizes: list[int] = []

    def execute(jobs: list[Job]) -> None:
        sizes.append(len(jobs))
        for j in jobs:
            j.future.set_result(None)

    batcher = Batcher(execute, max_rows=8, max_tokens=100, max_wait_s=10.0, idle_s=0.5)
    start = time.monotonic()
    batcher.submit(Job(rows=1, seq=1, session_id=None, payload=None)).result(5)
    # a lone request never waits for company: far sooner than max_wait_s, however loaded the machine
    assert time.monotonic() - start < batcher.max_wait_s / 2
    assert sizes == [1]


def test_scheduler_stops_expecting_a_session_that_ended() -> None:
    """A new generation's session follows an ended one: without `forget` its second step would
    wait (up to half a batch's run time) for the ended session's next step."""

    def execute(jobs: list[Job]) -> None:
        for j in jobs:
            j.future.set_result(None)

    batcher = Batcher(execute, max_rows=8, max_tokens=100, max_wait_s=10.0, idle_s=5.0)
    batcher.submit(Job(rows=1, seq=1, session_id="old", payload=None)).result(5)
    batcher.submit(Job(rows=1, seq=1, session_id="new", payload=None)).result(5)
    assert batcher._expect == 2  # both were seen in the last two batches
    batcher.forget("old")
    assert batcher._expect == 1
    batcher.forget("never-seen")  # harmless
    assert batcher._expect == 1


# --- through P2's service: concurrent sessions ----------------------------------------------


InService = tuple[CloudService, Deployment, Claims]


@pytest.fixture
def in_service(deployed: TestClient, credential: str) -> InService:
    """P2's service behind `deployed`, its deployment, and the user's claims as the service verified them."""
    service = deployed.app.state.service  # type: ignore[attr-defined]
    dep = service.deployment(DEPLOYMENT)
    return service, dep, service.authorize_user(dep, credential)


def test_concurrent_sessions_equal_stock_generate(
    in_service: InService, v1: Deployed, original: transformers.PreTrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, dep, claims = in_service
    stacked: list[int] = []
    real = service_module.forward_batch

    def spy(model: CloudModel, items: list[BatchItem]) -> list:
        stacked.append(len(items))
        return real(model, items)

    monkeypatch.setattr(service_module, "forward_batch", spy)
    n_new = 8
    prompts = [torch.randint(1, 61, (1, n), generator=torch.Generator().manual_seed(n)) for n in (2, 5, 9)]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def user(i: int) -> None:
        try:
            session = service.create_session(dep, claims).session_id
            ids = prompts[i]
            new = ids
            for _ in range(n_new):
                body = wire.encode(embeds(original, new, v1.pi))
                result = service.forward(dep, body, ForwardOptions(output="last", session_id=session), claims)
                logits = unpermute(wire.decode(result.body)[0][LOGITS], v1.pi_c)
                assert result.session_length == ids.shape[1]
                new = logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, new], dim=1)
            results[i] = ids
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i, prompt in enumerate(prompts):
        expected = original.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, do_sample=False, pad_token_id=0
        )
        assert torch.equal(results[i], expected)
    assert stacked and max(stacked) >= 2  # some steps really ran together


# --- credentials verified once, checked on every use ------------------------------------------


def test_verified_credential_still_expires_and_is_revoked(
    deployed: TestClient, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = deployed.app.state.service  # type: ignore[attr-defined]
    dep = service.deployment(DEPLOYMENT)
    token, claims = signer.issue(subject="carol", deployment_id=DEPLOYMENT, ttl_s=60)
    calls: list[str] = []
    real_verify = service_module.credentials.verify

    def counting(*args: object, **kwargs: object) -> object:
        calls.append("verify")
        return real_verify(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(service_module.credentials, "verify", counting)
    assert service.authorize_user(dep, token) == claims
    assert service.authorize_user(dep, token) == claims
    assert calls == ["verify"]  # the second step skipped the signature check
    now = time.time()
    monkeypatch.setattr(service_module.time, "time", lambda: now + 61)
    with pytest.raises(Unauthorized, match="expired"):
        service.authorize_user(dep, token)
    monkeypatch.setattr(service_module.time, "time", lambda: now)
    service.set_revocations(DEPLOYMENT, Revocations(revoked=[Revoked(jti=claims.jti, expires_at=claims.exp)]))
    with pytest.raises(Unauthorized, match="revoked"):
        service.authorize_user(dep, token)


# --- half-precision transport ----------------------------------------------------------------


def test_half_precision_inputs_change_nothing_on_a_half_precision_p2(
    tmp_path: Path, original: transformers.PreTrainedModel, v1: Deployed, signer: Signer, credential: str
) -> None:
    """P2 in fp16 rounds x·π to fp16 on arrival: x·π sent already in fp16 gives the same logits,
    bit for bit, in half the bytes each way; the answer names P2's dtype for the SDK."""
    ids = torch.randint(1, 61, (2, 5), generator=torch.Generator().manual_seed(2))
    with serving(tmp_path / "data", v1, signer, dtype="float16") as client:
        x = embeds(original, ids, v1.pi)
        full = forward(client, credential, x, output="all")
        half = forward(client, credential, {INPUTS_EMBEDS: x[INPUTS_EMBEDS].half()}, output="all")
        (a, meta), (b, _) = decoded(full), decoded(half)
    assert meta[META_DTYPE] == "float16" and b[LOGITS].dtype == torch.float16
    assert torch.equal(a[LOGITS], b[LOGITS].float())
    assert len(half.content) < 0.6 * len(full.content)


def test_a_failed_batch_is_rerun_request_by_request(
    in_service: InService, v1: Deployed, original: transformers.PreTrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the batched forward raises, each request runs alone: right answers, sessions intact."""
    service, dep, claims = in_service

    def x_of(ids: torch.Tensor) -> torch.Tensor:
        return embeds(original, ids, v1.pi)[INPUTS_EMBEDS]

    prompts = [torch.randint(1, 61, (1, n), generator=torch.Generator().manual_seed(n)) for n in (3, 6)]
    sessions = [service.create_session(dep, claims).session_id for _ in prompts]
    for sid, ids in zip(sessions, prompts, strict=True):  # prefills, one at a time
        service.forward(
            dep, wire.encode({INPUTS_EMBEDS: x_of(ids)}), ForwardOptions(output="last", session_id=sid), claims
        )

    def failing(model: CloudModel, items: list[BatchItem]) -> list:
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(service_module, "forward_batch", failing)
    nxt = torch.tensor([[7]])
    jobs = [
        Job(
            rows=1,
            seq=1,
            session_id=sid,
            payload=service_module._Request(
                x=x_of(nxt), mask=None, options=ForwardOptions(output="last", session_id=sid), claims=claims, start=0.0
            ),
        )
        for sid in sessions
    ]
    service._run_batch(dep, jobs)
    for job, ids in zip(jobs, prompts, strict=True):
        result = job.future.result(0)
        assert result.session_length == ids.shape[1] + 1
        logits = unpermute(wire.decode(result.body)[0][LOGITS], v1.pi_c)
        with torch.no_grad():
            ref = original(input_ids=torch.cat([ids, nxt], dim=1)).logits[:, -1:]
        assert_close(ref, logits)
