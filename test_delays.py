"""Delayed delivery and the retry policy (DESIGN.md, "Delayed delivery and retry
policy"): contract tests over every backend, through the public API."""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiormq
import pytest
import redis.asyncio as aioredis

from conftest import RedisServer, redis_server
from microagent import MemoryBroker, MicroAgent, Queue, consumer
from microagent_backends import DELAY_LEVELS, RedisBroker
from test_microagent_backends import (  # noqa: F401  (fixtures used by the broker kinds)
    BROKER_KINDS,
    STUCK_CONSUMER,
    WAIT,
    BrokerKind,
    closing,
    eventually,
    kafka_settings,
    memory_dsn,
    rabbit,
    rabbitmqctl,
    raw_producer,
    running,
)


@pytest.fixture(params=list(BROKER_KINDS))
def kind(request: pytest.FixtureRequest, delay_ladders: None) -> BrokerKind:
    """Each backend, as the contract suite of test_microagent_backends sees it."""
    return BROKER_KINDS[request.param](request)


@pytest.fixture
async def delay_ladders(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[None]:
    """On RabbitMQ, the delay ladders of the test's queues are deleted afterwards."""
    yield
    callspec = getattr(request.node, 'callspec', None)
    if callspec is not None and callspec.params.get('kind') == 'amqp':
        await delete_delay_ladders(request.getfixturevalue('amqp_dsn'), unique)


async def delete_delay_ladders(dsn: str, unique: str) -> None:
    connection = await aiormq.connect(dsn)
    try:
        channel = await connection.channel()
        for name in Queue.get_all():
            if name.startswith(unique):
                for level in range(DELAY_LEVELS):
                    await channel.queue_delete(f'microagent.delay.{name}.{level}')
                    await channel.exchange_delete(f'microagent.delay.{name}.{level}')
                await channel.exchange_delete(f'microagent.delay.{name}.arrive')
    finally:
        await connection.close()


# -- retry policy -----------------------------------------------------------------------


async def test_messages_waiting_for_a_retry_do_not_hold_the_workers(
        kind: BrokerKind) -> None:
    queue = Queue(kind.unique)
    calls: list[tuple[int, float]] = []
    third_handled = asyncio.Event()

    class Busy(MicroAgent):
        @consumer(queue, concurrency=2, backoff=5)
        async def work(self, n: int, **raw_message: Any) -> None:
            calls.append((n, time.monotonic()))
            if n < 3:
                raise ConnectionError('downstream is down')
            third_handled.set()

    broker = kind.broker(PREFETCH=1)
    async with running(Busy(broker=broker)):
        bound = getattr(broker, queue.name)
        await bound.send({'n': 1}, **kind.ordered)
        await bound.send({'n': 2}, **kind.ordered)
        await eventually(lambda: {n for n, _ in calls} >= {1, 2})
        failed_at = time.monotonic()
        await bound.send({'n': 3}, **kind.ordered)
        await asyncio.wait_for(third_handled.wait(), 4)  # before the first retry is due
        assert time.monotonic() - failed_at < 4
        assert [n for n, _ in calls].count(1) == [n for n, _ in calls].count(2) == 1
        pool = broker.pools[queue.name]
        assert pool.waiting_retries == 2 and pool.in_flight == 0
        # The waiting messages are still the consumer's: neither acknowledged nor
        # delivered elsewhere; their retry comes about 5 s after their failure.
        await eventually(lambda: [n for n, _ in calls].count(1) == 2, timeout=WAIT)
        first, retried = (at for n, at in calls if n == 1)
        assert 4.9 <= retried - first < 7


async def test_retry_on_retries_only_the_listed_exceptions(kind: BrokerKind) -> None:
    queue = Queue(kind.unique)
    calls: list[str] = []
    done = asyncio.Event()

    class Picky(MicroAgent):
        @consumer(queue, concurrency=1, retry_on=(KeyError,), retries=2)  # in order
        async def work(self, kind: str, **raw_message: Any) -> None:
            calls.append(kind)
            if kind == 'key' and calls.count('key') < 3:
                raise KeyError('not there yet')
            if kind == 'value':
                raise ValueError('never valid')
            done.set()

    broker = kind.broker(RETRY_BACKOFF=0.01)
    async with running(Picky(broker=broker)):
        bound = getattr(broker, queue.name)
        await bound.send({'kind': 'value'}, **kind.ordered)
        await bound.send({'kind': 'key'}, **kind.ordered)
        await asyncio.wait_for(done.wait(), WAIT)
        [dead] = await kind.dead_letters(queue.name, 1)
    assert calls == ['value', 'key', 'key', 'key']
    assert dead['error'] == 'ValueError: never valid' and dead['attempts'] == 1
    assert dead['body'] == '{"kind":"value"}'


async def test_max_backoff_caps_the_wait_and_a_stop_releases_waiting_retries(
        kind: BrokerKind) -> None:
    queue = Queue(kind.unique)
    calls: list[float] = []
    failed = asyncio.Event()

    class Capped(MicroAgent):
        @consumer(queue, concurrency=2, backoff=60, max_backoff=0.5, retries=5)
        async def work(self, **raw_message: Any) -> None:
            calls.append(time.monotonic())
            failed.set()
            raise ConnectionError('still down')

    broker = kind.broker()
    async with running(Capped(broker=broker)):
        await getattr(broker, queue.name).send({'n': 1})
        await eventually(lambda: len(calls) >= 3)  # 60 s backoff capped to 0.5 s
        assert all(0.4 <= later - earlier < 2 for earlier, later in itertools.pairwise(calls))
        failed.clear()
        await asyncio.wait_for(failed.wait(), WAIT)  # a retry happened: one waits now
        assert broker.pools[queue.name].waiting_retries == 1
    # The stop gave the waiting message back: the next consumer gets it.
    again = Arrivals(queue, kind.broker_class.RAW_MESSAGE_ARG)
    async with running(again.agent_class(broker=kind.broker(**kind.kill_settings)),
                       start_timeout=kind.takeover):
        await again.wait(1, timeout=kind.takeover)
    assert [message for message, _ in again.got] == [{'n': 1}]


@pytest.mark.parametrize('kind', ['redis'], indirect=True)
async def test_a_retry_waiting_past_the_visibility_timeout_stays_with_its_consumer(
        kind: BrokerKind) -> None:
    queue = Queue(kind.unique)
    calls: list[str] = []
    retried = asyncio.Event()

    def agent_class(label: str) -> type[MicroAgent]:
        class Owner(MicroAgent):
            @consumer(queue, concurrency=2, backoff=2)
            async def work(self, **raw_message: Any) -> None:
                calls.append(label)
                if len(calls) == 1:
                    raise ConnectionError('down for a while')
                retried.set()
        return Owner

    first = kind.broker(VISIBILITY_TIMEOUT=0.3)
    async with running(agent_class('first')(broker=first)):
        await getattr(first, queue.name).send({'n': 1})
        await eventually(lambda: calls == ['first'])
        other = kind.broker(VISIBILITY_TIMEOUT=0.3)
        async with running(agent_class('other')(broker=other)):
            await asyncio.wait_for(retried.wait(), WAIT)
    assert calls == ['first', 'first']  # not redelivered to the other meanwhile
    assert await kind.left(queue.name) == (0, 0)


def test_info_shows_the_retry_policy() -> None:
    queue = Queue('info_retry_policy')

    class Policy(MicroAgent):
        @consumer(queue, retry_on=(KeyError, TimeoutError), max_backoff=30)
        def work(self, **message: Any) -> None:
            pass

    [info] = Policy(broker=MemoryBroker('memory://info_retry_policy')).info()['consumers']
    assert info['options'] == {'retry_on': ['KeyError', 'TimeoutError'], 'max_backoff': 30}


def test_retry_on_takes_exception_classes_only() -> None:
    with pytest.raises(ValueError, match='retry_on takes exception classes'):
        consumer(Queue('retry_on_refused'), retry_on=('KeyError',))


# -- delayed delivery -------------------------------------------------------------------

LATE = 1.0  # seconds after due within which a running consumer gets a delayed message


class Arrivals:
    """A consumer's agent class that notes when (its own clock) each message arrived."""

    def __init__(self, queue: Queue, raw_arg: str | None) -> None:
        self.got: list[tuple[dict[str, Any], float]] = []
        self.changed = asyncio.Event()
        arrivals = self

        class Receiver(MicroAgent):
            @consumer(queue, concurrency=50)
            def take(self, **payload: Any) -> None:
                payload.pop(raw_arg or '', None)  # amqp=, kafka=
                arrivals.got.append((payload, time.time()))
                arrivals.changed.set()

        self.agent_class = Receiver

    async def wait(self, count: int, timeout: float = WAIT) -> None:
        await eventually(lambda: len(self.got) >= count, timeout=timeout, changed=self.changed)


async def test_delayed_messages_come_once_not_before_due_and_soon_after(
        kind: BrokerKind) -> None:
    queue, total = Queue(kind.unique), 200
    rng = random.Random(22)
    arrivals = Arrivals(queue, kind.broker_class.RAW_MESSAGE_ARG)
    broker = kind.broker()
    bound = getattr(broker, queue.name)
    windows: dict[int, tuple[float, float]] = {}  # n -> (earliest due, latest due)
    counts: list[int] = []
    async with running(arrivals.agent_class(broker=broker)):
        for n in range(total):
            delay = 0.0 if n % 20 == 0 else rng.uniform(0, 5)
            before = time.time()
            if n % 2:
                await bound.send({'n': n}, delay=delay)
            else:
                await bound.send({'n': n}, at=before + delay)
            windows[n] = (before + delay, time.time() + delay)
        counts.append(await broker.delayed_count(queue.name))
        while len(arrivals.got) < total:
            counts.append(await broker.delayed_count(queue.name))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(arrivals.changed.wait(), 0.2)
            arrivals.changed.clear()
            assert time.time() < max(last for _, last in windows.values()) + WAIT
        counts.append(await broker.delayed_count(queue.name))
    numbers = sorted(message['n'] for message, _ in arrivals.got)
    assert numbers == list(range(total))  # each once
    for message, at in arrivals.got:
        earliest, latest = windows[message['n']]
        assert earliest <= at <= latest + LATE, (message, at - earliest)
    assert counts[0] > total / 2 and counts[-1] == 0
    # It counts down. On RabbitMQ and Kafka a count reads the levels of the delay while
    # messages move from one to the next: it may miss or see twice those moving then (on
    # Kafka a whole batch a mover fetched, sent on and not yet committed: 47 of 200 once).
    slack = {'amqp': total // 5, 'kafka': total // 2}.get(kind.name, 0)
    bumps = [(earlier, later) for earlier, later in itertools.pairwise(counts) if later > earlier]
    assert all(later <= earlier + slack for earlier, later in bumps), bumps
    assert max(counts) <= counts[0] + slack
    assert await kind.left(queue.name) == (0, 0)


async def test_at_takes_an_aware_datetime(kind: BrokerKind) -> None:
    queue = Queue(kind.unique)
    arrivals = Arrivals(queue, kind.broker_class.RAW_MESSAGE_ARG)
    broker = kind.broker()
    bound = getattr(broker, queue.name)
    due = datetime.datetime.now(datetime.timezone(datetime.timedelta(hours=5))) \
        + datetime.timedelta(seconds=1.5)
    async with running(arrivals.agent_class(broker=broker)):
        await bound.send({'n': 1}, at=due)
        await bound.send_many([{'n': 2}], at=due - datetime.timedelta(hours=1))  # past: now
        await arrivals.wait(2)
    [(first, first_at), (second, second_at)] = arrivals.got
    assert (first, second) == ({'n': 2}, {'n': 1})
    assert due.timestamp() <= second_at <= due.timestamp() + LATE
    assert first_at < due.timestamp()


async def test_naive_datetime_and_negative_delay_are_refused_storing_nothing(
        kind: BrokerKind) -> None:
    queue = Queue(kind.unique)
    broker = kind.broker()
    bound = getattr(broker, queue.name)
    naive = datetime.datetime.now() + datetime.timedelta(seconds=10)
    with pytest.raises(ValueError, match='aware datetime'):
        await bound.send({'n': 1}, at=naive)
    with pytest.raises(ValueError, match='delay must be'):
        await bound.send({'n': 1}, delay=-1)
    with pytest.raises(ValueError, match='delay must be'):
        await bound.send_many([{'n': 1}, {'n': 2}], delay=-0.5)
    with pytest.raises(ValueError, match='not both'):
        await bound.send({'n': 1}, delay=1, at=time.time() + 1)
    await bound.send({'n': 3}, delay=0)  # an ordinary send
    assert await bound.length() == 1 or kind.name == 'kafka'
    assert await broker.delayed_count(queue.name) == 0


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    """A private redis-server that logs every write to its append-only file."""
    with redis_server('--appendonly', 'yes', '--appendfsync', 'always') as server:
        yield server


@pytest.mark.parametrize('kind', ['redis', 'amqp', 'kafka'], indirect=True)
async def test_delayed_messages_survive_the_consumer_killed(kind: BrokerKind, python: str
                                                            ) -> None:
    queue = Queue(kind.unique)
    bound = getattr(kind.broker(), queue.name)
    process = await asyncio.create_subprocess_exec(
        python, str(STUCK_CONSUMER), kind.broker_class.__name__, kind.dsn, queue.name,
        *(f'{key}={value}' for key, value in kind.kill_settings.items()),
        stdout=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        await bound.send({'job': 'first'})
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line == b'inside {"job": "first"}\n'  # stuck in it: the rest waits behind
        await bound.send({'job': 'soon'}, delay=1)
        late_due = time.time() + 4
        await bound.send({'job': 'late'}, at=late_due)
        # 'soon' fell due and went to the consumer ('late' still waits): kill it now.
        await eventually(lambda: kind.broker().delayed_count(queue.name), 1)
        process.kill()  # SIGKILL
        await asyncio.wait_for(process.wait(), WAIT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    arrivals = Arrivals(queue, kind.broker_class.RAW_MESSAGE_ARG)
    async with running(arrivals.agent_class(broker=kind.broker(**kind.kill_settings))):
        await arrivals.wait(3, timeout=kind.takeover + 5)
    jobs = {message['job']: at for message, at in arrivals.got}
    assert sorted(jobs) == ['first', 'late', 'soon'] and len(arrivals.got) == 3
    assert late_due <= jobs['late'] <= late_due + kind.takeover


async def test_delayed_messages_survive_a_redis_restart_with_aof(aof_redis: RedisServer,
                                                                unique: str) -> None:
    queue = Queue(unique)
    broker = RedisBroker(aof_redis.dsn)
    due = time.time() + 3
    try:
        await getattr(broker, queue.name).send({'n': 1}, at=due)
        assert await broker.delayed_count(queue.name) == 1
    finally:
        await broker.close()
    aof_redis.restart()
    broker = RedisBroker(aof_redis.dsn)
    got: list[float] = []
    arrived = asyncio.Event()

    class Late(MicroAgent):
        @consumer(queue)
        def take(self, n: int) -> None:
            got.append(time.time())
            arrived.set()

    try:
        assert await broker.delayed_count(queue.name) == 1
        async with running(Late(broker=broker)):
            await asyncio.wait_for(arrived.wait(), WAIT)
    finally:
        await broker.close()
    [at] = got
    assert due <= at <= due + LATE


async def test_a_1x_consumer_never_takes_a_delayed_message_before_due(
        raw: aioredis.Redis, redis_dsn: str, unique: str) -> None:
    """microagent 1.x consumes a Redis queue with BLPOP / LPOP on the list: a delayed
    message is not in the list until one of our consumers moves it there, when due."""
    queue = Queue(unique)
    sender = RedisBroker(redis_dsn)
    arrivals = Arrivals(queue, None)
    due = time.time() + 2
    try:
        await getattr(sender, queue.name).send({'n': 1}, at=due)
        async with running(arrivals.agent_class(broker=RedisBroker(redis_dsn))):
            taken_early: list[bytes] = []
            while time.time() < due - 0.05:  # the 1.x consumer polls until just before due
                popped = await raw.blpop([queue.name], timeout=0.05)
                if popped:
                    taken_early.append(popped[1])
            assert taken_early == []
            await arrivals.wait(1)
    finally:
        await sender.close()
    [(message, at)] = arrivals.got
    assert message == {'n': 1} and due <= at <= due + LATE
