"""One replica of the singleton tests on Redis: an agent in its own process.

Usage: ``python singleton_replica.py MODE BUS_DSN RECORD_DSN PREFIX [NAME=VALUE ...]``

MODE is ``periodic`` (``@periodic(PERIOD, singleton=True)``), ``cron``
(``@cron('* * * * * *', singleton=True)``: every second) or ``server``
(``@on('server', singleton=True)``). The agent's bus is ``RedisSignalBus(BUS_DSN,
prefix=PREFIX, LEASE_TTL=...)``; BUS_DSN may go through a fault proxy. What the replica
does is recorded on a direct connection to RECORD_DSN, under PREFIX:

- ``{PREFIX}:ready``: list, the pid once the agent started;
- ``{PREFIX}:runs``: list, ``"<tick number> <pid>"`` per timer run, the tick counted on
  the replica's own clock (``round(clock / PERIOD)``);
- ``{PREFIX}:events``: list, ``"start|end <pid> <unix time>"`` when the server starts
  and ends; ``{PREFIX}:beat:<pid>``: set every 50 ms while it runs, expiring in 200 ms.

Settings: ``PERIOD`` (0.5), ``OFFSET`` (seconds added to the clock of the timer: a
skewed replica, through a subclass of the timer), ``LEASE_TTL`` (10). SIGTERM stops the
agent gracefully and exits 0.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import redis.asyncio as aioredis

from microagent import CronTask, MicroAgent, PeriodicTask, cron, on, periodic
from microagent_backends import RedisSignalBus


class SkewedPeriodicTask(PeriodicTask):
    """A periodic task whose wall clock is ``offset`` seconds off."""

    offset = 0.0

    def clock(self) -> float:
        return time.time() + self.offset


class SkewedCronTask(CronTask):
    offset = 0.0

    def clock(self) -> float:
        return time.time() + self.offset


def replica_class(mode: str, period: float, offset: float, record: aioredis.Redis,
                  prefix: str) -> type[MicroAgent]:
    pid = os.getpid()

    class Replica(MicroAgent):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.periodic_tasks = [SkewedPeriodicTask(self, task.handler, task.args)
                                   for task in self.periodic_tasks]
            self.cron_tasks = [SkewedCronTask(self, task.handler, task.args)
                               for task in self.cron_tasks]
            for task in (*self.periodic_tasks, *self.cron_tasks):
                task.offset = offset  # type: ignore[attr-defined]

        async def record_run(self, task: Any, gap: float) -> None:
            await record.rpush(f'{prefix}:runs', f'{round(task.clock() / gap)} {pid}')

    if mode == 'periodic':
        class Ticker(Replica):
            @periodic(period, timeout=5, singleton=True)
            async def tick(self) -> None:
                await self.record_run(self.periodic_tasks[0], period)
        return Ticker

    if mode == 'cron':
        class Cron(Replica):
            @cron('* * * * * *', timeout=5, singleton=True)
            async def tick(self) -> None:
                await self.record_run(self.cron_tasks[0], 1.0)
        return Cron

    class Leader(Replica):
        @on('server', singleton=True)
        async def lead(self) -> None:
            await record.rpush(f'{prefix}:events', f'start {pid} {time.time()!r}')
            try:
                while True:
                    await record.set(f'{prefix}:beat:{pid}', self.lease_token('lead') or 0,
                                     px=200)
                    await asyncio.sleep(0.05)
            finally:
                await record.delete(f'{prefix}:beat:{pid}')
                await record.rpush(f'{prefix}:events', f'end {pid} {time.time()!r}')
    return Leader


async def main(mode: str, bus_dsn: str, record_dsn: str, prefix: str,
               settings: dict[str, float]) -> None:
    record = aioredis.Redis.from_url(record_dsn)
    agent_class = replica_class(mode, settings.get('PERIOD', 0.5), settings.get('OFFSET', 0.0),
                                record, prefix)
    bus = RedisSignalBus(bus_dsn, prefix=prefix, LEASE_TTL=settings.get('LEASE_TTL', 10))
    agent = agent_class(bus=bus)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await agent.start()
    await record.rpush(f'{prefix}:ready', os.getpid())
    await stop.wait()
    await agent.stop()
    await bus.close()
    await record.aclose()


if __name__ == '__main__':
    options = {key: float(value) for key, _, value in (a.partition('=') for a in sys.argv[5:])}
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], options))
