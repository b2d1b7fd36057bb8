"""A consumer draining a backlog, in a process of its own (test_queue_backlog.py).

``python backlog_consumer.py BACKEND DSN QUEUE COUNT [SETTINGS_JSON]``: BACKEND is
``redis``, ``amqp`` or ``kafka``; SETTINGS_JSON are broker settings (e.g. a short
Kafka session timeout). The agent has one ``@consumer`` of QUEUE with the default
options and a handler that does nothing. It prints ``{"ready": true}`` once started,
samples its own RSS every 0.2 s while draining, and once COUNT messages were handled
prints one JSON line: the RSS before and right after ``start()``, the peak RSS, the
count handled and the seconds taken. It exits when its stdin closes.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from microagent import AbstractQueueBroker, MicroAgent, Queue, consumer

SAMPLE_EVERY = 0.2
DRAIN_LIMIT = 300.0  # seconds: a consumer that stalls reports what it handled by then


def rss() -> int:
    """This process's resident set size, in bytes (VmRSS of /proc/self/status)."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024
    raise RuntimeError('no VmRSS in /proc/self/status')


def make_broker(backend: str, dsn: str, settings: dict[str, Any]) -> AbstractQueueBroker:
    import microagent_backends
    classes: dict[str, type[AbstractQueueBroker]] = {
        'redis': microagent_backends.RedisBroker, 'amqp': microagent_backends.AMQPBroker,
        'kafka': microagent_backends.KafkaBroker}
    return classes[backend](dsn, **settings)


async def main(backend: str, dsn: str, name: str, count: int, settings: dict[str, Any]) -> None:
    queue = Queue(name)
    handled = 0

    class Drainer(MicroAgent):
        @consumer(queue)
        async def drain(self, **_: Any) -> None:
            nonlocal handled
            handled += 1

    broker = make_broker(backend, dsn, settings)
    agent = Drainer(broker=broker)
    before_start = rss()
    await agent.start()
    at_start = rss()
    started = time.monotonic()
    print(json.dumps({'ready': True}), flush=True)
    peak = at_start
    while handled < count and time.monotonic() - started < DRAIN_LIMIT:
        await asyncio.sleep(SAMPLE_EVERY)
        peak = max(peak, rss())
    seconds = time.monotonic() - started
    print(json.dumps({'before_start': before_start, 'start': at_start, 'peak': peak,
                      'end': rss(), 'handled': handled, 'seconds': round(seconds, 2)}),
          flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await agent.stop(grace=5)
    await broker.close()


if __name__ == '__main__':
    backend_, dsn_, queue_, count_ = sys.argv[1:5]
    settings_ = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    asyncio.run(main(backend_, dsn_, queue_, int(count_), settings_))
