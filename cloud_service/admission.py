"""What a forward request passes before P2 reads its body, and before the forward runs.

In order, after the credential: the user's quota of forwards in flight (429 past
STIP_CLOUD_MAX_FORWARDS_PER_USER), then the body's share of the deployment's body budget (a
wait, never a refusal: STIP_CLOUD_FORWARD_BODIES × STIP_CLOUD_MAX_BODY_BYTES bytes per
deployment, however many clients send), then the body itself, bounded while it streams, and
the size of the answer it asks for, computed from the safetensors header (422 past
STIP_CLOUD_MAX_RESPONSE_BYTES). Only then is the body decoded and the forward run
(service.forward).

A body takes its declared `Content-Length` of the budget (BodyLimit has refused one over
STIP_CLOUD_MAX_BODY_BYTES), an undeclared (chunked) one a whole STIP_CLOUD_MAX_BODY_BYTES: so
STIP_CLOUD_FORWARD_BODIES bodies of any size fit at once, as many small ones as their bytes
allow (the decode steps of every concurrent session, which the scheduler batches), and memory
for bodies stays within the same bound. Waiters are served in arrival order, so a large body
is not starved by a stream of small ones.

Everything here runs in the event loop, the only thread that touches these counters.
"""

import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from cloud_service.errors import ResponseTooLarge, TooManyForwards
from cloud_service.schemas import ForwardOptions
from cloud_service.service import Deployment
from cloud_service.settings import CloudSettings
from shared import wire
from shared.api import INPUTS_EMBEDS
from shared.errors import StipCoreError


class ByteBudget:
    """Bytes that bodies may hold at once; `take` waits (first come, first served) for its share."""

    def __init__(self, total: int) -> None:
        self.total = self.free = total
        self._waiting: deque[tuple[int, anyio.Event]] = deque()

    @asynccontextmanager
    async def take(self, size: int) -> AsyncIterator[None]:
        size = max(0, min(size, self.total))
        if self._waiting or size > self.free:
            waiter = (size, anyio.Event())
            self._waiting.append(waiter)
            try:
                await waiter[1].wait()
            except BaseException:  # cancelled: give back what was granted meanwhile, or stop waiting
                if waiter[1].is_set():
                    self._give(size)
                else:
                    self._waiting.remove(waiter)
                    self._grant()
                raise
        else:
            self.free -= size
        try:
            yield
        finally:
            self._give(size)

    def _give(self, size: int) -> None:
        self.free += size
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self._waiting[0][0] <= self.free:
            size, event = self._waiting.popleft()
            self.free -= size
            event.set()


class Admission:
    def __init__(self, settings: CloudSettings) -> None:
        self.settings = settings
        self._in_flight: dict[tuple[str, str], int] = {}  # (deployment, user) -> forwards
        self._bodies: dict[str, ByteBudget] = {}  # deployment -> its body budget

    def in_flight(self, deployment_id: str, subject: str) -> int:
        return self._in_flight.get((deployment_id, subject), 0)

    @asynccontextmanager
    async def forward(self, deployment_id: str, subject: str, body_bytes: int | None = None) -> AsyncIterator[None]:
        """Hold one of the user's forward slots, then the body's share of the deployment's budget
        (`body_bytes`: the declared Content-Length; None: a whole STIP_CLOUD_MAX_BODY_BYTES)."""
        key = (deployment_id, subject)
        held = self._in_flight.get(key, 0)
        limit = self.settings.max_forwards_per_user
        if held >= limit:
            raise TooManyForwards(
                f"this user already has {held} forwards in flight on {deployment_id!r}, the per-user limit "
                f"(STIP_CLOUD_MAX_FORWARDS_PER_USER={limit}): wait for one to finish"
            )
        self._in_flight[key] = held + 1
        try:
            budget = self._bodies.get(deployment_id)
            if budget is None:
                s = self.settings
                budget = self._bodies[deployment_id] = ByteBudget(s.forward_bodies * s.max_body_bytes)
            async with budget.take(self.settings.max_body_bytes if body_bytes is None else body_bytes):
                yield
        finally:
            left = self._in_flight[key] - 1
            if left:
                self._in_flight[key] = left
            else:
                del self._in_flight[key]


def check_response_size(dep: Deployment, body: bytes, options: ForwardOptions, limit: int) -> None:
    """Refuse (422) a forward whose outputs would pass `limit` bytes, before it runs.

    The size follows from the header alone: `inputs_embeds` [B, S, d] and its dtype, the output
    mode, and the model's output width. A body whose header does not parse is left to
    service.forward, which says what is wrong with it.
    """
    try:
        infos, _, _ = wire.parse_header(body, body_size=len(body))
    except StipCoreError:
        return
    x = infos.get(INPUTS_EMBEDS)
    if x is None or len(x.shape) != 3 or x.dtype not in ("F32", "F16", "BF16"):
        return
    batch, seq, width = x.shape
    itemsize = wire.ITEMSIZES[x.dtype]
    d_out = dep.model.dims.d_out
    rows = seq if options.output == "all" else 1
    if dep.family.is_encoder:
        what, dims = "hidden states", (batch, rows, d_out)
        size = math.prod(dims) * itemsize + batch * width * itemsize  # and the pooled output [B, d]
    elif options.output == "topk":
        what, dims = "top-k values and indices", (batch, 1, options.k or 1)
        size = math.prod(dims) * (itemsize + 8)  # int64 indices
    else:
        what, dims = "logits", (batch, rows, d_out)
        size = math.prod(dims) * itemsize
    if size <= limit:
        return
    shape = "x".join(str(n) for n in dims)
    if options.output == "all":
        hint = "ask for output=last or output=topk, or send a smaller batch or a shorter sequence"
    else:
        hint = "send a smaller batch"
    raise ResponseTooLarge(
        f"output={options.output} would return {shape} {what}, {size} bytes, over the limit of {limit} "
        f"(STIP_CLOUD_MAX_RESPONSE_BYTES): {hint}"
    )


__all__ = ["Admission", "ByteBudget", "check_response_size"]
