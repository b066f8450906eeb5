"""The user bundle: owner-only cache, reuse, safe extraction, verification."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from shared import api
from tests.user_client.conftest import World
from tests.user_client.fakes import tar_dir
from user_client import BundleError, StipClient
from user_client.bundle import cache_name, safe_extract


def modes(root: Path) -> tuple[set[int], set[int]]:
    dirs = {stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_dir()}
    files = {stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}
    return dirs | {stat.S_IMODE(root.stat().st_mode)}, files


def test_cache_is_owner_only_and_reused(make_client: Callable[..., StipClient], world: World) -> None:
    first = make_client()
    bundle = first.bundle
    assert bundle.path == world.cache_dir / "llama" / "v1"
    assert {p.name for p in bundle.path.iterdir()} >= {
        "key.safetensors",
        "embedding.safetensors",
        "config.json",
        "tokenizer.json",
        "stip.json",
    }
    dirs, files = modes(world.cache_dir)
    assert dirs == {0o700} and files == {0o600}
    assert not [p for p in (world.cache_dir / "llama").iterdir() if p.name.startswith(".")]
    assert bundle.manifest.deployment_id == "llama"
    assert first.cloud_url == "http://cloud.test"  # from the manifest

    second = make_client()
    assert second.bundle.fingerprint == bundle.fingerprint
    assert second.forward([[101, 2023]]).shape == (1, 2, 30522)
    assert world.developer.fetches == 1  # served from the cache


def test_tampered_cache_is_refetched(make_client: Callable[..., StipClient], world: World) -> None:
    path = make_client().bundle.path / "key.safetensors"
    tensors = load_file(str(path))
    tensors["pi"] = tensors["pi"].flip(0)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(tensors, str(path), metadata=meta)
    assert make_client().bundle.key.pi.tolist() != tensors["pi"].tolist()
    assert world.developer.fetches == 2


def test_bundle_under_a_top_directory(make_client: Callable[..., StipClient], world: World) -> None:
    world.developer.prefix = "user/"
    bundle = make_client().bundle
    assert bundle.path == world.cache_dir / "llama" / "v1"
    assert (bundle.path / "key.safetensors").is_file()


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize(
    "members",
    [
        [_file("stip.json"), _file("../evil")],
        [_file("sub/../../evil")],
        [_file("/tmp/stip-absolute-evil")],
        [_link("key.safetensors", "../evil", tarfile.SYMTYPE)],
        [_link("key.safetensors", "/etc/passwd", tarfile.LNKTYPE)],
        [_file("a"), _file("a")],
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "duplicate"],
)
def test_unsafe_archives_are_rejected(
    members: list[tuple[tarfile.TarInfo, bytes | None]],
    make_client: Callable[..., StipClient],
    world: World,
    tmp_path: Path,
) -> None:
    world.developer.override = _tar(members)
    with pytest.raises(BundleError):
        _ = make_client().bundle
    assert not (world.cache_dir / "evil").exists() and not (world.cache_dir.parent / "evil").exists()
    assert not Path("/tmp/stip-absolute-evil").exists()
    assert list((world.cache_dir / "llama").iterdir()) == []  # nothing half-installed


def test_safe_extract_writes_private_files(tmp_path: Path) -> None:
    archive = tmp_path / "b.tar"
    archive.write_bytes(_tar([_file("./a/b.txt", b"hello"), _file("c", b"")]))
    safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "a" / "b.txt").read_bytes() == b"hello"
    dirs, files = modes(tmp_path / "out")
    assert dirs == {0o700} and files == {0o600}


def test_fingerprint_must_match(make_client: Callable[..., StipClient], world: World) -> None:
    world.developer.headers_override = {api.FINGERPRINT_HEADER: "0" * 64}
    with pytest.raises(BundleError, match="fingerprint"):
        _ = make_client().bundle


def test_manifest_must_match_the_key(make_client: Callable[..., StipClient], world: World, tmp_path: Path) -> None:
    user = world.transformed.results["llama"][1].out_dir / "user"
    manifest = json.loads((user / "stip.json").read_text())
    manifest.update(deployment_id="llama", fingerprint="f" * 64)
    world.developer.override = tar_dir(user, manifest=manifest)
    world.developer.headers_override = {api.FINGERPRINT_HEADER: "f" * 64}
    with pytest.raises(BundleError, match="fingerprint"):
        _ = make_client().bundle
    manifest = json.loads((user / "stip.json").read_text())
    manifest.update(deployment_id="someone-else")
    world.developer.override = tar_dir(user, manifest=manifest)
    world.developer.headers_override = {}
    with pytest.raises(BundleError, match="deployment"):
        _ = make_client().bundle


def test_not_a_tar(make_client: Callable[..., StipClient], world: World) -> None:
    world.developer.override = b"this is not a tar archive" * 40
    with pytest.raises(BundleError):
        _ = make_client().bundle


def test_download_is_retried(make_client: Callable[..., StipClient], world: World) -> None:
    world.developer.fail_next = [503, 502]
    assert make_client().bundle.key_version == 1
    assert world.developer.fetches == 1


def test_cache_names() -> None:
    assert cache_name("dep-1_a.b") == "dep-1_a.b"
    for odd in ("..", "../x", "a/b", ".hidden", ""):
        assert cache_name(odd).startswith("h-")


def test_two_clients_filling_a_cold_cache(
    make_client: Callable[..., StipClient], world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second client installs the same version between the first one's check and rename."""
    rename = os.rename
    raced: list[Path] = []

    def rename_after_another_client(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if not raced:
            raced.append(Path())  # only once: the other client's own rename goes straight through
            raced[0] = make_client().bundle.path  # the other client wins the race
        rename(src, dst)

    monkeypatch.setattr("user_client.bundle.os.rename", rename_after_another_client)
    bundle = make_client().bundle
    assert raced == [bundle.path] and world.developer.fetches == 2
    assert bundle.key_version == 1 and bundle.key.pi.tolist() == make_client().bundle.key.pi.tolist()
    assert [p.name for p in bundle.path.parent.iterdir()] == ["v1"]  # no staging copy left behind
