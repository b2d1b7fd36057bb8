"""A consumer process for the SIGKILL test of the AMQP broker.

Usage: ``python amqp_stuck_consumer.py DSN QUEUE``. It consumes QUEUE; its handler prints
``inside <n>`` (flushed) and then never returns, until the test kills the process.
"""
from __future__ import annotations

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from microagent import MicroAgent, Queue, consumer
from microagent_backends import AMQPBroker


async def main(dsn: str, name: str) -> None:
    queue = Queue(name)

    class Stuck(MicroAgent):
        @consumer(queue, timeout=3600, concurrency=1)
        async def handle(self, n: int, **payload: object) -> None:
            print(f'inside {n}', flush=True)
            await asyncio.Event().wait()

    agent = Stuck(broker=AMQPBroker(dsn))
    await agent.start()
    await asyncio.Event().wait()


if __name__ == '__main__':
    asyncio.run(main(sys.argv[1], sys.argv[2]))
