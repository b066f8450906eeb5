"""Pieces of P1 without HTTP: transform progress, the pusher's retries, the streamed tar."""

import hashlib
import io
import json
import shutil
import stat
import tarfile
from pathlib import Path

import httpx
import pytest
from safetensors.torch import save_file

from developer_service.bundle import open_bundle
from developer_service.errors import PushFailed
from developer_service.push import Pusher, PushRequest
from shared import api
from shared.checkpoint import checkpoint_files, count_tensors, transform_model_dir


def test_transform_reports_progress_and_can_be_stopped(model_dir: Path, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    transform_model_dir(model_dir, tmp_path / "out", progress=False, on_progress=lambda d, t: seen.append((d, t)))
    total = count_tensors(checkpoint_files(model_dir))
    assert seen == [(d, total) for d in range(total + 1)]

    class Stop(Exception):
        pass

    def stop(done: int, total: int) -> None:
        if done == 3:
            raise Stop

    with pytest.raises(Stop):
        transform_model_dir(model_dir, tmp_path / "stopped", progress=False, on_progress=stop)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the partial directory is gone


def _shard(tmp_path: Path) -> list[Path]:
    import torch

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(4, 3), "b": torch.zeros(2)}, str(path))
    return [path]


def _ok(request: httpx.Request, version: int = 1) -> httpx.Response:
    digest = hashlib.sha256(request.read()).hexdigest()
    result = api.PushResult(deployment_id="dep-x", key_version=version, status="active", sha256=digest)
    return httpx.Response(200, json=result.model_dump())


def test_pusher_retries_5xx_but_not_4xx(tmp_path: Path) -> None:
    files = _shard(tmp_path)
    request = PushRequest("http://p2", "dep-x", 1, files, {api.PUSH_KEY_VERSION: "1"})
    answers = iter([httpx.Response(503, json={"error": {"code": "not_ready", "message": "busy"}}), None])
    calls: list[str] = []

    def flaky(r: httpx.Request) -> httpx.Response:
        calls.append(r.method)
        if r.method == "GET":
            return httpx.Response(404)
        answer = next(answers)
        return answer if answer is not None else _ok(r)

    progress: list[tuple[int, int]] = []
    with httpx.Client(transport=httpx.MockTransport(flaky)) as client:
        result = Pusher(client, "tok", attempts=3, backoff_s=0).push(request, lambda d, t: progress.append((d, t)))
    assert result.key_version == 1 and calls == ["PUT", "GET", "PUT"]
    assert progress[-1][0] == progress[-1][1] > 0

    def refuse(r: httpx.Request) -> httpx.Response:
        calls.append(r.method)
        return httpx.Response(401, json={"error": {"code": "unauthorized", "message": "bad push token"}})

    calls.clear()
    with (
        httpx.Client(transport=httpx.MockTransport(refuse)) as client,
        pytest.raises(PushFailed, match="bad push token"),
    ):
        Pusher(client, "tok", attempts=3, backoff_s=0).push(request)
    assert calls == ["PUT"]


def test_pusher_checks_the_acknowledgement_and_asks_p2_after_a_lost_answer(tmp_path: Path) -> None:
    files = _shard(tmp_path)
    request = PushRequest("http://p2", "dep-x", 2, files, {api.PUSH_KEY_VERSION: "2"})
    wrong = httpx.MockTransport(lambda r: _ok(r, version=1))
    with httpx.Client(transport=wrong) as client, pytest.raises(PushFailed, match="expected version 2"):
        Pusher(client, "tok", attempts=1).push(request)

    def lost(r: httpx.Request) -> httpx.Response:
        if r.method == "PUT":
            r.read()
            raise httpx.ReadTimeout("no answer", request=r)
        info = api.DeploymentInfo(
            deployment_id="dep-x", family="llama", d_model=4, d_out=4, n_layers=1, key_version=2,
            status="active", device="cpu", dtype="float32",
        )  # fmt: skip
        return httpx.Response(200, json=info.model_dump())

    with httpx.Client(transport=httpx.MockTransport(lost)) as client:
        assert Pusher(client, "tok", attempts=1).push(request).key_version == 2


def test_streamed_tar_is_a_standard_archive(tmp_path: Path) -> None:
    user = tmp_path / "user"
    (user / "1_Pooling").mkdir(parents=True)
    (user / "1_Pooling" / "config.json").write_text("{}")
    (user / "key.safetensors").write_bytes(b"k" * 513)
    (user / ("long-name-" + "x" * 120 + ".json")).write_text("[]")  # over 100 characters: a PAX header
    manifest = {"format": "1", "family": "llama", "key_version": 3, "fingerprint": "f" * 64}
    (user / "stip.json").write_text(json.dumps(manifest))
    bundle = open_bundle(user, deployment_id="dep-x", cloud_url="http://p2")
    data = b"".join(bundle.chunks())
    assert len(data) == bundle.size and len(data) % tarfile.RECORDSIZE == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        f = tar.extractfile("stip.json")
        assert f is not None
        got = json.loads(f.read())
        key = tar.extractfile("key.safetensors")
        assert key is not None and key.read() == b"k" * 513
    long_name = "long-name-" + "x" * 120 + ".json"
    assert sorted(names) == ["1_Pooling", "1_Pooling/config.json", "key.safetensors", long_name, "stip.json"]
    # a manifest written without a mode (before token mode existed) is served as embeds mode
    assert got == {**manifest, "deployment_id": "dep-x", "cloud_url": "http://p2", "mode": "embeds"}


def test_the_bundle_is_one_owner_only_file_that_outlives_its_version(tmp_path: Path) -> None:
    version = tmp_path / "v1"
    user = version / "user"
    user.mkdir(parents=True)
    for i in range(8):
        (user / f"file{i}.json").write_text(json.dumps({"i": i}))
    manifest = {"format": "1", "family": "llama", "key_version": 1, "fingerprint": "f" * 64}
    (user / "stip.json").write_text(json.dumps(manifest))
    first = open_bundle(user, deployment_id="dep-x", cloud_url="http://p2")
    expected = b"".join(first.chunks())
    elsewhere = open_bundle(user, deployment_id="dep-x", cloud_url="https://p2.example")  # its own archive
    with tarfile.open(fileobj=io.BytesIO(b"".join(elsewhere.chunks()))) as tar:
        named = tar.extractfile("stip.json")
        assert named is not None and json.loads(named.read())["cloud_url"] == "https://p2.example"
    second = open_bundle(user, deployment_id="dep-x", cloud_url="http://p2")  # reads the archive written once
    archives = sorted(version.glob("bundle-*.tar"))
    assert len(archives) == 2 and all(stat.S_IMODE(a.stat().st_mode) == 0o600 for a in archives)
    assert not list(version.glob(".bundle-*"))  # no temporary file left
    shutil.rmtree(version)  # a rotation deletes the old version while the download is in flight
    assert b"".join(second.chunks()) == expected
