"""A TCP fault proxy on loopback, for the fault tests of the backends.

The proxy stands between a client and one server (``FaultProxy(server_port)``) and
forwards bytes both ways until told to misbehave:

- :meth:`FaultProxy.reset_all` ends every open connection with a TCP reset;
- :meth:`FaultProxy.blackhole` holds every byte, of open and new connections, for some
  seconds (a network that drops packets; TCP's retransmission delivers them afterwards);
- :meth:`FaultProxy.freeze` makes the open connections half-open: they stay
  established but carry nothing any more, with no FIN and no RST (new connections work);
- :meth:`FaultProxy.drop_reply` lets a request that contains some bytes (or that a
  predicate picks) reach the server, then drops its reply and resets the connection
  (the server executed the command, the client never learns it);
- :attr:`FaultProxy.latency` delays every chunk by that many seconds.

Only loopback addresses are used: the proxy listens on 127.0.0.1 and connects to
127.0.0.1.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable

Match = bytes | Callable[[bytes], bool]


class _Link:
    """One proxied connection: the client's socket and the server's."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client = client
        self.server = server
        self.frozen = False
        self.drop_next_reply = False
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        """Close both sockets with a TCP reset (SO_LINGER 0), at once."""
        for writer in (self.client, self.server):
            sock = writer.get_extra_info('socket')
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
            writer.transport.abort()
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()


class FaultProxy:
    """A fault-injecting TCP proxy to ``127.0.0.1:target_port``; use ``async with``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.latency = 0.0
        self.links: set[_Link] = set()
        self.replies_dropped = 0
        self.matched = asyncio.Event()  # set when a request matched drop_reply's match
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._drop_match: Match | None = None
        self._drops_left = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, '127.0.0.1', 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        self.reset_all()
        await self._server.wait_closed()

    def dsn(self, scheme_and_auth: str, path: str = '') -> str:
        """``dsn('redis://', '/0')`` -> ``redis://127.0.0.1:PORT/0``."""
        return f'{scheme_and_auth}127.0.0.1:{self.port}{path}'

    # -- faults ---------------------------------------------------------------------

    def reset_all(self) -> None:
        """Reset every open connection (new ones are accepted as usual)."""
        for link in list(self.links):
            link.reset()
        self.links.clear()

    async def blackhole(self, seconds: float) -> None:
        """Carry nothing for ``seconds`` on any connection, then deliver what waited."""
        self._flowing.clear()
        try:
            await asyncio.sleep(seconds)
        finally:
            self._flowing.set()

    @contextlib.asynccontextmanager
    async def blackholed(self) -> AsyncIterator[None]:
        """Carry nothing while the block runs."""
        self._flowing.clear()
        try:
            yield
        finally:
            self._flowing.set()

    def freeze(self) -> int:
        """Make every open connection half-open, for good; return how many."""
        frozen = [link for link in self.links if not link.frozen]
        for link in frozen:
            link.frozen = True
        return len(frozen)

    def drop_reply(self, match: Match, times: int = 1) -> None:
        """The next ``times`` requests that contain ``match`` (bytes), or for which
        ``match(data)`` is true, reach the server; their replies are dropped and their
        connections reset."""
        self._drop_match, self._drops_left = match, times

    # -- forwarding -----------------------------------------------------------------

    async def _accept(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        await self._flowing.wait()  # a blackhole drops the handshake too
        try:
            server_reader, server_writer = await asyncio.open_connection(
                '127.0.0.1', self.target_port)
        except OSError:
            client_writer.transport.abort()
            return
        link = _Link(client_writer, server_writer)
        self.links.add(link)
        loop = asyncio.get_running_loop()
        link.tasks = [loop.create_task(self._pump(link, client_reader, server_writer, True)),
                      loop.create_task(self._pump(link, server_reader, client_writer, False))]
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*link.tasks, return_exceptions=True)
        self.links.discard(link)
        for writer in (client_writer, server_writer):
            writer.transport.abort()

    async def _pump(self, link: _Link, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, to_server: bool) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    if not link.frozen:
                        with contextlib.suppress(OSError):
                            writer.write_eof()
                    return
                received = time.monotonic()
                await self._flowing.wait()
                if link.frozen:
                    continue  # half-open: swallowed, nobody is told
                if to_server:
                    self._watch_request(link, data)
                elif link.drop_next_reply:
                    self.replies_dropped += 1
                    link.reset()
                    return
                delay = received + self.latency - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            link.reset()

    def _watch_request(self, link: _Link, data: bytes) -> None:
        match = self._drop_match
        if match is None or self._drops_left <= 0:
            return
        if match(data) if callable(match) else match in data:
            self._drops_left -= 1
            link.drop_next_reply = True
            self.matched.set()
