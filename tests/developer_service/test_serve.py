"""`stip-developer serve` as the container runs it: a real process, real sockets, a fake P2 server."""

import hashlib
import io
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from developer_service.cli import main
from shared import api
from shared.wire import decode
from tests.developer_service.conftest import ADMIN, PUSH
from tests.e2e.processes import DEVELOPER, free_port, service, wait_ready


def fake_cloud_app(received: list[dict]) -> FastAPI:
    app = FastAPI()

    @app.put("/v1/deployments/{deployment_id}/weights")
    async def weights(deployment_id: str, request: Request) -> JSONResponse:
        body = b"".join([chunk async for chunk in request.stream()])
        tensors, meta = decode(body)
        digest = hashlib.sha256(body).hexdigest()
        received.append(
            {
                "auth": request.headers.get("authorization"),
                "length": request.headers.get("content-length"),
                "chunked": request.headers.get("transfer-encoding"),
                "digest_ok": request.headers.get(api.DIGEST_HEADER) == digest,
                "size": len(body),
                "names": sorted(tensors),
                "meta": meta,
            }
        )
        version = int(meta[api.PUSH_KEY_VERSION])
        return JSONResponse(
            api.PushResult(
                deployment_id=deployment_id, key_version=version, status="active", sha256=digest
            ).model_dump()
        )

    return app


@pytest.fixture
def cloud_server() -> Iterator[tuple[str, list[dict]]]:
    received: list[dict] = []
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(fake_cloud_app(received), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.should_exit = True
        thread.join(30)


def test_served_p1_deploys_over_real_sockets(cloud_server, model_dir: Path, tmp_path: Path, capsys) -> None:
    cloud_url, received = cloud_server
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "admin_token").write_text(ADMIN + "\n")
    (secrets_dir / "push_token").write_text(PUSH + "\n")
    env = {
        "STIP_DEVELOPER_ADMIN_TOKEN_FILE": str(secrets_dir / "admin_token"),
        "STIP_DEVELOPER_PUSH_TOKEN_FILE": str(secrets_dir / "push_token"),
        "STIP_DEVELOPER_SHARD_BYTES": "20000",
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "p1.log"
    values = dict(host="127.0.0.1", port=port, data_dir=tmp_path / "data")
    with service(DEVELOPER, env, log, **values) as proc:
        wait_ready(url, proc, timeout=60)
        admin = ["--developer-url", url, "--admin-token-file", str(secrets_dir / "admin_token")]
        assert main(["register", str(model_dir), *admin]) == 0
        model_id = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {ADMIN}"}).json()[0]["model_id"]
        capsys.readouterr()
        assert main(["deploy", model_id, "--cloud-url", cloud_url, "--wait", "--poll-s", "0.1", *admin]) == 0
        dep_id = httpx.get(f"{url}/v1/deployments", headers={"Authorization": f"Bearer {ADMIN}"}).json()[0][
            "deployment_id"
        ]
        capsys.readouterr()
        assert main(["issue-credential", dep_id, *admin]) == 0
        credential = capsys.readouterr().out.strip()
        r = httpx.get(f"{url}/v1/deployments/{dep_id}/user-key", headers={"Authorization": f"Bearer {credential}"})
        assert r.status_code == 200 and r.headers[api.KEY_VERSION_HEADER] == "1"
        with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
            assert "key.safetensors" in tar.getnames()
        assert "stip_developer_jobs_total" in httpx.get(f"{url}/metrics").text
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal as its exit status
    assert proc.returncode in (0, -15), log.read_text()
    assert "Application shutdown complete" in log.read_text()

    [push] = received
    assert push["auth"] == f"Bearer {PUSH}" and push["digest_ok"]
    assert push["chunked"] is None and int(push["length"]) == push["size"]  # a sized, streamed body
    assert push["meta"][api.PUSH_DEPLOYMENT] == dep_id and "model.embed_tokens.weight" not in push["names"]
    text = log.read_text()
    assert ADMIN not in text and PUSH not in text and credential not in text
