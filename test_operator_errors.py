"""What a user sees for each mistake and outage: a settings typo is one line with "did
you mean" before any process starts (exit 2, never restarted), an unreachable server is
one log line without a traceback, refused credentials fail fast, a refused command is
not an outage, consumers are back soon after the server, a dead letter keeps its
trace."""
from __future__ import annotations

import asyncio
import itertools
import logging
import textwrap
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from conftest import RedisServer, eventually, free_port, redis_server
from microagent import (
    CredentialsRefused,
    ManagedProcess,
    MemoryBroker,
    MemorySignalBus,
    MicroAgent,
    Queue,
    QueueException,
    QueueNotFound,
    SerializingError,
    Signal,
    SignalNotFound,
    _state_detail,
    consumer,
    periodic,
    receiver,
    reconnect_delays,
)
from microagent_backends import AMQPBroker, KafkaBroker, RedisBroker
from test_microagent_backends import run_marun
from test_tracing import Spans, is_child, span_exporter, spans, tracer  # noqa: F401 - fixtures


def write_app(tmp_path: Path, unique: str, settings: str, agents: str = '') -> str:
    """An agents module and a settings module in ``tmp_path``; the settings' name."""
    (tmp_path / f'agents_{unique}.py').write_text(textwrap.dedent(agents or f'''
        from microagent import MicroAgent, Queue, consumer

        work = Queue('work_{unique}')

        class Worker(MicroAgent):
            @consumer(work, prefetc=3)
            async def handle(self, **message):
                pass
    '''))
    (tmp_path / f'settings_{unique}.py').write_text(textwrap.dedent(settings))
    return f'settings_{unique}'


AMQP_BROKER = "{'backend': 'microagent_backends.AMQPBroker', 'dsn': 'amqp://guest:guest@127.0.0.1:5672/'}"
MEMORY_BROKER = "{'backend': 'microagent.MemoryBroker', 'dsn': 'memory://m'}"


# -- 1. settings mistakes: one line, "did you mean", exit 2, before any process ----------

def test_a_misspelt_common_consumer_option_is_refused_where_it_is_declared(
        unique: str) -> None:
    queue = Queue(f'q_{unique}')
    with pytest.raises(QueueException, match=r"unknown consumer option concurency \(did you "
                                             r"mean 'concurrency'\?\)"):
        consumer(queue, concurency=3)


@pytest.mark.parametrize('restart', ['no', 'on-failure'])
def test_a_backend_consumer_option_typo_stops_marun_before_spawning(
        tmp_path: Path, unique: str, restart: str) -> None:
    module = write_app(tmp_path, unique, f'''
        BROKER = {{'main': {AMQP_BROKER}}}
        AGENT = {{'worker': {{'backend': 'agents_{unique}.Worker', 'broker': 'main'}}}}
    ''')
    code, out, _ = run_marun(['--restart', restart, module], tmp_path)
    assert code == 2, out
    assert out.strip() == (
        f"marun: error: {module}: AGENT['worker']: Worker.handle: unknown consumer option "
        "prefetc for AMQPBroker (did you mean 'prefetch'?); known: autoack, backoff, "
        "concurrency, declare_queue, max_backoff, prefetch, retries, retry_on")
    code, out, _ = run_marun(['--check', module], tmp_path)
    assert "unknown consumer option prefetc for AMQPBroker (did you mean 'prefetch'?)" in out
    assert code != 0


def test_an_option_of_another_backend_is_refused_for_this_one(
        tmp_path: Path, unique: str) -> None:
    module = write_app(tmp_path, unique, f'''
        BROKER = {{'main': {MEMORY_BROKER}}}
        AGENT = {{'worker': {{'backend': 'agents_{unique}.Worker', 'broker': 'main'}}}}
    ''', agents=f'''
        from microagent import MicroAgent, Queue, consumer

        class Worker(MicroAgent):
            @consumer(Queue('work_{unique}'), prefetch=3)
            async def handle(self, **message):
                pass
    ''')
    code, out, _ = run_marun([module], tmp_path)
    assert code == 2, out
    assert 'Worker.handle: unknown consumer option prefetch for MemoryBroker; known:' in out
    assert 'Traceback' not in out


def test_a_misspelt_agent_entry_key_is_one_line_with_a_hint(
        tmp_path: Path, unique: str) -> None:
    module = write_app(tmp_path, unique, f'''
        BROKER = {{'main': {MEMORY_BROKER}}}
        AGENT = {{'worker': {{'backend': 'agents_{unique}.Worker', 'broker': 'main',
                              'replica': 2}}}}
    ''', agents=f'''
        from microagent import MicroAgent, Queue, consumer

        class Worker(MicroAgent):
            @consumer(Queue('work_{unique}'))
            async def handle(self, **message):
                pass
    ''')
    code, out, _ = run_marun([module], tmp_path)
    assert code == 2, out
    assert out.strip().startswith(
        f"marun: error: {module}: AGENT['worker']: unknown key 'replica' (did you mean "
        "'replicas'?); Worker takes replicas, restart, bus, broker, log, settings")
    assert len(out.strip().splitlines()) == 1


def test_an_agent_class_taking_its_own_arguments_gets_them(
        tmp_path: Path, unique: str) -> None:
    module = write_app(tmp_path, unique, f'''
        AGENT = {{'quick': {{'backend': 'agents_{unique}.Quick', 'colour': 'red'}}}}
    ''', agents='''
        from microagent import MicroAgent, ServerInterrupt, on

        class Quick(MicroAgent):
            def __init__(self, colour, **kwargs):
                super().__init__(**kwargs)
                self.colour = colour

            @on('server')
            async def serve(self):
                self.log.info('colour %s', self.colour)
                raise ServerInterrupt('done')
    ''')
    _, out, _ = run_marun([module], tmp_path)
    assert 'colour red' in out, out


@pytest.mark.parametrize(('name', 'near'), [('AGENTS', 'AGENT'), ('BROKERS', 'BROKER'),
                                            ('BUSES', 'BUS')])
def test_a_misspelt_section_name_is_named(tmp_path: Path, unique: str, name: str,
                                          near: str) -> None:
    sections = {'AGENT': f"{{'w': {{'backend': 'agents_{unique}.Worker', 'broker': 'main'}}}}",
                'BROKER': f"{{'main': {MEMORY_BROKER}}}", 'BUS': '{}'}
    sections[name] = sections.pop(near)
    module = write_app(tmp_path, unique, '\n'.join(f'{key} = {value}'
                                                    for key, value in sections.items()))
    code, out, _ = run_marun([module], tmp_path)
    assert code == 2, out
    assert out.strip() == (f'marun: error: {module}: {name} is not a settings section '
                           f"(did you mean '{near}'?)")
    code, out, _ = run_marun(['--check', module], tmp_path)
    assert f"{name} is not a settings section (did you mean '{near}'?)" in out


def test_a_process_failing_for_its_settings_is_not_restarted(
        tmp_path: Path, unique: str) -> None:
    """The settings read differently in the agent process (a file changed since the
    supervisor read it): the process exits 2 and ``--restart always`` does not restart
    it."""
    module = write_app(tmp_path, unique, f'''
        import multiprocessing
        child = multiprocessing.parent_process() is not None
        AGENT = {{'quick': {{'backend': 'agents_{unique}.Quick',
                             ('setings' if child else 'settings'): {{}}}}}}
    ''', agents='''
        from microagent import MicroAgent, on

        class Quick(MicroAgent):
            @on('server')
            async def serve(self):
                pass
    ''')
    code, out, _ = run_marun(['--restart', 'always', module], tmp_path)
    assert code == 2, out
    assert out.count("unknown key 'setings' (did you mean 'settings'?)") == 1, out
    assert 'restarted' not in out
    assert 'Traceback' not in out


def test_a_misspelt_signal_or_queue_name_gets_a_hint(unique: str) -> None:
    Signal(f'user_created_{unique}', ['user_id'])
    Queue(f'mailer_{unique}')
    with pytest.raises(SignalNotFound, match=f"did you mean 'user_created_{unique}'"):
        Signal.get(f'user_craeted_{unique}')
    with pytest.raises(QueueNotFound, match=f"did you mean 'mailer_{unique}'"):
        Queue.get(f'maile_{unique}')


def test_check_hints_an_undeclared_name_and_says_called_by_for_rpc(
        tmp_path: Path, unique: str) -> None:
    module = write_app(tmp_path, unique, f'''
        BUS = {{'main': {{'backend': 'microagent.MemorySignalBus', 'dsn': 'memory://b'}}}}
        AGENT = {{'asker': {{'backend': 'agents_{unique}.Asker', 'bus': 'main'}}}}
    ''', agents=f'''
        from microagent import MicroAgent, Signal, on

        Signal('price_{unique}', ['item'])
        Signal('user_created_{unique}', ['user_id'])

        class Asker(MicroAgent):
            @on('post_start')
            async def ask(self):
                await self.bus.price_{unique}.call(item=1)
                await self.bus.user_craeted_{unique}.send(user_id=1)
    ''')
    code, out, _ = run_marun(['--check', module], tmp_path)
    assert code == 1, out
    assert (f"signal 'user_craeted_{unique}', which is not declared (did you mean "
            f"'user_created_{unique}'?)") in out
    assert f"signal 'price_{unique}' is called by 'asker' but no agent receives it" in out



# -- 2. an unreachable server, a consumer's last timeout: one line, no traceback -----------

def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The records at WARNING or above that carry a traceback."""
    return [record.getMessage() for record in caplog.records
            if record.levelno >= logging.WARNING and record.exc_info]


async def test_a_send_to_an_unreachable_server_is_one_line_naming_handler_and_server(
        unique: str, caplog: pytest.LogCaptureFixture) -> None:
    queue = Queue(f'out_{unique}')
    port = free_port()  # nothing listens there
    broker = RedisBroker(f'redis://:s3cret@127.0.0.1:{port}/0')

    class Ticker(MicroAgent):
        @periodic(0.05, timeout=5)
        async def tick(self) -> None:
            await self.broker.send(queue.name, b'{}')  # type: ignore[union-attr]

    agent = Ticker(broker=broker)
    caplog.set_level(logging.INFO)
    await agent.start()
    try:
        failed = await eventually(lambda: [r for r in caplog.records
                                           if 'Ticker.tick' in r.getMessage()
                                           and r.levelno >= logging.ERROR])
    finally:
        await agent.stop()
        await broker.close()
    line = failed[0].getMessage()
    assert f'127.0.0.1:{port}' in line and 'unreachable' in line, line
    assert '\n' not in line
    assert not tracebacks(caplog)
    assert not any('s3cret' in record.getMessage() for record in caplog.records)


async def test_a_consumers_last_timeout_is_one_line(
        unique: str, caplog: pytest.LogCaptureFixture) -> None:
    queue = Queue(f'slow_{unique}')
    broker = MemoryBroker(f'memory://{unique}')
    dead = asyncio.Event()

    class Slow(MicroAgent):
        @consumer(queue, timeout=0.05, retries=1, backoff=0)
        async def handle(self, **message: Any) -> None:
            await asyncio.sleep(10)

    class Undertaker(MicroAgent):
        @consumer(Queue(f'slow_{unique}.dead'))
        async def bury(self, **message: Any) -> None:
            dead.set()

    agents = [Slow(broker=broker), Undertaker(broker=broker)]
    caplog.set_level(logging.INFO)
    for agent in agents:
        await agent.start()
    try:
        await broker.send(queue.name, b'{"n": 1}')
        await asyncio.wait_for(dead.wait(), 10)
    finally:
        for agent in agents:
            await agent.stop()
    gave_up = [r.getMessage() for r in caplog.records if 'gave up' in r.getMessage()]
    assert gave_up and 'after 2 attempts' in gave_up[0], gave_up
    assert not tracebacks(caplog)


# -- 3. refused credentials are not an outage ---------------------------------------------

REDIS_PASSWORD = 's3cret'


@pytest.fixture
def password_redis() -> Iterator[RedisServer]:
    """A private redis-server that wants the password REDIS_PASSWORD."""
    with redis_server('--requirepass', REDIS_PASSWORD) as server:
        yield server


class Worker(MicroAgent):
    @consumer(Queue('operator_errors_work'))
    async def handle(self, **message: Any) -> None:
        pass


def wrong_amqp(amqp_dsn: str) -> str:
    parts = urllib.parse.urlsplit(amqp_dsn)
    return parts._replace(netloc=f'guest:wrong@{parts.hostname}:{parts.port or 5672}').geturl()


async def start_refused(broker: Any) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(CredentialsRefused) as refused:
        await Worker(broker=broker).start()
    await broker.close()
    return str(refused.value), time.monotonic() - started


async def test_a_wrong_rabbitmq_password_is_refused_at_once(amqp_dsn: str) -> None:
    message, seconds = await start_refused(AMQPBroker(wrong_amqp(amqp_dsn)))
    assert 'refused: ACCESS_REFUSED' in message and 'wrong' not in message, message
    assert seconds < 2


@pytest.mark.parametrize('password', ['wrong', None])
async def test_a_wrong_or_missing_redis_password_is_refused_at_once(
        password_redis: RedisServer, password: str | None) -> None:
    userinfo = f':{password}@' if password else ''
    dsn = f'redis://{userinfo}127.0.0.1:{password_redis.port}/0'
    message, seconds = await start_refused(RedisBroker(dsn))
    assert 'Redis at' in message and 'refused:' in message and 'wrong' not in message
    assert seconds < 2


async def test_a_kafka_sasl_refusal_is_refused_at_once(
        kafka_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No SASL-enabled Kafka runs here: the client library's own refusal is raised where
    it would be, by every client's ``start()`` (aiokafka authenticates as it connects)."""
    import aiokafka
    import aiokafka.admin
    from aiokafka.errors import SaslAuthenticationFailed

    async def refuse(self: Any) -> None:
        raise SaslAuthenticationFailed('Authentication failed: Invalid username or password')

    for client in (aiokafka.AIOKafkaProducer, aiokafka.AIOKafkaConsumer,
                   aiokafka.admin.AIOKafkaAdminClient):
        monkeypatch.setattr(client, 'start', refuse)
    message, seconds = await start_refused(KafkaBroker(kafka_dsn))
    assert 'Kafka at' in message and 'refused: ' in message, message
    assert 'Invalid username or password' in message
    assert seconds < 2
    broker = KafkaBroker(kafka_dsn)
    with pytest.raises(CredentialsRefused, match='refused'):
        await broker.send('q_sasl', b'{}')
    await broker.close()


def test_marun_with_a_refused_password_exits_2_without_restarting(
        tmp_path: Path, unique: str, amqp_dsn: str) -> None:
    module = write_app(tmp_path, unique, f'''
        BROKER = {{'main': {{'backend': 'microagent_backends.AMQPBroker',
                             'dsn': {wrong_amqp(amqp_dsn)!r}}}}}
        AGENT = {{'worker': {{'backend': 'test_operator_errors.Worker', 'broker': 'main'}}}}
    ''')
    code, out, seconds = run_marun(['--restart', 'on-failure', module], tmp_path)
    assert code == 2, out
    assert 'cannot start: ' in out and 'refused: ACCESS_REFUSED' in out, out
    assert 'Traceback' not in out and 'restarted' not in out and 'guest:wrong' not in out
    assert seconds < 10, out


async def test_a_password_rotated_under_a_running_agent_is_logged_as_refused(
        password_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    dsn = f'redis://:{REDIS_PASSWORD}@127.0.0.1:{password_redis.port}/0'
    broker = RedisBroker(dsn)
    agent = Worker(broker=broker)
    await agent.start()
    admin = aioredis.from_url(dsn)
    try:
        await admin.config_set('requirepass', 'rotated')
        await admin.client_kill_filter(_type='normal', skipme=True)
        await eventually(lambda: any(' refused (' in r.getMessage() for r in caplog.records))
        assert not broker.connected
        await admin.config_set('requirepass', REDIS_PASSWORD)
        await eventually(lambda: broker.connected)
    finally:
        await admin.aclose()
        await agent.stop()
        await broker.close()
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    refused = [m for m in messages if ' refused (' in m]
    assert len(refused) == 1 and refused[0].endswith('; trying again'), messages
    assert messages[-1] == refused[0], messages  # killed: lost, then refused each time
    assert not tracebacks(caplog)


# -- 4. a refusal is not an outage ---------------------------------------------------------

async def refused_send(broker: RedisBroker, name: str, message: Any) -> str:
    """Send, which must fail at once as a QueueException; its message."""
    started = time.monotonic()
    with pytest.raises(QueueException) as refused:
        await broker.send(name, message)
    assert time.monotonic() - started < 1
    return str(refused.value)


async def test_redis_refusing_a_command_keeps_the_link_up(
        redis_dsn: str, private_redis: RedisServer, unique: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    raw = aioredis.from_url(redis_dsn)
    full = aioredis.from_url(private_redis.dsn)
    shared, own = RedisBroker(redis_dsn), RedisBroker(private_redis.dsn)
    try:
        await raw.set(f'text_{unique}', 'not a list')
        message = await refused_send(shared, f'text_{unique}', b'{}')
        assert f'sending to text_{unique}' in message and 'WRONGTYPE' in message, message
        message = await refused_send(shared, f'q_{unique}', {'x': 1})
        assert f'sending to q_{unique}' in message and "'dict'" in message, message
        assert 'unreachable' not in message
        await own.send(f'q_{unique}', b'{}')
        await full.config_set('maxmemory-policy', 'noeviction')
        await full.config_set('maxmemory', 1)
        message = await refused_send(own, f'q_{unique}', b'{}')
        assert "refused: command not allowed when used memory > 'maxmemory'" in message
        await full.config_set('maxmemory', 0)
        await own.send(f'q_{unique}', b'{}')  # a caller may try again
        assert await full.llen(f'q_{unique}') == 2
        assert shared.connected and own.connected
    finally:
        await raw.delete(f'text_{unique}')
        await raw.aclose()
        await full.aclose()
        await shared.close()
        await own.close()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# -- 5. back within 3 s of the server -------------------------------------------------------

def test_reconnection_attempts_are_never_more_than_2_s_apart() -> None:
    assert max(itertools.islice(reconnect_delays(), 50)) <= 2


async def test_a_consumer_is_back_within_3_s_of_a_long_lost_redis(
        private_redis: RedisServer, unique: str) -> None:
    queue = Queue(f'back_{unique}')
    got = asyncio.Event()
    broker = RedisBroker(private_redis.dsn)

    class Sink(MicroAgent):
        @consumer(queue)
        async def handle(self, **message: Any) -> None:
            got.set()

    agent = Sink(broker=broker)
    await agent.start()
    try:
        private_redis.stop()
        await eventually(lambda: not broker.connected)
        await asyncio.sleep(6)  # the outage lasts: the backoff reaches its cap
        assert not broker.connected
        private_redis.start()
        answered = time.monotonic()
        raw = aioredis.from_url(private_redis.dsn)
        await raw.rpush(queue.name, b'{"n": 1}')
        await raw.aclose()
        await asyncio.wait_for(got.wait(), 10)
        await eventually(lambda: broker.connected)
        assert time.monotonic() - answered < 3
    finally:
        await agent.stop()
        await broker.close()


# -- 6. a dead letter keeps the trace on Redis and memory ----------------------------------

@pytest.mark.parametrize('kind', ['memory', 'redis'])
async def test_a_dead_letters_consumer_span_is_a_child_of_the_failed_one(
        spans: Spans, unique: str, redis_dsn: str, kind: str) -> None:  # noqa: F811
    queue = Queue(f'{unique}_jobs')
    buried: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    class Failing(MicroAgent):
        @consumer(queue, retries=0)
        def work(self, **payload: Any) -> None:
            raise ValueError('cannot')

    class Undertaker(MicroAgent):
        @consumer(queue.dead_letter)
        def bury(self, **payload: Any) -> None:
            buried.put_nowait(payload)

    dsn = f'memory://{unique}' if kind == 'memory' else redis_dsn
    broker = (MemoryBroker if kind == 'memory' else RedisBroker)(dsn, TRACE_CONTEXT=True)
    agents = [Failing(broker=broker), Undertaker(broker=broker)]
    for agent in agents:
        await agent.start()
    try:
        with tracer.start_as_current_span('request'):
            await getattr(broker, queue.name).send({'n': 7})
        envelope = await asyncio.wait_for(buried.get(), 15)
        failed = await spans.one(f'process {queue.name}')
        dead = await spans.one(f'process {queue.name}.dead')
    finally:
        for agent in agents:
            await agent.stop()
        await broker.close()
    assert '_trace' not in envelope and envelope['error'] == 'ValueError: cannot'
    assert is_child(dead, failed)


# -- 7. nits --------------------------------------------------------------------------------

def test_a_message_that_is_not_a_dict_is_refused_as_such(unique: str) -> None:
    with pytest.raises(SerializingError, match='a message must be a dict, not list'):
        Queue(f'q_{unique}').serialize([1])  # type: ignore[arg-type]


def test_settings_errors_quote_keys_one_way(tmp_path: Path, unique: str) -> None:
    module = write_app(tmp_path, unique, f'''
        AGENT = {{'producer': {{'backend': 'agents_{unique}.NotAnAgent'}}}}
    ''', agents='''
        class NotAnAgent:
            pass
    ''')
    code, out, _ = run_marun([module], tmp_path)
    assert code == 2, out
    assert f"{module}: AGENT['producer']['backend']: " in out and '"' not in out, out


def test_check_against_a_missing_file_is_a_usage_error(tmp_path: Path, unique: str) -> None:
    module = write_app(tmp_path, unique, f'''
        AGENT = {{'worker': {{'backend': 'agents_{unique}.Worker', 'broker': 'main'}}}}
        BROKER = {{'main': {MEMORY_BROKER}}}
    ''', agents='''
        from microagent import MicroAgent
        class Worker(MicroAgent):
            pass
    ''')
    code, out, _ = run_marun(['--check', '--against', 'no_such.json', module], tmp_path)
    assert code == 2, out
    assert 'marun: error: --against no_such.json: no such file' in out


def test_readyz_says_the_restart_delay_as_the_log_does() -> None:
    managed = ManagedProcess('worker', ['worker'], 1, 1, 'always')
    managed.state, managed.exitcode = 'restarting', 1
    now = time.monotonic()
    managed.restart_at = now + 0.4  # logged "restarting it in 1s" 0.6 s ago
    assert _state_detail(managed, now) == ' (exit 1; starting again in 1s)'
    managed.restart_at = now + 2.0
    assert _state_detail(managed, now) == ' (exit 1; starting again in 2s)'


async def test_a_server_down_at_start_is_not_reported_as_reconnecting(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    broker = RedisBroker(f'redis://127.0.0.1:{free_port()}/0')
    with pytest.raises(ConnectionError, match='is unreachable'):
        await Worker(broker=broker).start()
    await broker.close()
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(': no connection yet (' in m for m in messages), messages
    assert not [m for m in messages if 'reconnecting' in m or ' lost (' in m], messages


async def test_an_rpc_answer_that_cannot_be_sent_is_one_line(
        unique: str, caplog: pytest.LogCaptureFixture) -> None:
    signal = Signal(f'ask_{unique}', ['n'])

    class AnswersLost(MemorySignalBus):
        async def send(self, channel: str, message: bytes) -> None:
            if ':response:' in channel:
                raise ConnectionError('Redis at redis://:***@db/0 is unreachable: refused')
            await super().send(channel, message)

    class Answerer(MicroAgent):
        @receiver(signal)
        async def answer(self, **kwargs: Any) -> int:
            return 1

    caplog.set_level(logging.INFO)
    caller, bus = MemorySignalBus(f'memory://{unique}'), AnswersLost(f'memory://{unique}')
    agent = Answerer(bus=bus)
    await agent.start()
    try:
        assert await getattr(caller, signal.name).call('tester', n=1, timeout=0.3) == {}
        failed = await eventually(lambda: [r.getMessage() for r in caplog.records
                                           if 'RPC answer' in r.getMessage()])
    finally:
        await agent.stop()
    assert failed == [f'Sending the RPC answer to ask_{unique} failed: Redis at '
                      'redis://:***@db/0 is unreachable: refused'], failed
    assert not tracebacks(caplog)
