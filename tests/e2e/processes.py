"""The three commands the containers run, started as separate processes on loopback.

`docker-compose.yml` runs exactly these commands (tests/test_deploy_files.py checks it); the
end-to-end tests start them here with loopback ports and temporary data directories.
"""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from stip_demo.services import free_port, wait_ready  # noqa: F401  (re-exported for the tests)
from tests.vllm.engine import p2_engine_env

BIN = Path(sys.executable).parent

# argument templates; {placeholders} are filled per run
CLOUD = ["stip-cloud", "serve", "--host", "{host}", "--port", "{port}", "--data-dir", "{data_dir}"]
DEVELOPER = ["stip-developer", "serve", "--host", "{host}", "--port", "{port}", "--data-dir", "{data_dir}"]
USER = [
    "stip",
    "demo",
    "--developer-url",
    "{developer_url}",
    "--cloud-url",
    "{cloud_url}",
    "--models-dir",
    "{models_dir}",
]
GATEWAY = ["stip", "gateway", "--host", "{host}", "--port", "{port}", "--config", "{config}"]
VALUE_FLAGS = ("--host", "--port", "--data-dir", "--developer-url", "--cloud-url", "--models-dir")


def fill(template: Sequence[str], **values: object) -> list[str]:
    return [str(BIN / template[0])] + [arg.format(**values) for arg in template[1:]]


def start(template: Sequence[str], env: dict[str, str], log: Path, **values: object) -> subprocess.Popen:
    """Start one service in the background, its output appended to `log`; `stop` ends it.
    P2 runs on the engine `STIP_TEST_ENGINE` chooses (tests/vllm/engine.py)."""
    if template is CLOUD:
        env = p2_engine_env(Path(str(values["data_dir"]))) | env
    with log.open("ab") as out:
        return subprocess.Popen(
            fill(template, **values), env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
        )


@contextmanager
def service(template: Sequence[str], env: dict[str, str], log: Path, **values: object) -> Iterator[subprocess.Popen]:
    """Run one service until the block ends; SIGTERM then SIGKILL on the way out."""
    proc = start(template, env, log, **values)
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.02)
