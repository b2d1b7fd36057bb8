"""A consumer process for the SIGKILL test of the Kafka broker.

Usage: ``python kafka_stuck_consumer.py DSN QUEUE SESSION_TIMEOUT``. It consumes QUEUE in
the queue's default consumer group; its handler prints ``inside`` (flushed) and then
never returns, until the test kills the process.
"""
from __future__ import annotations

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from microagent import MicroAgent, Queue, consumer
from microagent_backends import KafkaBroker


async def main(dsn: str, name: str, session_timeout: float) -> None:
    queue = Queue(name)

    class Stuck(MicroAgent):
        @consumer(queue, timeout=3600, concurrency=1)
        async def handle(self, **payload: object) -> None:
            print('inside', flush=True)
            await asyncio.Event().wait()

    agent = Stuck(broker=KafkaBroker(dsn, SESSION_TIMEOUT=session_timeout))
    await agent.start()
    await asyncio.Event().wait()


if __name__ == '__main__':
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
