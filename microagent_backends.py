"""Backends of microagent: the Redis signal bus and broker, the AMQP (RabbitMQ) broker
and the Kafka broker.

Each client library is imported when its backend is first used, so a machine with only
one of them installed can use that backend; using another raises an ImportError that
names the package to install (``pip install redis``, or ``pip install '.[redis]'`` in a
checkout of microagent: the ``microagent`` of the package index is the unrelated 1.x).

Sections: the transport kit every backend is built on, Redis, AMQP, Kafka. Each backend
section opens with how it stores and delivers messages.
"""
from __future__ import annotations

import asyncio
import bisect
import contextlib
import importlib
import inspect
import logging
import math
import os
import random
import re
import socket
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, NoReturn

import msgspec

from microagent import (
    AbstractQueueBroker,
    AbstractSignalBus,
    ConsumerOptions,
    ConsumerPool,
    CredentialsRefused,
    DeadLetter,
    Delivery,
    Link,
    Queue,
    QueueException,
    QueueNotFound,
    _check_limit,
    _content_ids,
    _read_dead_letter,
    _read_dead_letters,
    _resolve,
    cancel_and_wait,
    error_text,
    redact_dsn,
    trace_headers,
)

if TYPE_CHECKING:
    from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
    from pamqp.commands import Queue as QueueMethods
    from pamqp.common import FieldTable
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub
    from redis.commands.core import AsyncScript

__all__ = ['AMQPBroker', 'KafkaBroker', 'RedisBroker', 'RedisSignalBus']


# =====================================================================================
# The transport kit: what every backend is built on
# =====================================================================================
# One way to translate a client library's failure into the error a caller gets
# (_Transport._failing), one record of the consumption of a queue (_Consumption), and,
# from the core, one way to keep and report a connection (microagent.Link: lost, pause,
# up) and one way to stop (close() drains the consumers, then disconnect()).

def require(module: str, extra: str) -> Any:
    """Import a client library, or raise an ImportError that names what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split('.', maxsplit=1)[0]
        raise ImportError(
            f'this backend needs the {package} package: pip install {package} (in a '
            f"checkout of microagent: pip install '.[{extra}]')") from exc


class _ConnectionAttemptLog(logging.Filter):
    """Lowers the level of a client library's report of one failed connection attempt
    (a transient condition, retried): without it every attempt would be an ERROR line of
    the library. A record lowered below what its logger shows is dropped."""

    def __init__(self, level: int, messages: Iterable[str]) -> None:
        super().__init__()
        self.level = level
        self.messages = frozenset(messages)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in self.messages or record.levelno <= self.level:
            return True
        record.levelno, record.levelname = self.level, logging.getLevelName(self.level)
        return logging.getLogger(record.name).isEnabledFor(self.level)


def lower_connection_attempt_logs(logger: str, level: int, *messages: str) -> None:
    """Log these message templates of a library's logger at ``level`` (installed once)."""
    log = logging.getLogger(logger)
    if not any(isinstance(f, _ConnectionAttemptLog) for f in log.filters):
        log.addFilter(_ConnectionAttemptLog(level, messages))


class _Unreachable(ConnectionError):
    """The server could not be reached, or did not answer in time. The message says
    what failed, where (the DSN without its password) and why."""


class _Transport:
    """The failure handling every backend shares. A backend sets ``SERVER`` (its
    server's name in messages) and ``_failures`` (what its client library raises when
    an operation fails), and may override :meth:`_refused` and :meth:`_after_failure`.
    """

    SERVER: ClassVar[str]
    dsn: str
    _failures: tuple[type[BaseException], ...] = ()

    def _refused(self, error: BaseException) -> bool:
        """True when the server answered no (the error is not a lost connection)."""
        return False

    def _credentials_refused(self, error: BaseException) -> bool:
        """True when the server refused the DSN's credentials."""
        return isinstance(error, CredentialsRefused)

    def _invalid(self, error: BaseException) -> bool:
        """True when the client library refused the arguments (nothing was sent)."""
        return False

    async def _after_failure(self, error: BaseException) -> None:
        """What else a failure means for the backend's connections."""

    def _failure(self, what: str, error: BaseException) -> Exception:
        """The error to raise: :class:`ConnectionError` (``{what}: {SERVER} at {where} is
        unreachable: {why}``) or, when the server refused, :class:`QueueException`."""
        if isinstance(error, (_Unreachable, QueueException, CredentialsRefused)):
            return error
        where, why = redact_dsn(self.dsn), error_text(error)
        if self._credentials_refused(error):
            return CredentialsRefused(f'{what}: {self.SERVER} at {where} refused: {why}')
        if self._invalid(error):
            return QueueException(f'{what}: {why}')
        if self._refused(error):
            return QueueException(f'{what}: {self.SERVER} at {where} refused: {why}')
        return _Unreachable(f'{what}: {self.SERVER} at {where} is unreachable: {why}')

    def _failing(self, what: str, link: Link | None = None) -> _Failing:
        """``async with self._failing(what, link):`` runs an operation: a failure of the
        client library is raised as :meth:`_failure`'s error (and marks ``link`` lost);
        success marks ``link`` up."""
        return _Failing(self, what, link)


class _Failing:
    """The context manager of :meth:`_Transport._failing`: a class, because one made
    with ``contextlib.asynccontextmanager`` costs several µs on every send. It never
    swallows an error (``__aexit__`` returns None), as type checkers then know."""

    __slots__ = ('link', 'transport', 'what')

    def __init__(self, transport: _Transport, what: str, link: Link | None) -> None:
        self.transport, self.what, self.link = transport, what, link

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: object) -> None:
        if error is None:
            if self.link is not None:
                self.link.up()
            return
        if not isinstance(error, self.transport._failures):
            return
        if self.transport._refused(error) or self.transport._invalid(error):
            # the server answered no, or nothing was sent: the link is fine
            raise self.transport._failure(self.what, error) from error
        await self.transport._after_failure(error)
        if self.link is not None:
            self.link.lost(error, self.transport._credentials_refused(error))
        failure = self.transport._failure(self.what, error)
        if failure is error:
            return
        raise failure from error


class _Consumption:
    """The consumption of one queue by one broker, from ``bind`` until the pool drained
    (``unbound``): the pool, the task that feeds it, and the link that says whether
    consuming works. Each backend adds what its transport needs."""

    def __init__(self, name: str, pool: ConsumerPool, link: Link) -> None:
        self.name = name
        self.pool = pool
        self.link = link
        self.task: asyncio.Task[None] | None = None  # the loop that feeds the pool

    def __repr__(self) -> str:
        return f'<{type(self).__name__} {self.name}>'

    async def stop_feeding(self) -> None:
        await cancel_and_wait(self.task)
        self.task = None


# =====================================================================================
# Redis: signal bus and broker
# =====================================================================================
# Redis backends: :class:`RedisSignalBus` (pub/sub) and :class:`RedisBroker` (lists), on
# redis-py's asyncio client (extra ``redis``). Needs Redis >= 6.2 (BLMOVE).
#
# Signal bus: one pub/sub connection per bus carries all its subscriptions (``PSUBSCRIBE``
# patterns), read by one task, and is subscribed again after a reconnection; sends go
# through a pooled connection. Pub/sub is at-most-once: what others publish during an
# outage is lost; a send of the bus's own raises.
#
# Queue broker, at-least-once, wire-compatible with microagent 1.x: queue ``Q`` is the
# list ``Q`` (producers RPUSH a JSON object, consumers take from the head). A Lua script
# moves a batch from the head into flight in one round trip, where it stays until
# acknowledged: ``microagent:{Q}:inflight`` (sorted set, id -> deadline by the server's
# clock; an id is ``<consumer token>:<fetch>:<position>``, unique per message taken) and
# ``microagent:{Q}:bodies`` (hash, id -> body); ``{Q}`` is a Redis Cluster hash tag. Dead
# letters go to the list ``Q.dead``. A live consumer extends its deadlines every third of
# ``VISIBILITY_TIMEOUT``; every consumer puts back at the head what a dead one left in
# flight past its deadline. An empty list is waited on with ``BLMOVE Q Q LEFT LEFT``, a
# no-op, so a consumer killed at any instant loses nothing.
#
# A reply can be lost after Redis ran a command. Only commands whose replay is harmless
# are sent again (by redis-py, once): RPUSH (the message may be stored twice),
# acknowledgements, releases, heartbeats and dead letters (no-ops the second time). The
# fetch never is: run twice it would take the next batch under the same ids. A fetch
# that failed is *unanswered*: before the next fetch its ids are released, which puts
# back whatever it took.


# =====================================================================================
# Redis: connections shared by the bus and the broker
# =====================================================================================

def _redis_client(dsn: str, connect_timeout: float, read_timeout: float | None,
                  retries: int) -> Redis:
    """A redis-py asyncio client with its own connection pool; it connects on first use.

    ``retries``: how many times redis-py sends a command again, at once, after the
    connection broke before its reply arrived. Only for commands whose replay is safe
    (see above): the command may have run already. A pooled connection that the server
    closed meanwhile is often noticed only by the command sent on it, hence the retry.
    """
    client = require('redis.asyncio', 'redis')
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    redis: Redis = client.Redis.from_url(
        dsn, socket_connect_timeout=connect_timeout, socket_timeout=read_timeout,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), retries, supported_errors=(client.ConnectionError,)))
    return redis


class _RedisTransport(_Transport):
    """What the Redis bus and broker share: the DSN check, the errors of redis-py, and
    what a failure means for their clients."""

    SERVER = 'Redis'

    def _clients(self) -> Iterable[Redis | None]:
        return ()

    def _init_transport(self) -> None:
        """Refuse a DSN that is not for Redis (``amqp://...``); import redis-py."""
        scheme = urllib.parse.urlsplit(self.dsn).scheme if isinstance(self.dsn, str) else None
        if scheme not in ('redis', 'rediss', 'unix'):
            shown = redact_dsn(self.dsn) if isinstance(self.dsn, str) else self.dsn
            raise ValueError(f'{type(self).__name__} needs a redis://, rediss:// or unix:// '
                             f'DSN, not {shown!r}')
        self._failures = (require('redis.asyncio', 'redis').RedisError, OSError)
        exceptions = require('redis.exceptions', 'redis')
        self._auth_error = exceptions.AuthenticationError
        self._error_reply = exceptions.ResponseError  # OOM, READONLY, WRONGTYPE, NOPERM...
        self._data_error = exceptions.DataError  # an argument redis-py cannot send

    def _credentials_refused(self, error: BaseException) -> bool:
        """WRONGPASS, NOAUTH: redis-py's AuthenticationError."""
        return isinstance(error, (self._auth_error, CredentialsRefused))

    def _refused(self, error: BaseException) -> bool:
        """Redis answered the command with an error."""
        return isinstance(error, self._error_reply)

    def _invalid(self, error: BaseException) -> bool:
        return isinstance(error, self._data_error)

    async def _after_failure(self, error: BaseException) -> None:
        """Close the idle pooled connections of every client: they share the failed
        one's network path and are likely dead too (half-open); each would wait out its
        own read timeout before the next command could open a fresh one."""
        for client in self._clients():
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.connection_pool.disconnect(inuse_connections=False)

    async def _close_clients(self) -> None:
        for client in self._clients():
            if client is not None:
                await client.aclose()


# =====================================================================================
# Redis signal bus
# =====================================================================================

_PING = 'microagent'  # the message of the bus's PINGs (redis-py swallows its own ones)

# Singleton handlers (see RedisSignalBus): keys under {prefix}:singleton:{KEY}:, where the
# braces make KEY a Redis Cluster hash tag, so the keys of one singleton share a slot.
# Every script is safe to replay (redis-py sends a command once more after a broken
# connection): a repeated claim or acquisition by the same holder answers as the first.

# KEYS: the claim of one tick. ARGV: holder, ttl ms. 1 when the tick is the holder's.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
"""

# KEYS: lease, fencing counter. ARGV: holder, ttl ms. The token '<fence>:<holder>' of the
# lease when the holder has it now (taken, or already its own: extended), else false.
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current then
    if string.sub(current, -string.len(ARGV[1]) - 1) ~= ':' .. ARGV[1] then return false end
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return current
end
local token = redis.call('INCR', KEYS[2]) .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], token, 'NX', 'PX', ARGV[2])
return token
"""

# KEYS: lease. ARGV: token, ttl ms. Compare-and-set: extends the lease if the token holds it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: lease. ARGV: token. Compare-and-delete: ends the lease if the token holds it.
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _milliseconds(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class _SingletonScripts:
    """The bus's scripts for singleton handlers, on the client that runs them."""

    def __init__(self, client: Redis) -> None:
        self.claim: AsyncScript = client.register_script(_CLAIM)
        self.acquire: AsyncScript = client.register_script(_ACQUIRE)
        self.renew: AsyncScript = client.register_script(_RENEW)
        self.release: AsyncScript = client.register_script(_RELEASE_LEASE)


class RedisSignalBus(_RedisTransport, AbstractSignalBus):
    """Signal bus on Redis pub/sub: ``RedisSignalBus('redis://localhost:6379/0', prefix='APP')``.

    Channels are ``{prefix}:{signal}:{sender}`` (RPC requests add ``#{request_id}``,
    answers come on ``{prefix}:response:{bus_uid}#{request_id}``), as in microagent 1.x.
    One pub/sub connection per bus (link ``pubsub``) carries all its subscriptions; after
    a lost connection it reconnects with backoff, forever, and subscribes again. Sends go
    through a pooled connection (link ``publish``).

    Singleton handlers are coordinated with keys under ``{prefix}:singleton:{KEY}:``,
    through another pooled connection (link ``singletons``, opened on first use):
    ``tick:{ms}``, the claim of one tick (``SET NX PX``, kept two gaps between ticks plus
    30 s); ``lease``, the lease of a server (``SET NX PX``, renewed and released by Lua
    compare-and-set scripts on its token ``'<fence>:<holder>'``); ``fence``, the counter
    of the fencing numbers (``INCR``).
    """

    CONNECT_TIMEOUT: ClassVar[float] = 5
    """Seconds to open a connection."""
    COMMAND_TIMEOUT: ClassVar[float] = 5
    """Seconds to wait for the answer to a PUBLISH."""
    SUBSCRIBE_TIMEOUT: ClassVar[float] = 10
    """Seconds :meth:`bind` waits for the server to confirm a subscription."""
    HEALTH_CHECK_INTERVAL: ClassVar[float] = 5
    """Seconds of silence on the pub/sub connection after which it is sent a PING; with
    no answer within as long again, it is taken for dead (half-open) and replaced: a
    silent connection is noticed within twice this."""

    def __init__(self, dsn: str, prefix: str = 'PUBSUB', log: logging.Logger | None = None,
                 **kwargs: Any) -> None:
        super().__init__(dsn, prefix, log, **kwargs)
        self._init_transport()
        self._publisher: Redis | None = None
        self._subscriber: Redis | None = None
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._subscribed_once = False  # this connection: patterns are subscribed again
        self._heard = 0  # messages read from the pub/sub connection (for the watchdog)
        self._patterns: set[str] = set()
        self._confirmations: dict[str, list[asyncio.Future[None]]] = {}
        self._coordinator: Redis | None = None
        self._singleton_scripts: _SingletonScripts | None = None

    def _clients(self) -> Iterable[Redis | None]:
        return self._publisher, self._subscriber, self._coordinator

    async def send(self, channel: str, message: bytes) -> None:
        """PUBLISH ``message``; raise :class:`ConnectionError` when Redis is unreachable.

        A PUBLISH whose connection broke before the reply is sent once more (a pooled
        connection that a server restart closed is often noticed only then), so a signal
        whose reply was lost may reach its receivers twice.
        """
        if self._publisher is None:
            self._publisher = _redis_client(
                self.dsn, self.CONNECT_TIMEOUT, self.COMMAND_TIMEOUT, retries=1)
        async with self._failing('publishing', self.link('publish')):
            await self._publisher.publish(channel, message)

    async def bind(self, channel: str) -> None:
        """PSUBSCRIBE ``channel``; return once the server confirmed the subscription."""
        loop = asyncio.get_running_loop()
        confirmed: asyncio.Future[None] = loop.create_future()
        self._confirmations.setdefault(channel, []).append(confirmed)
        self._patterns.add(channel)
        try:
            if self._reader is None:
                self._reader = loop.create_task(self._read_forever())
            elif self._pubsub is not None:
                # On a broken connection the reader reconnects and subscribes every pattern.
                with contextlib.suppress(*self._failures):
                    await self._pubsub.psubscribe(channel)
            await asyncio.wait_for(confirmed, self.SUBSCRIBE_TIMEOUT)
        except asyncio.TimeoutError:
            self._patterns.discard(channel)
            raise _Unreachable(
                f'subscribing to {channel}: Redis at {redact_dsn(self.dsn)} did not confirm '
                f'within {self.SUBSCRIBE_TIMEOUT}s') from None
        except BaseException:
            self._patterns.discard(channel)
            raise
        finally:
            waiting = self._confirmations.get(channel, [])
            if confirmed in waiting:
                waiting.remove(confirmed)
            if not waiting:
                self._confirmations.pop(channel, None)

    async def unbind(self, channel: str) -> None:
        """PUNSUBSCRIBE ``channel`` (it is not subscribed again after a reconnection)."""
        self._patterns.discard(channel)
        pubsub = self._pubsub
        if pubsub is not None:
            try:
                await pubsub.punsubscribe(channel)
            except self._failures as exc:
                self.log.debug('Unsubscribing %s failed: %s', channel, exc)

    async def disconnect(self) -> None:
        """Stop the reader and close both connections."""
        reader, self._reader = self._reader, None
        await cancel_and_wait(reader)
        self._patterns.clear()
        self._reject_confirmations(_Unreachable(f'{self!r} was closed'))
        await self._close_clients()
        self._publisher = self._subscriber = self._coordinator = None
        self._singleton_scripts = None

    # -- singletons ---------------------------------------------------------------------

    def _singleton_key(self, key: str, *parts: str) -> str:
        return ':'.join((f'{self.prefix}:singleton:{{{key}}}', *parts))

    async def _coordinate(self, what: str, script: Callable[[_SingletonScripts], AsyncScript],
                          keys: list[str], args: list[str | int]) -> Any:
        """Run one of the singleton scripts; raise :class:`ConnectionError` when it fails."""
        if self._singleton_scripts is None:
            self._coordinator = _redis_client(
                self.dsn, self.CONNECT_TIMEOUT, self.COMMAND_TIMEOUT, retries=1)
            self._singleton_scripts = _SingletonScripts(self._coordinator)
        async with self._failing(what, self.link('singletons')):
            return await script(self._singleton_scripts)(keys=keys, args=args)

    async def claim_tick(self, key: str, tick_ms: int, holder: str, ttl: float) -> bool:
        """``SET {prefix}:singleton:{KEY}:tick:{tick_ms} holder NX PX ttl``."""
        claimed = await self._coordinate(
            f'claiming a tick of {key}', lambda scripts: scripts.claim,
            [self._singleton_key(key, 'tick', str(tick_ms))], [holder, _milliseconds(ttl)])
        return bool(claimed)

    async def acquire_lease(self, key: str, holder: str, ttl: float) -> str | None:
        token = await self._coordinate(
            f'taking the lease of {key}', lambda scripts: scripts.acquire,
            [self._singleton_key(key, 'lease'), self._singleton_key(key, 'fence')],
            [holder, _milliseconds(ttl)])
        return token.decode() if isinstance(token, bytes) else token

    async def renew_lease(self, key: str, token: str, ttl: float) -> bool:
        renewed = await self._coordinate(
            f'renewing the lease of {key}', lambda scripts: scripts.renew,
            [self._singleton_key(key, 'lease')], [token, _milliseconds(ttl)])
        return bool(renewed)

    async def release_lease(self, key: str, token: str) -> bool:
        released = await self._coordinate(
            f'releasing the lease of {key}', lambda scripts: scripts.release,
            [self._singleton_key(key, 'lease')], [token])
        return bool(released)

    # -- the reader task ----------------------------------------------------------------

    async def _read_forever(self) -> None:
        """Hold the pub/sub connection: (re)connect, subscribe every pattern, read."""
        if self._subscriber is None:
            self._subscriber = _redis_client(self.dsn, self.CONNECT_TIMEOUT, None, retries=0)
        link = self.link('pubsub')
        while True:
            pubsub = self._subscriber.pubsub()
            try:
                await self._subscribe_and_read(pubsub, link)
            except Exception as exc:
                if not isinstance(exc, self._failures):
                    self.log.exception('Reading the pub/sub connection failed')
                link.lost(exc, self._credentials_refused(exc))
                if not self._subscribed_once:  # unreachable: a waiting bind fails now
                    self._reject_confirmations(self._failure('subscribing', exc))
            finally:
                self._pubsub = None
                self._subscribed_once = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
            await link.pause()

    async def _subscribe_and_read(self, pubsub: PubSub, link: Link) -> NoReturn:
        await pubsub.connect()  # type: ignore[no-untyped-call]
        self._pubsub = pubsub
        self._subscribed_once = True
        if self._patterns:
            await pubsub.psubscribe(*self._patterns)
        link.up()
        handle = self.handle_message
        watchdog = asyncio.get_running_loop().create_task(self._watch_silence(pubsub))
        try:
            while True:
                # Blocking reads: a read with a timeout costs a timer per message; the
                # watchdog task notices silence instead, from the count of messages.
                message = await pubsub.get_message(timeout=None)
                self._heard += 1
                if message is None:
                    continue
                kind = message['type']
                if kind == 'pmessage':
                    try:
                        handle(message['channel'], message['data'])
                    except Exception:
                        self.log.exception('Handling a message of %r failed',
                                           message['channel'])
                elif kind == 'psubscribe':
                    self._confirm(message['channel'])
        finally:
            watchdog.cancel()

    async def _watch_silence(self, pubsub: PubSub) -> None:
        """After ``HEALTH_CHECK_INTERVAL`` with nothing read, PING; when that brings no
        answer within as long again, close the connection: the blocked read fails and the
        reader connects again (a half-open connection would otherwise be read forever)."""
        interval = self.HEALTH_CHECK_INTERVAL
        loop = asyncio.get_running_loop()
        heard, heard_at, pinged_at = self._heard, loop.time(), None
        while True:
            await asyncio.sleep(interval / 5)
            now = loop.time()
            if self._heard != heard:
                heard, heard_at, pinged_at = self._heard, now, None
            elif pinged_at is None and now - heard_at >= interval:
                pinged_at = now
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.ping(_PING), interval)
            elif pinged_at is not None and now - pinged_at >= interval:
                break
        self.log.debug('No answer from Redis for %.0fs: closing the pub/sub connection',
                       loop.time() - heard_at)
        connection: Any = pubsub.connection  # typed None by redis-py until connected
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.disconnect(nowait=True), interval)

    def _confirm(self, pattern: bytes | str) -> None:
        if isinstance(pattern, bytes):
            pattern = pattern.decode('utf-8', 'replace')
        for future in self._confirmations.get(pattern, ()):
            if not future.done():
                future.set_result(None)

    def _reject_confirmations(self, error: BaseException) -> None:
        for futures in self._confirmations.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)


# =====================================================================================
# Redis broker
# =====================================================================================

# KEYS: list, inflight, bodies, delayed. ARGV: count, visibility ms, consumer token,
# fetch number, '1' to look for due delayed messages. First (when asked) appends to the
# list the delayed messages now due (members are "<16 random characters>:<body>").
# Then moves up to `count` messages from the head of the list to the in-flight
# structure, the i-th under the id "<token>:<fetch number>:<i>", and returns their
# bodies (the caller knows the ids: half the reply to parse).
_FETCH = """
if ARGV[5] == '1' then
    local t = redis.call('TIME')
    local due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf',
        tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), 'LIMIT', 0, 2000)
    if #due > 0 then
        local bodies = {}
        for i = 1, #due do bodies[i] = string.sub(due[i], 18) end
        redis.call('RPUSH', KEYS[1], unpack(bodies))
        redis.call('ZREM', KEYS[4], unpack(due))
    end
end
local items = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local n = #items
if n == 0 then return items end
redis.call('LTRIM', KEYS[1], n, -1)
local now = redis.call('TIME')
local deadline = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
    + tonumber(ARGV[2])
local prefix = ARGV[3] .. ':' .. ARGV[4] .. ':'
local scored, fields = {}, {}
for i = 1, n do
    local id = prefix .. i
    scored[2 * i - 1] = deadline
    scored[2 * i] = id
    fields[2 * i - 1] = id
    fields[2 * i] = items[i]
end
redis.call('ZADD', KEYS[2], unpack(scored))
redis.call('HSET', KEYS[3], unpack(fields))
return items
"""

# KEYS: list, inflight, bodies. ARGV: visibility ms, limit, ids of the live consumer...
# Extends the deadlines of the given ids that are still in flight (heartbeat), then puts
# back at the head of the list up to `limit` messages whose deadline passed.
_KEEP = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local deadline = now_ms + tonumber(ARGV[1])
if #ARGV > 2 then
    local scored = {}
    for i = 3, #ARGV do
        scored[#scored + 1] = deadline
        scored[#scored + 1] = ARGV[i]
    end
    redis.call('ZADD', KEYS[2], 'XX', unpack(scored))
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms, 'LIMIT', 0,
    tonumber(ARGV[2]))
for i = #expired, 1, -1 do
    local body = redis.call('HGET', KEYS[3], expired[i])
    if body then redis.call('LPUSH', KEYS[1], body) end
end
if #expired > 0 then
    redis.call('ZREM', KEYS[2], unpack(expired))
    redis.call('HDEL', KEYS[3], unpack(expired))
end
return #expired
"""

# KEYS: inflight, bodies. ARGV: ids. Forgets finished messages.
_ACK = """
redis.call('ZREM', KEYS[1], unpack(ARGV))
redis.call('HDEL', KEYS[2], unpack(ARGV))
return #ARGV
"""

# KEYS: list, inflight, bodies. ARGV: ids, in delivery order. Puts the messages still in
# flight back at the head of the list, the first one first.
_RELEASE = """
local count = 0
for i = #ARGV, 1, -1 do
    if redis.call('ZREM', KEYS[2], ARGV[i]) == 1 then
        local body = redis.call('HGET', KEYS[3], ARGV[i])
        if body then
            redis.call('LPUSH', KEYS[1], body)
            count = count + 1
        end
        redis.call('HDEL', KEYS[3], ARGV[i])
    end
end
return count
"""

# KEYS: inflight, bodies, dead-letter list. ARGV: id, envelope. Moves a message still in
# flight to the dead letters, once: a replay finds it gone and stores nothing.
_DEAD = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[2])
return 1
"""

# KEYS: dead-letter list, then the queue (none for a purge). ARGV: a marker that no letter
# equals, then pairs of a letter's id (see microagent._content_ids) and the message to
# push for it. Walks the list from the head, computing each letter's id, until every
# id is found: pushes the message of each one found to the queue (RPUSH), then removes
# its letter (LSET to the marker, LREM of the markers), all in one step. An id that is
# no longer there is skipped: sent twice (a lost reply), the script does nothing more.
_TAKE_DEAD = """
local wanted, left = {}, 0
for i = 2, #ARGV, 2 do
    if wanted[ARGV[i]] == nil then left = left + 1 end
    wanted[ARGV[i]] = ARGV[i + 1]
end
local seen, found, position = {}, 0, 0
while left > 0 do
    local items = redis.call('LRANGE', KEYS[1], position, position + 999)
    if #items == 0 then break end
    for i = 1, #items do
        local digest = string.sub(redis.sha1hex(items[i]), 1, 16)
        local n = seen[digest] or 0
        seen[digest] = n + 1
        local id = digest .. '-' .. n
        local body = wanted[id]
        if body then
            wanted[id] = nil
            left = left - 1
            if KEYS[2] then redis.call('RPUSH', KEYS[2], body) end
            redis.call('LSET', KEYS[1], position + i - 1, ARGV[1])
            found = found + 1
            if left == 0 then break end
        end
    end
    position = position + #items
end
if found > 0 then redis.call('LREM', KEYS[1], 0, ARGV[1]) end
return found
"""

_PUSH_CHUNK = 10_000  # messages per RPUSH in send_many
_LUA_CHUNK = 2_000  # most messages per script call: Lua's unpack() takes ~8,000 values


def _queue_keys(name: str) -> tuple[str, str, str]:
    """The list, in-flight sorted set and bodies hash of queue ``name``."""
    return name, f'microagent:{{{name}}}:inflight', f'microagent:{{{name}}}:bodies'


def _delayed_key(name: str) -> str:
    """The sorted set of the delayed messages of queue ``name`` (member -> due ms)."""
    return f'microagent:{{{name}}}:delayed'


class _Scripts:
    """The broker's Lua scripts, registered on the client that runs them."""

    def __init__(self, client: Redis) -> None:
        self.keep: AsyncScript = client.register_script(_KEEP)
        self.ack: AsyncScript = client.register_script(_ACK)
        self.release: AsyncScript = client.register_script(_RELEASE)
        self.dead: AsyncScript = client.register_script(_DEAD)
        self.take_dead: AsyncScript = client.register_script(_TAKE_DEAD)


class _RedisConsumption(_Consumption):
    """A queue consumed from Redis: the ids of the messages its pool holds (extended by
    the heartbeat) and those of fetches whose reply never came (released first)."""

    def __init__(self, name: str, pool: ConsumerPool, link: Link) -> None:
        super().__init__(name, pool, link)
        self.in_flight: set[bytes] = set()
        self.unanswered: list[bytes] = []
        self.next_delayed_check = 0.0  # time.monotonic() of the next look for due ones


class RedisBroker(_RedisTransport, AbstractQueueBroker):
    """At-least-once queue broker on Redis lists: ``RedisBroker('redis://localhost/0')``.

    Settings (class attributes, or keyword arguments as in 1.x):
    ``ROLLBACK_ATTEMPTS`` (retries before ``{queue}.dead``), ``WAIT_TIME`` (seconds a
    consumer blocks on an empty queue before asking again), ``VISIBILITY_TIMEOUT``
    (seconds after which the in-flight messages of a consumer that stopped answering,
    e.g. killed, are delivered to another one), ``FETCH_LIMIT`` (messages taken in one
    round trip, 500), ``LINGER`` (seconds a consumer waits after taking fewer messages
    than it asked for, before asking again: a steady trickle of messages is then taken in
    batches rather than one round trip each; 0 asks again at once), ``CONNECT_TIMEOUT``
    and ``COMMAND_TIMEOUT`` (seconds to connect, and to wait for a reply),
    ``DELAYED_CHECK`` (seconds between two looks of a consumer for delayed messages now
    due, which it moves into the list; an idle consumer blocks at most twice that long
    instead of ``WAIT_TIME``). A connection
    that went silent is noticed within ``COMMAND_TIMEOUT``, or ``WAIT_TIME +
    COMMAND_TIMEOUT`` for a consumer waiting on an empty queue (10 s by default). See the
    module documentation for the keys used and why no command can lose a message when
    its reply is lost. Links: ``commands`` (sends, acknowledgements, heartbeats) and
    ``consume {queue}`` per consumed queue.

    A consumer holds up to ``FETCH_LIMIT`` plus its pool's capacity (``max(2 *
    concurrency, PREFETCH)``) messages, in flight, waiting for a free worker. For long
    jobs that several replicas should share fairly, lower both:
    ``RedisBroker(dsn, FETCH_LIMIT=1, PREFETCH=1)``.
    """

    WAIT_TIME: ClassVar[float] = 5
    VISIBILITY_TIMEOUT: ClassVar[float] = 30
    FETCH_LIMIT: ClassVar[int] = 500
    LINGER: ClassVar[float] = 0.002
    CONNECT_TIMEOUT: ClassVar[float] = 5
    COMMAND_TIMEOUT: ClassVar[float] = 5
    DELAYED_CHECK: ClassVar[float] = 0.25

    def __init__(self, dsn: str, log: logging.Logger | None = None, **kwargs: Any) -> None:
        super().__init__(dsn, log, **kwargs)
        self._init_transport()
        self._token = uuid.uuid4().hex[:16]
        self._fetches = 0  # fetches so far: with the token and a position, the ids
        self._client: Redis | None = None
        self._fetching: Redis | None = None
        self._blocking: Redis | None = None
        self._scripts: _Scripts | None = None
        self._fetch_script: AsyncScript | None = None
        self._consumptions: dict[str, _RedisConsumption] = {}
        self._keeper: asyncio.Task[None] | None = None

    # -- connections ----------------------------------------------------------------------
    # Three clients: commands whose replay is harmless, sent again once by redis-py after a
    # broken connection; fetches, never sent twice; BLMOVE, which waits up to WAIT_TIME.

    def _clients(self) -> Iterable[Redis | None]:
        return self._client, self._fetching, self._blocking

    def _command_client(self) -> Redis:
        if self._client is None:
            self._client = _redis_client(
                self.dsn, self.CONNECT_TIMEOUT, self.COMMAND_TIMEOUT, retries=1)
        return self._client

    def _commands(self) -> _Scripts:
        """The scripts on the command client (both made on first use)."""
        if self._scripts is None:
            self._scripts = _Scripts(self._command_client())
        return self._scripts

    def _fetch_command(self) -> AsyncScript:
        """The fetch script, on a client that never sends a command twice."""
        if self._fetch_script is None:
            self._fetching = _redis_client(
                self.dsn, self.CONNECT_TIMEOUT, self.COMMAND_TIMEOUT, retries=0)
            self._fetch_script = self._fetching.register_script(_FETCH)
        return self._fetch_script

    def _blocking_client(self) -> Redis:
        """The client for BLMOVE: its read timeout outlasts ``WAIT_TIME``."""
        if self._blocking is None:
            wait = self.WAIT_TIME
            self._blocking = _redis_client(
                self.dsn, self.CONNECT_TIMEOUT, wait + self.COMMAND_TIMEOUT if wait > 0 else None,
                retries=0)
        return self._blocking

    # -- producing ----------------------------------------------------------------------

    async def send(self, name: str, message: bytes, **kwargs: Any) -> None:
        """RPUSH ``message`` to the list ``name``; return once Redis stored it, or raise
        :class:`ConnectionError`."""
        async with self._failing(f'sending to {name}', self.link('commands')):
            await self._command_client().rpush(name, message)

    async def send_many(self, name: str, messages: list[bytes], **kwargs: Any) -> None:
        """RPUSH many messages in one round trip."""
        async with self._failing(f'sending to {name}', self.link('commands')), \
                self._command_client().pipeline(transaction=False) as pipe:
            for start in range(0, len(messages), _PUSH_CHUNK):
                pipe.rpush(name, *messages[start:start + _PUSH_CHUNK])
            await pipe.execute()

    async def send_later(self, name: str, messages: list[bytes], due: float, **kwargs: Any
                         ) -> None:
        """ZADD the messages to the delayed set of ``name``, scored by ``due`` (ms); the
        consumers' fetch moves them to the list once due."""
        score = math.ceil(due * 1000)
        async with self._failing(f'sending to {name}', self.link('commands')), \
                self._command_client().pipeline(transaction=False) as pipe:
            for start in range(0, len(messages), _PUSH_CHUNK):
                pipe.zadd(_delayed_key(name), {  # a random prefix keeps equal bodies apart
                    b'%016x:%b' % (random.getrandbits(64), message): score
                    for message in messages[start:start + _PUSH_CHUNK]})
            await pipe.execute()

    async def delayed_count(self, queue: str) -> int:
        """How many delayed messages of ``queue`` are not yet moved to its list."""
        async with self._failing(f'counting delayed messages of {queue}', self.link('commands')):
            return await self._command_client().zcard(_delayed_key(queue))

    async def queue_length(self, name: str) -> int:
        """How many messages wait in the list ``name`` (not counting those in flight)."""
        async with self._failing(f'measuring {name}', self.link('commands')):
            return await self._command_client().llen(name)

    # -- consuming ----------------------------------------------------------------------

    async def bind(self, name: str) -> None:
        """Start consuming ``name``: first put back what dead consumers left in flight."""
        consumption = _RedisConsumption(name, self.pools[name], self.link(f'consume {name}'))
        async with self._failing(f'consuming {name}', consumption.link):
            await self._keep(consumption)
        self._consumptions[name] = consumption
        loop = asyncio.get_running_loop()
        consumption.task = loop.create_task(self._consume(consumption))
        if self._keeper is None:
            self._keeper = loop.create_task(self._keep_alive())

    async def unbind(self, name: str) -> None:
        """Stop fetching at once (every wait of the fetcher can be interrupted safely),
        and put back what an unanswered fetch may have taken."""
        consumption = self._consumptions.get(name)
        if consumption is None:
            return
        await consumption.stop_feeding()
        try:
            await self._release_unanswered(consumption)
        except _Unreachable as exc:
            self.log.warning('%s; what its last fetch took is delivered again after %ss',
                             exc, self.VISIBILITY_TIMEOUT)

    async def unbound(self, name: str) -> None:
        self._consumptions.pop(name, None)

    async def _consume(self, consumption: _RedisConsumption) -> None:
        size = max(1, min(self.FETCH_LIMIT, _LUA_CHUNK))
        pool, link = consumption.pool, consumption.link
        while not pool.closing:
            try:
                async with self._failing(f'consuming {consumption.name}', link):
                    await self._release_unanswered(consumption)
                    batch = await self._fetch_safely(consumption, size)
                    if not batch:
                        await self._wait_for_messages(consumption.name)
                        continue
                await pool.feed(batch)
                if len(batch) < size and self.LINGER > 0:
                    await asyncio.sleep(self.LINGER)  # a trickle: let the next batch gather
            except Exception as exc:
                if isinstance(exc, CredentialsRefused):
                    link.lost(exc)
                elif not isinstance(exc, _Unreachable):
                    self.log.exception('Consuming %s failed', consumption.name)
                    link.lost(exc)
                await link.pause()

    async def _fetch_safely(self, consumption: _RedisConsumption, size: int) -> list[Delivery]:
        """Fetch a batch; when cancelled meanwhile, put what it took back at the head."""
        fetch = asyncio.ensure_future(self._fetch(consumption, size))
        try:
            return await asyncio.shield(fetch)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self.release(consumption.name, await fetch)
            raise

    async def _fetch(self, consumption: _RedisConsumption, size: int) -> list[Delivery]:
        """Move up to ``size`` messages into flight under new ids and return them.

        The script is never sent twice: sent again after its reply was lost, it would
        take the next messages. A fetch that failed is *unanswered*: it may have run, so
        its ids are released (put back at the head, if they exist) before the next fetch.
        """
        self._fetches += 1
        prefix = f'{self._token}:{self._fetches}:'
        now, name = time.monotonic(), consumption.name
        look = now >= consumption.next_delayed_check
        if look:
            consumption.next_delayed_check = now + self.DELAYED_CHECK
        try:
            bodies = await self._fetch_command()(
                keys=(*_queue_keys(name), _delayed_key(name)),
                args=[size, self._visibility_ms(), self._token, self._fetches, int(look)])
        except BaseException:
            consumption.unanswered.extend(
                f'{prefix}{position}'.encode() for position in range(1, size + 1))
            raise
        batch = [Delivery(body, None, f'{prefix}{position}'.encode())
                 for position, body in enumerate(bodies, 1)]
        consumption.in_flight.update(d.tag for d in batch)
        return batch

    async def _release_unanswered(self, consumption: _RedisConsumption) -> None:
        """Put back what fetches whose reply never came may have taken (a no-op for the
        ids that do not exist: releasing is safe to repeat)."""
        ids = consumption.unanswered
        for start in range(0, len(ids), _LUA_CHUNK):
            async with self._failing(f'releasing messages of {consumption.name}'):
                released = await self._commands().release(
                    keys=_queue_keys(consumption.name), args=ids[start:start + _LUA_CHUNK])
            if released:
                self.log.warning('Put back %d messages of %s taken by a fetch whose reply '
                                 'was lost', released, consumption.name)
        ids.clear()

    async def _wait_for_messages(self, name: str) -> None:
        """Block until the list is not empty (or ``WAIT_TIME`` passed, at most twice
        ``DELAYED_CHECK``: delayed messages fall due meanwhile), leaving it as is: moving
        its head to its head is a no-op that BLMOVE waits for."""
        longest = 2 * self.DELAYED_CHECK
        wait: Any = longest if self.WAIT_TIME <= 0 else min(self.WAIT_TIME, longest)
        await self._blocking_client().blmove(name, name, wait, 'LEFT', 'LEFT')

    async def ack(self, name: str, deliveries: list[Delivery]) -> None:
        """Forget finished messages, one round trip per batch."""
        tags = self._forget(name, deliveries)
        keys = _queue_keys(name)[1:]
        async with self._failing(f'acknowledging messages of {name}', self.link('commands')):
            for start in range(0, len(tags), _LUA_CHUNK):
                await self._commands().ack(keys=keys, args=tags[start:start + _LUA_CHUNK])

    async def release(self, name: str, deliveries: list[Delivery]) -> None:
        """Put unfinished messages back at the head of the list, in their order."""
        tags = self._forget(name, deliveries)
        if not tags:
            return
        async with self._failing(f'releasing messages of {name}', self.link('commands')):
            await self._commands().release(keys=_queue_keys(name), args=tags)

    async def dead_letter(self, name: str, delivery: Delivery, envelope: bytes) -> None:
        """Move the message from flight to ``{name}.dead`` in one step, exactly once (a
        message no longer in flight was put back in the queue meanwhile: it is not
        dead-lettered but delivered again)."""
        _, inflight, bodies = _queue_keys(name)
        async with self._failing(f'dead-lettering a message of {name}', self.link('commands')):
            moved = await self._commands().dead(
                keys=[inflight, bodies, f'{name}.dead'], args=[delivery.tag, envelope])
        if not moved:
            self.log.warning('A message of %s to dead-letter was no longer in flight (its '
                             'deadline passed); it is delivered again', name)

    # -- dead letters -----------------------------------------------------------------

    async def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """The first ``limit`` letters of the list ``{queue}.dead`` (LRANGE: nothing is
        removed); ids as :func:`microagent._content_ids` makes them."""
        _check_limit(limit)
        if limit == 0:
            return []
        async with self._failing(f'reading dead letters of {queue}', self.link('commands')):
            letters = await self._dead_page(queue, 0, limit)
        return _read_dead_letters(queue, letters)

    async def dead_count(self, queue: str) -> int:
        async with self._failing(f'counting dead letters of {queue}', self.link('commands')):
            return await self._command_client().llen(f'{queue}.dead')

    async def _take_dead(self, queue: str, wanted: set[str] | None, limit: int | None, *,
                         push: bool) -> int:
        """Replay (``push``) pushes the chosen letters' messages to the list ``queue``
        and removes the letters, in scripts of up to 2,000 letters, each one step (see
        ``_TAKE_DEAD``): a lost connection loses no letter, and a script sent again
        replays nothing twice (its count may then miss the letters of the first send).
        Purge removes the chosen letters by the same script."""
        what = f'{"replaying" if push else "purging"} dead letters of {queue}'
        async with self._failing(what, self.link('commands')):
            if wanted is None:
                return await self._take_head(queue, limit, push)
            chosen = await self._find_dead(queue, wanted)
            return await self._take_chosen(queue, chosen, push)

    async def _take_head(self, queue: str, limit: int | None, push: bool) -> int:
        """Take the first ``limit`` letters (all there are now when None), a chunk at a
        time from the head."""
        client, dead = self._command_client(), f'{queue}.dead'
        left = await client.llen(dead) if limit is None else limit
        taken = 0
        while left > 0:
            letters = await self._dead_page(queue, 0, min(left, _LUA_CHUNK))
            if not letters:
                break
            left -= len(letters)
            taken += await self._take_chosen(queue, _read_dead_letters(queue, letters), push)
        return taken

    async def _find_dead(self, queue: str, wanted: set[str]) -> list[DeadLetter]:
        """The letters of ``{queue}.dead`` whose ids are wanted, read a page at a time."""
        found: list[DeadLetter] = []
        seen: dict[str, int] = {}
        position, page = 0, _LUA_CHUNK
        while len(found) < len(wanted):
            letters = await self._dead_page(queue, position, page)
            if not letters:
                break
            position += len(letters)
            found.extend(letter for letter in _read_dead_letters(queue, letters, seen)
                         if letter.id in wanted)
        return found

    async def _dead_page(self, queue: str, start: int, count: int) -> list[bytes]:
        letters: list[bytes] = await self._command_client().lrange(
            f'{queue}.dead', start, start + count - 1)  # type: ignore[assignment]
        return letters

    async def _take_chosen(self, queue: str, chosen: list[DeadLetter], push: bool) -> int:
        keys = [f'{queue}.dead', queue] if push else [f'{queue}.dead']
        marker = f'microagent:taken:{uuid.uuid4().hex}'
        taken = 0
        for start in range(0, len(chosen), _LUA_CHUNK):
            args: list[str | bytes] = [marker]
            for letter in chosen[start:start + _LUA_CHUNK]:
                args += [letter.id, letter.body if push else b'']
            taken += await self._commands().take_dead(keys=keys, args=args)
        return taken

    def _forget(self, name: str, deliveries: Sequence[Delivery]) -> list[bytes]:
        """Stop the heartbeat of these messages (even if acknowledging them fails: they
        are then delivered again after the visibility timeout)."""
        tags = [d.tag for d in deliveries]
        consumption = self._consumptions.get(name)
        if consumption is not None:
            consumption.in_flight.difference_update(tags)
        return tags

    # -- heartbeat and recovery of dead consumers' messages ---------------------------

    def _visibility_ms(self) -> int:
        return max(1, int(self.VISIBILITY_TIMEOUT * 1000))

    async def _keep(self, consumption: _RedisConsumption) -> None:
        """Extend this consumer's deadlines and requeue the expired messages."""
        ids = list(consumption.in_flight)
        keys, limit = _queue_keys(consumption.name), min(self.FETCH_LIMIT, _LUA_CHUNK)
        requeued = 0
        for start in range(0, max(len(ids), 1), _LUA_CHUNK):
            requeued += await self._commands().keep(
                keys=keys, args=[self._visibility_ms(), limit, *ids[start:start + _LUA_CHUNK]])
        if requeued:
            self.log.warning('Put back %d messages of %s left unfinished in flight for %ss '
                             '(a consumer died?)', requeued, consumption.name,
                             self.VISIBILITY_TIMEOUT)

    async def _keep_alive(self) -> None:
        link = self.link('commands')
        while True:
            await asyncio.sleep(max(self.VISIBILITY_TIMEOUT / 3, 0.02))
            for consumption in list(self._consumptions.values()):
                try:
                    async with self._failing('heartbeat', link):
                        await self._keep(consumption)
                except _Unreachable:
                    pass  # the link logged it; the next beat tries again
                except Exception:
                    self.log.exception('Heartbeat of %s failed', consumption.name)

    async def disconnect(self) -> None:
        """Stop the heartbeat and close the connections."""
        for name in list(self._consumptions):
            await self.unbind(name)
        self._consumptions.clear()
        keeper, self._keeper = self._keeper, None
        await cancel_and_wait(keeper)
        await self._close_clients()
        self._client = self._fetching = self._blocking = None
        self._scripts = self._fetch_script = None


# =====================================================================================
# AMQP (RabbitMQ) broker
# =====================================================================================
# AMQP (RabbitMQ) queue broker: :class:`AMQPBroker`, on aiormq (extra ``amqp``). One
# connection, named in RabbitMQ's tools (``broker.connection_name``), reconnected forever;
# on it a publishing channel in confirm mode (messages persistent and ``mandatory``: an
# unroutable one raises instead of vanishing), a channel for declarations (a passive
# declare of a missing queue closes its channel) and one channel per consumed queue with
# manual acknowledgements.
#
# Wire format of 1.x: a JSON object body, to the default exchange with routing key = the
# queue's name, or for ``Queue(name, exchange, topics)`` to that exchange with the send's
# ``topic=``. An existing queue is used as it is (1.x declares non-durable queues,
# FastStream durable ones); a missing one is declared durable, by producers too. A missing
# exchange is declared ``topic`` and durable, the queue bound by each of its topics.
#
# While OpenTelemetry tracing is on, message headers carry the W3C trace context.
#
# At-least-once: finished messages are acked in batches (``multiple=True`` up to the
# highest contiguous tag), unfinished ones nacked back at a graceful stop; RabbitMQ
# redelivers what a dead consumer or a lost connection left unacknowledged.

MAX_PREFETCH = 65535  # prefetch_count is a 16-bit field
CONTENT_TYPE = 'application/json'
PERSISTENT = 2


def _connection_name(dsn: str) -> str:
    """The ``name=`` of the DSN, or one that tells where this broker runs."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(dsn).query)
    names = query.get('name')
    if names and names[0]:
        return names[0]
    return f'microagent {socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex[:12]}'


def _with_heartbeat(dsn: str, heartbeat: int) -> str:
    """The DSN with ``heartbeat=`` added to its query, unless it has one."""
    parsed = urllib.parse.urlsplit(dsn)
    if 'heartbeat' in urllib.parse.parse_qs(parsed.query):
        return dsn
    query = f'{parsed.query}&' * bool(parsed.query) + f'heartbeat={int(heartbeat)}'
    return parsed._replace(query=query).geturl()


def _with_trace_context(properties: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """Message properties with the trace context of the current span added to their
    ``headers`` while tracing is on (the caller's own headers are kept)."""
    carrier = trace_headers()
    if not carrier:
        return properties or {}
    properties = properties or {}
    return {**properties, 'headers': {**(properties.get('headers') or {}), **carrier}}


def _tag(message: DeliveredMessage) -> int:
    """The delivery tag of a message got with basic.get (it always has one)."""
    tag = message.delivery_tag
    assert tag is not None
    return tag


def _timestamp(message: DeliveredMessage) -> float:
    """The Unix time of a message's ``timestamp`` property, 0.0 when it has none."""
    stamp = message.header.properties.timestamp
    return stamp.timestamp() if stamp is not None else 0.0


def _declaration(name: str) -> Queue | None:
    """The declared :class:`Queue` called ``name`` (dead-letter queues may be undeclared)."""
    try:
        return Queue.get(name)
    except QueueNotFound:
        return None


async def _first_ended(*futures: asyncio.Future[Any]) -> BaseException | None:
    """Wait until one of ``futures`` is done and return why. Their exceptions are not
    raised here (a channel closed normally carries a CancelledError), and none is
    cancelled: aiormq < 7 hands out its own ``closing`` future, not an observer."""
    done, _ = await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    ended = done.pop()
    return None if ended.cancelled() else ended.exception()


DELAY_UNIT_MS = 100  # the step of a delay on RabbitMQ: a delay is rounded up to it
DELAY_LEVELS = 28  # level k waits DELAY_UNIT_MS * 2**k: all together ~310 days


def _delay_name(queue: str, level: int | str) -> str:
    """The exchange and queue of a level of the delay ladder of ``queue``, or its
    ``arrive`` exchange."""
    return f'microagent.delay.{queue}.{level}'


def _delay_bit(level: int, bit: str) -> str:
    """The binding pattern of the routing keys whose bit of ``level`` is ``bit``: one
    word per level, no ``#`` (which makes RabbitMQ backtrack)."""
    return '.'.join(bit if position == DELAY_LEVELS - 1 - level else '*'
                    for position in range(DELAY_LEVELS))


def _delay_route(units: int) -> str:
    """The routing key of a message delayed ``units``: its bits, highest level first."""
    return '.'.join(format(units, f'0{DELAY_LEVELS}b'))


def _settlement(unsettled: dict[int, None], tags: Sequence[int]) -> tuple[int | None, list[int]]:
    """Take ``tags`` out of ``unsettled`` (the delivery tags of a channel still to settle,
    in delivery order); return the tag to settle with ``multiple=True`` (it covers every
    tag below the lowest one still unsettled) and the tags to settle one by one."""
    taken = [tag for tag in tags if unsettled.pop(tag, False) is None]
    lowest_open = next(iter(unsettled), None)
    if lowest_open is None:
        return (max(taken) if taken else None), []
    below = [tag for tag in taken if tag < lowest_open]
    return (max(below) if below else None), sorted(tag for tag in taken if tag > lowest_open)


class _AMQPTransport(_Transport):
    """aiormq's errors: a channel error is RabbitMQ refusing; the rest is a failed link."""

    SERVER = 'RabbitMQ'

    def _init_transport(self) -> None:
        errors = require('aiormq', 'amqp').exceptions
        self._not_found = errors.ChannelNotFoundEntity  # no such queue or exchange
        self._returned = errors.PublishError  # a mandatory message no queue would receive
        self._nacked = errors.DeliveryError  # a message RabbitMQ did not confirm
        self._channel_error = errors.AMQPChannelError  # closed a channel, not the connection
        self._auth_errors = (errors.AuthenticationError, errors.ProbableAuthenticationError)
        self._failures = (errors.AMQPError, errors.ChannelInvalidStateError, OSError,
                          RuntimeError, asyncio.TimeoutError)

    def _refused(self, error: BaseException) -> bool:
        """A closed channel (no such queue...), a returned or unconfirmed message."""
        return isinstance(error, (self._channel_error, self._nacked))

    def _credentials_refused(self, error: BaseException) -> bool:
        """ACCESS_REFUSED at login (aiormq tells a login refused from a connection
        closed during the handshake only by RabbitMQ's words)."""
        return isinstance(error, CredentialsRefused) or (
            isinstance(error, self._auth_errors) and 'ACCESS_REFUSED' in str(error))


class _Connection(_AMQPTransport):
    """The broker's connection to RabbitMQ (link ``connection``), held by a supervisor
    task that reconnects forever, and what lives on it besides the consumers' channels:
    the publishing channel (publisher confirms), the channel for declarations and
    lengths (a passive declare of a missing queue closes its channel, so it is kept
    apart and opened again when needed), and what was declared."""

    def __init__(self, broker: AMQPBroker) -> None:
        self.broker = broker
        self.dsn = broker.dsn
        self.log = broker.log
        self._init_transport()
        self.name = _connection_name(broker.dsn)
        self._supervisor: asyncio.Task[None] | None = None
        self._connection: AbstractConnection | None = None
        self._connected = asyncio.Event()
        self._publisher: AbstractChannel | None = None
        self._publisher_lock = asyncio.Lock()
        self._admin: AbstractChannel | None = None
        self.admin_lock = asyncio.Lock()
        self.declared: set[str] = set()
        self.delay_levels: dict[str, int] = {}  # queue -> highest delay level declared
        self._exchanges: set[str] = set()

    @property
    def link(self) -> Link:
        return self.broker.link('connection')

    async def live(self, timeout: float | None) -> AbstractConnection:
        """The open connection; wait up to ``timeout`` seconds for it (None: forever),
        also while a lost one is being replaced."""
        loop = asyncio.get_running_loop()
        if self._supervisor is None or self._supervisor.done():
            self._supervisor = loop.create_task(self._keep_connected())
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            connection = self._connection
            if connection is not None and connection.is_opened:
                return connection
            remaining = None if deadline is None else deadline - loop.time()
            if self.link.refused:  # no point waiting: the password will not change soon
                raise CredentialsRefused(f'RabbitMQ at {redact_dsn(self.dsn)} refused: '
                                         f'{self.link.last_error}')
            if remaining is not None and remaining <= 0:
                raise _Unreachable(f'RabbitMQ at {redact_dsn(self.dsn)} is unreachable: '
                                  f'{self.link.last_error or "no connection yet"}')
            if connection is not None:  # lost; wait until the supervisor lets it go
                await asyncio.wait([connection.closing], timeout=remaining)
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(asyncio.TimeoutError):  # a refusal is seen within 0.1 s
                await asyncio.wait_for(self._connected.wait(), min(remaining or 0.1, 0.1))

    async def _keep_connected(self) -> None:
        """Hold the connection: connect, wait until it is lost, reconnect with backoff."""
        link = self.link
        while True:
            try:
                connection = await self._connect()
            except Exception as exc:
                link.lost(exc, self._credentials_refused(exc))
                await link.pause()
                continue
            self._connection = connection
            self._connected.set()
            link.up()
            reason = await _first_ended(connection.closing)
            self._connected.clear()
            self._connection = self._publisher = self._admin = None
            self.declared.clear()  # a restarted server lost its non-durable queues
            self.delay_levels.clear()
            self._exchanges.clear()
            link.lost(reason or 'connection closed')
            await link.pause()

    async def _connect(self) -> AbstractConnection:
        aiormq = require('aiormq', 'amqp')
        try:
            connection: AbstractConnection = aiormq.Connection(_with_heartbeat(
                self.dsn, self.broker.HEARTBEAT))
        except Exception:
            raise ValueError(f'invalid AMQP DSN {redact_dsn(self.dsn)}') from None
        properties: FieldTable = {'connection_name': self.name}
        try:
            await asyncio.wait_for(connection.connect(properties), self.broker.CONNECT_TIMEOUT)
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        return connection

    async def channel(self, *, publisher_confirms: bool) -> AbstractChannel:
        """A new channel; when the connection dies meanwhile, one on the next connection
        (within ``CONNECT_TIMEOUT``: opening a channel publishes nothing, so this is safe)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.broker.CONNECT_TIMEOUT
        while True:
            connection = await self.live(max(0.0, deadline - loop.time()))
            try:
                return await connection.channel(publisher_confirms=publisher_confirms,
                                                timeout=self.broker.OPERATION_TIMEOUT)
            except self._failures:
                if connection.is_opened and not connection.is_closed:
                    raise

    async def publishing_channel(self) -> AbstractChannel:
        channel = self._publisher
        if channel is not None and not channel.is_closed:
            return channel
        async with self._publisher_lock:
            channel = self._publisher
            if channel is None or channel.is_closed:
                channel = self._publisher = await self.channel(publisher_confirms=True)
            return channel

    async def _admin_channel(self) -> AbstractChannel:
        """The channel for declarations (hold ``admin_lock``); reopened after an error."""
        channel = self._admin
        if channel is None or channel.is_closed:
            channel = self._admin = await self.channel(publisher_confirms=False)
        return channel

    # -- declarations -------------------------------------------------------------------

    async def passive_declare(self, name: str) -> QueueMethods.DeclareOk | None:
        """The queue's declare-ok, or None when it does not exist (hold ``admin_lock``)."""
        channel = await self._admin_channel()
        try:
            return await channel.queue_declare(
                name, passive=True, timeout=self.broker.OPERATION_TIMEOUT)
        except self._not_found:
            return None

    async def _ensure_exchange(self, exchange: str) -> None:
        """Declare a missing exchange, topic and durable (hold ``admin_lock``)."""
        if exchange in self._exchanges:
            return
        timeout = self.broker.OPERATION_TIMEOUT
        channel = await self._admin_channel()
        try:
            await channel.exchange_declare(exchange, passive=True, timeout=timeout)
        except self._not_found:
            channel = await self._admin_channel()
            await channel.exchange_declare(
                exchange, exchange_type='topic', durable=True, timeout=timeout)
            self.log.info('Declared exchange %s (topic, durable)', exchange)
        self._exchanges.add(exchange)

    async def ensure_queue(self, name: str, declare: Mapping[str, Any] | None = None, *,
                           check: bool = False) -> None:
        """Make sure queue ``name`` exists (used as it is when it does, declared durable
        when missing) and is bound to its exchange by its topics. Once per connection
        unless ``check``."""
        if name in self.declared and not check:
            return
        queue = _declaration(name)
        exchange = queue.exchange if queue is not None else ''
        timeout = self.broker.OPERATION_TIMEOUT
        async with self.admin_lock:
            if name in self.declared and not check:
                return
            if exchange:
                await self._ensure_exchange(exchange)
            if await self.passive_declare(name) is None:
                options = {'durable': True, **(declare or {})}
                channel = await self._admin_channel()
                await channel.queue_declare(name, timeout=timeout, **options)
                self.log.info('Declared queue %s %s', name, options)
            if exchange and queue is not None:
                channel = await self._admin_channel()
                for topic in queue.topics or (name,):
                    await channel.queue_bind(name, exchange, routing_key=topic, timeout=timeout)
            self.declared.add(name)

    async def ensure_delay_levels(self, name: str, top: int) -> None:
        """Declare the delay ladder of queue ``name`` up to level ``top`` (see
        :meth:`AMQPBroker.send_later`); once per connection and level."""
        if self.delay_levels.get(name, -1) >= top:
            return
        await self.ensure_queue(name)
        timeout = self.broker.OPERATION_TIMEOUT
        async with self.admin_lock:
            first = self.delay_levels.get(name, -1) + 1
            channel = await self._admin_channel()
            arrive = _delay_name(name, 'arrive')
            if first == 0:
                await channel.exchange_declare(arrive, exchange_type='fanout', durable=True,
                                               timeout=timeout)
                await channel.queue_bind(name, arrive, routing_key='', timeout=timeout)
            for level in range(first, top + 1):
                exchange = queue = _delay_name(name, level)
                below = _delay_name(name, level - 1) if level else arrive
                await channel.exchange_declare(exchange, exchange_type='topic', durable=True,
                                               timeout=timeout)
                await channel.queue_declare(queue, durable=True, timeout=timeout, arguments={
                    'x-message-ttl': DELAY_UNIT_MS << level, 'x-dead-letter-exchange': below})
                await channel.queue_bind(queue, exchange, routing_key=_delay_bit(level, '1'),
                                         timeout=timeout)
                await channel.exchange_bind(below, exchange, routing_key=_delay_bit(level, '0'),
                                            timeout=timeout)
                self.delay_levels[name] = level

    def forget(self, name: str, exchange: str) -> None:
        """Declare ``name`` and ``exchange`` again next time (deleted meanwhile?)."""
        self.delay_levels.pop(name, None)
        self.declared.discard(name)
        self._exchanges.discard(exchange)

    async def declare(self, name: str, **options: Any) -> QueueMethods.DeclareOk:
        async with self.admin_lock:
            channel = await self._admin_channel()
            info: QueueMethods.DeclareOk = await channel.queue_declare(
                name, timeout=self.broker.OPERATION_TIMEOUT, **options)
        self.declared.add(name)
        return info

    async def close(self) -> None:
        await cancel_and_wait(self._supervisor)
        self._supervisor = None
        connection, self._connection = self._connection, None
        self._publisher = self._admin = None
        self.declared.clear()
        self._exchanges.clear()
        self._connected.clear()
        if connection is not None:
            with contextlib.suppress(*self._failures):
                await asyncio.wait_for(connection.close(), self.broker.OPERATION_TIMEOUT)


class _AMQPConsumption(_Consumption):
    """A queue consumed from RabbitMQ. ``channel``, ``consumer_tag`` and ``unsettled``
    (delivery tags received and neither acknowledged nor released, in delivery order)
    belong to the current subscription and are replaced by the next one. Deliveries wait
    in ``buffer`` until the feeder task hands them to the pool in batches; ``task`` keeps
    the subscription (and subscribes again after a loss)."""

    def __init__(self, name: str, pool: ConsumerPool, link: Link,
                 options: _AMQPOptions) -> None:
        super().__init__(name, pool, link)
        self.prefetch = options.prefetch or min(pool.capacity, MAX_PREFETCH)
        self.declare = options.declare_queue or {}
        self.channel: AbstractChannel | None = None
        self.consumer_tag: str | None = None
        self.unsettled: dict[int, None] = {}
        self.settling = asyncio.Lock()  # keeps settlement frames in the order they were planned
        self.buffer: list[Delivery] = []
        self.wakeup: asyncio.Future[None] | None = None
        self.stopping = False
        self.feeder: asyncio.Task[None] | None = None


class _Walk(msgspec.Struct):
    """A walk over the dead letters of ``queue``: the channel they come on, the letters
    delivered and not looked at yet, how many it takes at most."""
    queue: str
    channel: Any
    arrived: asyncio.Queue[Any]
    left: int


class _AMQPOptions(ConsumerOptions, frozen=True, forbid_unknown_fields=True):
    """The consumer options of :class:`AMQPBroker`: the common ones, and ``prefetch``
    (RabbitMQ's ``prefetch_count``, default the pool's capacity) and ``declare_queue``
    (``queue_declare`` options for a missing queue)."""

    prefetch: Annotated[int, msgspec.Meta(ge=1, le=MAX_PREFETCH)] | None = None
    declare_queue: dict[str, Any] | None = None


class AMQPBroker(_AMQPTransport, AbstractQueueBroker):
    """At-least-once queue broker on RabbitMQ: ``AMQPBroker('amqp://guest:guest@host/')``.

    ``send(name, message, topic=None, exchange=None, properties=None)``: ``topic`` is the
    routing key for a queue declared with an exchange; ``exchange`` publishes to another
    exchange with ``name`` as routing key (1.x style); ``properties`` adds AMQP message
    properties (``headers``, ``priority``...). It returns once RabbitMQ confirmed the
    message; during an outage it waits up to ``CONNECT_TIMEOUT`` for the reconnection,
    then raises :class:`ConnectionError`.

    Consumers get the aiormq ``DeliveredMessage`` as ``amqp=``. Consumer options, besides
    the common ones (:class:`AMQPBroker.Options`):

    - ``autoack=False``: the handler acknowledges with ``await broker.putout(amqp)``
      (a message not put out goes back to the queue when its consumer stops).
    - ``prefetch``: RabbitMQ's ``prefetch_count``. The default is the pool's capacity
      (``max(2 * concurrency, PREFETCH)``), not the concurrency: the messages buffered
      beyond the running handlers keep the workers busy while acknowledgements, sent in
      batches, travel. Use ``prefetch=concurrency`` (or 1) for long jobs that several
      replicas should share fairly.
    - ``declare_queue``: ``queue_declare`` options for a missing queue (default
      ``{'durable': True}``), e.g. ``{'arguments': {'x-queue-type': 'quorum'}}``.

    Settings (class attributes, or keyword arguments): ``ROLLBACK_ATTEMPTS``,
    ``RETRY_BACKOFF``, ``PREFETCH`` (see :class:`AbstractQueueBroker`), ``CONNECT_TIMEOUT``,
    ``CONFIRM_TIMEOUT``, ``OPERATION_TIMEOUT`` (seconds), ``PUBLISH_BATCH`` (messages of a
    ``send_many`` awaiting their confirmations at once), ``REPLAY_BATCH``, ``HEARTBEAT``. Links:
    ``connection``, and ``consume {queue}`` per consumed queue.
    """

    Options = _AMQPOptions
    RAW_MESSAGE_ARG: ClassVar[str | None] = 'amqp'
    CONNECT_TIMEOUT: ClassVar[float] = 10
    """Seconds to open the connection; also the longest a send waits for a reconnection."""
    CONFIRM_TIMEOUT: ClassVar[float] = 30
    """Seconds RabbitMQ has to confirm a published message."""
    OPERATION_TIMEOUT: ClassVar[float] = 10
    """Seconds for a declaration, a subscription, a channel to open or close."""
    PUBLISH_BATCH: ClassVar[int] = 1000
    REPLAY_BATCH: ClassVar[int] = 500
    """Dead letters a replay takes before publishing their messages together: a lost
    connection may store that many twice."""
    DEAD_WAIT: ClassVar[float] = 1.0
    """Seconds a listing, replay or purge waits for the next dead letter RabbitMQ
    delivers before it takes the queue for empty (others took letters meanwhile)."""
    HEARTBEAT: ClassVar[int] = 3
    """AMQP heartbeat timeout in seconds, unless the DSN gives ``heartbeat=``: a
    connection that carries nothing for ``(HEARTBEAT + 1) * 3`` seconds (12 s) is taken
    for dead and replaced (RabbitMQ's own default, 60 s, takes three minutes)."""

    def __init__(self, dsn: str, log: logging.Logger | None = None, **kwargs: Any) -> None:
        super().__init__(dsn, log, **kwargs)
        if urllib.parse.urlsplit(dsn).scheme not in ('amqp', 'amqps'):
            raise ValueError(f'{type(self).__name__} needs an amqp:// or amqps:// DSN, '
                             f'not {redact_dsn(dsn)!r}')
        self._init_transport()
        self._properties = require('aiormq', 'amqp').spec.Basic.Properties
        # A failed connection attempt is reported by this broker itself (at WARNING).
        lower_connection_attempt_logs('aiormq.connection', logging.DEBUG,
                                      'error when creating transport: %r')
        self._amqp = _Connection(self)
        self.connection_name = self._amqp.name
        self._consumptions: dict[str, _AMQPConsumption] = {}
        self._unconfirmed = 0
        self._all_confirmed = asyncio.Event()
        self._all_confirmed.set()

    # -- declarations -------------------------------------------------------------------

    async def declare_queue(self, name: str, **options: Any) -> QueueMethods.DeclareOk:
        """Declare queue ``name`` with ``queue_declare`` options (``durable``,
        ``arguments``...), as in microagent 1.x; return RabbitMQ's declare-ok."""
        async with self._failing(f'declaring queue {name}'):
            info = await self._amqp.declare(name, **options)
        self.log.info('Declared queue %s: %s messages, %s consumers',
                      name, info.message_count, info.consumer_count)
        return info

    async def queue_length(self, name: str) -> int:
        """How many messages wait in queue ``name`` (not counting unacknowledged ones);
        0 for a queue that does not exist (it is not created)."""
        async with self._failing(f'measuring queue {name}'), self._amqp.admin_lock:
            info = await self._amqp.passive_declare(name)
        return int(info.message_count or 0) if info is not None else 0

    # -- producing ----------------------------------------------------------------------

    def _route(self, name: str, topic: str | None, exchange: str | None) -> tuple[str, str]:
        """The exchange and routing key of a message for queue ``name``."""
        if exchange is not None:
            return exchange, topic or name
        queue = _declaration(name)
        if queue is None or not queue.exchange:
            if topic is not None:
                raise QueueException(
                    f'queue {name!r} has no exchange: topic= needs Queue(name, exchange, topics)')
            return '', name
        return queue.exchange, topic or (queue.topics[0] if queue.topics else name)

    async def send(self, name: str, message: bytes | str, **kwargs: Any) -> None:
        """Publish ``message`` (JSON bytes; a str is encoded, as 1.x sent str) for queue
        ``name``; return once RabbitMQ confirmed it. Options: ``topic``, ``exchange``,
        ``properties`` (see the class)."""
        body = message.encode() if isinstance(message, str) else message
        await self.send_many(name, [body], **kwargs)

    async def send_many(self, name: str, messages: list[bytes], *, topic: str | None = None,
                        exchange: str | None = None,
                        properties: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        """Publish several messages, awaiting their confirmations together."""
        if kwargs:
            raise TypeError(f'{type(self).__name__}.send got unknown options '
                            f'{", ".join(sorted(kwargs))}; it takes topic, exchange, properties')
        target, routing_key = self._route(name, topic, exchange)
        self._unconfirmed += len(messages)
        self._all_confirmed.clear()
        try:
            for attempt in (1, 2):
                try:
                    async with self._failing(
                            f'sending to {name} (the message may not be stored)'):
                        if exchange is None:
                            await self._amqp.ensure_queue(name)
                        await self._publish(target, routing_key, messages,
                                            _with_trace_context(properties))
                    return
                except QueueException as exc:
                    cause = exc.__cause__
                    if isinstance(cause, (self._returned, self._not_found)):
                        if attempt == 2 or exchange is not None:
                            raise self._unroutable(name, target, routing_key, cause) from cause
                        self._amqp.forget(name, target)  # deleted meanwhile? declare it again
                    elif isinstance(cause, self._nacked):
                        raise QueueException(f'RabbitMQ refused to store a message for '
                                             f'{name!r}: {cause}') from cause
                    else:
                        raise
        finally:
            self._unconfirmed -= len(messages)
            if not self._unconfirmed:
                self._all_confirmed.set()

    async def send_later(self, name: str, messages: list[bytes], due: float, *,
                         topic: str | None = None, exchange: str | None = None,
                         properties: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        """Publish the messages into the delay ladder of queue ``name`` (no plugin).

        Level ``k`` of the ladder is an exchange and a queue ``microagent.delay.{name}.{k}``
        whose messages all live ``DELAY_UNIT_MS * 2**k`` ms, then are dead-lettered to the
        level below. A message's routing key spells its delay in units as bits (highest
        first): each level's exchange routes it into its queue when its bit is 1, else
        straight to the level below; level 0 ends in ``...arrive``, a fanout exchange
        bound to the queue. Every queue of the ladder holds messages of one lifetime
        only, so its head always expires first: no message waits behind a later-due one.
        """
        if kwargs or exchange is not None:
            raise TypeError(f'{type(self).__name__}.send with a delay takes topic and '
                            f'properties only')
        units = max(1, math.ceil((due - time.time()) * 1000 / DELAY_UNIT_MS))
        top = units.bit_length() - 1
        if top >= DELAY_LEVELS:
            raise ValueError(f'a delay of {due - time.time():.0f} s is longer than RabbitMQ '
                             f'delays go ({(DELAY_UNIT_MS << DELAY_LEVELS) // 1000} s)')
        extra = _with_trace_context(properties)
        self._unconfirmed += len(messages)
        self._all_confirmed.clear()
        try:
            async with self._failing(f'sending to {name} (the message may not be stored)'):
                await self._amqp.ensure_delay_levels(name, top)
                await self._publish(_delay_name(name, top), _delay_route(units), messages,
                                    extra)
        finally:
            self._unconfirmed -= len(messages)
            if not self._unconfirmed:
                self._all_confirmed.set()

    async def delayed_count(self, queue: str) -> int:
        """How many messages wait in the delay ladder of ``queue``."""
        total = 0
        async with self._failing(f'counting delayed messages of {queue}'), \
                self._amqp.admin_lock:
            for level in range(DELAY_LEVELS):  # the levels are declared from 0 up
                info = await self._amqp.passive_declare(_delay_name(queue, level))
                if info is None:
                    break
                total += int(info.message_count or 0)
        return total

    def _unroutable(self, name: str, exchange: str, routing_key: str, error: BaseException
                    ) -> QueueException:
        if isinstance(error, self._returned):
            return QueueException(
                f'RabbitMQ returned a message for {name!r}: no queue is bound to exchange '
                f'{exchange!r} by routing key {routing_key!r}')
        return QueueException(f'cannot send to {name!r}: {error}')

    async def _publish(self, exchange: str, routing_key: str, bodies: Sequence[bytes],
                       extra: Mapping[str, Any]) -> None:
        channel = await self._amqp.publishing_channel()
        # wait=False (aiormq's Channel has it since 6.x; its AbstractChannel does not say
        # so): await the confirmation only, not also the socket write, which would hold
        # the channel's lock and serialize the publishes of a batch.
        basic_publish: Callable[..., Awaitable[Any]] = channel.basic_publish
        publish = partial(basic_publish, exchange=exchange, routing_key=routing_key,
                          mandatory=True, timeout=self.CONFIRM_TIMEOUT, wait=False)
        make = partial(self._properties, delivery_mode=PERSISTENT, content_type=CONTENT_TYPE)
        if len(bodies) == 1:
            await publish(bodies[0], properties=make(**extra))
            return
        step = max(1, self.PUBLISH_BATCH)
        for start in range(0, len(bodies), step):
            results = await asyncio.gather(
                *(publish(body, properties=make(**extra)) for body in bodies[start:start + step]),
                return_exceptions=True)
            errors = [result for result in results if isinstance(result, BaseException)]
            if errors:
                returned = [error for error in errors if isinstance(error, self._returned)]
                error = (returned or errors)[0]
                if isinstance(error, asyncio.CancelledError):  # its channel closed, not us
                    raise ConnectionError('the channel closed before RabbitMQ confirmed')
                raise error

    # -- dead letters -------------------------------------------------------------------
    # Letters are consumed from ``{queue}.dead`` without auto-ack (prefetch: as many as
    # the walk takes, as basic.get would, without a round trip per letter): a letter is
    # acknowledged only after its message was published to the queue and confirmed; a
    # letter not chosen is given back (nack with requeue: RabbitMQ puts it back in its
    # place) and so is everything held when the channel is lost. Ids are content ids
    # (see microagent._content_ids), read from the head of the queue.

    async def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """The first ``limit`` letters (taken, then all given back in their place)."""
        _check_limit(limit)
        letters: list[DeadLetter] = []
        async with self._failing(f'reading dead letters of {queue}'):
            await self._walk_dead(queue, limit, letters.append)
        return letters

    async def dead_count(self, queue: str) -> int:
        """The letters ready in ``{queue}.dead`` (not those a listing or replay holds)."""
        return await self.queue_length(f'{queue}.dead')

    async def _take_dead(self, queue: str, wanted: set[str] | None, limit: int | None, *,
                         push: bool) -> int:
        """Replay (``push``) publishes the chosen letters' messages to ``queue``,
        ``REPLAY_BATCH`` at a time, and acknowledges the letters once RabbitMQ confirmed
        their messages. A connection lost meanwhile returns the batch's letters: their
        messages that were stored already are then there twice (at most one batch).
        Purge acknowledges the chosen letters."""
        chosen: list[DeadLetter] = []

        def choose(letter: DeadLetter) -> bool:
            if wanted is not None and letter.id not in wanted:
                return False
            chosen.append(letter)
            return True

        async def take(letters: list[DeadLetter]) -> None:
            if push and letters:
                await self.send_many(queue, [letter.body for letter in letters])

        def done() -> bool:
            return wanted is not None and len(chosen) >= len(wanted)

        what = f'{"replaying" if push else "purging"} dead letters of {queue}'
        async with self._failing(what):
            await self._walk_dead(queue, limit, choose, take, done)
        return len(chosen)

    async def _walk_dead(self, queue: str, limit: int | None,
                         choose: Callable[[DeadLetter], Any],
                         take: Callable[[list[DeadLetter]], Awaitable[None]] | None = None,
                         done: Callable[[], bool] = lambda: False) -> None:
        """Get the letters of ``{queue}.dead`` from its head (at most ``limit``, and no
        more than were there at the start) a batch at a time on a channel of their own;
        for each batch, ``take`` the letters ``choose`` accepts, then acknowledge them
        (without ``take``, nothing is acknowledged); give the others back at the end."""
        dead = f'{queue}.dead'
        async with self._amqp.admin_lock:
            info = await self._amqp.passive_declare(dead)
        left = int(info.message_count or 0) if info is not None else 0
        if limit is not None:
            left = min(left, limit)
        if not left:
            return
        channel = await self._amqp.channel(publisher_confirms=False)
        arrived: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
        try:
            timeout = self.OPERATION_TIMEOUT
            await channel.basic_qos(prefetch_count=min(left, MAX_PREFETCH), timeout=timeout)
            consuming = await channel.basic_consume(dead, arrived.put, no_ack=False,
                                                    timeout=timeout)
            highest = await self._walk_batches(_Walk(queue, channel, arrived, left),
                                               choose, take, done)
            await channel.basic_cancel(consuming.consumer_tag or '', timeout=timeout)
            while not arrived.empty():
                highest = max(highest, _tag(arrived.get_nowait()))
            if highest:  # the letters not acknowledged go back, in their places
                await channel.basic_nack(highest, multiple=True, requeue=True)
        finally:
            with contextlib.suppress(*self._failures, asyncio.TimeoutError):
                await asyncio.wait_for(channel.close(), self.OPERATION_TIMEOUT)

    async def _walk_batches(self, walk: _Walk, choose: Callable[[DeadLetter], Any],
                            take: Callable[[list[DeadLetter]], Awaitable[None]] | None,
                            done: Callable[[], bool]) -> int:
        """The loop of :meth:`_walk_dead` over the letters RabbitMQ delivers (prefetch:
        no more than it walks); returns the highest delivery tag seen and not
        acknowledged (0: none), the one to give back with ``multiple=True``: a nack of a
        tag already acknowledged makes RabbitMQ close the channel."""
        seen: dict[str, int] = {}
        highest_kept, left = 0, walk.left
        while left > 0 and not done():
            messages = await self._next_letters(walk.arrived, min(left, self.REPLAY_BATCH))
            if not messages:
                break
            left -= len(messages)
            ids = _content_ids([message.body for message in messages], seen)
            chosen = []
            for letter_id, message in zip(ids, messages, strict=True):
                letter = _read_dead_letter(letter_id, walk.queue, message.body,
                                           _timestamp(message))
                if choose(letter) and take is not None:
                    chosen.append((letter, _tag(message)))
                else:
                    highest_kept = max(highest_kept, _tag(message))
            if take is not None and chosen:
                await take([letter for letter, _ in chosen])
                for _, tag in chosen:
                    await walk.channel.basic_ack(tag)
        return highest_kept

    async def _next_letters(self, arrived: asyncio.Queue[DeliveredMessage], count: int
                            ) -> list[DeliveredMessage]:
        """Up to ``count`` delivered letters: fewer when none came for ``DEAD_WAIT``
        seconds (the queue emptied meanwhile: others took letters)."""
        messages: list[DeliveredMessage] = []
        while len(messages) < count:
            try:
                messages.append(await asyncio.wait_for(arrived.get(), self.DEAD_WAIT))
            except asyncio.TimeoutError:
                break
        return messages

    # -- consuming ----------------------------------------------------------------------

    async def bind(self, name: str) -> None:
        """Subscribe to queue ``name`` (declaring it when missing); return once RabbitMQ
        confirmed the subscription. It is renewed after every reconnection."""
        pool = self.pools[name]
        options = pool.options
        assert isinstance(options, _AMQPOptions)
        consumption = _AMQPConsumption(name, pool, self.link(f'consume {name}'), options)
        self._consumptions[name] = consumption
        loop = asyncio.get_running_loop()
        live: asyncio.Future[None] = loop.create_future()
        consumption.feeder = loop.create_task(self._feed(consumption))
        consumption.task = loop.create_task(self._consume(consumption, live))
        try:
            await live
        except BaseException:
            await consumption.stop_feeding()
            await cancel_and_wait(consumption.feeder)
            await self._unsubscribed(consumption)
            self._consumptions.pop(name, None)
            raise

    async def _consume(self, consumption: _AMQPConsumption, live: asyncio.Future[None]
                       ) -> None:
        """Subscribe, wait until the subscription ends (lost connection or channel, or
        cancelled by RabbitMQ), subscribe again with backoff; forever. The first
        subscription is tried for up to ``CONNECT_TIMEOUT`` (its reply may be lost)."""
        name, link = consumption.name, consumption.link
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.CONNECT_TIMEOUT
        while True:
            try:
                async with self._failing(f'consuming {name}', link):
                    connection = await self._amqp.live(
                        None if live.done() else max(0.0, deadline - loop.time()))
                    ended = await self._subscribe(consumption, connection)
            except Exception as failure:
                await self._unsubscribed(consumption)
                if not live.done() and (isinstance(failure, (QueueException, CredentialsRefused))
                                        or loop.time() >= deadline):
                    live.set_exception(failure)
                    return
            else:
                _resolve(live)
                closed, cancelled = ended
                try:
                    reason = await _first_ended(closed, cancelled)
                finally:
                    by_server = cancelled.done()
                    cancelled.cancel()
                await self._unsubscribed(consumption)
                link.lost('RabbitMQ cancelled the consumer: queue deleted?' if by_server
                          else reason or 'channel closed')
            await link.pause()

    async def _subscribe(self, consumption: _AMQPConsumption, connection: AbstractConnection
                         ) -> tuple[asyncio.Future[Any], asyncio.Future[None]]:
        """Open a channel and consume on it; return the futures that end it: the
        channel's closing, and the consumer cancelled by RabbitMQ (the queue was
        deleted; aiormq 7 reports it, older versions do not)."""
        await self._amqp.ensure_queue(consumption.name, consumption.declare, check=True)
        channel = await connection.channel(
            publisher_confirms=False, timeout=self.OPERATION_TIMEOUT)
        consumption.channel = channel
        consumption.unsettled = {}
        cancelled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        cancel_callbacks = getattr(channel, 'on_consumer_cancel_callbacks', None)
        if cancel_callbacks is not None:
            cancel_callbacks.add(lambda _frame: _resolve(cancelled))
        await channel.basic_qos(prefetch_count=consumption.prefetch,
                                timeout=self.OPERATION_TIMEOUT)
        ok = await channel.basic_consume(
            consumption.name, partial(self._on_message, consumption, channel),
            timeout=self.OPERATION_TIMEOUT)
        consumption.consumer_tag = ok.consumer_tag
        return channel.closing, cancelled

    async def _unsubscribed(self, consumption: _AMQPConsumption) -> None:
        """Give up the subscription's channel; RabbitMQ delivers its unacknowledged
        messages again (those still in the buffer are dropped here)."""
        channel, consumption.channel = consumption.channel, None
        consumption.consumer_tag = None
        consumption.unsettled = {}
        consumption.buffer.clear()
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(*self._failures):
                await asyncio.wait_for(channel.close(), self.OPERATION_TIMEOUT)

    async def _on_message(self, consumption: _AMQPConsumption, channel: AbstractChannel,
                          message: DeliveredMessage) -> None:
        """aiormq's consumer callback: buffer the delivery for the feeder."""
        tag = message.delivery_tag
        if channel is not consumption.channel or tag is None:
            return  # a channel given up: RabbitMQ requeues its messages as it closes
        if consumption.stopping:
            with contextlib.suppress(*self._failures):
                await self._settle(consumption, [tag], ack=False)
            return
        consumption.unsettled[tag] = None
        consumption.buffer.append(Delivery(message.body, message, tag))
        wakeup, consumption.wakeup = consumption.wakeup, None
        _resolve(wakeup)

    def trace_carrier(self, delivery: Delivery) -> Mapping[str, Any] | None:
        """The headers of a consumed message, which carry the trace context."""
        message: DeliveredMessage | None = delivery.raw
        return message.header.properties.headers if message is not None else None

    async def _feed(self, consumption: _AMQPConsumption) -> None:
        """Hand what arrived together to the pool as one batch (it waits when full)."""
        loop = asyncio.get_running_loop()
        while True:
            if not consumption.buffer:
                consumption.wakeup = loop.create_future()
                await consumption.wakeup
                continue
            batch, consumption.buffer = consumption.buffer, []
            await consumption.pool.feed(batch)

    async def unbind(self, name: str) -> None:
        """Stop the subscription (the channel stays open until the pool has settled what
        it holds); deliveries not yet handed to the pool go back to the queue."""
        consumption = self._consumptions.get(name)
        if consumption is None:
            return
        await consumption.stop_feeding()
        channel, consumer_tag = consumption.channel, consumption.consumer_tag
        if channel is not None and consumer_tag is not None and not channel.is_closed:
            try:
                await channel.basic_cancel(consumer_tag, timeout=self.OPERATION_TIMEOUT)
            except self._failures as exc:
                self.log.debug('Cancelling the consumer of %s failed: %s', name, exc)
        consumption.stopping = True
        await cancel_and_wait(consumption.feeder)
        leftovers, consumption.buffer = consumption.buffer, []
        if leftovers:
            with contextlib.suppress(*self._failures):
                await self._settle(consumption, [d.tag for d in leftovers], ack=False)

    async def unbound(self, name: str) -> None:
        """The consumer of ``name`` has drained: close its channel."""
        consumption = self._consumptions.pop(name, None)
        if consumption is not None:
            await self._unsubscribed(consumption)

    # -- settling deliveries --------------------------------------------------------------

    async def _settle(self, consumption: _AMQPConsumption, tags: Sequence[int], *, ack: bool
                      ) -> None:
        """Acknowledge (or release: nack with requeue) delivery tags of the current
        channel, with one ``multiple=True`` frame for the contiguous part."""
        channel = consumption.channel
        if channel is None or channel.is_closed:
            return
        async with consumption.settling:
            if channel is not consumption.channel:
                return
            highest, singles = _settlement(consumption.unsettled, tags)
            settle = channel.basic_ack if ack else partial(channel.basic_nack, requeue=True)
            if highest is not None:
                await settle(highest, multiple=True)
            for tag in singles:
                await settle(tag, multiple=False)

    async def _settle_deliveries(self, name: str, deliveries: list[Delivery], *, ack: bool
                                 ) -> None:
        consumption = self._consumptions.get(name)
        if consumption is None:
            return
        channel = consumption.channel
        tags = [d.tag for d in deliveries if d.raw is not None and d.raw.channel is channel]
        if len(tags) < len(deliveries):
            self.log.debug('%d messages of %s came on a channel since lost; RabbitMQ delivers '
                           'them again', len(deliveries) - len(tags), name)
        if tags:
            action = 'acknowledging' if ack else 'releasing'
            async with self._failing(f'{action} {len(tags)} messages of {name}'):
                await self._settle(consumption, tags, ack=ack)

    async def ack(self, name: str, deliveries: list[Delivery]) -> None:
        """Acknowledge finished deliveries (``multiple=True`` where contiguous)."""
        await self._settle_deliveries(name, deliveries, ack=True)

    async def release(self, name: str, deliveries: list[Delivery]) -> None:
        """Put unfinished deliveries back in the queue (``basic_nack`` with requeue)."""
        await self._settle_deliveries(name, deliveries, ack=False)

    async def putout(self, amqp: DeliveredMessage) -> None:
        """Acknowledge a message consumed with ``autoack=False`` (microagent 1.x API)::

            @consumer(queues.mailer, autoack=False)
            async def send_mail(self, amqp, **message):
                ...
                await self.broker.putout(amqp)

        Putting out a message twice is harmless. When its channel was lost meanwhile it
        cannot be acknowledged any more (RabbitMQ delivers it again): that is logged.
        """
        tag = amqp.delivery_tag
        if tag is None:
            return
        try:
            for consumption in self._consumptions.values():
                if consumption.channel is amqp.channel:
                    await self._settle(consumption, [tag], ack=True)
                    return
            if amqp.channel.is_closed:
                self.log.warning('Cannot acknowledge message %s of %s: its channel is closed '
                                 '(RabbitMQ delivers it again)', tag, amqp.routing_key)
                return
            await amqp.channel.basic_ack(tag)
        except self._failures as exc:
            self.log.warning('Acknowledging message %s of %s failed (%s); RabbitMQ delivers '
                             'it again', tag, amqp.routing_key, exc)

    # -- closing ------------------------------------------------------------------------

    async def disconnect(self) -> None:
        """Wait for the confirmations of pending sends, close the channels and the
        connection."""
        for name in list(self._consumptions):
            await self.unbind(name)
            await self.unbound(name)
        if not self._all_confirmed.is_set():
            try:
                await asyncio.wait_for(self._all_confirmed.wait(), self.CONFIRM_TIMEOUT)
            except asyncio.TimeoutError:
                self.log.warning('Closing with %d messages not yet confirmed by RabbitMQ',
                                 self._unconfirmed)
        await self._amqp.close()


# =====================================================================================
# Kafka broker
# =====================================================================================
# Kafka backend: :class:`KafkaBroker`, on aiokafka (extra ``kafka``). Wire format of 1.x:
# queue = topic, message = one record whose value is the JSON object.
#
# One long-lived producer per broker (``acks='all'``). All consumers of a queue form one
# consumer group, so replicas split its partitions; records are fetched in batches with
# backpressure, auto-commit is off, and each partition's committed offset is the one below
# which every record is finished: an unfinished record (released at a stop, or its
# consumer killed) is never committed past, so the group delivers it again. Topics,
# ``{queue}.dead`` included, are created when missing; ``queue_length`` is the group's lag.
# Records carry no headers but the W3C trace context while OpenTelemetry tracing is on.
#
# Tested against Tansu 0.6 (a Kafka-protocol broker) too, which differs: a group forms
# only after half the session timeout (so ``bind`` takes ``SESSION_TIMEOUT / 2``); the
# first generation is 0, for which aiokafka sends no LeaveGroup (a stopped consumer leaves
# after ``SESSION_TIMEOUT``); ListOffsets reports the end as the last *batch*'s base + 1
# (``queue_length`` takes the end from a fetch's high watermark); an OffsetFetch for all
# partitions breaks the connection (partitions are always named); a restarted in-memory
# Tansu has forgotten topics, offsets and groups (clients reconnect and carry on).

_TOPIC_NAME = re.compile(r'^[A-Za-z0-9._-]{1,249}$')
_TOPIC_ALREADY_EXISTS = 36
_DEFAULT_PORT = 9092
_FETCH_WAIT_MS = 1000
# What one fetch of a queue's consumer may bring (aiokafka's default is 50 MB): a server
# that ignores ``max_partition_fetch_bytes`` (Tansu returns whole partitions) would
# otherwise fill the consumer's memory with the backlog. CLIENT_OPTIONS may change it.
_FETCH_MAX_BYTES = 1024 * 1024
_SEND_OPTIONS = frozenset({'key', 'partition', 'timestamp_ms', 'headers'})
_IGNORED_SEND_OPTIONS = frozenset({'topic'})  # AMQP routing, meaningless here


# The waits of a queue's delay topics ``{queue}.delay.{i}`` (seconds): a delayed record
# goes to the one of the longest wait not past its due, and comes out of it that long
# after it went in, or at its due in the first one (so it waits there at most its wait
# behind another); then it goes on to its queue, or to the next delay topic.
DELAY_WAITS = (0.5, 2.0, 8.0, 32.0, 128.0, 512.0, 2048.0, 8192.0, 32768.0)
_DUE_HEADER, _READY_HEADER = 'microagent-due', 'microagent-ready'  # Unix time in ms
_DELAY_HEADERS = frozenset({_DUE_HEADER, _READY_HEADER})


def _delay_topic(topic: str, index: int) -> str:
    return f'{topic}.delay.{index}'


def _delay_hop(due: float, now: float) -> tuple[int, float]:
    """The delay topic for a record due at ``due`` and when it comes out of it."""
    remaining = due - now
    index = max(0, bisect.bisect_right(DELAY_WAITS, remaining) - 1)
    return index, min(now + DELAY_WAITS[index], due)


def _header_ms(headers: Iterable[tuple[str, bytes]], name: str) -> float | None:
    for key, value in headers:
        if key == name:
            return int(value) / 1000
    return None


def _delay_headers(due: float, ready: float) -> list[tuple[str, bytes]]:
    return [(_DUE_HEADER, str(math.ceil(due * 1000)).encode()),
            (_READY_HEADER, str(math.ceil(ready * 1000)).encode())]


def _resume(consumer: Any, partition: Any) -> None:
    """Resume a paused partition, if the consumer still holds it."""
    with contextlib.suppress(Exception):
        if partition in consumer.assignment():
            consumer.resume(partition)


def _aiokafka() -> Any:
    """The aiokafka package (imported on first use, naming the extra when missing)."""
    return require('aiokafka', 'kafka')


def _bootstrap_servers(dsn: str) -> list[str]:
    """``kafka://host:port[,host:port...]`` as aiokafka's list of ``host:port``."""
    parsed = urllib.parse.urlsplit(dsn)
    if parsed.scheme != 'kafka':
        raise ValueError(f'KafkaBroker needs a kafka://host:port DSN, not {redact_dsn(dsn)!r}')
    if '@' in parsed.netloc:
        raise ValueError(f'KafkaBroker takes no credentials in the DSN ({redact_dsn(dsn)}): '
                         'pass sasl_* / ssl_context through CLIENT_OPTIONS')
    hosts = [host.strip() for host in parsed.netloc.split(',') if host.strip()]
    if not hosts:
        raise ValueError(f'KafkaBroker DSN {redact_dsn(dsn)!r} names no host')
    return [host if re.search(r':\d+$', host) else f'{host}:{_DEFAULT_PORT}' for host in hosts]


def _topic(name: str) -> str:
    """The Kafka topic of queue ``name``: the same name, which Kafka must accept."""
    if not _TOPIC_NAME.match(name):
        raise QueueException(f'queue {name!r} cannot be a Kafka topic: use only letters, '
                             'digits, ".", "_" and "-" (at most 249)')
    return name


def _with_trace_headers(options: dict[str, Any]) -> dict[str, Any]:
    """Send options with the trace context of the current span added to the record's
    ``headers`` while tracing is on (the caller's own headers are kept)."""
    carrier = trace_headers()
    if not carrier:
        return options
    return {**options, 'headers': [*(options.get('headers') or ()),
                                   *((key, value.encode()) for key, value in carrier.items())]}


async def _within(awaitable: Awaitable[Any], timeout: float) -> Any:
    """Await ``awaitable`` for up to ``timeout`` seconds, then raise TimeoutError without
    cancelling it: aiokafka finishes a commit in a task of its own, whose failure would be
    logged as never retrieved once its caller was cancelled. What it ends with later is
    retrieved and dropped (the caller already reported the timeout)."""
    task = asyncio.ensure_future(awaitable)
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    finished, _ = await asyncio.wait({task}, timeout=timeout)
    if not finished:
        raise asyncio.TimeoutError
    return task.result()


async def _stop(client: Any) -> None:
    """Stop an aiokafka producer or consumer, or close an admin client."""
    stop = getattr(client, 'stop', None) or client.close
    await stop()


class _PartitionOffsets:
    """The records of one partition fetched during one assignment of it, to find the
    offset to commit: the first one not finished, or the one after the last fetched.

    ``active`` turns False when the partition is revoked: acknowledgements of records
    fetched before are then ignored (the partition's new owner delivers them again).
    """

    __slots__ = ('active', 'committed', 'fetched', 'finished', 'next_offset', 'partition')

    def __init__(self, partition: Any) -> None:
        self.partition = partition
        self.fetched: deque[int] = deque()
        self.finished: set[int] = set()
        self.next_offset: int | None = None
        self.committed: int | None = None
        self.active = True

    def finish(self, offset: int) -> None:
        """Mark a record finished, and forget at once the finished ones at the head:
        what is kept is the records in the pool, not all those since the last commit."""
        self.finished.add(offset)
        self.position()

    def position(self) -> int | None:
        """The offset below which every fetched record is finished."""
        fetched, finished = self.fetched, self.finished
        while fetched and fetched[0] in finished:
            finished.discard(fetched.popleft())
        return fetched[0] if fetched else self.next_offset



_MARKS_PARTITION = 0  # the one partition of ``{queue}.dead.handled`` that is written


class _DeadLog:
    """One walk over the dead letters of ``queue`` on Kafka (a listing, count, replay or
    purge). The letters "in" ``{queue}.dead`` are its records past the committed offset
    of the group ``{group_id}.dead`` in each partition, but for those handled out of
    order (not a prefix): their ids are records of ``{queue}.dead.handled``, read from
    that topic's own committed offset in the same group (Tansu does not keep a commit's
    metadata, which could otherwise carry them). ``consumer`` is in that group but never
    joins it: its partitions are assigned, and it only reads and commits."""

    def __init__(self, queue: str, consumer: Any, partitions: list[Any], marks: Any) -> None:
        self.queue = queue
        self.consumer = consumer
        self.partitions = partitions
        self.marks = marks
        self.starts: dict[Any, int] = {}
        self.ends: dict[Any, int] = {}
        self.handled: dict[Any, set[int]] = {tp: set() for tp in partitions}
        self.markers: list[tuple[int, list[tuple[int, int]]]] = []
        self.marks_start = 0

    def read_markers(self, records: Iterable[Any]) -> None:
        """Take the handled ids a replay or purge wrote past the committed offsets."""
        by_number = {tp.partition: tp for tp in self.partitions}
        for record in records:
            try:
                entries = msgspec.json.decode(record.value or b'', type=list[tuple[int, int]])
            except msgspec.DecodeError:
                continue  # not ours: nothing handled
            self.markers.append((record.offset, entries))
            for partition, offset in entries:
                tp = by_number.get(partition)
                if tp is not None and offset >= self.starts[tp]:
                    self.handled[tp].add(offset)

    def count(self) -> int:
        return sum(self.ends[tp] - self.starts[tp]
                   - sum(1 for offset in self.handled[tp] if offset < self.ends[tp])
                   for tp in self.partitions if self.ends[tp] > self.starts[tp])

    def advanced(self, records: Iterable[Any]) -> tuple[dict[Any, int], list[tuple[int, int]]]:
        """Mark ``records`` handled: the partitions whose committed offset moves, with
        their new offset, and the ids still past it (to be written as a marker)."""
        touched: dict[Any, list[int]] = {}
        for record in records:
            tp = next(tp for tp in self.partitions if tp.partition == record.partition)
            self.handled[tp].add(record.offset)
            touched.setdefault(tp, []).append(record.offset)
        moved: dict[Any, int] = {}
        for tp in touched:
            start, handled = self.starts[tp], self.handled[tp]
            while start in handled:
                handled.discard(start)
                start += 1
            if start != self.starts[tp]:
                moved[tp] = self.starts[tp] = start
        left = [(tp.partition, offset) for tp, offsets in touched.items()
                for offset in offsets if offset >= self.starts[tp]]
        return moved, left

    def marks_committable(self, end: int) -> int:
        """The offset of ``{queue}.dead.handled`` below which no marker names a letter
        past the committed offsets any more (``end`` when none does)."""
        by_number = {tp.partition: tp for tp in self.partitions}
        for offset, entries in self.markers:
            if any(partition in by_number and position >= self.starts[by_number[partition]]
                   for partition, position in entries):
                return offset
        return end


class _KafkaConsumption(_Consumption):
    """A queue consumed from Kafka: its aiokafka consumer in the queue's group, the
    committing task, and the offsets of the records in the pool."""

    def __init__(self, name: str, pool: ConsumerPool, link: Link, group_id: str,
                 consumer: Any) -> None:
        super().__init__(name, pool, link)
        self.group_id = group_id
        self.consumer = consumer
        self.partitions: dict[Any, _PartitionOffsets] = {}
        self.dirty: set[_PartitionOffsets] = set()
        self.finished = asyncio.Event()
        self.commit_lock = asyncio.Lock()
        self.committer: asyncio.Task[None] | None = None
        self.commit_failing = False
        self.mover: Any = None  # the consumer of the queue's delay topics
        self.moving: asyncio.Task[None] | None = None

    def track(self, batches: Mapping[Any, list[Any]]) -> list[Delivery]:
        """Deliveries for the records of a ``getmany``, remembered per partition."""
        deliveries: list[Delivery] = []
        for partition, records in batches.items():
            if not records:
                continue
            offsets = self.partitions.get(partition)
            if offsets is None:
                offsets = self.partitions[partition] = _PartitionOffsets(partition)
            offsets.fetched.extend(record.offset for record in records)
            offsets.next_offset = records[-1].offset + 1
            deliveries.extend(Delivery(record.value or b'', record, offsets)
                              for record in records)
        return deliveries

    def finish(self, deliveries: Iterable[Delivery]) -> None:
        dirty = self.dirty
        for delivery in deliveries:
            offsets: _PartitionOffsets = delivery.tag
            if offsets.active:
                offsets.finish(delivery.raw.offset)
                dirty.add(offsets)
        if dirty:
            self.finished.set()

    def to_commit(self, partitions: Iterable[Any] | None = None) -> dict[Any, int]:
        """Offsets that moved since their last commit (of ``partitions``, or all)."""
        if partitions is None:
            candidates, self.dirty = self.dirty, set()
        else:
            candidates = {self.partitions[p] for p in partitions if p in self.partitions}
            self.dirty -= candidates
        offsets: dict[Any, int] = {}
        for tracked in candidates:
            position = tracked.position()
            if tracked.active and position is not None and position != tracked.committed:
                offsets[tracked.partition] = position
        return offsets

    def committed(self, offsets: Mapping[Any, int]) -> None:
        for partition, offset in offsets.items():
            tracked = self.partitions.get(partition)
            if tracked is not None:
                tracked.committed = offset

    def retry(self, offsets: Mapping[Any, int]) -> None:
        """Commit these partitions again with the next commit."""
        tracked = [self.partitions[p] for p in offsets if p in self.partitions]
        if tracked:
            self.dirty.update(tracked)
            self.finished.set()

    def revoke(self, partitions: Iterable[Any]) -> None:
        for partition in partitions:
            tracked = self.partitions.pop(partition, None)
            if tracked is not None:
                tracked.active = False
                self.dirty.discard(tracked)


class _RebalanceListener:
    """Commits what is finished in the partitions a rebalance takes away.

    Registered as a virtual ``aiokafka.ConsumerRebalanceListener`` (aiokafka is
    imported lazily, so this module cannot subclass it)."""

    def __init__(self, broker: KafkaBroker, consumption: _KafkaConsumption) -> None:
        self.broker = broker
        self.consumption = consumption

    async def on_partitions_revoked(self, revoked: set[Any]) -> None:
        if not revoked:
            return
        await self.broker._commit(self.consumption, revoked)
        self.consumption.revoke(revoked)
        self.broker.log.info('Kafka group %s: partitions %s of %s revoked',
                             self.consumption.group_id,
                             sorted(p.partition for p in revoked), self.consumption.name)

    async def on_partitions_assigned(self, assigned: set[Any]) -> None:
        self.broker.log.info('Kafka group %s: partitions %s of %s assigned',
                             self.consumption.group_id,
                             sorted(p.partition for p in assigned), self.consumption.name)


class _KafkaOptions(ConsumerOptions, frozen=True, forbid_unknown_fields=True):
    """The consumer options of :class:`KafkaBroker`: the common ones, and ``group_id``
    (the consumer group; default ``microagent.{queue}``). ``autoack=False`` is refused:
    offsets are committed only after handling."""

    group_id: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.autoack:
            raise ValueError('KafkaBroker commits offsets after handling; autoack=False '
                             'is not supported')


class _KafkaTransport(_Transport):
    """aiokafka's errors: a lost connection, a timeout, or a retriable error is a failed
    link; any other Kafka error is Kafka refusing."""

    SERVER = 'Kafka'

    def _init_transport(self) -> None:
        errors = _aiokafka().errors
        self._failures = (errors.KafkaError, OSError, asyncio.TimeoutError)
        self._unreachable = (OSError, asyncio.TimeoutError, errors.KafkaConnectionError,
                             errors.KafkaTimeoutError, errors.NodeNotReadyError,
                             errors.NoBrokersAvailable)
        self._auth_errors = (errors.SaslAuthenticationFailed, errors.AuthenticationFailedError,
                             errors.AuthenticationMethodNotSupported,
                             errors.UnsupportedSaslMechanismError, errors.IllegalSaslStateError)

    def _credentials_refused(self, error: BaseException) -> bool:
        return isinstance(error, (CredentialsRefused, *self._auth_errors))

    def _refused(self, error: BaseException) -> bool:
        return not (isinstance(error, self._unreachable) or getattr(error, 'retriable', False)
                    or self._credentials_refused(error))


class KafkaBroker(_KafkaTransport, AbstractQueueBroker):
    """Queue broker on Kafka: ``KafkaBroker('kafka://localhost:9092')``.

    The DSN may list several bootstrap servers: ``kafka://k1:9092,k2:9092``. Nothing
    connects before the first send or consumer. Handlers get the aiokafka
    ``ConsumerRecord`` as ``kafka=``. Consumer option ``group_id`` replaces the default
    group ``microagent.{queue}``; ``autoack=False`` is refused (offsets are committed
    only after handling). ``send`` accepts aiokafka's ``key`` (bytes or str),
    ``partition``, ``timestamp_ms`` and ``headers``; records without a key are spread
    over the partitions, so order is kept per key (or partition), not per queue.

    Settings (class attributes, or keyword arguments):
    ``PARTITIONS`` (8) and ``REPLICATION_FACTOR`` (1) of the topics it creates; the
    partitions bound how many replicas of a consumer share a queue's work.
    ``SESSION_TIMEOUT`` (10 s): a consumer that stops heart-beating (killed, frozen) is
    dropped from its group after that long and its partitions go to the others; Kafka
    brokers accept 6 to 300 s by default.
    ``COMMIT_INTERVAL`` (1 s) between offset commits under load.
    ``SEND_TIMEOUT`` (30 s) for a send (and a topic creation) to be acknowledged.
    ``REQUEST_TIMEOUT`` (10 s) for any request to Kafka to be answered: a connection that
    went silent (half-open) is noticed within it. Raise it for a large consumer group
    whose rebalances take longer (a JoinGroup request waits for the whole group).
    ``START_TIMEOUT`` (60 s) for a consumer to join its group.
    ``CLOSE_TIMEOUT`` (10 s) for the last commits and flush when stopping.
    ``REPLAY_BATCH`` (500) dead letters sent at a time by ``replay`` before their commit.
    ``CLIENT_OPTIONS`` ({}): more keyword arguments for the aiokafka clients, each
    getting those its class takes (``security_protocol``, ``sasl_mechanism``,
    ``ssl_context``... for all; ``max_request_size`` for the producer,
    ``max_partition_fetch_bytes`` and ``fetch_max_bytes`` for the consumers; a queue's
    consumer fetches at most 4 MB at a time by default, which bounds its memory whatever
    the backlog, even on a server that ignores ``max_partition_fetch_bytes``).
    Links: ``producer``, and ``consume {queue}`` per consumed queue.
    """

    Options = _KafkaOptions
    RAW_MESSAGE_ARG: ClassVar[str | None] = 'kafka'
    PARTITIONS: ClassVar[int] = 8
    REPLICATION_FACTOR: ClassVar[int] = 1
    SESSION_TIMEOUT: ClassVar[float] = 10.0
    COMMIT_INTERVAL: ClassVar[float] = 1.0
    SEND_TIMEOUT: ClassVar[float] = 30.0
    REQUEST_TIMEOUT: ClassVar[float] = 10.0
    START_TIMEOUT: ClassVar[float] = 60.0
    CLOSE_TIMEOUT: ClassVar[float] = 10.0
    CLIENT_OPTIONS: ClassVar[dict[str, Any]] = {}
    REPLAY_BATCH: ClassVar[int] = 500

    def __init__(self, dsn: str, log: logging.Logger | None = None, **kwargs: Any) -> None:
        super().__init__(dsn, log, **kwargs)
        self.dead_group_ids: dict[str, str] = {}
        """The consumer group of a queue that this broker does not consume but whose
        dead letters it reads (``marun --dead``), when not ``microagent.{queue}``."""
        self.servers = _bootstrap_servers(dsn)
        self._init_transport()
        self._check_client_options()
        # aiokafka retries a failed connection by itself: a warning per attempt, not an error.
        lower_connection_attempt_logs(
            'aiokafka', logging.WARNING, 'Unable connect to "%s:%s": %s',
            'Unable connect to node with id %s: %s', 'Unable to update metadata from %s')
        self._producer: Any = None
        self._admin: Any = None
        self._reader: Any = None
        self._start_lock = asyncio.Lock()
        self._reader_lock = asyncio.Lock()
        self._topics: set[str] = set()
        self._consumptions: dict[str, _KafkaConsumption] = {}

    # --- clients, started on first use --------------------------------------------

    @staticmethod
    def _client_classes() -> tuple[Any, Any, Any]:
        aiokafka = _aiokafka()
        return (aiokafka.AIOKafkaProducer, aiokafka.AIOKafkaConsumer,
                require('aiokafka.admin', 'kafka').AIOKafkaAdminClient)

    def _check_client_options(self) -> None:
        """Refuse a ``CLIENT_OPTIONS`` key that no aiokafka client takes (a typo)."""
        known = {name for client in self._client_classes()
                 for name in inspect.signature(client).parameters}
        unknown = sorted(set(self.CLIENT_OPTIONS) - known)
        if unknown:
            raise TypeError(f'{type(self).__name__}: no aiokafka client takes the '
                            f'CLIENT_OPTIONS {", ".join(unknown)}')

    def _client(self, client_class: Any, **options: Any) -> Any:
        """An aiokafka client with the servers, the request timeout and the
        ``CLIENT_OPTIONS`` that its class takes (``max_request_size`` is the producer's
        only, for example)."""
        common = {'bootstrap_servers': self.servers,
                  'request_timeout_ms': int(self.REQUEST_TIMEOUT * 1000), **self.CLIENT_OPTIONS}
        accepted = inspect.signature(client_class).parameters
        return client_class(**{k: v for k, v in common.items() if k in accepted}, **options)

    async def _started(self, attribute: str, create: Callable[[], Any]) -> Any:
        """The client kept as ``attribute``, created and started by the first caller
        (concurrent first uses wait for it); a client that fails to start is closed."""
        running = getattr(self, attribute)
        if running is not None:
            return running
        async with self._start_lock:
            running = getattr(self, attribute)
            if running is not None:
                return running
            client = create()
            try:
                await asyncio.wait_for(client.start(), self.SEND_TIMEOUT)
            except BaseException:
                with contextlib.suppress(Exception):
                    await _stop(client)
                raise
            setattr(self, attribute, client)
            return client

    async def _producer_started(self) -> Any:
        return self._producer or await self._started('_producer', lambda: self._client(
            self._client_classes()[0], acks='all', client_id='microagent-producer'))

    async def _admin_started(self) -> Any:
        return self._admin or await self._started('_admin', lambda: self._client(
            self._client_classes()[2], client_id='microagent-admin'))

    async def _reader_started(self) -> Any:
        """A consumer outside any group, to read the partitions' offsets."""
        return self._reader or await self._started('_reader', lambda: self._client(
            self._client_classes()[1], client_id='microagent-offsets',
            enable_auto_commit=False, fetch_max_wait_ms=100))

    # --- topics --------------------------------------------------------------------

    async def _ensure_topic(self, name: str, partitions: int | None = None) -> None:
        """Create topic ``name`` unless it exists (once per broker and topic)."""
        if name in self._topics:
            return
        admin = await self._admin_started()
        new_topic = require('aiokafka.admin', 'kafka').NewTopic(
            name, partitions or self.PARTITIONS, self.REPLICATION_FACTOR)
        response = await asyncio.wait_for(admin.create_topics([new_topic]), self.SEND_TIMEOUT)
        for error in response.topic_errors:
            code, message = error[1], error[2] if len(error) > 2 else None
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                raise QueueException(f'Kafka at {redact_dsn(self.dsn)} did not create topic '
                                     f'{name}: error {code} {message or ""}'.rstrip())
            if code == 0:
                self.log.info('Created Kafka topic %s (%d partitions)', name, self.PARTITIONS)
        self._topics.add(name)

    # --- producing -----------------------------------------------------------------

    @staticmethod
    def _send_options(options: dict[str, Any]) -> dict[str, Any]:
        if not options:
            return options
        unknown = set(options) - _SEND_OPTIONS - _IGNORED_SEND_OPTIONS
        if unknown:
            raise TypeError(f'KafkaBroker.send got unknown options {", ".join(sorted(unknown))}'
                            f'; known: {", ".join(sorted(_SEND_OPTIONS))}')
        chosen = {key: value for key, value in options.items() if key in _SEND_OPTIONS}
        if isinstance(chosen.get('key'), str):
            chosen['key'] = chosen['key'].encode()
        return chosen

    async def send(self, name: str, message: bytes, **kwargs: Any) -> None:
        """Produce ``message`` to topic ``name``; return once Kafka acknowledged it.

        Raises :class:`ConnectionError` when Kafka is unreachable (within ``SEND_TIMEOUT``);
        the message may then not be stored.
        """
        options = _with_trace_headers(self._send_options(kwargs))
        topic = _topic(name)
        async with self._failing(f'sending to {name}', self.link('producer')):
            producer = await self._producer_started()
            await self._ensure_topic(topic)
            await producer.send_and_wait(topic, message, **options)

    async def send_many(self, name: str, messages: list[bytes], **kwargs: Any) -> None:
        """Produce several messages, batched by the producer; return once all are
        acknowledged (on an error, some of them may be stored)."""
        options = _with_trace_headers(self._send_options(kwargs))
        topic = _topic(name)
        async with self._failing(f'sending to {name}', self.link('producer')):
            producer = await self._producer_started()
            await self._ensure_topic(topic)
            acks = [await producer.send(topic, message, **options) for message in messages]
            await asyncio.gather(*acks)

    async def send_later(self, name: str, messages: list[bytes], due: float, **kwargs: Any
                         ) -> None:
        """Produce the records to the delay topic of the queue that fits their delay (see
        ``DELAY_WAITS``), with their due time in a header; the queue's consumers move
        them on. Options: ``key`` and ``headers``, kept to the queue."""
        options = self._send_options(kwargs)
        if set(options) - {'key', 'headers'}:
            raise TypeError('KafkaBroker.send with a delay takes the options key and '
                            'headers only')
        index, ready = _delay_hop(due, time.time())
        options['headers'] = [*(options.get('headers') or ()), *_delay_headers(due, ready)]
        options = _with_trace_headers(options)
        delay_topic = _delay_topic(_topic(name), index)
        async with self._failing(f'sending to {name}', self.link('producer')):
            producer = await self._producer_started()
            await self._ensure_topic(delay_topic, partitions=1)
            acks = [await producer.send(delay_topic, message, **options) for message in messages]
            await asyncio.gather(*acks)

    async def delayed_count(self, queue: str) -> int:
        """The records in the queue's delay topics that its consumers did not move on
        yet (the lag of their group ``{group}.delayed``)."""
        topic = _topic(queue)
        group_id = self._delay_group(queue)
        topics = [_delay_topic(topic, index) for index in range(len(DELAY_WAITS))]
        async with self._failing(f'counting delayed messages of {queue}'):
            for delay_topic in topics:
                await self._ensure_topic(delay_topic, partitions=1)
            lag: int = await asyncio.wait_for(self._lag(topics[0], group_id, topics[1:]),
                                              self.SEND_TIMEOUT)
        return lag

    def _delay_group(self, name: str) -> str:
        consumption = self._consumptions.get(name)
        return f'{consumption.group_id if consumption else f"microagent.{name}"}.delayed'

    # --- moving delayed records on ---------------------------------------------------

    async def _mover_started(self, consumption: _KafkaConsumption) -> Any:
        """The consumer of the queue's delay topics (created here), in group
        ``{group}.delayed``, started."""
        topic = _topic(consumption.name)
        topics = [_delay_topic(topic, index) for index in range(len(DELAY_WAITS))]
        for delay_topic in topics:
            await self._ensure_topic(delay_topic, partitions=1)
        session_ms = int(self.SESSION_TIMEOUT * 1000)
        mover = self._client(
            _aiokafka().AIOKafkaConsumer, group_id=f'{consumption.group_id}.delayed',
            client_id=f'microagent-{consumption.name}-delayed', enable_auto_commit=False,
            auto_offset_reset='earliest', session_timeout_ms=session_ms,
            heartbeat_interval_ms=max(session_ms // 3, 100), fetch_max_wait_ms=100)
        mover.subscribe(topics)
        try:
            await asyncio.wait_for(mover.start(), self.START_TIMEOUT)
        except BaseException:
            with contextlib.suppress(Exception):
                await mover.stop()
            raise
        return mover

    async def _move_delayed(self, consumption: _KafkaConsumption) -> None:
        """Forever: take the records of the delay topics that are due out of them, and
        pause a partition whose head is not due until it is."""
        mover = consumption.mover
        while True:
            batches: Mapping[Any, list[Any]] = {}
            try:
                batches = await mover.getmany(timeout_ms=200, max_records=500)
                if batches:
                    await self._move_due(consumption, mover, batches)
            except Exception as exc:
                for partition, records in batches.items():  # again (perhaps twice)
                    if records:
                        with contextlib.suppress(Exception):  # unless no longer held
                            mover.seek(partition, records[0].offset)
                self.log.warning('Moving the delayed messages of %s failed; retrying: %s',
                                 consumption.name, error_text(exc))
                await asyncio.sleep(1)

    async def _move_due(self, consumption: _KafkaConsumption, mover: Any,
                        batches: Mapping[Any, list[Any]]) -> None:
        producer = await self._producer_started()
        topic, now = _topic(consumption.name), time.time()
        loop = asyncio.get_running_loop()
        acks, done = [], {}
        for partition, records in batches.items():
            for record in records:
                headers = [(key, value) for key, value in record.headers or ()
                           if key not in _DELAY_HEADERS]
                due = _header_ms(record.headers or (), _DUE_HEADER) or now
                ready = _header_ms(record.headers or (), _READY_HEADER) or due
                if ready > now:
                    mover.seek(partition, record.offset)
                    mover.pause(partition)
                    loop.call_later(ready - now, _resume, mover, partition)
                    break
                target = topic
                if due > now:
                    index, ready = _delay_hop(due, now)
                    target = _delay_topic(topic, index)
                    headers.extend(_delay_headers(due, ready))
                acks.append(await producer.send(target, record.value, key=record.key,
                                                headers=headers))
                done[partition] = record.offset + 1
        await asyncio.gather(*acks)
        if done:
            await _within(mover.commit(done), min(self.SEND_TIMEOUT, self.SESSION_TIMEOUT / 2))

    async def _stop_moving(self, consumption: _KafkaConsumption) -> None:
        await cancel_and_wait(consumption.moving)
        mover, consumption.mover = consumption.mover, None
        if mover is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(mover.stop(), self.CLOSE_TIMEOUT)

    # --- consuming -----------------------------------------------------------------

    async def bind(self, name: str) -> None:
        """Join the queue's consumer group; return once partitions are assigned and
        fetching runs. Raises :class:`ConnectionError` when Kafka is unreachable."""
        pool = self.pools[name]
        options = pool.options
        assert isinstance(options, _KafkaOptions)
        group_id = options.group_id or f'microagent.{name}'
        topic = _topic(name)
        aiokafka = _aiokafka()
        session_ms = int(self.SESSION_TIMEOUT * 1000)
        consumer = self._client(
            aiokafka.AIOKafkaConsumer, group_id=group_id, client_id=f'microagent-{name}',
            enable_auto_commit=False, auto_offset_reset='earliest',
            session_timeout_ms=session_ms, heartbeat_interval_ms=max(session_ms // 3, 100),
            **self._fetch_limit())
        consumption = _KafkaConsumption(name, pool, self.link(f'consume {name}'), group_id,
                                        consumer)
        aiokafka.ConsumerRebalanceListener.register(_RebalanceListener)
        consumer.subscribe([topic], listener=_RebalanceListener(self, consumption))
        try:
            async with self._failing(f'joining group {group_id} for {name}', consumption.link):
                await self._ensure_topic(topic)
                results: tuple[Any, ...] = await asyncio.gather(
                    asyncio.wait_for(consumer.start(), self.START_TIMEOUT),
                    self._mover_started(consumption), return_exceptions=True)
                if not isinstance(results[1], BaseException):
                    consumption.mover = results[1]  # stopped below if the other failed
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
        except BaseException:
            with contextlib.suppress(Exception):
                await consumer.stop()
            await self._stop_moving(consumption)
            raise
        self._consumptions[name] = consumption
        loop = asyncio.get_running_loop()
        consumption.task = loop.create_task(self._consume(consumption))
        consumption.committer = loop.create_task(self._commit_periodically(consumption))
        consumption.moving = loop.create_task(self._move_delayed(consumption))

    def _fetch_limit(self) -> dict[str, int]:
        """``fetch_max_bytes`` for a queue's consumer, unless ``CLIENT_OPTIONS`` sets it."""
        return {} if 'fetch_max_bytes' in self.CLIENT_OPTIONS else {
            'fetch_max_bytes': _FETCH_MAX_BYTES}

    async def _consume(self, consumption: _KafkaConsumption) -> None:
        """Feed the pool with batches of records, forever; a failure is retried with
        backoff (aiokafka reconnects by itself).

        A fetch that cannot reach Kafka returns nothing rather than failing, so records
        are what says the link is up; after ``REQUEST_TIMEOUT / 2`` without any, it is up
        while Kafka answers the consumer (:meth:`_probe`) and lost while it does not."""
        consumer, pool, link = consumption.consumer, consumption.pool, consumption.link
        size = max(1, pool.capacity)
        clock = asyncio.get_running_loop().time
        quiet = self.REQUEST_TIMEOUT / 2
        heard_until = clock() + quiet
        while not pool.closing:
            try:
                async with self._failing(f'fetching {consumption.name}'):
                    batches = await consumer.getmany(timeout_ms=_FETCH_WAIT_MS,
                                                     max_records=size)
                    if not batches and clock() >= heard_until:
                        await self._probe(consumer, quiet)
                    if batches or clock() >= heard_until:
                        heard_until = clock() + quiet
                        link.up()
            except Exception as exc:
                link.lost(exc)
                await link.pause()
                continue
            if batches:
                await pool.feed(consumption.track(batches))

    async def _probe(self, consumer: Any, timeout: float) -> None:
        """Raise a connection error unless Kafka answered the consumer within ``timeout``
        seconds. aiokafka fetches the partitions it holds continuously (a fetch with
        nothing to return is answered after ``fetch_max_wait_ms``) and stamps each
        answer, so those stamps say it without a request; with no partition stamped yet
        (none held, or just assigned), a metadata request is sent on the consumer's own
        connection."""
        errors = _aiokafka().errors
        stamps = [consumer.last_poll_timestamp(tp) for tp in consumer.assignment()]
        answered = [stamp for stamp in stamps if stamp is not None]
        if answered:
            silent = time.time() - max(answered) / 1000
            if silent > timeout:
                raise errors.KafkaConnectionError(f'no fetch answered for {silent:.0f}s')
            return
        try:
            await _within(consumer.topics(), timeout)
        except errors.KafkaError as exc:  # 'Unable to get cluster metadata': unreachable
            raise errors.KafkaConnectionError(str(exc)) from exc

    def trace_carrier(self, delivery: Delivery) -> Mapping[str, Any] | None:
        """The headers of a consumed record, which carry the trace context."""
        headers = delivery.raw.headers if delivery.raw is not None else None
        return dict(headers) if headers else None

    async def _commit_periodically(self, consumption: _KafkaConsumption) -> None:
        while True:
            await consumption.finished.wait()
            consumption.finished.clear()
            await self._commit(consumption)
            await asyncio.sleep(self.COMMIT_INTERVAL)

    async def _commit(self, consumption: _KafkaConsumption,
                      partitions: Iterable[Any] | None = None) -> None:
        """Commit the finished offsets (of ``partitions``, or of every partition); what
        fails is committed again with the next commit. A commit takes at most half the
        session timeout: a rebalance waits for it (aiokafka retries some errors forever)."""
        async with consumption.commit_lock:
            offsets = consumption.to_commit(partitions)
            if not offsets:
                return
            try:
                await _within(consumption.consumer.commit(offsets),
                              min(self.SEND_TIMEOUT, self.SESSION_TIMEOUT / 2))
            except Exception as exc:
                consumption.retry(offsets)
                if not consumption.commit_failing:
                    consumption.commit_failing = True
                    self.log.warning(
                        'Committing offsets of %s (group %s) failed; retrying (their records '
                        'are delivered again if it never succeeds): %s', consumption.name,
                        consumption.group_id, error_text(exc))
            else:
                consumption.committed(offsets)
                if consumption.commit_failing:
                    consumption.commit_failing = False
                    self.log.info('Committing offsets of %s works again', consumption.name)

    async def ack(self, name: str, deliveries: list[Delivery]) -> None:
        """Mark records finished; their offsets are committed soon after."""
        consumption = self._consumptions.get(name)
        if consumption is not None:
            consumption.finish(deliveries)

    async def release(self, name: str, deliveries: list[Delivery]) -> None:
        """Nothing to send: the offsets of unfinished records are never committed, so
        the group delivers them again (to the next consumer, or after a rebalance)."""

    async def unbind(self, name: str) -> None:
        """Stop fetching at once; the group membership lasts until the pool drained
        (see :meth:`unbound`), so that finished records can be committed."""
        consumption = self._consumptions.get(name)
        if consumption is None:
            return
        await consumption.stop_feeding()
        with contextlib.suppress(Exception):
            consumption.consumer.pause(*consumption.consumer.assignment())

    async def unbound(self, name: str) -> None:
        """The consumer of ``name`` has drained: commit what finished and leave the
        group, so that its partitions go to the other consumers at once."""
        consumption = self._consumptions.pop(name, None)
        if consumption is None:
            return
        await consumption.stop_feeding()
        await self._stop_moving(consumption)
        async with consumption.commit_lock:  # not in the middle of a commit: aiokafka
            await cancel_and_wait(consumption.committer)  # would finish it after the stop
        try:
            await asyncio.wait_for(self._commit(consumption), self.CLOSE_TIMEOUT)
        except asyncio.TimeoutError:
            self.log.warning('Committing the last offsets of %s timed out; their records may '
                             'be delivered again', name)
        try:
            await asyncio.wait_for(consumption.consumer.stop(), self.CLOSE_TIMEOUT)
        except Exception as exc:
            self.log.warning('Stopping the Kafka consumer of %s failed: %s',
                             name, error_text(exc))

    def partitions(self, name: str) -> frozenset[int]:
        """The partitions of queue ``name`` that this broker's consumer holds now (empty
        while its group rebalances, or when it does not consume ``name``)."""
        consumption = self._consumptions.get(name)
        if consumption is None:
            return frozenset()
        return frozenset(tp.partition for tp in consumption.consumer.assignment())

    async def waiting(self, name: str) -> int:
        """The records of ``name`` that this broker's consumer could fetch now (for the
        stalled-consumer check of marun): over the partitions it holds, the end offset
        minus its position; 0 while it holds none. The group's lag would also count the
        partitions of other consumers, and records finished but not committed yet."""
        consumption = self._consumptions.get(name)
        if consumption is None:
            return await self.queue_length(name)
        partitions = list(consumption.consumer.assignment())
        if not partitions:
            return 0
        async with self._failing(f'reading the lag of {name}'):
            _, ends = await asyncio.wait_for(self._offset_range(partitions), self.SEND_TIMEOUT)
            positions = [await consumption.consumer.position(tp) for tp in partitions]
        return sum(max(0, ends[tp] - position)
                   for tp, position in zip(partitions, positions, strict=True))


    # --- lag -----------------------------------------------------------------------

    async def queue_length(self, name: str) -> int:
        """The lag of the queue's consumer group: over the topic's partitions, the end
        offset minus the group's committed offset (the first offset when none)."""
        topic = _topic(name)
        consumption = self._consumptions.get(name)
        group_id = consumption.group_id if consumption else f'microagent.{name}'
        async with self._failing(f'reading the lag of {name}'):
            await self._ensure_topic(topic)
            lag: int = await asyncio.wait_for(self._lag(topic, group_id), self.SEND_TIMEOUT)
        return lag

    async def _lag(self, topic: str, group_id: str, also: Sequence[str] = ()) -> int:
        """The lag of ``group_id`` over ``topic`` (and the topics ``also``, read
        together)."""
        admin = await self._admin_started()
        described = await admin.describe_topics([topic, *also])
        partitions = [_aiokafka().TopicPartition(each['topic'], partition['partition'])
                      for each in described for partition in each['partitions']]
        if not partitions:
            return 0
        starts, ends = await self._offset_range(partitions)
        committed = await admin.list_consumer_group_offsets(group_id, partitions=partitions)
        lag = 0
        for partition in partitions:
            done = committed.get(partition)
            position = max(starts[partition], done.offset if done is not None else -1)
            lag += max(0, ends[partition] - position)
        return lag

    async def _offset_range(self, partitions: list[Any]) -> tuple[dict[Any, int], dict[Any, int]]:
        """The first and the end offset of each partition.

        The end is the high watermark of a fetch of the partition's last record rather
        than the end that ListOffsets reports alone: some Kafka-protocol brokers (Tansu
        0.6) report there the base offset of the last record *batch* plus one, which
        misses the other records of a batch (``send_many``). On Kafka both agree; the
        fetch costs one round trip and the last batch of each partition.

        The long-lived reader keeps the partitions of every topic it was asked about
        assigned and paused: a call changes no subscription (which aiokafka logs at INFO
        each time), it seeks, resumes the partitions for that one fetch and pauses them.
        """
        reader = await self._reader_started()
        async with self._reader_lock:
            starts = await reader.beginning_offsets(partitions)
            ends = dict(await reader.end_offsets(partitions))
            fetched = {tp for tp in partitions if ends[tp] > starts[tp]}
            if not fetched:
                return starts, ends
            assigned = reader.assignment()
            if not fetched <= assigned:  # once per topic in the broker's life
                assigned = assigned | set(partitions)
                reader.assign(list(assigned))
                reader.pause(*assigned)
            for partition in fetched:
                reader.seek(partition, ends[partition] - 1)
            reader.resume(*fetched)
            try:
                pending = set(fetched)
                while pending:
                    # Records of a partition come from a fetch at its last record, made
                    # after the seek: their response's high watermark is current.
                    records = await reader.getmany(*pending, timeout_ms=100)
                    for partition in pending & records.keys():
                        ends[partition] = max(ends[partition], reader.highwater(partition))
                        pending.discard(partition)
            finally:
                reader.pause(*fetched)
        return starts, ends

    # --- dead letters --------------------------------------------------------------
    # ``{queue}.dead`` is a log: see :class:`_DeadLog`. Ids are ``partition:offset``.

    def _dead_group(self, queue: str) -> str:
        """The group whose committed offsets say which dead letters of ``queue`` were
        handled: ``{group_id}.dead`` of the queue's consumer group."""
        consumption = self._consumptions.get(queue)
        group_id = (consumption.group_id if consumption
                    else self.dead_group_ids.get(queue) or f'microagent.{queue}')
        return f'{group_id}.dead'

    @contextlib.asynccontextmanager
    async def _dead_log(self, queue: str) -> AsyncIterator[_DeadLog]:
        """A walk over the dead letters of ``queue``, its consumer stopped after."""
        aiokafka = _aiokafka()
        dead, marks = _topic(f'{queue}.dead'), _topic(f'{queue}.dead.handled')
        for topic in (dead, marks):
            await self._ensure_topic(topic)
        admin = await self._admin_started()
        described = await admin.describe_topics([dead])
        partitions = sorted((aiokafka.TopicPartition(dead, p['partition'])
                             for p in described[0]['partitions']), key=lambda tp: tp.partition)
        marks_tp = aiokafka.TopicPartition(marks, _MARKS_PARTITION)
        group = self._dead_group(queue)
        consumer = self._client(aiokafka.AIOKafkaConsumer, group_id=group,
                                client_id='microagent-dead-letters', enable_auto_commit=False,
                                fetch_max_wait_ms=100)
        await asyncio.wait_for(consumer.start(), self.SEND_TIMEOUT)
        try:
            log = _DeadLog(queue, consumer, partitions, marks_tp)
            every = [*partitions, marks_tp]
            starts, ends = await self._offset_range(every)
            committed = await admin.list_consumer_group_offsets(group, partitions=every)
            for tp in every:
                done = committed.get(tp)
                start = max(starts[tp], done.offset if done is not None else -1)
                log.starts[tp], log.ends[tp] = start, max(start, ends[tp])
            log.marks_start = log.starts.pop(marks_tp)
            marks_end = log.ends.pop(marks_tp)
            consumer.assign(every)
            consumer.pause(*every)
            if marks_end > log.marks_start:
                log.read_markers(await self._read_log(
                    consumer, {marks_tp: (log.marks_start, marks_end)}, None))
            yield log
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), self.CLOSE_TIMEOUT)

    async def _read_log(self, consumer: Any, ranges: Mapping[Any, tuple[int, int]],
                        wanted: Callable[[Any], bool] | None, limit: int | None = None
                        ) -> list[Any]:
        """The records of each partition in its range ``[start, end)`` (those
        ``wanted``, at most ``limit`` of each), in offset order per partition."""
        found: dict[Any, list[Any]] = {tp: [] for tp in ranges}
        pending = {tp for tp, (start, end) in ranges.items() if end > start and limit != 0}
        for tp in pending:
            consumer.seek(tp, ranges[tp][0])
        consumer.resume(*pending)
        clock = asyncio.get_running_loop().time
        deadline = clock() + self.SEND_TIMEOUT
        try:
            while pending:
                if clock() > deadline:
                    raise asyncio.TimeoutError(f'reading {len(pending)} partition(s) timed out')
                batches = await consumer.getmany(*pending, timeout_ms=200)
                for tp, records in batches.items():
                    end = ranges[tp][1]
                    found[tp].extend(record for record in records if record.offset < end
                                     and (wanted is None or wanted(record)))
                    if (await consumer.position(tp) >= end
                            or (limit is not None and len(found[tp]) >= limit)):
                        consumer.pause(tp)
                        pending.discard(tp)
        finally:
            consumer.pause(*pending)
        return [record for records in found.values() for record in records]

    async def _unhandled(self, log: _DeadLog, limit: int | None) -> list[Any]:
        """The letters of ``log`` not handled yet, oldest first (by the time each was
        stored, then partition and offset), at most ``limit``."""
        ranges = {tp: (log.starts[tp], log.ends[tp]) for tp in log.partitions}
        records = await self._read_log(
            log.consumer, ranges,
            lambda record: record.offset not in log.handled[
                next(tp for tp in log.partitions if tp.partition == record.partition)],
            limit)
        records.sort(key=lambda record: (record.timestamp, record.partition, record.offset))
        return records if limit is None else records[:limit]

    @staticmethod
    def _dead_letter_of(queue: str, record: Any) -> DeadLetter:
        return _read_dead_letter(f'{record.partition}:{record.offset}', queue,
                                 record.value or b'', record.timestamp / 1000)

    async def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """The first ``limit`` letters of ``{queue}.dead`` not handled yet, oldest first
        (reading commits nothing)."""
        _check_limit(limit)
        async with self._failing(f'reading dead letters of {queue}'), \
                self._dead_log(queue) as log:
            records = await self._unhandled(log, limit)
        return [self._dead_letter_of(queue, record) for record in records]

    async def dead_count(self, queue: str) -> int:
        async with self._failing(f'counting dead letters of {queue}'), \
                self._dead_log(queue) as log:
            return log.count()

    async def _take_dead(self, queue: str, wanted: set[str] | None, limit: int | None, *,
                         push: bool) -> int:
        """Replay (``push``) sends the chosen letters' messages to ``queue``,
        ``REPLAY_BATCH`` at a time; each batch is marked handled only once Kafka
        acknowledged all its messages. Purge marks the chosen letters handled (the log
        itself keeps its records)."""
        what = f'{"replaying" if push else "purging"} dead letters of {queue}'
        taken = 0
        async with self._failing(what, self.link('producer')), self._dead_log(queue) as log:
            records = await self._unhandled(log, limit if wanted is None else None)
            if wanted is not None:
                records = [r for r in records if f'{r.partition}:{r.offset}' in wanted]
            for first in range(0, len(records), self.REPLAY_BATCH):
                batch = records[first:first + self.REPLAY_BATCH]
                if push:
                    await self.send_many(queue, [self._dead_letter_of(queue, r).body
                                                 for r in batch])
                await self._mark_handled(log, batch)
                taken += len(batch)
        return taken

    async def _mark_handled(self, log: _DeadLog, records: list[Any]) -> None:
        """Commit past ``records``: the committed offsets move over what is handled
        from them on; ids handled beyond a gap are written to ``{queue}.dead.handled``
        first, and that topic's committed offset moves past markers no longer needed."""
        structs = _aiokafka().structs
        moved, left = log.advanced(records)
        marks_end = log.marks_start if not log.markers else log.markers[-1][0] + 1
        if left:
            producer = await self._producer_started()
            stored = await producer.send_and_wait(log.marks.topic, msgspec.json.encode(left),
                                                  partition=_MARKS_PARTITION)
            log.markers.append((stored.offset, left))
            marks_end = stored.offset + 1
        offsets = {tp: structs.OffsetAndMetadata(offset, '') for tp, offset in moved.items()}
        marks_start = log.marks_committable(marks_end)
        if marks_start > log.marks_start:
            offsets[log.marks] = structs.OffsetAndMetadata(marks_start, '')
        if offsets:
            await asyncio.wait_for(log.consumer.commit(offsets), self.SEND_TIMEOUT)
            log.marks_start = max(log.marks_start, marks_start)

    # --- closing -------------------------------------------------------------------

    async def disconnect(self) -> None:
        """Flush and stop the producer, stop the offsets reader and the admin client."""
        for name in list(self._consumptions):
            await self.unbound(name)
        clients = {'producer': self._producer, 'offsets reader': self._reader,
                   'admin client': self._admin}
        self._producer = self._reader = self._admin = None
        self._topics.clear()
        for what, client in clients.items():
            if client is None:
                continue
            try:
                await asyncio.wait_for(_stop(client), self.CLOSE_TIMEOUT)
            except Exception as exc:
                self.log.warning('Stopping the Kafka %s failed: %s', what,
                                 error_text(exc))
