"""Continuous batching on P2: concurrent forwards of one deployment run as one batched pass.

Two pieces, both free of HTTP:

- `Batcher`, the scheduler: one thread per deployment takes whatever requests are waiting,
  forms a batch (at most `max_rows` rows and `max_tokens` padded positions, one step per
  session), hands it to an `execute` callback, and starts over. While a batch runs, new
  requests queue; that queue is the next batch. It waits for more requests only while it has
  fewer than the requesters of the last two batches, never longer than `max_wait_s` nor half
  the previous batch's run time, so a single stream never waits.
- `forward_batch`, the maths: requests of different lengths, each with its own KV cache of
  its own length (or none), stacked into one forward of the stock model on `inputs_embeds`,
  and split back. Every row equals what it would be alone, to float rounding:
  - decoders pad on the left: row b reads `[pad .. | past_b | pad .. | new_b]`, the cache
    layers are zero-padded on the left to the longest past, and the attention mask hides
    every pad; RoPE positions come from the mask (`Family.position_ids`, as `generate()`
    counts real tokens), learned positions were added by P3 (P2's GPT-2 table is zero);
  - encoders pad on the right with mask 0, so the pooler's first position stays in place.
  Each session's cache is then extended by its own new positions only: it holds exactly
  what an unbatched forward would have left there.

Only plain `DynamicCache` layers are stacked (sliding-window layers drop old positions, so
their padding would not line up); anything else runs alone (`batchable` says False).
"""

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.nn import functional as F  # noqa: N812
from transformers.cache_utils import DynamicCache, DynamicLayer

from shared.families import CloudOutput
from shared.families.base import CausalLMFamily
from shared.runtime import CloudModel

log = logging.getLogger("stip.cloud.batching")

Layout = Literal["left", "right"]


# --- the maths: stacking and splitting ------------------------------------------------------


class InputShape:
    """`rows` (B) and `seq` (S) of a request's new inputs `x` (B, S, d)."""

    x: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    @property
    def seq(self) -> int:
        return int(self.x.shape[1])


@dataclass
class BatchItem(InputShape):
    """One request's rows: new inputs and, for a session, its cache and mask so far."""

    x: torch.Tensor  # (B, S, d) permuted by π, on the model's device and dtype
    mask: torch.Tensor | None  # (B, S) of the new rows only, 0/1, or None (all real)
    cache: Any = None  # the session's DynamicCache (B, H, L, hd) per layer, or None
    held: torch.Tensor | None = None  # (B, L) the session's mask so far, or None
    last_only: bool = False
    keep_cache: bool = False  # a session step: return its extended cache

    @property
    def past(self) -> int:
        return 0 if self.held is None else int(self.held.shape[1])


def layout(model: CloudModel) -> Layout | None:
    """How requests of this model's family are padded into one batch; None: never batched."""
    if isinstance(model.family, CausalLMFamily):
        return "left"
    if model.family.name == "bert":
        return "right"
    return None


def _plain_cache(cache: Any) -> bool:
    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


def batchable(model: CloudModel, items: Sequence[BatchItem], max_positions: int | None) -> bool:
    """Whether `forward_batch` can run these items together exactly."""
    lay = layout(model)
    if lay is None or len(items) < 2:
        return False
    if lay == "right":
        return all(i.cache is None and i.held is None for i in items)
    if not all(i.cache is None or _plain_cache(i.cache) for i in items):
        return False
    span = max(i.past for i in items) + max(i.seq for i in items)  # positions the padded batch spans
    return max_positions is None or span <= max_positions


def forward_batch(model: CloudModel, items: Sequence[BatchItem]) -> list[CloudOutput]:
    """Run several requests as one forward; one CloudOutput per item, as if it ran alone.

    The caller has checked `batchable`. A session item's cache object is extended in place by
    its new positions (as the stock forward would have done) and returned as its output's cache.
    """
    if layout(model) == "right":
        return _encoder_batch(model, items)
    return _decoder_batch(model, items)


def _decoder_batch(model: CloudModel, items: Sequence[BatchItem]) -> list[CloudOutput]:
    past, seq = max(i.past for i in items), max(i.seq for i in items)
    device = model.device
    xs, masks = [], []
    for i in items:
        new = i.mask if i.mask is not None else torch.ones(i.rows, i.seq, dtype=torch.long, device=device)
        held = i.held if i.held is not None else torch.zeros(i.rows, 0, dtype=torch.long, device=device)
        # (B, past + seq): [pad | held | pad | new]
        masks.append(torch.cat([F.pad(held, (past - i.past, 0)), F.pad(new, (seq - i.seq, 0))], dim=1))
        xs.append(F.pad(i.x, (0, 0, seq - i.seq, 0)))  # (B, seq, d), new rows on the right
    x, mask = torch.cat(xs), torch.cat(masks)
    cache = _stack_caches(items, past, model) if past else None
    last_only = all(i.last_only or i.seq == 1 for i in items)
    out = model.forward(x, mask, cache, last_only=last_only)  # (R, 1 or seq, V)
    results, row = [], 0
    for i in items:
        y = out.output[row : row + i.rows]
        y = y[:, -1:] if i.last_only else y[:, y.shape[1] - i.seq :]
        new_cache = _extend_cache(i, out.cache, row, past + seq) if i.keep_cache else None
        results.append(CloudOutput(output=y, cache=new_cache))
        row += i.rows
    return results


def _stack_caches(items: Sequence[BatchItem], past: int, model: CloudModel) -> DynamicCache:
    """One DynamicCache (R, H, past, hd) per layer: each item's layers zero-padded on the left."""
    ref = next(i.cache for i in items if i.cache is not None)
    layers = []
    for n, layer in enumerate(ref.layers):
        keys, values = [], []
        for i in items:
            if i.cache is None:  # a stateless request or a session's first step: all padding
                shape = (i.rows, *layer.keys.shape[1:2], past, layer.keys.shape[-1])
                keys.append(layer.keys.new_zeros(shape))
                values.append(layer.values.new_zeros((*shape[:3], layer.values.shape[-1])))
            else:
                own = i.cache.layers[n]
                keys.append(F.pad(own.keys, (0, 0, past - i.past, 0)))
                values.append(F.pad(own.values, (0, 0, past - i.past, 0)))
        layers.append((torch.cat(keys), torch.cat(values)))
    return DynamicCache(ddp_cache_data=layers)


def _extend_cache(item: BatchItem, batched: Any, row: int, total: int) -> DynamicCache:
    """The item's cache extended by its own new positions (the last `seq` of the batch)."""
    start = total - item.seq
    pieces = [
        (layer.keys[row : row + item.rows, :, start:], layer.values[row : row + item.rows, :, start:])
        for layer in batched.layers
    ]
    if item.cache is None:
        return DynamicCache(ddp_cache_data=[(k.contiguous(), v.contiguous()) for k, v in pieces])
    for layer, (k, v) in zip(item.cache.layers, pieces, strict=True):
        layer.update(k, v)  # one concatenation, as the unbatched forward does
    cache: DynamicCache = item.cache
    return cache


def _encoder_batch(model: CloudModel, items: Sequence[BatchItem]) -> list[CloudOutput]:
    seq = max(i.seq for i in items)
    xs, masks = [], []
    for i in items:
        new = i.mask if i.mask is not None else torch.ones(i.rows, i.seq, dtype=torch.long, device=model.device)
        masks.append(F.pad(new, (0, seq - i.seq)))  # (B, seq): padding on the right
        xs.append(F.pad(i.x, (0, 0, 0, seq - i.seq)))
    out = model.forward(torch.cat(xs), torch.cat(masks), None)  # (R, seq, d) permuted by π
    results, row = [], 0
    for i in items:
        y = out.output[row : row + i.rows, : i.seq]
        pooled = out.pooled[row : row + i.rows] if out.pooled is not None else None
        results.append(CloudOutput(output=y[:, -1:] if i.last_only else y, cache=None, pooled=pooled))
        row += i.rows
    return results


# --- the scheduler -------------------------------------------------------------------------


@dataclass
class Job:
    """A validated request waiting for the scheduler; `future` gets the executor's result."""

    rows: int
    seq: int
    session_id: str | None  # at most one step of a session per batch
    payload: Any  # what the executor needs (the service's parsed request)
    future: Future = field(default_factory=Future)


class Batcher:
    """One deployment's scheduler thread: forms batches from waiting jobs, runs `execute`.

    `execute(jobs)` must settle every job's future (result or exception). The thread starts
    with the first job and ends after `idle_s` without work (a replaced deployment's batcher
    thus goes away by itself).
    """

    def __init__(
        self,
        execute: Callable[[list[Job]], None],
        *,
        max_rows: int,
        max_tokens: int,
        max_wait_s: float,
        idle_s: float = 2.0,
        name: str = "stip-batcher",
    ) -> None:
        self.execute = execute
        self.max_rows, self.max_tokens, self.max_wait_s, self.idle_s = max_rows, max_tokens, max_wait_s, idle_s
        self.name = name
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._expect = 1  # requesters seen in the last two batches: worth a short wait for as many
        self._expected: set[str] = set()  # the sessions among them (less those `forget` was told of)
        self._stateless = 0  # and the stateless requests of the last batch
        self._last_sessions: set[str] = set()
        self._last_run_s = 0.0  # how long the previous batch took: waits stay well below it
        self.batches = 0  # counters, for tests and metrics
        self.jobs = 0

    def submit(self, job: Job) -> Future:
        with self._cond:
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return job.future

    def forget(self, session_id: str) -> None:
        """The session ended: no batch waits for its next step (a new generation's second step
        would otherwise wait for the one before it, which never comes)."""
        with self._cond:
            self._expected.discard(session_id)
            self._last_sessions.discard(session_id)
            self._expect = max(1, len(self._expected) + self._stateless)

    def _fits(self, batch: list[Job], job: Job) -> bool:
        if job.session_id is not None and any(j.session_id == job.session_id for j in batch):
            return False
        rows = sum(j.rows for j in batch) + job.rows
        seq = max([j.seq for j in batch] + [job.seq])
        return rows <= self.max_rows and rows * seq <= self.max_tokens

    def _take(self, batch: list[Job]) -> None:
        """Move every waiting job that fits into `batch`, in arrival order (under the lock)."""
        kept: deque[Job] = deque()
        while self._queue:
            job = self._queue.popleft()
            if not batch or self._fits(batch, job):
                batch.append(job)
            else:
                kept.append(job)
        self._queue = kept

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            if not self._queue:
                self._cond.wait(self.idle_s)
                if not self._queue:
                    self._thread = None
                    return None
            batch: list[Job] = []
            self._take(batch)
            deadline = time.monotonic() + min(self.max_wait_s, self._last_run_s / 2)
            while len(batch) < self._expect and not self._queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
                self._take(batch)
            self._take(batch)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            # Streams whose steps arrive staggered split into groups that alternate; expecting
            # everyone seen in the last two batches lets the groups merge into one batch.
            sessions = {j.session_id for j in batch if j.session_id is not None}
            with self._cond:
                self._stateless = sum(j.session_id is None for j in batch)
                self._expected = sessions | self._last_sessions
                self._expect = max(1, len(self._expected) + self._stateless)
                self._last_sessions = sessions
            self.batches += 1
            self.jobs += len(batch)
            started = time.monotonic()
            try:
                self.execute(batch)
            except BaseException as e:  # the executor failed as a whole: every job hears it
                log.exception("batch of %d failed", len(batch))
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
            self._last_run_s = time.monotonic() - started


__all__ = ["BatchItem", "Batcher", "Job", "batchable", "forward_batch", "layout"]
