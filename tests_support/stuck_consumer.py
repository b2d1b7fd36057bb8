"""A consumer process for the SIGKILL tests of the brokers.

Usage: ``python stuck_consumer.py BROKER DSN QUEUE [SETTING=SECONDS ...]``, where BROKER
is a class of microagent_backends (``RedisBroker``) and the settings are its upper-case
ones (``VISIBILITY_TIMEOUT=0.5``). It consumes QUEUE; its handler prints ``inside`` and
the message (one JSON line, flushed) and then never returns, until the test kills the
process.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import microagent_backends
from microagent import MicroAgent, Queue, consumer


async def main(broker_class: str, dsn: str, name: str, settings: list[str]) -> None:
    queue = Queue(name)

    class Stuck(MicroAgent):
        @consumer(queue, timeout=3600, concurrency=1)
        async def handle(self, **message: object) -> None:
            message.pop(broker.RAW_MESSAGE_ARG or '', None)  # amqp=, kafka=
            print('inside', json.dumps(message), flush=True)
            await asyncio.Event().wait()

    options = {key: float(value) for key, _, value in (s.partition('=') for s in settings)}
    broker = getattr(microagent_backends, broker_class)(dsn, **options)
    await Stuck(broker=broker).start()
    await asyncio.Event().wait()


if __name__ == '__main__':
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]))
