"""Agents of the fleet-supervision tests (``marun --http``, replicas, restarts, stalls).

The settings modules (``fleet_*_settings``) read their queue names, DSN and options from
environment variables that the test gives ``marun``: the agent processes inherit them.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any

import microagent_backends
from microagent import MicroAgent, Queue, Signal, consumer, on, periodic, receiver

QUEUE = Queue(os.environ.get('FLEET_QUEUE', 'fleet_jobs'))
TICK = Signal('fleet_tick', ['n'])


DELAY = float(os.environ.get('FLEET_HANDLE_DELAY', '0'))


class Worker(MicroAgent):
    """Consumes FLEET_QUEUE, taking FLEET_HANDLE_DELAY seconds per message; records each
    message's ``id`` in the Redis list ``{queue}:handled`` at FLEET_RECORD_DSN (default
    FLEET_REDIS_DSN), so that a test counts what was handled, duplicates included."""

    @on('pre_start')
    async def connect(self) -> None:
        import redis.asyncio

        self.redis = redis.asyncio.Redis.from_url(
            os.environ.get('FLEET_RECORD_DSN') or os.environ['FLEET_REDIS_DSN'])

    @on('pre_stop')
    async def disconnect(self) -> None:
        await self.redis.aclose()

    @consumer(QUEUE, timeout=10)
    async def handle(self, id: int, **kwargs: Any) -> None:
        if DELAY:
            await asyncio.sleep(DELAY)
        await self.redis.rpush(f'{QUEUE.name}:handled', id)


class Ticker(MicroAgent):
    """Every 0.2 s sends the signal ``fleet_tick`` and calls it (RPC); receives it."""

    n = 0

    @periodic(period=0.2)
    async def tick(self) -> None:
        self.n += 1
        await self.bus.fleet_tick.send('ticker', n=self.n)
        await self.bus.fleet_tick.call('ticker', timeout=1, n=self.n)

    @receiver(TICK)
    async def heard(self, n: int, **kwargs: Any) -> int:
        return n


class BrokenAtStart(MicroAgent):
    """An agent whose ``pre_start`` hook raises: it can never start."""

    @on('pre_start')
    async def fail(self) -> None:
        raise RuntimeError('BrokenAtStart cannot start, on purpose')


class StallingRedisBroker(microagent_backends.RedisBroker):
    """A Redis broker whose fetch never returns, while its connections say they are up:
    the stalled consumer of the tests."""

    async def _fetch_safely(self, consumption: Any, size: int) -> list[Any]:
        await asyncio.Event().wait()
        raise AssertionError('unreachable')
