"""Delayed delivery and the retry policy (DESIGN.md, "Delayed delivery and retry
policy"): contract tests over every backend, through the public API."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from microagent import MemoryBroker, MicroAgent, Queue, consumer
from test_microagent_backends import (  # noqa: F401  (fixtures used by the broker kinds)
    BROKER_KINDS,
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
def kind(request: pytest.FixtureRequest) -> BrokerKind:
    """Each backend, as the contract suite of test_microagent_backends sees it."""
    return BROKER_KINDS[request.param](request)


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
