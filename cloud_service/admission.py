"""What a forward request passes before P2 reads its body, and before the forward runs.

In order, after the credential: the user's quota of forwards in flight (429 past
STIP_CLOUD_MAX_FORWARDS_PER_USER), then one of the deployment's body slots (a wait, never a
refusal: STIP_CLOUD_FORWARD_BODIES requests per deployment hold a body in memory at once, so
memory for bodies is bounded by that times STIP_CLOUD_MAX_BODY_BYTES however many clients
send), then the body itself, bounded while it streams, and the size of the answer it asks
for, computed from the safetensors header (422 past STIP_CLOUD_MAX_RESPONSE_BYTES). Only
then is the body decoded and the forward run (service.forward).

Everything here runs in the event loop, the only thread that touches these counters.
"""

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import torch

from cloud_service.errors import ResponseTooLarge, TooManyForwards
from cloud_service.schemas import ForwardOptions
from cloud_service.service import Deployment
from cloud_service.settings import CloudSettings
from shared import wire
from shared.api import INPUTS_EMBEDS
from shared.errors import StipCoreError


class Admission:
    def __init__(self, settings: CloudSettings) -> None:
        self.settings = settings
        self._in_flight: dict[tuple[str, str], int] = {}  # (deployment, user) -> forwards
        self._bodies: dict[str, anyio.Semaphore] = {}  # deployment -> its body slots

    def in_flight(self, deployment_id: str, subject: str) -> int:
        return self._in_flight.get((deployment_id, subject), 0)

    @asynccontextmanager
    async def forward(self, deployment_id: str, subject: str) -> AsyncIterator[None]:
        """Hold one of the user's forward slots, then one of the deployment's body slots."""
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
            slots = self._bodies.get(deployment_id)
            if slots is None:
                slots = self._bodies[deployment_id] = anyio.Semaphore(self.settings.forward_bodies)
            async with slots:
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
    itemsize = torch.empty((), dtype=wire.DTYPES[x.dtype]).element_size()
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


__all__ = ["Admission", "check_response_size"]
