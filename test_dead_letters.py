"""Dead letters an operator sees, replays and purges (DESIGN.md, "Dead letters: list,
replay, purge"): the broker API on every backend, its behaviour when the connection is
cut mid-replay, and ``marun SETTINGS --dead``."""
from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import pytest

from microagent import DeadLetter, MicroAgent, Queue, consumer, encode_json
from microagent_backends import AMQPBroker, RedisBroker
from test_microagent_backends import (  # noqa: F401  (fixtures)
    BROKER_KINDS,
    WAIT,
    BrokerKind,
    closing,
    eventually,
    kafka_settings,
    memory_dsn,
    rabbit,
    raw_producer,
    running,
)
from tests_support.faultproxy import FaultProxy

NOT_UTF8 = b'\xff\xfe not text \x80'
KINDS = ['memory', 'redis', 'amqp']


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> BrokerKind:
    return BROKER_KINDS[request.param](request)


def envelope(queue: str, n: int, *, body: bytes | None = None, attempts: int = 3) -> bytes:
    """A dead letter as a consumer of microagent writes it (see ConsumerPool)."""
    original = encode_json({'n': n}) if body is None else body
    try:
        copy = {'body': original.decode()}
    except UnicodeDecodeError:
        copy = {'body_base64': base64.b64encode(original).decode()}
    return encode_json({'queue': queue, **copy, 'error': f'ValueError: broken {n}',
                        'attempts': attempts, 'consumer': 'Worker.work',
                        'failed_at': 1_700_000_000.0 + n})


async def put_letters(kind: BrokerKind, queue: str, letters: list[bytes]) -> None:
    """Store ``letters`` in ``{queue}.dead`` as another process would, in order."""
    dead = f'{queue}.dead'
    if kind.name == 'amqp':
        await kind.rabbit.declare(dead, durable=True)  # type: ignore[attr-defined]
    for letter in letters:
        await kind.inject(dead, letter)
    await eventually(lambda: kind.broker().dead_count(queue), len(letters))


async def consumed(kind: BrokerKind, queue: Queue, expected: int) -> list[int]:
    """The ``n`` of every message a consumer of ``queue`` handles, once ``expected`` were
    handled and the queue is left empty (a body that is no JSON is dead-lettered)."""
    calls: list[int] = []
    all_there = asyncio.Event()

    class Worker(MicroAgent):
        @consumer(queue)
        async def work(self, n: int, **raw: Any) -> None:
            calls.append(n)
            if len(calls) >= expected:
                all_there.set()

    broker = kind.broker()
    async with running(Worker(broker=broker)):
        if expected:
            await asyncio.wait_for(all_there.wait(), WAIT)
    await eventually(lambda: kind.left(queue.name), (0, 0))
    return sorted(calls)


# -- listing ----------------------------------------------------------------------------

async def test_list_is_oldest_first_complete_and_non_destructive(kind: BrokerKind) -> None:
    queue = Queue(kind.unique)
    letters = [envelope(queue.name, 1), envelope(queue.name, 2, body=NOT_UTF8),
               b'{"n": 3}', NOT_UTF8, envelope(queue.name, 5)]
    await put_letters(kind, queue.name, letters)
    broker = kind.broker()
    listed = await broker.dead_letters(queue.name)
    assert await broker.dead_letters(queue.name) == listed  # reading removed nothing
    assert await broker.dead_count(queue.name) == 5
    assert all(isinstance(letter, DeadLetter) for letter in listed)
    assert len({letter.id for letter in listed}) == 5
    first, second, legacy, garbage, last = listed
    assert (first.queue, first.body, first.error, first.attempts, first.consumer,
            first.failed_at) == (queue.name, b'{"n":1}', 'ValueError: broken 1', 3,
                                 'Worker.work', 1_700_000_001.0)
    assert second.body == NOT_UTF8 and second.error == 'ValueError: broken 2'
    for unknown, raw in ((legacy, b'{"n": 3}'), (garbage, NOT_UTF8)):
        assert (unknown.body, unknown.error, unknown.attempts, unknown.consumer) == (
            raw, 'unknown envelope', 0, None)
    assert last.body == b'{"n":5}'
    assert await broker.dead_letters(queue.name, limit=2) == [first, second]
    assert await broker.dead_letters(queue.name, limit=0) == []


async def test_a_message_that_dies_is_listed_with_its_error(kind: BrokerKind) -> None:
    queue = Queue(kind.unique)

    class Failing(MicroAgent):
        @consumer(queue)
        async def work(self, n: int, **raw: Any) -> None:
            raise ValueError(f'cannot do {n}')

    broker = kind.broker(ROLLBACK_ATTEMPTS=1)
    before = time.time()
    async with running(Failing(broker=broker)):
        await getattr(broker, queue.name).send({'n': 7})
        await eventually(lambda: broker.dead_count(queue.name), 1)
    [letter] = await broker.dead_letters(queue.name)
    assert (letter.body, letter.error, letter.attempts, letter.consumer) == (
        b'{"n":7}', 'ValueError: cannot do 7', 2, 'Failing.work')
    assert before <= letter.failed_at <= time.time()


# -- replaying --------------------------------------------------------------------------

async def test_replay_by_ids_by_limit_and_all_delivers_each_original_once(
        kind: BrokerKind) -> None:
    queue = Queue(kind.unique)
    letters = [envelope(queue.name, n) for n in range(1, 6)]
    letters.insert(2, envelope(queue.name, 0, body=NOT_UTF8))
    await put_letters(kind, queue.name, letters)
    broker = kind.broker()
    listed = await broker.dead_letters(queue.name)
    chosen = [listed[1].id, listed[4].id]  # n=2 and n=4
    assert await broker.replay(queue.name, ids=chosen) == 2
    assert await broker.replay(queue.name, ids=chosen) == 0  # already replayed: a no-op
    assert [letter.id for letter in await broker.dead_letters(queue.name)] == [
        listed[i].id for i in (0, 2, 3, 5)]  # ids stay, order stays
    assert await broker.dead_count(queue.name) == 4
    assert await broker.replay(queue.name, limit=2) == 2  # the oldest: n=1 and NOT_UTF8
    assert [letter.id for letter in await broker.dead_letters(queue.name)] == [
        listed[i].id for i in (3, 5)]
    assert await broker.replay(queue.name) == 2
    assert await broker.dead_count(queue.name) == 0
    assert await consumed(kind, queue, 5) == [1, 2, 3, 4, 5]
    # The body that is no JSON went through with its bytes, and died again as malformed.
    [again] = await broker.dead_letters(queue.name)
    assert again.body == NOT_UTF8 and again.error.startswith('SerializingError')


async def test_replaying_an_unknown_envelope_sends_its_raw_bytes(kind: BrokerKind) -> None:
    queue = Queue(kind.unique)
    await put_letters(kind, queue.name, [b'{"n": 9}'])
    broker = kind.broker()
    assert await broker.replay(queue.name) == 1
    assert await consumed(kind, queue, 1) == [9]
    assert await broker.dead_count(queue.name) == 0


# -- purging ----------------------------------------------------------------------------

async def test_purge_by_ids_and_all(kind: BrokerKind) -> None:
    queue = Queue(kind.unique)
    await put_letters(kind, queue.name, [envelope(queue.name, n) for n in range(4)] + [NOT_UTF8])
    broker = kind.broker()
    listed = await broker.dead_letters(queue.name)
    assert await broker.purge_dead(queue.name, ids=[listed[1].id, listed[4].id]) == 2
    assert await broker.purge_dead(queue.name, ids=[listed[1].id]) == 0
    assert await broker.dead_letters(queue.name) == [listed[0], listed[2], listed[3]]
    assert await broker.purge_dead(queue.name) == 3
    assert await broker.dead_count(queue.name) == 0
    assert await broker.dead_letters(queue.name) == []
    assert await consumed(kind, queue, 0) == []  # purging sent nothing


async def test_a_queue_without_dead_letters(kind: BrokerKind) -> None:
    broker, name = kind.broker(), kind.unique
    assert await broker.dead_letters(name) == []
    assert await broker.dead_count(name) == 0
    assert await broker.replay(name) == 0
    assert await broker.purge_dead(name) == 0
    with pytest.raises(ValueError, match='limit'):
        await broker.replay(name, limit=-1)
