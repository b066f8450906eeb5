"""TLS end to end: P2 and P1 as real processes serving HTTPS with certificates of a private CA.

A throwaway CA and a server certificate for 127.0.0.1/localhost are made with `cryptography`.
P1 pushes θ′ to P2 over HTTPS, verifying P2 with STIP_DEVELOPER_CA_BUNDLE; the SDK verifies both
services with the CA (`verify=` or STIP_CLIENT_VERIFY); the admin client with `ca_bundle`.
Refusals: a client without the CA (the default trust store), P1 without the CA, and plain HTTP
to a TLS port each fail at once with a transport error that names the cause, and the services
keep serving.
"""

import datetime
import ipaddress
import logging
import os
import secrets
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import transformers
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from developer_service.client import ClientError, DeveloperAdminClient
from developer_service.schemas import CreateDeployment, RegisterModel
from developer_service.service import DeveloperService
from developer_service.settings import load_settings
from shared.pooling import mean_pool, normalize
from stip_demo.models import make_random_llama, minilm_path
from tests.e2e.processes import CLOUD, DEVELOPER, USER, fill, free_port, start, stop, wait_ready
from user_client import StipClient, TransportError

pytestmark = pytest.mark.timeout(300)

PROMPT = "private inference over an encrypted channel"
NEW_TOKENS = 16
SENTENCES = ["A man is riding a horse.", "TLS protects the channel; STIP protects the data.", "Short."]


# --- a private CA --------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA certificate (PEM): what clients trust
    cert: Path  # the server certificate for 127.0.0.1 and localhost, signed by the CA
    key: Path  # its private key (0600)


def make_certs(directory: Path) -> Certs:
    """A one-day EC P-256 CA and a server certificate with SANs 127.0.0.1 and localhost."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "STIP test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    certs = Certs(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    certs.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    certs.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    certs.key.touch(mode=0o600)
    certs.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return certs


# --- the cluster over HTTPS ----------------------------------------------------------------


@dataclass
class TlsCluster:
    work: Path
    certs: Certs
    cloud_url: str  # https://127.0.0.1:<port>
    developer_url: str
    admin: DeveloperAdminClient
    admin_token: str
    push_token: str
    deployments: dict[str, str]  # name -> deployment id
    model_dirs: dict[str, Path]
    procs: dict[str, subprocess.Popen]

    @property
    def trusted(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.certs.ca))

    def credential(self, name: str) -> str:
        return self.admin.issue_credential(self.deployments[name], name=f"tls-{name}").credential

    def client(self, name: str, *, developer_url: str | None = None, **kwargs: object) -> StipClient:
        options: dict[str, object] = {"retries": 1, "backoff": 0.05} | kwargs
        return StipClient(
            developer_url or self.developer_url,
            deployment_id=self.deployments[name],
            credential=self.credential(name),
            cache_dir=self.work / f"cache-{secrets.token_hex(4)}",
            **options,  # type: ignore[arg-type]
        )


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsCluster]:
    work = tmp_path_factory.mktemp("tls")
    certs = make_certs(work / "pki")
    admin_token, push_token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    cloud_port, dev_port = free_port(), free_port()
    server_tls = {"TLS_CERTFILE": str(certs.cert), "TLS_KEYFILE": str(certs.key)}
    env_cloud = {"STIP_CLOUD_PUSH_TOKEN": push_token} | {f"STIP_CLOUD_{k}": v for k, v in server_tls.items()}
    env_dev = {
        "STIP_DEVELOPER_ADMIN_TOKEN": admin_token,
        "STIP_DEVELOPER_PUSH_TOKEN": push_token,
        "STIP_DEVELOPER_CA_BUNDLE": str(certs.ca),  # P1 verifies P2 with it
    } | {f"STIP_DEVELOPER_{k}": v for k, v in server_tls.items()}
    loopback = {"host": "127.0.0.1"}
    procs = {
        "cloud": start(CLOUD, env_cloud, work / "cloud.log", **loopback, port=cloud_port, data_dir=work / "cloud"),
        "developer": start(DEVELOPER, env_dev, work / "dev.log", **loopback, port=dev_port, data_dir=work / "dev"),
    }
    cluster = TlsCluster(
        work=work,
        certs=certs,
        cloud_url=f"https://127.0.0.1:{cloud_port}",
        developer_url=f"https://127.0.0.1:{dev_port}",
        admin=DeveloperAdminClient(f"https://127.0.0.1:{dev_port}", admin_token=admin_token, ca_bundle=certs.ca),
        admin_token=admin_token,
        push_token=push_token,
        deployments={},
        model_dirs={"llama": make_random_llama(work / "models" / "llama"), "minilm": minilm_path()},
        procs=procs,
    )
    try:
        wait_ready(cluster.cloud_url, procs["cloud"], verify=cluster.trusted)
        wait_ready(cluster.developer_url, procs["developer"], verify=cluster.trusted)
        for name, path in cluster.model_dirs.items():
            model = cluster.admin.register(path, name=name)
            dep = cluster.admin.deploy(model.model_id, cloud_url=cluster.cloud_url)  # pushed over HTTPS
            status = cluster.admin.wait(dep.deployment_id, timeout_s=240)
            assert status.status == "active", status.error
            cluster.deployments[name] = dep.deployment_id
        yield cluster
    finally:
        # Clients first, then P1 (its pooled connection to P2 goes with it), then P2: uvicorn's
        # graceful shutdown otherwise waits up to 30 s on each idle keep-alive TLS connection,
        # whose peer never answers the server's TLS close_notify.
        cluster.admin.close()
        stop(procs["developer"])
        stop(procs["cloud"])


def _assert_still_serving(tls: TlsCluster) -> None:
    for url in (tls.cloud_url, tls.developer_url):
        assert httpx.get(f"{url}/health/ready", verify=tls.trusted, timeout=10).status_code == 200


# --- what works over HTTPS -------------------------------------------------------------------


def test_services_speak_https_and_p1_pushed_over_it(tls: TlsCluster) -> None:
    with httpx.Client(verify=tls.trusted, timeout=10) as http:
        for name, dep in tls.deployments.items():
            info = http.get(f"{tls.cloud_url}/v1/deployments/{dep}").json()
            assert info["key_version"] == 1 and info["status"] == "active", name
        metrics = http.get(f"{tls.cloud_url}/metrics").text
        assert 'stip_cloud_pushes_total{outcome="activated"} 2.0' in metrics
        assert "https://" in tls.admin.deployment(tls.deployments["llama"]).cloud_url


def test_greedy_generation_over_https_equals_generate(tls: TlsCluster) -> None:
    model_dir = tls.model_dirs["llama"]
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = [int(i) for i in tok(PROMPT, add_special_tokens=False)["input_ids"]]
    with tls.client("llama", verify=str(tls.certs.ca)) as client:
        private = client.generate_ids(ids, max_new_tokens=NEW_TOKENS, temperature=0.0, eos=False)
        assert client.cloud_url is not None and client.cloud_url.startswith("https://127.0.0.1:")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )
    assert private == out[0, len(ids) :].tolist()
    assert len(set(private)) > 3


def test_embeddings_over_https_with_the_ca_from_the_environment(
    tls: TlsCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STIP_CLIENT_VERIFY", str(tls.certs.ca))  # the SDK's environment twin of verify=
    with tls.client("minilm") as client:
        private = client.embed(SENTENCES)
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    model = transformers.AutoModel.from_pretrained(minilm_path()).eval()
    enc = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        plain = normalize(mean_pool(model(**enc).last_hidden_state, enc["attention_mask"]))
    cosine = torch.nn.functional.cosine_similarity(private, plain, dim=-1)
    assert float(cosine.min()) >= 0.99999, cosine


def test_demo_attached_over_https(tls: TlsCluster, tmp_path: Path) -> None:
    """`stip demo --ca-bundle` (the docker compose user container) against the HTTPS services."""
    cmd = fill(USER, developer_url=tls.developer_url, cloud_url=tls.cloud_url, models_dir=tmp_path / "models")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STIP_", "SSL_CERT_"))}
    result = subprocess.run(
        [*cmd, "--ca-bundle", str(tls.certs.ca), "--max-new-tokens", "8"],
        env=env | {"STIP_CLIENT_ADMIN_TOKEN": tls.admin_token},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "All private results equal plaintext inference" in result.stdout


# --- what must fail, and how ------------------------------------------------------------------


def test_sdk_without_the_ca_fails_at_once_naming_the_certificate(
    tls: TlsCluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("STIP_CLIENT_VERIFY", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    client = tls.client("llama", retries=3, backoff=2.0)  # the 3 retries would sleep >= 1 + 2 + 4 s: none happen
    start_s = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="stip.client"),
        client,
        pytest.raises(TransportError, match="TLS certificate is not trusted") as info,
    ):
        client.generate("hello", max_new_tokens=2)
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]  # not one retry
    assert time.monotonic() - start_s < 6.0  # below the retries' least total sleep, however loaded the machine
    assert "CERTIFICATE_VERIFY_FAILED" in info.value.message and "verify=" in info.value.message
    # P2 directly, with the bundle of a trusting client: the same refusal
    with tls.client("llama", verify=str(tls.certs.ca)) as good:
        bundle_cache = good.cache.root
        good.generate("hello", max_new_tokens=1)
    untrusting = StipClient(
        tls.developer_url,
        deployment_id=tls.deployments["llama"],
        credential=tls.credential("llama"),
        cache_dir=bundle_cache,  # the bundle is cached: only P2 is contacted
        retries=0,
    )
    with untrusting, pytest.raises(TransportError, match=r"P2 POST .*TLS certificate is not trusted"):
        untrusting.generate("hello", max_new_tokens=1)
    _assert_still_serving(tls)


def test_admin_client_without_the_ca_is_refused(tls: TlsCluster) -> None:
    with (
        DeveloperAdminClient(tls.developer_url, admin_token="irrelevant") as admin,
        pytest.raises(ClientError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        admin.models()


def test_p1_without_the_ca_bundle_refuses_to_push_and_says_why(
    tls: TlsCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """P1's pusher verifies P2: without STIP_DEVELOPER_CA_BUNDLE the deployment fails, unretried."""
    for name in ("STIP_DEVELOPER_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(
        data_dir=tmp_path / "p1",
        admin_token="a" * 16,
        push_token=tls.push_token,
        push_attempts=3,
        push_retry_backoff_s=30.0,  # a retried failure would take a minute
    )
    assert settings.ca_bundle is None
    service = DeveloperService(settings)
    try:
        service.start()
        model, _ = service.register_model(RegisterModel(path=str(tls.model_dirs["llama"]), name="llama"))
        start_s = time.monotonic()
        dep = service.create_deployment(CreateDeployment(model_id=model.model_id, cloud_url=tls.cloud_url))
        status = service.wait(dep.deployment_id, timeout_s=60)
        assert time.monotonic() - start_s < 30
    finally:
        service.close()
    assert status.status == "failed"
    assert status.error is not None
    assert "TLS certificate" in status.error and "STIP_DEVELOPER_CA_BUNDLE" in status.error
    with httpx.Client(verify=tls.trusted) as http:  # P2 never activated anything for it
        assert http.get(f"{tls.cloud_url}/v1/deployments/{dep.deployment_id}").status_code == 404


@pytest.mark.parametrize("party", ["cloud", "developer"])
def test_plain_http_to_a_tls_port_fails(tls: TlsCluster, party: str) -> None:
    url = (tls.cloud_url if party == "cloud" else tls.developer_url).replace("https://", "http://")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health/live", timeout=5)
    if party == "developer":  # the SDK turns it into its own TransportError
        with tls.client("llama", developer_url=url, verify=str(tls.certs.ca)) as client, pytest.raises(TransportError):
            client.generate("hello", max_new_tokens=1)
    _assert_still_serving(tls)


def test_verify_accepts_a_path_a_directory_or_a_context_and_refuses_a_missing_file(tls: TlsCluster) -> None:
    from stip_http.tls import tls_verify

    assert isinstance(tls_verify(tls.certs.ca), ssl.SSLContext)  # a pathlib.Path, not only a str
    assert isinstance(tls_verify(str(tls.certs.ca.parent)), ssl.SSLContext)  # a CA directory (capath)
    assert tls_verify(False) is False and tls_verify(tls.trusted) is not None
    with pytest.raises(ValueError, match="cannot load the CA bundle"):
        tls_verify(tls.work / "missing.pem")
    with tls.client("llama", verify=tls.certs.ca) as client:  # StipClient(verify=Path)
        assert len(client.generate_ids([2023, 2003], max_new_tokens=2, eos=False)) == 2
