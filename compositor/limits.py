"""What frame-socket clients may hold of the compositor: the numbers `directflip run` takes as
options. Kept apart from the frame socket's implementation so that the command line can show the
defaults without importing asyncio and the server."""

from __future__ import annotations

from dataclasses import dataclass

MAX_PENDING_FDS = 16  # descriptors received whose buffer message has not fully arrived yet
MAX_BUFFERS = 64  # per connection by default (Limits.buffers): each one holds a descriptor of ours


@dataclass(frozen=True)
class Limits:
    """What one client, one user and all clients together may hold of the server (`directflip run`
    sets them: --hello-timeout, --max-connections, --max-connections-per-user, --max-buffers). Each
    refusal names the limit it hit. The defaults bound the descriptors every client can make the
    compositor hold at connections × (1 + MAX_PENDING_FDS + buffers) = 256 × 81; `directflip run`
    raises its descriptor limit to cover that at start, so admitted guests never lose a descriptor
    because other clients took them all."""

    hello_timeout: float = 5.0  # seconds a client has to say hello
    connections: int = 256  # frame-socket connections at once, admitted or not
    per_user: int = 32  # ... of one uid
    buffers: int = MAX_BUFFERS  # buffers announced per connection
    # bytes their planes span, together, per connection: what a copy of each may map or read
    buffer_bytes: int = 2 << 30

    def descriptors(self) -> int:
        """The most descriptors frame-socket clients can make the server hold at once."""
        return self.connections * (1 + MAX_PENDING_FDS + self.buffers)


DEFAULT_LIMITS = Limits()
