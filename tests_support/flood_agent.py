"""An agent under a flood of signals, in a process of its own (test_floods.py).

``python flood_agent.py BACKEND DSN PREFIX COUNT FAST``: BACKEND is ``memory`` or
``redis``. The agent receives ``{PREFIX}_slow`` in a receiver that takes 40 s and
``{PREFIX}_fast`` in one that returns at once. It prints ``{"ready": true}`` once
started; on memory it then sends the flood itself (COUNT slow signals, with FAST fast
ones among them), on Redis the test sends it. Once every signal was received it prints
one JSON line of what it saw, and exits when its stdin closes.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from microagent import AbstractSignalBus, MemorySignalBus, MicroAgent, Signal, receiver


async def main(backend: str, dsn: str, prefix: str, count: int, fast: int) -> None:
    slow_signal, fast_signal = Signal(f'{prefix}_slow', ['n']), Signal(f'{prefix}_fast', ['n'])
    started: list[int] = []
    heard: set[int] = set()

    class Flooded(MicroAgent):
        @receiver(slow_signal, timeout=60)
        async def slow(self, n: int, **_: Any) -> None:
            started.append(n)
            await asyncio.sleep(40)

        @receiver(fast_signal)
        async def quick(self, n: int, **_: Any) -> None:
            heard.add(n)

    bus: AbstractSignalBus
    if backend == 'memory':
        bus = MemorySignalBus(dsn, prefix=prefix)
    else:
        from microagent_backends import RedisSignalBus
        bus = RedisSignalBus(dsn, prefix=prefix)
    agent = Flooded(bus=bus)
    await agent.start()
    print(json.dumps({'ready': True}), flush=True)
    if backend == 'memory':
        await flood(bus, slow_signal, fast_signal, count, fast)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if bus.signals_received.get(slow_signal.name, 0) >= count and len(heard) >= fast:
            break
        await asyncio.sleep(0.05)
    lanes = bus.lanes()
    print(json.dumps({
        'received': bus.signals_received.get(slow_signal.name, 0),
        'started': len(started), 'fast_heard': len(heard),
        'waiting': lanes['Flooded.slow']['waiting'], 'running': lanes['Flooded.slow']['running'],
        'dropped': bus.signals_dropped.get(slow_signal.name, 0),
        'lane_dropped': lanes['Flooded.slow']['dropped'],
        'fast_dropped': bus.signals_dropped.get(fast_signal.name, 0),
    }), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def flood(bus: AbstractSignalBus, slow: Signal, fast: Signal, count: int, quick: int
                ) -> None:
    """COUNT slow signals, one fast one every COUNT // FAST, a yield every thousand."""
    every = max(count // max(quick, 1), 1)
    slow_send, fast_send = getattr(bus, slow.name).send, getattr(bus, fast.name).send
    sent_fast = 0
    for n in range(count):
        await slow_send('flood', n=n)
        if n % every == 0 and sent_fast < quick:
            await fast_send('flood', n=sent_fast)
            sent_fast += 1
        if n % 1000 == 999:
            await asyncio.sleep(0)


if __name__ == '__main__':
    backend_, dsn_, prefix_, count_, fast_ = sys.argv[1:6]
    asyncio.run(main(backend_, dsn_, prefix_, int(count_), int(fast_)))
