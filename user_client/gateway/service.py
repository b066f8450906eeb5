"""The gateway's logic: OpenAI requests mapped to `StipClient` calls, testable without HTTP.

Everything here runs on the user's machine (P3): prompts are tokenised, chat templates applied,
tokens sampled, log-probabilities computed and text detokenised locally; P2 only ever receives
x·π through the SDK. Each model name maps to one `StipClient` (thread-safe; each generation has
its own P2 session). Token mode does not exist yet, so every deployment is served in embeds mode.

Errors are `GatewayError`s carrying OpenAI's status, type, param and code; `from_stip` is the one
place that maps the SDK's exceptions to them.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import secrets
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from user_client import errors
from user_client.bundle import Bundle
from user_client.client import Step, StipClient
from user_client.errors import StipError
from user_client.gateway import schemas as s
from user_client.gateway.settings import ModelSpec
from user_client.sampling import SamplingParams, TextAssembler
from user_client.settings import ClientSettings

log = logging.getLogger("stip.gateway")

FinishReason = Literal["stop", "length"]
ClientFactory = Callable[[ModelSpec], StipClient]


class GatewayError(Exception):
    """An error as the OpenAI API reports it: HTTP `status` and the body's type, param, code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 (OpenAI's field name)
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        detail = s.ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return s.ErrorResponse(error=detail).model_dump()


def from_stip(e: StipError, model: str) -> GatewayError:
    """The SDK's exception for `model` -> the OpenAI status a client of that API expects."""
    where = f"model {model!r}: {e.message}"
    if isinstance(e, errors.TransportError):  # P1 or P2 down or unreachable
        return GatewayError(503, where, type="server_error", code="upstream_unavailable")
    if isinstance(e, errors.KeyOutdated | errors.SessionExpired):  # a rotation or restart that retries could not absorb
        return GatewayError(503, f"{where}; retry shortly", type="server_error", code=e.code or "key_outdated")
    if isinstance(e, errors.RateLimited):
        return GatewayError(429, where, type="rate_limit_error", code="rate_limit_exceeded")
    if isinstance(e, errors.AuthError):
        return GatewayError(
            403,
            f"{where} (the STIP credential this gateway holds for the model was refused: issue a new one)",
            type="permission_error",
            code="stip_credential_refused",
        )
    if isinstance(e, errors.BadRequest):
        return GatewayError(400, where, code=e.code)
    if isinstance(e, errors.ServerError) and e.status == 503:
        return GatewayError(503, where, type="server_error", code=e.code or "upstream_unavailable")
    if isinstance(e, errors.ServerError | errors.NotFound):
        return GatewayError(502, where, type="server_error", code=e.code or "upstream_error")
    return GatewayError(502, where, type="server_error", code=e.code or "upstream_error")


@dataclass
class TokenInfo:
    """One generated token as the logprobs fields report it."""

    text: str
    logprob: float
    top: list[tuple[str, float]]
    offset: int  # where the token's text starts in the completion


@dataclass
class Piece:
    """What one generation step adds: final text, the tokens drawn, and the end if reached."""

    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    n_tokens: int = 0
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class GenOptions:
    sampling: SamplingParams  # its seed: the first choice's (choice j draws with seed + j)
    stop: tuple[str, ...]
    logprobs: int | None  # None: none; k >= 0: the chosen token's and the k most likely


class Model:
    """One exposed model: its spec and the SDK client of its deployment."""

    def __init__(self, spec: ModelSpec, client: StipClient):
        self.spec = spec
        self.client = client
        self.created = int(time.time())

    @property
    def name(self) -> str:
        return self.spec.name

    def bundle(self) -> Bundle:
        try:
            return self.client.bundle
        except StipError as e:
            raise from_stip(e, self.name) from e

    def card(self) -> s.ModelCard:
        info = s.StipModelInfo(deployment_id=self.spec.deployment_id, mode="embeds")
        try:
            bundle = self.client.bundle
        except StipError as e:
            log.warning("model %s: bundle unavailable: %s", self.name, e.message)
        else:
            info.kind = "encoder" if bundle.is_encoder else "decoder"
            info.family = bundle.family.name
            info.key_version = bundle.key_version
            info.mode = self.client.mode
        return s.ModelCard(id=self.name, created=self.created, stip=info)


def default_client(spec: ModelSpec, env: ClientSettings) -> StipClient:
    return StipClient(
        spec.developer_url,
        cloud_url=spec.cloud_url,
        deployment_id=spec.deployment_id,
        credential=spec.credential,
        settings=env,
    )


class Gateway:
    """The models and the OpenAI operations on them. `close()` ends every client."""

    def __init__(self, specs: Sequence[ModelSpec], *, client_factory: ClientFactory | None = None):
        env = ClientSettings()
        factory = client_factory or (lambda spec: default_client(spec, env))
        self.models: dict[str, Model] = {}
        try:
            for spec in specs:
                self.models[spec.name] = Model(spec, factory(spec))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for model in self.models.values():
            model.client.close()

    def warm(self) -> None:
        """Load every model's bundle (cache or P1) now, so the first request does not wait for it."""
        for model in self.models.values():
            try:
                model.client.bundle  # noqa: B018 (loads and caches the bundle)
            except Exception as e:  # best effort (also racing a shutdown): requests load it again
                log.warning("model %s: could not load its bundle yet: %s", model.name, getattr(e, "message", e))

    def model(self, name: str) -> Model:
        model = self.models.get(name)
        if model is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise GatewayError(
                404,
                f"The model {name!r} does not exist on this gateway (models: {known})",
                param="model",
                code="model_not_found",
            )
        return model

    def list_models(self) -> s.ModelList:
        return s.ModelList(data=[m.card() for m in self.models.values()])

    # --- completions ----------------------------------------------------------------------

    def completion(self, req: s.CompletionRequest) -> s.Completion:
        model, prompts, opts = self._prepare_completion(req)
        choices, usage = [], s.Usage(prompt_tokens=0, total_tokens=0)
        for index, (prompt, seed) in enumerate(_fan_out(prompts, req.n, opts.sampling.seed)):
            text, infos, n_tokens, finish = _collect(self._run(model, prompt, opts, seed))
            choices.append(
                s.CompletionChoice(
                    index=index,
                    text=text,
                    finish_reason=finish,
                    logprobs=_completion_logprobs(infos) if opts.logprobs is not None else None,
                )
            )
            usage.completion_tokens += n_tokens
        usage.prompt_tokens = sum(len(p) for p in prompts)
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        return s.Completion(id=_id("cmpl"), created=int(time.time()), model=model.name, choices=choices, usage=usage)

    def completion_stream(self, req: s.CompletionRequest) -> Generator[str, None, None]:
        """SSE events; the first generation step runs before this returns, so that errors of
        the prefill (P2 down, bad credential) come back as an HTTP status, not mid-stream."""
        model, prompts, opts = self._prepare_completion(req)
        runs = _fan_out(prompts, req.n, opts.sampling.seed)
        created, cid = int(time.time()), _id("cmpl")
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        first = _primed(self._run(model, runs[0][0], opts, runs[0][1]))

        def chunks() -> Generator[dict[str, Any], None, None]:
            completion_tokens = 0
            for index, (prompt, seed) in enumerate(runs):
                with closing(first if index == 0 else self._run(model, prompt, opts, seed)) as pieces:
                    for piece in pieces:
                        completion_tokens += piece.n_tokens
                        if not (piece.text or piece.tokens or piece.finish_reason):
                            continue
                        choice = s.CompletionChoice(
                            index=index,
                            text=piece.text,
                            finish_reason=piece.finish_reason,
                            logprobs=_completion_logprobs(piece.tokens) if opts.logprobs is not None else None,
                        )
                        yield s.Completion(id=cid, created=created, model=model.name, choices=[choice]).model_dump()
            if include_usage:
                usage = _usage(sum(len(p) for p in prompts), completion_tokens)
                yield s.Completion(id=cid, created=created, model=model.name, choices=[], usage=usage).model_dump()

        return _sse(chunks(), model.name)

    def _prepare_completion(self, req: s.CompletionRequest) -> tuple[Model, list[list[int]], GenOptions]:
        model = self._decoder(req.model)
        _refuse(req.echo, "echo", "echo is not supported")
        _refuse(req.suffix is not None, "suffix", "suffix is not supported")
        _refuse(req.best_of not in (None, req.n), "best_of", "best_of other than n is not supported")
        opts = _options(req, req.max_tokens if req.max_tokens is not None else 16, req.logprobs)
        tokenizer = model.bundle().tokenizer
        prompts: list[list[int]]
        p = req.prompt
        if isinstance(p, str):
            prompts = [_tokenize(tokenizer, p, special=True)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [[int(x) for x in p]]  # type: ignore[arg-type]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [_tokenize(tokenizer, str(x), special=True) for x in p]
        elif p and all(isinstance(x, list) for x in p):
            prompts = [[int(t) for t in x] for x in p]  # type: ignore[union-attr]
        else:
            raise GatewayError(400, "prompt must be a string, a list of strings or token ids", param="prompt")
        if any(not ids for ids in prompts):
            raise GatewayError(400, "the prompt is empty", param="prompt")
        return model, prompts, opts

    # --- chat -----------------------------------------------------------------------------

    def chat(self, req: s.ChatCompletionRequest) -> s.ChatCompletion:
        model, prompt, opts = self._prepare_chat(req)
        choices, completion_tokens = [], 0
        for index, (ids, seed) in enumerate(_fan_out([prompt], req.n, opts.sampling.seed)):
            text, infos, n_tokens, finish = _collect(self._run(model, ids, opts, seed))
            choices.append(
                s.ChatChoice(
                    index=index,
                    message=s.AssistantMessage(content=text),
                    finish_reason=finish,
                    logprobs=_chat_logprobs(infos) if opts.logprobs is not None else None,
                )
            )
            completion_tokens += n_tokens
        return s.ChatCompletion(
            id=_id("chatcmpl"),
            created=int(time.time()),
            model=model.name,
            choices=choices,
            usage=_usage(len(prompt), completion_tokens),
        )

    def chat_stream(self, req: s.ChatCompletionRequest) -> Generator[str, None, None]:
        """SSE events as OpenAI streams a chat: per choice a role chunk, content chunks, and a
        chunk with the finish reason; then the usage chunk if asked; the prefill runs first."""
        model, prompt, opts = self._prepare_chat(req)
        runs = _fan_out([prompt], req.n, opts.sampling.seed)
        created, cid = int(time.time()), _id("chatcmpl")
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        first = _primed(self._run(model, prompt, opts, runs[0][1]))

        def chunk(index: int, delta: s.ChatDelta, piece: Piece | None = None) -> dict[str, Any]:
            choice = s.ChatChunkChoice(index=index, delta=delta)
            if piece is not None:
                choice.finish_reason = piece.finish_reason
                if opts.logprobs is not None and piece.tokens:
                    choice.logprobs = _chat_logprobs(piece.tokens)
            out = s.ChatCompletionChunk(id=cid, created=created, model=model.name, choices=[choice])
            return out.model_dump(exclude_none=True)

        def chunks() -> Generator[dict[str, Any], None, None]:
            completion_tokens = 0
            for index, (ids, seed) in enumerate(runs):
                yield chunk(index, s.ChatDelta(role="assistant", content=""))
                with closing(first if index == 0 else self._run(model, ids, opts, seed)) as pieces:
                    for piece in pieces:
                        completion_tokens += piece.n_tokens
                        if piece.text or piece.tokens or piece.finish_reason:
                            yield chunk(index, s.ChatDelta(content=piece.text or None), piece)
            if include_usage:
                usage = _usage(len(prompt), completion_tokens)
                yield s.ChatCompletionChunk(
                    id=cid, created=created, model=model.name, choices=[], usage=usage
                ).model_dump(exclude_none=True)

        return _sse(chunks(), model.name)

    def _prepare_chat(self, req: s.ChatCompletionRequest) -> tuple[Model, list[int], GenOptions]:
        model = self._decoder(req.model)
        _refuse(bool(req.tools or req.functions), "tools", "tools and function calling are not supported")
        fmt = (req.response_format or {}).get("type", "text")
        _refuse(fmt != "text", "response_format", f"response_format {fmt!r} is not supported")
        if req.logprobs:
            logprobs: int | None = req.top_logprobs or 0
        else:
            _refuse(bool(req.top_logprobs), "top_logprobs", "top_logprobs needs logprobs: true")
            logprobs = None
        bundle = model.bundle()
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        prompt = self._chat_prompt(model, bundle, req.messages)
        if limit is None:  # OpenAI's default: until the end, bounded by the context
            limit = max((bundle.max_positions or 4096) - len(prompt), 0)
        return model, prompt, _options(req, limit, logprobs)

    def _chat_prompt(self, model: Model, bundle: Bundle, messages: list[s.ChatMessage]) -> list[int]:
        tokenizer = bundle.tokenizer
        template = model.spec.chat_template or getattr(tokenizer, "chat_template", None)
        if not template:
            raise GatewayError(
                400,
                f"model {model.name!r}: its tokenizer has no chat template; give the gateway one "
                "(chat_template_file in the models file), or use /v1/completions",
                param="messages",
                code="chat_template_missing",
            )
        conversation = [{"role": m.role, "content": _message_text(m)} for m in messages]
        try:
            text = tokenizer.apply_chat_template(
                conversation, chat_template=template, add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # a template error (jinja raises its own types)
            raise GatewayError(400, f"model {model.name!r}: the chat template failed: {e}", param="messages") from e
        return _tokenize(tokenizer, str(text), special=False)  # the template writes the special tokens

    # --- embeddings -----------------------------------------------------------------------

    def embeddings(self, req: s.EmbeddingRequest) -> s.EmbeddingList:
        model = self.model(req.model)
        bundle = model.bundle()
        if not bundle.is_encoder:
            raise GatewayError(400, f"model {model.name!r} is a decoder; embeddings need an encoder", param="model")
        items = [req.input] if isinstance(req.input, str) else list(req.input)
        if not items or not all(isinstance(x, str) for x in items):
            raise GatewayError(400, "input must be a string or a non-empty list of strings", param="input")
        texts = [str(x) for x in items]
        d = int(bundle.key.pi.numel())
        if req.dimensions is not None and req.dimensions != d:
            raise GatewayError(400, f"model {model.name!r} has {d} dimensions", param="dimensions")
        try:
            vectors = model.client.embed(texts)
        except ValueError as e:
            raise GatewayError(400, str(e), param="input") from e
        except StipError as e:
            raise from_stip(e, model.name) from e
        enc = bundle.tokenizer(texts, truncation=True, max_length=bundle.embed_max_length())
        n_tokens = sum(len(ids) for ids in enc["input_ids"])
        data = [
            s.Embedding(index=i, embedding=_encode_vector(row, req.encoding_format)) for i, row in enumerate(vectors)
        ]
        return s.EmbeddingList(
            data=data, model=model.name, usage=s.Usage(prompt_tokens=n_tokens, total_tokens=n_tokens)
        )

    # --- generation -----------------------------------------------------------------------

    def _decoder(self, name: str) -> Model:
        model = self.model(name)
        if model.bundle().is_encoder:
            raise GatewayError(
                400, f"model {name!r} is an encoder: use /v1/embeddings", param="model", code="model_not_supported"
            )
        return model

    def _run(self, model: Model, prompt: list[int], opts: GenOptions, seed: int | None) -> Generator[Piece, None, None]:
        """One choice: a Piece per step, then one with the rest of the text and the finish reason."""
        client = model.client
        try:
            bundle = client.bundle
            tokenizer = bundle.tokenizer
            eos_ids = bundle.eos_token_ids()
            params = replace(opts.sampling, seed=seed)
            steps = client.generate_steps(prompt, params, eos=True, full_scores=opts.logprobs is not None)
            assembler = TextAssembler(tokenizer, opts.stop)
            finish: FinishReason = "length"
            try:
                for step in steps:
                    info = _token_info(tokenizer, assembler.ids, step, opts.logprobs)
                    text = assembler.push(step.token_id)
                    if assembler.stopped or step.token_id in eos_ids:
                        finish = "stop"
                    yield Piece(text, [info] if info else [], 1)
                    if assembler.stopped:
                        break
                yield Piece(assembler.finish(), finish_reason=finish)
            finally:
                steps.close()  # deletes the P2 session when the client stops reading
        except StipError as e:
            raise from_stip(e, model.name) from e
        except ValueError as e:  # the SDK's checks: an empty or too long prompt, bad token ids
            raise GatewayError(400, f"model {model.name!r}: {e}") from e


def _options(req: s.CompletionRequest | s.ChatCompletionRequest, max_tokens: int, logprobs: int | None) -> GenOptions:
    for name in ("presence_penalty", "frequency_penalty"):
        _refuse(bool(getattr(req, name)), name, f"{name} is not supported (use repetition_penalty)")
    _refuse(bool(req.logit_bias), "logit_bias", "logit_bias is not supported")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    sampling = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        repetition_penalty=req.repetition_penalty or 1.0,
        seed=req.seed,
    )
    return GenOptions(sampling, stop=tuple(x for x in stop if x), logprobs=logprobs)


def _refuse(condition: bool, param: str, message: str) -> None:
    if condition:
        raise GatewayError(400, message, param=param, code="unsupported_parameter")


def _fan_out(prompts: list[list[int]], n: int, seed: int | None) -> list[tuple[list[int], int | None]]:
    """Every (prompt, seed) pair, choice index order: n choices per prompt, seeds seed, seed+1, ..."""
    return [(prompt, None if seed is None else seed + j) for prompt, j in itertools.product(prompts, range(n))]


def _primed(pieces: Generator[Piece, None, None]) -> Generator[Piece, None, None]:
    """Run the first step now (the prefill); the rest when iterated. Closing the result closes
    `pieces` (and so deletes the P2 session)."""
    first = next(pieces)

    def rest() -> Generator[Piece, None, None]:
        yield first
        yield from pieces

    return rest()


def _collect(pieces: Iterator[Piece]) -> tuple[str, list[TokenInfo], int, FinishReason]:
    text, infos, n_tokens, finish = [], [], 0, "length"
    for piece in pieces:
        text.append(piece.text)
        infos += piece.tokens
        n_tokens += piece.n_tokens
        finish = piece.finish_reason or finish
    return "".join(text), infos, n_tokens, finish  # type: ignore[return-value]


def _sse(chunks: Generator[dict[str, Any], None, None], model: str) -> Generator[str, None, None]:
    """Server-sent events as OpenAI sends them; an error after the start is one `error` event.
    A client that goes away closes this generator, which closes the generation under it."""
    try:
        with closing(chunks):
            for chunk in chunks:
                yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
    except GatewayError as e:
        log.warning("model %s: stream ended by an error: %s", model, e.message)
        yield f"data: {json.dumps(e.body())}\n\n"
    yield "data: [DONE]\n\n"


def _token_info(tokenizer: Any, before: list[int], step: Step, k: int | None) -> TokenInfo | None:
    """Log-probabilities of the raw model distribution (before temperature and filters), as vLLM reports them."""
    if k is None:
        return None
    if step.scores is None:  # token mode: P2 sampled; generate_steps(full_scores=True) uses embeds mode
        raise GatewayError(500, "no logits reached the user for this token", type="server_error")
    logprobs = torch.log_softmax(step.scores.float(), dim=-1)  # (V,)
    top: list[tuple[str, float]] = []
    if k:
        values, ids = torch.topk(logprobs, k)
        top = [(_token_text(tokenizer, int(i)), float(v)) for v, i in zip(values, ids, strict=True)]
    offset = len(tokenizer.decode(before, skip_special_tokens=True)) if before else 0
    return TokenInfo(_token_text(tokenizer, step.token_id), float(logprobs[step.token_id]), top, offset)


def _token_text(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id]))


def _completion_logprobs(infos: list[TokenInfo]) -> s.CompletionLogprobs:
    return s.CompletionLogprobs(
        tokens=[t.text for t in infos],
        token_logprobs=[t.logprob for t in infos],
        top_logprobs=[dict(t.top) for t in infos],
        text_offset=[t.offset for t in infos],
    )


def _chat_logprobs(infos: list[TokenInfo]) -> s.ChatLogprobs:
    def b(text: str) -> list[int]:
        return list(text.encode("utf-8"))

    return s.ChatLogprobs(
        content=[
            s.TokenLogprob(
                token=t.text,
                logprob=t.logprob,
                bytes=b(t.text),
                top_logprobs=[s.TopLogprob(token=x, logprob=lp, bytes=b(x)) for x, lp in t.top],
            )
            for t in infos
        ]
    )


def _message_text(message: s.ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for part in message.content:
        if part.type != "text":
            raise GatewayError(400, f"content parts of type {part.type!r} are not supported", param="messages")
        parts.append(part.text or "")
    return "".join(parts)


def _tokenize(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    # no padding and no truncation: a tokenizer.json may pad every input to a fixed length
    enc = tokenizer(text, add_special_tokens=special, padding=False, truncation=False)
    return [int(i) for i in enc["input_ids"]]


def _encode_vector(row: torch.Tensor, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(row.detach().cpu().numpy().astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in row.tolist()]


def _usage(prompt_tokens: int, completion_tokens: int) -> s.Usage:
    return s.Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def _id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"
