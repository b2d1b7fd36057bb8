"""Queues are bounded: a consumer draining a backlog holds a fixed number of messages
(its pool's capacity, ``max(2 * concurrency, PREFETCH)``, plus what one fetch brings),
so its memory stays flat whatever the backlog.

The backlogs: 500,000 messages on Redis and RabbitMQ (about two minutes there, most of
it the drain), 1,000,000 on Kafka (it drains them in seconds). Each is sent before the
consumer starts, which then drains it in a process of its own with the default options;
its RSS must stay within 40 MB of what it
was right after ``start()``: half the 80 MB the issue allows, so that a buffer growing
with the backlog shows (on Tansu, aiokafka's default ``fetch_max_bytes`` let the Kafka
consumer grow by 80 MB over 1,000,000 messages).
"""
from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from conftest import KAFKA_DSN, eventually, read_json_line, talking_child
from microagent import AbstractQueueBroker, Queue

MB = 1024 * 1024
BOUND = 40 * MB
COUNTS = {'redis': 500_000, 'amqp': 500_000, 'kafka': 1_000_000}
BATCH = 10_000
DRAIN_TIMEOUT = 240.0  # seconds for the child to drain its backlog and say so
TEXT = 'x' * 100


@pytest.fixture(params=['redis', 'amqp', 'kafka'])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def dsn(backend: str, request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f'{backend}_dsn'))


def broker_settings(backend: str, dsn: str) -> dict[str, Any]:
    """A private Tansu forms a group in half the session timeout and accepts 2 s; a real
    Kafka broker refuses less than 6 s by default."""
    if backend == 'kafka':
        return {'SESSION_TIMEOUT': 6.0 if dsn == KAFKA_DSN else 2.0}
    return {}


def make_broker(backend: str, dsn: str) -> AbstractQueueBroker:
    import microagent_backends
    classes: dict[str, type[AbstractQueueBroker]] = {
        'redis': microagent_backends.RedisBroker, 'amqp': microagent_backends.AMQPBroker,
        'kafka': microagent_backends.KafkaBroker}
    return classes[backend](dsn, **broker_settings(backend, dsn))


# -- the backlog --------------------------------------------------------------------------

def bodies(start: int, stop: int) -> list[bytes]:
    return [json.dumps({'i': i, 'text': TEXT}).encode() for i in range(start, stop)]


async def fill(backend: str, dsn: str, queue: Queue, count: int) -> None:
    """``count`` messages like the benchmark's. RabbitMQ: published by a raw client
    without publisher confirms (confirmed ones go at 4,000 a second here), to a durable
    queue as the broker declares it; the others through ``send_many`` in batches (which
    creates the topic as the consumer expects it)."""
    if backend == 'amqp':
        await fill_rabbitmq(dsn, queue.name, count)
        return
    broker = make_broker(backend, dsn)
    bound = getattr(broker, queue.name)
    try:
        for start in range(0, count, BATCH):
            await bound.send_many([{'i': i, 'text': TEXT}
                                   for i in range(start, min(start + BATCH, count))])
    finally:
        await broker.close()


async def fill_rabbitmq(dsn: str, name: str, count: int) -> None:
    """Persistent messages to the default exchange, routing key ``name``; return once
    the queue holds them all."""
    import aiormq
    connection = await aiormq.connect(dsn)
    try:
        channel = await connection.channel(publisher_confirms=False)
        await channel.queue_declare(name, durable=True)
        properties = aiormq.spec.Basic.Properties(delivery_mode=2, content_type='application/json')
        # wait=False: queued for the socket, not awaiting its write (aiormq's Channel has
        # it, its AbstractChannel does not say so).
        publish: Callable[..., Awaitable[Any]] = channel.basic_publish
        for start in range(0, count, BATCH):
            for body in bodies(start, min(start + BATCH, count)):
                await publish(body, routing_key=name, properties=properties, wait=False)

        async def held() -> int:
            return (await channel.queue_declare(name, passive=True)).message_count or 0
        await eventually(held, count, timeout=60, interval=0.2)
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def backlog(backend: str, dsn: str, queue: Queue, count: int) -> AsyncIterator[None]:
    """A queue holding ``count`` messages, deleted (with its dead letters) afterwards."""
    try:
        await fill(backend, dsn, queue, count)
        yield
    finally:
        await delete(backend, dsn, queue.name)


async def delete(backend: str, dsn: str, name: str) -> None:
    names = [name, f'{name}.dead']
    if backend == 'redis':
        import redis.asyncio as aioredis
        client = aioredis.Redis.from_url(dsn)
        keys = [key for queue in names
                for key in (queue, f'microagent:{{{queue}}}:inflight',
                            f'microagent:{{{queue}}}:bodies')]
        await client.delete(*keys)
        await client.aclose()
    elif backend == 'amqp':
        import aiormq
        connection = await aiormq.connect(dsn)
        channel = await connection.channel()
        for queue in names:
            await channel.queue_delete(queue)
        await connection.close()
    else:
        from aiokafka.admin import AIOKafkaAdminClient
        admin = AIOKafkaAdminClient(bootstrap_servers=dsn.removeprefix('kafka://'))
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            if existing & set(names):
                await admin.delete_topics(sorted(existing & set(names)))
        finally:
            await admin.close()


# -- the consumer, in a process of its own ---------------------------------------------------

def backlog_consumer(backend: str, dsn: str, queue: str, count: int
                     ) -> contextlib.AbstractContextManager[subprocess.Popen[str]]:
    return talking_child('backlog_consumer.py', backend, dsn, queue, str(count),
                         json.dumps(broker_settings(backend, dsn)))


@pytest.mark.timeout(300)
async def test_a_consumer_drains_a_backlog_within_a_fixed_memory(
        backend: str, dsn: str, unique: str) -> None:
    """A backlog (COUNTS) waiting, one consumer with the default options and a handler
    that does nothing: it handles them all, and its RSS peaks less than 40 MB above what
    it was once started."""
    count = COUNTS[backend]
    queue = Queue(unique)
    async with backlog(backend, dsn, queue, count):
        with backlog_consumer(backend, dsn, queue.name, count) as process:
            assert read_json_line(process, 60) == {'ready': True}
            seen = read_json_line(process, DRAIN_TIMEOUT)
    growth = seen['peak'] - seen['start']
    print(f'{backend}: {seen["handled"]:,} of {count:,} messages in {seen["seconds"]} s; RSS '
          f'{seen["before_start"] / MB:.1f} MB before start, {seen["start"] / MB:.1f} MB '
          f'after, peak {seen["peak"] / MB:.1f} MB: grew {growth / MB:.1f} MB')
    assert seen['handled'] >= count
    assert growth < BOUND
