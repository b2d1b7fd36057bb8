"""The examples' agents with OpenTelemetry tracing: ``python -m examples.tracing [REDIS_DSN]``.

Runs the user, comment and email agents on the in-memory backends (or on Redis, when a
``redis://`` DSN is given) with ``TRACE_CONTEXT=True``, which carries the trace context
in the payloads (AMQP and Kafka carry it in headers without any setting), until the
user agent's first periodic comment has gone through all three of them, and prints that
one trace as a tree. Needs the OpenTelemetry SDK: ``pip install opentelemetry-sdk`` (it
is in the ``dev`` extra).
"""
from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from examples.comment_agent import CommentAgent
from examples.email_agent import EmailAgent
from examples.user_agent import UserAgent
from microagent import AbstractQueueBroker, AbstractSignalBus, MemoryBroker, MemorySignalBus

ROOT_SPAN = 'periodic UserAgent.post_comment'
LAST_SPANS = {'process mailer', 'receive comment_created'}


def render(spans: Sequence[ReadableSpan]) -> str:
    """The spans of one trace as an indented tree: name, kind, handler, duration."""
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in sorted(spans, key=lambda span: span.start_time or 0):
        parent = span.parent.span_id if span.parent is not None else None
        children.setdefault(parent, []).append(span)
    lines: list[str] = []

    def walk(span: ReadableSpan, prefix: str, last: bool, depth: int) -> None:
        attributes = span.attributes or {}
        handler = str(attributes.get('microagent.handler', ''))
        ms = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
        branch = ('└─ ' if last else '├─ ') if depth else ''
        label = f'{prefix}{branch}{span.name}'
        lines.append(f'{label:<46} {span.kind.name:<9} {handler:<28} {ms:7.3f} ms')
        below = children.get(span.context.span_id if span.context else None, [])
        for index, child in enumerate(below):
            walk(child, prefix + (('   ' if last else '│  ') if depth else ''),
                 index == len(below) - 1, depth + 1)

    for root in children.get(None, []):
        walk(root, '', True, 0)
    return '\n'.join(lines)


def first_trace(exporter: InMemorySpanExporter) -> list[ReadableSpan] | None:
    """The spans of the first comment's trace, once its last spans have ended."""
    finished = exporter.get_finished_spans()
    roots = [span for span in finished if span.name == ROOT_SPAN]
    if not roots or roots[0].context is None:
        return None
    trace_id = roots[0].context.trace_id
    spans = [span for span in finished if span.context and span.context.trace_id == trace_id]
    return spans if {span.name for span in spans} >= LAST_SPANS else None


async def main(dsn: str = 'memory://tracing') -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    bus_class: Any = MemorySignalBus
    broker_class: Any = MemoryBroker
    if dsn.startswith('redis'):
        from microagent_backends import RedisBroker, RedisSignalBus
        bus_class, broker_class = RedisSignalBus, RedisBroker

    def bus() -> AbstractSignalBus:
        made: AbstractSignalBus = bus_class(dsn, prefix='EXAMPLES_TRACING', TRACE_CONTEXT=True)
        return made

    def broker() -> AbstractQueueBroker:
        made: AbstractQueueBroker = broker_class(dsn, TRACE_CONTEXT=True)
        return made

    agents = [UserAgent(bus=bus(), broker=broker()), CommentAgent(bus=bus(), broker=broker()),
              EmailAgent(broker=broker())]
    for agent in agents:
        await agent.start()
    try:
        deadline = time.monotonic() + 10
        while (spans := first_trace(exporter)) is None:
            if time.monotonic() > deadline:
                raise SystemExit('the first comment did not go through within 10 s')
            await asyncio.sleep(0.05)
    finally:
        for agent in agents:
            await agent.stop()
            for transport in (agent.bus, agent.broker):
                if transport is not None:
                    await transport.close()
    print(render(spans))


if __name__ == '__main__':
    asyncio.run(main(*sys.argv[1:2]))
