"""The vLLM engine: θ′ served by a vLLM OpenAI server in a process (and environment) of its own.

One server per deployment version, launched by P2 from the vLLM environment
(`STIP_CLOUD_VLLM_PYTHON`, built by `make vllm-env`) on a loopback port:

    <vllm python> -m vllm.entrypoints.openai.api_server --model <θ′ dir> --skip-tokenizer-init
        --enable-prompt-embeds --max-logprobs -1 --logprobs-mode raw_logits --enable-prefix-caching ...

What P2 sends it never leaves the permuted space: prompt embeddings x·π (embeds mode) or ids
relabelled by π_c (token mode). The server has no tokenizer and no embedding module (in embeds
mode its `embed_tokens` is all zeros, written by P2, so no uninitialised memory is ever loaded).

- Embeds mode: a forward is a completion of one token on `prompt_embeds` whose full-vocabulary
  raw logits come back (`logprobs` over the whole vocabulary, `logprobs_mode=raw_logits`): the
  last position's permuted logits, from which P2 answers `output=last` and `output=topk`. vLLM
  gives no logits for the prompt's other positions, so `output=all` is refused. A session keeps
  its permuted rows so far (P2's session store holds them in place of a KV cache) and each step
  re-submits prefix + new rows; vLLM's prefix cache (keyed on the bytes of full blocks) makes the
  prefix cheap.
- Token mode: generate is a streamed completion on the relabelled ids (the engine's own
  decoding and sampling: temperature, top-p, top-k, seed, relabelled stop ids; the config's eos
  id is a real id, meaningless here, so it is ignored).

Processes: the server runs under a small watchdog that leads its own process group and reads
a pipe from P2; when P2 ends, however it ends (SIGKILL included), the pipe closes and the
watchdog ends the whole group. `close()` does the same on delete, rotation and shutdown.
"""

import base64
import contextlib
import io
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import save_file

from cloud_service.errors import BadInput, Internal
from cloud_service.schemas import PushManifest
from cloud_service.settings import CloudSettings
from shared import wire
from shared.api import GenerateRequest
from shared.errors import CheckpointError
from shared.families import CloudOutput, get_family
from shared.runtime import DTYPES

log = logging.getLogger("stip.cloud.vllm")
if logging.getLogger("httpx").level == logging.NOTSET:  # not a line per request to the engine at INFO
    logging.getLogger("httpx").setLevel(logging.WARNING)

VLLM_FAMILIES = frozenset({"llama"})  # LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
MAKE_TARGET = "make vllm-env"
OUTPUT_ALL_REFUSED = (
    "output=all is not available on the vllm engine: vLLM returns the next-token logits of the last "
    "position only (its prompt logprobs score given token ids, which embeds mode never sends); use "
    "output=last or output=topk, or a P2 with STIP_CLOUD_ENGINE=transformers"
)
STOP_GRACE_S = 15.0  # a server's group gets SIGTERM, then SIGKILL after this
LOG_TAIL_LINES = 25

# Runs in the vLLM environment; leads its own process group (P2 starts it with a new session).
WATCHDOG = """
import os, signal, subprocess, sys, threading
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)
def end():
    sys.stdin.buffer.read()  # returns at EOF: P2 closed the pipe or died
    os.killpg(0, signal.SIGTERM)
threading.Thread(target=end, daemon=True).start()
sys.exit(child.wait())
"""


def validate_checkpoint(path: Path, manifest: PushManifest) -> None:
    """Every tensor the stock class expects, present with its shape, and nothing else (BadInput).

    vLLM loads a checkpoint with a missing tensor silently (uninitialised memory in its place),
    so P2 checks the header against the stock class, built on the meta device, before the
    engine sees the file. The token table may be absent in embeds mode only (inspect_push has
    checked that it holds no values there).
    """
    family = get_family(manifest.family)
    infos, _, _ = wire.read_header(path)
    with torch.device("meta"):
        model = family.build_cloud_model(manifest.config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    optional = set() if manifest.mode == "token" else set(family.embedding_names(manifest.config))
    missing = sorted(n for n in expected if n not in infos and n not in optional)
    unexpected = sorted(n for n in infos if n not in expected)
    wrong = sorted(n for n, i in infos.items() if n in expected and tuple(i.shape) != expected[n])
    if missing or unexpected or wrong:
        raise BadInput(
            f"the pushed θ′ does not fit the stock {family.name} class: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}, wrong shape {wrong[:8]}"
        )


def start_vllm_model(settings: CloudSettings, manifest: PushManifest, path: Path, *, work_dir: Path) -> "VllmModel":
    """Validate θ′, lay out its model directory, start its server and wait until it serves (blocking)."""
    python = settings.vllm_python
    if not python.is_file():
        raise Internal(
            f"STIP_CLOUD_ENGINE=vllm, but the vLLM environment's Python {python} does not exist: build it with "
            f"`{MAKE_TARGET}` (or set STIP_CLOUD_VLLM_PYTHON)"
        )
    try:
        validate_checkpoint(path, manifest)
    except CheckpointError as e:
        raise BadInput(f"the pushed θ′ does not fit its family: {e}") from None
    family = get_family(manifest.family)
    work_dir.mkdir(parents=True, exist_ok=False)
    model_dir = work_dir / "model"
    model_dir.mkdir()
    config = dict(family.cloud_config(manifest.config), tie_word_embeddings=False)
    config.setdefault("architectures", ["LlamaForCausalLM"])
    (model_dir / "config.json").write_text(json.dumps(config))
    try:  # the version file stays where it is; a hard link costs no space
        os.link(path, model_dir / "model.safetensors")
    except OSError:
        shutil.copyfile(path, model_dir / "model.safetensors")
    infos, _, _ = wire.read_header(path)
    dims = family.dims(manifest.config)
    dtype = DTYPES[settings.dtype]
    for name in family.embedding_names(manifest.config):
        if name not in infos:  # embeds mode: a zero table, so vLLM never loads uninitialised memory
            save_file({name: torch.zeros(dims.d_out, dims.d_model, dtype=dtype)}, str(model_dir / "embed.safetensors"))
    name = f"{manifest.deployment_id}-v{manifest.key_version}"
    server = VllmServer(settings, model_dir, name=name, work_dir=work_dir)
    try:
        server.wait_ready(settings.vllm_start_timeout_s)
        model = VllmModel(server, manifest, dtype)
        model.forward(torch.zeros(1, 1, dims.d_model), None, None, last_only=True)  # it serves θ′
    except BaseException:
        server.stop()  # its log's last lines are in the error
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return model


class VllmServer:
    """One vLLM OpenAI server process (under its watchdog) on a loopback port."""

    def __init__(self, settings: CloudSettings, model_dir: Path, *, name: str, work_dir: Path) -> None:
        self.name, self.work_dir = name, work_dir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [
            str(settings.vllm_python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--served-model-name",
            name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--skip-tokenizer-init",
            "--enable-prompt-embeds",
            "--max-logprobs",
            "-1",
            "--logprobs-mode",
            "raw_logits",
            "--enable-prefix-caching",
            "--dtype",
            settings.dtype,
            "--tensor-parallel-size",
            str(settings.vllm_tensor_parallel_size),
            "--pipeline-parallel-size",
            str(settings.vllm_pipeline_parallel_size),
            "--gpu-memory-utilization",
            str(settings.vllm_gpu_memory_utilization),
            "--disable-log-stats",
            *shlex.split(settings.vllm_extra_args),
        ]
        env = dict(
            os.environ,
            VLLM_CPU_KVCACHE_SPACE=str(settings.vllm_kv_cache_gib),
            VLLM_CPU_OMP_THREADS_BIND=settings.vllm_cpu_threads_bind,
            VLLM_CPU_NUM_OF_RESERVED_CPU=str(settings.vllm_cpu_reserved),
        )
        for name_ in ("PYTHONPATH", "VIRTUAL_ENV"):  # P2's own packages must not shadow the engine's
            env.pop(name_, None)
        self.log_path = work_dir / "engine.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [str(settings.vllm_python), "-c", WATCHDOG, *args],
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=work_dir,
            start_new_session=True,  # its own process group, which close() and the watchdog end
        )
        self.pgid = self.process.pid
        log.info("vLLM server for %s starting on port %d (log %s)", name, self.port, self.log_path)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise Internal(f"the vLLM server for {self.name} exited with {code} while starting: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    log.info("vLLM server for %s serves on port %d", self.name, self.port)
                    return
            if time.monotonic() > deadline:
                raise Internal(
                    f"the vLLM server for {self.name} did not answer /health within {timeout:.0f} s "
                    f"(STIP_CLOUD_VLLM_START_TIMEOUT_S): {self.log_tail()}"
                )
            time.sleep(0.5)

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(line.strip() for line in lines[-LOG_TAIL_LINES:] if line.strip())

    def stop(self) -> None:
        """End the server's process group: SIGTERM, then SIGKILL after a grace period (blocking)."""
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        _signal_group(self.pgid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and _group_alive(self.pgid):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=0.2)
        _signal_group(self.pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        self._log.close()
        log.info("vLLM server for %s stopped", self.name)


class VllmModel:
    """θ′ served by a vLLM server: the surface of shared.runtime.CloudModel for P2's forward path.

    `forward`'s `cache` is the session's permuted rows so far ((B, past, d), what P2's session
    store keeps for this engine); the returned cache is prefix + new rows.
    """

    last_position_only = True  # the service refuses output=all (OUTPUT_ALL_REFUSED)

    def __init__(self, server: VllmServer, manifest: PushManifest, dtype: torch.dtype) -> None:
        self.server = server
        self.family = get_family(manifest.family)
        self.config = manifest.config
        self.dims = self.family.dims(manifest.config)
        self.device = torch.device("cpu")  # where P2 holds the tensors it exchanges with the server
        self.dtype = dtype
        self.model = None
        self.name = server.name
        self._http = httpx.Client(
            base_url=server.url,
            timeout=httpx.Timeout(600.0, connect=10.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )
        self._closed = threading.Event()

    # --- embeds mode ------------------------------------------------------------------------

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        *,
        last_only: bool = False,
        top_k: int | None = None,
    ) -> CloudOutput:
        """(B, S, d) permuted by π (+ the session's (B, past, d) rows) -> (B, 1, V) logits permuted by π_c.

        `top_k`: only the k largest logits are needed (output=topk); the others come back as -inf,
        so a top-k of the result is the top-k of the full logits, and the engine sends k, not V.
        """
        if not last_only:
            raise BadInput(OUTPUT_ALL_REFUSED)
        x = inputs_embeds.to(self.device, self.dtype)
        full = x if cache is None else torch.cat([cache, x], dim=1)  # (B, past + S, d)
        rows = [full[b] if attention_mask is None else full[b][attention_mask[b].bool()] for b in range(full.shape[0])]
        body = {
            "model": self.name,
            "prompt_embeds": [_encode_embeds(r) for r in rows],
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": top_k or self.dims.d_out,
            "return_tokens_as_token_ids": True,
        }
        reply = self._post("/v1/completions", body)
        vocab = self.dims.d_out
        logits = torch.full((len(rows), vocab), float("-inf") if top_k else float("nan"))
        for choice in reply["choices"]:
            top = choice["logprobs"]["top_logprobs"][0]  # {"token_id:j": raw logit}
            index = torch.tensor([int(k.rpartition(":")[2]) for k in top], dtype=torch.long)
            logits[int(choice["index"])].index_copy_(0, index, torch.tensor(list(top.values()), dtype=torch.float32))
        if bool(torch.isnan(logits).any()) or (top_k and int(torch.isfinite(logits).sum()) < top_k * len(rows)):
            raise Internal(f"the vLLM server for {self.name} returned an incomplete vocabulary")
        return CloudOutput(output=logits[:, None, :].to(self.dtype), cache=full)  # (B, 1, V) permuted by π_c

    # --- token mode -------------------------------------------------------------------------

    def generate(
        self, req: GenerateRequest, on_token: Callable[[int], None] | None, cancelled: threading.Event
    ) -> list[int]:
        """Relabelled prompt ids -> the relabelled ids generated, each handed to `on_token` as it comes."""
        body: dict[str, Any] = {
            "model": self.name,
            "prompt": list(req.input_ids),
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "repetition_penalty": req.repetition_penalty,
            "stop_token_ids": list(req.stop_ids),
            "ignore_eos": True,  # the config's eos is a real id; only the relabelled stop ids end it
            "logprobs": 0,  # each chunk names its ids as "token_id:j" (return_tokens_as_token_ids)
            "return_tokens_as_token_ids": True,
            "stream": True,
        }
        if req.temperature > 0:
            body.update(top_p=req.top_p or 1.0, top_k=req.top_k or -1)
            if req.seed is not None:
                body["seed"] = req.seed
        new: list[int] = []
        for event in self._stream("/v1/completions", body, cancelled):
            for choice in event.get("choices", ()):
                for name in (choice.get("logprobs") or {}).get("tokens") or ():
                    j = int(name.rpartition(":")[2])
                    new.append(j)
                    if on_token is not None:
                        on_token(j)
        return new

    # --- plumbing ---------------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self._http.post(path, json=body)
        except httpx.HTTPError as e:
            raise Internal(f"the vLLM server for {self.name} is unreachable: {type(e).__name__}") from None
        if response.status_code != 200:
            raise _engine_error(self.name, response.status_code, response.text)
        result: dict[str, Any] = response.json()
        return result

    def _stream(self, path: str, body: dict[str, Any], cancelled: threading.Event) -> Iterator[dict[str, Any]]:
        try:
            with self._http.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    raise _engine_error(self.name, response.status_code, response.read().decode(errors="replace"))
                for line in response.iter_lines():
                    if cancelled.is_set():
                        return  # leaving the block closes the connection: vLLM aborts the request
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    yield json.loads(data)
        except httpx.HTTPError as e:
            raise Internal(f"the vLLM server for {self.name} is unreachable: {type(e).__name__}") from None

    def close(self) -> None:
        """Stop the server (idempotent, blocking)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._http.close()
        self.server.stop()
        shutil.rmtree(self.server.work_dir, ignore_errors=True)


def _encode_embeds(rows: torch.Tensor) -> str:
    """(n, d) -> what vLLM's OpenAI server reads as `prompt_embeds`: base64 of a torch.save tensor."""
    buf = io.BytesIO()
    torch.save(rows.contiguous().clone(), buf)
    return base64.b64encode(buf.getvalue()).decode()


def _engine_error(name: str, status: int, text: str) -> Exception:
    """A 4xx from vLLM is a request P2 let through (BadInput); a 5xx is the engine's failure."""
    try:
        message = str(json.loads(text).get("error", {}).get("message", ""))[:300]
    except (ValueError, AttributeError):
        message = ""
    if 400 <= status < 500:
        return BadInput(f"the vLLM engine refused the request: {message or status}")
    log.error("vLLM server for %s answered %d: %s", name, status, message)
    return Internal(f"the vLLM engine failed ({status}); see P2's log")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


__all__ = ["OUTPUT_ALL_REFUSED", "VLLM_FAMILIES", "VllmModel", "VllmServer", "start_vllm_model", "validate_checkpoint"]
