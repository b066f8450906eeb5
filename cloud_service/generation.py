"""Token mode on P2 (PROTOCOL.md section 7): the stock `generate()` on ids relabelled by π_c.

A token-mode θ′ holds the permuted token table E′ = E[π_c][:, π] (and GPT-2's position table
permuted by π), so it is a complete stock causal LM over a relabelled vocabulary: relabelled id
j stands for the real token π_c[j]. P2 runs `generate()` on the ids P3 sends and returns the
ids it generates, still relabelled; P3 maps them back through π_c and detokenises. P2 never
sees a real token id, the tokenizer or text, but it learns the substitution cipher that the
relabelling is (SECURITY.md measures what that reveals).

The model's own generation defaults are dropped at load (`prepare`): its config names bos,
eos and pad ids in the REAL vocabulary, meaningless here. Every setting comes from the request;
`stop_ids` (relabelled) are the only end-of-sequence ids. Sampling runs on P2 with the stock
processors; torch's generator is seeded for each sampled generation, with the request's `seed`
or else a fresh random one (sampled generations run one at a time in the process, since torch's
default generator is process-wide).

Served on the deployment's lock, like a forward pass: a generation holds its deployment's model
until it ends (bounded by `max_tokens`), or until a streaming client goes away.
"""

import json
import logging
import math
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import torch
from pydantic import ValidationError

from cloud_service.engines.vllm import VllmModel
from cloud_service.errors import BadInput, CloudError
from shared.api import (
    E_BAD_INPUT,
    E_INTERNAL,
    ErrorBody,
    ErrorResponse,
    FinishReason,
    GenerateRequest,
    GenerateResult,
)

if TYPE_CHECKING:
    from cloud_service.service import CloudService, Deployment

log = logging.getLogger("stip.cloud.generation")

SSE_MEDIA_TYPE = "text/event-stream"
MAX_BODY_BYTES = 1 << 20  # a JSON request of ids: well above max_prompt_tokens ids
EVENT_IDS, EVENT_DONE, EVENT_ERROR = "ids", "done", "error"
_SEEDED = threading.Lock()  # seeded sampling sets torch's process-wide generator

OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": GenerateRequest.model_json_schema()}},
    }
}
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON (GenerateResult), or with stream=true server-sent events: `ids` events "
        '(`{"ids": [j]}`, relabelled), then one `done` (a GenerateResult) or one `error` (the error shape)',
        "content": {SSE_MEDIA_TYPE: {"schema": {"type": "string"}}},
    }
}


def prepare(model: torch.nn.Module) -> None:
    """At load: no generation default of the model's config applies (its token ids are real ones)."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig()  # type: ignore[assignment]


def parse(body: bytes, dep: "Deployment", service: "CloudService") -> GenerateRequest:
    """The request body, checked against the deployment and P2's bounds (BadInput otherwise)."""
    if dep.mode != "token":
        raise BadInput(
            f"deployment {dep.deployment_id!r} serves embeds mode only (forward); generate needs a deployment "
            'that P1 created with {"mode": "token"}'
        )
    try:
        req = GenerateRequest.model_validate_json(body)
    except ValidationError as e:
        # location and reason only: pydantic's `input` could echo what the client sent
        parts = [f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}" for err in e.errors()]
        raise BadInput("invalid generate request: " + ("; ".join(parts) or "not a JSON object")) from None
    settings = service.settings
    vocab = dep.model.dims.d_out
    n = len(req.input_ids)
    if n > settings.max_prompt_tokens:
        raise BadInput(
            f"input_ids holds {n} ids; the limit is {settings.max_prompt_tokens} (STIP_CLOUD_MAX_PROMPT_TOKENS)"
        )
    if req.max_tokens > settings.max_new_tokens:
        raise BadInput(f"max_tokens {req.max_tokens} exceeds the limit of {settings.max_new_tokens}")
    bad = [i for i in [*req.input_ids, *req.stop_ids] if not 0 <= i < vocab]
    if bad:
        raise BadInput(f"ids must lie in 0..{vocab - 1}: {len(bad)} do not")
    if dep.max_positions is not None and n + req.max_tokens > dep.max_positions:
        raise BadInput(f"{n} prompt ids + max_tokens {req.max_tokens} exceed the model's {dep.max_positions} positions")
    return req


def run(
    service: "CloudService",
    dep: "Deployment",
    req: GenerateRequest,
    on_token: Callable[[int], None] | None = None,
    cancelled: threading.Event | None = None,
) -> GenerateResult:
    """Generate (blocking: run it in a worker thread); `on_token` gets each new relabelled id."""
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    stop = cancelled or threading.Event()
    if isinstance(dep.model, VllmModel):  # the vLLM engine decodes and samples by itself
        return _result(service, dep, req, dep.model.generate(req, on_token, stop))

    class Relay(BaseStreamer):  # type: ignore[misc]
        """generate() hands the prompt first, then each new token (shape (1,))."""

        prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            if on_token is not None:
                for j in value.reshape(-1).tolist():
                    on_token(int(j))

        def end(self) -> None:
            pass

    class Cancelled(StoppingCriteria):  # type: ignore[misc]
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    sample = req.temperature > 0
    options: dict[str, Any] = dict(
        max_new_tokens=req.max_tokens,
        do_sample=sample,
        repetition_penalty=req.repetition_penalty,
        eos_token_id=list(req.stop_ids) or None,
        pad_token_id=req.stop_ids[0] if req.stop_ids else 0,  # batch of one: never used as padding
    )
    if sample:
        options.update(temperature=req.temperature, top_k=req.top_k or 0, top_p=req.top_p or 1.0)
    config = GenerationConfig(**options)
    model = dep.model
    ids = torch.tensor([req.input_ids], dtype=torch.long, device=model.device)  # (1, S) relabelled
    seed = None if not sample else req.seed if req.seed is not None else secrets.randbits(63)
    with dep.lock, _seeded(seed, model.device), torch.inference_mode():
        out = model.model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=config,
            streamer=Relay(),
            stopping_criteria=StoppingCriteriaList([Cancelled()]),
        )
    new = [int(j) for j in out[0, ids.shape[1] :].tolist()]  # relabelled
    return _result(service, dep, req, new)


def _result(service: "CloudService", dep: "Deployment", req: GenerateRequest, new: list[int]) -> GenerateResult:
    service.metrics.tokens.inc(len(req.input_ids) + len(new))
    finish: FinishReason = "stop" if new and new[-1] in req.stop_ids else "length"
    return GenerateResult(
        deployment_id=dep.deployment_id,
        key_version=dep.key_version,
        ids=new,
        finish_reason=finish,
        prompt_tokens=len(req.input_ids),
        generated_tokens=len(new),
    )


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with _SEEDED, torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def events(service: "CloudService", dep: "Deployment", req: GenerateRequest) -> AsyncIterator[bytes]:
    """Server-sent events: one `ids` event per generated id, then `done` (or `error`).

    The generation runs in a thread of its own; a client that goes away stops it at its next step.
    """
    send, receive = anyio.create_memory_object_stream[tuple[str, Any]](max_buffer_size=math.inf)
    token = anyio.lowlevel.current_token()
    cancelled = threading.Event()

    def emit(item: tuple[str, Any]) -> None:
        try:
            anyio.from_thread.run_sync(send.send_nowait, item, token=token)
        except Exception:  # the response is gone (or the loop is): stop generating
            cancelled.set()

    def work() -> None:
        try:
            result = run(service, dep, req, on_token=lambda j: emit((EVENT_IDS, j)), cancelled=cancelled)
            emit((EVENT_DONE, result))
        except Exception as e:
            emit((EVENT_ERROR, e))
        finally:
            with suppress(Exception):
                anyio.from_thread.run_sync(send.close, token=token)

    threading.Thread(target=work, name=f"stip-generate-{dep.deployment_id}", daemon=True).start()
    try:
        async with receive:
            async for kind, value in receive:
                if kind == EVENT_IDS:
                    yield _event(EVENT_IDS, {"ids": [value]})
                elif kind == EVENT_DONE:
                    yield _event(EVENT_DONE, value.model_dump())
                else:
                    yield _event(EVENT_ERROR, _error(value))
    finally:
        cancelled.set()


def _error(e: Exception) -> dict[str, Any]:
    if isinstance(e, BadInput):
        body = ErrorBody(code=E_BAD_INPUT, message=e.message)
    else:
        if not isinstance(e, CloudError):
            log.error("generation failed: %s", type(e).__name__, exc_info=e)
        body = ErrorBody(code=E_INTERNAL, message="generation failed; see the service log")
    return ErrorResponse(error=body).model_dump()


__all__ = ["EVENT_DONE", "EVENT_ERROR", "EVENT_IDS", "SSE_MEDIA_TYPE", "events", "parse", "prepare", "run"]
