"""Tests of the core (microagent.py): no external service needed."""
from __future__ import annotations

import asyncio
import dataclasses
import http.server
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

import microagent
from microagent import (
    BrokerMock,
    BusMock,
    MemoryBroker,
    MemorySignalBus,
    MicroAgent,
    Queue,
    QueueException,
    QueueNotFound,
    SerializingError,
    ServerInterrupt,
    Signal,
    SignalException,
    SignalNotFound,
    consumer,
    cron,
    load_queues,
    load_signals,
    load_stuff,
    on,
    periodic,
    receiver,
)

ROOT = Path(__file__).resolve().parent
WAIT = 5.0  # seconds any single awaited event may take before the test fails


async def wait_for(predicate: Any, timeout: float = WAIT) -> None:
    """Wait until ``predicate()`` is true, checking at every loop turn (bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f'condition not met within {timeout}s')
        await asyncio.sleep(0.002)


class Recorder:
    """Collects calls and lets a test await the n-th one."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self._event = asyncio.Event()

    def __call__(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)
        self._event.set()

    async def wait(self, count: int = 1, timeout: float = WAIT) -> list[dict[str, Any]]:
        await wait_for(lambda: len(self.calls) >= count, timeout)
        return self.calls


@pytest.fixture
def names(unique: str) -> Any:
    """Unique signal and queue names for one test."""
    class Names:
        def __getattr__(self, item: str) -> str:
            return f'{item}_{unique}'
    return Names()


@pytest.fixture
def memory(unique: str) -> tuple[MemorySignalBus, MemoryBroker]:
    return MemorySignalBus(f'memory://{unique}'), MemoryBroker(f'memory://{unique}')


# -- declarations ----------------------------------------------------------------------

def test_signal_registers_and_is_found_by_name(names: Any) -> None:
    signal = Signal(names.created, ['user_id'])
    assert Signal.get(names.created) is signal
    assert Signal.get_all()[names.created] is signal
    assert signal.make_channel_name('PUBSUB') == f'PUBSUB:{names.created}:*'
    assert signal.make_channel_name('P', 'me') == f'P:{names.created}:me'
    with pytest.raises(SignalNotFound, match='no signal'):
        Signal.get(names.missing)


@pytest.mark.parametrize('bad', ['', 'has space', 'a:b', 'x#1', '1abc', 'response', None])
def test_signal_name_is_checked(bad: Any) -> None:
    with pytest.raises(SignalException):
        Signal(bad, [])


def test_signal_providing_args_is_not_a_string(names: Any) -> None:
    with pytest.raises(SignalException, match='list of names'):
        Signal(names.s, 'user_id')


def test_queue_registers_with_exchange_and_topics(names: Any) -> None:
    queue = Queue(names.orders, exchange='shop', topics=('order.created', 'order.paid'))
    assert Queue.get(names.orders) is queue
    assert (queue.exchange, queue.topics) == ('shop', ('order.created', 'order.paid'))
    assert queue.dead_letter.name == f'{names.orders}.dead'
    with pytest.raises(QueueNotFound):
        Queue.get(names.missing)
    with pytest.raises(QueueException):
        Queue('bad name')
    with pytest.raises(QueueException):
        Queue(names.q, topics=('',))


def test_typed_signal_checks_payload(names: Any) -> None:
    signal = Signal(names.typed, {'uuid': 'string', 'code': ['number', 'null'], 'ok': 'boolean'})
    assert signal.providing_args == ['uuid', 'code', 'ok']
    assert signal.check({'uuid': 'a', 'code': None, 'ok': True}) is None
    assert signal.check({'uuid': 'a', 'code': 1.5, 'ok': False}) is None
    assert 'Expected `str`, got `int`' in (signal.check({'uuid': 1, 'code': 1, 'ok': True}) or '')
    assert 'missing ok' in (signal.check({'uuid': 'a', 'code': 1}) or '')
    assert 'unexpected extra' in (signal.check({'uuid': 'a', 'code': 1, 'ok': 1 == 1,
                                                'extra': 0}) or '')


def test_type_map_of_python_types(names: Any) -> None:
    signal = Signal(names.s, ['n', 'tags'], type_map={'n': int, 'tags': (list, type(None))})
    assert signal.check({'n': 1, 'tags': None}) is None
    assert signal.check({'n': 1, 'tags': [1]}) is None
    assert signal.check({'n': 'x', 'tags': None}) is not None
    with pytest.raises(SignalException, match='unknown JSON type'):
        Signal(names.bad, {'n': 'integer'})


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_load_stuff_from_file_url_and_plain_path(tmp_path: Path, names: Any) -> None:
    path = write(tmp_path / 'stuff.json', f'''
        {{"signals": [{{"name": "{names.a}", "providing_args": ["x"]}},
                      {{"name": "{names.b}", "providing_args": {{"x": "number"}}}}],
          "queues": [{{"name": "{names.q}"}},
                     {{"name": "{names.q}.sub", "exchange": "ex", "topics": ["t.*"]}}]}}
    ''')
    signals, queues = load_stuff(f'file://{path}')
    assert getattr(signals, names.a) is Signal.get(names.a)
    assert Signal.get(names.b).check({'x': 'no'}) is not None
    assert getattr(queues, f'{names.q}_sub').topics == ('t.*',)
    assert getattr(load_signals(str(path)), names.a).name == names.a
    assert getattr(load_queues(str(path)), names.q).name == names.q


def test_load_stuff_over_http(tmp_path: Path, names: Any) -> None:
    body = json.dumps({'signals': [{'name': names.web, 'providing_args': []}]}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(('127.0.0.1', 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        signals = load_signals(f'http://127.0.0.1:{server.server_port}/signals.json')
    finally:
        server.shutdown()
    assert getattr(signals, names.web).name == names.web


def test_malformed_file_names_file_line_and_problem(tmp_path: Path, names: Any) -> None:
    path = write(tmp_path / 'bad.json', '{\n  "signals": [\n    {"name": "x",,}\n  ]\n}\n')
    with pytest.raises(SerializingError, match=r'bad\.json:3:18: JSON is malformed'):
        load_stuff(str(path))
    with pytest.raises(SerializingError, match='cannot read'):
        load_stuff(str(tmp_path / 'missing.json'))


def test_bad_declarations_are_refused_whole(tmp_path: Path, names: Any) -> None:
    path = write(tmp_path / 'stuff.json', json.dumps({
        'signals': [{'name': names.good, 'providing_args': []},
                    {'name': names.bad, 'providing_args': 'x'}]}))
    with pytest.raises(SignalException, match=r'stuff\.json: signals\[1\]'):
        load_stuff(str(path))
    with pytest.raises(SignalNotFound):
        Signal.get(names.good)  # nothing of a refused file is declared
    path = write(tmp_path / 'q.json', json.dumps({'queues': [{'name': 'a b'}]}))
    with pytest.raises(QueueException, match=r'q\.json: queues\[0\]'):
        load_stuff(str(path))
    path = write(tmp_path / 'n.json', json.dumps({'signals': {'name': 'x'}}))
    with pytest.raises(SignalException, match='must be a list'):
        load_stuff(str(path))


def test_redact_dsn() -> None:
    assert microagent.redact_dsn('amqp://guest:secret@host:5672/') == 'amqp://guest:***@host:5672/'
    assert microagent.redact_dsn('redis://:pw@host/0') == 'redis://:***@host/0'
    assert microagent.redact_dsn('kafka://h:1?password=x&a=1') == 'kafka://h:1?password=***&a=1'
    assert microagent.redact_dsn('redis://host/0') == 'redis://host/0'
    assert 'secret' not in repr(MemoryBroker('memory://user:secret@x'))
    assert 'secret' not in repr(MemorySignalBus('memory://user:secret@x'))


# -- decorators --------------------------------------------------------------------------

def test_decorator_arguments_are_checked(names: Any) -> None:
    signal, queue = Signal(names.s, []), Queue(names.q)
    with pytest.raises(TypeError):
        receiver()
    with pytest.raises(ValueError, match='timeout'):
        receiver(signal, timeout=0)
    with pytest.raises(SignalNotFound):
        receiver(names.undeclared)
    with pytest.raises(ValueError, match='period'):
        periodic(0)
    with pytest.raises(ValueError, match='start_after'):
        periodic(1, start_after=-1)
    with pytest.raises(TypeError):
        periodic('5')  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='concurrency'):
        consumer(queue, concurrency=0)
    with pytest.raises(ValueError, match='retries'):
        consumer(queue, retries=-1)
    with pytest.raises(TypeError, match='dto_class'):
        consumer(queue, dto_class=dict(a=1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='dto_name'):
        consumer(queue, dto_name='not valid')
    with pytest.raises(QueueNotFound):
        consumer(names.undeclared)
    with pytest.raises(ValueError, match='hook label'):
        on('after_start')
    with pytest.raises(TypeError, match='methods'):
        receiver(signal)(staticmethod(lambda: None))


@pytest.mark.parametrize('spec', ['* * *', '61 * * * *', '* * * * * * *', '@sometimes', 'x'])
def test_wrong_cron_spec_fails_at_decoration(spec: str) -> None:
    with pytest.raises(ValueError, match='cron spec'):
        cron(spec)


def test_cron_accepts_standard_specs_and_aliases() -> None:
    for spec in ('*/15 * * * *', '0 9 * * mon-fri', '@hourly', '@daily', '@weekly'):
        cron(spec)
    with pytest.raises(ValueError, match='time zone'):
        cron('@daily', tz='Mars/Olympus')


# -- agent -------------------------------------------------------------------------------

def test_agent_needs_a_bus_for_receivers_and_a_broker_for_consumers(names: Any) -> None:
    signal, queue = Signal(names.s, []), Queue(names.q)

    class Receives(MicroAgent):
        @receiver(signal)
        def handle(self, **kwargs: Any) -> None: ...

    class Consumes(MicroAgent):
        @consumer(queue)
        def handle(self, **kwargs: Any) -> None: ...

    with pytest.raises(SignalException, match=r'receives signals \(handle\) but has no bus'):
        Receives()
    with pytest.raises(QueueException, match=r'consumes queues \(handle\) but has no broker'):
        Consumes()
    with pytest.raises(SignalException, match='must be an AbstractSignalBus'):
        Receives(bus='redis://localhost')  # type: ignore[arg-type]
    assert Receives(bus=MemorySignalBus()).bus is not None


def test_agent_class_refuses_two_consumers_of_one_queue(names: Any) -> None:
    queue = Queue(names.q)
    with pytest.raises(TypeError, match='both consume queue'):
        class Twice(MicroAgent):
            @consumer(queue)
            def first(self, **kwargs: Any) -> None: ...

            @consumer(queue)
            def second(self, **kwargs: Any) -> None: ...


def test_bus_and_broker_can_be_made_outside_an_event_loop() -> None:
    assert MemorySignalBus('memory://lazy').prefix == 'PUBSUB'
    assert MemoryBroker('memory://lazy').pools == {}
    with pytest.raises(TypeError, match='no setting'):
        MemoryBroker('memory://lazy', rollback_attempts=1)
    with pytest.raises(ValueError, match='memory://NAME'):
        MemoryBroker('redis://localhost')


async def test_signal_sent_when_start_returns_is_received(names: Any, memory: Any) -> None:
    bus, _ = memory
    signal, got = Signal(names.s, ['n']), Recorder()

    class Agent(MicroAgent):
        @receiver(signal)
        async def handle(self, signal: Signal, sender: str, n: int) -> None:
            got(signal=signal, sender=sender, n=n)

    agent = Agent(bus=bus)
    await agent.start()
    await getattr(bus, names.s).send('tester', n=1)
    [call] = await got.wait()
    assert call == {'signal': signal, 'sender': 'tester', 'n': 1}
    await agent.stop()


async def test_sync_and_async_handlers(names: Any, memory: Any) -> None:
    bus, broker = memory
    signal, queue, got = Signal(names.s, []), Queue(names.q), Recorder()

    class Agent(MicroAgent):
        @receiver(signal)
        def sync_receiver(self, **kwargs: Any) -> None:
            got(kind='sync receiver')

        @receiver(signal)
        async def async_receiver(self, **kwargs: Any) -> None:
            got(kind='async receiver')

        @consumer(queue)
        def sync_consumer(self, **kwargs: Any) -> None:
            got(kind='sync consumer')

    async with Agent(bus=bus, broker=broker):
        await getattr(bus, names.s).send('t')
        await getattr(broker, names.q).send({})
        calls = await got.wait(3)
    assert sorted(c['kind'] for c in calls) == ['async receiver', 'sync consumer', 'sync receiver']


async def test_subclass_inherits_handlers_and_override_replaces_them(
        names: Any, memory: Any) -> None:
    bus, broker = memory
    signal, queue, got = Signal(names.s, []), Queue(names.q), Recorder()

    class Base(MicroAgent):
        @receiver(signal)
        async def on_signal(self, **kwargs: Any) -> None:
            got(who='base receiver')

        @consumer(queue)
        async def on_message(self, **kwargs: Any) -> None:
            got(who='base consumer')

        @periodic(period=60, start_after=60)
        async def tick(self) -> None: ...

    class Child(Base):
        async def on_signal(self, **kwargs: Any) -> None:  # no decorator: same declaration
            got(who='child receiver')

        tick = None  # type: ignore[assignment]  # removes the periodic task

    assert set(Child.declarations) == {'on_signal', 'on_message'}
    async with Child(bus=bus, broker=broker) as child:
        assert child.periodic_tasks == []
        await getattr(bus, names.s).send('t')
        await getattr(broker, names.q).send({})
        calls = await got.wait(2)
    assert sorted(c['who'] for c in calls) == ['base consumer', 'child receiver']


async def test_start_flags_and_hooks_order(names: Any, memory: Any) -> None:
    bus, broker = memory
    signal, queue, events = Signal(names.s, []), Queue(names.q), []

    class Agent(MicroAgent):
        @on('pre_start')
        def first(self) -> None:
            events.append('pre_start')

        @on('post_start')
        async def second(self) -> None:
            events.append('post_start')

        @on('pre_stop')
        async def third(self) -> None:
            events.append('pre_stop')

        @on('server')
        async def serve(self) -> None:
            events.append('server')

        @receiver(signal)
        def handle(self, **kwargs: Any) -> None: ...

        @consumer(queue)
        def consume(self, **kwargs: Any) -> None: ...

        @periodic(period=60)
        def tick(self) -> None: ...

    agent = Agent(bus=bus, broker=broker)
    await agent.start(enable_periodic_tasks=False, enable_receiving_signals=False,
                      enable_consuming_messages=False, enable_servers_running=False)
    assert bus.receivers == {} and broker.pools == {}
    assert agent.periodic_tasks[0]._timer is None
    await agent.stop()
    assert events == ['pre_start', 'post_start', 'pre_stop']

    events.clear()
    agent = Agent(bus=bus, broker=broker)
    await agent.start()
    assert list(bus.receivers) == [names.s] and list(broker.pools) == [names.q]
    await wait_for(lambda: 'server' in events)
    await agent.stop()
    assert events == ['pre_start', 'post_start', 'server', 'pre_stop']
    assert bus.receivers == {} and broker.pools == {}


async def test_info_is_json_serializable(names: Any, memory: Any) -> None:
    bus, _broker = memory
    signal, queue = Signal(names.s, []), Queue(names.q)

    class Agent(MicroAgent):
        @receiver(signal, timeout=3)
        def handle(self, **kwargs: Any) -> None: ...

        @consumer(queue, concurrency=2, dto_class=dict)
        def consume(self, **kwargs: Any) -> None: ...

        @periodic(period=5, timeout=2, start_after=1)
        def tick(self) -> None: ...

        @cron('@hourly')
        def report(self) -> None: ...

    info = Agent(bus=bus, broker=MemoryBroker('memory://u:secret@x')).info()
    json.dumps(info)
    assert info['receivers'] == [{'name': 'handle', 'signal': names.s, 'timeout': 3.0}]
    assert info['consumers'][0]['options'] == {'concurrency': 2}
    assert info['periodic'][0]['period'] == 5.0 and info['cron'][0]['cron'] == '@hourly'
    assert 'secret' not in json.dumps(info)


async def test_start_failure_stops_what_was_started(names: Any, memory: Any) -> None:
    bus, _broker = memory
    signal = Signal(names.s, [])

    class Agent(MicroAgent):
        @receiver(signal)
        def handle(self, **kwargs: Any) -> None: ...

        @on('post_start')
        def explode(self) -> None:
            raise RuntimeError('no database')

    with pytest.raises(RuntimeError, match='no database'):
        await Agent(bus=bus).start()
    assert bus.receivers == {}


# -- bus ---------------------------------------------------------------------------------

async def test_rpc_with_two_responders(names: Any, unique: str) -> None:
    rpc = Signal(names.rpc, ['n'])

    class Doubler(MicroAgent):
        @receiver(rpc)
        async def answer(self, n: int, **kwargs: Any) -> int:
            return n * 2

    class Tripler(MicroAgent):
        @receiver(rpc)
        async def answer(self, n: int, **kwargs: Any) -> dict[str, int]:
            await asyncio.sleep(0.05)
            return {'value': n * 3}

    dsn = f'memory://{unique}'
    caller = MemorySignalBus(dsn)
    async with Doubler(bus=MemorySignalBus(dsn)), Tripler(bus=MemorySignalBus(dsn)):
        assert await getattr(caller, names.rpc).call('me', n=2) == {'Doubler.answer': 4}
        async with getattr(caller, names.rpc).waiter('me', timeout=0.5, n=5) as answers:
            got = [answer async for answer in answers]
    assert got == [{'Doubler.answer': 10}, {'Tripler.answer': {'value': 15}}]


async def test_rpc_call_without_answer_returns_empty_dict(names: Any, memory: Any) -> None:
    bus, _ = memory
    Signal(names.rpc, [])
    started = time.monotonic()
    assert await getattr(bus, names.rpc).call('me', timeout=0.2) == {}
    assert 0.15 < time.monotonic() - started < 2


async def test_receiver_errors_and_timeouts_do_not_affect_others(
        names: Any, memory: Any, caplog: pytest.LogCaptureFixture) -> None:
    bus, _ = memory
    signal, got = Signal(names.s, []), Recorder()

    class Agent(MicroAgent):
        @receiver(signal)
        async def fails(self, **kwargs: Any) -> None:
            raise ValueError('broken receiver')

        @receiver(signal, timeout=0.05)
        async def hangs(self, **kwargs: Any) -> None:
            await asyncio.sleep(10)

        @receiver(signal)
        async def works(self, **kwargs: Any) -> str:
            got()
            return 'fine'

    async with Agent(bus=bus):
        answer = await getattr(bus, names.s).call('me', timeout=2)
        assert answer == {'Agent.fails': None, 'Agent.hangs': None, 'Agent.works': 'fine'}
        await getattr(bus, names.s).send('me')
        await got.wait(2)
    assert 'Receiver Agent.fails failed' in caplog.text
    assert 'Receiver Agent.hangs timed out' in caplog.text


async def test_bad_signal_payload_is_logged_and_dropped(
        names: Any, memory: Any, caplog: pytest.LogCaptureFixture) -> None:
    bus, _ = memory
    signal, got = Signal(names.s, ['n'], type_map={'n': int}), Recorder()

    class Agent(MicroAgent):
        @receiver(signal)
        async def handle(self, **kwargs: Any) -> None:
            got(**kwargs)

    async with Agent(bus=bus):
        await bus.send(signal.make_channel_name(bus.prefix, 'raw'), b'[1, 2]')
        await bus.send(signal.make_channel_name(bus.prefix, 'raw'), b'not json')
        with caplog.at_level(logging.WARNING):
            await getattr(bus, names.s).send('me', n='one')
            [call] = await got.wait()
    assert call['n'] == 'one'  # a type mismatch is a warning, the signal goes through
    assert caplog.text.count(f'Dropped signal {names.s} from raw') == 2
    assert 'Sending signal' in caplog.text and 'Expected `int`, got `str`' in caplog.text
    assert f'Signal {names.s} from me does not match its declaration' in caplog.text


async def test_bus_refuses_undeclared_signals_and_bad_senders(memory: Any, names: Any) -> None:
    bus, _ = memory
    with pytest.raises(SignalNotFound):
        bus.not_declared_anywhere  # noqa: B018
    assert not hasattr(bus, 'not_declared_anywhere')
    Signal(names.s, [])
    with pytest.raises(SignalException, match='sender'):
        await getattr(bus, names.s).send('a#b')
    with pytest.raises(SerializingError):
        await getattr(bus, names.s).send('me', value=object())


async def test_memory_hubs_are_shared_by_name_only(names: Any, unique: str) -> None:
    queue = Queue(names.q)
    first, second = MemoryBroker(f'memory://{unique}'), MemoryBroker(f'memory://{unique}')
    other = MemoryBroker(f'memory://{unique}-other')
    await getattr(first, names.q).send({'a': 1})
    assert await getattr(second, queue.name).length() == 1
    assert await getattr(other, queue.name).length() == 0


# -- broker ------------------------------------------------------------------------------

async def test_one_consumer_per_queue_per_broker(names: Any, memory: Any) -> None:
    _, broker = memory
    queue = Queue(names.q)

    class Agent(MicroAgent):
        @consumer(queue)
        def handle(self, **kwargs: Any) -> None: ...

    async with Agent(broker=broker):
        with pytest.raises(QueueException, match='already has a consumer'):
            await Agent(broker=broker).start()


async def test_unknown_consumer_option_is_refused_at_start(names: Any, memory: Any) -> None:
    _, broker = memory
    queue = Queue(names.q)

    class Agent(MicroAgent):
        @consumer(queue, concurency=4)
        def handle(self, **kwargs: Any) -> None: ...

    with pytest.raises(QueueException, match="unknown consumer option concurency"):
        await Agent(broker=broker).start()


@dataclasses.dataclass
class Order:
    order_id: int
    total: float


class OrderStruct(msgspec.Struct):
    order_id: int
    total: float


@pytest.mark.parametrize('dto_class', [Order, OrderStruct])
async def test_consumer_gets_the_dto(names: Any, memory: Any, dto_class: type) -> None:
    _, broker = memory
    queue, got = Queue(names.q), Recorder()

    class Agent(MicroAgent):
        @consumer(queue, dto_class=dto_class, dto_name='order')
        async def handle(self, order: Any, **kwargs: Any) -> None:
            got(order=order, **kwargs)

    async with Agent(broker=broker):
        await getattr(broker, names.q).send({'order_id': 7, 'total': 9.5})
        [call] = await got.wait()
    assert call == {'order': dto_class(order_id=7, total=9.5), 'order_id': 7, 'total': 9.5}


async def test_retry_then_success_is_handled_once_more_exactly(names: Any, memory: Any) -> None:
    _, broker = memory
    queue, attempts = Queue(names.q), Recorder()

    class Agent(MicroAgent):
        @consumer(queue, backoff=0.01)
        async def handle(self, n: int) -> None:
            attempts(n=n)
            if len(attempts.calls) < 3:
                raise ConnectionError('flaky')

    async with Agent(broker=broker):
        await getattr(broker, names.q).send({'n': 1})
        await attempts.wait(3)
        await asyncio.sleep(0.1)  # room for a wrong fourth attempt to show up
    assert len(attempts.calls) == 3
    assert await broker.queue_length(f'{names.q}.dead') == 0
    assert await broker.queue_length(names.q) == 0


async def dead_letters(broker: MemoryBroker, name: str, count: int) -> list[dict[str, Any]]:
    got = Recorder()

    class Reader(MicroAgent):
        @consumer(Queue.get(name).dead_letter)
        def read(self, **envelope: Any) -> None:
            got(**envelope)

    async with Reader(broker=broker):
        return await got.wait(count)


async def test_failing_and_malformed_messages_go_to_the_dead_letter_queue(
        names: Any, memory: Any) -> None:
    _, broker = memory
    queue, handled = Queue(names.q), Recorder()

    class Agent(MicroAgent):
        @consumer(queue, retries=2, backoff=0, dto_class=Order, timeout=0.05)
        async def handle(self, order_id: int, **kwargs: Any) -> None:
            handled(order_id=order_id)
            if order_id == 1:
                raise ValueError('cannot ship order 1')
            if order_id == 2:
                await asyncio.sleep(1)

    async with Agent(broker=broker):
        await getattr(broker, names.q).send({'order_id': 1, 'total': 1})
        await getattr(broker, names.q).send({'order_id': 2, 'total': 1})
        await broker.send(names.q, b'{not json')
        await broker.send(names.q, b'{"order_id": 3}')  # does not fit the DTO
        await getattr(broker, names.q).send({'order_id': 4, 'total': 1})
        await wait_for(lambda: {'order_id': 4} in handled.calls)
        envelopes = await dead_letters(broker, names.q, 4)
    by_body = {e['body']: e for e in envelopes}
    assert set(by_body) == {'{"order_id":1,"total":1}', '{"order_id":2,"total":1}',
                            '{not json', '{"order_id": 3}'}
    failed = by_body['{"order_id":1,"total":1}']
    assert failed['error'] == 'ValueError: cannot ship order 1' and failed['attempts'] == 3
    assert failed['queue'] == names.q and failed['consumer'] == 'Agent.handle'
    assert by_body['{"order_id":2,"total":1}']['error'].startswith('TimeoutError')
    assert by_body['{not json']['attempts'] == 0
    assert 'order_id' in by_body['{"order_id": 3}']['error'] or by_body['{"order_id": 3}'][
        'error'].startswith('TypeError')
    assert handled.calls.count({'order_id': 1}) == 3


async def test_concurrency_is_bounded_and_one_keeps_order(names: Any, memory: Any) -> None:
    _, broker = memory
    wide, narrow = Queue(names.wide), Queue(names.narrow)
    running, peak, order = [0], [0], []

    class Agent(MicroAgent):
        @consumer(wide, concurrency=4)
        async def many(self, i: int) -> None:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            await asyncio.sleep(0.01)
            running[0] -= 1

        @consumer(narrow, concurrency=1)
        async def one(self, i: int) -> None:
            await asyncio.sleep(0.001 * (i % 3))
            order.append(i)

    for i in range(40):
        await getattr(broker, names.wide).send({'i': i})
        await getattr(broker, names.narrow).send({'i': i})
    async with Agent(broker=broker):
        await wait_for(lambda: len(order) == 40 and running[0] == 0)
        await wait_for(lambda: broker.pools[names.wide]._to_ack == [])
    assert peak[0] == 4
    assert order == list(range(40))


async def test_stop_drains_an_in_flight_handler(names: Any, memory: Any) -> None:
    _, broker = memory
    queue, started, finished = Queue(names.q), asyncio.Event(), []

    class Agent(MicroAgent):
        @consumer(queue, concurrency=1, timeout=5)
        async def handle(self, i: int) -> None:
            started.set()
            await asyncio.sleep(0.2)
            finished.append(i)

    for i in range(3):
        await getattr(broker, names.q).send({'i': i})
    agent = Agent(broker=broker)
    await agent.start()
    await asyncio.wait_for(started.wait(), WAIT)
    await agent.stop()
    assert finished == [0]  # the in-flight one finished; the others were not started
    assert await broker.queue_length(names.q) == 2  # and are back in the queue


async def test_stop_grace_cancels_and_gives_the_message_back(names: Any, memory: Any) -> None:
    _, broker = memory
    queue, started = Queue(names.q), asyncio.Event()

    class Agent(MicroAgent):
        @consumer(queue, timeout=30)
        async def handle(self, i: int) -> None:
            started.set()
            await asyncio.sleep(30)

    await getattr(broker, names.q).send({'i': 1})
    agent = Agent(broker=broker)
    await agent.start()
    await asyncio.wait_for(started.wait(), WAIT)
    began = time.monotonic()
    await agent.stop(grace=0.1)
    assert time.monotonic() - began < 2
    assert await broker.queue_length(names.q) == 1


async def test_stop_interrupts_a_retry_backoff(names: Any, memory: Any) -> None:
    _, broker = memory
    queue, attempts = Queue(names.q), Recorder()

    class Agent(MicroAgent):
        @consumer(queue, backoff=30)
        async def handle(self, **kwargs: Any) -> None:
            attempts()
            raise ValueError('fails')

    await getattr(broker, names.q).send({})
    agent = Agent(broker=broker)
    await agent.start()
    await attempts.wait()
    began = time.monotonic()
    await agent.stop()
    assert time.monotonic() - began < 2
    assert await broker.queue_length(names.q) == 1


async def test_backpressure_bounds_what_a_consumer_takes(names: Any, memory: Any) -> None:
    _, broker = memory
    queue, release, handled = Queue(names.q), asyncio.Event(), Recorder()

    class Agent(MicroAgent):
        @consumer(queue, concurrency=2)
        async def handle(self, **kwargs: Any) -> None:
            await release.wait()
            handled()

    for _ in range(1000):
        await getattr(broker, names.q).send({})
    agent = Agent(broker=broker)
    await agent.start()
    pool = broker.pools[names.q]
    await wait_for(lambda: len(pool._running) == 2)
    taken = 1000 - await broker.queue_length(names.q)
    assert taken <= pool.capacity + broker.FETCH_BATCH + 2
    release.set()
    await handled.wait(1000)
    await agent.stop()
    assert await broker.queue_length(names.q) == 0


# -- timers ------------------------------------------------------------------------------

async def test_periodic_runs_repeatedly_survives_errors_and_timeouts(
        caplog: pytest.LogCaptureFixture) -> None:
    runs = Recorder()

    class Agent(MicroAgent):
        @periodic(period=0.02, timeout=0.01, start_after=0.05)
        async def tick(self) -> None:
            runs()
            if len(runs.calls) == 1:
                raise ValueError('first run fails')
            if len(runs.calls) == 2:
                await asyncio.sleep(1)  # times out

    agent = Agent()
    began = time.monotonic()
    await agent.start()
    await runs.wait(1)
    assert time.monotonic() - began >= 0.045
    await runs.wait(4)
    await agent.stop()
    count = len(runs.calls)
    await asyncio.sleep(0.06)
    assert len(runs.calls) == count  # stopped means stopped
    assert 'failed' in caplog.text and 'timed out' in caplog.text


async def test_periodic_skips_a_tick_while_the_previous_run_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    runs = Recorder()

    class Agent(MicroAgent):
        @periodic(period=0.02, timeout=1)
        async def slow(self) -> None:
            runs()
            await asyncio.sleep(0.07)

    agent = Agent()
    await agent.start()
    await asyncio.sleep(0.15)
    await agent.stop()
    assert 1 <= len(runs.calls) <= 3
    assert 'skipped a run' in caplog.text


def test_cron_next_run_is_computed_in_utc_or_the_zone() -> None:
    class Agent(MicroAgent):
        @cron('* * * * *')
        def every_minute(self) -> None: ...

        @cron('0 0 1 1 *', tz='Europe/Paris')
        def new_year(self) -> None: ...

    minute, new_year = Agent().cron_tasks
    assert 0 <= minute.next_delay() <= 60
    import datetime
    import zoneinfo
    now = datetime.datetime.now(zoneinfo.ZoneInfo('Europe/Paris'))
    expected = datetime.datetime(now.year + 1, 1, 1, tzinfo=zoneinfo.ZoneInfo('Europe/Paris'))
    assert abs(new_year.next_delay() - (expected - now).total_seconds()) < 2


async def test_cron_task_runs_when_due() -> None:
    runs = Recorder()

    class Agent(MicroAgent):
        @cron('* * * * *', timeout=1)
        async def every_minute(self) -> None:
            runs()

    agent = Agent()
    agent.cron_tasks[0].first_delay = lambda: 0.01  # type: ignore[method-assign]
    await agent.start()
    await runs.wait(1)
    await agent.stop()


# -- servers -----------------------------------------------------------------------------

async def test_server_interrupt_stops_the_agent_gracefully() -> None:
    events = []

    class Agent(MicroAgent):
        @on('server')
        async def serve(self) -> None:
            events.append('served')
            raise ServerInterrupt('done')

        @on('pre_stop')
        def goodbye(self) -> None:
            events.append('pre_stop')

    agent = Agent()
    await agent.start()
    await asyncio.wait_for(agent.wait(), WAIT)
    assert events == ['served', 'pre_stop']


async def test_failing_server_stops_the_agent_and_is_raised_by_wait() -> None:
    class Agent(MicroAgent):
        @on('server')
        async def serve(self) -> None:
            raise OSError('port taken')

    agent = Agent()
    await agent.start()
    with pytest.raises(OSError, match='port taken'):
        await asyncio.wait_for(agent.wait(), WAIT)


async def test_stop_cancels_running_servers() -> None:
    cancelled = asyncio.Event()

    class Agent(MicroAgent):
        @on('server')
        async def serve(self) -> None:
            try:
                await asyncio.sleep(60)
            finally:
                cancelled.set()

    agent = Agent()
    await agent.start()
    await asyncio.sleep(0)
    await agent.stop()
    assert cancelled.is_set()
    await asyncio.wait_for(agent.wait(), WAIT)


# -- mocks -------------------------------------------------------------------------------

async def test_mocks_record_calls_and_refuse_undeclared_names(names: Any) -> None:
    signal, queue = Signal(names.s, ['n']), Queue(names.q)
    Signal(names.out, ['n'])

    class Agent(MicroAgent):
        @receiver(signal)
        async def handle(self, n: int, **kwargs: Any) -> None:
            await getattr(self.bus, names.out).send('agent', n=n)
            await getattr(self.broker, names.q).send({'n': n})
            await getattr(self.bus, names.out).call('agent', n=n)

    agent = Agent(bus=BusMock(), broker=BrokerMock())
    await agent.start()
    await agent.handle(signal=signal, sender='test', n=5)
    getattr(agent.bus, names.out).send.assert_called_once_with('agent', n=5)
    getattr(agent.bus, names.out).call.assert_awaited_once()
    getattr(agent.broker, names.q).send.assert_called_once_with({'n': 5})
    assert await getattr(agent.broker, queue.name).length() == 0
    with pytest.raises(SignalNotFound):
        agent.bus.usr_created  # noqa: B018 - a typo fails as on a real bus
    with pytest.raises(QueueNotFound):
        agent.broker.mialer  # noqa: B018
    with pytest.raises(AttributeError):
        getattr(agent.bus, names.out).sned  # noqa: B018
    await agent.stop()


# -- launcher ----------------------------------------------------------------------------

def test_legacy_backend_paths_are_accepted() -> None:
    assert microagent.resolve_backend('microagent.tools.redis.RedisSignalBus') == \
        'microagent_backends.RedisSignalBus'
    assert microagent.resolve_backend('microagent.tools.amqp.AMQPBroker') == \
        'microagent_backends.AMQPBroker'
    assert microagent.resolve_backend('microagent.tools.kafka.KafkaBroker') == \
        'microagent_backends.KafkaBroker'
    assert microagent.import_backend('microagent.MemoryBroker') is MemoryBroker


AGENTS_MODULE = '''
import asyncio, os
from microagent import MicroAgent, Queue, Signal, ServerInterrupt, consumer, on, periodic, receiver

jobs = Queue('jobs_{suffix}')

class Worker(MicroAgent):
    @consumer(jobs, timeout=5)
    async def work(self, n):
        self.log.info('WORKER %s handled job %s', os.getpid(), n)

class Producer(MicroAgent):
    @periodic(period=0.2, start_after=0)
    async def produce(self):
        self.n = getattr(self, 'n', 0) + 1
        await self.broker.send('jobs_{suffix}', ('{{"n": %d}}' % self.n).encode())
        self.log.info('PRODUCER %s queued job %s', os.getpid(), self.n)

    @on('pre_stop')
    def goodbye(self):
        self.log.info('PRE_STOP %s', os.getpid())

class Quitter(MicroAgent):
    @on('server')
    async def serve(self):
        await asyncio.sleep(0.5)
        raise ServerInterrupt('finished')

class Crasher(MicroAgent):
    @on('server')
    async def serve(self):
        await asyncio.sleep(0.5)
        raise RuntimeError('crashed on purpose')
'''


def write_settings(tmp_path: Path, unique: str, agents: dict[str, Any],
                   name: str = 'group_settings') -> str:
    package = tmp_path / f'pkg_{unique}'
    package.mkdir(exist_ok=True)
    (package / '__init__.py').write_text('')
    (package / 'agents.py').write_text(AGENTS_MODULE.format(suffix=unique))
    broker = {'backend': 'microagent.MemoryBroker', 'dsn': f'memory://{unique}'}
    (package / f'{name}.py').write_text(textwrap.dedent(f'''
        import logging, sys
        logging.basicConfig(stream=sys.stdout, level=logging.INFO,
                            format='%(process)d %(name)s %(message)s')
        BROKER = {{'shared': {broker!r}, 'own': {broker!r}}}
        AGENT = {agents!r}
    '''))
    return f'pkg_{unique}.{name}'


def marun(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'PYTHONUNBUFFERED': '1'}
    return subprocess.Popen([sys.executable, '-c', 'import microagent; microagent.run()', *args],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def read_until(process: subprocess.Popen[str], needles: list[str], timeout: float = 30
               ) -> str:
    """Read the process output until every needle appeared (bounded)."""
    assert process.stdout is not None
    seen: list[str] = []
    found: set[str] = set()
    deadline = time.monotonic() + timeout

    def reader() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            seen.append(line)
            found.update(n for n in needles if n in line)
            if found == set(needles):
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if found != set(needles):
        process.kill()
        raise AssertionError(f'missing {set(needles) - found} in output:\n{"".join(seen)}')
    return ''.join(seen)


def finish(process: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str]:
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        raise AssertionError(f'marun did not exit:\n{out}') from None
    return process.returncode, out


def test_marun_runs_the_examples_and_stops_cleanly_on_sigterm() -> None:
    process = marun(['examples.settings'], ROOT)
    out = read_until(process, ['Email #1 to', 'Stored comment 1', 'RPC rpc_comments_count '
                               "answered {'CommentAgent.comments_count': 1}",
                               'Caught user_created', 'share a memory:// bus or broker'])
    process.send_signal(signal.SIGTERM)
    code, rest = finish(process)
    out += rest
    assert code == 0, out
    assert '<MicroAgent EmailAgent> stopped' in out and 'AgentsManager: stopped' in out
    assert 'Traceback' not in out


def test_marun_runs_agents_in_their_own_processes(tmp_path: Path, unique: str) -> None:
    module = write_settings(tmp_path, unique, {
        'producer': {'backend': f'pkg_{unique}.agents.Producer', 'broker': 'shared'},
        'worker': {'backend': f'pkg_{unique}.agents.Worker', 'broker': 'shared'},
        'quiet': {'backend': f'pkg_{unique}.agents.Worker', 'broker': 'own'},
    })
    # Memory brokers only reach their process: give the lone worker a distinct DSN.
    settings = tmp_path / module.replace('.', '/')
    text = settings.with_suffix('.py').read_text().replace(
        f"'own': {{'backend': 'microagent.MemoryBroker', 'dsn': 'memory://{unique}'}}",
        f"'own': {{'backend': 'microagent.MemoryBroker', 'dsn': 'memory://{unique}-own'}}")
    settings.with_suffix('.py').write_text(text)
    process = marun([module], tmp_path)
    out = read_until(process, ['WORKER', 'AgentsManager: started quiet'])
    process.send_signal(signal.SIGINT)
    code, rest = finish(process)
    out += rest
    assert code == 0, out
    started = [line for line in out.splitlines() if 'AgentsManager: started' in line]
    pids = {line.rsplit('pid#', 1)[1] for line in started}
    assert len(started) == 2 and len(pids) == 2, out  # producer+worker share, quiet alone
    assert 'PRE_STOP' in out


@pytest.mark.parametrize(('agent', 'expected_code'), [('Quitter', 0), ('Crasher', 1)])
def test_one_agent_ending_stops_the_group(tmp_path: Path, unique: str, agent: str,
                                          expected_code: int) -> None:
    module = write_settings(tmp_path, unique, {
        'ender': {'backend': f'pkg_{unique}.agents.{agent}'},
        'worker': {'backend': f'pkg_{unique}.agents.Worker', 'broker': 'own'},
    })
    code, out = finish(marun([module], tmp_path))
    assert code == expected_code, out
    assert 'stopping the group' in out
    if agent == 'Crasher':
        assert 'crashed on purpose' in out


@pytest.mark.parametrize(('agents', 'error'), [
    ({'w': {'backend': 'nowhere.Agent'}},
     "AGENT['w'][\"backend\"]: cannot import 'nowhere.Agent': No module named 'nowhere'"),
    ({'w': {'bus': 'x'}}, "AGENT['w']: missing key \"backend\""),
    ({'w': {'backend': 'PKG.agents.Worker', 'broker': 'nope'}},
     "AGENT['w']['broker']: no BROKER entry named 'nope'"),
    ({'w': {'backend': 'PKG.agents.Worker'}},
     "AGENT['w']: missing key 'broker' (PKG.agents.Worker consumes queues)"),
    ({'w': {'backend': 'PKG.agents.jobs'}},
     "AGENT['w'][\"backend\"]: 'PKG.agents.jobs' is not a MicroAgent subclass"),
])
def test_bad_settings_give_a_one_line_error(tmp_path: Path, unique: str, agents: Any,
                                            error: str) -> None:
    agents = json.loads(json.dumps(agents).replace('PKG', f'pkg_{unique}'))
    error = error.replace('PKG', f'pkg_{unique}')
    module = write_settings(tmp_path, unique, agents)
    code, out = finish(marun([module], tmp_path))
    assert code == 2, out
    assert out.strip() == f'marun: error: {module}: {error}'


def test_settings_that_cannot_be_imported(tmp_path: Path) -> None:
    (tmp_path / 'broken_settings.py').write_text('import not_a_module_anywhere\n')
    code, out = finish(marun(['broken_settings'], tmp_path))
    assert code == 2
    assert out.strip() == ("marun: error: broken_settings: cannot import: ModuleNotFoundError: "
                           "No module named 'not_a_module_anywhere'")


async def test_send_many_stores_every_message(names: Any, memory: Any) -> None:
    _, broker = memory
    queue, got = Queue(names.q), Recorder()

    class Agent(MicroAgent):
        @consumer(queue, concurrency=1)
        def handle(self, i: int) -> None:
            got(i=i)

    await getattr(broker, names.q).send_many({'i': i} for i in range(500))
    assert await getattr(broker, names.q).length() == 500
    with pytest.raises(SerializingError, match='a message is a dict'):
        await getattr(broker, names.q).send_many([{'i': 1}, ['not', 'a', 'dict']])
    assert await getattr(broker, names.q).length() == 500  # all or nothing
    async with Agent(broker=broker):
        calls = await got.wait(500)
    assert [c['i'] for c in calls] == list(range(500))


async def test_a_timed_out_attempt_is_retried(names: Any, memory: Any) -> None:
    _, broker = memory
    queue, attempts = Queue(names.q), Recorder()

    class Agent(MicroAgent):
        @consumer(queue, timeout=0.05, backoff=0)
        async def handle(self, **kwargs: Any) -> None:
            attempts()
            if len(attempts.calls) == 1:
                await asyncio.sleep(5)

    async with Agent(broker=broker):
        began = time.monotonic()
        await getattr(broker, names.q).send({})
        await attempts.wait(2)
        assert time.monotonic() - began < 1
        await wait_for(lambda: not broker.pools[names.q]._running)
    assert len(attempts.calls) == 2
    assert await broker.queue_length(f'{names.q}.dead') == 0
