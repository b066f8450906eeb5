"""The user bundle: an uncompressed tar of a version's `user/` directory, served from one file.

Entries sit at the root of the archive with the layout of the `user/` directory that
`stip-developer transform` writes (key.safetensors, embedding.safetensors, config.json,
tokenizer files, stip.json); `stip.json` is rewritten to name the deployment and P2's URL.
The archive is written once per version (and P2 URL) next to `user/`, owner-only, and every
download reads that one open file: a stalled reader holds one descriptor, not one per file of
the bundle, and a rotation that deletes the old version's directory cannot break a download in
flight (the open file outlives its name). The size is known in advance.
"""

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from shared.api import BundleManifest
from shared.files import atomic_writer

MEDIA_TYPE = "application/x-tar"
MANIFEST = "stip.json"
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
CHUNK = 1 << 20


@dataclass
class _Entry:
    info: tarfile.TarInfo
    source: BinaryIO | None  # None for directories


@dataclass
class Bundle:
    manifest: BundleManifest
    size: int
    _source: BinaryIO = field(repr=False)  # the archive, open

    @property
    def filename(self) -> str:
        return f"stip-{self.manifest.deployment_id}-v{self.manifest.key_version}.tar"

    def chunks(self) -> Iterator[bytes]:
        """The archive, one piece at a time; closes the file when done or abandoned."""
        try:
            left = self.size
            while left:
                buf = self._source.read(min(CHUNK, left))
                if not buf:
                    raise OSError("the bundle archive shrank while being sent")
                left -= len(buf)
                yield buf
        finally:
            self.close()

    def close(self) -> None:
        self._source.close()


def _archive(entries: list[_Entry]) -> Iterator[bytes]:
    """The tar stream of the planned entries (PAX headers, padded blocks, the trailer)."""
    for entry in entries:
        yield entry.info.tobuf(tarfile.PAX_FORMAT)
        if entry.source is None:
            continue
        left = entry.info.size
        while left:
            buf = entry.source.read(min(CHUNK, left))
            if not buf:
                raise OSError(f"{entry.info.name} shrank while being archived")
            left -= len(buf)
            yield buf
        yield b"\0" * (-entry.info.size % BLOCK)
    yield b"\0" * _trailer(sum(_entry_size(e) for e in entries))


def _entry_size(entry: _Entry) -> int:
    return len(entry.info.tobuf(tarfile.PAX_FORMAT)) + entry.info.size + (-entry.info.size % BLOCK)


def _trailer(payload: int) -> int:
    """Two zero blocks, then padding to a whole record, as tarfile writes."""
    end = payload + 2 * BLOCK
    return 2 * BLOCK + (-end % RECORD)


def _info(name: str, *, size: int = 0, mtime: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o700 if directory else 0o600  # key material: owner only, also once unpacked
    info.size = size
    info.mtime = mtime
    return info


def open_bundle(user_dir: Path, *, deployment_id: str, cloud_url: str) -> Bundle:
    """The archive of `user_dir` for this deployment and P2 URL, opened; written first if needed."""
    manifest = BundleManifest.model_validate_json((user_dir / MANIFEST).read_bytes())
    manifest = manifest.model_copy(update={"deployment_id": deployment_id, "cloud_url": cloud_url})
    tag = hashlib.sha256(json.dumps([deployment_id, cloud_url]).encode()).hexdigest()[:16]
    path = user_dir.parent / f"bundle-{tag}.tar"
    try:
        source = path.open("rb")
    except FileNotFoundError:
        _write_archive(user_dir, manifest, path)
        source = path.open("rb")
    return Bundle(manifest=manifest, size=os.fstat(source.fileno()).st_size, _source=source)


def _write_archive(user_dir: Path, manifest: BundleManifest, path: Path) -> None:
    """Write the archive to `path` atomically (a temporary file renamed), owner-only."""
    manifest_bytes = (json.dumps(manifest.model_dump(), indent=2) + "\n").encode()
    entries: list[_Entry] = []
    try:
        with atomic_writer(path, prefix=".bundle-") as out:
            for item in sorted(user_dir.rglob("*")):
                rel = item.relative_to(user_dir).as_posix()
                if rel == MANIFEST or item.is_symlink():
                    continue
                st = item.stat()
                if item.is_dir():
                    entries.append(_Entry(_info(rel, mtime=int(st.st_mtime), directory=True), None))
                elif item.is_file():
                    entries.append(_Entry(_info(rel, size=st.st_size, mtime=int(st.st_mtime)), item.open("rb")))
            mtime = int((user_dir / MANIFEST).stat().st_mtime)
            entries.append(_Entry(_info(MANIFEST, size=len(manifest_bytes), mtime=mtime), io.BytesIO(manifest_bytes)))
            for piece in _archive(entries):
                out.write(piece)
    finally:
        for entry in entries:
            if entry.source is not None:
                entry.source.close()
