"""The user bundle: an uncompressed tar of a version's `user/` directory, streamed.

Entries sit at the root of the archive with the layout of the `user/` directory that
`stip-developer transform` writes (key.safetensors, embedding.safetensors, config.json,
tokenizer files, stip.json); `stip.json` is rewritten to name the deployment and P2's URL.
Every file is opened before the first byte goes out, so a rotation that deletes the old
version's directory cannot break a download in flight. The size is known in advance.
"""

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from shared.api import BundleManifest

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
    _entries: list[_Entry] = field(repr=False)

    @property
    def filename(self) -> str:
        return f"stip-{self.manifest.deployment_id}-v{self.manifest.key_version}.tar"

    def chunks(self) -> Iterator[bytes]:
        """The archive, one piece at a time; closes the files when done or abandoned."""
        try:
            for entry in self._entries:
                yield entry.info.tobuf(tarfile.PAX_FORMAT)
                if entry.source is None:
                    continue
                left = entry.info.size
                while left:
                    buf = entry.source.read(min(CHUNK, left))
                    if not buf:
                        raise OSError(f"{entry.info.name} shrank while being sent")
                    left -= len(buf)
                    yield buf
                yield b"\0" * (-entry.info.size % BLOCK)
            yield b"\0" * _trailer(self._payload_size())
        finally:
            self.close()

    def close(self) -> None:
        for entry in self._entries:
            if entry.source is not None:
                entry.source.close()

    def _payload_size(self) -> int:
        return sum(_entry_size(e) for e in self._entries)


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
    """Open every file of `user_dir` and plan the archive; the caller streams `chunks()`."""
    manifest = BundleManifest.model_validate_json((user_dir / MANIFEST).read_bytes())
    manifest = manifest.model_copy(update={"deployment_id": deployment_id, "cloud_url": cloud_url})
    manifest_bytes = (json.dumps(manifest.model_dump(), indent=2) + "\n").encode()
    entries: list[_Entry] = []
    try:
        for path in sorted(user_dir.rglob("*")):
            rel = path.relative_to(user_dir).as_posix()
            if rel == MANIFEST or path.is_symlink():
                continue
            st = path.stat()
            if path.is_dir():
                entries.append(_Entry(_info(rel, mtime=int(st.st_mtime), directory=True), None))
            elif path.is_file():
                source = path.open("rb")
                entries.append(_Entry(_info(rel, size=st.st_size, mtime=int(st.st_mtime)), source))
        mtime = int((user_dir / MANIFEST).stat().st_mtime)
        entries.append(_Entry(_info(MANIFEST, size=len(manifest_bytes), mtime=mtime), io.BytesIO(manifest_bytes)))
    except BaseException:
        for entry in entries:
            if entry.source is not None:
                entry.source.close()
        raise
    payload = sum(_entry_size(e) for e in entries)
    return Bundle(manifest=manifest, size=payload + _trailer(payload), _entries=entries)
