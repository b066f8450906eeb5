"""The tensor wire format: safetensors bytes, parsed defensively.

Every HTTP body that carries tensors is one safetensors buffer (never pickle, never JSON
floats). `decode` checks the header before any tensor is built: its length and JSON, the
dtypes, that every offset lies inside the body, that tensors tile the data region exactly,
and that floats are finite. `concat_files` streams several safetensors shards as one file
(the weight push) without loading them.
"""

import json
import math
import struct
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shared.errors import BadTensor, PayloadTooLarge

DEFAULT_MAX_HEADER = 1 << 20  # 1 MiB of JSON is far more than any request needs
CONTENT_TYPE = "application/octet-stream"
LITTLE_ENDIAN = sys.byteorder == "little"  # safetensors stores little-endian: tensors map directly

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEMSIZES = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def encode(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Tensors -> one safetensors buffer: the header built here, each tensor's bytes copied once
    (into the joined body). The layout is the standard one (`safetensors.torch.load` reads it)."""
    if not LITTLE_ENDIAN:
        return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    chunks: list[memoryview | bytes] = []
    pos = 0
    for name, tensor in tensors.items():
        t = tensor.detach().cpu().contiguous()
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + size]}
        if size:
            chunks.append(t.reshape(-1).view(torch.uint8).numpy().data)  # its bytes, not copied yet
        pos += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align the data region, as safetensors does
    return b"".join([struct.pack("<Q", len(head)), head, *chunks])


def parse_header(
    head: bytes, *, body_size: int | None = None, max_header: int = DEFAULT_MAX_HEADER
) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and check a safetensors header. Returns (tensors, metadata, data offset).

    `head` must hold at least the 8-byte length and the header itself. With `body_size`,
    offsets are checked against the data region and the tensors must tile it exactly.
    """
    if len(head) < 8:
        raise BadTensor("body is not safetensors: shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", head[:8])
    if body_size is not None and n > body_size - 8:  # a cut-off body, not a large header: 400, never 413
        raise BadTensor("safetensors header length exceeds the body: truncated, or not safetensors")
    if n > max_header:
        raise PayloadTooLarge(f"safetensors header of {n} bytes exceeds the limit of {max_header}")
    if len(head) < 8 + n:
        raise BadTensor("safetensors header is truncated")
    try:
        raw = json.loads(head[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # RecursionError: nested too deep
        raise BadTensor("safetensors header is not valid JSON") from None
    if not isinstance(raw, dict):
        raise BadTensor("safetensors header is not a JSON object")
    meta = raw.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise BadTensor("safetensors __metadata__ must map strings to strings")
    infos: dict[str, TensorInfo] = {}
    for name, spec in raw.items():
        try:
            dtype, shape, (start, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise BadTensor(f"tensor {name!r}: malformed header entry") from None
        if not isinstance(dtype, str):
            raise BadTensor(f"tensor {name!r}: its dtype is not a string")
        if dtype not in DTYPES:
            raise BadTensor(f"tensor {name!r}: unsupported dtype {dtype[:16]!r}")
        if not all(isinstance(s, int) and s >= 0 for s in shape) or not all(
            isinstance(o, int) and o >= 0 for o in (start, end)
        ):
            raise BadTensor(f"tensor {name!r}: shape and offsets must be non-negative integers")
        itemsize = ITEMSIZES[dtype]
        if end < start or end - start != math.prod(shape) * itemsize:
            raise BadTensor(f"tensor {name!r}: data offsets do not match its shape and dtype")
        infos[name] = TensorInfo(dtype, shape, start, end)
    if body_size is not None:
        data_size = body_size - 8 - n
        spans = sorted((i.start, i.end) for i in infos.values())
        pos = 0
        for start, end in spans:
            if start != pos:
                raise BadTensor("safetensors data offsets overlap or leave gaps")
            pos = end
        if pos != data_size:
            raise BadTensor(f"safetensors data region is {data_size} bytes, the header describes {pos}")
    return infos, meta, 8 + n


def decode(
    body: bytes, *, max_bytes: int | None = None, max_header: int = DEFAULT_MAX_HEADER
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Check and load a safetensors body. Raises BadTensor / PayloadTooLarge."""
    if max_bytes is not None and len(body) > max_bytes:
        raise PayloadTooLarge(f"body of {len(body)} bytes exceeds the limit of {max_bytes}")
    infos, meta, start = parse_header(body, body_size=len(body), max_header=max_header)
    if LITTLE_ENDIAN:  # the header is checked (offsets tile the data exactly): read the tensors from it
        view = memoryview(body)
        tensors = {
            name: _tensor(view[start + i.start : start + i.end], DTYPES[i.dtype], i.shape) for name, i in infos.items()
        }
    else:
        try:
            tensors = st_load(body)
        except Exception as e:  # the rust parser's own errors: report their kind, never the bytes
            raise BadTensor(f"safetensors body rejected: {type(e).__name__}") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise BadTensor(f"tensor {name!r} holds NaN or Inf")
    return tensors, meta


def _tensor(data: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of its own memory (one copy) from a slice of the body."""
    if not data.nbytes:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def read_header(path: Path, max_header: int = 100 << 20) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse the header of a safetensors file on disk, checking it against the file size."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise BadTensor(f"{path.name}: not a safetensors file")
        (n,) = struct.unpack("<Q", prefix)
        if n > max_header:
            raise BadTensor(f"{path.name}: header of {n} bytes is too large")
        head = prefix + f.read(n)
    return parse_header(head, body_size=size, max_header=max_header)


def tensor_bytes(files: Iterable[Path]) -> int:
    """Bytes of tensor data in safetensors files on disk, from their headers (no tensor is read)."""
    return sum(info.end - info.start for path in files for info in read_header(path)[0].values())


def concat_files(files: Sequence[Path], metadata: dict[str, str], chunk: int = 1 << 22) -> tuple[int, Iterator[bytes]]:
    """Stream several safetensors files as ONE safetensors buffer, without loading tensors.

    Returns (total size in bytes, an iterator of chunks). Memory stays at one chunk.
    """
    entries: dict[str, dict[str, object]] = {}
    plan: list[tuple[Path, int, int]] = []  # (file, absolute start, end) of each tensor's bytes
    pos = 0
    for path in files:
        infos, _, data_start = read_header(path)
        for name, info in sorted(infos.items(), key=lambda kv: kv[1].start):
            if name in entries:
                raise BadTensor(f"tensor {name!r} appears in two shards")
            size = info.end - info.start
            entries[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [pos, pos + size]}
            plan.append((path, data_start + info.start, data_start + info.end))
            pos += size
    header = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # align the data region, as safetensors does
    head = struct.pack("<Q", len(header)) + header
    total = len(head) + pos

    def chunks() -> Iterator[bytes]:
        yield head
        for path, start, end in plan:
            with path.open("rb") as f:
                f.seek(start)
                left = end - start
                while left:
                    buf = f.read(min(chunk, left))
                    if not buf:
                        raise BadTensor(f"{path.name} is shorter than its header says")
                    left -= len(buf)
                    yield buf

    return total, chunks()


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]
