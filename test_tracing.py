"""Tests of the OpenTelemetry tracing: spans, their parents across agents, and
the trace context on the wire (AMQP and Kafka headers; Redis and memory payloads only
with ``TRACE_CONTEXT=True``).

OpenTelemetry sets the global tracer provider once per process: one SDK provider is set
for the session (by the first test of this module that asks for spans, after the other
modules ran without one), and its in-memory exporter is cleared before each test. What
must hold without a provider runs in a subprocess.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiormq
import msgspec
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from conftest import KAFKA_DSN, eventually
from microagent import (
    MemoryBroker,
    MemorySignalBus,
    MicroAgent,
    Queue,
    Signal,
    consumer,
    encode_json,
    periodic,
    receiver,
)
from microagent_backends import AMQPBroker, KafkaBroker, RedisBroker, RedisSignalBus

WAIT = 15.0
ROOT = Path(__file__).resolve().parent
tracer = trace.get_tracer('test_tracing')


# -- spans ----------------------------------------------------------------------------

@pytest.fixture(scope='session')
def span_exporter() -> InMemorySpanExporter:
    """The session's SDK tracer provider (set once), exporting into memory."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


class Spans:
    """The spans finished during one test."""

    def __init__(self, exporter: InMemorySpanExporter) -> None:
        self.exporter = exporter

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.exporter.get_finished_spans() if span.name == name]

    async def wait(self, name: str, count: int = 1) -> list[ReadableSpan]:
        """The ``count`` finished spans called ``name``, once there are that many."""
        try:
            await eventually(lambda: len(self.named(name)) >= count, timeout=WAIT)
        except AssertionError:
            names = [span.name for span in self.exporter.get_finished_spans()]
            raise AssertionError(f'{count} spans {name!r} not finished; finished: {names}'
                                 ) from None
        found = self.named(name)
        assert len(found) == count, [span.name for span in found]
        return found

    async def one(self, name: str) -> ReadableSpan:
        return (await self.wait(name))[0]


@pytest.fixture
def spans(span_exporter: InMemorySpanExporter) -> Iterator[Spans]:
    span_exporter.clear()
    yield Spans(span_exporter)
    span_exporter.clear()


def is_child(span: ReadableSpan, parent: ReadableSpan) -> bool:
    """``span`` is in ``parent``'s trace, with ``parent`` as its parent."""
    assert span.context is not None and parent.context is not None
    return (span.parent is not None and span.parent.span_id == parent.context.span_id
            and span.context.trace_id == parent.context.trace_id)


def traceparent(span: ReadableSpan) -> str:
    """The W3C ``traceparent`` header that carries ``span``."""
    assert span.context is not None
    context = span.context
    return f'00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}'


def messaging(span: ReadableSpan) -> dict[str, Any]:
    attributes = dict(span.attributes or {})
    return {key: attributes[key] for key in ('messaging.system', 'messaging.destination.name',
                                             'messaging.operation.type') if key in attributes}


async def started(*agents: MicroAgent) -> None:
    for agent in agents:
        await asyncio.wait_for(agent.start(), WAIT)


async def stopped(*agents: MicroAgent) -> None:
    for agent in agents:
        await asyncio.wait_for(agent.stop(), WAIT)


# -- memory, with TRACE_CONTEXT=True ---------------------------------------------------

async def test_memory_queue_process_span_is_the_child_of_the_publish_span(
        spans: Spans, unique: str) -> None:
    queue = Queue(f'{unique}_jobs')
    got: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    class Worker(MicroAgent):
        @consumer(queue)
        async def work(self, **payload: Any) -> None:
            with tracer.start_as_current_span('handler work'):
                got.put_nowait(payload)

    broker = MemoryBroker(f'memory://{unique}', TRACE_CONTEXT=True)
    agent = Worker(broker=broker)
    await started(agent)
    try:
        with tracer.start_as_current_span('request'):
            await getattr(broker, queue.name).send({'n': 1})
        assert await asyncio.wait_for(got.get(), WAIT) == {'n': 1}  # no _trace
    finally:
        await stopped(agent)
    request, publish = await spans.one('request'), await spans.one(f'publish {queue.name}')
    process, handler = await spans.one(f'process {queue.name}'), await spans.one('handler work')
    assert publish.kind is SpanKind.PRODUCER and is_child(publish, request)
    assert process.kind is SpanKind.CONSUMER and is_child(process, publish)
    assert is_child(handler, process)
    assert messaging(publish) == {'messaging.system': 'memory', 'messaging.operation.type': 'send',
                                  'messaging.destination.name': queue.name}
    assert messaging(process) == {**messaging(publish), 'messaging.operation.type': 'process'}
    assert process.attributes is not None
    assert process.attributes['microagent.handler'] == 'Worker.work'
    assert process.status.status_code is StatusCode.UNSET and not process.events


async def test_memory_send_many_is_one_publish_span_parent_of_each_process_span(
        spans: Spans, unique: str) -> None:
    queue = Queue(f'{unique}_jobs')
    got: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    class Worker(MicroAgent):
        @consumer(queue)
        def work(self, **payload: Any) -> None:
            got.put_nowait(payload)

    broker = MemoryBroker(f'memory://{unique}', TRACE_CONTEXT=True)
    agent = Worker(broker=broker)
    await started(agent)
    try:
        await getattr(broker, queue.name).send_many([{'n': n} for n in range(3)])
        assert sorted([(await asyncio.wait_for(got.get(), WAIT))['n'] for _ in range(3)]) == [
            0, 1, 2]
    finally:
        await stopped(agent)
    publish = await spans.one(f'publish {queue.name}')
    assert publish.attributes is not None
    assert publish.attributes['messaging.batch.message_count'] == 3
    assert all(is_child(process, publish)
               for process in await spans.wait(f'process {queue.name}', 3))


async def test_memory_signal_each_receiver_span_is_a_child_of_the_send_span(
        spans: Spans, unique: str) -> None:
    signal = Signal(f'{unique}_happened', ['n'])
    got: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    class Listener(MicroAgent):
        @receiver(signal)
        async def heard(self, signal: Signal, sender: str, **payload: Any) -> None:
            with tracer.start_as_current_span('handler heard'):
                got.put_nowait(('heard', payload))

    class Other(MicroAgent):
        @receiver(signal)
        def noted(self, signal: Signal, sender: str, **payload: Any) -> None:
            got.put_nowait(('noted', payload))

    def bus() -> MemorySignalBus:
        return MemorySignalBus(f'memory://{unique}', prefix=unique, TRACE_CONTEXT=True)

    sender, listener, other = bus(), Listener(bus=bus()), Other(bus=bus())
    await started(listener, other)
    try:
        with tracer.start_as_current_span('request'):
            await getattr(sender, signal.name).send('tester', n=1)
        heard = sorted([await asyncio.wait_for(got.get(), WAIT) for _ in range(2)])
        assert heard == [('heard', {'n': 1}), ('noted', {'n': 1})]  # no _trace
    finally:
        await stopped(listener, other)
    request, send = await spans.one('request'), await spans.one(f'send {signal.name}')
    receives = await spans.wait(f'receive {signal.name}', 2)
    assert send.kind is SpanKind.PRODUCER and is_child(send, request)
    assert all(span.kind is SpanKind.CONSUMER and is_child(span, send) for span in receives)
    assert sorted(span.attributes['microagent.handler'] for span in receives  # type: ignore[index]
                  ) == ['Listener.heard', 'Other.noted']
    heard_span = next(span for span in receives
                      if span.attributes['microagent.handler'] == 'Listener.heard')  # type: ignore[index]
    assert is_child(await spans.one('handler heard'), heard_span)
    assert messaging(send) == {'messaging.system': 'memory', 'messaging.operation.type': 'send',
                               'messaging.destination.name': signal.name}


async def test_memory_rpc_answer_span_is_a_server_child_of_the_client_span(
        spans: Spans, unique: str) -> None:
    signal = Signal(f'{unique}_count', ['n'])

    class Counter(MicroAgent):
        @receiver(signal)
        async def count(self, signal: Signal, sender: str, n: int) -> int:
            return n + 1

    def bus() -> MemorySignalBus:
        return MemorySignalBus(f'memory://{unique}', prefix=unique, TRACE_CONTEXT=True)

    caller, counter = bus(), Counter(bus=bus())
    await started(counter)
    try:
        with tracer.start_as_current_span('request'):
            answer = await getattr(caller, signal.name).call('tester', n=1, timeout=WAIT)
    finally:
        await stopped(counter)
    assert answer == {'Counter.count': 2}
    request, call = await spans.one('request'), await spans.one(f'call {signal.name}')
    server = await spans.one(f'answer {signal.name}')
    assert call.kind is SpanKind.CLIENT and is_child(call, request)
    assert server.kind is SpanKind.SERVER and is_child(server, call)
    assert not spans.named(f'receive {signal.name}')


async def test_memory_retried_then_dead_lettered_message_has_the_events(
        spans: Spans, unique: str) -> None:
    queue = Queue(f'{unique}_jobs')

    class Failing(MicroAgent):
        @consumer(queue, retries=2, backoff=0)
        def work(self, **payload: Any) -> None:
            raise ValueError(f'cannot do {payload["n"]}')

    broker = MemoryBroker(f'memory://{unique}', TRACE_CONTEXT=True)
    agent = Failing(broker=broker)
    await started(agent)
    try:
        with tracer.start_as_current_span('request'):
            await getattr(broker, queue.name).send({'n': 7})
        process = await spans.one(f'process {queue.name}')
    finally:
        await stopped(agent)
    assert is_child(process, await spans.one(f'publish {queue.name}'))
    assert [event.name for event in process.events] == [
        'exception', 'retry', 'exception', 'retry', 'exception', 'dead_letter']
    retry, dead = process.events[1], process.events[-1]
    assert dict(retry.attributes or {}) == {
        'microagent.attempt': 1, 'microagent.attempts': 3, 'exception.type': 'ValueError',
        'exception.message': 'cannot do 7'}
    assert dict(dead.attributes or {}) == {
        'messaging.destination.name': f'{queue.name}.dead', 'microagent.attempts': 3,
        'exception.type': 'ValueError', 'exception.message': 'cannot do 7'}
    exception = process.events[0].attributes or {}
    assert exception['exception.type'] == 'ValueError' and exception['microagent.attempt'] == 1
    assert process.status.status_code is StatusCode.ERROR
    assert process.status.description == 'dead-lettered: ValueError: cannot do 7'
    assert await broker.queue_length(f'{queue.name}.dead') == 1


async def test_memory_malformed_message_is_dead_lettered_in_a_root_span(
        spans: Spans, unique: str) -> None:
    queue = Queue(f'{unique}_jobs')

    class Worker(MicroAgent):
        @consumer(queue)
        def work(self, **payload: Any) -> None:
            raise AssertionError('not called')

    broker = MemoryBroker(f'memory://{unique}', TRACE_CONTEXT=True)
    agent = Worker(broker=broker)
    await started(agent)
    try:
        await broker.send(queue.name, b'not json')
        process = await spans.one(f'process {queue.name}')
    finally:
        await stopped(agent)
    assert process.parent is None
    assert [event.name for event in process.events] == ['exception', 'dead_letter']
    assert (process.events[1].attributes or {})['microagent.attempts'] == 0
    assert process.status.status_code is StatusCode.ERROR


async def test_memory_without_trace_context_the_consumer_starts_a_new_trace(
        spans: Spans, unique: str) -> None:
    """The memory backends keep the semantics of the real ones: without TRACE_CONTEXT,
    no context travels (even though sender and consumer share the process)."""
    queue = Queue(f'{unique}_jobs')
    got: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    class Worker(MicroAgent):
        @consumer(queue)
        def work(self, **payload: Any) -> None:
            got.put_nowait(payload)

    broker = MemoryBroker(f'memory://{unique}')
    agent = Worker(broker=broker)
    with tracer.start_as_current_span('request'):
        await started(agent)
        await getattr(broker, queue.name).send({'n': 1})
        assert await asyncio.wait_for(got.get(), WAIT) == {'n': 1}
    await stopped(agent)
    publish, process = await spans.one(f'publish {queue.name}'), await spans.one(
        f'process {queue.name}')
    assert publish.parent is not None
    assert process.parent is None
    assert process.context is not None and publish.context is not None
    assert process.context.trace_id != publish.context.trace_id


async def test_receiver_failure_is_recorded_on_its_span(spans: Spans, unique: str) -> None:
    signal = Signal(f'{unique}_happened', ['n'])

    class Broken(MicroAgent):
        @receiver(signal)
        async def heard(self, signal: Signal, sender: str, n: int) -> None:
            raise RuntimeError('receiver broke')

    bus = MemorySignalBus(f'memory://{unique}', prefix=unique)
    agent = Broken(bus=bus)
    await started(agent)
    try:
        await getattr(bus, signal.name).send('tester', n=1)
        receive = await spans.one(f'receive {signal.name}')
    finally:
        await stopped(agent)
    assert receive.status.status_code is StatusCode.ERROR
    assert [event.name for event in receive.events] == ['exception']


async def test_timer_runs_are_internal_spans_of_their_own_trace(
        spans: Spans, unique: str) -> None:
    runs: asyncio.Queue[int] = asyncio.Queue()

    class Ticking(MicroAgent):
        @periodic(0.05, timeout=1)
        async def tick(self) -> None:
            with tracer.start_as_current_span('handler tick'):
                runs.put_nowait(1)
            raise RuntimeError('tick failed')

    agent = Ticking()
    with tracer.start_as_current_span('starting'):  # not the parent of the runs
        await started(agent)
    try:
        await asyncio.wait_for(runs.get(), WAIT)
        run = (await spans.wait('periodic Ticking.tick'))[0]
    finally:
        await stopped(agent)
    assert run.kind is SpanKind.INTERNAL and run.parent is None
    assert run.attributes is not None and run.attributes['microagent.timer'] == 'periodic'
    assert str(run.attributes['code.function.name']).endswith('Ticking.tick')
    assert is_child(spans.named('handler tick')[0], run)
    assert run.status.status_code is StatusCode.ERROR
    assert [event.name for event in run.events] == ['exception']


# -- Redis ------------------------------------------------------------------------------

async def raw_subscriber(raw: aioredis.Redis, pattern: str) -> Any:
    pubsub = raw.pubsub()
    await pubsub.psubscribe(pattern)
    assert (await pubsub.get_message(timeout=WAIT))['type'] == 'psubscribe'
    return pubsub


async def next_published(pubsub: Any) -> bytes:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message is not None:
            data: bytes = message['data']
            return data
    raise AssertionError('nothing published')


async def test_redis_without_trace_context_the_wire_is_unchanged(
        spans: Spans, redis_dsn: str, raw: aioredis.Redis, unique: str) -> None:
    """Tracing on, TRACE_CONTEXT off (the default): what 1.x peers read is byte for byte
    what it was, while the spans are made."""
    queue, signal = Queue(f'{unique}_jobs'), Signal(f'{unique}_happened', ['n', 'text'])
    broker, bus = RedisBroker(redis_dsn), RedisSignalBus(redis_dsn, prefix=unique)
    pubsub = await raw_subscriber(raw, f'{unique}:{signal.name}:*')
    try:
        with tracer.start_as_current_span('request'):
            await getattr(broker, queue.name).send({'n': 1, 'text': 'é'})
            await getattr(bus, signal.name).send('tester', n=2, text='x')
        assert await raw.lrange(queue.name, 0, -1) == [encode_json({'n': 1, 'text': 'é'})]
        assert await next_published(pubsub) == encode_json({'n': 2, 'text': 'x'})
    finally:
        await pubsub.aclose()
        await broker.close()
        await bus.close()
    request = await spans.one('request')
    for name in (f'publish {queue.name}', f'send {signal.name}'):
        span = await spans.one(name)
        assert is_child(span, request) and messaging(span)['messaging.system'] == 'redis'


async def test_redis_with_trace_context_a_1x_peer_sees_trace_and_handlers_do_not(
        spans: Spans, redis_dsn: str, raw: aioredis.Redis, unique: str) -> None:
    queue, signal = Queue(f'{unique}_jobs'), Signal(f'{unique}_happened', ['n'])
    got: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    class Worker(MicroAgent):
        @consumer(queue)
        async def work(self, **payload: Any) -> None:
            got.put_nowait(('work', payload))

        @receiver(signal)
        async def heard(self, signal: Signal, sender: str, **payload: Any) -> None:
            with tracer.start_as_current_span('handler heard'):
                got.put_nowait(('heard', payload))

    settings = {'TRACE_CONTEXT': True}
    producer = RedisBroker(redis_dsn, **settings)
    sender = RedisSignalBus(redis_dsn, prefix=unique, **settings)
    agent = Worker(bus=RedisSignalBus(redis_dsn, prefix=unique, **settings),
                   broker=RedisBroker(redis_dsn, **settings))
    pubsub = await raw_subscriber(raw, f'{unique}:{signal.name}:*')
    try:
        with tracer.start_as_current_span('request'):
            await getattr(producer, queue.name).send({'n': 1})
            await getattr(sender, signal.name).send('tester', n=2)
        stored = msgspec.json.decode(await raw.lindex(queue.name, 0))
        published = msgspec.json.decode(await next_published(pubsub))
        publish, send = await spans.one(f'publish {queue.name}'), await spans.one(
            f'send {signal.name}')
        assert stored == {'n': 1, '_trace': {'traceparent': traceparent(publish)}}
        assert published == {'n': 2, '_trace': {'traceparent': traceparent(send)}}
        await started(agent)
        assert await asyncio.wait_for(got.get(), WAIT) == ('work', {'n': 1})  # no _trace
        with tracer.start_as_current_span('second'):
            await getattr(sender, signal.name).send('tester', n=3)
        assert await asyncio.wait_for(got.get(), WAIT) == ('heard', {'n': 3})
    finally:
        await pubsub.aclose()
        await stopped(agent)
        await producer.close()
        await sender.close()
        assert agent.bus is not None and agent.broker is not None
        await agent.bus.close()
        await agent.broker.close()
    assert is_child(await spans.one(f'process {queue.name}'), publish)
    second = await spans.one('second')
    second_send = next(span for span in await spans.wait(f'send {signal.name}', 2)
                       if is_child(span, second))
    receive = await spans.one(f'receive {signal.name}')
    assert is_child(receive, second_send)
    assert is_child(await spans.one('handler heard'), receive)


# -- RabbitMQ ---------------------------------------------------------------------------

@pytest.fixture
async def rabbit(amqp_dsn: str, unique: str) -> AsyncIterator[aiormq.abc.AbstractChannel]:
    """A channel of a plain aiormq connection; the test's queues are deleted afterwards."""
    connection = await aiormq.connect(amqp_dsn)
    channel = await connection.channel()
    yield channel
    for name in (f'{unique}_jobs', f'{unique}_jobs.dead'):
        await channel.queue_delete(name)
    await connection.close()


async def test_amqp_trace_context_travels_in_the_message_headers(
        spans: Spans, amqp_dsn: str, rabbit: aiormq.abc.AbstractChannel, unique: str) -> None:
    queue = Queue(f'{unique}_jobs')
    got: asyncio.Queue[tuple[dict[str, Any], Any]] = asyncio.Queue()

    class Worker(MicroAgent):
        @consumer(queue)
        async def work(self, amqp: Any, **payload: Any) -> None:
            with tracer.start_as_current_span('handler work'):
                got.put_nowait((payload, amqp))

    broker = AMQPBroker(amqp_dsn)  # no setting: headers always carry the context
    agent = Worker(broker=AMQPBroker(amqp_dsn))
    try:
        with tracer.start_as_current_span('request'):
            await getattr(broker, queue.name).send(
                {'n': 1}, properties={'headers': {'x-mine': 'kept'}})
        first = await spans.one(f'publish {queue.name}')
        raw = await rabbit.basic_get(queue.name, no_ack=True)
        assert raw.body == encode_json({'n': 1})  # the body is 1.x's
        headers = dict(raw.header.properties.headers or {})
        assert {key: value.decode() if isinstance(value, bytes) else value
                for key, value in headers.items()} == {
            'x-mine': 'kept', 'traceparent': traceparent(first)}
        with tracer.start_as_current_span('request'):
            await getattr(broker, queue.name).send({'n': 2})
        await started(agent)
        payload, message = await asyncio.wait_for(got.get(), WAIT)
        assert payload == {'n': 2}
    finally:
        await stopped(agent)
        await broker.close()
        assert agent.broker is not None
        await agent.broker.close()
    second = next(span for span in await spans.wait(f'publish {queue.name}', 2)
                  if span.context != first.context)
    process = await spans.one(f'process {queue.name}')
    assert message.header.properties.headers['traceparent'] in (
        traceparent(second), traceparent(second).encode())
    assert process.kind is SpanKind.CONSUMER and is_child(process, second)
    assert messaging(process) == {'messaging.system': 'rabbitmq',
                                  'messaging.destination.name': queue.name,
                                  'messaging.operation.type': 'process'}
    assert is_child(await spans.one('handler work'), process)


async def test_amqp_dead_letter_carries_the_consumer_span(
        spans: Spans, amqp_dsn: str, rabbit: aiormq.abc.AbstractChannel, unique: str) -> None:
    queue = Queue(f'{unique}_jobs')

    class Failing(MicroAgent):
        @consumer(queue, retries=1, backoff=0)
        def work(self, **payload: Any) -> None:
            raise ValueError('no')

    agent = Failing(broker=AMQPBroker(amqp_dsn))
    await started(agent)
    try:
        assert agent.broker is not None
        await getattr(agent.broker, queue.name).send({'n': 1})
        process = await spans.one(f'process {queue.name}')
    finally:
        await stopped(agent)
        assert agent.broker is not None
        await agent.broker.close()
    assert [event.name for event in process.events][-1] == 'dead_letter'
    dead = await rabbit.basic_get(f'{queue.name}.dead', no_ack=True)
    assert dead.header.properties.headers['traceparent'] in (
        traceparent(process), traceparent(process).encode())


# -- Kafka ------------------------------------------------------------------------------

async def read_records(dsn: str, topic: str, count: int) -> list[Any]:
    """The first ``count`` records of ``topic``, read by a plain consumer."""
    reader = AIOKafkaConsumer(bootstrap_servers=dsn.removeprefix('kafka://'),
                              enable_auto_commit=False)
    await reader.start()
    try:
        await reader.topics()
        partitions = [TopicPartition(topic, p) for p in reader.partitions_for_topic(topic) or []]
        reader.assign(partitions)
        await reader.seek_to_beginning(*partitions)
        records: list[Any] = []
        deadline = time.monotonic() + WAIT
        while len(records) < count and time.monotonic() < deadline:
            for batch in (await reader.getmany(timeout_ms=200)).values():
                records.extend(batch)
        assert len(records) == count
        return records
    finally:
        await reader.stop()


async def test_kafka_trace_context_travels_in_the_record_headers(
        spans: Spans, kafka_dsn: str, unique: str) -> None:
    queue = Queue(f'{unique}_jobs')
    got: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    class Worker(MicroAgent):
        @consumer(queue)
        async def work(self, kafka: Any, **payload: Any) -> None:
            with tracer.start_as_current_span('handler work'):
                got.put_nowait(payload)

    settings = {'SESSION_TIMEOUT': 6.0 if kafka_dsn == KAFKA_DSN else 2.0,
                'RETRY_BACKOFF': 0.01, 'COMMIT_INTERVAL': 0.1}
    producer, consuming = KafkaBroker(kafka_dsn, **settings), KafkaBroker(kafka_dsn, **settings)
    agent = Worker(broker=consuming)
    try:
        with tracer.start_as_current_span('request'):
            await getattr(producer, queue.name).send({'n': 1}, headers=[('x-mine', b'kept')])
        publish = await spans.one(f'publish {queue.name}')
        (record,) = await read_records(kafka_dsn, queue.name, 1)
        assert record.value == encode_json({'n': 1})  # the value is 1.x's
        assert list(record.headers) == [
            ('x-mine', b'kept'), ('traceparent', traceparent(publish).encode())]
        await asyncio.wait_for(agent.start(), 4 * settings['SESSION_TIMEOUT'] + WAIT)
        assert await asyncio.wait_for(got.get(), WAIT) == {'n': 1}
    finally:
        await stopped(agent)
        await producer.close()
        await consuming.close()
    process = await spans.one(f'process {queue.name}')
    assert process.kind is SpanKind.CONSUMER and is_child(process, publish)
    assert messaging(process)['messaging.system'] == 'kafka'
    assert is_child(await spans.one('handler work'), process)


# -- without a tracer provider ------------------------------------------------------------

WITHOUT_PROVIDER = '''
import asyncio, sys
import microagent, microagent_backends
from microagent import MemoryBroker, MemorySignalBus, MicroAgent, Queue, Signal
from microagent import consumer, encode_json, on, periodic, receiver

assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'imported opentelemetry'
from opentelemetry import trace  # the API alone: its default provider makes nothing
from conftest import eventually

looked_up = []
get_tracer_provider = trace.get_tracer_provider
trace.get_tracer_provider = lambda: looked_up.append(1) or get_tracer_provider()
queue, signal = Queue('jobs'), Signal('happened', ['n'])
got = []


class Worker(MicroAgent):
    @consumer(queue)
    def work(self, **payload):
        got.append(payload)

    @receiver(signal)
    def heard(self, signal, sender, **payload):
        got.append(payload)
        return 1

    @periodic(0.01)
    def tick(self):
        pass


async def main():
    bus = MemorySignalBus('memory://off', TRACE_CONTEXT=True)
    broker = MemoryBroker('memory://off', TRACE_CONTEXT=True)
    agent = Worker(bus=bus, broker=broker)
    await agent.start()
    lookups = len(looked_up)
    carrier = {'traceparent': '00-' + '1' * 32 + '-' + '2' * 16 + '-01'}
    for n in range(100):
        await broker.jobs.send({'n': n})
        await bus.happened.send('me', n=n)
    await broker.send('jobs', encode_json({'n': 100, '_trace': carrier}))  # a traced peer
    await bus.send('PUBSUB:happened:peer', encode_json({'n': 100, '_trace': carrier}))
    assert await bus.happened.call('me', n=101, timeout=5) == {'Worker.heard': 1}
    await eventually(lambda: len(got) >= 2 * 101 + 1)
    await agent.stop()
    assert microagent._tracing.on is False
    assert len(looked_up) == lookups, 'looked for a provider per message'
    assert len(got) == 2 * 101 + 1 and all(set(p) == {'n'} for p in got), got[-3:]

    # A provider set in a pre_start hook is taken when the agent starts.
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    exporter = InMemorySpanExporter()

    class Late(Worker):
        @on('pre_start')
        def configure(self):
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            trace.set_tracer_provider(provider)

    agent = Late(bus=bus, broker=broker)
    await agent.start()
    await broker.jobs.send({'n': 0})
    await eventually(lambda: {'publish jobs', 'process jobs'}
                     <= {span.name for span in exporter.get_finished_spans()})
    await agent.stop()
    names = {span.name for span in exporter.get_finished_spans()}
    assert {'publish jobs', 'process jobs'} <= names, names
    print('ok')

asyncio.run(main())
'''


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


def test_without_a_tracer_provider_nothing_is_made_per_message() -> None:
    """``import microagent`` does not import OpenTelemetry; with only its API (no
    provider) no span is made and no provider looked up per message, and ``_trace`` is
    still taken out of payloads; a provider set in a ``pre_start`` hook is then taken."""
    done = run_python(WITHOUT_PROVIDER)
    assert done.returncode == 0 and done.stdout.strip() == 'ok', done.stdout + done.stderr


def test_trace_context_is_a_setting_of_every_backend(redis_dsn: str, amqp_dsn: str) -> None:
    made: list[Callable[..., Any]] = [MemoryBroker, MemorySignalBus]
    for make in made:
        assert make('memory://x', TRACE_CONTEXT=True).TRACE_CONTEXT is True
    assert RedisBroker(redis_dsn, TRACE_CONTEXT=True).TRACE_CONTEXT is True
    assert RedisSignalBus(redis_dsn, TRACE_CONTEXT=True).TRACE_CONTEXT is True
    assert AMQPBroker(amqp_dsn, TRACE_CONTEXT=True).TRACE_CONTEXT is True
    assert KafkaBroker('kafka://127.0.0.1:9092', TRACE_CONTEXT=True).TRACE_CONTEXT is True
    assert MemoryBroker('memory://x').TRACE_CONTEXT is False



def test_the_tracing_example_prints_one_trace_across_the_three_agents() -> None:
    done = subprocess.run([sys.executable, '-m', 'examples.tracing'], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    tree = [line.lstrip(' └├│─').split()[:2] for line in done.stdout.splitlines()]
    assert tree == [
        ['periodic', 'UserAgent.post_comment'], ['send', 'user_comment'],
        ['receive', 'user_comment'], ['send', 'comment_created'],
        ['receive', 'comment_created'], ['call', 'rpc_comments_count'],
        ['answer', 'rpc_comments_count'], ['publish', 'mailer'], ['process', 'mailer']]
