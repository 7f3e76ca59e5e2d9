"""The frame-socket test environment shared by test_framesocket*.py: a real FrameSocketServer on its
own asyncio loop and a real Unix socket in tmp_path. Blocking client calls that need the server to
answer run in the loop's executor while the loop serves them; everything else drives the loop until a
condition holds."""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from compositor.sources.framesocket import (
    Decoder,
    FrameSocketClient,
    FrameSocketServer,
    GuestConnection,
    encode,
)

# Set to "1", the servers of these tests hand their version-2 clients to the native data plane
# (tests/reliability/test_dataplane_suite.py runs them so).
ON_DATAPLANE = "DIRECTFLIP_TEST_DATAPLANE"


@dataclass
class Env:
    loop: asyncio.AbstractEventLoop
    server: FrameSocketServer
    handler: Any
    path: str
    clients: list[FrameSocketClient] = field(default_factory=list)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call a blocking fn in a thread while the loop serves it."""
        call = functools.partial(fn, *args, **kwargs)
        return self.loop.run_until_complete(self.loop.run_in_executor(None, call))

    def until(self, predicate: Callable[[], Any], timeout: float = 5.0) -> None:
        async def wait() -> None:
            deadline = time.monotonic() + timeout
            while not predicate():
                if time.monotonic() > deadline:
                    raise AssertionError("timed out waiting for the server")
                await asyncio.sleep(0.001)
        self.loop.run_until_complete(wait())

    def spin(self, seconds: float = 0.05) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def client(self, name: str = "office", uuid: str | None = None, **kwargs: Any) -> FrameSocketClient:
        """A FrameSocketClient said hello as `name`; the keywords (pointer=, timeout=) go to it."""
        client = self.run(FrameSocketClient, self.path, name, uuid, **kwargs)
        self.clients.append(client)   # closed at teardown
        return client

    def conn(self, name: str = "office") -> GuestConnection:
        self.until(lambda: any(c.name == name for c in self.server.connections))
        return next(c for c in self.server.connections if c.name == name)

    def events(self, client: FrameSocketClient, count: int) -> list[Any]:
        """Poll until `count` events came (never more: the test sent exactly that many)."""
        events: list[Any] = []
        deadline = time.monotonic() + 5
        while len(events) < count:
            assert time.monotonic() < deadline, f"only {events} arrived"
            events += self.run(client.poll, 0.5)
        assert len(events) == count, events
        return events


def serve(tmp_path, handler: Any) -> Iterator[Env]:
    """Start a server for `handler` on a new loop, yield its Env, then close the clients, the server,
    the executor and the loop (for a fixture: `yield from serve(tmp_path, Recorder())`)."""
    loop = asyncio.new_event_loop()
    path = str(tmp_path / "frames.sock")
    server = FrameSocketServer(path, handler)
    dataplane = None
    if os.environ.get(ON_DATAPLANE) == "1":
        # Every version-2 client is served by the native data plane once welcomed: with no outputs
        # there, each of its messages comes back to Python through the hand-over path.
        from compositor.dataplane import DataPlane
        dataplane = DataPlane()
        dataplane.start()
        server.dataplane = dataplane
        loop.add_reader(dataplane.fileno(),
                        lambda: [server.dataplane_event(ev) for ev in dataplane.events()])
    server.start(loop)
    env = Env(loop, server, handler, path)
    yield env
    for client in env.clients:
        client.close()
    server.close()
    if dataplane is not None:
        loop.remove_reader(dataplane.fileno())
        dataplane.close()
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()


def raw_session(env: Env, *messages: dict[str, Any]) -> list[dict[str, Any]]:
    """Send raw messages on a plain socket, half-close, and return what the server said until it
    closed (blocking parts in the executor while the loop serves)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)

    def talk() -> list[dict[str, Any]]:
        sock.connect(env.path)
        for msg in messages:
            sock.sendall(encode(msg))
        sock.shutdown(socket.SHUT_WR)
        decoder, out = Decoder(), []
        while data := sock.recv(65536):
            out.extend(decoder.feed(data))
        return out

    try:
        return env.run(talk)
    finally:
        sock.close()
