"""Fake P1 and P2 for the SDK tests: small FastAPI apps that implement the HTTP contract of
PROTOCOL.md section 4 on top of the shared core (transform_model_dir, load_cloud_model, wire).

They are deliberately simple (no signed credentials: a fixed bearer token per deployment) and
record what they receive, so tests can check what the client sent and how often.
"""

from __future__ import annotations

import io
import json
import secrets
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.from_thread
import httpx
import torch
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from shared import api, wire
from shared.errors import BadTensor
from shared.runtime import CloudModel

# --- a sync httpx transport that runs an ASGI app in-process -------------------------------


class SyncASGITransport(httpx.BaseTransport):
    """httpx.ASGITransport is async-only; this runs it on an event loop in a helper thread so a
    sync `httpx.Client` can talk to a FastAPI app in-process. `close()` is a no-op (clients
    close their transport); `shutdown()` stops the loop."""

    def __init__(self, app: Any):
        self._inner = httpx.ASGITransport(app=app)
        self._cm = anyio.from_thread.start_blocking_portal()
        self._portal = self._cm.__enter__()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()

        async def run() -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            req = httpx.Request(request.method, request.url, headers=request.headers, content=body)
            resp = await self._inner.handle_async_request(req)
            content = b"".join([chunk async for chunk in resp.stream])  # type: ignore[union-attr]
            return resp.status_code, resp.headers.raw, content

        status, headers, content = self._portal.call(run)
        return httpx.Response(status, headers=headers, content=content, request=request)

    def close(self) -> None:
        pass

    def shutdown(self) -> None:
        self._cm.__exit__(None, None, None)


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:] if auth.startswith("Bearer ") else None


# --- fake P1 --------------------------------------------------------------------------------


def tar_dir(src: Path, *, manifest: dict[str, Any], prefix: str = "") -> bytes:
    """An uncompressed tar of a user/ directory, with stip.json replaced by `manifest`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src).as_posix()
            if rel == "stip.json" or not path.is_file():
                continue
            tar.add(path, arcname=prefix + rel, recursive=False)
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo(prefix + "stip.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class DeveloperState:
    credential: str
    cloud_url: str
    bundles: dict[str, dict[int, Path]] = field(default_factory=dict)  # deployment -> version -> user/
    current: dict[str, int] = field(default_factory=dict)
    fetches: int = 0
    prefix: str = ""  # arcname prefix, e.g. "user/"
    override: bytes | None = None  # serve these bytes instead of a real bundle
    headers_override: dict[str, str] = field(default_factory=dict)
    fail_next: list[int] = field(default_factory=list)  # statuses to answer before serving


def developer_app(state: DeveloperState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/deployments/{dep}/user-key")
    def user_key(dep: str, request: Request) -> Response:
        if bearer(request) != state.credential:
            return error(401, api.E_UNAUTHORIZED, "invalid credential")
        if dep not in state.bundles:
            return error(404, api.E_NOT_FOUND, f"unknown deployment {dep}")
        if state.fail_next:
            status = state.fail_next.pop(0)
            return error(status, api.E_INTERNAL if status >= 500 else api.E_BAD_INPUT, "injected")
        state.fetches += 1
        version = state.current[dep]
        user_dir = state.bundles[dep][version]
        manifest = json.loads((user_dir / "stip.json").read_text())
        manifest.update(deployment_id=dep, cloud_url=state.cloud_url)
        body = state.override or tar_dir(user_dir, manifest=manifest, prefix=state.prefix)
        headers = {
            api.KEY_VERSION_HEADER: str(version),
            api.FINGERPRINT_HEADER: manifest["fingerprint"],
            **state.headers_override,
        }
        return Response(body, media_type="application/x-tar", headers=headers)

    return app


# --- fake P2 --------------------------------------------------------------------------------


@dataclass
class CloudSession:
    deployment: str
    key_version: int
    cache: Any = None
    mask: torch.Tensor | None = None  # (1, length) of every position so far

    @property
    def length(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])


@dataclass
class CloudState:
    credential: str
    models: dict[str, dict[int, CloudModel]] = field(default_factory=dict)  # deployment -> version
    active: dict[str, int] = field(default_factory=dict)
    sessions: dict[str, CloudSession] = field(default_factory=dict)
    max_sessions: int = 8
    forwards: list[dict[str, Any]] = field(default_factory=list)  # what every forward received
    bodies: list[bytes] = field(default_factory=list)  # every request body, verbatim
    fail_next: list[tuple[int, str]] = field(default_factory=list)  # (status, code) to answer
    after_forward: Callable[[CloudState], None] | None = None  # hook, e.g. to rotate mid-stream
    lock: threading.Lock = field(default_factory=threading.Lock)


def cloud_app(state: CloudState) -> FastAPI:
    app = FastAPI()

    def check(request: Request, dep: str) -> JSONResponse | None:
        if bearer(request) != state.credential:
            return error(401, api.E_UNAUTHORIZED, "invalid credential")
        if dep not in state.models:
            return error(404, api.E_NOT_FOUND, f"unknown deployment {dep}")
        if state.fail_next:
            status, code = state.fail_next.pop(0)
            return error(status, code, "injected failure")
        return None

    @app.post("/v1/deployments/{dep}/sessions")
    async def create_session(dep: str, request: Request) -> Response:
        state.bodies.append(await request.body())
        if (err := check(request, dep)) is not None:
            return err
        if len(state.sessions) >= state.max_sessions:
            return error(429, api.E_TOO_MANY_SESSIONS, "too many sessions")
        sid = secrets.token_hex(8)
        version = state.active[dep]
        state.sessions[sid] = CloudSession(deployment=dep, key_version=version)
        created = api.SessionCreated(session_id=sid, deployment_id=dep, key_version=version, idle_ttl_s=300)
        return JSONResponse(created.model_dump(), status_code=201)

    @app.delete("/v1/sessions/{sid}")
    def delete_session(sid: str, request: Request) -> Response:
        if bearer(request) != state.credential:
            return error(401, api.E_UNAUTHORIZED, "invalid credential")
        if state.sessions.pop(sid, None) is None:
            return error(404, api.E_NOT_FOUND, "unknown session")
        return Response(status_code=204)

    @app.post("/v1/deployments/{dep}/forward")
    async def forward(dep: str, request: Request) -> Response:
        body = await request.body()
        state.bodies.append(body)
        if (err := check(request, dep)) is not None:
            return err
        q = request.query_params
        version = state.active[dep]
        if request.headers.get(api.KEY_VERSION_HEADER) != str(version):
            return error(409, api.E_KEY_OUTDATED, f"key version {version} is active")
        try:
            tensors, _ = wire.decode(body)
        except BadTensor as e:
            return error(400, api.E_BAD_INPUT, str(e))
        model = state.models[dep][version]
        x = tensors.get(api.INPUTS_EMBEDS)
        if x is None or x.dim() != 3 or x.shape[-1] != model.dims.d_model:
            return error(400, api.E_BAD_INPUT, "inputs_embeds must be (B, S, d)")
        mask = tensors.get(api.ATTENTION_MASK)
        sid = q.get("session_id")
        output, k = q.get("output", "all"), int(q.get("k", "0") or 0)
        state.forwards.append(
            {"shape": tuple(x.shape), "session": sid, "output": output, "k": k, "names": sorted(tensors)}
        )
        session = None
        if sid is not None:
            session = state.sessions.get(sid)
            if session is None:
                return error(410, api.E_SESSION_EXPIRED, "session expired")
            if session.key_version != version:
                return error(409, api.E_KEY_OUTDATED, "the session's key was rotated")
            new = mask if mask is not None else torch.ones(x.shape[:2], dtype=torch.long)
            full = new if session.mask is None else torch.cat([session.mask, new], dim=1)
            result = model.forward(x, full, session.cache)
            session.cache, session.mask = result.cache, full
        else:
            result = model.forward(x, mask)
        out: dict[str, torch.Tensor] = {}
        if model.family.is_encoder:
            out[api.HIDDEN_STATES] = result.output
            if result.pooled is not None:
                out[api.POOLED] = result.pooled
        elif output == "topk":
            values, index = torch.topk(result.output[:, -1:], k, dim=-1)  # last position, as P2
            out[api.TOPK_VALUES], out[api.TOPK_INDICES] = values, index
        elif output == "last":
            out[api.LOGITS] = result.output[:, -1:]
        else:
            out[api.LOGITS] = result.output
        meta = {
            api.META_DEPLOYMENT: dep,
            api.META_KEY_VERSION: str(version),
            api.META_SESSION_LENGTH: str(session.length if session else x.shape[1]),
        }
        if state.after_forward is not None:
            state.after_forward(state)
        return Response(wire.encode(out, meta), media_type=wire.CONTENT_TYPE)

    return app
