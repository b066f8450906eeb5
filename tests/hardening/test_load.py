"""Load at small scale: benchmarks/load.py's machinery against P2 and P1 as real processes.

32 concurrent SDK clients (16 generate on a random Llama, 16 embed with all-MiniLM-L6-v2) share
100 requests, against a P2 started with only 12 session slots and a 3 s idle TTL, so some
generations are refused with 429 on purpose. Asserted: the only errors are those 429s, surfaced
by the SDK as `RateLimited`; every result that came back equals plaintext inference on the
original model; every session a client opened got its DELETE (answered 410 where P2 had expired it
first: on a loaded machine a step can idle past the TTL, and the SDK re-prefills); with all slots taken by
vanished clients one more generation gets `RateLimited`, the abandoned sessions expire, the
live-session gauge returns to 0 and generation works again; P2's resident memory after expiry
is within RSS_TOLERANCE_MIB of its level before the load.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
import transformers

from benchmarks.load import (
    Options,
    Report,
    cluster,
    format_report,
    make_requests,
    percentile,
    run_benchmark,
    split_clients,
)
from stip_demo.models import make_random_llama

pytestmark = pytest.mark.timeout(300)

OPTIONS = Options(
    clients=32,
    requests=100,
    generate_share=0.5,
    max_new_tokens=8,
    embed_batch=4,
    max_sessions=12,  # fewer than the 16 generating clients: some 429s are intended
    session_ttl_s=3,
    abandon=12,  # fills every slot after the load: the next generation must get a 429
    plaintext_threads=False,
    deadline_s=120.0,
)

# P2's VmRSS may stay this far above its level before the load once the load's sessions are
# deleted and the abandoned ones expired. Measured on the 2-core development machine: +30 to +60
# MiB after the first load (the allocator arenas and OpenMP teams of the forward threads, two per
# deployment, keep their high-water mark), then +0 to +6 MiB per further load of the same size:
# flat, not a leak. With anyio's shared pool of 40 threads instead (STIP_CLOUD_FORWARD_THREADS=40)
# the same load grows P2 by about 200 MiB, and more with each further load; 128 MiB sits between.
RSS_TOLERANCE_MIB = 128


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Report]:
    work = tmp_path_factory.mktemp("load")
    with cluster(work, OPTIONS) as c:
        result = run_benchmark(OPTIONS, c)
    print(format_report(result))  # shown with -s, and on failure
    yield result


def test_the_only_errors_are_intended_429s_surfaced_as_rate_limited(report: Report) -> None:
    p = report.protocol
    assert report.unexpected_errors == {}, format_report(report)
    assert set(p.errors) <= {"RateLimited 429"}
    assert p.kinds["embed"].ok == p.kinds["embed"].requests == 50  # embeds open no session: never refused
    assert p.kinds["generate"].requests == 50
    refused = p.errors.get("RateLimited 429", 0)
    assert p.kinds["generate"].ok + refused == 50
    assert p.kinds["generate"].ok >= 10, "the load must do real work, not only collect 429s"


def test_every_result_equals_plaintext(report: Report) -> None:
    assert report.protocol.mismatches == 0, format_report(report)


def test_the_sdk_deletes_every_session_it_opens(report: Report) -> None:
    m = report.memory
    assert m.sessions_opened is not None and m.sessions_opened >= report.protocol.kinds["generate"].ok
    # every session gets its DELETE: answered 204, or 410 when it had idled past the 3 s TTL first
    # (a generation step waiting that long on the loaded machine; the SDK then re-prefilled it)
    assert m.sessions_expired_first is not None
    assert m.sessions_deleted + m.sessions_expired_first == m.sessions_opened, format_report(report)
    assert m.sessions_after_load == 0
    assert m.sessions_peak is not None and m.sessions_peak <= OPTIONS.max_sessions


def test_full_slots_refuse_with_rate_limited_then_expire_and_recover(report: Report) -> None:
    m = report.memory
    # all slots taken at once: the sessions open together after the slow setup (credentials, bundles),
    # so the oldest is far younger than the idle TTL when the last one is open
    assert m.sessions_abandoned == OPTIONS.max_sessions, f"opened in {m.abandon_s} s, TTL {OPTIONS.session_ttl_s} s"
    assert report.saturation == "RateLimited 429"
    assert m.sessions_after_expiry == 0
    # the idle TTL, plus at most two sweeps of the expiry task (every max(1, ttl/4) s), plus slack
    assert m.expiry_s is not None and OPTIONS.session_ttl_s - 0.5 <= m.expiry_s <= OPTIONS.session_ttl_s + 2 + 3
    assert report.recovered is True


def test_p2_memory_returns_near_its_level_before_the_load(report: Report) -> None:
    m = report.memory
    assert m.before_load is not None and m.after_expiry is not None and m.peak is not None
    assert m.after_expiry - m.before_load <= RSS_TOLERANCE_MIB, format_report(report)
    assert m.threads_after is not None and m.threads_before is not None
    assert m.threads_after - m.threads_before <= 16  # 2 forward threads per deployment, their OpenMP teams


def test_the_workload_is_fixed_and_mixed(tmp_path: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(make_random_llama(tmp_path / "llama"))
    requests = make_requests(OPTIONS, tok)
    assert requests == make_requests(OPTIONS, tok)  # seeded: the same requests every run
    assert sum(r.kind == "generate" for r in requests) == 50
    assert all(4 <= len(r.prompt_ids) <= 12 for r in requests if r.kind == "generate")
    assert all(len(r.sentences) == 4 for r in requests if r.kind == "embed")
    assert split_clients(OPTIONS, requests) == {"generate": 16, "embed": 16}
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert percentile([], 50) is None
