"""Checkpoint I/O: read a Hugging Face model directory and write the transformed one, streaming.

`transform_model_dir` reads the original checkpoint tensor by tensor (single
`model.safetensors` or a sharded index), applies the family transform, and writes

    OUT/cloud/      config.json + safetensors shards: θ′, loadable by the stock class (P2)
    OUT/user/       key.safetensors (π, π_c), embedding.safetensors, config.json,
                    tokenizer and pooling files, stip.json (P3's bundle)
    OUT/developer/  key.safetensors, every permutation, mode 0600 (stays with P1)

Peak memory is about one output shard plus the embedding module, not the model. The
directory appears only when complete: work happens in a sibling temporary directory.
"""

import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from shared.errors import CheckpointError
from shared.families import Config, Family, detect_family
from shared.keys import DeveloperKey, draw_key
from shared.transform import check_mode, token_tables

log = logging.getLogger("stip.checkpoint")

INDEX = "model.safetensors.index.json"
# What of a model directory reaches the user bundle (P3): the config and the tokenizer, the image
# preprocessor of vision models, sentence-transformers' pooling description; nothing else.
USER_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
DEFAULT_SHARD_BYTES = 2 << 30
BUNDLE_FORMAT = "1"


def read_config(model_dir: Path) -> Config:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        what = "is not a directory" if Path(model_dir).exists() else "does not exist"
        raise CheckpointError(f"model directory {model_dir} {what}: give the path of a Hugging Face model directory")
    if not path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return config


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, in order; every shard must exist."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{index} is malformed: {e}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index} is malformed: weight_map must map tensor names to file names")
        outside = sorted(n for n in set(weight_map.values()) if not _inside(n))
        if outside:
            raise CheckpointError(
                f"{index} names shard files outside the model directory: {outside[:5]}; "
                "a shard is a file name in the directory itself"
            )
        files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
    elif (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    else:
        raise CheckpointError(f"{model_dir} has neither model.safetensors nor {INDEX}")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{model_dir} lacks the shards {missing}")
    return files


def _inside(name: str) -> bool:
    """A relative path without `..`, `\\` or a drive: a name that stays in its directory."""
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and "\\" not in name and ":" not in name and ".." not in parts


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time; a truncated or corrupt file raises CheckpointError."""
    for path in files:
        try:
            with safe_open(str(path), "pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, f.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read {path.name}: {e}") from None


def count_tensors(files: list[Path]) -> int:
    total = 0
    for path in files:
        try:
            with safe_open(str(path), "pt") as f:
                total += len(list(f.keys()))
        except Exception as e:
            raise CheckpointError(f"cannot read {path.name}: {e}") from None
    return total


class _ShardWriter:
    """Collects cloud tensors and writes a shard whenever the buffer passes `shard_bytes`."""

    def __init__(self, out: Path, shard_bytes: int) -> None:
        self.out, self.shard_bytes = out, shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = 0
        self.shards: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.buffer or any(name in names for _, names in self.shards):
            raise CheckpointError(f"two tensors map to {name!r}")
        self.buffer[name] = tensor.contiguous()
        self.size += tensor.numel() * tensor.element_size()
        if self.size >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.out / f"shard-{len(self.shards):05d}.safetensors"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.buffer)))
        self.buffer, self.size = {}, 0

    def finish(self) -> list[Path]:
        """Name the shards as Hugging Face does and write the index when there are several."""
        self.flush()
        n = len(self.shards)
        if n == 1:
            final = self.out / "model.safetensors"
            self.shards[0][0].rename(final)
            return [final]
        weight_map: dict[str, str] = {}
        files = []
        for i, (path, names) in enumerate(self.shards):
            final = self.out / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        total = sum(f.stat().st_size for f in files)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.out / INDEX).write_text(json.dumps(index, indent=2))
        return files


@dataclass(frozen=True)
class TransformResult:
    out_dir: Path
    family: str
    key: DeveloperKey
    cloud_files: list[Path]


def transform_model_dir(
    model_dir: Path,
    out_dir: Path,
    *,
    key: DeveloperKey | None = None,
    key_version: int = 1,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
    mode: str = "embeds",
) -> TransformResult:
    """Transform a local model directory into OUT/{cloud,user,developer}; see the module doc.

    `mode="token"` (decoders, PROTOCOL.md section 7) also writes the permuted token table E′
    (and GPT-2's position table permuted by π) into OUT/cloud; the bundle's stip.json says the mode.

    `progress` draws a tqdm bar; `on_progress(done, total)` is called after each tensor (a
    service reports it as job status; raising from it aborts the transform cleanly).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = read_config(model_dir)
    family = detect_family(config)
    files = checkpoint_files(model_dir)
    check_mode(family, mode)
    if key is None:
        key = draw_key(family.dims(config), key_version=key_version)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(
            f"{out_dir} exists and is not empty: choose another output directory, or replace it "
            "(--overwrite; overwrite=True in Python)"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        cloud_files = _write(model_dir, tmp, family, config, key, files, shard_bytes, progress, on_progress, mode)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cloud_files = [out_dir / "cloud" / f.name for f in cloud_files]
    log.info("transformed %s (%s) into %s", model_dir, family.name, out_dir)
    return TransformResult(out_dir=out_dir, family=family.name, key=key, cloud_files=cloud_files)


def _write(
    model_dir: Path,
    out: Path,
    family: Family,
    config: Config,
    key: DeveloperKey,
    files: list[Path],
    shard_bytes: int,
    progress: bool,
    on_progress: Callable[[int, int], None] | None,
    mode: str,
) -> list[Path]:
    cloud_dir, user_dir, dev_dir = out / "cloud", out / "user", out / "developer"
    for d in (cloud_dir, user_dir, dev_dir):
        d.mkdir()
    os.chmod(dev_dir, 0o700)
    writer = _ShardWriter(cloud_dir, shard_bytes)
    user: dict[str, torch.Tensor] = {}
    total = count_tensors(files)
    bar = tqdm(total=total, desc="transform", unit="tensor", disable=not progress)
    if on_progress is not None:
        on_progress(0, total)
    with bar:
        for done, (name, tensor) in enumerate(iter_tensors(files), start=1):
            for piece in family.transform(name, tensor, key, config):
                if piece.side == "cloud":
                    writer.add(piece.name, piece.tensor)
                else:
                    user[piece.name] = piece.tensor.contiguous()
            bar.update()
            if on_progress is not None:
                on_progress(done, total)
    missing = [n for n in family.embedding_names(config) if n not in user]
    if missing:
        raise CheckpointError(f"checkpoint lacks the embedding tensors {missing}")
    tables = token_tables(family, mode, user, key, config)  # token mode: E′ (and GPT-2's wpe·π)
    for piece in family.extra_cloud_tensors(key, config):
        if piece.name not in tables:
            writer.add(piece.name, piece.tensor)
    for name, tensor in tables.items():
        writer.add(name, tensor)
    cloud_files = writer.finish()
    (cloud_dir / "config.json").write_text(json.dumps(family.cloud_config(config), indent=2))

    save_file(user, str(user_dir / "embedding.safetensors"))
    key.user.save(user_dir / "key.safetensors")
    _copy_side_files(model_dir, user_dir)
    bundle = {
        "format": BUNDLE_FORMAT,
        "family": family.name,
        "key_version": key.user.key_version,
        "fingerprint": key.user.fingerprint,
        "mode": mode,
    }
    (user_dir / "stip.json").write_text(json.dumps(bundle, indent=2))
    key.save(dev_dir / "key.safetensors")
    return cloud_files


def bundle_side_files(model_dir: Path) -> list[Path]:
    """The files of `model_dir` that belong in the user bundle, relative paths, checked.

    An allowlist (USER_FILES, and the config of each sentence-transformers module that
    modules.json names), never anything else: not the original weights in another format, not
    code (modeling_*.py), not whatever else lies in the directory. Each must be a regular file
    reached without a symbolic link: a link is refused, as it could point anywhere on P1's machine.
    """
    model_dir = Path(model_dir)
    names = [Path(n) for n in USER_FILES]
    modules = model_dir / "modules.json"
    if _plain_file(model_dir, Path("modules.json")):
        try:
            entries = json.loads(modules.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{modules} is not valid JSON: {e}") from None
        for entry in entries if isinstance(entries, list) else []:
            sub = entry.get("path") if isinstance(entry, dict) else None
            if isinstance(sub, str) and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", sub) and ".." not in sub:
                names.append(Path(sub) / "config.json")
    return [n for n in names if _plain_file(model_dir, n)]


def _plain_file(model_dir: Path, rel: Path) -> bool:
    """Whether `model_dir/rel` is a regular file; CheckpointError if a symbolic link is on the way."""
    path = model_dir
    for part in rel.parts:
        path = path / part
        if path.is_symlink():
            raise CheckpointError(
                f"{path} is a symbolic link: P1 copies only regular files into the user bundle "
                "(copy the model directory with `cp -rL` and register the copy)"
            )
        if not path.exists():
            return False
    return stat.S_ISREG(path.lstat().st_mode)


def _copy_side_files(model_dir: Path, user_dir: Path) -> None:
    """Copy config, tokenizer and pooling files (see `bundle_side_files`) to the bundle."""
    for rel in bundle_side_files(model_dir):
        dst = user_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_dir / rel, dst, follow_symlinks=False)
