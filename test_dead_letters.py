"""Dead letters an operator sees, replays and purges (DESIGN.md, "Dead letters: list,
replay, purge"): the broker API on every backend, its behaviour when the connection is
cut mid-replay, and ``marun SETTINGS --dead``."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from conftest import address, free_port
from microagent import DeadLetter, MicroAgent, Queue, consumer, encode_json
from microagent_backends import RedisBroker
from test_microagent_backends import (  # noqa: F401  (fixtures)
    BROKER_KINDS,
    WAIT,
    BrokerKind,
    closing,
    eventually,
    kafka_settings,
    memory_dsn,
    rabbit,
    raw_producer,
    running,
)
from tests_support.faultproxy import FaultProxy

NOT_UTF8 = b'\xff\xfe not text \x80'
KINDS = ['memory', 'redis', 'amqp', 'kafka']


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> BrokerKind:
    return BROKER_KINDS[request.param](request)


def envelope(queue: str, n: int, *, body: bytes | None = None, attempts: int = 3) -> bytes:
    """A dead letter as a consumer of microagent writes it (see ConsumerPool)."""
    original = encode_json({'n': n}) if body is None else body
    try:
        copy = {'body': original.decode()}
    except UnicodeDecodeError:
        copy = {'body_base64': base64.b64encode(original).decode()}
    return encode_json({'queue': queue, **copy, 'error': f'ValueError: broken {n}',
                        'attempts': attempts, 'consumer': 'Worker.work',
                        'failed_at': 1_700_000_000.0 + n})


async def put_letters(kind: BrokerKind, queue: str, letters: list[bytes]) -> None:
    """Store ``letters`` in ``{queue}.dead`` as another process would, in order."""
    dead = f'{queue}.dead'
    if kind.name == 'amqp':
        await kind.rabbit.declare(dead, durable=True)  # type: ignore[attr-defined]
    for letter in letters:
        await kind.inject(dead, letter)
    await eventually(lambda: kind.broker().dead_count(queue), len(letters))


async def consumed(kind: BrokerKind, queue: Queue, expected: int) -> list[int]:
    """The ``n`` of every message a consumer of ``queue`` handles, once ``expected`` were
    handled and the queue is left empty (a body that is no JSON is dead-lettered)."""
    calls: list[int] = []
    all_there = asyncio.Event()

    class Worker(MicroAgent):
        @consumer(queue)
        async def work(self, n: int, **raw: Any) -> None:
            calls.append(n)
            if len(calls) >= expected:
                all_there.set()

    broker = kind.broker()
    async with running(Worker(broker=broker)):
        if expected:
            await asyncio.wait_for(all_there.wait(), WAIT)
    await eventually(lambda: kind.left(queue.name), (0, 0))
    return sorted(calls)


# -- listing ----------------------------------------------------------------------------

async def test_list_is_oldest_first_complete_and_non_destructive(kind: BrokerKind) -> None:
    queue = Queue(kind.unique)
    letters = [envelope(queue.name, 1), envelope(queue.name, 2, body=NOT_UTF8),
               b'{"n": 3}', NOT_UTF8, envelope(queue.name, 5)]
    await put_letters(kind, queue.name, letters)
    broker = kind.broker()
    listed = await broker.dead_letters(queue.name)
    assert await broker.dead_letters(queue.name) == listed  # reading removed nothing
    assert await broker.dead_count(queue.name) == 5
    assert all(isinstance(letter, DeadLetter) for letter in listed)
    assert len({letter.id for letter in listed}) == 5
    first, second, legacy, garbage, last = listed
    assert (first.queue, first.body, first.error, first.attempts, first.consumer,
            first.failed_at) == (queue.name, b'{"n":1}', 'ValueError: broken 1', 3,
                                 'Worker.work', 1_700_000_001.0)
    assert second.body == NOT_UTF8 and second.error == 'ValueError: broken 2'
    for unknown, raw in ((legacy, b'{"n": 3}'), (garbage, NOT_UTF8)):
        assert (unknown.body, unknown.error, unknown.attempts, unknown.consumer) == (
            raw, 'unknown envelope', 0, None)
    assert last.body == b'{"n":5}'
    assert await broker.dead_letters(queue.name, limit=2) == [first, second]
    assert await broker.dead_letters(queue.name, limit=0) == []


async def test_a_message_that_dies_is_listed_with_its_error(kind: BrokerKind) -> None:
    queue = Queue(kind.unique)

    class Failing(MicroAgent):
        @consumer(queue)
        async def work(self, n: int, **raw: Any) -> None:
            raise ValueError(f'cannot do {n}')

    broker = kind.broker(ROLLBACK_ATTEMPTS=1)
    before = time.time()
    async with running(Failing(broker=broker)):
        await getattr(broker, queue.name).send({'n': 7})
        await eventually(lambda: broker.dead_count(queue.name), 1)
    [letter] = await broker.dead_letters(queue.name)
    assert (letter.body, letter.error, letter.attempts, letter.consumer) == (
        b'{"n":7}', 'ValueError: cannot do 7', 2, 'Failing.work')
    assert before <= letter.failed_at <= time.time()


# -- replaying --------------------------------------------------------------------------

async def test_replay_by_ids_by_limit_and_all_delivers_each_original_once(
        kind: BrokerKind) -> None:
    queue = Queue(kind.unique)
    letters = [envelope(queue.name, n) for n in range(1, 6)]
    letters.insert(2, envelope(queue.name, 0, body=NOT_UTF8))
    await put_letters(kind, queue.name, letters)
    broker = kind.broker()
    listed = await broker.dead_letters(queue.name)
    chosen = [listed[1].id, listed[4].id]  # n=2 and n=4
    assert await broker.replay(queue.name, ids=chosen) == 2
    assert await broker.replay(queue.name, ids=chosen) == 0  # already replayed: a no-op
    assert [letter.id for letter in await broker.dead_letters(queue.name)] == [
        listed[i].id for i in (0, 2, 3, 5)]  # ids stay, order stays
    assert await broker.dead_count(queue.name) == 4
    assert await broker.replay(queue.name, limit=2) == 2  # the oldest: n=1 and NOT_UTF8
    assert [letter.id for letter in await broker.dead_letters(queue.name)] == [
        listed[i].id for i in (3, 5)]
    assert await broker.replay(queue.name) == 2
    assert await broker.dead_count(queue.name) == 0
    assert await consumed(kind, queue, 5) == [1, 2, 3, 4, 5]
    # The body that is no JSON went through with its bytes, and died again as malformed.
    [again] = await broker.dead_letters(queue.name)
    assert again.body == NOT_UTF8 and again.error.startswith('SerializingError')


async def test_replaying_an_unknown_envelope_sends_its_raw_bytes(kind: BrokerKind) -> None:
    queue = Queue(kind.unique)
    await put_letters(kind, queue.name, [b'{"n": 9}'])
    broker = kind.broker()
    assert await broker.replay(queue.name) == 1
    assert await consumed(kind, queue, 1) == [9]
    assert await broker.dead_count(queue.name) == 0


# -- purging ----------------------------------------------------------------------------

async def test_purge_by_ids_and_all(kind: BrokerKind) -> None:
    queue = Queue(kind.unique)
    await put_letters(kind, queue.name, [envelope(queue.name, n) for n in range(4)] + [NOT_UTF8])
    broker = kind.broker()
    listed = await broker.dead_letters(queue.name)
    assert await broker.purge_dead(queue.name, ids=[listed[1].id, listed[4].id]) == 2
    assert await broker.purge_dead(queue.name, ids=[listed[1].id]) == 0
    assert await broker.dead_letters(queue.name) == [listed[0], listed[2], listed[3]]
    assert await broker.purge_dead(queue.name) == 3
    assert await broker.dead_count(queue.name) == 0
    assert await broker.dead_letters(queue.name) == []
    assert await consumed(kind, queue, 0) == []  # purging sent nothing


async def test_a_queue_without_dead_letters(kind: BrokerKind) -> None:
    broker, name = kind.broker(), kind.unique
    assert await broker.dead_letters(name) == []
    assert await broker.dead_count(name) == 0
    assert await broker.replay(name) == 0
    assert await broker.purge_dead(name) == 0
    with pytest.raises(ValueError, match='limit'):
        await broker.replay(name, limit=-1)


# -- marun SETTINGS --dead --------------------------------------------------------------

ROOT = Path(__file__).parent


def settings_module(directory: Path, unique: str, dsn: str) -> str:
    """A settings module whose agent consumes ``{unique}`` and ``{unique}_other``."""
    name = f'dead_settings_{unique}'
    (directory / f'{name}.py').write_text(textwrap.dedent(f'''
        from microagent import MicroAgent, Queue, consumer

        class Worker(MicroAgent):
            @consumer(Queue({unique!r}))
            async def work(self, n: int) -> None: ...

            @consumer(Queue({unique + '_other'!r}))
            async def other(self, n: int) -> None: ...

        BROKER = {{'main': {{'backend': 'microagent_backends.RedisBroker', 'dsn': {dsn!r}}}}}
        AGENT = {{'worker': {{'backend': {name + '.Worker'!r}, 'broker': 'main'}}}}
    '''))
    return name


def marun(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    return subprocess.run([sys.executable, '-m', 'microagent', *args], cwd=directory, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
async def dead_settings(tmp_path: Path, redis_dsn: str, unique: str, raw: Any,
                        closing: list[Any],  # noqa: F811
                        request: pytest.FixtureRequest
                        ) -> AsyncIterator[tuple[Path, str, RedisBroker]]:
    """A settings module on Redis, whose queue ``unique`` has four dead letters (the
    fixtures the broker kind takes are set up first: async ones cannot be taken later)."""
    kind = BROKER_KINDS['redis'](request)
    await put_letters(kind, unique, [envelope(unique, 1), envelope(unique, 2, body=NOT_UTF8),
                                     b'{"n": 3}', envelope(unique, 4)])
    yield tmp_path, settings_module(tmp_path, unique, redis_dsn), kind.broker()


async def test_marun_dead_overview_lists_each_queue_with_its_count(
        dead_settings: tuple[Path, str, RedisBroker], unique: str) -> None:
    directory, settings, _ = dead_settings
    done = await asyncio.to_thread(marun, directory, settings, '--dead')
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].split()[:3] == [unique, '4', 'dead']
    assert lines[1].split()[:3] == [f'{unique}_other', '0', 'dead']
    assert 'main (RedisBroker redis://' in lines[0]


async def test_marun_dead_queue_lists_its_letters_as_text_and_json(
        dead_settings: tuple[Path, str, RedisBroker], unique: str) -> None:
    directory, settings, broker = dead_settings
    letters = await broker.dead_letters(unique)
    done = await asyncio.to_thread(marun, directory, settings, '--dead', unique)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [letter.id for letter in letters]
    assert lines[0].split('  ')[1:] == ['2023-11-14T22:13:21.000+00:00', '3', 'Worker.work',
                                        'ValueError: broken 1', '{"n":1}']
    assert f'(binary, {len(NOT_UTF8)} bytes)' in lines[1] and 'unknown envelope' in lines[2]
    assert '4 of 4 dead letter(s)' in done.stderr
    done = await asyncio.to_thread(marun, directory, settings, '--dead', unique, '--json',
                                   '--limit', '3')
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stdout.splitlines()]
    assert [entry['id'] for entry in entries] == [letter.id for letter in letters[:3]]
    assert entries[0] == {'id': letters[0].id, 'queue': unique, 'failed_at': 1_700_000_001.0,
                          'attempts': 3, 'consumer': 'Worker.work',
                          'error': 'ValueError: broken 1', 'body': '{"n":1}'}
    assert base64.b64decode(entries[1]['body_base64']) == NOT_UTF8
    assert entries[2]['body'] == '{"n": 3}' and entries[2]['error'] == 'unknown envelope'


async def test_marun_dead_replays_and_purges(
        dead_settings: tuple[Path, str, RedisBroker], unique: str) -> None:
    directory, settings, broker = dead_settings
    letters = await broker.dead_letters(unique)
    done = await asyncio.to_thread(marun, directory, settings, '--dead', unique, '--replay',
                                   '--id', letters[2].id, '--id', letters[3].id)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f'replayed 2 dead letter(s) of {unique} on main')
    assert await broker.queue_length(unique) == 2
    assert await broker.dead_letters(unique) == letters[:2]
    done = await asyncio.to_thread(marun, directory, settings, '--dead', unique, '--purge')
    assert done.returncode == 2 and '--yes' in done.stderr
    assert await broker.dead_count(unique) == 2
    done = await asyncio.to_thread(marun, directory, settings, '--dead', unique, '--purge',
                                   '--yes')
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f'purged 2 dead letter(s) of {unique}')
    assert await broker.dead_count(unique) == 0


async def test_marun_dead_refuses_an_unknown_queue_and_names_the_known_ones(
        dead_settings: tuple[Path, str, RedisBroker], unique: str) -> None:
    directory, settings, broker = dead_settings
    done = await asyncio.to_thread(marun, directory, settings, '--dead', 'nosuchqueue')
    assert done.returncode == 2 and done.stdout == ''
    assert done.stderr.strip() == (f"marun: error: no agent of the settings consumes "
                                   f"'nosuchqueue'; the queues are: {unique}, {unique}_other")
    assert await broker.dead_count(unique) == 4


async def test_marun_dead_with_an_unreachable_server_is_one_line_without_password(
        tmp_path: Path, unique: str) -> None:
    dsn = f'redis://user:s3cret@127.0.0.1:{free_port()}/0'
    settings = settings_module(tmp_path, unique, dsn)
    for args in (['--dead'], ['--dead', unique], ['--dead', unique, '--replay']):
        done = await asyncio.to_thread(marun, tmp_path, settings, *args)
        assert done.returncode == 1, done
        assert len(done.stderr.splitlines()) == 1 and 'unreachable' in done.stderr
        assert 's3cret' not in done.stderr + done.stdout


# -- a connection cut mid-replay --------------------------------------------------------

@pytest.mark.parametrize('kind', ['redis'], indirect=True)
async def test_redis_replay_whose_replies_are_lost_loses_and_repeats_nothing(
        kind: BrokerKind, redis_dsn: str) -> None:
    """The reply of the first script is lost twice (redis-py's own second send too): the
    replay fails; what the script did stays done, and a second replay does the rest."""
    queue = Queue(kind.unique)
    count = 3000  # two scripts of 2,000 and 1,000 letters
    await put_many(kind, queue.name, count)
    async with FaultProxy(address(redis_dsn, 6379)[1]) as proxy:
        broker = kind.broker(f'redis://127.0.0.1:{proxy.port}/0', COMMAND_TIMEOUT=2)
        proxy.drop_reply(b'microagent:taken:', times=2)
        with pytest.raises(ConnectionError):
            await broker.replay(queue.name)
        assert proxy.replies_dropped == 2
        assert await broker.dead_count(queue.name) == 1000
        assert await broker.replay(queue.name) == 1000
    raw = kind.raw  # type: ignore[attr-defined]
    bodies = await raw.lrange(queue.name, 0, -1)
    assert sorted(json.loads(body)['n'] for body in bodies) == list(range(count))


@pytest.mark.parametrize('kind', ['redis'], indirect=True)
async def test_redis_replay_whose_reply_is_lost_once_is_sent_again_harmlessly(
        kind: BrokerKind, redis_dsn: str) -> None:
    queue = Queue(kind.unique)
    await put_many(kind, queue.name, 10)
    async with FaultProxy(address(redis_dsn, 6379)[1]) as proxy:
        broker = kind.broker(f'redis://127.0.0.1:{proxy.port}/0', COMMAND_TIMEOUT=2)
        letters = await broker.dead_letters(queue.name)
        proxy.drop_reply(b'microagent:taken:')
        # the second send finds the letters gone: it counts none of them
        assert await broker.replay(queue.name, ids=[letter.id for letter in letters[:4]]) == 0
        assert proxy.replies_dropped == 1
        assert await broker.dead_letters(queue.name) == letters[4:]
    assert await kind.raw.lrange(queue.name, 0, -1) == [  # type: ignore[attr-defined]
        letter.body for letter in letters[:4]]


@pytest.mark.parametrize('kind', ['amqp'], indirect=True)
async def test_amqp_replay_cut_mid_publish_loses_nothing_and_repeats_one_batch_at_most(
        kind: BrokerKind, amqp_dsn: str) -> None:
    queue = Queue(kind.unique)
    count, batch = 1000, 100
    await put_many(kind, queue.name, count)
    host, port = address(amqp_dsn, 5672)
    async with FaultProxy(port) as proxy:
        dsn = amqp_dsn.replace(f'{host}:{port}', f'127.0.0.1:{proxy.port}')
        broker = kind.broker(dsn, REPLAY_BATCH=batch, CONNECT_TIMEOUT=5)
        proxy.drop_reply(encode_json({'n': 450}))  # its confirmation never comes
        with pytest.raises(ConnectionError):
            await broker.replay(queue.name)
        assert proxy.replies_dropped == 1
        # the batch cut and what follows (more if acknowledgements were lost with it)
        assert await broker.replay(queue.name) >= count - 4 * batch
    assert await kind.broker().dead_count(queue.name) == 0
    client = kind.rabbit  # type: ignore[attr-defined]
    got = [json.loads(message.body)['n'] for message in await client.take_all(queue.name)]
    assert set(got) == set(range(count))  # nothing lost
    twice = [n for n in set(got) if got.count(n) > 1]
    assert len(got) - count == len(twice) <= batch  # at most the batch in flight, once more
    assert all(400 <= n < 500 for n in twice)


@pytest.mark.parametrize('kind', ['kafka'], indirect=True)
async def test_kafka_replay_whose_commit_fails_after_the_sends_repeats_one_batch_at_most(
        kind: BrokerKind, kafka_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fifth commit (after the fifth batch was sent and acknowledged) fails as a
    lost connection would: the replay raises; the letters of that batch are still listed,
    so the next replay sends them again, and nothing is lost."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.errors import KafkaConnectionError

    from test_microagent_backends import read_topic

    queue = Queue(kind.unique)
    count, batch = 1000, 100
    await put_many(kind, queue.name, count)
    commits = 0
    commit = AIOKafkaConsumer.commit

    async def failing_fifth(self: AIOKafkaConsumer, offsets: Any = None) -> None:
        nonlocal commits
        commits += 1
        if commits == 5:
            raise KafkaConnectionError('connection cut (test)')
        await commit(self, offsets)

    monkeypatch.setattr(AIOKafkaConsumer, 'commit', failing_fifth)
    broker = kind.broker(REPLAY_BATCH=batch)
    with pytest.raises(ConnectionError, match='replaying dead letters'):
        await broker.replay(queue.name)
    assert await broker.dead_count(queue.name) == count - 4 * batch
    assert [letter.body for letter in await broker.dead_letters(queue.name, limit=1)] == [
        encode_json({'n': 4 * batch})]
    assert await broker.replay(queue.name) == count - 4 * batch
    assert await broker.dead_count(queue.name) == 0
    got = [json.loads(record.value)['n']
           for record in await read_topic(kafka_dsn, queue.name, count + batch)]
    assert set(got) == set(range(count))  # nothing lost
    twice = sorted(n for n in set(got) if got.count(n) > 1)
    assert twice == list(range(4 * batch, 5 * batch))  # the batch in flight, once more


async def put_many(kind: BrokerKind, queue: str, count: int) -> None:
    """``count`` dead letters of messages ``{'n': 0}``... in ``{queue}.dead``."""
    dead, letters = f'{queue}.dead', [envelope(queue, n) for n in range(count)]
    if kind.name == 'redis':
        await kind.raw.rpush(dead, *letters)  # type: ignore[attr-defined]
    elif kind.name == 'kafka':
        producer = kind.producer  # type: ignore[attr-defined]
        await asyncio.gather(*[await producer.send(dead, letter, key=b'k') for letter in letters])
    else:
        await kind.rabbit.declare(dead, durable=True)  # type: ignore[attr-defined]
        channel = await kind.rabbit.channel()  # type: ignore[attr-defined]
        for letter in letters:
            await channel.basic_publish(letter, routing_key=dead)
        await channel.close()
    await eventually(lambda: kind.broker().dead_count(queue), count)


@pytest.mark.parametrize('kind', ['kafka'], indirect=True)
async def test_marun_dead_on_kafka_uses_the_consumer_s_own_group(
        kind: BrokerKind, tmp_path: Path, kafka_dsn: str) -> None:
    """A consumer with ``group_id=G`` has its dead letters handled by the group
    ``G.dead``: what marun purges for it, the default group still lists."""
    unique = kind.unique
    await put_letters(kind, unique, [envelope(unique, n) for n in range(3)])
    name = f'dead_kafka_settings_{unique}'
    (tmp_path / f'{name}.py').write_text(textwrap.dedent(f'''
        from microagent import MicroAgent, Queue, consumer

        class Audit(MicroAgent):
            @consumer(Queue({unique!r}), group_id={unique + '-audit'!r})
            async def work(self, n: int, **kafka: object) -> None: ...

        BROKER = {{'main': {{'backend': 'microagent_backends.KafkaBroker', 'dsn': {kafka_dsn!r}}}}}
        AGENT = {{'audit': {{'backend': {name + '.Audit'!r}, 'broker': 'main'}}}}
    '''))
    listed = await kind.broker().dead_letters(unique)
    done = await asyncio.to_thread(marun, tmp_path, name, '--dead', unique, '--purge', '--yes',
                                   '--id', listed[0].id)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f'purged 1 dead letter(s) of {unique}')
    done = await asyncio.to_thread(marun, tmp_path, name, '--dead', unique, '--json')
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)['id'] for line in done.stdout.splitlines()] == [
        letter.id for letter in listed[1:]]
    audit = kind.broker()
    audit.dead_group_ids[unique] = f'{unique}-audit'
    assert await audit.dead_letters(unique) == listed[1:]
    assert await kind.broker().dead_letters(unique) == listed  # the default group's
