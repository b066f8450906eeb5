"""A TCP proxy in front of P2 that records every byte P2 receives, for the leak checks."""

import asyncio
import threading
from contextlib import suppress
from typing import Self

import torch


class LoopbackProxy:
    """A TCP proxy on 127.0.0.1:<port> in front of the target port, run in its own thread;
    subclasses say what happens to a connection (`_handle`)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class RecordingProxy(LoopbackProxy):
    """Forwards 127.0.0.1:<port> to the target and keeps every client-to-P2 byte stream."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.streams: list[bytearray] = []  # one per connection, everything P2 received on it

    @property
    def received(self) -> bytes:
        return b"".join(bytes(s) for s in self.streams)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        record = bytearray()
        self.streams.append(record)
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, keep: bytearray | None) -> None:
            with suppress(ConnectionError, asyncio.CancelledError):
                while data := await r.read(1 << 16):
                    if keep is not None:
                        keep.extend(data)
                    w.write(data)
                    await w.drain()
            with suppress(Exception):
                w.close()

        await asyncio.gather(pipe(client_r, server_w, record), pipe(server_r, client_w, None))


def int_patterns(values: torch.Tensor) -> list[bytes]:
    """The bytes of integer ids as a wire format would carry them (int64 and int32)."""
    return [values.to(dt).numpy().tobytes() for dt in (torch.int64, torch.int32)]
