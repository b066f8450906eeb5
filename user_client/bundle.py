"""The user bundle (P3's half of a deployment): fetched from P1, extracted safely, verified, cached.

The bundle is the `user/` directory that `shared.checkpoint.transform_model_dir` writes:
`key.safetensors` (π, π_c), `embedding.safetensors` (the embedding module), `config.json`,
tokenizer and pooling files, and `stip.json` (a `shared.api.BundleManifest`). P1 serves it as
a tar at `GET /v1/deployments/{id}/user-key`.

On disk it lives at `<cache_dir>/<deployment>/v<key_version>/`, directories 0700 and files
0600, as key material should. Extraction accepts regular files and directories only, and
refuses absolute paths, `..` components, links and device files; the archive may hold the
files at its top level or under one top-level directory (e.g. `user/`). A bundle is used only
after it verifies: the key's fingerprint matches its permutations, the manifest, and P1's
`X-Stip-Fingerprint` / `X-Stip-Key-Version` headers; the embedding module has the tensors the
family needs, of the sizes the key implies. Older versions of a deployment's bundle are
deleted once a newer one is installed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from shared import api
from shared.errors import KeyFormatError
from shared.families import Family, get_family
from shared.keys import UserKey
from shared.model_config import ModelConfig
from shared.pooling import POOLING_MODES
from user_client._http import ByteProgress, Http
from user_client.errors import BundleError

log = logging.getLogger("stip.client")

KEY_FILE = "key.safetensors"
EMBEDDING_FILE = "embedding.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "stip.json"
GENERATION_CONFIG_FILE = "generation_config.json"

MAX_BUNDLE_BYTES = 64 << 30  # the embedding table of a very large vocabulary model, with room
MAX_MEMBERS = 10_000
DIR_MODE = 0o700
FILE_MODE = 0o600
_VERSION_DIR = re.compile(r"v(\d+)")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class PoolingConfig:
    """sentence-transformers' pooling and truncation settings found in the bundle, if any."""

    mode: str = "mean"  # mean | cls | max | mean_sqrt_len
    max_seq_length: int | None = None


class Bundle:
    """A verified bundle in memory: key, embedding module, config, tokenizer. User side only."""

    def __init__(
        self,
        path: Path,
        manifest: api.BundleManifest,
        key: UserKey,
        config: dict[str, Any],
        family: Family,
        embedding: dict[str, torch.Tensor],
        tokenizer: Any,
        generation_config: dict[str, Any],
    ):
        self.path = path
        self.manifest = manifest
        self.key = key
        self.config = config
        self.family = family
        self.embedding = embedding
        self._tokenizer = tokenizer
        self.generation_config = generation_config
        self._pooling: PoolingConfig | None = None

    def __repr__(self) -> str:
        return (
            f"Bundle(deployment={self.manifest.deployment_id!r}, family={self.family.name!r}, "
            f"key_version={self.key_version}, path={str(self.path)!r})"
        )

    @property
    def key_version(self) -> int:
        return self.key.key_version

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def is_encoder(self) -> bool:
        return self.family.is_encoder

    @property
    def vocab_size(self) -> int:
        """Size of the output space π_c acts on (the vocabulary for LM heads)."""
        return int(self.key.pi_c.numel())

    @property
    def n_tokens(self) -> int:
        """Rows of the token embedding table: valid token ids are 0..n_tokens-1."""
        table = self.family.embedding_names(self.config)[0]  # every family lists it first
        return int(self.embedding[table].shape[0])

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise BundleError(f"the bundle at {self.path} has no tokenizer files")
        return self._tokenizer

    @property
    def max_positions(self) -> int | None:
        value = ModelConfig.from_json(self.config).max_position_embeddings  # read by the family's dims on load
        return value if value is not None and value > 0 else None

    def eos_token_ids(self) -> frozenset[int]:
        """EOS ids: generation_config.json, else config.json, else the tokenizer's."""
        for source in (self.generation_config, self.config):
            ids = _as_id_set(source.get("eos_token_id"))
            if ids:
                return ids
        if self._tokenizer is not None:
            return _as_id_set(getattr(self._tokenizer, "eos_token_id", None))
        return frozenset()

    def pooling(self) -> PoolingConfig:
        """Pooling as sentence-transformers would do it for this model (mean if unspecified)."""
        if self._pooling is None:
            self._pooling = self._read_pooling()
        return self._pooling

    def _read_pooling(self) -> PoolingConfig:
        pooling_dir = "1_Pooling"
        modules = _read_json(self.path / "modules.json")
        if isinstance(modules, list):
            for module in modules:
                if isinstance(module, dict) and str(module.get("type", "")).endswith("Pooling"):
                    pooling_dir = str(module.get("path") or pooling_dir)
        mode = "mean"
        cfg = _read_json(self.path / pooling_dir / "config.json")
        if isinstance(cfg, dict):
            if cfg.get("pooling_mode"):
                mode = str(cfg["pooling_mode"]).removesuffix("_tokens").removesuffix("_token")
            else:
                flags = {
                    "cls": cfg.get("pooling_mode_cls_token"),
                    "max": cfg.get("pooling_mode_max_tokens"),
                    "mean_sqrt_len": cfg.get("pooling_mode_mean_sqrt_len_tokens"),
                    "mean": cfg.get("pooling_mode_mean_tokens"),
                }
                chosen = [m for m, on in flags.items() if on]
                if len(chosen) > 1:
                    raise BundleError(f"pooling combines {chosen}; only one mode is supported")
                if chosen:
                    mode = chosen[0]
                elif any(k.startswith("pooling_mode") for k in cfg):
                    raise BundleError("the bundle's pooling config selects no supported mode")
        if mode not in POOLING_MODES:
            raise BundleError(f"pooling mode {mode!r} is not supported")
        st = _read_json(self.path / "sentence_bert_config.json")
        max_len = st.get("max_seq_length") if isinstance(st, dict) else None
        return PoolingConfig(mode=mode, max_seq_length=max_len if isinstance(max_len, int) else None)

    def embed_max_length(self) -> int:
        """Token budget of one encoder input: sentence-transformers' max_seq_length if the
        bundle has one, else the tokenizer's model_max_length, capped by the position table."""
        limits = [n for n in (self.pooling().max_seq_length, self.max_positions) if n]
        tok_max = getattr(self._tokenizer, "model_max_length", None)
        if not self.pooling().max_seq_length and isinstance(tok_max, int) and tok_max < 10**9:
            limits.append(tok_max)
        return min(limits) if limits else 512


def _as_id_set(value: object) -> frozenset[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return frozenset({value})
    if isinstance(value, list | tuple):
        return frozenset(int(v) for v in value if isinstance(v, int))
    return frozenset()


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path.name} in the bundle is not valid JSON: {e}") from None


def load_bundle(
    path: Path,
    *,
    deployment_id: str | None = None,
    expect_version: int | None = None,
    expect_fingerprint: str | None = None,
) -> Bundle:
    """Read and verify the bundle directory at `path`. Raises BundleError on any mismatch."""
    raw = _read_json(path / MANIFEST_FILE)
    if raw is None:
        raise BundleError(f"the bundle at {path} has no {MANIFEST_FILE}")
    try:
        manifest = api.BundleManifest.model_validate(raw)
    except ValidationError as e:
        raise BundleError(f"{MANIFEST_FILE} does not match the manifest schema: {e}") from None
    try:
        key = UserKey.load(path / KEY_FILE)
    except KeyFormatError as e:
        raise BundleError(f"the bundle's user key is unusable: {e}") from None
    if key.fingerprint != manifest.fingerprint:
        raise BundleError("the user key's fingerprint does not match the bundle manifest")
    if key.key_version != manifest.key_version or key.family != manifest.family:
        raise BundleError("the user key's version or family does not match the bundle manifest")
    if expect_fingerprint is not None and expect_fingerprint != key.fingerprint:
        raise BundleError("the user key's fingerprint does not match P1's X-Stip-Fingerprint")
    if expect_version is not None and expect_version != key.key_version:
        raise BundleError(f"the bundle holds key version {key.key_version}, P1 announced {expect_version}")
    if deployment_id is not None and manifest.deployment_id not in (None, deployment_id):
        raise BundleError(f"the bundle is for deployment {manifest.deployment_id!r}, not {deployment_id!r}")
    config = _read_json(path / CONFIG_FILE)
    if not isinstance(config, dict):
        raise BundleError(f"the bundle has no valid {CONFIG_FILE}")
    try:
        family = get_family(manifest.family)
        dims = family.dims(config)
    except Exception as e:  # UnsupportedModel, CheckpointError, malformed config values
        raise BundleError(f"the bundle's model is not usable: {e}") from None
    if key.pi.numel() != dims.d_model or key.pi_c.numel() != dims.d_out:
        raise BundleError("the user key's sizes do not match the model config")
    try:
        embedding = load_file(str(path / EMBEDDING_FILE))
    except Exception as e:
        raise BundleError(f"cannot read {EMBEDDING_FILE}: {type(e).__name__}") from None
    missing = [n for n in family.embedding_names(config) if n not in embedding]
    if missing:
        raise BundleError(f"{EMBEDDING_FILE} lacks the tensors {missing}")
    generation_config = _read_json(path / GENERATION_CONFIG_FILE)
    return Bundle(
        path=path,
        manifest=manifest,
        key=key,
        config=config,
        family=family,
        embedding=embedding,
        tokenizer=_load_tokenizer(path),
        generation_config=generation_config if isinstance(generation_config, dict) else {},
    )


def _load_tokenizer(path: Path) -> Any:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
    if not any((path / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise BundleError(f"cannot load the bundle's tokenizer: {type(e).__name__}: {e}") from None


# --- safe extraction ------------------------------------------------------------------------


def _member_parts(name: str) -> tuple[str, ...]:
    """The path components of a tar member, or BundleError if it could land outside `dest`."""
    if not name or "\x00" in name:
        raise BundleError("bundle member with an empty or NUL-containing name")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise BundleError(f"bundle member {name!r} has an absolute path")
    if "\\" in name:
        raise BundleError(f"bundle member {name!r} contains a backslash")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise BundleError(f"bundle member {name!r} escapes the bundle directory")
    return parts


def _private_dirs(dest: Path, parts: tuple[str, ...]) -> Path:
    """Create dest/parts... as owner-only directories; refuse anything that is not one."""
    current = dest
    for part in parts:
        current = current / part
        try:
            st = current.lstat()
        except FileNotFoundError:
            current.mkdir(mode=DIR_MODE)
            os.chmod(current, DIR_MODE)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise BundleError(f"bundle member {'/'.join(parts)!r} clashes with a file")
    return current


def safe_extract(archive: Path, dest: Path, *, max_bytes: int = MAX_BUNDLE_BYTES) -> None:
    """Extract a tar into the new directory `dest`: regular files (0600) and dirs (0700) only."""
    dest.mkdir(mode=DIR_MODE)
    os.chmod(dest, DIR_MODE)
    try:
        with tarfile.open(archive, "r:*") as tar:
            _extract_members(tar, dest, max_bytes)
    except tarfile.TarError as e:
        raise BundleError(f"the bundle is not a valid tar archive: {e}") from None


def _extract_members(tar: tarfile.TarFile, dest: Path, max_bytes: int) -> None:
    total = 0
    for count, member in enumerate(tar, start=1):
        if count > MAX_MEMBERS:
            raise BundleError(f"the bundle has more than {MAX_MEMBERS} members")
        parts = _member_parts(member.name)
        if member.isdir():
            _private_dirs(dest, parts)
            continue
        if not member.isreg():
            kind = "link" if member.issym() or member.islnk() else "special file"
            raise BundleError(f"bundle member {member.name!r} is a {kind}")
        if not parts:
            raise BundleError(f"bundle member {member.name!r} has no file name")
        total += member.size
        if total > max_bytes:
            raise BundleError(f"the bundle exceeds {max_bytes} bytes")
        parent = _private_dirs(dest, parts[:-1])
        src = tar.extractfile(member)
        if src is None:
            raise BundleError(f"bundle member {member.name!r} cannot be read")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(parent / parts[-1], flags, FILE_MODE)
        except FileExistsError:
            raise BundleError(f"bundle member {member.name!r} appears twice") from None
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), FILE_MODE)
            shutil.copyfileobj(src, out, 1 << 20)


def _bundle_root(extracted: Path) -> Path:
    """The directory holding stip.json: the archive's top level or its single top directory."""
    if (extracted / MANIFEST_FILE).is_file():
        return extracted
    entries = list(extracted.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / MANIFEST_FILE).is_file():
        return entries[0]
    raise BundleError(f"the bundle archive has no {MANIFEST_FILE}")


# --- the cache ------------------------------------------------------------------------------


def cache_name(deployment_id: str) -> str:
    """A directory name for a deployment id: the id itself when it is a plain name."""
    if _SAFE_NAME.fullmatch(deployment_id) and deployment_id not in (".", ".."):
        return deployment_id
    return "h-" + hashlib.sha256(deployment_id.encode()).hexdigest()[:32]


class BundleCache:
    """`<root>/<deployment>/v<version>/`: verified bundles of one deployment, newest wins."""

    def __init__(self, root: Path, deployment_id: str):
        self.root = Path(root).expanduser()
        self.deployment_id = deployment_id
        self.dir = self.root / cache_name(deployment_id)

    def _ensure_dir(self) -> None:
        if not self.root.exists():
            self.root.mkdir(mode=DIR_MODE, parents=True)
            os.chmod(self.root, DIR_MODE)
        self.dir.mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(self.dir, DIR_MODE)

    def versions(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        found = (_VERSION_DIR.fullmatch(p.name) for p in self.dir.iterdir() if p.is_dir())
        return sorted((int(m.group(1)) for m in found if m), reverse=True)

    def load_latest(self) -> Bundle | None:
        """The newest cached bundle that verifies; broken entries are removed."""
        for version in self.versions():
            path = self.dir / f"v{version}"
            try:
                bundle = load_bundle(path, deployment_id=self.deployment_id, expect_version=version)
            except BundleError as e:
                log.warning("discarding cached bundle %s: %s", path, e.message)
                shutil.rmtree(path, ignore_errors=True)
                continue
            log.debug("using cached bundle %s", path)
            return bundle
        return None

    def fetch(
        self, http: Http, *, max_bytes: int = MAX_BUNDLE_BYTES, on_progress: ByteProgress | None = None
    ) -> Bundle:
        """Download the bundle from P1, verify it, install it as v<version>; prune older ones.

        `on_progress(done, total)` follows the download in bytes (`Http.download`).
        """
        bundle = self._fetch(http, max_bytes=max_bytes, on_progress=on_progress, unless_version=None)
        if bundle is None:  # pragma: no cover (only unless_version skips the body)
            raise BundleError("P1 sent no bundle")
        return bundle

    def fetch_if_changed(
        self, http: Http, stale_version: int, *, on_progress: ByteProgress | None = None
    ) -> Bundle | None:
        """Like `fetch`, unless P1 still hands out `stale_version`: then None, without reading
        the body (its headers name the version), so polling P1 during a rotation costs little."""
        return self._fetch(http, max_bytes=MAX_BUNDLE_BYTES, on_progress=on_progress, unless_version=stale_version)

    def _fetch(
        self, http: Http, *, max_bytes: int, on_progress: ByteProgress | None, unless_version: int | None
    ) -> Bundle | None:
        self._ensure_dir()
        fd, tmp_name = tempfile.mkstemp(prefix=".download-", suffix=".tar", dir=self.dir)
        os.close(fd)
        archive = Path(tmp_name)
        staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=self.dir))

        def changed(headers: httpx.Headers) -> bool:
            return unless_version is None or _int_header(headers.get(api.KEY_VERSION_HEADER)) != unless_version

        try:
            path = api.path(api.USER_KEY_PATH, deployment_id=self.deployment_id)
            headers = http.download(
                path,
                lambda: archive.open("wb"),
                max_bytes=max_bytes,
                accept=changed,
                on_progress=on_progress,
                headers={"Accept": "application/x-tar"},
            )
            if not changed(headers):
                return None
            expect_version = _int_header(headers.get(api.KEY_VERSION_HEADER))
            expect_fingerprint = headers.get(api.FINGERPRINT_HEADER)
            extracted = staging / "bundle"
            safe_extract(archive, extracted, max_bytes=max_bytes)
            root = _bundle_root(extracted)
            bundle = load_bundle(
                root,
                deployment_id=self.deployment_id,
                expect_version=expect_version,
                expect_fingerprint=expect_fingerprint,
            )
            final = self._install(root, bundle)
        finally:
            archive.unlink(missing_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
        self._prune(older_than=bundle.key_version)
        log.info("fetched the user bundle of %s, key version %d", self.deployment_id, bundle.key_version)
        bundle.path = final
        return bundle

    def _install(self, root: Path, bundle: Bundle) -> Path:
        """Move a verified bundle into place as v<version>, atomically.

        Another client may install the same version between our check and our rename (two
        processes sharing a cold cache): its copy is kept when it holds the same key, and a
        broken or different copy is replaced.
        """
        final = self.dir / f"v{bundle.key_version}"
        os.chmod(root, DIR_MODE)
        for _ in range(3):
            try:
                os.rename(root, final)  # replaces an empty directory, refuses a full one
                return final
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            try:
                if load_bundle(final, deployment_id=self.deployment_id).fingerprint == bundle.fingerprint:
                    return final
            except BundleError:
                pass
            shutil.rmtree(final, ignore_errors=True)
        raise BundleError(f"cannot install the bundle at {final}: other clients keep replacing it")

    def _prune(self, *, older_than: int) -> None:
        for version in self.versions():
            if version < older_than:
                log.info("removing outdated bundle v%d of %s", version, self.deployment_id)
                shutil.rmtree(self.dir / f"v{version}", ignore_errors=True)


def _int_header(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise BundleError(f"P1 sent a malformed {api.KEY_VERSION_HEADER} header") from None
