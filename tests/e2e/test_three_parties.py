"""End to end: P2 and P1 as real processes on loopback (the commands the containers run),
P3 through the SDK, every byte P2 receives recorded by a proxy.

Checks: MiniLM embeddings equal sentence-transformers'; greedy generation on a randomised
Llama (GQA, tied head) and GPT-2 equals the original model's `generate()` token for token; the
KV-cache path equals the no-cache path; nothing P2 received holds a permutation, the embedding
table or a token id; decode steps authenticate with their session's short token; key rotation
under traffic; restarts of P2 and P1; `stip demo` attached to the running services; no token in
the services' logs.
"""

import re
import secrets
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
import transformers
from safetensors.torch import load_file

from developer_service.client import DeveloperAdminClient
from shared.api import CredentialIssued
from shared.keys import DeveloperKey
from shared.permutation import permute
from stip_demo.demo import SENTENCES as DEMO_SENTENCES
from stip_demo.models import make_random_gpt2, make_random_llama, minilm_path
from tests.e2e.processes import CLOUD, DEVELOPER, USER, fill, free_port, start, stop, wait_for, wait_ready
from tests.e2e.proxy import RecordingProxy, int_patterns
from tests.e2e.reference import stock_generate
from tests.vllm.engine import P2_READY_S
from user_client import AuthError, StipClient

# the demo's sentences, a very short and a long one: padding in one batch
SENTENCES = [
    *DEMO_SENTENCES,
    "Short.",
    "A considerably longer sentence, with punctuation, numbers like 1763 and several clauses, to test padding.",
]
PROMPT = "private inference on permuted weights"
NEW_TOKENS = 32
SERVICES = {"cloud": (CLOUD, "cloud"), "developer": (DEVELOPER, "dev")}  # which: (command, log and data dir name)


@dataclass
class Cluster:
    work: Path
    admin: DeveloperAdminClient
    developer_url: str
    proxy: RecordingProxy
    ports: dict[str, int]  # "cloud" (P2, behind the proxy), "developer" (P1)
    envs: dict[str, dict[str, str]]  # the same keys: each service's environment
    procs: dict[str, subprocess.Popen]
    deployments: dict[str, str]  # name -> deployment id
    model_dirs: dict[str, Path]
    issued: list[str] = field(default_factory=list)  # every user credential handed out

    def issue(self, name: str, user: str) -> CredentialIssued:
        issued = self.admin.issue_credential(self.deployments[name], name=user)
        self.issued.append(issued.credential)
        return issued

    @property
    def cloud_url(self) -> str:  # what P1 and P3 use: the recording proxy in front of P2
        return f"http://127.0.0.1:{self.proxy.port}"

    def client(self, name: str, cache: str = "cache", **kwargs: object) -> StipClient:
        credential = self.issue(name, f"e2e-{name}").credential
        return StipClient(
            self.developer_url,
            deployment_id=self.deployments[name],
            credential=credential,
            cache_dir=self.work / cache,
            **kwargs,  # type: ignore[arg-type]
        )

    def developer_key(self, name: str) -> DeveloperKey:
        dep = self.admin.deployment(self.deployments[name])
        return DeveloperKey.load(
            self.work
            / "dev"
            / "deployments"
            / dep.deployment_id
            / f"v{dep.key_version}"
            / "developer"
            / "key.safetensors"
        )

    def start(self, which: str) -> None:
        """Start P2 (`which="cloud"`) or P1 (`"developer"`) and wait until it is ready."""
        template, name = SERVICES[which]
        port = self.ports[which]
        proc = start(
            template,
            self.envs[which],
            self.work / f"{name}.log",
            host="127.0.0.1",
            port=port,
            data_dir=self.work / name,
        )
        self.procs[which] = proc
        wait_ready(f"http://127.0.0.1:{port}", proc, P2_READY_S if which == "cloud" else 180)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("e2e")
    admin_token, push_token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    cloud_port, dev_port = free_port(), free_port()
    models = {
        "minilm": minilm_path(),
        "llama": make_random_llama(work / "models" / "llama"),
        "gpt2": make_random_gpt2(work / "models" / "gpt2"),
    }
    with RecordingProxy(cloud_port) as proxy:
        c = Cluster(
            work=work,
            admin=DeveloperAdminClient(f"http://127.0.0.1:{dev_port}", admin_token=admin_token),
            developer_url=f"http://127.0.0.1:{dev_port}",
            proxy=proxy,
            ports={"cloud": cloud_port, "developer": dev_port},
            envs={
                "cloud": {"STIP_CLOUD_PUSH_TOKEN": push_token, "STIP_CLOUD_LOG_LEVEL": "DEBUG"},
                "developer": {
                    "STIP_DEVELOPER_ADMIN_TOKEN": admin_token,
                    "STIP_DEVELOPER_PUSH_TOKEN": push_token,
                    "STIP_DEVELOPER_LOG_LEVEL": "DEBUG",
                },
            },
            procs={},
            deployments={},
            model_dirs=models,
        )
        c.start("cloud")
        c.start("developer")
        try:
            for name, path in models.items():
                dep = c.admin.deploy(c.admin.register(path, name=name).model_id, cloud_url=c.cloud_url)
                status = c.admin.wait(dep.deployment_id, timeout_s=300)
                assert status.status == "active", status.error
                c.deployments[name] = dep.deployment_id
            yield c
        finally:
            for proc in c.procs.values():
                stop(proc)
            c.admin.close()


def test_embeddings_equal_sentence_transformers(cluster: Cluster) -> None:
    from sentence_transformers import SentenceTransformer

    with cluster.client("minilm") as client:
        private = client.embed(SENTENCES)
    reference = torch.from_numpy(SentenceTransformer(str(minilm_path()), device="cpu").encode(SENTENCES))
    cosine = torch.nn.functional.cosine_similarity(private, reference, dim=-1)
    assert float(cosine.min()) >= 0.99999, cosine


def _prompt_ids(model_dir: Path) -> list[int]:
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    return [int(i) for i in tok(PROMPT, add_special_tokens=False)["input_ids"]]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_greedy_generation_equals_generate(cluster: Cluster, name: str) -> None:
    model_dir = cluster.model_dirs[name]
    ids = _prompt_ids(model_dir)
    with cluster.client(name) as client:
        private = client.generate_ids(ids, max_new_tokens=NEW_TOKENS, temperature=0.0, eos=False)
    assert private == stock_generate(model_dir, ids, NEW_TOKENS)
    assert len(set(private)) > 3  # a real continuation, not one token repeated


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_session_cache_path_equals_the_no_cache_path(cluster: Cluster, name: str) -> None:
    ids = _prompt_ids(cluster.model_dirs[name])
    with cluster.client(name) as client:
        full = client.forward(torch.tensor([ids]))  # stateless, all positions
        with client.session() as session:
            steps = [client.forward(torch.tensor([ids[:3]]), session=session)]
            for i in range(3, len(ids)):
                steps.append(client.forward(torch.tensor([ids[i : i + 1]]), session=session))
    cached = torch.cat(steps, dim=1)
    assert cached.shape == full.shape
    assert (cached - full).abs().max() <= 1e-4


def test_p2_never_receives_a_permutation_the_embedding_or_token_ids(cluster: Cluster) -> None:
    # traffic of this test, on top of the pushes and the other tests' traffic
    ids = _prompt_ids(cluster.model_dirs["llama"])
    with cluster.client("llama", cache="leak-cache") as client:
        client.generate_ids(ids, max_new_tokens=4, eos=False)
        bundle_dir = client.bundle.path
    received = cluster.proxy.received
    assert len(received) > 10_000_000  # the pushes went through the proxy

    # positive control: the recording does hold x·π for this prompt, byte for byte
    key = cluster.developer_key("llama")
    embedding = load_file(str(bundle_dir / "embedding.safetensors"))["model.embed_tokens.weight"]
    x_pi = permute(embedding[torch.tensor(ids)], key.pi)
    assert x_pi.numpy().tobytes() in received

    forbidden: list[tuple[str, bytes]] = []
    for name in cluster.deployments:
        key = cluster.developer_key(name)
        forbidden += [(f"{name} pi", p) for p in int_patterns(key.pi)]
        forbidden += [(f"{name} pi_c[:64]", p) for p in int_patterns(key.pi_c[:64])]
        forbidden += [(f"{name} layer-0 ffn", p) for p in int_patterns(key.layers[0].ffn)]
    forbidden += [("prompt token ids", p) for p in int_patterns(torch.tensor(ids))]
    forbidden += [(f"embedding row {t}", embedding[t].numpy().tobytes()) for t in ids]
    forbidden.append(("embedding table head", embedding[:4].numpy().tobytes()))
    minilm = load_file(str(minilm_path() / "model.safetensors"))
    forbidden.append(("MiniLM word embeddings", minilm["embeddings.word_embeddings.weight"][:4].numpy().tobytes()))
    forbidden.append(("MiniLM positions", minilm["embeddings.position_embeddings.weight"][:4].numpy().tobytes()))
    leaks = [what for what, pattern in forbidden if pattern in received]
    assert leaks == []
    # nor any tensor of the embedding module or of the key under its name (safetensors header keys)
    names = [
        b"model.embed_tokens.weight",
        b"embeddings.word_embeddings",
        b"embeddings.position_embeddings",
        b"embeddings.token_type_embeddings",
        b"embeddings.LayerNorm",
        b"transformer.wte",
        b'"pi"',
        b'"pi_c"',
    ]
    assert [n for n in names if n in received] == []


def test_rotation_under_traffic(cluster: Cluster) -> None:
    name = "llama"
    ids = _prompt_ids(cluster.model_dirs[name])
    before = cluster.admin.deployment(cluster.deployments[name]).key_version
    errors: list[BaseException] = []
    done = threading.Event()
    count = [0]

    with cluster.client(name, cache="rotation-cache") as client:
        expected = client.generate_ids(ids, max_new_tokens=6, eos=False)
        old_version = client.key_version

        def traffic() -> None:
            while not done.is_set():
                try:
                    assert client.generate_ids(ids, max_new_tokens=6, eos=False) == expected
                    count[0] += 1
                except BaseException as e:  # any failure other than the handled KeyOutdated
                    errors.append(e)
                    return

        worker = threading.Thread(target=traffic)
        worker.start()
        cluster.admin.rotate(cluster.deployments[name])
        status = cluster.admin.wait(cluster.deployments[name], timeout_s=300)
        # a few generations under the new key: two more after the client refetched (or a failure)
        wait_for(lambda: bool(errors) or client.key_version == before + 1, 120, "the client to refetch")
        refetched = count[0]
        wait_for(lambda: bool(errors) or count[0] >= refetched + 2, 120, "generations under the new key")
        done.set()
        worker.join(60)
        assert errors == []
        assert status.status == "active" and status.key_version == before + 1
        assert client.key_version == before + 1 != old_version  # the client refetched
        assert count[0] > 0

        # a request permuted with the old key is refused with the clear error code
        x = torch.zeros(1, 1, 128)
        from shared.wire import encode

        r = httpx.post(
            f"{cluster.cloud_url}/v1/deployments/{cluster.deployments[name]}/forward",
            content=encode({"inputs_embeds": x}),
            headers={
                "Authorization": f"Bearer {client._credential.get_secret_value()}",
                "X-Stip-Key-Version": str(old_version),
                "Content-Type": "application/octet-stream",
            },
        )
        assert r.status_code == 409 and r.json()["error"]["code"] == "key_outdated"


def test_restart_of_p2_then_p1_keeps_everything(cluster: Cluster) -> None:
    ids = _prompt_ids(cluster.model_dirs["gpt2"])
    with cluster.client("gpt2", cache="restart-cache") as client:
        before = client.generate_ids(ids, max_new_tokens=8, eos=False)
        stop(cluster.procs.pop("cloud"))
        cluster.start("cloud")
        assert client.generate_ids(ids, max_new_tokens=8, eos=False) == before
        for dep in cluster.deployments.values():  # P2 reloaded every deployment, not only this one
            assert httpx.get(f"{cluster.cloud_url}/v1/deployments/{dep}").json()["status"] == "active"
        stop(cluster.procs.pop("developer"))
        cluster.start("developer")
        statuses = {d.deployment_id: d for d in cluster.admin.deployments()}
        assert set(cluster.deployments.values()) <= set(statuses)
        assert all(statuses[d].status == "active" for d in cluster.deployments.values())
        # the credential issued before the restart still fetches the bundle (fresh cache)
        fresh = StipClient(
            cluster.developer_url,
            deployment_id=client.deployment_id,
            credential=client._credential,
            cache_dir=cluster.work / "after-restart",
        )
        with fresh:
            assert fresh.generate_ids(ids, max_new_tokens=8, eos=False) == before


def test_a_revocation_on_p1_is_refused_by_p2(cluster: Cluster) -> None:
    """P2 checks credentials offline; P1 sends it the revoked ones, and P2 keeps them across a restart."""
    ids = _prompt_ids(cluster.model_dirs["llama"])
    dep = cluster.deployments["llama"]
    issued = cluster.issue("llama", "e2e-revoked")
    client = StipClient(
        cluster.developer_url, deployment_id=dep, credential=issued.credential, cache_dir=cluster.work / "revoked"
    )
    with client, cluster.client("llama", cache="not-revoked") as other:
        client.forward([ids])  # the bundle is cached: from here on only P2 is asked
        assert cluster.admin.revoke_credential(dep, issued.user_id).cloud_synced is True
        with pytest.raises(AuthError, match="revoked"):
            client.forward([ids])
        stop(cluster.procs.pop("cloud"))
        cluster.start("cloud")
        with pytest.raises(AuthError, match="revoked"):
            client.forward([ids])
        assert other.forward([ids]).shape[1] == len(ids)  # everyone else is served


def test_the_user_container_command_runs_the_demo_against_the_services(cluster: Cluster) -> None:
    cmd = fill(
        USER, developer_url=cluster.developer_url, cloud_url=cluster.cloud_url, models_dir=cluster.work / "demo-models"
    )
    env = {"STIP_CLIENT_ADMIN_TOKEN": cluster.envs["developer"]["STIP_DEVELOPER_ADMIN_TOKEN"], "HF_HUB_OFFLINE": "1"}
    import os

    result = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "All private results equal plaintext inference" in result.stdout
    assert "Services stopped" not in result.stdout  # it attached to the services: it stopped nothing
    assert "min cosine to plaintext" in result.stdout and "32/32 equal to plaintext" in result.stdout


STEP_HEAD = re.compile(rb"POST /v1/deployments/[^/ ]+/forward\?[^ ]*session_id=[^ ]* HTTP/1\.1\r\n(.*?)\r\n\r\n", re.S)
BEARER = re.compile(rb"^authorization: Bearer (\S+)\r?$", re.I | re.M)


def _step_tokens(received: bytes) -> list[str]:
    """The bearer token of every session step P2 received (a session token or a credential)."""
    return [m.group(1).decode() for head in STEP_HEAD.findall(received) if (m := BEARER.search(head))]


def test_decode_steps_send_the_session_token_not_the_credential(cluster: Cluster) -> None:
    ids = _prompt_ids(cluster.model_dirs["llama"])
    with cluster.client("llama", cache="session-token") as client:
        before = Counter(_step_tokens(cluster.proxy.received))
        client.generate_ids(ids, max_new_tokens=8, eos=False)
        sent = Counter(_step_tokens(cluster.proxy.received)) - before
        ((token, steps),) = sent.items()  # one session, one token
        assert steps == 8  # the prompt, then one step per new token but the last
        assert len(token) == 22 and "." not in token  # 16 random bytes; a credential has two dots
        assert token not in client._credential.get_secret_value()


def test_no_token_or_credential_in_the_services_logs(cluster: Cluster) -> None:
    """Last in the module: the DEBUG logs of everything above (pushes, rotations, restarts,
    revocations, refused calls) name no admin token, push token or user credential."""
    logs = {name: (cluster.work / name).read_text(errors="replace") for name in ("cloud.log", "dev.log")}
    assert all(len(text) > 1000 for text in logs.values())  # the services did log, at DEBUG
    dev_env = cluster.envs["developer"]
    secrets_ = [dev_env["STIP_DEVELOPER_ADMIN_TOKEN"], dev_env["STIP_DEVELOPER_PUSH_TOKEN"]]
    assert len(cluster.issued) >= 5
    session_tokens = {t for t in _step_tokens(cluster.proxy.received) if "." not in t}
    assert len(session_tokens) >= 5  # every generation above opened a session and sent its token
    for name, text in logs.items():
        for secret in secrets_ + cluster.issued:
            assert secret not in text, f"{name} holds a token"
            assert secret.rpartition(".")[2] not in text, f"{name} holds a credential's signature"
        for token in session_tokens:
            assert token not in text, f"{name} holds a session token"
