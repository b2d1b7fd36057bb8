"""Tests of the core (microagent.py): no external service needed."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import http.server
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest

import microagent
from conftest import eventually
from microagent import (
    AgentNode,
    BrokerMock,
    BusMock,
    GraphRenderError,
    MemoryBroker,
    MemorySignalBus,
    MicroAgent,
    Queue,
    QueueException,
    QueueNotFound,
    SerializingError,
    ServerInterrupt,
    SettingsError,
    Signal,
    SignalException,
    SignalNotFound,
    Topology,
    build_graph,
    check_command,
    consumer,
    cron,
    graph_command,
    load_queues,
    load_signals,
    load_stuff,
    on,
    periodic,
    receiver,
    sent_by,
)
from tests_support import graph_agents

ROOT = Path(__file__).resolve().parent
WAIT = 5.0  # seconds any single awaited event may take before the test fails


class Recorder:
    """Collects calls and lets a test await the n-th one."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self._event = asyncio.Event()

    def __call__(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)
        self._event.set()

    async def wait(self, count: int = 1, timeout: float = WAIT) -> list[dict[str, Any]]:
        await eventually(lambda: len(self.calls) >= count, timeout=timeout, changed=self._event)
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


# =====================================================================================
# Declarations: signals, queues, loading them from files
# =====================================================================================

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


@pytest.mark.parametrize('taken', ['close', 'send', 'call', 'waiter', 'links', 'connected'])
def test_a_signal_name_taken_by_the_bus_is_refused(taken: str) -> None:
    """``bus.close`` is the method: a signal called ``close`` could never be sent."""
    with pytest.raises(SignalException, match=f"'{taken}' is taken by an attribute of the bus"):
        Signal(taken, [])
    assert taken not in Signal.get_all()


@pytest.mark.parametrize('taken', ['ack', 'release', 'send_many', 'length', 'pools', 'close'])
def test_a_queue_name_taken_by_the_broker_is_refused(taken: str) -> None:
    with pytest.raises(QueueException, match=f"'{taken}' is taken by an attribute of the broker"):
        Queue(taken)
    assert taken not in Queue.get_all()


def test_a_backend_refuses_a_declared_name_its_own_attributes_take(names: Any) -> None:
    """What only a backend class has (a method of its own) is checked when it is made."""
    class Broker(MemoryBroker):
        def drain_everything(self) -> None: ...

    Queue('drain_everything')
    try:
        with pytest.raises(QueueException, match="'drain_everything' is taken"):
            Broker(f'memory://{names.q}')
    finally:
        Queue._registry.pop('drain_everything', None)
        Queue._registry.pop('drain_everything.dead', None)


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


def test_identical_redeclaration_is_allowed_and_a_conflicting_one_refused(names: Any) -> None:
    first = Signal(names.paid, ['order_id'], type_map={'order_id': int})
    again = Signal(names.paid, ['order_id'], type_map={'order_id': int})
    assert Signal.get(names.paid) in (first, again)
    with pytest.raises(SignalException, match='already declared with other arguments'):
        Signal(names.paid, ['x'])
    with pytest.raises(SignalException, match='already declared'):
        Signal(names.paid, ['order_id'], type_map={'order_id': str})
    with pytest.raises(SignalException, match='already declared'):
        Signal(names.paid, ['order_id'], type_map={'order_id': int}, strict=True)
    assert Signal.get(names.paid).providing_args == ['order_id']  # not replaced

    Queue(names.orders, exchange='shop', topics=('order.paid',))
    Queue(names.orders, exchange='shop', topics=('order.paid',))
    with pytest.raises(QueueException, match='already declared with exchange'):
        Queue(names.orders)
    assert Queue.get(names.orders).exchange == 'shop'


def test_a_json_file_cannot_change_a_declared_signal(tmp_path: Path, names: Any) -> None:
    path = write(tmp_path / 'stuff.json', f'''
        {{"signals": [{{"name": "{names.paid}", "providing_args": {{"order_id": "number"}}}}],
          "queues": [{{"name": "{names.orders}"}}]}}''')
    load_stuff(str(path))
    load_stuff(str(path))  # loaded again by another module: the same declarations
    Signal(names.paid, {'order_id': 'number'})
    with pytest.raises(SignalException, match=r'other.json: signals\[0\]: .*already declared'):
        load_stuff(str(write(tmp_path / 'other.json', f'''
            {{"signals": [{{"name": "{names.paid}", "providing_args": ["x"]}}]}}''')))
    assert Signal.get(names.paid).providing_args == ['order_id']


def test_strict_in_a_json_file(tmp_path: Path, names: Any) -> None:
    signals, _ = load_stuff(str(write(tmp_path / 'stuff.json', f'''
        {{"signals": [{{"name": "{names.paid}", "providing_args": ["order_id"],
                        "strict": true}},
                       {{"name": "{names.soft}", "providing_args": ["order_id"]}}]}}''')))
    assert getattr(signals, names.paid).strict and not getattr(signals, names.soft).strict
    with pytest.raises(SignalException, match='strict must be true or false'):
        load_stuff(str(write(tmp_path / 'bad.json', f'''
            {{"signals": [{{"name": "{names.other}", "strict": "yes"}}]}}''')))


async def test_dead_letter_queue_exists_as_soon_as_the_queue(names: Any, memory: Any) -> None:
    Queue(names.jobs)
    _, broker = memory
    assert await getattr(broker, f'{names.jobs}.dead').length() == 0  # without .dead_letter
    assert Queue.get(f'{names.jobs}.dead').name == f'{names.jobs}.dead'
    before = set(Queue.get_all())
    dead = Queue.get(names.jobs).dead_letter
    assert dead.dead_letter.name == f'{names.jobs}.dead.dead'
    assert set(Queue.get_all()) == before  # reading dead_letter declares nothing
    Queue(f'{names.jobs}.dead', exchange='dlx')  # the user may declare it with options
    assert Queue.get(names.jobs).dead_letter.exchange == 'dlx'


# =====================================================================================
# Decorators
# =====================================================================================

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


# =====================================================================================
# Agent: handlers, start and stop, hooks, info
# =====================================================================================

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
    with pytest.raises(TypeError, match="unknown keyword 'rollback_attempts' "
                                        r"\(did you mean 'ROLLBACK_ATTEMPTS'\?\)"):
        MemoryBroker('memory://lazy', rollback_attempts=1)
    with pytest.raises(ValueError, match='memory://NAME'):
        MemoryBroker('redis://localhost')


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
    await eventually(lambda: 'server' in events)
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


# =====================================================================================
# Signal bus
# =====================================================================================

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



async def test_memory_bus_forgets_the_channels_of_stopped_agents(names: Any, unique: str
                                                                  ) -> None:
    """Agents started and stopped over and over on one memory:// bus leave nothing behind:
    a signal sent afterwards reaches no stopped agent."""
    signal, got = Signal(names.s, ['n']), Recorder()

    class Agent(MicroAgent):
        @receiver(signal)
        def handle(self, n: int, **kwargs: Any) -> None:
            got(n=n)

    bus = MemorySignalBus(f'memory://{unique}')
    for _ in range(3):
        agent = Agent(bus=bus)
        await agent.start()
        await agent.stop()
    await bus.close()
    assert microagent._BusHub.hubs[unique].subscriptions == {}
    await getattr(MemorySignalBus(f'memory://{unique}'), names.s).send('tester', n=1)
    await asyncio.sleep(0)  # a delivery would be scheduled by now
    assert got.calls == []


async def test_strict_signal_refuses_a_bad_send_and_drops_a_bad_receipt(
        names: Any, memory: Any, caplog: pytest.LogCaptureFixture) -> None:
    strict = Signal(names.paid, {'order_id': 'number'}, strict=True)
    soft = Signal(names.soft, {'order_id': 'number'})
    got = Recorder()

    class Billing(MicroAgent):
        @receiver(strict, soft)
        def paid(self, signal: Signal, sender: str, **payload: Any) -> None:
            got(signal=signal.name, **payload)

    bus, _ = memory
    agent = Billing(bus=bus)
    await agent.start()
    try:
        for bad in ({'order_idd': 1}, {}, {'order_id': 'one'}):
            with pytest.raises(SerializingError, match='strict'):
                await getattr(bus, names.paid).send('shop', **bad)
        with caplog.at_level(logging.WARNING, logger='microagent'):
            await getattr(bus, names.soft).send('shop', order_idd=1)  # the 1.x soft check
            await bus.send(f'PUBSUB:{names.paid}:shop', b'{"order_idd": 2}')  # a 1.x peer
            await getattr(bus, names.paid).send('shop', order_id=3)
            await got.wait(2)
    finally:
        await agent.stop()
    assert got.calls == [{'signal': names.soft, 'order_idd': 1},
                         {'signal': names.paid, 'order_id': 3}]
    dropped = [r for r in caplog.records if 'Dropped signal' in r.getMessage()]
    assert [r.levelno for r in dropped] == [logging.ERROR]
    assert 'unexpected order_idd' in dropped[0].getMessage()
    assert any(r.levelno == logging.WARNING and names.soft in r.getMessage()
               for r in caplog.records)


# =====================================================================================
# Queue broker
# =====================================================================================

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
    """An option of another backend (AMQP's ``prefetch``) passes the decorator and is
    refused when the consumer is bound to a broker that does not take it."""
    _, broker = memory
    queue = Queue(names.q)

    class Agent(MicroAgent):
        @consumer(queue, prefetch=4)
        def handle(self, **kwargs: Any) -> None: ...

    with pytest.raises(QueueException, match="unknown consumer option prefetch"):
        await Agent(broker=broker).start()


@dataclasses.dataclass
class Order:
    order_id: int
    total: float


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
        await eventually(lambda: {'order_id': 4} in handled.calls)
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


async def test_a_dead_letter_keeps_the_bytes_of_a_body_that_is_not_utf8(
        names: Any, memory: Any) -> None:
    _, broker = memory

    class Agent(MicroAgent):
        @consumer(Queue(names.q))
        async def handle(self, **kwargs: Any) -> None:
            raise AssertionError('a malformed body never reaches the handler')

    garbage = b'\xff\xfe{"a": 1}\x80'
    async with Agent(broker=broker):
        await broker.send(names.q, garbage)
        [envelope] = await dead_letters(broker, names.q, 1)
    assert 'body' not in envelope
    assert base64.b64decode(envelope['body_base64']) == garbage
    assert envelope['attempts'] == 0


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
        await eventually(lambda: len(order) == 40 and running[0] == 0)
        await eventually(lambda: broker.pools[names.wide]._to_ack == [])
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
    await eventually(lambda: pool.in_flight == 2)
    taken = 1000 - await broker.queue_length(names.q)
    assert taken <= pool.capacity + broker.FETCH_BATCH + 2
    release.set()
    await handled.wait(1000)
    await agent.stop()
    assert await broker.queue_length(names.q) == 0


async def test_send_many_stores_every_message(names: Any, memory: Any) -> None:
    _, broker = memory
    queue, got = Queue(names.q), Recorder()

    class Agent(MicroAgent):
        @consumer(queue, concurrency=1)
        def handle(self, i: int) -> None:
            got(i=i)

    await getattr(broker, names.q).send_many({'i': i} for i in range(500))
    assert await getattr(broker, names.q).length() == 500
    with pytest.raises(SerializingError, match='a message must be a dict'):
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
        await eventually(lambda: broker.pools[names.q].in_flight == 0)
    assert len(attempts.calls) == 2
    assert await broker.queue_length(f'{names.q}.dead') == 0


# =====================================================================================
# Timers: periodic and cron
# =====================================================================================

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
    await eventually(lambda: len(runs.calls) >= 2 and 'skipped a run' in caplog.text)
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
    [task] = agent.cron_tasks
    task.first_delay = lambda: 0.05  # type: ignore[method-assign]
    task.next_delay = lambda: 3600.0  # type: ignore[method-assign]
    started = time.monotonic()
    await agent.start()
    try:
        calls = await runs.wait(1)
        ran_after = time.monotonic() - started
    finally:
        await agent.stop()
    assert calls == [{}]  # run once, the handler called without arguments
    assert 0.05 <= ran_after < 1  # when it was due: not before, and not at the next minute


# =====================================================================================
# Servers
# =====================================================================================

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


# =====================================================================================
# Mocks
# =====================================================================================

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


async def outcome(send: Any, caplog: pytest.LogCaptureFixture) -> tuple[Any, list[str]]:
    """What awaiting ``send()`` gives: the exception (type and text) or None, and the
    messages logged meanwhile."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='microagent'):
        try:
            await send()
        except Exception as exc:
            return (type(exc), str(exc)), [r.getMessage() for r in caplog.records]
    return None, [r.getMessage() for r in caplog.records]


async def test_mocks_refuse_and_warn_exactly_as_the_real_bus_and_broker(
        names: Any, memory: Any, caplog: pytest.LogCaptureFixture) -> None:
    Signal(names.paid, {'order_id': 'number'})
    Signal(names.strict, {'order_id': 'number'}, strict=True)
    Queue(names.orders)
    real_bus, real_broker = memory
    bus_mock, broker_mock = BusMock(), BrokerMock()
    cases: list[Any] = [
        lambda bus, broker: getattr(bus, names.paid).send('shop', order_idd=1),
        lambda bus, broker: getattr(bus, names.paid).send('shop', order_id='one'),
        lambda bus, broker: getattr(bus, names.paid).send('shop', order_id=1),
        lambda bus, broker: getattr(bus, names.paid).send('shop', order_id=1, at=object()),
        lambda bus, broker: getattr(bus, names.paid).send('', order_id=1),
        lambda bus, broker: getattr(bus, names.strict).send('shop', order_idd=1),
        lambda bus, broker: getattr(bus, names.strict).call('shop', timeout=0.01),
        lambda bus, broker: getattr(bus, names.paid).call('sh#op', timeout=0.01, order_id=1),
        lambda bus, broker: getattr(broker, names.orders).send(['a']),
        lambda bus, broker: getattr(broker, names.orders).send({'at': object()}),
        lambda bus, broker: getattr(broker, names.orders).send({'order_id': 1}),
        lambda bus, broker: getattr(broker, names.orders).send_many([{'n': 1}, 'b']),
    ]
    for case in cases:
        real = await outcome(lambda case=case: case(real_bus, real_broker), caplog)
        mocked = await outcome(lambda case=case: case(bus_mock, broker_mock), caplog)
        assert mocked == real
    refused = [await outcome(lambda case=case: case(bus_mock, broker_mock), caplog)
               for case in cases]
    assert sum(result is not None for result, _ in refused) == 8
    assert sum(bool(logged) for _, logged in refused) == 3  # the soft typed-signal warnings


async def test_mocks_still_record_and_answer_what_the_test_sets(names: Any) -> None:
    Signal(names.rpc, ['n'])
    Queue(names.orders)
    bus, broker = BusMock(), BrokerMock()
    assert await getattr(bus, names.rpc).call('me', n=1) == {}
    getattr(bus, names.rpc).call.return_value = {'A.count': 3}
    assert await getattr(bus, names.rpc).call('me', timeout=1, n=1) == {'A.count': 3}
    getattr(bus, names.rpc).call.assert_awaited_with('me', timeout=1, n=1)
    async with getattr(bus, names.rpc).waiter('me', n=2):
        pass
    getattr(bus, names.rpc).waiter.assert_called_once_with('me', n=2)
    await getattr(broker, names.orders).send_many([{'n': 1}])
    getattr(broker, names.orders).send_many.assert_awaited_once_with([{'n': 1}])
    with pytest.raises(SerializingError):
        await getattr(broker, names.orders).send(['a'])
    getattr(broker, names.orders).send.assert_awaited_once_with(['a'])


# =====================================================================================
# Launcher and settings (marun)
# =====================================================================================

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
     "AGENT['w']['backend']: cannot import 'nowhere.Agent': No module named 'nowhere'"),
    ({'w': {'bus': 'x'}}, "AGENT['w']: missing key 'backend'"),
    ({'w': {'backend': 'PKG.agents.Worker', 'broker': 'nope'}},
     "AGENT['w']['broker']: no BROKER entry named 'nope'"),
    ({'w': {'backend': 'PKG.agents.Worker'}},
     "AGENT['w']: missing key 'broker' (PKG.agents.Worker consumes queues)"),
    ({'w': {'backend': 'PKG.agents.jobs'}},
     "AGENT['w']['backend']: 'PKG.agents.jobs' is not a MicroAgent subclass"),
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


def run_marun_in(args: list[str], cwd: Path, timeout: float = 60) -> tuple[int, str]:
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'PYTHONUNBUFFERED': '1'}
    done = subprocess.run([sys.executable, '-c', 'import microagent; microagent.run()', *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize(('section', 'entry', 'error'), [
    ('BUS', {'backend': 'microagent.MemorySignalBus', 'dsn': 'memory://x', 'prefx': 'APP'},
     "BUS['main']: MemorySignalBus got an unknown keyword 'prefx' (did you mean 'prefix'?); "
     "it takes dsn, prefix, log and the settings LEASE_TTL, RECEIVER_BACKLOG, "
     "RECEIVER_CONCURRENCY, RESPONSE_TIMEOUT, TRACE_CONTEXT"),
    ('BROKER', {'backend': 'microagent.MemoryBroker', 'dsn': 'memory://x',
                'ROLLBACK_ATTEMPT': 5},
     "BROKER['main']: MemoryBroker got an unknown keyword 'ROLLBACK_ATTEMPT' (did you mean "
     "'ROLLBACK_ATTEMPTS'?); it takes dsn, log and the settings FETCH_BATCH, PREFETCH, "
     "RETRY_BACKOFF, ROLLBACK_ATTEMPTS, STALL_TIMEOUT, TRACE_CONTEXT"),
    ('BROKER', {'backend': 'microagent.MemoryBroker', 'dsn': 'redis://u:s3cret@host/0'},
     "BROKER['main']: a memory backend needs a memory://NAME DSN, not 'redis://u:***@host/0'"),
    ('BUS', {'backend': 'microagent.MemoryBroker', 'dsn': 'memory://x'},
     "BUS['main']['backend']: 'microagent.MemoryBroker' is not a signal bus "
     "(AbstractSignalBus subclass)"),
])
def test_wrong_bus_and_broker_entries_are_one_line_errors(
        tmp_path: Path, unique: str, section: str, entry: dict[str, Any], error: str) -> None:
    (tmp_path / f'agents_{unique}.py').write_text(AGENTS_MODULE.format(suffix=unique))
    other = 'BROKER' if section == 'BUS' else 'BUS'
    (tmp_path / f'settings_{unique}.py').write_text(textwrap.dedent(f'''
        {section} = {{'main': {entry!r}}}
        {other} = {{'main': {{'backend': 'microagent.Memory{"Broker" if other == "BROKER"
                                                               else "SignalBus"}',
                             'dsn': 'memory://{unique}'}}}}
        AGENT = {{'worker': {{'backend': 'agents_{unique}.Worker', 'bus': 'main',
                              'broker': 'main'}}}}
    '''))
    code, out = run_marun_in([f'settings_{unique}'], tmp_path)
    assert code == 2, out
    assert out.strip() == f'marun: error: settings_{unique}: {error}'
    assert 's3cret' not in out


NOISY_AGENT = '''
import logging
from microagent import MicroAgent, ServerInterrupt, on

class Noisy(MicroAgent):
    @on('server')
    async def serve(self):
        logging.getLogger('aiokafka.consumer.consumer').info('KAFKA INFO')
        logging.getLogger('aiormq.connection').warning('AIORMQ WARNING')
        logging.getLogger('asyncio').info('ASYNCIO INFO')
        logging.getLogger('redis.asyncio').info('REDIS INFO')
        self.log.info('AGENT INFO')
        raise ServerInterrupt('done')
'''


def test_marun_keeps_client_library_loggers_at_warning_unless_configured(
        tmp_path: Path, unique: str) -> None:
    (tmp_path / f'noisy_{unique}.py').write_text(NOISY_AGENT)
    (tmp_path / f'settings_{unique}.py').write_text(textwrap.dedent(f'''
        import logging
        logging.getLogger('redis').setLevel(logging.INFO)  # the user wants these
        AGENT = {{'noisy': {{'backend': 'noisy_{unique}.Noisy'}}}}
    '''))
    code, out = run_marun_in([f'settings_{unique}'], tmp_path)
    assert code == 0, out
    assert 'AGENT INFO' in out and 'AIORMQ WARNING' in out and 'REDIS INFO' in out
    assert 'KAFKA INFO' not in out and 'ASYNCIO INFO' not in out


# =====================================================================================
# Topology graph (marun --graph, marun --check)
# =====================================================================================

EXAMPLES = 'examples.settings'
NAMES = 'tests_support.graph_names_settings'
CHECK = 'tests_support.graph_check_settings'
SVG = '{http://www.w3.org/2000/svg}'

needs_dot = pytest.mark.skipif(
    shutil.which('dot') is None and not os.environ.get('MICROAGENT_REQUIRE_SERVICES'),
    reason="Graphviz's dot is not installed (apt-get install graphviz)")


def agent_json(name: str, cls: str, **lists: list[str]) -> dict[str, Any]:
    keys = ('receives', 'consumes', 'sends', 'calls', 'produces', 'periodic', 'cron', 'servers')
    return {'name': name, 'class': cls, **{key: lists.get(key, []) for key in keys}}


def edges_of(topology: Topology) -> set[tuple[str, str, str]]:
    return {(edge.source, edge.target, edge.kind) for edge in topology.edges}


# -- the examples --------------------------------------------------------------------

EXAMPLES_GRAPH = {
    'agents': [
        agent_json('comment_agent', 'examples.comment_agent.CommentAgent',
                   receives=['rpc_comments_count', 'user_comment'],
                   sends=['comment_created'], produces=['mailer']),
        agent_json('email_agent', 'examples.email_agent.EmailAgent', consumes=['mailer']),
        agent_json('user_agent', 'examples.user_agent.UserAgent',
                   receives=['comment_created', 'user_created'],
                   sends=['user_comment', 'user_created'], calls=['rpc_comments_count'],
                   produces=['mailer'], periodic=['post_comment'], cron=['send_report']),
    ],
    'signals': ['comment_created', 'rpc_comments_count', 'user_comment', 'user_created'],
    'queues': ['mailer'],
    'edges': [
        {'source': 'agent:comment_agent', 'target': 'queue:mailer', 'kind': 'produces'},
        {'source': 'agent:comment_agent', 'target': 'signal:comment_created', 'kind': 'sends'},
        {'source': 'agent:user_agent', 'target': 'queue:mailer', 'kind': 'produces'},
        {'source': 'agent:user_agent', 'target': 'signal:rpc_comments_count', 'kind': 'calls'},
        {'source': 'agent:user_agent', 'target': 'signal:user_comment', 'kind': 'sends'},
        {'source': 'agent:user_agent', 'target': 'signal:user_created', 'kind': 'sends'},
        {'source': 'queue:mailer', 'target': 'agent:email_agent', 'kind': 'consumes'},
        {'source': 'signal:comment_created', 'target': 'agent:user_agent', 'kind': 'receives'},
        {'source': 'signal:rpc_comments_count', 'target': 'agent:comment_agent',
         'kind': 'receives'},
        {'source': 'signal:user_comment', 'target': 'agent:comment_agent', 'kind': 'receives'},
        {'source': 'signal:user_created', 'target': 'agent:user_agent', 'kind': 'receives'},
    ],
}


def test_examples_graph_is_exactly_the_expected_json() -> None:
    data = build_graph(EXAMPLES).to_json()
    assert json.loads(data) == EXAMPLES_GRAPH
    assert data.endswith('}\n')


def test_examples_check_finds_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_command([EXAMPLES]) == 0
    out, err = capsys.readouterr()
    assert out == ''
    assert '0 error(s), 0 warning(s) in 3 agent(s)' in err


def test_schedule_is_shown_on_the_agent_node() -> None:
    user = next(a for a in build_graph(EXAMPLES).agents if a.name == 'user_agent')
    assert user.schedule == ('periodic post_comment (every 2 s)', 'cron send_report (* * * * *)')
    alias = AgentNode.of('alias', graph_agents.AliasAgent)
    assert alias.schedule == ('cron nightly (0 4 * * * Europe/Paris)', 'server serve')
    assert (alias.cron, alias.servers) == (('nightly',), ('serve',))


# -- static analysis -------------------------------------------------------------------

def test_inherited_helper_method_is_found() -> None:
    topology = build_graph(graph_agents.InheritingAgent)
    assert edges_of(topology) == {
        ('agent:InheritingAgent', 'signal:graph_notice', 'sends'),
        ('signal:graph_notice', 'agent:InheritingAgent', 'receives'),
    }
    assert topology.agents[0].periodic == ('tick',)


def test_aliases_of_bus_broker_and_bound_names_are_followed() -> None:
    assert sent_by(graph_agents.AliasAgent) == {
        'sends': ['graph_alias_sent', 'graph_bound_sent', 'graph_deferred_sent',
                  'graph_walrus_sent'],
        'calls': ['graph_walrus_called'],
        'produces': ['graph.orders-v2', 'graph_batch'],
    }


def test_mixins_are_analysed_and_standard_library_bases_are_quiet(
        caplog: pytest.LogCaptureFixture) -> None:
    T = TypeVar('T')

    class Mixed(graph_agents.AnnouncingMixin, MicroAgent, threading.local, Generic[T]):
        pass

    with caplog.at_level(logging.WARNING, logger='microagent.graph'):
        node = AgentNode.of('mixed', Mixed)
    assert node.sends == ('graph_mixin_sent',)
    assert node.unreadable == ()
    assert caplog.records == []


def test_rpc_call_and_waiter_are_calls_edges() -> None:
    assert edges_of(build_graph(graph_agents.RpcAgent)) == {
        ('agent:RpcAgent', 'signal:graph_rpc_called', 'calls'),
        ('agent:RpcAgent', 'signal:graph_rpc_waited', 'calls'),
    }


def test_topology_attribute_adds_edges_and_adds_up_over_bases() -> None:
    topology = build_graph(graph_agents.DeclaredChild, graph_agents.JobsWorker)
    assert edges_of(topology) == {
        ('agent:DeclaredChild', 'signal:graph_dynamic', 'sends'),
        ('agent:DeclaredChild', 'signal:graph_rpc_called', 'calls'),
        ('agent:DeclaredChild', 'queue:graph_jobs', 'produces'),
        ('queue:graph_jobs', 'agent:JobsWorker', 'consumes'),
    }


@pytest.mark.parametrize('declared, error', [
    (['graph_dynamic'], 'must be a dict'),
    ({'send': ['graph_dynamic']}, "unknown key 'send'"),
    ({'sends': 'graph_dynamic'}, 'must be a list of names'),
    ({'sends': [1]}, '1 is not a name'),
])
def test_topology_attribute_is_checked(declared: Any, error: str) -> None:
    class Declaring(MicroAgent):
        topology = declared

    with pytest.raises(TypeError, match=re.escape(error)):
        sent_by(Declaring)


def test_check_reports_a_wrong_topology_attribute(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_command(['tests_support.graph_bad_topology_settings']) == 1
    assert capsys.readouterr().out == (
        "error: agent 'wrong': tests_support.graph_bad_topology_settings.Wrong.topology: "
        "unknown key 'send'; use sends, calls, produces\n")


def test_class_nested_in_a_function_is_analysed() -> None:
    class Nested(MicroAgent):
        async def go(this) -> None:
            """A docstring whose lines
start at column 0 (the source cannot simply be dedented)."""
            await this.bus.graph_notice.send('nested')  # type: ignore[union-attr]

    assert sent_by(Nested)['sends'] == ['graph_notice']


def test_class_without_source_keeps_decorated_edges_and_warns(
        caplog: pytest.LogCaptureFixture) -> None:
    namespace: dict[str, Any] = {
        '__name__': 'graph_generated', 'MicroAgent': MicroAgent, 'receiver': receiver,
        'consumer': consumer, 'on': on}
    exec(compile('''
class Generated(MicroAgent):
    topology = {'produces': ['graph_batch']}

    @receiver('graph_notice')
    async def on_notice(self, **kwargs):
        await self.bus.graph_alias_sent.send('generated')

    @consumer('graph_jobs')
    async def work(self, **kwargs):
        pass

    @on('server')
    async def serve(self):
        pass
''', '<generated>', 'exec'), namespace)
    with caplog.at_level(logging.WARNING, logger='microagent.graph'):
        topology = build_graph(namespace['Generated'])
    assert edges_of(topology) == {
        ('signal:graph_notice', 'agent:Generated', 'receives'),
        ('queue:graph_jobs', 'agent:Generated', 'consumes'),
        ('agent:Generated', 'queue:graph_batch', 'produces'),
    }
    assert topology.agents[0].servers == ('serve',)
    assert topology.agents[0].unreadable == ('graph_generated.Generated',)
    [record] = [r for r in caplog.records if r.name == 'microagent.graph']
    assert record.levelno == logging.WARNING
    assert 'graph_generated.Generated is not available' in record.getMessage()
    assert '`topology`' in record.getMessage()


def test_sent_by_is_sorted_and_deterministic() -> None:
    first = sent_by(graph_agents.AliasAgent)
    assert first == sent_by(graph_agents.AliasAgent)
    assert list(first) == ['sends', 'calls', 'produces']
    for names in first.values():
        assert names == sorted(names)


def test_same_code_gives_the_same_bytes_under_any_hash_seed() -> None:
    script = ('import sys, microagent\n'
              f'topology = microagent.build_graph({EXAMPLES!r}, {NAMES!r})\n'
              'for fmt in ("json", "dot", "mermaid"):\n'
              '    sys.stdout.buffer.write(topology.export(fmt))\n')
    outputs = []
    for seed in ('1', '2'):
        env = {**os.environ, 'PYTHONHASHSEED': seed}
        done = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env,
                              capture_output=True, timeout=60, check=True)
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1]
    topology = build_graph(EXAMPLES, NAMES)
    assert outputs[0] == b''.join(topology.export(fmt) for fmt in ('json', 'dot', 'mermaid'))


def test_info_includes_what_the_agent_sends_once_wired(monkeypatch: pytest.MonkeyPatch) -> None:
    info = graph_agents.RpcAgent().info()
    assert (info['sends'], info['calls'], info['produces']) == (
        [], ['graph_rpc_called', 'graph_rpc_waited'], [])
    json.dumps(info)


# -- building ----------------------------------------------------------------------------

def test_agents_are_named_by_class_or_by_settings_key() -> None:
    topology = build_graph(graph_agents.RpcAgent(), graph_agents.JobsWorker, EXAMPLES)
    assert [a.name for a in topology.agents] == [
        'JobsWorker', 'RpcAgent', 'comment_agent', 'email_agent', 'user_agent']
    assert build_graph(graph_agents.RpcAgent, graph_agents.RpcAgent()).agents == (
        AgentNode.of('RpcAgent', graph_agents.RpcAgent),)


def test_a_name_used_by_two_classes_is_refused() -> None:
    class RpcAgent(MicroAgent):
        pass

    with pytest.raises(ValueError, match="agent name 'RpcAgent' is used by"):
        build_graph(graph_agents.RpcAgent, RpcAgent)
    with pytest.raises(TypeError, match='not 42'):
        build_graph(42)  # type: ignore[arg-type]


def test_settings_that_cannot_be_used_raise_settings_error() -> None:
    with pytest.raises(SettingsError, match='graph_no_such_settings: cannot import'):
        build_graph('tests_support.graph_no_such_settings')
    with pytest.raises(SettingsError, match=r"SignalNotFound: .*'graph_chk_never_declared'"):
        build_graph('tests_support.graph_bad_receiver_settings')


def test_text_formats_are_str() -> None:
    topology = build_graph(EXAMPLES)
    assert isinstance(topology.to_json(), str) and isinstance(topology.to_mermaid(), str)
    assert topology.export('json') == topology.to_json().encode()


# -- DOT, SVG, PNG ------------------------------------------------------------------------

def run_dot(source: str) -> bytes:
    done = subprocess.run(['dot', '-Tsvg'], input=source.encode(), capture_output=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b'', done.stderr.decode()
    return done.stdout


def svg_texts(svg: bytes) -> list[str]:
    return [''.join(text.itertext()) for text in ET.fromstring(svg).iter(f'{SVG}text')]


@needs_dot
@pytest.mark.parametrize('modules', [[EXAMPLES], [NAMES], [CHECK]])
def test_dot_accepts_the_dot_output(modules: list[str]) -> None:
    topology = build_graph(*modules)
    source = topology.export('dot').decode()
    texts = svg_texts(run_dot(source))
    for name in (*topology.signals, *topology.queues, *(a.name for a in topology.agents)):
        assert name in texts
    for kind in ('agent', 'signal', 'queue'):
        assert kind in texts  # the legend
    for edge in topology.edges:
        assert edge.kind in texts  # the edges' labels


def test_dot_has_three_node_shapes_and_five_edge_styles() -> None:
    source = build_graph(EXAMPLES).export('dot').decode()
    shapes = {node: shape for node, shape in re.findall(r'^\t+(\w+) \[.*shape=(\w+)', source,
                                                      re.MULTILINE)}
    assert {shapes['agent_user_agent'], shapes['signal_user_created'],
            shapes['queue_mailer']} == {'box', 'ellipse', 'cylinder'}
    assert {shapes['legend_agent'], shapes['legend_signal'],
            shapes['legend_queue']} == {'box', 'ellipse', 'cylinder'}
    styles = {(m.group(1), m.group(2)) for m in re.finditer(
        r'^\t\w+ -> \w+ \[label=(\w+) (.*)\]$', source, re.MULTILINE)}
    assert {kind for kind, _ in styles} == {'receives', 'consumes', 'sends', 'calls',
                                           'produces'}
    assert len({style for _, style in styles}) == 5  # one style per kind
    assert 'periodic post_comment (every 2 s)' in source


@needs_dot
def test_svg_and_png_are_drawn_by_dot() -> None:
    topology = build_graph(EXAMPLES)
    assert 'user_agent' in svg_texts(topology.render('svg'))
    assert topology.render('png').startswith(b'\x89PNG\r\n\x1a\n')
    with pytest.raises(ValueError, match="not 'pdf'"):
        topology.render('pdf')


def test_missing_dot_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv('PATH', str(tmp_path))
    with pytest.raises(GraphRenderError, match='apt-get install graphviz'):
        build_graph(EXAMPLES).render('svg')
    assert graph_command([EXAMPLES], 'png', str(tmp_path / 'graph.png')) == 1
    assert 'apt-get install graphviz' in capsys.readouterr().err
    assert not (tmp_path / 'graph.png').exists()


def test_missing_graphviz_and_croniter_say_what_to_install(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    build_graph(EXAMPLES)  # the examples' agents imported (their @cron needs croniter)
    monkeypatch.setitem(sys.modules, 'graphviz', None)  # as if not installed
    monkeypatch.setitem(sys.modules, 'croniter', None)
    with pytest.raises(ImportError, match=r'needs the graphviz package: pip install graphviz'):
        build_graph(EXAMPLES).to_dot()
    assert graph_command([EXAMPLES], 'svg', None) == 1
    assert capsys.readouterr().err.startswith(
        'marun: error: drawing the graph as dot, svg or png (mermaid and json need nothing) '
        'needs the graphviz package: pip install graphviz')
    assert graph_command([EXAMPLES], 'mermaid', None) == 0
    with pytest.raises(ImportError, match=r'^@cron needs the croniter package: pip install '
                                          r'croniter$'):
        cron('* * * * *')


def svg_box(element: ET.Element) -> tuple[float, float]:
    """Width and height of the points of an SVG element's polygons and paths."""
    numbers = [float(n) for shape in element.iter()
               if shape.tag in (f'{SVG}polygon', f'{SVG}path')
               for n in re.findall(r'-?\d+(?:\.\d+)?', shape.get('points') or shape.get('d') or '')]
    xs, ys = numbers[0::2], numbers[1::2]
    return max(xs) - min(xs), max(ys) - min(ys)


@needs_dot
def test_svg_edges_are_labelled_and_the_legend_is_small() -> None:
    topology = build_graph(EXAMPLES)
    root = ET.fromstring(topology.render('svg'))
    groups = {''.join(g.find(f'{SVG}title').itertext()): g  # type: ignore[union-attr]
              for g in root.iter(f'{SVG}g') if g.find(f'{SVG}title') is not None}
    edges = [g for g in groups.values() if g.get('class') == 'edge']
    assert len(edges) == len(topology.edges)
    labels = sorted(''.join(t.itertext()) for g in edges for t in g.iter(f'{SVG}text'))
    assert labels == sorted(edge.kind for edge in topology.edges)
    legend_width, legend_height = svg_box(groups['cluster_legend'])
    graph_width, graph_height = svg_box(groups['topology'])
    assert legend_width * legend_height < 0.05 * graph_width * graph_height


# -- Mermaid ------------------------------------------------------------------------------

MERMAID_ID = r'[A-Za-z][A-Za-z0-9_]*'
MERMAID_LABEL = r'[^"]*'
MERMAID_STYLE = r'[a-z-]+:[^,;\s]+(?:,[a-z-]+:[^,;\s]+)*'
MERMAID_LINES = {
    'header': re.compile(r'flowchart LR'),
    'node': re.compile(
        rf'    (?P<id>{MERMAID_ID})(?:\["(?P<agent>{MERMAID_LABEL})"\]'
        rf'|\(\["(?P<signal>{MERMAID_LABEL})"\]\)|\[\("(?P<queue>{MERMAID_LABEL})"\)\])'),
    'edge': re.compile(rf'    (?P<source>{MERMAID_ID}) (?P<arrow>-->|-\.->|==>)'
                       rf'\|(?P<kind>[a-z]+)\| (?P<target>{MERMAID_ID})'),
    'classDef': re.compile(rf'    classDef (?P<name>{MERMAID_ID}) {MERMAID_STYLE}'),
    'class': re.compile(
        rf'    class (?P<ids>{MERMAID_ID}(?:,{MERMAID_ID})*) (?P<name>{MERMAID_ID})'),
    'linkStyle': re.compile(rf'    linkStyle (?P<indexes>\d+(?:,\d+)*) {MERMAID_STYLE}'),
}
RESERVED_MERMAID_IDS = {'end', 'graph', 'flowchart', 'subgraph', 'class', 'classDef', 'style'}


def parse_mermaid(text: str) -> dict[str, Any]:
    """Check Mermaid flowchart text line by line; return its nodes (id -> (shape, label
    lines with entity codes decoded)) and edges (source, kind, target)."""
    assert text.endswith('\n')
    lines = text[:-1].split('\n')
    assert MERMAID_LINES['header'].fullmatch(lines[0]), lines[0]
    nodes: dict[str, tuple[str, list[str]]] = {}
    edges: list[tuple[str, str, str]] = []
    classes: set[str] = set()
    for line in lines[1:]:
        kind, match = next(((kind, m) for kind, pattern in MERMAID_LINES.items()
                            if (m := pattern.fullmatch(line))), (None, None))
        assert match is not None, f'not Mermaid flowchart syntax: {line!r}'
        if kind == 'node':
            assert match['id'] not in nodes and match['id'] not in RESERVED_MERMAID_IDS
            shape = next(s for s in ('agent', 'signal', 'queue') if match[s] is not None)
            nodes[match['id']] = (shape, decode_mermaid_label(match[shape]))
        elif kind == 'edge':
            assert {match['source'], match['target']} <= nodes.keys(), line
            edges.append((match['source'], match['kind'], match['target']))
        elif kind == 'classDef':
            classes.add(match['name'])
        elif kind == 'class':
            assert match['name'] in classes and set(match['ids'].split(',')) <= nodes.keys()
        elif kind == 'linkStyle':
            assert all(int(i) < len(edges) for i in match['indexes'].split(','))
    return {'nodes': nodes, 'edges': edges}


def decode_mermaid_label(label: str) -> list[str]:
    """The lines of a label; raw ``<``, ``>``, ``&`` or a ``#`` that does not start an
    entity code would be read as markup by Mermaid."""
    lines = label.split('<br/>')
    for line in lines:
        assert not re.search(r'[<>&`]|#(?!\d+;)', line), line
    return [re.sub(r'#(\d+);', lambda m: chr(int(m.group(1))), line) for line in lines]


@pytest.mark.parametrize('modules', [[EXAMPLES], [NAMES], [CHECK]])
def test_mermaid_output_parses_line_by_line(modules: list[str]) -> None:
    topology = build_graph(*modules)
    parsed = parse_mermaid(topology.to_mermaid())
    labels = {(shape, lines[0]) for shape, lines in parsed['nodes'].values()}
    assert labels == {*(('agent', a.name) for a in topology.agents),
                      *(('signal', name) for name in topology.signals),
                      *(('queue', name) for name in topology.queues)}
    assert len(parsed['edges']) == len(topology.edges)
    assert {kind for _, kind, _ in parsed['edges']} == {e.kind for e in topology.edges}


def test_examples_mermaid_shows_kinds_and_schedule() -> None:
    parsed = parse_mermaid(build_graph(EXAMPLES).to_mermaid())
    assert parsed['nodes']['agent_user_agent'] == ('agent', [
        'user_agent', 'examples.user_agent.UserAgent', 'periodic post_comment (every 2 s)',
        'cron send_report (* * * * *)'])
    assert ('agent_user_agent', 'calls', 'signal_rpc_comments_count') in parsed['edges']


# -- names that need quoting ------------------------------------------------------------

QUOTED_AGENT = 'агент "ß" <b>&#35;</b> \'q\''
ODD_SIGNAL = 'we"ird<sig>#1&amp;`x`'
ODD_QUEUE = 'back\\slash\\l'


def test_names_that_need_quoting_survive_json_and_mermaid() -> None:
    topology = build_graph(NAMES)
    data = json.loads(topology.to_json())
    assert [a['name'] for a in data['agents']] == ['billing.v2-eu', QUOTED_AGENT]
    assert data['signals'] == ['graph_names_signal', ODD_SIGNAL]
    assert data['queues'] == [ODD_QUEUE, 'graph-eu.1', 'graph.eu-1', 'graph:orders.v2-eu']
    assert data['agents'][0]['class'] == 'tests_support.graph_names_agents.Émetteur'
    nodes = parse_mermaid(topology.to_mermaid())['nodes']
    shown = {lines[0] for _, lines in nodes.values()}
    assert {QUOTED_AGENT, ODD_SIGNAL, ODD_QUEUE, 'graph-eu.1', 'graph.eu-1'} <= shown
    assert ['billing.v2-eu', 'tests_support.graph_names_agents.Émetteur'] in [
        lines for _, lines in nodes.values()]


@needs_dot
def test_names_that_need_quoting_survive_dot_svg_and_png() -> None:
    topology = build_graph(NAMES)
    texts = svg_texts(topology.render('svg'))
    for name in (QUOTED_AGENT, ODD_SIGNAL, ODD_QUEUE, 'billing.v2-eu', 'graph-eu.1',
                 'graph.eu-1', 'graph:orders.v2-eu',
                 'tests_support.graph_names_agents.Récepteur'):
        assert name in texts
    assert topology.render('png').startswith(b'\x89PNG')
    for fmt in ('json', 'dot', 'mermaid', 'svg'):
        assert b's3cret' not in topology.export(fmt)


# -- marun --graph --------------------------------------------------------------------------

@needs_dot
@pytest.mark.parametrize('fmt', ['dot', 'mermaid', 'json', 'svg', 'png'])
def test_graph_command_writes_each_format_to_a_file(fmt: str, tmp_path: Path) -> None:
    output = tmp_path / f'topology.{fmt}'
    assert graph_command([EXAMPLES], fmt, str(output)) == 0
    assert output.read_bytes() == build_graph(EXAMPLES).export(fmt)


def test_graph_command_writes_to_stdout_only_the_graph(
        capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    assert graph_command([EXAMPLES, NAMES], 'json', None) == 0
    out, _ = capsysbinary.readouterr()
    assert out == build_graph(EXAMPLES, NAMES).to_json().encode()


def test_graph_command_reports_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert graph_command(['tests_support.graph_no_such_settings'], 'json', None) == 2
    out, err = capsys.readouterr()
    assert out == ''
    assert err.startswith('marun: error: tests_support.graph_no_such_settings: cannot import')


def test_graph_command_reports_a_file_it_cannot_write(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / 'missing' / 'topology.json'
    assert graph_command([EXAMPLES], 'json', str(output)) == 1
    assert capsys.readouterr().err == (
        f'marun: error: cannot write {output}: No such file or directory\n')


@needs_dot
def test_committed_diagram_shows_the_examples() -> None:
    committed = svg_texts((ROOT / 'docs' / 'topology.svg').read_bytes())
    topology = build_graph(EXAMPLES)
    for name in (*topology.signals, *topology.queues, *(a.name for a in topology.agents),
                 *(line for a in topology.agents for line in a.schedule)):
        assert name in committed, f'{name!r} missing: regenerate docs/topology.svg'


@needs_dot
def test_png_is_not_written_to_a_terminal(tmp_path: Path) -> None:
    import pty
    controller, terminal = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, '-c', 'import microagent; microagent.run()', '--graph', 'png',
             EXAMPLES], cwd=ROOT, stdout=terminal, stderr=subprocess.PIPE, timeout=60,
            env={**os.environ, 'PYTHONPATH': str(ROOT)}, check=False)
    finally:
        os.close(terminal)
        os.close(controller)
    assert done.returncode == 2
    assert done.stderr.decode() == (
        'marun: error: --graph png is binary and standard output is a terminal: write it to '
        'a file with -o FILE (or redirect the output)\n')
    piped = subprocess.run(
        [sys.executable, '-c', 'import microagent; microagent.run()', '--graph', 'png',
         EXAMPLES], cwd=ROOT, capture_output=True, timeout=60,
        env={**os.environ, 'PYTHONPATH': str(ROOT)}, check=False)
    assert piped.returncode == 0 and piped.stdout.startswith(b'\x89PNG')


# -- marun --check ------------------------------------------------------------------------

CHECK_FINDINGS = [
    "error: settings tests_support.graph_no_such_settings: cannot import: "
    "ModuleNotFoundError: No module named 'tests_support.graph_no_such_settings'",
    "error: settings tests_support.graph_bad_receiver_settings: AGENT['misspelt']['backend']: "
    "cannot import 'tests_support.graph_bad_receiver_agent.Misspelt': "
    "SignalNotFound: no signal is declared with the name 'graph_chk_never_declared'",
    "error: agent 'sender' (tests_support.graph_check_agents.Sender) sends signal "
    "'graph_chk_typo', which is not declared",
    "error: agent 'sender' (tests_support.graph_check_agents.Sender) calls signal "
    "'graph_chk_missing_rpc', which is not declared",
    "error: agent 'sender' (tests_support.graph_check_agents.Sender) produces queue "
    "'graph_chk_nowhere', which is not declared",
    "warning: signal 'graph_chk_lonely' is sent by 'sender' but no agent receives it",
    "warning: signal 'graph_chk_unsent' is received by 'receiver' but no agent sends it",
    "warning: queue 'graph_chk_outbox' is produced by 'sender' but no agent consumes it",
    "warning: queue 'graph_chk_inbox' is consumed by 'receiver' but no agent produces it",
    "warning: queue 'graph_chk_shared' is consumed by agents of different classes, which "
    "would split its messages: 'shared_a' (tests_support.graph_check_agents.SharedA), "
    "'shared_a_replica' (tests_support.graph_check_agents.SharedA), "
    "'shared_b' (tests_support.graph_check_agents.SharedB)",
    "warning: agent 'generated': the source of tests_support.graph_check_agents.Generated "
    "is not available, what it sends, calls and produces is unknown",
]


def test_check_finds_each_kind_of_finding(capsys: pytest.CaptureFixture[str]) -> None:
    modules = [CHECK, 'tests_support.graph_no_such_settings',
               'tests_support.graph_bad_receiver_settings']
    assert check_command(modules) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == CHECK_FINDINGS
    assert '5 error(s), 6 warning(s) in 6 agent(s)' in err


def test_check_topology_of_agent_classes() -> None:
    class Lonely(MicroAgent):
        async def go(self) -> None:
            await self.bus.graph_notice.send('lonely')  # type: ignore[union-attr]

    findings = microagent.check_topology(build_graph(Lonely))
    assert [str(f) for f in findings] == [
        "warning: signal 'graph_notice' is sent by 'Lonely' but no agent receives it"]


def test_check_refuses_agent_names_used_twice(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_command([EXAMPLES, EXAMPLES]) == 1
    out, _ = capsys.readouterr()
    assert out.splitlines() == [
        f"error: agent name {name!r} is used twice ({EXAMPLES}, {EXAMPLES})"
        for name in ('user_agent', 'comment_agent', 'email_agent')]


# =====================================================================================
# AsyncAPI export and contract checks (marun --graph asyncapi, marun --check --against)
# =====================================================================================

FLEET = 'tests_support.asyncapi_fleet_settings'
EXAMPLES_SERVERS = 'examples.settings_amqp'
EXAMPLES_DSNS = {'MICROAGENT_AMQP_DSN': 'amqp://app:s3cret@127.0.0.1:5672/',
                 'MICROAGENT_REDIS_DSN': 'redis://:s3cret@127.0.0.1:6379/7'}
EXPECTED_EXAMPLES = ROOT / 'tests_support' / 'asyncapi_examples.json'
EXPECTED_FLEET = ROOT / 'tests_support' / 'asyncapi_fleet.json'
REGENERATE = ('the document changed: if the change is meant, regenerate the expected file '
              'with marun --graph asyncapi -o and review its diff')
ASYNCAPI_PARSER_VERSION = '3.6.6'  # @asyncapi/parser, the reference parser (3.x)
NPM_TIMEOUT = 240.0
NODE_TIMEOUT = 60.0
PARSE_SCRIPT = r"""
const { Parser } = require('@asyncapi/parser');
const chunks = [];
process.stdin.on('data', (chunk) => chunks.push(chunk));
process.stdin.on('end', async () => {
  const { document, diagnostics } = await new Parser().parse(Buffer.concat(chunks).toString());
  process.stdout.write(JSON.stringify({
    parsed: document !== undefined,
    diagnostics: diagnostics.map((d) => ({
      severity: d.severity, code: d.code, message: d.message, path: d.path })),
  }));
});
"""


def run_marun(args: list[str], env: dict[str, str] | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``marun ARGS`` in a process of its own (bounded), from the project root."""
    environment = {**os.environ, 'PYTHONPATH': str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, '-c', 'import microagent; microagent.run()', *args],
                          cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=timeout, check=False)


def parser_folder() -> Path:
    """Where the tests install @asyncapi/parser: a cache outside the repository."""
    cache = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache')
    return cache / 'microagent-asyncapi-parser' / ASYNCAPI_PARSER_VERSION


def install_parser(folder: Path) -> None:
    """``npm install @asyncapi/parser`` into ``folder`` (staged, then renamed into place,
    so that an interrupted install is never taken for a complete one)."""
    npm = shutil.which('npm')
    if npm is None:
        pytest.fail('node is installed but npm is not: cannot install @asyncapi/parser',
                    pytrace=False)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix='.install-', dir=folder.parent))
    try:
        done = subprocess.run(
            [npm, 'install', '--prefix', str(staging), '--no-audit', '--no-fund',
             '--ignore-scripts', '--loglevel=error',
             f'@asyncapi/parser@{ASYNCAPI_PARSER_VERSION}'],
            capture_output=True, text=True, timeout=NPM_TIMEOUT, check=False)
        if done.returncode != 0:
            pytest.fail(f'npm install @asyncapi/parser failed:\n{done.stderr}', pytrace=False)
        if not folder.exists():
            staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@pytest.fixture(scope='session')
def asyncapi_parser() -> Callable[[bytes], dict[str, Any]]:
    """Parse a document with @asyncapi/parser run by Node: ``{"parsed": bool,
    "diagnostics": [...]}``. Skipped without Node, unless MICROAGENT_REQUIRE_SERVICES
    is set (CI), where a missing Node fails."""
    node = shutil.which('node')
    if node is None:
        if os.environ.get('MICROAGENT_REQUIRE_SERVICES'):
            pytest.fail('node is not installed and MICROAGENT_REQUIRE_SERVICES is set',
                        pytrace=False)
        pytest.skip('node is not installed: the AsyncAPI reference parser cannot run')
    folder = parser_folder()
    if not (folder / 'node_modules' / '@asyncapi' / 'parser' / 'package.json').is_file():
        install_parser(folder)
    script = folder / 'parse.js'
    if not script.is_file() or script.read_text() != PARSE_SCRIPT:
        script.write_text(PARSE_SCRIPT)

    def parse(document: bytes) -> dict[str, Any]:
        done = subprocess.run([node, str(script)], input=document, capture_output=True,
                              timeout=NODE_TIMEOUT, check=False)
        assert done.returncode == 0, done.stderr.decode()
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    return parse


def parser_errors(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [d for d in result['diagnostics'] if d['severity'] == 0]


# -- the documents -----------------------------------------------------------------------

def test_examples_asyncapi_is_exactly_the_expected_document() -> None:
    done = run_marun(['--graph', 'asyncapi', EXAMPLES_SERVERS], env=EXAMPLES_DSNS)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == json.loads(EXPECTED_EXAMPLES.read_text()), REGENERATE
    assert done.stdout == EXPECTED_EXAMPLES.read_text()  # sorted keys, indented, newline
    assert 's3cret' not in done.stdout and 'app:' not in done.stdout


def test_fleet_asyncapi_is_exactly_the_expected_document(tmp_path: Path) -> None:
    expected = json.loads(EXPECTED_FLEET.read_text())
    assert build_graph(FLEET).to_asyncapi(title=FLEET) == expected, REGENERATE
    output = tmp_path / 'asyncapi.json'
    assert graph_command([FLEET], 'asyncapi', str(output)) == 0
    assert output.read_bytes() == EXPECTED_FLEET.read_bytes()
    assert b's3cret' not in output.read_bytes()
    assert all('@' not in server['host'] for server in expected['servers'].values())


def test_memory_backends_are_no_servers() -> None:
    memory = build_graph(EXAMPLES).to_asyncapi()
    with_servers = json.loads(EXPECTED_EXAMPLES.read_text())
    assert memory['servers'] == {}
    for channel in with_servers['channels'].values():
        del channel['servers']
        channel.pop('bindings', None)
    assert memory['channels'] == with_servers['channels']
    assert memory['operations'] == with_servers['operations']
    assert memory['components'] == with_servers['components']


def test_asyncapi_bytes_do_not_depend_on_the_hash_seed() -> None:
    outputs = {run_marun(['--graph', 'asyncapi', FLEET], env={'PYTHONHASHSEED': seed}).stdout
               for seed in ('1', '2')}
    assert outputs == {EXPECTED_FLEET.read_text()}


@pytest.mark.timeout(NPM_TIMEOUT + 60)
@pytest.mark.parametrize('module', [EXAMPLES, EXAMPLES_SERVERS, FLEET])
def test_reference_parser_finds_no_error(
        module: str, asyncapi_parser: Callable[[bytes], dict[str, Any]]) -> None:
    result = asyncapi_parser(build_graph(module).export('asyncapi'))
    assert parser_errors(result) == []
    assert result['parsed']


@pytest.mark.timeout(NPM_TIMEOUT + 60)
def test_reference_parser_reports_a_broken_document(
        asyncapi_parser: Callable[[bytes], dict[str, Any]]) -> None:
    document = build_graph(FLEET).to_asyncapi()
    document['operations']['shop.calls.shop_stock_level']['reply']['channel'] = {
        '$ref': '#/channels/nowhere'}
    result = asyncapi_parser(microagent.asyncapi_json(document))
    assert parser_errors(result) != []
    assert not result['parsed']


def test_agent_classes_without_settings_use_the_default_prefix() -> None:
    document = build_graph(graph_agents.RpcAgent).to_asyncapi(title='rpc', version='1.2.3')
    assert document['info']['title'] == 'rpc' and document['info']['version'] == '1.2.3'
    assert document['servers'] == {}
    assert {key: channel['address'] for key, channel in document['channels'].items()} == {
        'PUBSUB.graph_rpc_called': 'PUBSUB:graph_rpc_called:{sender}',
        'PUBSUB.graph_rpc_waited': 'PUBSUB:graph_rpc_waited:{sender}',
        'PUBSUB.response': 'PUBSUB:response:{uid}#{id}'}
    assert sorted(document['operations']) == ['RpcAgent.calls.graph_rpc_called',
                                              'RpcAgent.calls.graph_rpc_waited']


class Untyped:
    """A DTO class msgspec has no JSON Schema for."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


@dataclasses.dataclass
class Parcel:
    weight: float


def test_queue_payload_of_several_dtos_and_of_an_undescribable_one(
        names: Any, caplog: pytest.LogCaptureFixture) -> None:
    queue = Queue(names.parcels)

    class PlainConsumer(MicroAgent):
        @consumer(queue, dto_class=Untyped)
        def take(self, **kwargs: Any) -> None:
            pass

    class ParcelConsumer(MicroAgent):
        @consumer(queue, dto_class=Parcel)
        def take(self, **kwargs: Any) -> None:
            pass

    with caplog.at_level(logging.WARNING, logger='microagent.graph'):
        document = build_graph(PlainConsumer, ParcelConsumer).to_asyncapi()
    payload = document['components']['messages'][f'queue.{queue.name}']['payload']
    assert payload == {'allOf': [
        {'$ref': '#/components/schemas/Parcel'},
        {'type': 'object', 'description': f'`{__name__}.Untyped`: msgspec has no JSON '
                                          'Schema for this class.'}]}
    assert document['components']['schemas']['Parcel']['required'] == ['weight']
    assert 'Untyped' in caplog.text and 'has no JSON Schema' in caplog.text


# -- marun --check --against -------------------------------------------------------------

BREAKING = [
    "error: breaking: signal 'obsolete' on prefix 'SHOP' was removed: no agent sends or "
    "receives it any more",
    "error: breaking: signal 'order_placed' on prefix 'SHOP' lost its argument 'note'",
    "error: breaking: signal 'order_placed' on prefix 'SHOP': argument 'total' changed type "
    'from {"type":"number"} to {"type":"string"}',
    "error: breaking: signal 'stock_level' on prefix 'SHOP' is called (RPC) but no agent "
    "receives it any more: the calls get no answer",
    "error: breaking: queue 'invoices': property 'amount' changed type from "
    '{"type":"number"} to {"type":"string"}',
    "error: breaking: queue 'legacy' was removed: no agent produces or consumes it any more",
    "error: breaking: queue 'orders': its consumers now require the property 'customer'",
    "error: breaking: queue 'orders': its consumers now require the property "
    "'shipping.country'",
]


@pytest.fixture(scope='module')
def contract_v1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The contract of tests_support.asyncapi_contract_v1, written by marun in a process
    of its own (the versions declare the same names: this process imports none)."""
    path = tmp_path_factory.mktemp('contract') / 'asyncapi.json'
    done = run_marun(['--graph', 'asyncapi', '-o', str(path),
                      'tests_support.asyncapi_contract_v1'])
    assert done.returncode == 0, done.stderr
    return path


def test_against_reports_each_breaking_change_on_its_own_line(contract_v1: Path) -> None:
    done = run_marun(['--check', '--against', str(contract_v1),
                      'tests_support.asyncapi_contract_breaking'])
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert [line for line in lines if line.startswith('error:')] == BREAKING
    assert lines == [
        "warning: signal 'stock_level' is called by 'shop' but no agent receives it", *BREAKING]
    assert '8 error(s), 1 warning(s) in 3 agent(s)' in done.stderr


@pytest.mark.parametrize('version', ['asyncapi_contract_v1', 'asyncapi_contract_additive'])
def test_against_accepts_the_same_contract_and_additions(contract_v1: Path,
                                                         version: str) -> None:
    done = run_marun(['--check', '--against', str(contract_v1), f'tests_support.{version}'])
    assert (done.returncode, done.stdout) == (0, ''), done.stderr
    agents = 4 if version.endswith('additive') else 3
    assert f'0 error(s), 0 warning(s) in {agents} agent(s)' in done.stderr


def test_against_a_file_that_is_no_contract_is_an_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing, graph = tmp_path / 'missing.json', tmp_path / 'graph.json'
    graph.write_text(build_graph(EXAMPLES).to_json())
    assert check_command([EXAMPLES], str(missing)) == 1
    assert check_command([EXAMPLES], str(graph)) == 1
    assert capsys.readouterr().out.splitlines() == [
        f'error: --against {missing}: cannot read: No such file or directory',
        f'error: --against {graph}: not an AsyncAPI 3 document (write one with marun '
        '--graph asyncapi)']


def test_against_goes_with_check(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        microagent.main(['--against', 'contract.json', EXAMPLES])
    assert exited.value.code == 2
    assert '--against goes with --check' in capsys.readouterr().err


def test_breaking_changes_between_two_documents() -> None:
    old = build_graph(FLEET).to_asyncapi()
    assert microagent.breaking_changes(old, old) == []
    new = json.loads(json.dumps(old))
    del new['operations']['warehouse.receives.shop_stock_level']
    del new['channels']['shop_invoices']
    schemas = new['components']['schemas']
    schemas['Line']['properties']['quantity'] = {'type': 'string'}
    schemas['OrderDTO']['properties']['coupon']['description'] = 'annotations change nothing'
    assert microagent.breaking_changes(old, new) == [
        "signal 'shop_stock_level' on prefix 'SHOP' is called (RPC) but no agent receives "
        'it any more: the calls get no answer',
        "queue 'shop.orders': property 'lines' changed type from "
        '{"items":{"properties":{"quantity":{"type":"integer"},"sku":{"type":"string"}},'
        '"required":["sku"],"type":"object"},"type":"array"} to '
        '{"items":{"properties":{"quantity":{"type":"string"},"sku":{"type":"string"}},'
        '"required":["sku"],"type":"object"},"type":"array"}',
        "queue 'shop:invoices' was removed: no agent produces or consumes it any more",
    ]


def test_a_dsn_that_cannot_be_split_is_a_settings_error(
        tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / f'dsn_{unique}.py').write_text(textwrap.dedent('''
        BUS = {'main': {'backend': 'microagent_backends.RedisSignalBus',
                        'dsn': 'redis://[::1:6379/0'}}
        AGENT = {'user': {'backend': 'examples.user_agent.UserAgent', 'bus': 'main'}}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert graph_command([f'dsn_{unique}'], 'asyncapi', None) == 2
    out, err = capsys.readouterr()
    assert out == ''
    assert err == (f'marun: error: dsn_{unique}: BUS[\'main\']["dsn"]: Invalid IPv6 URL\n')


# =====================================================================================
# Vendoring (python -m microagent, a wrapper script) and the README
# =====================================================================================

VENDORED_APP = '''
import asyncio
import microagent
from microagent import MicroAgent, ServerInterrupt, on

class Quick(MicroAgent):
    @on('server')
    async def serve(self):
        self.log.info('QUICK ran with %s', microagent.__file__)
        await asyncio.sleep(0.1)
        raise ServerInterrupt('done')
'''


@pytest.fixture
def vendored(tmp_path: Path) -> Path:
    """A project with a copy of microagent.py, an agent and its settings."""
    shutil.copy(ROOT / 'microagent.py', tmp_path / 'microagent.py')
    (tmp_path / 'app.py').write_text(VENDORED_APP)
    (tmp_path / 'settings.py').write_text("AGENT = {'quick': {'backend': 'app.Quick'}}\n")
    (tmp_path / 'run.py').write_text('import microagent\nmicroagent.run()\n')  # no guard
    return tmp_path


@pytest.mark.parametrize('command', [['-m', 'microagent'], ['run.py']])
def test_vendored_copy_runs_like_marun(vendored: Path, command: list[str]) -> None:
    env = {key: value for key, value in os.environ.items() if key != 'PYTHONPATH'}
    done = subprocess.run([sys.executable, *command, 'settings'], cwd=vendored, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert f'QUICK ran with {vendored / "microagent.py"}' in out
    assert 'AgentsManager: quick ended (exit 0)' in out
    assert 'Traceback' not in out and 'not a MicroAgent subclass' not in out


def test_vendored_copy_draws_the_graph(vendored: Path) -> None:
    done = subprocess.run([sys.executable, '-m', 'microagent', '--graph', 'json', 'settings'],
                          cwd=vendored, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)['agents'][0]['class'] == 'app.Quick'


README = (ROOT / 'README.md').read_text()

MEMORY_APP_AGENTS = '''
import asyncio
from microagent import (MicroAgent, Queue, ServerInterrupt, Signal, consumer, on, periodic,
                        receiver)

order_paid = Signal('order_paid', {'order_id': 'number'})
invoices = Queue('invoices')


class OrdersAgent(MicroAgent):
    @periodic(period=0.1)  # a signal reaches the receivers live when it is sent
    async def sell(self):
        await self.bus.order_paid.send('orders', order_id=7)
        await self.broker.invoices.send({'order_id': 7})


class BillingAgent(MicroAgent):
    @on('pre_start')
    def setup(self):
        self.done = asyncio.Event()
        self.seen = set()

    @receiver(order_paid)
    def paid(self, order_id, **kwargs):
        self.log.info('BILLING got signal for order %s', order_id)
        self.seen.add('signal')
        if len(self.seen) == 2:
            self.done.set()

    @consumer(invoices)
    async def invoice(self, order_id):
        self.log.info('BILLING got invoice for order %s', order_id)
        self.seen.add('invoice')
        if len(self.seen) == 2:
            self.done.set()

    @on('server')
    async def until_done(self):
        await asyncio.wait_for(self.done.wait(), 10)
        raise ServerInterrupt('both arrived')
'''


def readme_block(heading: str, first_line: str) -> str:
    """The code block of the README section ``heading`` that starts with ``first_line``."""
    section = README.split(f'\n{heading}\n', 1)[1].split('\n## ', 1)[0]
    blocks = re.findall(r'```\w*\n(.*?)```', section, re.DOTALL)
    return next(block for block in blocks if block.startswith(first_line))


def test_readme_memory_app_runs_and_the_limit_of_memory_is_said(tmp_path: Path) -> None:
    settings = readme_block('### Which backend?', '# myapp/settings.py')
    assert "'microagent.MemorySignalBus'" in settings and "'microagent.MemoryBroker'" in settings
    (tmp_path / 'myapp').mkdir()
    (tmp_path / 'myapp' / '__init__.py').write_text('')
    (tmp_path / 'myapp' / 'settings.py').write_text(settings)
    (tmp_path / 'myapp' / 'agents.py').write_text(MEMORY_APP_AGENTS)
    code, out = run_marun_in(['myapp.settings'], tmp_path)
    assert code == 0, out
    assert 'BILLING got signal for order 7' in out and 'BILLING got invoice for order 7' in out
    assert 'orders, billing share a memory:// bus or broker and run in one process' in out
    section = README.split('\n### Which backend?\n', 1)[1].split('\n## ', 1)[0]
    assert 'reach only the process they live in' in ' '.join(section.split())


def test_readme_install_commands_work_from_a_checkout() -> None:
    arguments = [argument.strip("'\"")
                 for command in re.findall(r'pip install ([^`\n&]+)', README)
                 for argument in command.split() if not argument.startswith('-')]
    assert len(arguments) >= 5
    by_name = {argument for argument in arguments if not argument.startswith(('.', '/'))}
    assert by_name == {'graphviz', 'microagent'}  # microagent: only where it says not to
    assert ('`pip install microagent` would fetch the unrelated 1.x package'
            in ' '.join(README.split()))


# =====================================================================================
# Singleton timers and servers, on memory:// — agents in one process
# =====================================================================================
# Each agent has its own MemorySignalBus on one hub, as replicas have their own
# connection to one Redis. The same semantics on Redis, with real processes, are tested
# in test_microagent_backends.py.

import itertools  # noqa: E402

from microagent import PeriodicTask  # noqa: E402


class CutBus(MemorySignalBus):
    """A memory bus whose singleton calls fail while ``cut`` is set (server unreachable)."""

    cut = False

    def _check(self) -> None:
        if self.cut:
            raise ConnectionError('the bus is cut')

    async def claim_tick(self, key: str, tick_ms: int, holder: str, ttl: float) -> bool:
        self._check()
        return await super().claim_tick(key, tick_ms, holder, ttl)

    async def acquire_lease(self, key: str, holder: str, ttl: float) -> str | None:
        self._check()
        return await super().acquire_lease(key, holder, ttl)

    async def renew_lease(self, key: str, token: str, ttl: float) -> bool:
        self._check()
        return await super().renew_lease(key, token, ttl)

    async def release_lease(self, key: str, token: str) -> bool:
        self._check()
        return await super().release_lease(key, token)


def singleton_agent_class(period: float = 0.2, spec: str | None = None) -> type[MicroAgent]:
    """An agent class with a singleton timer (periodic, or cron when ``spec``) that
    records ``(tick, id(agent))``: the tick as its number on the agent's own clock."""

    class Ticking(MicroAgent):
        runs: list[tuple[int, int]] = []

        def record(self, task: Any, gap: float) -> None:
            self.runs.append((round(task.clock() / gap), id(self)))

    if spec is None:
        class Periodic(Ticking):
            @periodic(period, singleton=True)
            def tick(self) -> None:
                self.record(self.periodic_tasks[0], period)
        return Periodic

    class Cron(Ticking):
        @cron(spec, singleton=True)
        def tick(self) -> None:
            self.record(self.cron_tasks[0], 1.0)
    return Cron


async def run_agents(agents: list[MicroAgent], seconds: float) -> None:
    for agent in agents:
        await agent.start()
    try:
        await asyncio.sleep(seconds)
    finally:
        for agent in agents:
            await agent.stop()


def test_singleton_arguments_are_checked() -> None:
    for bad in ('', ' key', 1, None):
        with pytest.raises(TypeError, match='singleton must be'):
            periodic(1, singleton=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"singleton is for @on\('server'\)"):
        on('pre_start', singleton=True)
    cron('* * * * * */10', singleton='reports')  # croniter's 6th field: seconds
    with pytest.raises(ValueError, match='6 with the seconds last'):
        cron('* * * * * * *')


def test_singleton_handlers_are_refused_without_a_bus(unique: str) -> None:
    class Timer(MicroAgent):
        @periodic(1, singleton=True)
        def tick(self) -> None: ...

    class Reports(MicroAgent):
        @cron('@daily', singleton='reports')
        def report(self) -> None: ...

    class Leader(MicroAgent):
        @on('server', singleton=True)
        async def lead(self) -> None: ...

    for agent_class, method in ((Timer, 'tick'), (Reports, 'report'), (Leader, 'lead')):
        with pytest.raises(SignalException, match=rf'singleton handlers \({method}\) but no bus'):
            agent_class()
        agent_class(bus=MemorySignalBus(f'memory://{unique}'))  # with a bus: accepted
    with pytest.raises(ValueError, match='LEASE_TTL of <MemorySignalBus'):
        Leader(bus=MemorySignalBus(f'memory://{unique}', LEASE_TTL=0))

    class Plain(MicroAgent):
        @periodic(1)
        def tick(self) -> None: ...

        @on('server')
        async def serve(self) -> None: ...
    Plain()  # no singleton, no bus needed


def test_singleton_periodic_ticks_are_the_multiples_of_the_period(unique: str) -> None:
    agent = singleton_agent_class(period=0.3)(bus=MemorySignalBus(f'memory://{unique}'))
    task = agent.periodic_tasks[0]
    assert isinstance(task, PeriodicTask)
    assert task.singleton == f'{__name__}.singleton_agent_class.<locals>.Periodic.tick'
    for moment, expected in ((0.0, 0.3), (0.3, 0.6), (0.9, 1.2), (1.0, 1.2),
                             (1_700_000_000.1, 1_700_000_000.4)):
        tick = task.tick_after(moment)
        assert tick > moment and abs(tick - expected) < 1e-6, (moment, tick)
        assert abs(tick / 0.3 - round(tick / 0.3)) < 1e-6
    cron_task = singleton_agent_class(spec='* * * * * */15')(
        bus=MemorySignalBus(f'memory://{unique}')).cron_tasks[0]
    assert cron_task.tick_after(1_700_000_000.0) == 1_700_000_010.0  # :20 -> :30
    assert cron_task.tick_after(1_700_000_010.0) == 1_700_000_025.0


async def test_singleton_periodic_runs_each_tick_once_across_agents(unique: str) -> None:
    agent_class = singleton_agent_class(period=0.2)
    agents = [agent_class(bus=MemorySignalBus(f'memory://{unique}')) for _ in range(3)]
    await run_agents(agents, 2.1)
    ticks = [tick for tick, _ in agent_class.runs]  # type: ignore[attr-defined]
    assert len(ticks) == len(set(ticks)), f'a tick ran twice: {sorted(ticks)}'
    assert len(ticks) >= 8
    assert max(ticks) - min(ticks) + 1 - len(ticks) <= 1  # at most one tick missed


async def test_singleton_cron_runs_each_tick_once_across_agents(unique: str) -> None:
    agent_class = singleton_agent_class(spec='* * * * * *')  # every second
    agents = [agent_class(bus=MemorySignalBus(f'memory://{unique}')) for _ in range(3)]
    await run_agents(agents, 3.2)
    ticks = [tick for tick, _ in agent_class.runs]  # type: ignore[attr-defined]
    assert len(ticks) == len(set(ticks)) >= 3, sorted(ticks)


async def test_singleton_ticks_do_not_run_twice_with_skewed_clocks(unique: str) -> None:
    agent_class = singleton_agent_class(period=0.4)
    agents = [agent_class(bus=MemorySignalBus(f'memory://{unique}')) for _ in range(3)]
    # clocks 0.18 s apart at most (< 0.2, half the period): the early one claims first
    for agent, offset in zip(agents, (0.09, 0.0, -0.09), strict=True):
        agent.periodic_tasks[0].clock = (  # type: ignore[method-assign]
            lambda offset=offset: time.time() + offset)
    await run_agents(agents, 2.5)
    runs = agent_class.runs  # type: ignore[attr-defined]
    ticks = [tick for tick, _ in runs]
    assert len(ticks) == len(set(ticks)) >= 5, sorted(ticks)
    assert sum(who == id(agents[0]) for _, who in runs) >= 0.75 * len(runs)


async def test_singleton_tick_noticed_late_is_skipped_not_run_twice(
        unique: str, caplog: pytest.LogCaptureFixture) -> None:
    agent_class = singleton_agent_class(period=0.2)
    agent = agent_class(bus=MemorySignalBus(f'memory://{unique}'))
    offset = [0.0]
    agent.periodic_tasks[0].clock = lambda: time.time() + offset[0]  # type: ignore[method-assign]
    await agent.start()
    try:
        await eventually(lambda: len(agent_class.runs) >= 1)  # type: ignore[attr-defined]
        offset[0] = 0.15  # the next tick is noticed 0.15 s late: more than half of 0.2
        await eventually(lambda: 'skipped the tick of' in caplog.text
                         and len(agent_class.runs) >= 2)  # type: ignore[attr-defined]
    finally:
        await agent.stop()
    assert re.search(r'skipped the tick of \S+: it came 0\.1[45]\ds late', caplog.text)
    ticks = [tick for tick, _ in agent_class.runs]  # type: ignore[attr-defined]
    assert len(ticks) == len(set(ticks)) >= 2


async def test_singleton_tick_is_skipped_with_one_warning_while_the_bus_fails(
        unique: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger='microagent')
    agent_class = singleton_agent_class(period=0.1)
    agent = agent_class(bus=CutBus(f'memory://{unique}'))
    assert isinstance(agent.bus, CutBus)
    agent.bus.cut = True
    await agent.start()
    try:
        await asyncio.sleep(0.55)
        assert agent_class.runs == []  # type: ignore[attr-defined]
        assert caplog.text.count('claiming it on the bus failed (the bus is cut)') == 1
        agent.bus.cut = False
        await eventually(lambda: len(agent_class.runs) >= 2)  # type: ignore[attr-defined]
    finally:
        await agent.stop()
    assert re.search(r'claims ticks again, after [4-6] skipped', caplog.text)


def leader_agent_class() -> type[MicroAgent]:
    """An agent class with a singleton server that records when it runs."""

    class Leader(MicroAgent):
        events: list[tuple[str, int, float]] = []  # ('start' | 'end', id(agent), monotonic)
        running: set[int] = set()

        @on('server', singleton=True)
        async def lead(self) -> None:
            self.events.append(('start', id(self), time.monotonic()))
            self.running.add(id(self))
            try:
                await asyncio.sleep(3600)
            finally:
                self.running.discard(id(self))
                self.events.append(('end', id(self), time.monotonic()))
    return Leader


def intervals(events: list[tuple[str, int, float]]) -> list[tuple[float, float, int]]:
    """The (start, end, who) of each run of a server, by start; open ones end at +inf."""
    starts: dict[int, float] = {}
    found = []
    for kind, who, at in events:
        if kind == 'start':
            assert who not in starts, 'started twice'
            starts[who] = at
        else:
            found.append((starts.pop(who), at, who))
    found += [(at, float('inf'), who) for who, at in starts.items()]
    return sorted(found)


def assert_no_overlap(events: list[tuple[str, int, float]]) -> None:
    runs = intervals(events)
    for (_, end, who), (start, _, other) in itertools.pairwise(runs):
        assert end <= start, f'{who} ran until {end}, {other} started at {start}'


async def test_singleton_server_runs_on_one_agent_and_moves_on_a_graceful_stop(
        unique: str) -> None:
    agent_class = leader_agent_class()
    running: set[int] = agent_class.running  # type: ignore[attr-defined]
    agents = [agent_class(bus=MemorySignalBus(f'memory://{unique}', LEASE_TTL=0.3))
              for _ in range(3)]
    for agent in agents:
        await agent.start()
    try:
        await eventually(lambda: len(running) == 1)
        for _ in range(30):  # 0.6 s, several renewals
            assert len(running) == 1
            await asyncio.sleep(0.02)
        [holder] = [a for a in agents if id(a) in running]
        first = holder.lease_token('lead')
        assert isinstance(first, int)
        assert [a.lease_token('lead') for a in agents if a is not holder] == [None, None]
        stopped = time.monotonic()
        await holder.stop()
        await eventually(lambda: len(running) == 1, timeout=0.1 + 0.1)  # one renew interval
        took_over = agent_class.events[-1]  # type: ignore[attr-defined]
        assert took_over[0] == 'start' and took_over[2] - stopped <= 0.1 + 0.1
        [successor] = [a for a in agents if id(a) in running]
        assert (successor.lease_token('lead') or 0) > first
    finally:
        for agent in agents:
            await agent.stop()
    assert running == set()
    assert_no_overlap(agent_class.events)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match='not a singleton server'):
        agents[0].lease_token('start')


async def test_singleton_server_of_a_dead_holder_is_taken_over_after_its_lease(
        unique: str) -> None:
    agent_class = leader_agent_class()
    running: set[int] = agent_class.running  # type: ignore[attr-defined]
    ttl = 0.3
    agents = [agent_class(bus=MemorySignalBus(f'memory://{unique}', LEASE_TTL=ttl))
              for _ in range(3)]
    for agent in agents:
        await agent.start()
    try:
        await eventually(lambda: len(running) == 1)
        [holder] = [a for a in agents if id(a) in running]
        assert holder.bus is not None

        async def vanish(key: str, token: str) -> bool:  # a dead process releases nothing
            return False
        holder.bus.release_lease = vanish  # type: ignore[method-assign]
        died = time.monotonic()
        await holder.stop()
        await eventually(lambda: len(running) == 1, timeout=ttl + ttl / 3 + 0.2)
        took_over = agent_class.events[-1][2] - died  # type: ignore[attr-defined]
        assert ttl - ttl / 3 <= took_over <= ttl + ttl / 3 + 0.1
    finally:
        for agent in agents:
            await agent.stop()
    assert_no_overlap(agent_class.events)  # type: ignore[attr-defined]


async def test_singleton_server_cut_from_its_bus_stops_before_its_lease_ends(
        unique: str, caplog: pytest.LogCaptureFixture) -> None:
    agent_class = leader_agent_class()
    running: set[int] = agent_class.running  # type: ignore[attr-defined]
    ttl = 0.6
    first = agent_class(bus=CutBus(f'memory://{unique}', LEASE_TTL=ttl))
    await first.start()
    others = [agent_class(bus=MemorySignalBus(f'memory://{unique}', LEASE_TTL=ttl))
              for _ in range(2)]
    try:
        await eventually(lambda: id(first) in running)
        for agent in others:
            await agent.start()
        await asyncio.sleep(0.25)
        assert isinstance(first.bus, CutBus)
        expiry = microagent._BusHub.hubs[unique].leases[first.leased_servers['lead'].key][1]
        first.bus.cut = True
        await eventually(lambda: id(first) not in running, timeout=ttl, interval=0.002)
        assert time.monotonic() < expiry - ttl / 3 + 0.1  # cancelled well before it expired
        assert first.lease_token('lead') is None
        await eventually(lambda: len(running) == 1, timeout=ttl + ttl / 3 + 0.1)
        assert time.monotonic() >= expiry  # nobody took it before it expired
        first.bus.cut = False  # back: it waits as a candidate, it does not run twice
        await asyncio.sleep(0.5)
        assert len(running) == 1 and id(first) not in running
    finally:
        for agent in (first, *others):
            await agent.stop()
    assert 'cancels its server: its lease could not be renewed in time' in caplog.text
    assert_no_overlap(agent_class.events)  # type: ignore[attr-defined]


async def test_singleton_server_that_lost_its_lease_is_cancelled(
        unique: str, caplog: pytest.LogCaptureFixture) -> None:
    agent_class = leader_agent_class()
    running: set[int] = agent_class.running  # type: ignore[attr-defined]
    agent = agent_class(bus=MemorySignalBus(f'memory://{unique}', LEASE_TTL=0.3))
    await agent.start()
    try:
        await eventually(lambda: len(running) == 1)
        key = agent.leased_servers['lead'].key
        microagent._BusHub.hubs[unique].leases[key] = ('99:someone', time.monotonic() + 9)
        await eventually(lambda: not running, timeout=0.1 + 0.05)
        assert 'its lease was lost to another agent' in caplog.text
        del microagent._BusHub.hubs[unique].leases[key]
        await eventually(lambda: len(running) == 1, timeout=0.1 + 0.05)
        assert agent.lease_token('lead') == 2  # a new lease: the next fencing token
    finally:
        await agent.stop()


async def test_singleton_server_that_returns_releases_its_lease(unique: str) -> None:
    runs: list[int] = []

    class Once(MicroAgent):
        @on('server', singleton='once-' + unique)
        async def work(self) -> None:
            runs.append(id(self))
            await asyncio.sleep(0.05)

    agents = [Once(bus=MemorySignalBus(f'memory://{unique}', LEASE_TTL=0.3)) for _ in range(2)]
    await run_agents(agents, 0.4)
    assert sorted(runs) == sorted(id(a) for a in agents)  # one after the other
    assert microagent._BusHub.hubs[unique].leases == {}


async def test_singleton_server_interrupt_still_stops_the_agent(unique: str) -> None:
    class Leader(MicroAgent):
        @on('server', singleton=True)
        async def lead(self) -> None:
            raise ServerInterrupt('done')

    agent = Leader(bus=MemorySignalBus(f'memory://{unique}', LEASE_TTL=0.3))
    await agent.start()
    await asyncio.wait_for(agent.wait(), WAIT)
    assert microagent._BusHub.hubs[unique].leases == {}


def test_singletons_show_in_info_and_graph(unique: str) -> None:
    class Singletons(MicroAgent):
        @periodic(5, singleton=True)
        def tick(self) -> None: ...

        @cron('0 4 * * *', singleton='nightly-report')
        def report(self) -> None: ...

        @on('server', singleton=True)
        async def lead(self) -> None: ...

        @on('server')
        async def serve(self) -> None: ...

    info = Singletons(bus=MemorySignalBus(f'memory://{unique}')).info()
    prefix = f'{__name__}.{Singletons.__qualname__}'
    assert info['singletons'] == [
        {'name': 'lead', 'kind': 'server', 'key': f'{prefix}.lead'},
        {'name': 'report', 'kind': 'cron', 'key': 'nightly-report'},
        {'name': 'tick', 'kind': 'periodic', 'key': f'{prefix}.tick'}]
    assert 'singletons' not in graph_agents.RpcAgent().info()
    topology = build_graph(Singletons, graph_agents.InheritingAgent)
    data = json.loads(topology.to_json())
    by_name = {agent['name']: agent for agent in data['agents']}
    assert by_name['Singletons']['singletons'] == ['lead', 'report', 'tick']
    assert 'singletons' not in by_name['InheritingAgent']
    node = next(a for a in topology.agents if a.name == 'Singletons')
    assert node.schedule == ('periodic tick (every 5 s, singleton)',
                             'cron report (0 4 * * *, singleton nightly-report)',
                             'server lead (singleton)', 'server serve')
    assert 'server lead (singleton)' in topology.to_mermaid()


async def test_bus_without_singleton_support_skips_ticks_with_a_warning(
        unique: str, caplog: pytest.LogCaptureFixture) -> None:
    agent_class = singleton_agent_class(period=0.1)
    agent = agent_class(bus=BusMock())
    await run_agents([agent], 0.25)
    assert agent_class.runs == []  # type: ignore[attr-defined]
    assert 'BusMock cannot coordinate singleton handlers' in caplog.text


# =====================================================================================
# Fleet supervision: replicas, restart policy, /livez /readyz /status /metrics
# (memory backends only; the tests on Redis are in test_microagent_backends.py)
# =====================================================================================

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tests_support.fleet_marun import Marun  # noqa: E402

FLEET_MEMORY = 'tests_support.fleet_memory_settings'
STATUS_KEYS = {'name', 'replica', 'pid', 'state', 'restarts', 'connected', 'consumers',
               'timers', 'servers', 'uptime', 'connections', 'signals', 'signals_dropped'}
CONSUMER_KEYS = {'queue', 'handled', 'retried', 'dead_lettered', 'in_flight', 'last_fetch_age',
                 'depth', 'delayed', 'dead', 'rate'}


def test_fleet_http_serves_livez_readyz_status_metrics_and_404() -> None:
    with Marun([FLEET_MEMORY]) as fleet:
        status = fleet.ready()
        assert fleet.get('/livez') == (200, b'ok\n')
        assert fleet.readyz() == (200, {'ready': True})
        (ticker,) = status['agents']
        assert set(ticker) == STATUS_KEYS
        assert ticker['name'] == 'ticker' and ticker['replica'] == 1
        assert ticker['state'] == 'running' and ticker['restarts'] == 0
        assert ticker['connected'] is True and ticker['consumers'] == []
        assert isinstance(ticker['pid'], int) and ticker['pid'] != fleet.process.pid
        fleet.wait_for(lambda: fleet.total('microagent_handler_seconds_count', kind='periodic',
                                           name='Ticker.tick') >= 3, 10, 'three ticks')
        _, body = fleet.get('/metrics')
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        assert {'microagent_messages', 'microagent_handler_seconds',
                'microagent_signals_sent', 'microagent_signals_received',
                'microagent_in_flight', 'microagent_restarts', 'microagent_up'} <= set(families)
        kinds = {s.labels['kind'] for s in families['microagent_handler_seconds'].samples}
        assert kinds == {'periodic', 'receiver', 'rpc_call'}
        assert fleet.total('microagent_signals_sent', agent='ticker', signal='fleet_tick') >= 2
        assert fleet.total('microagent_signals_received', signal='fleet_tick') >= 2
        assert fleet.total('microagent_up', agent='ticker', replica='1') == 1
        (timer,) = fleet.status()['agents'][0]['timers']
        assert timer['name'] == 'Ticker.tick' and timer['kind'] == 'periodic'
        assert timer['last_run'] > time.time() - 5 and timer['last_error'] is None
        assert timer['singleton'] is None and ticker['servers'] == []
        for path in ('/nope', '/status/x', '/metricsz', '/index.html'):
            assert fleet.get(path)[0] == 404
        assert fleet.stop() == 0
    assert 'Traceback' not in fleet.output


def test_fleet_http_on_a_port_in_use_is_a_one_line_error() -> None:
    with socket_listening() as port, Marun([FLEET_MEMORY], http=False,
                                           args=['--http', f'127.0.0.1:{port}']) as fleet:
        assert fleet.wait(30) == 2
        out = fleet.output
    assert out == f'marun: error: --http 127.0.0.1:{port}: Address already in use\n'


@contextlib.contextmanager
def socket_listening() -> Iterator[int]:
    import socket

    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize('spec', ['8080', 'localhost', 'localhost:http', ':8080',
                                  '127.0.0.1:99999'])
def test_fleet_http_address_must_be_host_and_port(spec: str) -> None:
    done = subprocess.run([sys.executable, '-c', 'import microagent; microagent.run()',
                           '--http', spec, FLEET_MEMORY], cwd=ROOT, capture_output=True,
                          check=False, text=True, timeout=60)
    assert done.returncode == 2
    assert f"--http: {spec!r} is not HOST:PORT" in done.stderr


def test_fleet_pre_start_failure_is_restarted_then_given_up() -> None:
    with Marun([FLEET_MEMORY], env={'FLEET_BROKEN': '1', 'FLEET_RESTART': 'on-failure'},
               http=False) as fleet:
        started = time.monotonic()
        assert fleet.wait(90) == 1
        took = time.monotonic() - started
        out = fleet.output
    # delays 1, 2, 4, 8 and 16 s: the sixth failure comes after about 31 s
    assert 30 < took < 60, (took, out)
    assert out.count('AgentsManager: restarted broken on pid#') == 5, out
    for delay in (1, 2, 4, 8, 16):
        assert f'restarting it in {delay}s (restart: on-failure)' in out, out
    (reason,) = [line for line in out.splitlines() if 'giving up' in line]
    assert reason.endswith('AgentsManager: giving up on broken: it ended again (exit 1) '
                           'after 5 restarts within 60s (restart: on-failure); stopping the '
                           'group'), reason
    assert 'AgentProc[ticker]: stopped' in out and 'AgentsManager: stopped' in out


def test_fleet_group_stop_reaching_a_process_still_loading_its_settings_stops_it_cleanly(
        ) -> None:
    """The broken agent ends while the ticker's process still imports its settings: the
    ticker is stopped as any other (before, SIGTERM's default action killed it)."""
    env = {'FLEET_BROKEN': '1', 'FLEET_SLOW_TICKER': '1.5'}
    with Marun([FLEET_MEMORY], env=env, http=False) as fleet:
        assert fleet.wait(60) == 1
        out = fleet.output
    assert 'AgentsManager: broken ended (exit 1), stopping the group' in out
    assert 'AgentProc[ticker]: caught SIGTERM, stopping' in out, out
    assert 'AgentProc[ticker]: stopped' in out and 'killed by SIGTERM' not in out, out


def test_fleet_restart_no_keeps_one_ending_process_stopping_the_group() -> None:
    with Marun([FLEET_MEMORY], env={'FLEET_BROKEN': '1'}, http=False) as fleet:
        assert fleet.wait(60) == 1
        out = fleet.output
    assert 'AgentsManager: broken ended (exit 1), stopping the group' in out
    assert 'restarting it in' not in out and 'AgentProc[ticker]: stopped' in out


def test_fleet_sigkilled_process_is_restarted_with_on_failure(tmp_path: Path) -> None:
    with Marun([FLEET_MEMORY], args=['--restart', 'on-failure']) as fleet:
        before = fleet.ready()['agents'][0]
        fleet.wait_for(lambda: fleet.total('microagent_signals_sent') >= 4, 10, 'signals')
        sent = fleet.total('microagent_signals_sent')
        os.kill(before['pid'], signal.SIGKILL)
        fleet.wait_for(lambda: fleet.readyz()[0] == 503, 5, 'not ready')
        _, body = fleet.readyz()
        assert body['reasons'][0].startswith('ticker: restarting (killed by SIGKILL')
        after = fleet.ready(10)['agents'][0]
        assert after['pid'] != before['pid'] and after['restarts'] == 1
        assert fleet.total('microagent_restarts', agent='ticker') == 1
        assert fleet.total('microagent_signals_sent') >= sent  # kept over the restart
        assert fleet.stop() == 0


@pytest.mark.parametrize(('policy', 'restarted'), [('on-failure', False), ('always', True)])
def test_fleet_clean_exit_is_restarted_only_with_always(tmp_path: Path, unique: str,
                                                        policy: str, restarted: bool) -> None:
    module = write_settings(tmp_path, unique, {
        'quitter': {'backend': f'pkg_{unique}.agents.Quitter', 'restart': policy},
        'worker': {'backend': f'pkg_{unique}.agents.Worker', 'broker': 'own'},
    })
    with Marun([module], cwd=tmp_path) as fleet:
        fleet.wait_for(lambda: 'quitter ended (exit 0)' in fleet.output, 20, 'the quitter')
        if restarted:
            fleet.wait_for(lambda: 'restarted quitter' in fleet.output, 10, 'a restart')
        else:
            time.sleep(1.5)
            agents = {a['name']: a for a in fleet.status()['agents']}
            assert agents['quitter']['state'] == 'stopped'
            assert agents['quitter']['pid'] is None
            assert agents['worker']['state'] == 'running'
            assert fleet.readyz() == (503, {'ready': False,
                                            'reasons': ['quitter: stopped (exit 0)']})
        assert fleet.stop() == 0
    assert ('restarted quitter' in fleet.output) is restarted


@pytest.mark.parametrize(('entry', 'error'), [
    ({'replicas': 2}, "AGENT['w']['replicas']: 2 replicas of an agent on a memory:// backend "
                      "(broker:memory://UNIQUE) cannot work: memory reaches its own process only"),
    ({'replicas': 0}, "AGENT['w']['replicas']: must be an int >= 1, not 0"),
    ({'replicas': '3'}, "AGENT['w']['replicas']: must be an int >= 1, not '3'"),
    ({'restart': 'sometimes'}, "AGENT['w']['restart']: must be 'no', 'on-failure' or "
                               "'always', not 'sometimes'"),
])
def test_fleet_bad_replicas_and_restart_are_settings_errors(
        tmp_path: Path, unique: str, entry: dict[str, Any], error: str) -> None:
    module = write_settings(tmp_path, unique, {
        'w': {'backend': f'pkg_{unique}.agents.Worker', 'broker': 'own', **entry}})
    code, out = finish(marun([module], tmp_path))
    assert code == 2, out
    assert out.strip() == f'marun: error: {module}: {error.replace("UNIQUE", unique)}'


def test_fleet_agents_sharing_a_memory_process_need_one_restart_policy(
        tmp_path: Path, unique: str) -> None:
    module = write_settings(tmp_path, unique, {
        'a': {'backend': f'pkg_{unique}.agents.Worker', 'broker': 'shared',
              'restart': 'always'},
        'b': {'backend': f'pkg_{unique}.agents.Producer', 'broker': 'shared'},
    })
    code, out = finish(marun([module, '--restart', 'on-failure'], tmp_path))
    assert code == 2, out
    assert out.strip() == ("marun: error: agents sharing a memory:// process need one restart "
                           "policy, not a: 'always', b: 'on-failure'")


def test_fleet_run_keys_are_not_passed_to_the_agent(names: Any) -> None:
    agent = microagent.init_agent('microagent.MicroAgent',
                                  {'replicas': 3, 'restart': 'always', 'settings': {'x': 1}})
    assert agent.settings == {'x': 1}


# -- in one process: the counters, the handler times, the stall check -------------------

@pytest.fixture
def handler_timing() -> Iterator[None]:
    microagent.enable_handler_timing()
    try:
        yield
    finally:
        microagent.enable_handler_timing(False)


def test_fleet_handler_times_count_in_buckets() -> None:
    times = microagent.HandlerTimes()
    for seconds in (0.0001, 0.0005, 0.0006, 0.02, 100.0):
        times.observe(seconds)
    assert times.counts[:2] == [2, 1] and times.counts[5] == 1 and times.counts[-1] == 1
    assert sum(times.counts) == 5 and times.total == pytest.approx(100.0212)
    assert microagent.handler_timing() is None  # off by default


async def test_fleet_pool_counts_outcomes_and_times_handlers(
        names: Any, handler_timing: None) -> None:
    broker = MemoryBroker(f'memory://{names.q}', RETRY_BACKOFF=0)
    queue = Queue(names.q)

    class Flaky(MicroAgent):
        @consumer(queue, retries=1)
        async def handle(self, n: int) -> None:
            if n == 2:
                raise ValueError('no')

    agent = Flaky(broker=broker)
    await agent.start()
    pool = broker.pools[names.q]
    assert pool.last_fetch is None and pool.timing is not None
    await getattr(broker, names.q).send_many([{'n': 1}, {'n': 2}, {'n': 3}])
    await eventually(lambda: pool.handled == 2 and pool.dead_lettered == 1)
    assert pool.retried == 1 and pool.in_flight == 0 and pool.last_fetch is not None
    assert sum(pool.timing.counts) == 4  # two successes, two failed attempts
    await agent.stop()
    assert pool.released == 0


class NeverFetching(MemoryBroker):
    """A memory broker whose consumer never takes anything (a stalled fetch)."""

    async def _consume(self, name: str, pool: Any) -> None:
        await asyncio.Event().wait()


@contextlib.asynccontextmanager
async def monitored_idle_consumer(broker: MemoryBroker, name: str
                                  ) -> AsyncIterator[tuple[Any, asyncio.Future[None]]]:
    """An agent consuming ``name`` on ``broker`` under a ProcessMonitor, with one message
    waiting; yields the monitor and the future it resolves to stop the process."""
    class Idle(MicroAgent):
        @consumer(Queue(name))
        async def handle(self, **kwargs: Any) -> None:
            pass

    agent = Idle(broker=broker)
    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    monitor = microagent.ProcessMonitor('idle', stop, None)
    monitor.agents.append(('idle', agent))
    task = asyncio.get_running_loop().create_task(monitor.run())
    await agent.start()
    monitor.running()
    await getattr(broker, name).send({'n': 1})
    try:
        yield monitor, stop
    finally:
        await monitor.close(task)
        await agent.stop()


async def test_fleet_monitor_finds_a_stalled_consumer_and_stops_the_process(
        names: Any, caplog: pytest.LogCaptureFixture) -> None:
    broker = NeverFetching(f'memory://{names.q}', STALL_TIMEOUT=0.5)
    async with monitored_idle_consumer(broker, names.q) as (monitor, stop):
        await asyncio.wait_for(asyncio.shield(stop), 5)
        assert monitor.stalled
        messages = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any('is stalled: connected, with room, 1 messages waiting' in m
                   for m in messages), messages


async def test_fleet_monitor_never_calls_a_lost_connection_a_stall(names: Any) -> None:
    broker = NeverFetching(f'memory://{names.q}', STALL_TIMEOUT=0.2)
    broker.link('consume').lost('connection reset')
    async with monitored_idle_consumer(broker, names.q) as (monitor, stop):
        await asyncio.sleep(1.5)  # several stall checks: none may fire
        assert not monitor.stalled and not stop.done()


def test_fleet_view_never_shows_a_password() -> None:
    import types

    managed = microagent.ManagedProcess('mailer[1]', ['mailer'], 1, 2, 'on-failure')
    managed.process = types.SimpleNamespace(pid=4242, exitcode=None)
    managed.state = 'running'
    managed.reported = time.monotonic()
    link = microagent.LinkReport('AMQPBroker amqp://shop:***@rabbit/', 'consume mails',
                                 False, 'cannot reach amqp://shop:s3cret@rabbit/: refused')
    timer = microagent.TimerReport('periodic', 'Mailer.flush', time.time(),
                                   'ConnectionError: redis://:s3cret@cache:6379/0 is down')
    managed.report = microagent.ProcessReport('running', [microagent.AgentReport(
        'mailer', [link], [], [timer], [], {}, {})])
    view = microagent.FleetView([managed], lambda: False)
    (reason,) = view.reasons()
    assert reason == ("mailer[1]: AMQPBroker amqp://shop:***@rabbit/: connection 'consume "
                      "mails' is down (cannot reach amqp://shop:***@rabbit/: refused)")
    status = json.dumps(view.status())
    assert 's3cret' not in status and 'redis://:***@cache:6379/0' in status
    (agent,) = view.status()['agents']
    assert agent['name'] == 'mailer' and agent['replica'] == 1 and agent['pid'] == 4242
    assert agent['connected'] is False
