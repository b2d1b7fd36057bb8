"""Bounded under floods: a receiver runs at most ``concurrency`` calls, the signals that
come meanwhile wait up to the bus's ``RECEIVER_BACKLOG`` and past that are dropped,
counted and logged; memory stays flat; other receivers and RPC answers go on."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

import microagent
from conftest import eventually, read_json_line, talking_child
from microagent import AbstractSignalBus, MemorySignalBus, MicroAgent, Signal, receiver

MB = 1024 * 1024
WAIT = 10.0


def make_bus(kind: str, dsn: str, prefix: str, **settings: Any) -> AbstractSignalBus:
    if kind == 'memory':
        return MemorySignalBus(f'memory://{prefix}', prefix=prefix, **settings)
    from microagent_backends import RedisSignalBus
    return RedisSignalBus(dsn, prefix=prefix, **settings)


@pytest.fixture(params=['memory', 'redis'])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def dsn(kind: str, request: pytest.FixtureRequest) -> str:
    return 'memory://' if kind == 'memory' else str(request.getfixturevalue('redis_dsn'))


@contextlib.asynccontextmanager
async def running(*agents: MicroAgent) -> AsyncIterator[None]:
    for agent in agents:
        await agent.start()
    try:
        yield
    finally:
        for agent in agents:
            await agent.stop(grace=1)
            if agent.bus is not None:
                await agent.bus.close()


# -- the flood, in a process of its own ----------------------------------------------------

def memory_of(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    fields = {}
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        key, _, value = line.partition(':')
        if key in ('VmRSS', 'VmHWM'):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def flood_agent(kind: str, dsn: str, prefix: str, count: int, fast: int
                ) -> contextlib.AbstractContextManager[subprocess.Popen[str]]:
    return talking_child('flood_agent.py', kind, dsn, prefix, str(count), str(fast), grace=10)


def publish_flood(dsn: str, prefix: str, count: int, fast: int) -> None:
    """COUNT slow signals and FAST fast ones among them, published by a raw client."""
    import redis
    client = redis.Redis.from_url(dsn)
    every = count // fast
    try:
        for start in range(0, count, 1000):
            pipe = client.pipeline(transaction=False)
            for n in range(start, min(start + 1000, count)):
                pipe.publish(f'{prefix}:{prefix}_slow:flood', json.dumps({'n': n}))
                if n % every == 0:
                    pipe.publish(f'{prefix}:{prefix}_fast:flood', json.dumps({'n': n // every}))
            pipe.execute()
    finally:
        client.close()


def test_a_flood_to_a_slow_receiver_keeps_memory_flat(kind: str, dsn: str, unique: str
                                                      ) -> None:
    """100,000 signals to a receiver that takes 40 s: 100 run, 10,000 wait, the rest is
    dropped and counted; the process grows by less than 60 MB; a second receiver on the
    same bus hears every one of its signals."""
    count, fast = 100_000, 500
    with flood_agent(kind, dsn, unique, count, fast) as process:
        assert read_json_line(process, 30) == {'ready': True}
        before = memory_of(process.pid)
        if kind == 'redis':
            publish_flood(dsn, unique, count, fast)
        seen = read_json_line(process, 90)
        after = memory_of(process.pid)
    growth = max(after['VmHWM'], after['VmRSS']) - before['VmRSS']
    print(f'{kind}: RSS {before["VmRSS"] / MB:.1f} MB before, {after["VmRSS"] / MB:.1f} MB '
          f'after, peak {after["VmHWM"] / MB:.1f} MB: grew {growth / MB:.1f} MB; {seen}')
    assert seen['received'] == count
    assert seen['started'] == seen['running'] == AbstractSignalBus.RECEIVER_CONCURRENCY
    assert seen['waiting'] == AbstractSignalBus.RECEIVER_BACKLOG
    assert seen['dropped'] == seen['lane_dropped'] == count - seen['started'] - seen['waiting']
    assert seen['fast_heard'] == fast
    assert seen['fast_dropped'] == 0
    assert growth < 60 * MB


# -- RPC, order, defaults ---------------------------------------------------------------------

async def test_an_rpc_call_to_full_responders_gets_no_answer(kind: str, dsn: str, unique: str
                                                             ) -> None:
    """A responder running its one call with two requests waiting: a third call gets no
    answer within its timeout; another responder of the bus answers meanwhile; once the
    first is freed, the agent answers again."""
    busy, other = Signal(f'{unique}_busy', ['n']), Signal(f'{unique}_other', ['n'])
    free = asyncio.Event()
    answered: list[int] = []

    class Responder(MicroAgent):
        @receiver(busy, concurrency=1)
        async def blocked(self, n: int, **_: Any) -> int:
            await free.wait()
            answered.append(n)
            return n

        @receiver(other)
        async def answers(self, n: int, **_: Any) -> int:
            return n * 10

    bus = make_bus(kind, dsn, unique, RECEIVER_BACKLOG=2)
    caller = make_bus(kind, dsn, unique)
    async with running(Responder(bus=bus)):
        for n in range(3):  # one runs, two wait
            await getattr(caller, busy.name).send('me', n=n)
        await eventually(lambda: bus.lanes()['Responder.blocked']['waiting'], 2)
        started = time.monotonic()
        assert await getattr(caller, busy.name).call('me', timeout=0.5, n=3) == {}
        assert time.monotonic() - started < 2
        assert bus.signals_dropped == {busy.name: 1}
        assert await getattr(caller, other.name).call('me', timeout=WAIT, n=4) == {
            'Responder.answers': 40}
        free.set()
        assert await getattr(caller, busy.name).call('me', timeout=WAIT, n=5) == {
            'Responder.blocked': 5}
        assert answered == [0, 1, 2, 5]
    await caller.close()


async def test_concurrency_one_keeps_the_order_of_signals(kind: str, dsn: str, unique: str
                                                          ) -> None:
    ordered, mixed = Signal(f'{unique}_ordered', ['n']), Signal(f'{unique}_mixed', ['n'])
    seen: list[int] = []
    unordered: list[int] = []

    class InOrder(MicroAgent):
        @receiver(ordered, concurrency=1)
        async def one_by_one(self, n: int, **_: Any) -> None:
            await asyncio.sleep(random.random() / 500)
            seen.append(n)

        @receiver(mixed)
        async def many(self, n: int, **_: Any) -> None:  # the control: order is not kept
            await asyncio.sleep(random.random() / 500)
            unordered.append(n)

    bus, sender = make_bus(kind, dsn, unique), make_bus(kind, dsn, unique)
    async with running(InOrder(bus=bus)):
        for n in range(300):
            await getattr(sender, ordered.name).send('me', n=n)
            await getattr(sender, mixed.name).send('me', n=n)
        await eventually(lambda: len(seen) == len(unordered) == 300, timeout=WAIT)
    await sender.close()
    assert seen == list(range(300))
    assert unordered != list(range(300))
    assert bus.signals_dropped == {}


async def test_default_settings_pass_a_flood_of_handlers_that_keep_up(
        kind: str, dsn: str, unique: str) -> None:
    """100,000 signals in bursts of 500 (10,000 a second) to a receiver taking 1 ms
    each: every one handled, none dropped. (Much faster, the agent's CPU rather than its
    handlers is what cannot keep up, on a loaded 2-core machine.)"""
    flood = Signal(f'{unique}_flood', ['n'])
    handled: set[int] = set()
    count = 100_000

    class KeepsUp(MicroAgent):
        @receiver(flood)
        async def handle(self, n: int, **_: Any) -> None:
            await asyncio.sleep(0.001)
            handled.add(n)

    bus = make_bus(kind, dsn, unique)
    async with running(KeepsUp(bus=bus)), bursts(kind, bus, flood) as send_burst:
        for start in range(0, count, 500):
            await send_burst(range(start, start + 500))
            await asyncio.sleep(0.05)
        await eventually(lambda: len(handled) == count, timeout=30)
    assert bus.signals_dropped == {}


@contextlib.asynccontextmanager
async def bursts(kind: str, bus: AbstractSignalBus, signal: Signal
                 ) -> AsyncIterator[Callable[[Iterable[int]], Awaitable[None]]]:
    """Send signals ``n=...`` in bursts: on Redis one pipeline of a raw client each."""
    if kind == 'memory':
        send = getattr(bus, signal.name).send

        async def on_memory(numbers: Iterable[int]) -> None:
            for n in numbers:
                await send('me', n=n)
        yield on_memory
        return
    import redis.asyncio as aioredis
    client = aioredis.Redis.from_url(bus.dsn)

    async def on_redis(numbers: Iterable[int]) -> None:
        pipe = client.pipeline(transaction=False)
        for n in numbers:
            pipe.publish(f'{bus.prefix}:{signal.name}:me', json.dumps({'n': n}))
        await pipe.execute()
    try:
        yield on_redis
    finally:
        await client.aclose()


# -- the warning, the settings ----------------------------------------------------------------

async def test_drops_are_logged_once_per_interval_with_their_count(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, unique: str) -> None:
    monkeypatch.setattr(microagent, 'DROP_WARNING_INTERVAL', 0.5)
    signal = Signal(f'{unique}_burst', ['n'])
    free = asyncio.Event()

    class Stuck(MicroAgent):
        @receiver(signal, concurrency=2)
        async def stuck(self, **_: Any) -> None:
            await free.wait()

    bus = MemorySignalBus(f'memory://{unique}', RECEIVER_BACKLOG=3)
    caplog.set_level(logging.WARNING, 'microagent.bus')

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if 'is full' in r.getMessage()]

    async with running(Stuck(bus=bus)):
        send = getattr(bus, signal.name).send
        for n in range(15):  # 2 run, 3 wait, 10 dropped
            await send('me', n=n)
        first = await eventually(warnings)
        assert len(first) == 1
        assert 'Receiver Stuck.stuck is full (2 calls running, 3 signals waiting): ' \
               'dropped 10 signals (10 since the start)' in first[0]
        for n in range(4):
            await send('me', n=n)
        await eventually(lambda: len(warnings()), 2, timeout=3)
        assert 'dropped 4 signals (14 since the start)' in warnings()[1]
        assert bus.signals_dropped == {signal.name: 14}
        assert bus.lanes() == {'Stuck.stuck': {'running': 2, 'waiting': 3, 'dropped': 14,
                                               'concurrency': 2}}
        free.set()
        await eventually(lambda: bus.lanes()['Stuck.stuck']['running'], 0)


def test_concurrency_and_the_bus_settings_are_checked() -> None:
    signal = Signal('floods_checked', ['n'])
    with pytest.raises(ValueError, match='receiver concurrency must be >= 1, not 0'):
        receiver(signal, concurrency=0)
    with pytest.raises(TypeError, match='receiver concurrency must be an integer'):
        receiver(signal, concurrency=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match='RECEIVER_BACKLOG must be an integer'):
        MemorySignalBus('memory://checked', RECEIVER_BACKLOG='many')
    with pytest.raises(ValueError, match='RECEIVER_CONCURRENCY must be >= 1'):
        MemorySignalBus('memory://checked', RECEIVER_CONCURRENCY=0)

    class Declared(MicroAgent):
        @receiver(signal, concurrency=3)
        async def three(self, **_: Any) -> None: ...

        @receiver(signal)
        async def default(self, **_: Any) -> None: ...

    receivers = Declared(bus=MemorySignalBus('memory://checked')).info()['receivers']
    assert [r.get('concurrency') for r in receivers] == [3, None]


async def test_redis_bus_subscribes_again_when_redis_cuts_it(
        private_redis: Any, caplog: pytest.LogCaptureFixture, unique: str) -> None:
    """``CLIENT KILL TYPE pubsub`` (what Redis does to a subscriber past its output
    buffer limit): the bus logs it, reconnects, subscribes again and hears again."""
    import redis.asyncio as aioredis

    from microagent_backends import RedisSignalBus
    signal = Signal(f'{unique}_cut', ['n'])
    heard: set[int] = set()

    class Ear(MicroAgent):
        @receiver(signal)
        async def hear(self, n: int, **_: Any) -> None:
            heard.add(n)

    bus = RedisSignalBus(private_redis.dsn, prefix=unique)
    raw = aioredis.Redis.from_url(private_redis.dsn)
    caplog.set_level(logging.INFO, 'microagent.bus')
    try:
        async with running(Ear(bus=bus)):
            channel = f'{unique}:{signal.name}:me'
            await raw.publish(channel, json.dumps({'n': 0}))
            await eventually(lambda: 0 in heard)
            assert await raw.client_kill_filter(_type='pubsub') == 1
            await eventually(lambda: not bus.links['pubsub'].connected or any(
                'pubsub' in r.getMessage() and 'lost' in r.getMessage() for r in caplog.records))
            probe = 1

            async def hears_again() -> bool:
                nonlocal probe
                probe += 1
                await raw.publish(channel, json.dumps({'n': probe}))
                await asyncio.sleep(0.05)
                return probe in heard
            await eventually(hears_again, timeout=WAIT)
        messages = [r.getMessage() for r in caplog.records]
        assert any('pubsub' in m and 'lost' in m for m in messages), messages
        assert any('pubsub' in m and 'is back' in m for m in messages), messages
    finally:
        await raw.aclose()
