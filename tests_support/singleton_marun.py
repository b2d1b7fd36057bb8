"""Launcher settings and agent of the singleton test under ``marun``: a Ticker with
``@periodic(SINGLETON_PERIOD, singleton=True)`` and a singleton server, run as
SINGLETON_REPLICAS replicas (restart on-failure) on a RedisSignalBus at SINGLETON_REDIS_DSN
with prefix SINGLETON_PREFIX. Each run is recorded on a connection of the replica's own as
``"<tick> <pid>"`` in the list ``{prefix}:runs`` (the tick counted on the Unix clock)."""
from __future__ import annotations

import asyncio
import os
import time

import redis.asyncio as aioredis

from microagent import MicroAgent, on, periodic

DSN = os.environ['SINGLETON_REDIS_DSN']
PREFIX = os.environ['SINGLETON_PREFIX']
PERIOD = float(os.environ.get('SINGLETON_PERIOD', '0.5'))


class Ticker(MicroAgent):
    """Records each singleton tick it runs, and holds a singleton server."""

    @periodic(PERIOD, timeout=5, singleton=True)
    async def tick(self) -> None:
        async with aioredis.Redis.from_url(DSN) as record:
            await record.rpush(f'{PREFIX}:runs', f'{round(time.time() / PERIOD)} {os.getpid()}')

    @on('server', singleton=True)
    async def lead(self) -> None:
        async with aioredis.Redis.from_url(DSN) as record:
            await record.rpush(f'{PREFIX}:leaders', str(os.getpid()))
        await asyncio.Event().wait()


BUS = {'redis': {'backend': 'microagent_backends.RedisSignalBus', 'dsn': DSN,
                 'prefix': PREFIX, 'LEASE_TTL': 1.5}}
AGENT = {'ticker': {'backend': 'tests_support.singleton_marun.Ticker', 'bus': 'redis',
                    'replicas': int(os.environ.get('SINGLETON_REPLICAS', '3')),
                    'restart': 'on-failure'}}
