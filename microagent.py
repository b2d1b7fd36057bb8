"""microagent: microservices that talk only through a signal bus and a queue broker.

A service is a :class:`MicroAgent` subclass. Its signal receivers, queue consumers,
periodic and cron tasks and lifecycle hooks are declared with decorators; the agent
binds them to a bus (pub/sub events and RPC) and a broker (durable work queues) when it
starts. ``marun`` launches a group of agents, each in its own process.

This module is the whole core and can be vendored as one file (it needs ``msgspec``;
``croniter`` for ``@cron`` and ``graphviz`` for diagrams are imported where used);
``python -m microagent SETTINGS`` then does what ``marun SETTINGS`` does. The Redis,
RabbitMQ and Kafka backends live in ``microagent_backends``.

The file is in four layers, each a few sections opened by a banner, and nothing in a
layer names what a later one defines (``test_layout.py`` checks it):

- the runtime: declarations (errors, JSON, signals, queues), decorators, the agent,
  tracing (spans the bus, the pools and the timers open at their own points), handler
  times, the bus, the broker (its consumer pool: retries, dead letters, backpressure),
  timers, the memory backends and the mocks;
- the launcher: settings modules, agent processes and what they report, the supervisor
  (replicas, restarts, ``/livez`` ``/readyz`` ``/status`` ``/metrics``);
- the tooling: the topology graph, DOT / Mermaid / SVG, AsyncAPI and the contract checks;
- the command line: ``marun``.
"""
from __future__ import annotations

import abc
import ast
import asyncio
import bisect
import collections
import contextlib
import enum
import functools
import heapq
import importlib
import inspect
import itertools
import keyword
import logging
import math
import os
import random
import re
import sys
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, TypeVar, Union

import msgspec

if TYPE_CHECKING:
    from unittest import mock

__version__ = '2.0.0'

__all__ = [
    'AbstractQueueBroker', 'AbstractSignalBus', 'AgentsManager', 'BoundQueue', 'BoundSignal',
    'BrokerMock', 'BusMock', 'ConsumerOptions', 'CredentialsRefused', 'DeadLetter',
    'GraphRenderError',
    'GroupInterrupt', 'Link', 'LinkState', 'MemoryBroker', 'MemorySignalBus', 'MicroAgent',
    'Queue', 'QueueException', 'QueueNotFound',
    'SerializingError', 'ServerInterrupt', 'Signal', 'SignalException', 'SignalNotFound',
    'Topology', 'build_graph', 'check_topology', 'check_transports', 'consumer', 'cron',
    'init_agent', 'load_configuration', 'load_queues', 'load_signals', 'load_stuff', 'on',
    'periodic', 'receiver', 'sent_by',
]

logger = logging.getLogger('microagent')

Func = TypeVar('Func', bound=Callable[..., Any])
JSONObject = dict[str, Any]


# =====================================================================================
# Declarations: errors, JSON, signals, queues, loading them from a file
# =====================================================================================

class SignalException(Exception):
    """Base of the errors about signals and the signal bus."""


class SignalNotFound(SignalException, AttributeError):
    """No signal is declared under that name (also raised by ``bus.<typo>``)."""


class QueueException(Exception):
    """Base of the errors about queues and the queue broker."""


class QueueNotFound(QueueException, AttributeError):
    """No queue is declared under that name (also raised by ``broker.<typo>``)."""


class SerializingError(SignalException, QueueException):
    """A payload could not be turned into a JSON object, or read back as one."""


class ServerInterrupt(Exception):
    """Raised by an ``@on('server')`` task to stop its agent gracefully."""


class GroupInterrupt(SystemExit):
    """Stops a group of agents started by ``marun``."""


_json_encoder = msgspec.json.Encoder()
_object_decoder = msgspec.json.Decoder(dict)


def encode_json(data: Any) -> bytes:
    """Serialize ``data`` to compact JSON bytes; raise :class:`SerializingError`."""
    try:
        return _json_encoder.encode(data)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise SerializingError(f'cannot serialize to JSON: {exc}') from exc


def decode_object(raw: bytes | str) -> JSONObject:
    """Read one JSON object; raise :class:`SerializingError` for anything else."""
    try:
        return _object_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise SerializingError(f'not a JSON object: {exc}') from exc


_DSN_USERINFO = re.compile(r'(?<=://)([^:/@\s]*):([^@/\s]*)@')
_DSN_SECRET_PARAM = re.compile(r'(?i)\b(password|passwd|pwd|secret|token)=([^&\s]*)')


def redact_dsn(dsn: str) -> str:
    """Return ``dsn`` with its password (and secret query parameters) replaced by ``***``;
    also any text with DSNs in it (an error message, a reason of ``/readyz``)."""
    dsn = _DSN_USERINFO.sub(lambda m: f'{m.group(1)}:***@', str(dsn))
    return _DSN_SECRET_PARAM.sub(lambda m: f'{m.group(1)}=***', dsn)


def error_text(error: BaseException) -> str:
    """What an exception says, for a log line or a status: its message, or its type's
    name when it has none (``TimeoutError()``)."""
    return str(error) or type(error).__name__


def _did_you_mean(word: str, names: Iterable[str]) -> str:
    """`` (did you mean 'near'?)`` when one of ``names`` is near ``word`` (a misspelt
    name, any case), else ``''``: the hint of a one-line error."""
    scored = [(_nearness(word.lower(), name.lower()), name) for name in names]
    score, near = max(scored, default=(0.0, ''))
    return f' (did you mean {near!r}?)' if score >= 0.6 else ''


def _nearness(word: str, name: str) -> float:
    """How alike two names are once their common start is set aside (names that share
    a prefix, ``app_user_created`` and ``app_order_paid``, are not alike for it)."""
    import difflib
    shared = next((i for i, (a, b) in enumerate(zip(word, name, strict=False))
                   if a != b),
                  min(len(word), len(name)))
    rest, other = word[shared:], name[shared:]
    if not rest or not other:  # one extends the other: 'AGENTS', 'replica'
        return 1.0 if 0 < len(rest) + len(other) <= 2 else 0.0
    return difflib.SequenceMatcher(None, rest, other).ratio()


def _log_failed(log: logging.Logger, error: BaseException, message: str, *args: Any) -> None:
    """Log that a handler, timer or server failed: one line with the cause when a
    server is unreachable or the handler ran out of time (the traceback at DEBUG),
    the traceback of any other error."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        log.error(message + ': %s', *args, error_text(error))
        log.debug('The traceback of that failure:', exc_info=error)
    else:
        log.error(message, *args, exc_info=error)


_SIGNAL_NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')
_QUEUE_NAME = re.compile(r'^[A-Za-z0-9_.:\-]{1,200}$')
_RESERVED_SIGNALS = frozenset({'response'})

JSON_TYPES: dict[str, Any] = {
    'string': str,
    'number': int | float,
    'boolean': bool,
    'array': list,
    'object': dict,
    'null': None,
}


def json_type(spec: str | list[str]) -> Any:
    """The Python type for a JSON type name (``"number"``) or a list of them."""
    names = [spec] if isinstance(spec, str) else spec
    if not isinstance(names, list) or not names:
        raise SignalException(f'a JSON type is a name or a list of names, not {spec!r}')
    unknown = [name for name in names if name not in JSON_TYPES]
    if unknown:
        raise SignalException(
            f'unknown JSON type {unknown[0]!r}; use one of {", ".join(JSON_TYPES)}')
    types = tuple(JSON_TYPES[name] for name in names)
    return Union[types] if len(types) > 1 else types[0]  # noqa: UP007


def _python_type(spec: Any) -> Any:
    """A ``type_map`` value: a type, or a tuple of types as for ``isinstance``."""
    if isinstance(spec, tuple):
        return Union[tuple(None if t is type(None) else t for t in spec)]  # noqa: UP007
    return None if spec is type(None) else spec


def _public_attributes(*classes: type) -> frozenset[str]:
    return frozenset(name for cls in classes for name in dir(cls) if not name.startswith('_'))


@functools.cache
def _bus_attributes() -> frozenset[str]:
    """What ``bus.<name>`` and ``bus.<signal>.<name>`` already mean."""
    return _public_attributes(AbstractSignalBus, BoundSignal) | {
        'dsn', 'prefix', 'uid', 'log', 'receivers', 'links'}


@functools.cache
def _broker_attributes() -> frozenset[str]:
    """What ``broker.<name>`` and ``broker.<queue>.<name>`` already mean."""
    return _public_attributes(AbstractQueueBroker, BoundQueue) | {
        'dsn', 'log', 'pools', 'links'}


def _refuse_taken_name(kind: str, name: str, taken: frozenset[str],
                       error: type[Exception]) -> None:
    """A signal called ``close`` would be unreachable as ``bus.close`` (the method)."""
    if name in taken:
        raise error(f'{kind} name {name!r} is taken by an attribute of the '
                    f'{"bus" if kind == "signal" else "broker"}: choose another name')


def _refuse_taken_names(kind: str, declared: Iterable[str], cls: type,
                        error: type[Exception]) -> None:
    """At a backend's construction: no declared name may be one of its attributes
    (``putout``, ``partitions``...), which the core classes do not know."""
    taken = _public_attributes(cls)
    for name in declared:
        _refuse_taken_name(kind, name, taken, error)


_Declared = TypeVar('_Declared', bound='_Registry')


class _Registry:
    """What :class:`Signal` and :class:`Queue` share: each declaration registers itself
    under its unique name (in its class's ``_registry``), is equal to another of the
    same name, and is found again with :meth:`get`."""

    _registry: ClassVar[dict[str, Any]]
    _kind: ClassVar[str]  # 'signal' or 'queue', for messages
    _not_found: ClassVar[type[Exception]]

    name: str

    def __repr__(self) -> str:
        return f'<{type(self).__name__} {self.name}>'

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, type(self)):
            return NotImplemented
        return self.name == other.name

    def __hash__(self) -> int:
        return hash((self._kind, self.name))

    def serialize(self, data: Mapping[str, Any]) -> bytes:
        """A payload as JSON bytes."""
        return encode_json(data)

    def deserialize(self, data: bytes | str) -> JSONObject:
        """A payload read back from JSON; it must be an object."""
        return decode_object(data)

    @classmethod
    def get(cls: type[_Declared], name: str) -> _Declared:
        """The declaration of that name; raise :class:`SignalNotFound` or
        :class:`QueueNotFound`."""
        try:
            found: _Declared = cls._registry[name]
        except (KeyError, TypeError):
            hint = _did_you_mean(name, cls._registry) if isinstance(name, str) else ''
            raise cls._not_found(
                f'no {cls._kind} is declared with the name {name!r}{hint}') from None
        return found

    @classmethod
    def get_all(cls: type[_Declared]) -> dict[str, _Declared]:
        """Every declaration, by name."""
        return dict(cls._registry)


class Signal(_Registry):
    """A declared event: a unique name and the arguments its payload carries.

    ``providing_args`` lists the argument names; ``type_map`` optionally maps names to a
    type or a tuple of types (as for ``isinstance``). A signal loaded from JSON may give
    ``providing_args`` as a mapping name -> JSON type, which fills ``type_map``. Payloads
    are checked on send and on receipt (names, and types by a compiled msgspec type); a
    mismatch (missing, unexpected or mistyped argument) is logged as a warning and the
    signal still goes through (the documented soft check of 1.x). With ``strict=True`` a
    mismatch is refused instead: a send raises :class:`SerializingError`, a received
    signal is dropped with an error log.

    Each instance registers itself by name. Declaring a name again with the same
    arguments is allowed (two modules loading one JSON file); with other arguments it
    raises :class:`SignalException`::

        user_created = Signal('user_created', ['user_id'], type_map={'user_id': int})
        Signal.get('user_created') is user_created
    """

    _registry: ClassVar[dict[str, Signal]] = {}
    _kind = 'signal'
    _not_found = SignalNotFound

    providing_args: list[str]
    type_map: dict[str, Any] | None
    strict: bool

    def __init__(self, name: str, providing_args: Iterable[str] | Mapping[str, Any] = (),
                 type_map: Mapping[str, Any] | None = None, strict: bool = False) -> None:
        if not isinstance(name, str) or not _SIGNAL_NAME.match(name):
            raise SignalException(
                f'signal name {name!r} must be an identifier: letters, digits and _')
        if name in _RESERVED_SIGNALS:
            raise SignalException(f'signal name {name!r} is reserved for RPC answers')
        _refuse_taken_name('signal', name, _bus_attributes(), SignalException)
        if isinstance(providing_args, str):
            raise SignalException(
                f'signal {name!r}: providing_args is a list of names, not the string '
                f'{providing_args!r}')
        types: dict[str, Any] = {}
        if isinstance(providing_args, Mapping):
            types = {arg: json_type(spec) for arg, spec in providing_args.items()}
        args = list(providing_args)
        bad = [arg for arg in args if not isinstance(arg, str) or not arg]
        if bad:
            raise SignalException(f'signal {name!r}: argument names must be strings: {bad!r}')
        if type_map:
            types.update({arg: _python_type(spec) for arg, spec in type_map.items()})
        if not isinstance(strict, bool):
            raise SignalException(f'signal {name!r}: strict must be true or false, '
                                  f'not {strict!r}')
        self.name = name
        self.providing_args = args
        self.type_map = dict(type_map) if type_map else (
            {arg: providing_args[arg] for arg in args}
            if isinstance(providing_args, Mapping) else None)
        self.strict = strict
        self._args = frozenset(args)
        self._types = types
        self._payload_type = self._compile(types) if types else None
        self._register()

    def _definition(self) -> tuple[Any, ...]:
        """What a re-declaration must repeat: arguments, their types, strictness."""
        return tuple(self.providing_args), self._types, self.strict

    def _describe(self) -> str:
        types = {arg: getattr(tp, '__name__', None) or str(tp) for arg, tp in self._types.items()}
        return (f'providing_args={self.providing_args!r}'
                + (f', types {types}' if types else '') + (', strict' if self.strict else ''))

    def _register(self) -> None:
        known = Signal._registry.get(self.name)
        if known is not None and known._definition() != self._definition():
            raise SignalException(
                f'signal {self.name!r} is already declared with other arguments '
                f'({known._describe()}; now {self._describe()}): declare a signal once, '
                f'or with the same arguments everywhere')
        Signal._registry[self.name] = self

    def _compile(self, types: dict[str, Any]) -> Any:
        fields = [(arg, Union[tp, msgspec.UnsetType], msgspec.UNSET)  # noqa: UP007
                  for arg, tp in types.items()]
        try:
            payload_type = msgspec.defstruct(f'{self.name}_payload', fields)
            msgspec.convert({}, payload_type)
        except (TypeError, ValueError) as exc:
            raise SignalException(f'signal {self.name!r}: unsupported type_map: {exc}') from exc
        return payload_type

    def make_channel_name(self, prefix: str, sender: str = '*') -> str:
        """The pub/sub channel of this signal: ``{prefix}:{name}:{sender}``."""
        return f'{prefix}:{self.name}:{sender}'

    def check(self, payload: Mapping[str, Any]) -> str | None:
        """Describe how ``payload`` differs from the declaration, or return None."""
        problems = []
        keys = payload.keys()
        if keys != self._args:
            missing = sorted(self._args - keys)
            unexpected = sorted(keys - self._args)
            if missing:
                problems.append(f'missing {", ".join(missing)}')
            if unexpected:
                problems.append(f'unexpected {", ".join(unexpected)}')
        if self._payload_type is not None:
            try:
                msgspec.convert(payload, self._payload_type)
            except msgspec.ValidationError as exc:
                problems.append(str(exc))
        return '; '.join(problems) or None


class Queue(_Registry):
    """A declared durable work queue.

    ``exchange`` and ``topics`` matter to the AMQP broker: the queue is bound to that
    exchange by each topic (routing key), and ``send(..., topic=...)`` publishes through
    it. Other brokers use the name alone. Each instance registers itself by name, with
    its dead-letter queue ``{name}.dead`` (so ``broker.<name>.dead`` works at once).
    Declaring a name again with the same exchange and topics is allowed; with others it
    raises :class:`QueueException`::

        mailer = Queue('mailer')
        orders = Queue('orders', exchange='shop', topics=('order.created', 'order.paid'))
    """

    _registry: ClassVar[dict[str, Queue]] = {}
    _kind = 'queue'
    _not_found = QueueNotFound

    exchange: str
    topics: tuple[str, ...]
    _automatic: bool

    def __init__(self, name: str, exchange: str = '', topics: Iterable[str] = ()) -> None:
        if not isinstance(name, str) or not _QUEUE_NAME.match(name):
            raise QueueException(
                f'queue name {name!r} must be 1-200 characters of letters, digits, _ . : -')
        _refuse_taken_name('queue', name, _broker_attributes(), QueueException)
        if not isinstance(exchange, str):
            raise QueueException(f'queue {name!r}: exchange must be a string')
        if isinstance(topics, str):
            topics = (topics,)
        topics = tuple(topics)
        if not all(isinstance(topic, str) and topic for topic in topics):
            raise QueueException(f'queue {name!r}: topics must be non-empty strings')
        self.name = name
        self.exchange = exchange
        self.topics = topics
        self._automatic = False
        known = Queue._registry.get(name)
        if known is not None and not known._automatic and (
                (known.exchange, known.topics) != (exchange, topics)):
            raise QueueException(
                f'queue {name!r} is already declared with exchange={known.exchange!r}, '
                f'topics={known.topics!r} (now exchange={exchange!r}, topics={topics!r}): '
                f'declare a queue once, or with the same arguments everywhere')
        Queue._registry[name] = self
        dead = f'{name}.dead'
        if dead not in Queue._registry:
            Queue._registry[dead] = Queue._dead_letter_of(name)

    @classmethod
    def _dead_letter_of(cls, name: str) -> Queue:
        """The dead-letter queue of ``name``, not registered (and without one of its own):
        a declaration of the same name by the user replaces it."""
        queue = cls.__new__(cls)
        queue.name, queue.exchange, queue.topics = f'{name}.dead', '', ()
        queue._automatic = True
        return queue

    @property
    def dead_letter(self) -> Queue:
        """The queue ``{name}.dead`` where messages that could not be handled end up."""
        return Queue._registry.get(f'{self.name}.dead') or Queue._dead_letter_of(self.name)

    def serialize(self, data: Mapping[str, Any]) -> bytes:
        """A message as JSON bytes; queue messages are JSON objects."""
        if not isinstance(data, Mapping):
            raise SerializingError(
                f'queue {self.name!r}: a message must be a dict, not {type(data).__name__}')
        return encode_json(data)


def _read_source(source: str) -> tuple[str, bytes]:
    """The bytes behind ``file://PATH``, a plain path or an ``http(s)://`` URL."""
    if source.startswith(('http://', 'https://')):
        import urllib.request
        try:
            with urllib.request.urlopen(source, timeout=LOAD_TIMEOUT) as response:
                return source, bytes(response.read())
        except OSError as exc:
            raise SerializingError(f'{source}: cannot download: {exc}') from exc
    path = source[len('file://'):] if source.startswith('file://') else source
    try:
        with open(path, 'rb') as file:
            return path, file.read()
    except OSError as exc:
        raise SerializingError(f'{path}: cannot read: {exc.strerror or exc}') from exc


LOAD_TIMEOUT = 10.0


def _parse_declarations(where: str, raw: bytes) -> JSONObject:
    try:
        return decode_object(raw)
    except SerializingError as exc:
        position = re.search(r'\(byte (\d+)\)', str(exc.__cause__))
        if position:
            offset = int(position.group(1))
            line = raw.count(b'\n', 0, offset) + 1
            column = offset - (raw.rfind(b'\n', 0, offset) + 1) + 1
            reason = str(exc.__cause__).split(' (byte')[0]
            raise SerializingError(f'{where}:{line}:{column}: {reason}') from None
        raise SerializingError(f'{where}: {exc.__cause__}') from None


def _entries(where: str, data: JSONObject, key: str) -> list[JSONObject]:
    entries = data.get(key, [])
    error = SignalException if key == 'signals' else QueueException
    if not isinstance(entries, list):
        raise error(f'{where}: "{key}" must be a list')
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get('name'), str):
            raise error(f'{where}: {key}[{index}] must be an object with a "name" string')
    return entries


def _field_name(name: str) -> str:
    field = re.sub(r'\W', '_', name)
    if field[0].isdigit() or field[0] == '_':
        field = f'n{field}'
    return f'{field}_' if keyword.iskeyword(field) else field


def _named(kind: str, items: dict[str, Any]) -> Any:
    fields: dict[str, Any] = {}
    for name, item in items.items():
        fields.setdefault(_field_name(name), item)
    return collections.namedtuple(kind, list(fields))(*fields.values())


def _declared_at(where: str, kind: type, *args: Any) -> None:
    try:
        kind(*args)
    except (SignalException, QueueException) as exc:
        raise type(exc)(f'{where}: {exc}') from None


def load_stuff(source: str) -> tuple[Any, Any]:
    """Declare the signals and queues of a JSON file and return them as named tuples.

    ``source`` is ``file://PATH``, a plain path, or an ``http(s)://`` URL (fetched with a
    timeout). The file looks like::

        {"signals": [{"name": "user_created", "providing_args": ["user_id"]},
                     {"name": "typed", "providing_args": {"uuid": "string",
                                                          "code": ["number", "null"]}}],
         "queues": [{"name": "mailer"},
                    {"name": "orders", "exchange": "shop", "topics": ["order.*"]}]}

    The file is checked whole before anything is declared; an error names the file, the
    line and the problem. Returns ``(signals, queues)`` holding every declared one
    (names that are not identifiers have their other characters turned into ``_``).
    """
    where, raw = _read_source(source)
    data = _parse_declarations(where, raw)
    signals, queues = _entries(where, data, 'signals'), _entries(where, data, 'queues')
    saved = dict(Signal._registry), dict(Queue._registry)
    try:
        for index, entry in enumerate(signals):
            args = entry.get('providing_args', [])
            if not isinstance(args, (list, dict)):
                raise SignalException(
                    f'{where}: signals[{index}] ({entry["name"]}): "providing_args" must be a '
                    f'list of names or an object of name: JSON type')
            _declared_at(f'{where}: signals[{index}]', Signal, entry['name'], args, None,
                         entry.get('strict', False))
        for index, entry in enumerate(queues):
            _declared_at(f'{where}: queues[{index}]', Queue, entry['name'],
                         entry.get('exchange', ''), entry.get('topics', ()))
    except (SignalException, QueueException):
        Signal._registry.clear()
        Signal._registry.update(saved[0])
        Queue._registry.clear()
        Queue._registry.update(saved[1])
        raise
    return _named('signals', Signal.get_all()), _named('queues', Queue.get_all())


def load_signals(source: str) -> Any:
    """Declare the signals (and queues) of a JSON file; return the signals named tuple."""
    return load_stuff(source)[0]


def load_queues(source: str) -> Any:
    """Declare the queues (and signals) of a JSON file; return the queues named tuple."""
    return load_stuff(source)[1]


# =====================================================================================
# Decorators: receiver, consumer, periodic, cron, on
# =====================================================================================

MIN_TIMEOUT = 0.001
HOOK_LABELS = ('pre_start', 'post_start', 'pre_stop', 'server')


class ReceiverArgs(msgspec.Struct, frozen=True):
    """``@receiver``: the method receives these signals."""
    signals: tuple[Signal, ...]
    timeout: float
    concurrency: int | None = None  # None: the bus's RECEIVER_CONCURRENCY


class ConsumerArgs(msgspec.Struct, frozen=True):
    """``@consumer``: the method consumes this queue."""
    queue: Queue
    timeout: float
    dto_class: type | None
    dto_name: str
    options: dict[str, Any]


class PeriodicArgs(msgspec.Struct, frozen=True):
    """``@periodic``: the method runs every ``period`` seconds."""
    period: float
    timeout: float
    start_after: float
    singleton: bool | str = False


class CronArgs(msgspec.Struct, frozen=True):
    """``@cron``: the method runs on a cron schedule."""
    spec: str
    timeout: float
    tz: str | None
    singleton: bool | str = False


class HookArgs(msgspec.Struct, frozen=True):
    """``@on``: the method runs at a lifecycle event, or as a server task."""
    label: str
    singleton: bool | str = False


Declaration = ReceiverArgs | ConsumerArgs | PeriodicArgs | CronArgs | HookArgs


def _declare(func: Func, declaration: Declaration) -> Func:
    if isinstance(func, (staticmethod, classmethod)) or not callable(func):
        raise TypeError(f'{declaration.__class__.__name__[:-4].lower()} decorates methods '
                        f'of a MicroAgent, not {func!r}')
    func.__microagent__ = (*getattr(func, '__microagent__', ()), declaration)  # type: ignore[attr-defined]
    return func


def _seconds(what: str, value: Any, minimum: float = MIN_TIMEOUT) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f'{what} must be a number of seconds, not {value!r}')
    if value < minimum or (minimum > 0 and value == minimum):
        raise ValueError(f'{what} must be more than {minimum} s, not {value!r}'
                         if minimum > 0 else f'{what} must be >= 0, not {value!r}')
    return float(value)


def _count(what: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'{what} must be an integer, not {value!r}')
    if value < minimum:
        raise ValueError(f'{what} must be >= {minimum}, not {value!r}')
    return value


def _singleton(value: Any) -> bool | str:
    """Check the ``singleton=`` argument: a bool, or a key (a non-empty string)."""
    if isinstance(value, bool) or (isinstance(value, str) and value.strip() == value != ''):
        return value
    raise TypeError(f'singleton must be True, False or a key (a non-empty string without '
                    f'surrounding spaces), not {value!r}')


def _singleton_key(agent_class: type, method: str, singleton: bool | str) -> str | None:
    """The key that coordinates a singleton handler: ``module.Class.method`` for
    ``singleton=True``, the string given otherwise; None for a handler that is not one."""
    if singleton is False:
        return None
    if singleton is True:
        return f'{agent_class.__module__}.{agent_class.__qualname__}.{method}'
    return singleton


def receiver(*signals: Signal | str, timeout: float = 60, concurrency: int | None = None
             ) -> Callable[[Func], Func]:
    """Receive signals: the method is called as ``handler(signal=, sender=, **payload)``.

    A method may receive several signals and a signal may have many receivers. The
    return value (any JSON value) is the method's answer to an RPC ``call``. A call
    that outlives ``timeout`` seconds is cancelled and logged::

        @receiver(signals.user_created, signals.user_deleted, timeout=10)
        async def on_user(self, signal, sender, user_id, **kwargs): ...

    At most ``concurrency`` calls of the method run at once (default: the bus's
    ``RECEIVER_CONCURRENCY``, 100; ``1`` keeps the order of its signals); the signals
    that come meanwhile wait, up to the bus's ``RECEIVER_BACKLOG``, and past that are
    dropped, counted and logged (see the README, Signal bus: floods).
    """
    if not signals:
        raise TypeError('receiver() needs at least one signal')
    declared = tuple(s if isinstance(s, Signal) else Signal.get(s) for s in signals)
    if concurrency is not None:
        concurrency = _count('receiver concurrency', concurrency, minimum=1)
    args = ReceiverArgs(declared, _seconds('receiver timeout', timeout), concurrency)
    return lambda func: _declare(func, args)


def consumer(queue: Queue | str, timeout: float = 60, dto_class: type | None = None,
             dto_name: str | None = None, **options: Any) -> Callable[[Func], Func]:
    """Consume a queue: the method is called as ``handler(**message)``.

    With ``dto_class`` the message is also given as ``dto_class(**message)`` (or
    ``msgspec.convert(message, dto_class)`` for a ``msgspec.Struct``) under ``dto_name``
    (default ``dto``). The AMQP and Kafka brokers add their raw message as ``amqp=`` /
    ``kafka=``. Options:

    - ``concurrency`` (default 10): handlers running at once; ``1`` keeps order.
    - ``retries`` (default the broker's ``ROLLBACK_ATTEMPTS``, 3): further attempts after
      a failure or a timeout, ``backoff`` seconds apart (default the broker's
      ``RETRY_BACKOFF``, 0.5, doubled each time); then the message goes to
      ``{queue}.dead``.
    - ``retry_on`` (default: every exception): a tuple of the exception classes to
      retry (a timeout is a ``TimeoutError``); any other goes to ``{queue}.dead`` at once.
    - ``max_backoff`` (default 300): the most seconds between two attempts. A message
      waiting for its retry does not hold a slot of ``concurrency`` (except with
      ``concurrency=1``, which keeps the order: others wait behind it).
    - ``autoack`` (default True): acknowledge after the handler succeeds; False leaves
      it to the handler (AMQP ``broker.putout(amqp)``).
    - backend options, checked when the agent starts.
    """
    declared = queue if isinstance(queue, Queue) else Queue.get(queue)
    if dto_class is not None and not isinstance(dto_class, type):
        raise TypeError(f'dto_class must be a class, not {dto_class!r}')
    if dto_name is not None and (not isinstance(dto_name, str) or not dto_name.isidentifier()):
        raise ValueError(f'dto_name must be an identifier, not {dto_name!r}')
    if isinstance(options.get('retry_on'), type):
        options['retry_on'] = (options['retry_on'],)
    common = {key: value for key, value in options.items()
              if key in ConsumerOptions.__struct_fields__}
    for key in options.keys() - common.keys():
        hint = _did_you_mean(key, ConsumerOptions.__struct_fields__)
        if hint:  # near a common option: a typo, whatever the broker
            raise QueueException(f'unknown consumer option {key}{hint}')
    try:
        msgspec.convert(common, ConsumerOptions)
    except msgspec.ValidationError as exc:
        raise ValueError(_option_problem(exc)) from None
    args = ConsumerArgs(declared, _seconds('consumer timeout', timeout), dto_class,
                        dto_name or 'dto', dict(options))
    return lambda func: _declare(func, args)


def periodic(period: float, timeout: float = 1, start_after: float = 0,
             singleton: bool | str = False) -> Callable[[Func], Func]:
    """Run the method every ``period`` seconds, first after ``start_after`` seconds.

    Each run is cancelled after ``timeout`` seconds; an exception is logged and the
    schedule goes on. A tick that comes while the previous run is still going is
    skipped (with a warning) rather than piling runs up::

        @periodic(period=5, timeout=4, start_after=10)
        async def refresh_cache(self): ...

    ``singleton=True``: each tick runs on one agent only, among all the running agents
    of the class that share the bus (``singleton='KEY'`` coordinates under another key
    than ``module.Class.method``). The ticks are then the multiples of ``period`` on
    the Unix clock (the first one at least ``start_after`` seconds after the start),
    and each is claimed on the bus; see "Singleton timers and servers" in the README.
    """
    args = PeriodicArgs(_seconds('period', period), _seconds('timeout', timeout),
                        _seconds('start_after', start_after, minimum=0),
                        _singleton(singleton))
    return lambda func: _declare(func, args)


CRON_ALIASES = frozenset({'@yearly', '@annually', '@monthly', '@weekly', '@daily',
                          '@midnight', '@hourly'})


def _optional_dependency(module: str, needed_for: str) -> Any:
    """Import a dependency that only some features of the core need (``croniter``,
    ``graphviz``), or raise an ImportError that says what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f'{needed_for} needs the {module} package: pip install {module}'
                          ) from None


def _import_croniter() -> Any:
    return _optional_dependency('croniter', '@cron').croniter


GRAPHVIZ_NEEDED_FOR = 'drawing the graph as dot, svg or png (mermaid and json need nothing)'


def _timezone(tz: str | None) -> Any:
    if tz is None:
        import datetime
        return datetime.timezone.utc
    import zoneinfo
    try:
        return zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f'unknown time zone {tz!r}') from exc


def cron(spec: str, timeout: float = 1, tz: str | None = None,
         singleton: bool | str = False) -> Callable[[Func], Func]:
    """Run the method on a cron schedule, evaluated in UTC unless ``tz`` names a zone.

    ``spec`` is a standard 5-field spec (minute hour day-of-month month day-of-week),
    optionally with croniter's 6th field for the seconds (``'* * * * * */10'``: every
    10 seconds), or an alias such as ``@hourly``; a wrong spec raises ``ValueError``
    here, at decoration time::

        @cron('0 */4 * * *', timeout=60)
        async def send_report(self): ...

    ``singleton=True`` (or ``singleton='KEY'``): each scheduled time runs on one agent
    only, among all the running agents of the class that share the bus, as for
    :func:`periodic`.
    """
    if not isinstance(spec, str):
        raise TypeError(f'cron spec must be a string, not {spec!r}')
    fields = spec.split()
    if not (len(fields) in (5, 6)
            or (len(fields) == 1 and fields[0].lower() in CRON_ALIASES)):
        raise ValueError(
            f'cron spec {spec!r} must have 5 fields (minute hour day month weekday), '
            f'6 with the seconds last, or be one of {", ".join(sorted(CRON_ALIASES))}')
    croniter = _import_croniter()
    try:
        croniter(spec.lower() if spec.startswith('@') else spec)
    except (ValueError, KeyError) as exc:
        raise ValueError(f'cron spec {spec!r} is not valid: {exc}') from None
    _timezone(tz)
    args = CronArgs(spec, _seconds('timeout', timeout), tz, _singleton(singleton))
    return lambda func: _declare(func, args)


def on(label: str, singleton: bool | str = False) -> Callable[[Func], Func]:
    """Run the method at a lifecycle event, or as a server.

    ``pre_start`` (before anything is bound), ``post_start`` (everything is live),
    ``pre_stop`` (the agent is about to stop, still fully working), and ``server``: a
    task that runs for the life of the agent; raising :class:`ServerInterrupt` stops
    the agent gracefully::

        @on('server')
        async def run_http(self):
            await serve()
            raise ServerInterrupt('done')

    ``@on('server', singleton=True)`` (or ``singleton='KEY'``): the server runs on one
    agent at a time, among all the running agents of the class that share the bus: the
    holder of a lease on the bus, renewed every third of the bus's ``LEASE_TTL``. The
    server is cancelled when the lease cannot be renewed, before it could expire, and
    another agent takes over. :meth:`MicroAgent.lease_token` gives the fencing token of
    the lease held. See "Singleton timers and servers" in the README.
    """
    if label not in HOOK_LABELS:
        raise ValueError(f'hook label {label!r} is not one of {", ".join(HOOK_LABELS)}')
    if singleton is not False and label != 'server':
        raise ValueError(f"singleton is for @on('server'), not for @on({label!r})")
    args = HookArgs(label, _singleton(singleton))
    return lambda func: _declare(func, args)


# =====================================================================================
# Agent: collects declarations over the MRO, binds them to a bus and a broker
# =====================================================================================

if sys.version_info >= (3, 11):
    async def _with_timeout(awaitable: Awaitable[Any], timeout: float) -> Any:
        async with asyncio.timeout(timeout):
            return await awaitable
else:  # pragma: no cover - Python 3.10
    async def _with_timeout(awaitable: Awaitable[Any], timeout: float) -> Any:
        return await asyncio.wait_for(awaitable, timeout)


async def _call(func: Callable[..., Any], timeout: float | None, **kwargs: Any) -> Any:
    """Call a sync or async handler; an async one is cancelled after ``timeout``."""
    result = func(**kwargs)
    if inspect.isawaitable(result):
        return await (_with_timeout(result, timeout) if timeout else result)
    return result


async def cancel_and_wait(task: asyncio.Task[Any] | None, patience: float = 0.1) -> None:
    """Cancel ``task`` and wait until it ended, cancelling it again every ``patience``
    seconds: on Python < 3.12, ``asyncio.wait_for`` (which client libraries use around a
    write) swallows a cancellation that arrives as its inner call completes, and the task
    would go on. Its exception, if any, is retrieved (tasks log their own failures)."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=patience)
    if not task.cancelled():
        task.exception()


class Watchdog:
    """Cancels the tasks that outlive their deadline, checking a few times per timeout:
    one timer for many tasks instead of a timeout per call, on the hot paths (receivers,
    consumers). A task watched with :meth:`watch` is cancelled once past its deadline;
    its ``CancelledError`` then means a timeout (:meth:`expired`), and :meth:`forget`,
    called when the guarded call ended, consumes that cancellation."""

    def __init__(self) -> None:
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._interval = 1.0

    def watch(self, task: asyncio.Task[Any], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self._deadlines[task] = loop.time() + timeout
        self._interval = min(self._interval, max(timeout / 10, 0.005))
        if self._timer is None:
            self._timer = loop.call_later(self._interval, self._check)

    def expired(self, task: asyncio.Task[Any]) -> bool:
        return task in self._expired

    def forget(self, task: asyncio.Task[Any]) -> None:
        self._deadlines.pop(task, None)
        if task in self._expired:
            self._expired.discard(task)
            if sys.version_info >= (3, 11):
                task.uncancel()

    def _check(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for task, deadline in self._deadlines.items():
            if deadline <= now and task not in self._expired:
                self._expired.add(task)
                task.cancel()
        self._timer = loop.call_later(self._interval, self._check) if self._deadlines else None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _collect_declarations(cls: type) -> dict[str, tuple[Declaration, ...]]:
    """Method name -> declarations, over the MRO: the most derived declaration wins.

    An override without a decorator keeps the declaration of its base (the override
    is what gets called); setting the attribute to None removes it.
    """
    found: dict[str, tuple[Declaration, ...]] = {}
    for klass in reversed(cls.__mro__):
        for name, attr in vars(klass).items():
            declarations = getattr(attr, '__microagent__', None)
            if declarations:
                found[name] = tuple(declarations)
            elif attr is None:
                found.pop(name, None)
    consumed: dict[str, str] = {}
    for name, declarations in found.items():
        for declaration in declarations:
            if isinstance(declaration, ConsumerArgs):
                other = consumed.setdefault(declaration.queue.name, name)
                if other != name:
                    raise TypeError(
                        f'{cls.__name__}: {other} and {name} both consume queue '
                        f'{declaration.queue.name!r}; a queue has one consumer per agent')
    return found


INFO_SOURCES: list[Callable[[type], Mapping[str, Any]]] = []
"""What :meth:`MicroAgent.info` adds to the declarations it reports: the graph (see
:func:`sent_by`) adds what the agent sends, calls and produces."""


def handler_key(agent_class: type, handler: Callable[..., Any]) -> str:
    """``Class.method``: how a handler is named in logs, RPC answers, metrics and status."""
    return f'{agent_class.__name__}.{handler.__name__}'


class Receiver(msgspec.Struct, eq=False):
    """A receiver method of a running agent, bound to one signal."""
    agent: MicroAgent
    handler: Callable[..., Any]
    signal: Signal
    timeout: float
    concurrency: int | None = None  # None: the bus's RECEIVER_CONCURRENCY
    timing: Any = None  # the durations of its calls, when marun reports them (HandlerTimes)
    lane: Any = None  # its calls on the bus it is bound to (the bus's _Lane of the method)

    @property
    def key(self) -> str:
        """``Class.method``: the key of this receiver's RPC answers."""
        return handler_key(type(self.agent), self.handler)

    def __repr__(self) -> str:
        return f'<Receiver {self.key} of {self.signal.name}>'


class Consumer(msgspec.Struct, eq=False):
    """A consumer method of a running agent, bound to its queue."""
    agent: MicroAgent
    handler: Callable[..., Any]
    queue: Queue
    timeout: float
    dto_class: type | None
    dto_name: str
    options: dict[str, Any]

    @property
    def key(self) -> str:
        return handler_key(type(self.agent), self.handler)

    def __repr__(self) -> str:
        return f'<Consumer {self.key} of {self.queue.name}>'


class MicroAgent:
    """A service: signal receivers, queue consumers, timers and hooks, declared with
    decorators and bound to ``bus`` and ``broker`` by :meth:`start`.

    :param bus: an :class:`AbstractSignalBus`, needed to receive (or send) signals.
    :param broker: an :class:`AbstractQueueBroker`, needed to consume (or send) messages.
    :param log: a ``logging.Logger`` (default ``microagent.<ClassName>``).
    :param settings: a dict of the service's own settings, kept as ``self.settings``.

    An agent with receivers and no bus, or consumers and no broker, is refused here.
    ``MicroAgent.declarations`` maps each decorated method name to its declarations;
    the same structure binds handlers at run time and draws the topology graph.
    """

    declarations: ClassVar[dict[str, tuple[Declaration, ...]]] = {}

    topology: ClassVar[dict[str, list[str]]] = {}
    """What the topology graph cannot find in the source: ``{'sends': [...], 'calls':
    [...], 'produces': [...]}``, signal names (sends, calls) and queue names (produces).

    The graph reads the source of the class and of its bases for
    ``self.bus.X.send(...)``, ``self.bus.X.call(...)``, ``self.bus.X.waiter(...)`` and
    ``self.broker.X.send(...)`` (also through a local alias such as ``bus = self.bus``);
    declare here what is sent some other way, e.g. a name computed at run time. The
    declarations of a class and of its bases add up::

        class Relay(MicroAgent):
            topology = {'sends': ['user_created'], 'produces': ['mailer']}
    """

    log: logging.Logger
    bus: AbstractSignalBus | None
    broker: AbstractQueueBroker | None
    settings: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.declarations = _collect_declarations(cls)

    def __init__(self, bus: AbstractSignalBus | None = None,
                 broker: AbstractQueueBroker | None = None,
                 log: logging.Logger | None = None, settings: dict[str, Any] | None = None,
                 *, logger: logging.Logger | None = None) -> None:
        self.bus = bus
        self.broker = broker
        self.log = log or logger or logging.getLogger(f'microagent.{type(self).__name__}')
        self.settings = settings if settings is not None else {}
        self.receivers: list[Receiver] = []
        self.consumers: list[Consumer] = []
        self.periodic_tasks: list[PeriodicTask] = []
        self.cron_tasks: list[CronTask] = []
        self.hooks: dict[str, list[Callable[..., Any]]] = {label: [] for label in HOOK_LABELS}
        self.leased_servers: dict[str, LeasedServer] = {}
        self._bind_declarations()
        self._check_transport()
        self._state = 'new'
        self._servers: set[asyncio.Task[Any]] = set()
        self._stopped: asyncio.Future[None] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    def _bind_declarations(self) -> None:
        for name, declarations in self.declarations.items():
            handler = getattr(self, name)
            for d in declarations:
                if isinstance(d, ReceiverArgs):
                    self.receivers.extend(Receiver(self, handler, s, d.timeout, d.concurrency)
                                          for s in d.signals)
                elif isinstance(d, ConsumerArgs):
                    self.consumers.append(Consumer(
                        self, handler, d.queue, d.timeout, d.dto_class, d.dto_name, d.options))
                elif isinstance(d, PeriodicArgs):
                    self.periodic_tasks.append(PeriodicTask(self, handler, d))
                elif isinstance(d, CronArgs):
                    self.cron_tasks.append(CronTask(self, handler, d))
                else:
                    self.hooks[d.label].append(handler)
                    key = _singleton_key(type(self), handler.__name__, d.singleton)
                    if key is not None:
                        self.leased_servers[handler.__name__] = LeasedServer(self, handler, key)

    def _check_transport(self) -> None:
        name = type(self).__name__
        if self.bus is not None and not isinstance(self.bus, AbstractSignalBus):
            raise SignalException(f'{name}: bus must be an AbstractSignalBus, not {self.bus!r}')
        if self.broker is not None and not isinstance(self.broker, AbstractQueueBroker):
            raise QueueException(
                f'{name}: broker must be an AbstractQueueBroker, not {self.broker!r}')
        if self.receivers and self.bus is None:
            methods = sorted({r.handler.__name__ for r in self.receivers})
            raise SignalException(
                f'{name} receives signals ({", ".join(methods)}) but has no bus: pass bus=')
        if self.consumers and self.broker is None:
            methods = sorted(c.handler.__name__ for c in self.consumers)
            raise QueueException(
                f'{name} consumes queues ({", ".join(methods)}) but has no broker: pass broker=')
        singletons = sorted({method for method, _, _ in self._singletons()})
        if singletons and self.bus is None:
            raise SignalException(
                f'{name} has singleton handlers ({", ".join(singletons)}) but no bus: the '
                'agents of a class agree through their bus on which one runs them; pass bus=')
        if self.leased_servers and self.bus is not None:
            _seconds(f'LEASE_TTL of {self.bus!r}', self.bus.LEASE_TTL)

    def _singletons(self) -> list[tuple[str, str, str]]:
        """``(method, kind, key)`` of the singleton handlers, sorted."""
        timers: list[tuple[str, _Timer]] = [
            *(('periodic', t) for t in self.periodic_tasks),
            *(('cron', t) for t in self.cron_tasks)]
        found = [(t.handler.__name__, kind, t.singleton) for kind, t in timers
                 if t.singleton is not None]
        found += [(name, 'server', server.key) for name, server in self.leased_servers.items()]
        return sorted(found)

    def lease_token(self, method: str) -> int | None:
        """The fencing token of the lease under which the singleton server ``method``
        runs now, or None when this agent does not hold it.

        Tokens only grow: each new holder of the lease gets a larger one (while the bus
        server keeps its data). A server that writes to another system should send the
        token with each write and have that system refuse a token smaller than the
        largest it has seen, so that a holder that was paused past its lease (GC, a
        stopped VM) cannot overwrite the work of the next one.
        """
        server = self.leased_servers.get(method)
        if server is None:
            raise ValueError(f'{type(self).__name__}.{method} is not a singleton server')
        return server.fence

    def __repr__(self) -> str:
        return f'<MicroAgent {type(self).__name__}>'

    async def __aenter__(self) -> MicroAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self, enable_periodic_tasks: bool = True,
                    enable_receiving_signals: bool = True,
                    enable_consuming_messages: bool = True,
                    enable_servers_running: bool = True) -> None:
        """Run ``pre_start`` hooks, bind receivers and consumers, start timers, run
        ``post_start`` hooks and start servers.

        Returns once every subscription and consumer is live: a signal sent or a
        message queued the moment it returns is received. Servers keep running in the
        background; :meth:`wait` waits for the agent to stop. If starting fails, what
        was started is stopped again and the error propagates.
        """
        if self._state != 'new':
            raise RuntimeError(f'{self!r} was already started')
        self._state = 'starting'
        self._stopped = asyncio.get_running_loop().create_future()
        try:
            await self._run_hooks('pre_start')
            _tracing.refresh()  # a tracer provider set in a pre_start hook counts
            if enable_receiving_signals and self.receivers:
                assert self.bus is not None
                await self.bus.bind_receivers(self.receivers)
            if enable_consuming_messages and self.consumers:
                assert self.broker is not None
                await asyncio.gather(*(self.broker.bind_consumer(c) for c in self.consumers))
            if enable_periodic_tasks:
                for task in (*self.periodic_tasks, *self.cron_tasks):
                    task.start()
            await self._run_hooks('post_start')
            if enable_servers_running:
                for server in self.hooks['server']:
                    self._start_server(server)
        except BaseException:
            self._state = 'started'
            await self.stop()
            raise
        self._state = 'started'
        self.log.info('%r started', self)

    async def _run_hooks(self, label: str) -> None:
        for hook in self.hooks[label]:
            await _call(hook, None)

    def _start_server(self, server: Callable[..., Any]) -> None:
        leased = self.leased_servers.get(server.__name__)
        task = asyncio.get_running_loop().create_task(
            leased.run() if leased is not None else _call(server, None))
        self._servers.add(task)
        task.add_done_callback(lambda done: self._server_done(server, done))

    def _server_done(self, server: Callable[..., Any], task: asyncio.Task[Any]) -> None:
        self._servers.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self.log.info('Server %s finished', server.__name__)
            return
        if isinstance(exc, ServerInterrupt):
            self.log.info('Server %s interrupted the agent: %s', server.__name__, exc)
        else:
            _log_failed(self.log, exc, 'Server %s failed', server.__name__)
            self._failure = self._failure or exc
        if self._state in ('starting', 'started'):
            self._stopping = asyncio.get_running_loop().create_task(self.stop())

    async def stop(self, grace: float | None = None) -> None:
        """Stop gracefully: run ``pre_stop`` hooks, stop timers, close subscriptions,
        stop taking messages, let in-flight handlers finish and acknowledge them.

        Each in-flight handler has until its own timeout to finish, or until ``grace``
        seconds when given; one still running then is cancelled and its message goes
        back to the queue. Calling it again waits for the first call.
        """
        if self._state in ('stopping', 'stopped'):
            if self._stopped is not None:
                await asyncio.shield(self._stopped)
            return
        if self._state == 'new':
            self._state = 'stopped'
            return
        self._state = 'stopping'
        try:
            try:
                await self._run_hooks('pre_stop')
            except Exception:
                self.log.exception('pre_stop hook failed')
            await self._shut_down(grace)
        finally:
            self._state = 'stopped'
            if self._stopped is not None and not self._stopped.done():
                self._stopped.set_result(None)
            self.log.info('%r stopped', self)

    async def _shut_down(self, grace: float | None) -> None:
        timers = (*self.periodic_tasks, *self.cron_tasks)
        for timer in timers:
            timer.stop()
        if self.bus is not None and self.receivers:
            await self.bus.unbind_receivers(self.receivers)
        work: list[Awaitable[Any]] = []
        if self.broker is not None:
            work.extend(self.broker.unbind_consumer(c, grace) for c in self.consumers)
        if self.bus is not None:
            work.append(self.bus.drain(grace))
        work.extend(timer.drain(grace) for timer in timers)
        results = await asyncio.gather(*work, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                self.log.error('Stopping %r failed', self, exc_info=result)
        current = asyncio.current_task()
        servers = [task for task in self._servers if task is not current]
        await asyncio.gather(*(cancel_and_wait(task, patience=1.0) for task in servers))

    async def wait(self) -> None:
        """Wait until the agent has stopped: :meth:`stop` was called, or a server
        raised :class:`ServerInterrupt`, or a server failed, in which case its exception
        is raised here once the agent has stopped."""
        if self._stopped is None:
            raise RuntimeError(f'{self!r} was not started')
        await asyncio.shield(self._stopped)
        if self._stopping is not None:
            await self._stopping
        if self._failure is not None:
            raise self._failure

    def info(self) -> dict[str, Any]:
        """What the agent is made of, as a JSON-serializable dict."""
        return {
            'name': type(self).__name__,
            'class': f'{type(self).__module__}.{type(self).__qualname__}',
            'bus': repr(self.bus) if self.bus is not None else None,
            'broker': repr(self.broker) if self.broker is not None else None,
            'receivers': [{'name': r.handler.__name__, 'signal': r.signal.name,
                           'timeout': r.timeout, **_declared_concurrency(r)}
                          for r in self.receivers],
            'consumers': [{'name': c.handler.__name__, 'queue': c.queue.name,
                           'timeout': c.timeout, 'options': _jsonable(c.options),
                           'dto': c.dto_class.__name__ if c.dto_class else None}
                          for c in self.consumers],
            'periodic': [{'name': t.handler.__name__, 'period': t.args.period,
                          'timeout': t.args.timeout, 'start_after': t.args.start_after}
                         for t in self.periodic_tasks],
            'cron': [{'name': t.handler.__name__, 'cron': t.args.spec,
                      'timeout': t.args.timeout, 'tz': t.args.tz or 'UTC'}
                     for t in self.cron_tasks],
            'hooks': {label: [h.__name__ for h in handlers]
                      for label, handlers in self.hooks.items() if handlers},
            **{key: value for describe in INFO_SOURCES
               for key, value in describe(type(self)).items()},
            **self._singletons_info(),
        }

    def _singletons_info(self) -> dict[str, Any]:
        """``{'singletons': [...]}`` for :meth:`info`, or nothing without singletons."""
        singletons = self._singletons()
        if not singletons:
            return {}
        return {'singletons': [{'name': name, 'kind': kind, 'key': key}
                               for name, kind, key in singletons]}


def _declared_concurrency(receiver: Receiver) -> dict[str, int]:
    """``{'concurrency': N}`` for :meth:`MicroAgent.info` when the ``@receiver`` set it
    (as a consumer's options, only what was declared; else the bus's default holds)."""
    return {} if receiver.concurrency is None else {'concurrency': receiver.concurrency}


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {key: _jsonable_value(value) for key, value in options.items()}


def _jsonable_value(value: Any) -> Any:
    """An option as JSON: classes (``retry_on``'s exceptions) by their names."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, (tuple, list)) and all(isinstance(item, type) for item in value):
        return [item.__name__ for item in value]
    return repr(value)


# =====================================================================================
# Tracing: OpenTelemetry spans through signals, RPC, queues and timers
# =====================================================================================
#
# Off unless ``opentelemetry-api`` is installed (pip extra ``otel``) and the application
# set a tracer provider (an SDK one: the API's default proxy and no-op providers make
# nothing). ``_tracing.on`` is the one flag the hot paths test; it is worked out again,
# cheaply, when a bus or broker is made and when an agent starts (after its ``pre_start``
# hooks), and once on it stays on (OpenTelemetry sets the global provider only once).
#
# Spans follow the OpenTelemetry messaging conventions: ``send {signal}`` and
# ``publish {queue}`` (PRODUCER), ``receive {signal}`` and ``process {queue}`` (CONSUMER,
# children of the producer's span), ``call {signal}`` (CLIENT) and ``answer {signal}``
# (SERVER, one per answering receiver, children of the CLIENT span), and timer runs
# ``periodic Class.method`` / ``cron Class.method`` (INTERNAL). The W3C trace context
# travels in the headers of AMQP messages and Kafka records (the backends call
# :func:`trace_headers` and :meth:`AbstractQueueBroker.trace_carrier`); Redis and memory
# have no headers, so there it travels only with the bus or broker setting
# ``TRACE_CONTEXT=True``, in the reserved payload key ``_trace``, which is taken out
# before any handler sees the payload. It is off by default: 1.x peers would get it.

TRACE_KEY = '_trace'
"""The reserved payload key that carries the trace context on Redis and memory."""

_OPERATION_TYPES = {'PRODUCER': 'send', 'CLIENT': 'send', 'CONSUMER': 'process',
                    'SERVER': 'process'}
_MESSAGING_SYSTEMS = {'redis': 'redis', 'rediss': 'redis', 'unix': 'redis',
                      'amqp': 'rabbitmq', 'amqps': 'rabbitmq', 'kafka': 'kafka',
                      'memory': 'memory'}


class _TraceField(msgspec.Struct):
    """Only the ``_trace`` key of a message body: msgspec skips the rest unparsed."""

    carrier: Any = msgspec.field(default=None, name=TRACE_KEY)


def _messaging_system(dsn: str) -> str:
    """``messaging.system`` of a transport, from its DSN's scheme (``rabbitmq`` for
    ``amqp://``...)."""
    scheme = dsn.partition('://')[0].lower() if isinstance(dsn, str) else ''
    return _MESSAGING_SYSTEMS.get(scheme, scheme or 'unknown')


def _text_carrier(headers: Any) -> dict[str, str]:
    """Message headers (str or bytes values) as the text carrier a propagator reads."""
    if not isinstance(headers, Mapping):
        return {}
    return {str(key): value.decode('utf-8', 'replace')
            if isinstance(value, (bytes, bytearray)) else value
            for key, value in headers.items() if isinstance(value, (str, bytes, bytearray))}


class _Tracing:
    """The process's tracing state, and the span scopes that the bound signals, the bus,
    the consumer pools and the timers open at their own points while :attr:`on` (they
    test the flag once per path). Tracing calls none of them back: it is given what it
    records. :meth:`refresh`, :meth:`attempt_failed` and :meth:`dead_lettered` may be
    called at any time."""

    __slots__ = ('_context', '_decoder', '_propagate', '_provider', '_trace', '_tracer', 'on')

    def __init__(self) -> None:
        self.on = False
        self._provider: Any = None
        self._tracer: Any = None
        self._trace: Any = None  # the opentelemetry.trace module, once tracing is on
        self._context: Any = None  # opentelemetry.context
        self._propagate: Any = None  # opentelemetry.propagate
        self._decoder: msgspec.json.Decoder[_TraceField] | None = None

    def refresh(self) -> bool:
        """Whether an SDK tracer provider is set; checked again while it is not. Never
        imports OpenTelemetry unless the application did (or set the environment
        variable that names a provider)."""
        if self.on:
            return True
        trace = sys.modules.get('opentelemetry.trace')
        if trace is None:
            if 'OTEL_PYTHON_TRACER_PROVIDER' not in os.environ:
                return False
            try:
                from opentelemetry import trace
            except ImportError:
                return False
        assert trace is not None
        provider = trace.get_tracer_provider()
        if provider is self._provider:
            return False
        self._provider = provider
        tracer = provider.get_tracer('microagent', __version__)
        if isinstance(tracer, (trace.ProxyTracer, trace.NoOpTracer)):
            return False
        from opentelemetry import context, propagate
        self._trace, self._context, self._propagate = trace, context, propagate
        self._tracer, self.on = tracer, True
        return True

    # -- building blocks ----------------------------------------------------------------

    def _span(self, kind: str, transport: Any, destination: str, operation: str, *,
              parent: Any = None, attributes: Mapping[str, Any] | None = None) -> Any:
        """Start (not activate) the messaging span ``{operation} {destination}``;
        ``parent`` None means the current span."""
        return self._tracer.start_span(
            f'{operation} {destination}', context=parent,
            kind=getattr(self._trace.SpanKind, kind), attributes={
                'messaging.system': _messaging_system(transport.dsn),
                'messaging.destination.name': destination,
                'messaging.operation.name': operation,
                'messaging.operation.type': _OPERATION_TYPES[kind], **(attributes or {})})

    def _carrier(self, span: Any = None) -> dict[str, str]:
        """The W3C trace context of ``span`` (default: the current span) as text."""
        carrier: dict[str, str] = {}
        context = None if span is None else self._trace.set_span_in_context(span)
        self._propagate.inject(carrier, context)
        return carrier

    def _parent(self, carrier: Any) -> Any:
        """The context a consumer's span starts in: the producer's, extracted from
        ``carrier``, or a new trace (never the context the consuming task happens to
        run in)."""
        root = self._context.Context()
        if not carrier:
            return root
        return self._propagate.extract(_text_carrier(carrier), root)

    def _error(self, span: Any, description: str) -> None:
        span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, description))

    def headers(self) -> dict[str, str]:
        """The trace context of the current span, for a backend's message headers."""
        return self._carrier()

    # -- the scopes the hooks open ---------------------------------------------------------

    def producing(self, transport: Any, destination: str, operation: str,
                  attributes: Mapping[str, Any] | None = None) -> _SpanScope:
        """``with`` a PRODUCER span ``{operation} {destination}`` (``send {signal}``,
        ``publish {queue}``), current within the block, so that AMQP and Kafka put its
        context in the headers of what is sent. The block gets the context to put in the
        payload when the transport has ``TRACE_CONTEXT`` (else None)."""
        span = self._span('PRODUCER', transport, destination, operation, attributes=attributes)
        return _SpanScope(self, span, carry=transport.TRACE_CONTEXT)

    def calling(self, bus: Any, signal: str, sender: str) -> _SpanScope:
        """``with`` a CLIENT span ``call {signal}`` for an RPC request, which lasts as long
        as the block (the first answer, for ``call``); it is not made current. The block
        gets the context to put in the request when the bus has ``TRACE_CONTEXT``."""
        span = self._span('CLIENT', bus, signal, 'call',
                          attributes={'microagent.sender': sender})
        return _SpanScope(self, span, carry=bus.TRACE_CONTEXT, current=False)

    def receive(self, bus: Any, receiver: Receiver, signal: Signal, sender: str,
                payload: JSONObject, *, carrier: Any, request_id: str, watchdog: Watchdog
                ) -> Any:
        """Call a receiver in a CONSUMER span ``receive {signal}`` (for an RPC request, a
        SERVER span ``answer {signal}``), the child of the sender's span when the payload
        carried its context. An async receiver's span ends with its coroutine, as an
        error when ``watchdog`` cancelled it for its timeout."""
        kind, operation = ('SERVER', 'answer') if request_id else ('CONSUMER', 'receive')
        span = self._span(kind, bus, signal.name, operation, parent=self._parent(carrier),
                          attributes={'microagent.sender': sender,
                                      'microagent.handler': receiver.key})
        try:
            with _SpanScope(self, span, end=False):
                result = receiver.handler(signal=signal, sender=sender, **payload)
        except BaseException:
            span.end()
            raise
        if inspect.isawaitable(result):
            return self._finish_receiver(receiver, span, result, watchdog)
        span.end()
        return result

    async def _finish_receiver(self, receiver: Receiver, span: Any, awaitable: Awaitable[Any],
                               watchdog: Watchdog) -> Any:
        with _SpanScope(self, span):
            try:
                return await awaitable
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and watchdog.expired(task):
                    self._error(span, f'timed out after {receiver.timeout}s')
                raise

    def processing(self, broker: Any, queue: str, handler_key: str, carrier: Any
                   ) -> _SpanScope:
        """``with`` a CONSUMER span ``process {queue}``, the child of the producer's span
        (whose context ``carrier`` holds), current while the handler runs. Retries and
        the dead letter are events on it (:meth:`attempt_failed`, :meth:`dead_lettered`)."""
        span = self._span('CONSUMER', broker, queue, 'process', parent=self._parent(carrier),
                          attributes={'microagent.handler': handler_key})
        return _SpanScope(self, span)

    def carrier_in(self, body: bytes) -> Any:
        """The trace context in a message body's reserved ``_trace`` key (Redis, memory
        with ``TRACE_CONTEXT``), or None."""
        if self._decoder is None:
            self._decoder = msgspec.json.Decoder(_TraceField)
        try:
            return self._decoder.decode(body).carrier
        except msgspec.DecodeError:
            return None

    def event(self, name: str, attributes: Mapping[str, Any]) -> None:
        """An event on the current span."""
        self._trace.get_current_span().add_event(name, attributes)

    def attempt_failed(self, error: BaseException, attempt: int, attempts: int) -> None:
        """A handler failed: the exception on the consumer span, and a ``retry`` event
        when another attempt follows."""
        if not self.on:
            return
        span = self._trace.get_current_span()
        span.record_exception(error, {'microagent.attempt': attempt})
        if attempt < attempts:
            span.add_event('retry', {'microagent.attempt': attempt,
                                     'microagent.attempts': attempts,
                                     'exception.type': type(error).__name__,
                                     'exception.message': str(error)})

    def dead_lettered(self, queue: str, error: BaseException, attempts: int) -> None:
        """The message went to ``{queue}.dead``: a ``dead_letter`` event, and the span's
        status is an error."""
        if not self.on:
            return
        span = self._trace.get_current_span()
        if not attempts:  # malformed: no attempt recorded the exception
            span.record_exception(error)
        span.add_event('dead_letter', {'messaging.destination.name': f'{queue}.dead',
                                       'microagent.attempts': attempts,
                                       'exception.type': type(error).__name__,
                                       'exception.message': str(error)})
        self._error(span, f'dead-lettered: {type(error).__name__}: {error}')

    def timer_run(self, kind: str, agent: type, handler: Callable[..., Any]) -> _SpanScope:
        """``with`` an INTERNAL span ``{kind} Class.method`` for one run of a periodic or
        cron task, in a trace of its own."""
        span = self._tracer.start_span(
            f'{kind} {agent.__name__}.{handler.__name__}', context=self._context.Context(),
            kind=self._trace.SpanKind.INTERNAL, attributes={
                'code.function.name': f'{agent.__module__}.{agent.__qualname__}.'
                                      f'{handler.__name__}',
                'microagent.timer': kind})
        return _SpanScope(self, span)


class _SpanScope:
    """What ``trace.use_span(span, end_on_exit=True)`` does, for less per message: the
    span is current within the block (unless ``current`` is False), an exception leaving
    it is recorded on the span (status ERROR), and the span ends with the block (unless
    ``end`` is False). ``with`` gives the span's context as a carrier when ``carry``."""

    __slots__ = ('_carry', '_current', '_end', '_span', '_token', '_tracing')

    def __init__(self, tracing: _Tracing, span: Any, *, end: bool = True,
                 current: bool = True, carry: bool = False) -> None:
        self._tracing, self._span, self._end = tracing, span, end
        self._current, self._carry = current, carry
        self._token: object = None

    def __enter__(self) -> dict[str, str] | None:
        tracing = self._tracing
        if self._current:
            self._token = tracing._context.attach(tracing._trace.set_span_in_context(self._span))
        return tracing._carrier(self._span) if self._carry else None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: object) -> None:
        span, tracing = self._span, self._tracing
        if self._current:
            tracing._context.detach(self._token)
        if isinstance(error, Exception):
            span.record_exception(error)
            tracing._error(span, f'{type(error).__name__}: {error}')
        if self._end:
            span.end()


def _with_trace(message: Any, carrier: dict[str, str] | None) -> Any:
    """``message`` with the trace context in its reserved key, when there is one to add."""
    if carrier is None or not isinstance(message, Mapping):
        return message
    return {**message, TRACE_KEY: carrier}


_tracing = _Tracing()


def trace_headers() -> dict[str, str]:
    """The W3C trace context of the current span (``traceparent``, ``tracestate``...), for
    a backend to put in the headers of a message it sends; empty when tracing is off."""
    return _tracing.headers() if _tracing.on else {}


# =====================================================================================
# Handler times: how long receivers, consumers, timers and RPC calls take
# =====================================================================================
#
# Off unless ``marun --http`` asks (``enable_handler_timing``): then the pools, the buses
# and the timers made afterwards keep a HandlerTimes per handler, plain numbers that the
# agent process reports (see "Launcher: agent processes").

HANDLER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (seconds) of the buckets of ``microagent_handler_seconds``."""
_timing = False
_clock = time.perf_counter  # what handler durations are measured with
_bucket_of = bisect.bisect_left
_FIRST_BOUND = HANDLER_BUCKETS[0]  # most calls take less: no search for their bucket


class HandlerTimes:
    """How long the calls of one handler took: ``counts[i]`` calls took at most
    ``HANDLER_BUCKETS[i]`` seconds (and more than the bound before; the last, longer than
    every bound), ``total`` their sum. The histogram ``microagent_handler_seconds`` before
    it is made cumulative: plain numbers, cheap enough for the hot path."""

    __slots__ = ('counts', 'total')

    def __init__(self) -> None:
        self.counts = [0] * (len(HANDLER_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[0 if seconds <= _FIRST_BOUND else _bucket_of(HANDLER_BUCKETS, seconds)] += 1
        self.total += seconds

    def add(self, counts: Iterable[int], total: float) -> None:
        self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
        self.total += total


def enable_handler_timing(enabled: bool = True) -> None:
    """Time the handler calls (consumers, receivers, timers, RPC calls) of the pools,
    buses and timers made from now on in this process. ``marun --http`` turns it on in
    its agent processes; off (the default), a handler call reads no clock."""
    global _timing
    _timing = enabled


def handler_timing() -> HandlerTimes | None:
    """A :class:`HandlerTimes` for a new handler, or None when timing is off."""
    return HandlerTimes() if _timing else None


def _observe_call(bus: AbstractSignalBus, name: str, seconds: float) -> None:
    if _timing:
        timing = bus.call_timings.get(name)
        if timing is None:
            timing = bus.call_timings[name] = HandlerTimes()
        timing.observe(seconds)


# =====================================================================================
# Bus: pub/sub signals and RPC over pub/sub
# =====================================================================================

def reconnect_delays(first: float = 0.1, cap: float = 1.5) -> Iterator[float]:
    """Delays between reconnection attempts: doubling from ``first`` up to ``cap``, with
    jitter so that many clients do not reconnect in step; endless. The cap is low so that
    consumers (and ``/readyz``) are back within 3 s of the server: an attempt costs one
    connection, or one refused one while the server is down."""
    delay = first
    while True:
        yield delay * random.uniform(0.8, 1.2)
        delay = min(delay * 2, cap)


class CredentialsRefused(ConnectionError):
    """The server refused the credentials of the DSN (a wrong password): not an outage.
    An agent cannot start with them (``marun`` exits 2 at once); a running one keeps
    trying with the reconnection backoff (the password may have been rotated) and its
    link says "refused" rather than "lost"."""


class LinkState(msgspec.Struct, frozen=True):
    """The state of one connection of a bus or broker (see :class:`Link`)."""

    name: str
    connected: bool
    since: float  # Unix time of the last change (or of the first attempt)
    last_error: str | None


class Link:
    """One connection of a bus or broker to its server, as the backends keep it: whether
    it is up and since when, its last error, and the pause before the next attempt.

    Every reconnection loop of the backends goes through it: :meth:`lost` on a failure
    (one warning line per outage; the attempts after it at debug level), :meth:`pause`
    before trying again (backoff with jitter, see :func:`reconnect_delays`), and
    :meth:`up` once it works (one info line when it was lost). ``bus.links`` and
    ``broker.links`` map names (``pubsub``, ``consume orders``...) to them.
    """

    __slots__ = ('_delays', 'connected', 'last_error', 'log', 'name', 'refused', 'since',
                 'was_up', 'where')

    def __init__(self, name: str, where: str, log: logging.Logger) -> None:
        self.name = name
        self.where = where
        self.log = log
        self.connected = True  # until an attempt fails: a link is made as it is first used
        self.since = time.time()
        self.last_error: str | None = None
        self.refused = False  # the last failure was the server refusing the credentials
        self.was_up = False  # it worked once: a failure now is a lost connection
        self._delays: Iterator[float] | None = None

    def __repr__(self) -> str:
        return f'<Link {self.name} to {self.where} {"up" if self.connected else "down"}>'

    def up(self) -> None:
        """The connection works (again)."""
        if self.connected and self._delays is None:
            if not self.was_up:
                self.was_up = True
            return
        if self._delays is not None:
            self.log.info('%s to %s is %s', self.name, self.where,
                          'back' if self.was_up else 'up')
        self.connected, self.since, self._delays = True, time.time(), None
        self.refused, self.was_up = False, True

    def lost(self, error: BaseException | str, refused: bool | None = None) -> None:
        """The connection failed: log the first failure of an outage as one warning.
        ``refused``: the server refused the credentials (by default: ``error`` is a
        :class:`CredentialsRefused`, or was raised from one)."""
        self.last_error = error if isinstance(error, str) else (
            error_text(error))
        if refused is None:
            refused = isinstance(error, CredentialsRefused) or isinstance(
                getattr(error, '__cause__', None), CredentialsRefused)
        if self._delays is None or refused != self.refused:
            if refused:
                self.log.warning('%s to %s refused (%s); trying again', self.name,
                                 self.where, self.last_error)
            elif self.was_up:
                self.log.warning('%s to %s lost (%s); reconnecting', self.name, self.where,
                                 self.last_error)
            else:  # the first attempt: the caller says whether it tries again
                self.log.warning('%s to %s: no connection yet (%s)', self.name, self.where,
                                 self.last_error)
            self._delays = self._delays or reconnect_delays()
            self.refused = refused
        else:
            self.log.debug('%s to %s failed again: %s', self.name, self.where, self.last_error)
        if self.connected:
            self.connected, self.since = False, time.time()

    async def pause(self) -> None:
        """Wait before the next attempt (longer after each failure of an outage)."""
        if self._delays is None:
            self._delays = reconnect_delays()
        await asyncio.sleep(next(self._delays))

    def state(self) -> LinkState:
        return LinkState(self.name, self.connected, self.since, self.last_error)


class _Connections:
    """The connections of a bus or broker: ``links`` (name -> :class:`Link`, made by the
    backend as it opens them) and ``connected``."""

    dsn: str
    log: logging.Logger
    links: dict[str, Link]

    @property
    def connected(self) -> bool:
        """True when every connection opened so far is up (see :attr:`links`)."""
        return all(link.connected for link in self.links.values())

    def link(self, name: str) -> Link:
        """The :class:`Link` called ``name``, made on first use (backends call this)."""
        link = self.links.get(name)
        if link is None:
            link = self.links[name] = Link(name, redact_dsn(self.dsn), self.log)
        return link


class ResponseStream:
    """The answers to one RPC request, as an async iterator that ends at its deadline.

    Each answer is a dict ``{"Class.method": value}`` from one responding bus.
    """

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self._answers: deque[JSONObject] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, answer: JSONObject) -> None:
        self._answers.append(answer)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> JSONObject:
        loop = asyncio.get_running_loop()
        while not self._answers:
            if loop.time() >= self.deadline:
                raise StopAsyncIteration
            self._waiter = waiter = loop.create_future()
            timer = loop.call_at(self.deadline, _resolve, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        return self._answers.popleft()


def _resolve(future: asyncio.Future[None] | None) -> None:
    """Wake whoever awaits ``future`` (if any, and not woken already)."""
    if future is not None and not future.done():
        future.set_result(None)


def _apply_settings(target: object, settings: Mapping[str, Any], arguments: Iterable[str]
                   ) -> None:
    """Set on ``target`` the upper-case settings given as keyword arguments (its class
    attributes, such as ``ROLLBACK_ATTEMPTS``); any other keyword raises a TypeError that
    lists what the class takes, and the closest name when the keyword looks misspelt."""
    cls = type(target)
    for key, value in settings.items():
        if key not in _settings_of(cls):
            raise TypeError(_unknown_keyword(cls, key, list(arguments)))
        setattr(target, key, value)


# Upper-case class attributes that define a backend rather than configure it.
_DEFINITIONS = frozenset({'RAW_MESSAGE_ARG'})


def _settings_of(cls: type) -> list[str]:
    return sorted(name for name in dir(cls)
                  if name.isupper() and name[0] != '_' and name not in _DEFINITIONS)


def _unknown_keyword(cls: type, key: str, arguments: list[str]) -> str:
    import difflib
    settable = _settings_of(cls)
    names = {name.lower(): name for name in (*arguments, *settable)}
    close = difflib.get_close_matches(key.lower(), list(names), n=1)
    hint = f' (did you mean {names[close[0]]!r}?)' if close else ''
    return (f'{cls.__name__} got an unknown keyword {key!r}{hint}; it takes '
            f'{", ".join(arguments)} and the settings {", ".join(settable)}')


class _LeaseProtocol:
    """How the agents that share a bus coordinate their singleton handlers: a tick of a
    singleton timer is claimed (:meth:`claim_tick`), a singleton server runs under a
    lease (:meth:`acquire_lease`, :meth:`renew_lease`, :meth:`release_lease`). A bus
    that offers them (``RedisSignalBus``, ``MemorySignalBus``) implements all four; here
    they raise NotImplementedError."""

    def _no_singletons(self) -> NotImplementedError:
        return NotImplementedError(
            f'{type(self).__name__} cannot coordinate singleton handlers: use a bus that '
            'implements claim_tick and the leases (RedisSignalBus, MemorySignalBus)')

    async def claim_tick(self, key: str, tick_ms: int, holder: str, ttl: float) -> bool:
        """Claim the tick of singleton ``key`` scheduled at ``tick_ms`` (Unix time in
        milliseconds) for ``holder``: True for the first claim of that tick and for a
        repeated claim by the same holder, False for any other. A claim is remembered
        for ``ttl`` seconds. Raise when the server cannot be reached."""
        raise self._no_singletons()

    async def acquire_lease(self, key: str, holder: str, ttl: float) -> str | None:
        """Take the lease of singleton ``key`` for ``holder`` for ``ttl`` seconds if
        nobody holds it (or ``holder`` does already: its lease is extended); return its
        token ``'<fencing number>:<holder>'``, or None when another holder has it. The
        fencing number grows with each new holder."""
        raise self._no_singletons()

    async def renew_lease(self, key: str, token: str, ttl: float) -> bool:
        """Extend the lease of ``key`` to ``ttl`` seconds from now if ``token`` still
        holds it (compare-and-set); False when it does not."""
        raise self._no_singletons()

    async def release_lease(self, key: str, token: str) -> bool:
        """Give up the lease of ``key`` if ``token`` holds it (compare-and-delete)."""
        raise self._no_singletons()


DROP_WARNING_INTERVAL = 10.0
"""Seconds between two warnings of one receiver about the signals it dropped."""


class _Lane:
    """The calls of one receiver method on a bus: at most ``limit`` run at once, each in
    a task that then runs the calls waiting in ``backlog`` (at most ``room`` of them);
    past that a signal is dropped, and counted until the next warning."""

    __slots__ = ('backlog', 'dropped', 'key', 'limit', 'report', 'room', 'running',
                 'unreported', 'warned_at')

    def __init__(self, key: str, limit: int, room: int) -> None:
        self.key = key
        self.limit = limit
        self.room = room
        self.running = 0
        self.backlog: deque[_Job] = deque()
        self.dropped = 0
        self.unreported = 0  # dropped since the last warning
        self.warned_at = -math.inf
        self.report: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return (f'<_Lane {self.key}: {self.running}/{self.limit} running, '
                f'{len(self.backlog)}/{self.room} waiting, {self.dropped} dropped>')


class _PendingAnswer:
    """The answer to one RPC request, filled in by its receivers as they end; a receiver
    that dropped the request leaves its key out, and nobody answers when all did."""

    __slots__ = ('answers', 'request_id', 'signal', 'waiting')

    def __init__(self, signal: Signal, request_id: str, receivers: list[Receiver]) -> None:
        self.signal = signal
        self.request_id = request_id
        self.answers: dict[str, Any] = {r.key: None for r in receivers}
        self.waiting = len(receivers)

    def give(self, key: str, value: Any) -> bool:
        """Record one receiver's answer; True when it was the last one awaited."""
        self.answers[key] = value
        self.waiting -= 1
        return self.waiting == 0

    def withhold(self, key: str) -> bool:
        """One receiver dropped the request; True when an answer is now to be sent."""
        self.answers.pop(key, None)
        self.waiting -= 1
        return self.waiting == 0 and bool(self.answers)


# One signal for one receiver: receiver, signal, sender, payload, trace, RPC answer.
_Job = tuple[Receiver, Signal, str, JSONObject, Any, '_PendingAnswer | None']


class AbstractSignalBus(_Connections, _LeaseProtocol, abc.ABC):
    """The signal bus: publish signals, subscribe receivers, RPC over pub/sub.

    A backend implements :meth:`send` (publish raw bytes to a channel) and :meth:`bind`
    (subscribe to a channel pattern, returning once the subscription is live), and
    passes every incoming message to :meth:`handle_message`. It connects lazily, so a
    bus can be made outside a running event loop.

    Every declared signal is an attribute: ``await bus.user_created.send('me', user_id=1)``.
    Channels are ``{prefix}:{signal}:{sender}``; an RPC request adds ``#{request_id}``
    and the answers come back on ``{prefix}:response:{responder_uid}#{request_id}``.

    Upper-case class attributes (a backend's ``CONNECT_TIMEOUT``...) can be set per bus
    as keyword arguments; any other unknown keyword raises a TypeError at once.

    The bus also coordinates the singleton handlers of the agents that share it (same
    server and prefix), through the lease protocol (:class:`_LeaseProtocol`).
    """

    RESPONSE_TIMEOUT: ClassVar[float] = 60
    RECEIVER_CONCURRENCY: ClassVar[int] = 100
    """Calls of one receiver method that run at once, unless its ``@receiver`` says."""
    RECEIVER_BACKLOG: ClassVar[int] = 10_000
    """Signals (and RPC requests) that wait for a receiver running ``concurrency`` calls;
    past that they are dropped, counted in ``signals_dropped`` and logged."""
    LEASE_TTL: ClassVar[float] = 10
    """Seconds a singleton server's lease lasts unless renewed; renewed every third."""
    TRACE_CONTEXT: ClassVar[bool] = False
    """Carry the OpenTelemetry trace context in the payload's reserved ``_trace`` key,
    taken out again before receivers see it (see the README, Tracing). Off by default:
    microagent 1.x receivers would get it as an argument."""

    def __init__(self, dsn: str, prefix: str = 'PUBSUB', log: logging.Logger | None = None,
                 *, logger: logging.Logger | None = None, **settings: Any) -> None:
        _apply_settings(self, settings, ('dsn', 'prefix', 'log'))
        _count('RECEIVER_CONCURRENCY', self.RECEIVER_CONCURRENCY, minimum=1)
        _count('RECEIVER_BACKLOG', self.RECEIVER_BACKLOG, minimum=0)
        if not isinstance(prefix, str) or not prefix or any(c in prefix for c in '#*?[]'):
            raise SignalException(f'bus prefix must be a non-empty string without #*?[], '
                                  f'not {prefix!r}')
        self.dsn = dsn
        self.prefix = prefix
        self.uid = os.urandom(16).hex()
        self.log = log or logger or logging.getLogger('microagent.bus')
        self.receivers: dict[str, list[Receiver]] = {}
        self._requests: dict[str, ResponseStream] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watchdog = Watchdog()
        self._responses_bound: asyncio.Future[None] | None = None
        self.links: dict[str, Link] = {}
        _refuse_taken_names('signal', Signal.get_all(), type(self), SignalException)
        # What marun reports: signals published and received, by name; RPC call times.
        self.signals_sent: dict[str, int] = {}
        self.signals_received: dict[str, int] = {}
        self.signals_dropped: dict[str, int] = {}  # by a full receiver (RECEIVER_BACKLOG)
        self._lanes: dict[Callable[..., Any], _Lane] = {}  # receiver method -> its calls
        self.call_timings: dict[str, HandlerTimes] = {}
        _tracing.refresh()

    def __repr__(self) -> str:
        return f'<{type(self).__name__} {redact_dsn(self.dsn)} {self.prefix}#{self.uid[:8]}>'

    def __getattr__(self, name: str) -> BoundSignal:
        if name.startswith('__'):
            raise AttributeError(name)
        return BoundSignal(self, Signal.get(name))

    @abc.abstractmethod
    async def send(self, channel: str, message: bytes) -> None:
        """Publish ``message`` (JSON bytes) on ``channel``."""

    @abc.abstractmethod
    async def bind(self, channel: str) -> None:
        """Subscribe to the channel pattern ``channel``; return once it is live."""

    async def unbind(self, channel: str) -> None:
        """Unsubscribe from the channel pattern ``channel``."""

    async def close(self) -> None:
        """Release the bus's connections (:meth:`disconnect`); it may be used again."""
        self._responses_bound = None
        await self.disconnect()
        self.links.clear()

    async def disconnect(self) -> None:
        """Close the backend's connections."""

    # -- receiving --------------------------------------------------------------------

    async def bind_receivers(self, receivers: Iterable[Receiver]) -> None:
        """Bind receivers and return once their subscriptions are live."""
        new = []
        for receiver in receivers:
            receiver.timing = receiver.timing or handler_timing()
            receiver.lane = self._lane(receiver)
            name = receiver.signal.name
            if name not in self.receivers:
                new.append(receiver.signal.make_channel_name(self.prefix))
            self.receivers.setdefault(name, []).append(receiver)
        await asyncio.gather(*(self.bind(channel) for channel in dict.fromkeys(new)))

    def _lane(self, receiver: Receiver) -> _Lane:
        """The lane of the receiver's method: one for all the signals it receives."""
        lane = self._lanes.get(receiver.handler)
        if lane is None:
            lane = self._lanes[receiver.handler] = _Lane(
                receiver.key, receiver.concurrency or self.RECEIVER_CONCURRENCY,
                self.RECEIVER_BACKLOG)
        return lane

    def lanes(self) -> dict[str, JSONObject]:
        """``Class.method`` -> ``{'running', 'waiting', 'dropped', 'concurrency'}`` of
        each receiver method bound to this bus: its calls running now, its signals
        waiting for a free call, and those it dropped since the bus was made."""
        return {lane.key: {'running': lane.running, 'waiting': len(lane.backlog),
                           'dropped': lane.dropped, 'concurrency': lane.limit}
                for lane in self._lanes.values()}

    async def unbind_receivers(self, receivers: Iterable[Receiver]) -> None:
        """Stop delivering to these receivers; unsubscribe signals nobody receives."""
        gone = []
        for receiver in receivers:
            bound = self.receivers.get(receiver.signal.name, [])
            if receiver in bound:
                bound.remove(receiver)
            if not bound and self.receivers.pop(receiver.signal.name, None) is not None:
                gone.append(receiver.signal.make_channel_name(self.prefix))
        for channel in gone:
            try:
                await self.unbind(channel)
            except ConnectionError as exc:
                self.log.warning('Unsubscribing %s failed: %s', channel, error_text(exc))
            except Exception:
                self.log.warning('Unsubscribing %s failed', channel, exc_info=True)

    def handle_message(self, channel: str | bytes, message: bytes | str) -> None:
        """Take one message from the backend: an RPC answer or a signal to dispatch.

        A payload that is not a JSON object is logged and dropped; one that does not
        match its declaration is logged as a warning and delivered.
        """
        if isinstance(channel, bytes):
            channel = channel.decode('utf-8', 'replace')
        head, _, request_id = channel.partition('#')
        if not head.startswith(self.prefix) or head[len(self.prefix):len(self.prefix) + 1] != ':':
            return
        name, _, sender = head[len(self.prefix) + 1:].partition(':')
        if name == 'response':
            self._handle_answer(request_id, message)
            return
        receivers = self.receivers.get(name)
        if not receivers:
            return
        signal = receivers[0].signal
        try:
            payload = decode_object(message)
        except SerializingError as exc:
            self.log.error('Dropped signal %s from %s: %s', name, sender, exc)
            return
        trace = payload.pop(TRACE_KEY, None) if self.TRACE_CONTEXT else None
        problem = signal.check(payload)
        if problem:
            if signal.strict:
                self.log.error('Dropped signal %s from %s, which does not match its strict '
                               'declaration: %s', name, sender, problem)
                return
            self.log.warning('Signal %s from %s does not match its declaration: %s',
                             name, sender, problem)
        self.signals_received[name] = self.signals_received.get(name, 0) + 1
        answer = _PendingAnswer(signal, request_id, receivers) if request_id else None
        for receiver in list(receivers):
            lane = receiver.lane
            if lane.running < lane.limit:
                self._run(lane, (receiver, signal, sender, payload, trace, answer))
            else:
                self._wait_or_drop(lane, (receiver, signal, sender, payload, trace, answer))

    def _run(self, lane: _Lane, job: _Job) -> None:
        """Call a receiver that has room: a sync one ends here, an async one gets a task
        (which then runs what waits in its lane)."""
        receiver, signal, sender, payload, trace, answer = job
        result = self._start_receiver(receiver, signal, sender, payload, trace=trace,
                                      request_id=answer.request_id if answer else '')
        if inspect.isawaitable(result):
            lane.running += 1
            self._track(asyncio.get_running_loop().create_task(
                self._work(lane, receiver, signal, result, answer)))
        elif answer is not None and answer.give(receiver.key, result):
            self._track(asyncio.get_running_loop().create_task(self._send_answer(answer)))

    async def _work(self, lane: _Lane, receiver: Receiver, signal: Signal,
                    result: Awaitable[Any], answer: _PendingAnswer | None) -> None:
        """Finish a receiver's call, then run the calls waiting in its lane, in order."""
        try:
            while True:
                value = await self._finish_receiver(receiver, signal, result)
                if answer is not None and answer.give(receiver.key, value):
                    await self._send_answer(answer)
                while lane.backlog:
                    receiver, signal, sender, payload, trace, answer = lane.backlog.popleft()
                    called = self._start_receiver(
                        receiver, signal, sender, payload, trace=trace,
                        request_id=answer.request_id if answer else '')
                    if inspect.isawaitable(called):
                        result = called
                        break
                    if answer is not None and answer.give(receiver.key, called):
                        await self._send_answer(answer)
                else:
                    return
        finally:
            lane.running -= 1

    def _wait_or_drop(self, lane: _Lane, job: _Job) -> None:
        if len(lane.backlog) < lane.room:
            lane.backlog.append(job)
            return
        receiver, signal, answer = job[0], job[1], job[5]
        self._count_drops(lane, signal.name, 1)
        if answer is not None and answer.withhold(receiver.key):
            self._track(asyncio.get_running_loop().create_task(self._send_answer(answer)))

    def _count_drops(self, lane: _Lane, name: str, count: int) -> None:
        """Count signals ``name`` a lane dropped; a warning says how many, at most every
        :data:`DROP_WARNING_INTERVAL` seconds per receiver."""
        self.signals_dropped[name] = self.signals_dropped.get(name, 0) + count
        lane.dropped += count
        lane.unreported += count
        if lane.report is None:
            loop = asyncio.get_running_loop()
            lane.report = loop.call_at(max(loop.time(), lane.warned_at + DROP_WARNING_INTERVAL),
                                       self._warn_drops, lane)

    def _warn_drops(self, lane: _Lane) -> None:
        self.log.warning(
            'Receiver %s is full (%d calls running, %d signals waiting): dropped %d signals '
            '(%d since the start); raise its concurrency or the bus\'s RECEIVER_BACKLOG if '
            'it should keep up', lane.key, lane.running, len(lane.backlog), lane.unreported,
            lane.dropped)
        lane.unreported, lane.report = 0, None
        lane.warned_at = asyncio.get_running_loop().time()

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _handle_answer(self, request_id: str, message: bytes | str) -> None:
        stream = self._requests.get(request_id)
        if stream is None:
            return
        try:
            stream.put(decode_object(message))
        except SerializingError as exc:
            self.log.error('Dropped an RPC answer to %s: %s', request_id, exc)

    async def _send_answer(self, pending: _PendingAnswer) -> None:
        signal, request_id, answer = pending.signal, pending.request_id, pending.answers
        try:
            body = encode_json(answer)
        except SerializingError:
            self.log.error('RPC answer to %s is not JSON: %r', signal.name, answer)
            body = encode_json({key: _json_or_none(value) for key, value in answer.items()})
        try:
            await self.send(f'{self.prefix}:response:{self.uid}#{request_id}', body)
        except Exception as exc:
            _log_failed(self.log, exc, 'Sending the RPC answer to %s failed', signal.name)

    def _start_receiver(self, receiver: Receiver, signal: Signal, sender: str,
                        payload: JSONObject, *, trace: Any = None, request_id: str = '') -> Any:
        """Call a receiver: a sync one runs to its end here (its answer is returned),
        an async one gives the awaitable that :meth:`_finish_receiver` runs."""
        started = _clock() if receiver.timing is not None else 0.0
        try:
            if _tracing.on:
                result = _tracing.receive(self, receiver, signal, sender, payload,
                                          carrier=trace, request_id=request_id,
                                          watchdog=self._watchdog)
            else:
                result = receiver.handler(signal=signal, sender=sender, **payload)
        except Exception as exc:
            _log_failed(self.log, exc, 'Receiver %s failed on %s', receiver.key, signal.name)
            result = None
        if receiver.timing is not None and not inspect.isawaitable(result):
            receiver.timing.observe(_clock() - started)
        return result

    async def _finish_receiver(self, receiver: Receiver, signal: Signal,
                               awaitable: Awaitable[Any]) -> Any:
        task = asyncio.current_task()
        assert task is not None
        self._watchdog.watch(task, receiver.timeout)
        started = _clock() if receiver.timing is not None else 0.0
        try:
            return await awaitable
        except asyncio.CancelledError:
            if not self._watchdog.expired(task):
                raise
            self.log.error('Receiver %s timed out after %ss on %s',
                           receiver.key, receiver.timeout, signal.name)
        except Exception as exc:
            _log_failed(self.log, exc, 'Receiver %s failed on %s', receiver.key, signal.name)
        finally:
            self._watchdog.forget(task)
            if receiver.timing is not None:
                receiver.timing.observe(_clock() - started)
        return None

    async def drain(self, grace: float | None = None) -> None:
        """Wait for running receivers and those waiting in their lanes, for ``grace``
        seconds (default: the longest receiver timeout and one); then drop (and count)
        the signals still waiting and cancel the calls still running."""
        if not self._tasks:
            return
        timeout = grace if grace is not None else max(
            (r.timeout for rs in self.receivers.values() for r in rs), default=60) + 1
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        self._drop_backlogs()
        for task in pending:
            task.cancel()
        if pending:
            self.log.warning('Cancelled %d receiver calls still running at stop', len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    def _drop_backlogs(self) -> None:
        for lane in self._lanes.values():
            while lane.backlog:
                self._count_drops(lane, lane.backlog.popleft()[1].name, 1)

    # -- RPC ----------------------------------------------------------------------------

    async def _bind_responses(self) -> None:
        if self._responses_bound is None:
            self._responses_bound = asyncio.get_running_loop().create_future()
            try:
                await self.bind(f'{self.prefix}:response:*')
            except BaseException as exc:
                future, self._responses_bound = self._responses_bound, None
                future.set_exception(exc)
                future.exception()  # retrieved here; the caller gets it raised
                raise
            self._responses_bound.set_result(None)
        else:
            await asyncio.shield(self._responses_bound)

    @contextlib.asynccontextmanager
    async def call(self, channel: str, message: bytes, timeout: float = 60
                   ) -> AsyncIterator[ResponseStream]:
        """Publish an RPC request on ``channel`` and yield the stream of its answers.

        The answer subscription is live before the request is published.
        """
        await self._bind_responses()
        request_id = os.urandom(16).hex()
        stream = ResponseStream(asyncio.get_running_loop().time() + timeout)
        self._requests[request_id] = stream
        try:
            await self.send(f'{channel}#{request_id}', message)
            yield stream
        finally:
            self._requests.pop(request_id, None)


def _json_or_none(value: Any) -> Any:
    try:
        encode_json(value)
    except SerializingError:
        return None
    return value


def _check_sender(sender: str) -> str:
    if not isinstance(sender, str) or not sender or '#' in sender:
        raise SignalException(f'sender must be a non-empty string without "#", not {sender!r}')
    return sender


class BoundSignal:
    """A signal on a bus: ``bus.<signal_name>``."""

    __slots__ = ('bus', 'signal')

    def __init__(self, bus: AbstractSignalBus, signal: Signal) -> None:
        self.bus = bus
        self.signal = signal

    def __repr__(self) -> str:
        return f'<BoundSignal {self.signal.name} on {self.bus!r}>'

    def _prepare(self, sender: str, payload: dict[str, Any], trace: dict[str, str] | None = None
                 ) -> tuple[str, bytes]:
        """The channel and the body of a send (with the trace context ``trace`` in the
        body's reserved key, when given): the checks every send (and a mock's) makes.

        A payload that does not match the declaration is logged as a warning, or refused
        with :class:`SerializingError` when the signal is strict.
        """
        problem = self.signal.check(payload)
        if problem:
            if self.signal.strict:
                raise SerializingError(
                    f'signal {self.signal.name!r} is strict and the payload does not match '
                    f'its declaration: {problem}')
            self.bus.log.warning('Sending signal %s that does not match its declaration: %s',
                                 self.signal.name, problem)
        channel = self.signal.make_channel_name(self.bus.prefix, _check_sender(sender))
        body = encode_json(payload if trace is None else {**payload, TRACE_KEY: trace})
        sent, name = self.bus.signals_sent, self.signal.name
        sent[name] = sent.get(name, 0) + 1
        return channel, body

    async def send(self, sender: str, **kwargs: Any) -> None:
        """Publish the signal with ``kwargs`` as its payload."""
        if _tracing.on:
            with _tracing.producing(self.bus, self.signal.name, 'send',
                                    {'microagent.sender': sender}) as carrier:
                return await self.bus.send(*self._prepare(sender, kwargs, carrier))
        await self.bus.send(*self._prepare(sender, kwargs))

    async def call(self, sender: str, timeout: float = 60, **kwargs: Any) -> JSONObject:
        """RPC: publish the signal and return the first answer, ``{"Class.method": value}``,
        or ``{}`` when none comes within ``timeout`` seconds."""
        started = time.perf_counter()
        try:
            async with self.waiter(sender, timeout, **kwargs) as answers:
                async for answer in answers:
                    return answer
            return {}
        finally:
            _observe_call(self.bus, self.signal.name, time.perf_counter() - started)

    def waiter(self, sender: str, timeout: float = 60, **kwargs: Any
               ) -> contextlib.AbstractAsyncContextManager[ResponseStream]:
        """RPC with every answer: an async context manager giving an async iterator of
        answers, which ends ``timeout`` seconds after the request::

            async with bus.rpc_count.waiter('me', timeout=2, user_id=1) as answers:
                async for answer in answers:
                    ...
        """
        if _tracing.on:
            return self._traced_waiter(sender, kwargs, timeout)
        return self.bus.call(*self._prepare(sender, kwargs), timeout)

    @contextlib.asynccontextmanager
    async def _traced_waiter(self, sender: str, payload: dict[str, Any], timeout: float
                             ) -> AsyncIterator[ResponseStream]:
        with _tracing.calling(self.bus, self.signal.name, sender) as carrier:
            async with self.bus.call(*self._prepare(sender, payload, carrier), timeout) as answers:
                yield answers


# =====================================================================================
# Broker: durable queues, consumed by a bounded pool with retries and dead letters
# =====================================================================================

class DeadLetter(msgspec.Struct, frozen=True):
    """A message that could not be handled, as it waits in ``{queue}.dead``.

    ``id`` is a handle for :meth:`AbstractQueueBroker.replay` and
    :meth:`~AbstractQueueBroker.purge_dead`, stable while the letter is there; ``body``
    the original message bytes; ``error``, ``attempts``, ``consumer`` and ``failed_at``
    (Unix time) what the consumer recorded when it gave up."""

    id: str
    queue: str
    body: bytes
    error: str
    attempts: int
    consumer: str | None
    failed_at: float


class Delivery:
    """One message taken from a queue by a backend, until it is acknowledged.

    ``body`` is the raw message body, ``raw`` the backend's own message object (given
    to handlers as ``amqp=`` / ``kafka=``), ``tag`` whatever the backend needs to
    acknowledge it.
    """

    __slots__ = ('body', 'raw', 'tag')

    def __init__(self, body: bytes, raw: Any = None, tag: Any = None) -> None:
        self.body = body
        self.raw = raw
        self.tag = tag

    def __repr__(self) -> str:
        return f'<Delivery {self.tag!r} {self.body[:60]!r}>'


def due_time(delay: float | None = None, at: Any = None) -> float | None:
    """The Unix time a message sent with ``delay=`` (seconds) or ``at=`` (an aware
    ``datetime`` or a Unix time) is due, or None when it is due now (no delay, a zero
    delay, a moment past). A negative or non-finite delay, a naive ``datetime`` or both
    given is a ``ValueError``."""
    if delay is not None and at is not None:
        raise ValueError('give delay= or at=, not both')
    if delay is not None:
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) \
                or not math.isfinite(delay) or delay < 0:
            raise ValueError(f'delay must be a number of seconds >= 0, not {delay!r}')
        return time.time() + delay if delay > 0 else None
    if at is None:
        return None
    if hasattr(at, 'utcoffset') and hasattr(at, 'timestamp'):
        if at.utcoffset() is None:
            raise ValueError(f'at= must be an aware datetime (with a tzinfo), not {at!r}')
        at = at.timestamp()
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at):
        raise ValueError(f'at= must be an aware datetime or a Unix time, not {at!r}')
    return float(at) if at > time.time() else None


class BoundQueue:
    """A queue on a broker: ``broker.<queue_name>``."""

    __slots__ = ('broker', 'queue')

    def __init__(self, broker: AbstractQueueBroker, queue: Queue) -> None:
        self.broker = broker
        self.queue = queue

    def __repr__(self) -> str:
        return f'<BoundQueue {self.queue.name} on {self.broker!r}>'

    async def send(self, message: Mapping[str, Any], *, delay: float | None = None,
                   at: Any = None, **options: Any) -> None:
        """Send a message (a dict); return once the broker has stored it.

        ``delay=SECONDS`` or ``at=`` (an aware ``datetime`` or a Unix time): stored now,
        delivered to a consumer not before then (see :func:`due_time`)."""
        if delay is not None or at is not None:
            due = due_time(delay, at)
            if due is not None:
                return await self.send_many([message], at=due, **options)
        broker, queue = self.broker, self.queue
        if _tracing.on:
            with _tracing.producing(broker, queue.name, 'publish') as carrier:
                body = queue.serialize(_with_trace(message, carrier))
                return await broker.send(queue.name, body, **options)
        await broker.send(queue.name, queue.serialize(message), **options)

    async def send_many(self, messages: Iterable[Mapping[str, Any]], *,
                        delay: float | None = None, at: Any = None, **options: Any) -> None:
        """Send several messages (dicts) at once, batched by the backend; return once the
        broker has stored them all. Much faster than awaiting ``send`` one by one.
        ``delay=`` / ``at=`` as for :meth:`send`, for them all."""
        due = due_time(delay, at) if delay is not None or at is not None else None
        broker, name, serialize = self.broker, self.queue.name, self.queue.serialize
        if _tracing.on:
            messages = list(messages)
            if not messages:
                return
            with _tracing.producing(broker, name, 'publish', {
                    'messaging.batch.message_count': len(messages)}) as carrier:
                bodies = [serialize(_with_trace(message, carrier)) for message in messages]
                return await self._store(bodies, due, options)
        bodies = [serialize(message) for message in messages]
        if bodies:
            await self._store(bodies, due, options)

    async def _store(self, bodies: list[bytes], due: float | None, options: dict[str, Any]
                     ) -> None:
        if due is None:
            await self.broker.send_many(self.queue.name, bodies, **options)
        else:
            await self.broker.send_later(self.queue.name, bodies, due, **options)

    async def length(self) -> int:
        """How many messages wait in the queue."""
        return await self.broker.queue_length(self.queue.name)


class AbstractQueueBroker(_Connections, abc.ABC):
    """The queue broker: send JSON-object messages to durable queues and consume them.

    A backend implements :meth:`send`, :meth:`bind` (start feeding ``self.pools[name]``;
    return once consumption is live), :meth:`queue_length`, and where the transport
    needs them :meth:`unbind`, :meth:`ack`, :meth:`release`, :meth:`unbound` and
    :meth:`disconnect`. Retries, dead letters, concurrency, backpressure and the
    graceful drain live in :class:`ConsumerPool`, shared by all backends; a backend's
    connections report their state in :attr:`links`.

    Upper-case class attributes (``ROLLBACK_ATTEMPTS``, and a backend's own such as
    ``VISIBILITY_TIMEOUT``) can be set per broker as keyword arguments.
    Every declared queue is an attribute: ``await broker.mailer.send({'text': 'hi'})``.
    """

    ROLLBACK_ATTEMPTS: ClassVar[int] = 3
    RETRY_BACKOFF: ClassVar[float] = 0.5
    PREFETCH: ClassVar[int] = 64
    STALL_TIMEOUT: ClassVar[float] = 60.0  # marun: a consumer taking nothing that long (0: off)
    RAW_MESSAGE_ARG: ClassVar[str | None] = None
    TRACE_CONTEXT: ClassVar[bool] = False
    """Carry the OpenTelemetry trace context in the message's reserved ``_trace`` key,
    taken out again before consumers see it, for transports without headers (Redis,
    memory; AMQP and Kafka carry it in headers anyway). Off by default: microagent 1.x
    consumers would get it as an argument."""
    Options: ClassVar[type[ConsumerOptions]]  # set below: the consumer options it takes

    def __init__(self, dsn: str, log: logging.Logger | None = None, *,
                 logger: logging.Logger | None = None, **attributes: Any) -> None:
        self.dsn = dsn
        self.log = log or logger or logging.getLogger('microagent.broker')
        self.pools: dict[str, ConsumerPool] = {}
        self.links: dict[str, Link] = {}
        _apply_settings(self, attributes, ('dsn', 'log'))
        _refuse_taken_names('queue', Queue.get_all(), type(self), QueueException)
        _tracing.refresh()

    def __repr__(self) -> str:
        return f'<{type(self).__name__} {redact_dsn(self.dsn)}>'

    def __getattr__(self, name: str) -> BoundQueue:
        if name.startswith('__'):
            raise AttributeError(name)
        return BoundQueue(self, Queue.get(name))

    @abc.abstractmethod
    async def send(self, name: str, message: bytes, **kwargs: Any) -> None:
        """Store ``message`` (JSON bytes) in queue ``name``; return once it is stored."""

    async def send_many(self, name: str, messages: list[bytes], **kwargs: Any) -> None:
        """Store several messages in queue ``name`` in as few round trips as the backend
        allows; return once all are stored. The default sends them one by one."""
        for message in messages:
            await self.send(name, message, **kwargs)

    async def send_later(self, name: str, messages: list[bytes], due: float, **kwargs: Any
                         ) -> None:
        """Store messages for queue ``name`` now, to be delivered not before ``due`` (a
        Unix time in the future); return once all are stored."""
        raise NotImplementedError(f'{type(self).__name__} cannot delay messages')

    @abc.abstractmethod
    async def queue_length(self, name: str) -> int:
        """How many messages wait in queue ``name``."""

    async def waiting(self, name: str) -> int:
        """How many messages of queue ``name`` this broker's consumer could take now,
        for the stalled-consumer check of ``marun``: :meth:`queue_length`, unless the
        backend's length also counts what other consumers alone can take (Kafka)."""
        return await self.queue_length(name)

    # -- consuming ------------------------------------------------------------------

    async def bind_consumer(self, consumer: Consumer) -> None:
        """Start a consumer; only one consumer per queue per broker."""
        name = consumer.queue.name
        if name in self.pools:
            raise QueueException(f'queue {name!r} already has a consumer on {self!r}: '
                                 f'{self.pools[name].consumer.key}')
        options = self.Options.of(consumer, type(self).__name__)
        pool = self.pools[name] = ConsumerPool(self, consumer, options)
        pool.start()
        try:
            await self.bind(name)
        except BaseException:
            self.pools.pop(name, None)
            await pool.close(0)
            raise
        self.log.info('%s consumes %s (concurrency %d)', consumer.key, name, pool.concurrency)

    async def unbind_consumer(self, consumer: Consumer, grace: float | None = None) -> None:
        """Stop a consumer gracefully (see :meth:`ConsumerPool.close`)."""
        pool = self.pools.get(consumer.queue.name)
        if pool is None or pool.consumer is not consumer:
            return
        pool.stop_feeding()
        try:
            await self.unbind(pool.name)
        finally:
            try:
                await pool.close(grace)
            finally:
                self.pools.pop(pool.name, None)
                await self.unbound(pool.name)

    @abc.abstractmethod
    async def bind(self, name: str) -> None:
        """Start consuming queue ``name`` into ``self.pools[name]``; return once live."""

    async def unbind(self, name: str) -> None:
        """Stop fetching from queue ``name``; no :meth:`ConsumerPool.feed` after it."""

    async def ack(self, name: str, deliveries: list[Delivery]) -> None:
        """Acknowledge finished deliveries (handled or dead-lettered)."""

    async def release(self, name: str, deliveries: list[Delivery]) -> None:
        """Give unfinished deliveries back to the queue, to be delivered again."""

    async def dead_letter(self, name: str, delivery: Delivery, envelope: bytes) -> None:
        """Store the envelope of a message that could not be handled in ``{name}.dead``."""
        await self.send(f'{name}.dead', envelope)

    def trace_carrier(self, delivery: Delivery) -> Mapping[str, Any] | None:
        """The headers of a delivery that carry the W3C trace context, for backends
        whose transport has headers (AMQP, Kafka); None when it has none."""
        return None

    async def unbound(self, name: str) -> None:
        """The consumer of ``name`` has drained (everything acknowledged or released):
        release what consuming it held (a channel, a consumer group membership)."""

    # -- what operators act on: dead letters, delayed messages ----------------------

    async def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """The dead letters of ``queue`` (in ``{queue}.dead``), oldest first, at most
        ``limit``; reading them removes nothing."""
        raise NotImplementedError(f'{type(self).__name__} cannot list dead letters yet')

    async def dead_count(self, queue: str) -> int:
        """How many dead letters ``queue`` has."""
        raise NotImplementedError(f'{type(self).__name__} cannot count dead letters yet')

    async def replay(self, queue: str, ids: Iterable[str] | None = None,
                     limit: int | None = None) -> int:
        """Send the dead letters named by ``ids`` (else the oldest ``limit``, else all)
        back to ``queue`` with their original body; return how many. A letter leaves
        the dead-letter queue only after its message is stored in ``queue``."""
        _check_limit(limit)
        return await self._take_dead(queue, _wanted_ids(ids), limit, push=True)

    async def purge_dead(self, queue: str, ids: Iterable[str] | None = None) -> int:
        """Remove the dead letters named by ``ids`` (all when None); return how many."""
        return await self._take_dead(queue, _wanted_ids(ids), None, push=False)

    async def _take_dead(self, queue: str, wanted: set[str] | None, limit: int | None, *,
                         push: bool) -> int:
        """Take the letters of ``queue`` whose ids are ``wanted`` (else the oldest
        ``limit``, else all) out of ``{queue}.dead``, after storing their messages in
        ``queue`` when ``push``; return how many. Each backend does it its own way."""
        raise NotImplementedError(
            f'{type(self).__name__} cannot {"replay" if push else "purge"} dead letters yet')

    async def delayed_count(self, queue: str) -> int:
        """How many messages sent to ``queue`` with a delay are not due yet."""
        raise NotImplementedError(f'{type(self).__name__} cannot count delayed messages yet')

    # -- closing --------------------------------------------------------------------

    async def close(self) -> None:
        """Stop every consumer gracefully (acknowledging what finished, releasing the
        rest), then let the backend flush and close its connections (:meth:`disconnect`).
        The broker can be used again afterwards."""
        for pool in list(self.pools.values()):
            await self.unbind_consumer(pool.consumer)
        await self.disconnect()
        self.links.clear()

    async def disconnect(self) -> None:
        """Flush and close the backend's connections (after the consumers drained)."""


class ConsumerOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The options of ``@consumer(...)`` that every broker takes; a backend that takes
    more subclasses it as its ``Options`` (``AMQPBroker.Options`` adds ``prefetch`` and
    ``declare_queue``, ``KafkaBroker.Options`` adds ``group_id``). Checked once, when
    the consumer is bound to its broker; the common ones also by the decorator.
    """

    concurrency: Annotated[int, msgspec.Meta(ge=1)] = 10
    """Handlers running at once; 1 keeps the order."""
    retries: Annotated[int, msgspec.Meta(ge=0)] | None = None
    """Further attempts after a failure (default: the broker's ``ROLLBACK_ATTEMPTS``)."""
    backoff: Annotated[float, msgspec.Meta(ge=0)] | None = None
    """Seconds before the first retry, doubled each time (default ``RETRY_BACKOFF``)."""
    autoack: bool = True
    """Acknowledge once the handler returned; False leaves it to the handler."""
    retry_on: tuple[Any, ...] | None = None
    """The exception classes that are retried (a timeout is a ``TimeoutError``); any
    other failure goes to ``{queue}.dead`` at once. None (default): every exception."""
    max_backoff: Annotated[float, msgspec.Meta(ge=0)] = 300
    """The most seconds the doubling ``backoff`` waits before a retry."""

    def __post_init__(self) -> None:
        for kind in self.retry_on or ():
            if not (isinstance(kind, type) and issubclass(kind, BaseException)):
                raise TypeError(f'retry_on takes exception classes, not {kind!r}')

    @classmethod
    def of(cls: type[_Options], consumer: Consumer, broker_name: str) -> _Options:
        """The options of ``consumer`` for a broker taking ``cls``, or a clear error."""
        return cls.checked(consumer.options, consumer.key, broker_name)

    @classmethod
    def checked(cls: type[_Options], options: dict[str, Any], key: str, broker_name: str
                ) -> _Options:
        """``options`` of the consumer ``key`` for a broker taking ``cls``, or a
        :class:`QueueException` naming the option (and the near one of a typo)."""
        unknown = sorted(set(options) - set(cls.__struct_fields__))
        if unknown:
            raise QueueException(
                f'{key}: unknown consumer option {unknown[0]} for {broker_name}'
                f'{_did_you_mean(unknown[0], cls.__struct_fields__)}; known: '
                f'{", ".join(sorted(cls.__struct_fields__))}')
        try:
            return msgspec.convert(options, cls)
        except msgspec.ValidationError as exc:
            raise QueueException(f'{key}: {_option_problem(exc)}') from None


AbstractQueueBroker.Options = ConsumerOptions
_Options = TypeVar('_Options', bound=ConsumerOptions)


def _option_problem(error: msgspec.ValidationError) -> str:
    """msgspec's "Expected `int` >= 1 - at `$.prefetch`" as "prefetch must be int >= 1"."""
    message, _, where = str(error).rpartition(' - at `$.')
    if not where:
        return str(error)
    return f'{where.rstrip("`")} must be {message.removeprefix("Expected ").replace("`", "")}'


ACK_FLUSH_TIMEOUT = 10.0


class Outcome(enum.Enum):
    """What becomes of a delivery once its worker is done with it."""

    ACK = 'ack'  # handled, or dead-lettered: acknowledge it
    RELEASE = 'release'  # not finished (the pool is stopping): give it back
    HANDLER_ACKS = 'handler acks'  # autoack=False: the handler acknowledges it itself
    WAITING = 'waiting'  # waits for its retry on a timer: the pool still holds it


class _Waiter:
    """One task waiting to be woken by another: a bare future, made per wait.

    The pool's hand-overs go through these rather than ``asyncio.Queue``, whose put and
    get cost a future and a lock round per message; here a batch of deliveries costs one
    wake-up per idle worker.
    """

    __slots__ = ('future',)

    def __init__(self) -> None:
        self.future: asyncio.Future[None] | None = None  # set while someone waits

    async def wait(self) -> None:
        self.future = asyncio.get_running_loop().create_future()
        try:
            await self.future
        finally:
            self.future = None

    def wake(self) -> None:
        future = self.future
        if future is not None and not future.done():
            future.set_result(None)


class ConsumerPool:
    """Consumes one queue for one consumer: the logic every backend reuses.

    The backend feeds batches of :class:`Delivery` with :meth:`feed`, which waits while
    the pool is full (backpressure). A fixed set of ``concurrency`` workers runs the
    handler; a failure or timeout (of the ``retry_on`` kinds) is retried ``retries``
    times with doubling ``backoff`` (at most ``max_backoff``), then the message goes to
    the dead-letter queue with the error. A message waiting for its retry waits on a
    timer, not in a worker: it counts against the capacity, not the concurrency (with
    ``concurrency=1``, which keeps the order, it waits in the worker). A body
    that is not a JSON object (or does not fit the DTO) goes there at once. Finished
    messages are acknowledged in batches through ``broker.ack``; on :meth:`close`,
    messages not started or not finished go back through ``broker.release``.
    """

    def __init__(self, broker: AbstractQueueBroker, consumer: Consumer,
                 options: ConsumerOptions) -> None:
        self.broker = broker
        self.consumer = consumer
        self.options = options
        self.name = consumer.queue.name
        self.log = broker.log
        self.concurrency = options.concurrency
        self.retries = broker.ROLLBACK_ATTEMPTS if options.retries is None else options.retries
        self.backoff = broker.RETRY_BACKOFF if options.backoff is None else options.backoff
        self.max_backoff = options.max_backoff
        self.retry_on: tuple[type[BaseException], ...] = options.retry_on or (Exception,)
        self.capacity = max(2 * self.concurrency, broker.PREFETCH)
        self._pending: deque[Delivery] = deque()  # fed, not started
        self._to_ack: list[Delivery] = []
        self._to_release: list[Delivery] = []
        self._waiting: dict[Delivery, tuple[int, asyncio.TimerHandle]] = {}  # for a retry
        self._attempts: dict[Delivery, int] = {}  # retries due, back in _pending
        self._idle: deque[_Waiter] = deque()  # workers waiting for deliveries
        self._room = _Waiter()  # the feeder, waiting for room
        self._acks_waiting = _Waiter()  # the acknowledging task, waiting for work
        self._closing = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._acker: asyncio.Task[None] | None = None
        self._watchdog = Watchdog()
        self._handled = Outcome.ACK if options.autoack else Outcome.HANDLER_ACKS
        self._dto_class = consumer.dto_class  # hoisted from the per-message path:
        self._is_struct = bool(self._dto_class and issubclass(self._dto_class, msgspec.Struct))
        self._raw_arg = broker.RAW_MESSAGE_ARG
        self._strip_trace = broker.TRACE_CONTEXT
        # What marun reports (status, metrics, stall check): plain counters, no locks.
        self.handled = self.retried = self.dead_lettered = self.released = 0
        self.last_fetch: float | None = None  # time.monotonic() of the last batch taken
        self.timing = handler_timing()  # durations of the handler's calls, when reported

    def __repr__(self) -> str:
        return f'<ConsumerPool {self.name} x{self.concurrency} for {self.consumer.key}>'

    @property
    def in_flight(self) -> int:
        """Messages being handled now: the workers that are not idle (counted when asked,
        not per message)."""
        return sum(not worker.done() for worker in self._workers) - len(self._idle)

    @property
    def waiting_retries(self) -> int:
        """Messages held while they wait for their retry (not counted in flight)."""
        return len(self._waiting)

    @property
    def has_room(self) -> bool:
        """True when a worker is idle and no message taken waits for one."""
        return not self._pending and bool(self._idle)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._work()) for _ in range(self.concurrency)]
        self._acker = loop.create_task(self._acknowledge())

    @property
    def closing(self) -> bool:
        """True once the pool stops taking messages: backends stop fetching."""
        return self._closing.is_set()

    def stop_feeding(self) -> None:
        """Take no more messages: a :meth:`feed` waiting for room returns at once."""
        self._closing.set()
        self._room.wake()

    # -- the feeder's side ----------------------------------------------------------

    async def feed(self, batch: Iterable[Delivery]) -> None:
        """Hand over deliveries; return when the pool has room for more.

        The deliveries belong to the pool from the call on, even if it is cancelled.
        """
        pending, idle, waiting = self._pending, self._idle, self._waiting
        pending.extend(batch)
        self.last_fetch = time.monotonic()
        for _ in range(min(len(idle), len(pending))):
            idle.popleft().wake()
        while len(pending) + len(waiting) >= self.capacity and not self.closing:
            await self._room.wait()

    # -- the workers ----------------------------------------------------------------

    async def _work(self) -> None:
        pending, room, acks, waiting = self._pending, self._room, self._acks_waiting, self._waiting
        waiter, ack, release = _Waiter(), Outcome.ACK, Outcome.RELEASE
        half_full = self.capacity // 2 + 1
        worker = asyncio.current_task()
        assert worker is not None
        while True:
            if not pending:
                if self.closing:
                    return
                self._idle.append(waiter)
                await waiter.wait()
                continue
            delivery = pending.popleft()
            if room.future is not None and len(pending) + len(waiting) < half_full:
                room.wake()
            try:
                outcome = await (self._handle_traced(delivery, worker) if _tracing.on
                                 else self._handle(delivery, worker))
            except asyncio.CancelledError:
                self._to_release.append(delivery)
                raise
            if outcome is ack:
                self._to_ack.append(delivery)
                if acks.future is not None:
                    acks.wake()
            elif outcome is release:
                self._to_release.append(delivery)

    def _arguments(self, delivery: Delivery) -> dict[str, Any]:
        payload = decode_object(delivery.body)
        if self._strip_trace:
            payload.pop(TRACE_KEY, None)
        dto_class = self._dto_class
        if dto_class is not None:
            dto = (msgspec.convert(payload, dto_class) if self._is_struct
                   else dto_class(**payload))
            payload = {**payload, self.consumer.dto_name: dto}
        if self._raw_arg is not None:
            payload[self._raw_arg] = delivery.raw
        return payload

    async def _run_handler(self, kwargs: dict[str, Any], worker: asyncio.Task[None]) -> None:
        result = self.consumer.handler(**kwargs)
        if not inspect.isawaitable(result):
            return
        self._watchdog.watch(worker, self.consumer.timeout)
        try:
            await result
        except asyncio.CancelledError:
            if not self._watchdog.expired(worker):
                raise
            raise asyncio.TimeoutError from None
        finally:
            self._watchdog.forget(worker)

    async def _handle(self, delivery: Delivery, worker: asyncio.Task[None]) -> Outcome:
        consumer = self.consumer
        try:
            kwargs = self._arguments(delivery)
        except Exception as exc:
            self.log.error('Message in %s is malformed, dead-lettered: %s', self.name, exc)
            return await self._dead_letter(delivery, exc, 0)
        attempts = self._attempts.pop(delivery, 0) if self._attempts else 0
        limit, timing = self.retries + 1, self.timing
        while True:
            attempts += 1
            started = _clock() if timing is not None else 0.0
            try:
                await self._run_handler(kwargs, worker)
                self.handled += 1
                return self._handled
            except asyncio.TimeoutError as exc:
                error: Exception = exc
                self.log.warning('Consumer %s timed out after %ss (attempt %d of %d)',
                                 consumer.key, consumer.timeout, attempts, limit)
            except Exception as exc:
                error = exc
                self.log.warning('Consumer %s failed (attempt %d of %d): %r',
                                 consumer.key, attempts, limit, exc)
            finally:
                if timing is not None:  # timing.observe(), inlined on this hot path
                    elapsed = _clock() - started
                    timing.counts[0 if elapsed <= _FIRST_BOUND else
                                  _bucket_of(HANDLER_BUCKETS, elapsed)] += 1
                    timing.total += elapsed
            _tracing.attempt_failed(error, attempts, limit)
            if not isinstance(error, self.retry_on):
                _log_failed(self.log, error, 'Consumer %s does not retry %s: a message of %s '
                            'dead-lettered', consumer.key, type(error).__name__, self.name)
                return await self._dead_letter(delivery, error, attempts)
            if attempts >= limit:
                _log_failed(self.log, error, 'Consumer %s gave up on a message of %s after %d '
                           'attempts', consumer.key, self.name, attempts)
                return await self._dead_letter(delivery, error, attempts)
            self.retried += 1
            delay = min(self.backoff * 2 ** (attempts - 1), self.max_backoff)
            if delay > 0 and self.concurrency > 1 and not self.closing:
                self._retry_later(delivery, attempts, delay)
                return Outcome.WAITING
            if delay > 0 and not self.closing:  # concurrency 1 keeps the order: it waits
                with contextlib.suppress(asyncio.TimeoutError):  # a stop cuts it short
                    await asyncio.wait_for(self._closing.wait(), delay)
            if self.closing:
                return Outcome.RELEASE

    def _retry_later(self, delivery: Delivery, attempts: int, delay: float) -> None:
        """Hold ``delivery`` on a timer for ``delay`` seconds, then hand it to a worker
        again: no worker waits meanwhile."""
        timer = asyncio.get_running_loop().call_later(delay, self._retry_due, delivery)
        self._waiting[delivery] = (attempts, timer)

    def _retry_due(self, delivery: Delivery) -> None:
        attempts, _ = self._waiting.pop(delivery)
        self._attempts[delivery] = attempts
        self._pending.appendleft(delivery)
        if self._idle:
            self._idle.popleft().wake()

    async def _handle_traced(self, delivery: Delivery, worker: asyncio.Task[None]) -> Outcome:
        """:meth:`_handle` in the CONSUMER span of the delivery (see Tracing)."""
        carrier = self.broker.trace_carrier(delivery)
        if not carrier and self._strip_trace:
            carrier = _tracing.carrier_in(delivery.body)
        with _tracing.processing(self.broker, self.name, self.consumer.key, carrier):
            outcome = await self._handle(delivery, worker)
            if outcome is Outcome.RELEASE:
                _tracing.event('released', {'microagent.reason': 'the consumer is stopping'})
            return outcome

    async def _dead_letter(self, delivery: Delivery, error: BaseException, attempts: int
                           ) -> Outcome:
        fields = {
            'queue': self.name,
            **_original_body(delivery.body),
            'error': f'{type(error).__name__}: {error}',
            'attempts': attempts,
            'consumer': self.consumer.key,
            'failed_at': time.time(),
        }
        if self._strip_trace and _tracing.on:  # no headers: the envelope carries the trace
            fields[TRACE_KEY] = _tracing.headers()
        envelope = encode_json(fields)
        try:
            await self.broker.dead_letter(self.name, delivery, envelope)
        except Exception as exc:
            _log_failure(self.log, exc, 'Dead-lettering a message of %s failed; it goes back '
                         'to the queue', self.name)
            return Outcome.RELEASE
        self.dead_lettered += 1
        _tracing.dead_lettered(self.name, error, attempts)
        return Outcome.ACK

    # -- acknowledging and closing --------------------------------------------------

    async def _acknowledge(self) -> None:
        while True:
            if not self._to_ack:
                if self.closing and all(w.done() for w in self._workers):
                    return
                await self._acks_waiting.wait()
                continue
            batch, self._to_ack = self._to_ack, []
            try:
                await self.broker.ack(self.name, batch)
            except Exception as exc:
                _log_failure(self.log, exc, 'Acknowledging %d messages of %s failed; they '
                             'will be delivered again', len(batch), self.name)

    async def close(self, grace: float | None = None) -> None:
        """Stop taking messages, let running handlers finish (each within its timeout,
        or ``grace`` seconds), acknowledge what finished and release the rest."""
        self.stop_feeding()
        released = list(self._pending)
        self._pending.clear()
        for _, timer in self._waiting.values():
            timer.cancel()
        released.extend(self._waiting)
        self._waiting.clear()
        self._attempts.clear()
        for waiter in self._idle:
            waiter.wake()
        self._idle.clear()
        timeout = grace if grace is not None else self.consumer.timeout + 1
        if self._workers:
            _, late = await asyncio.wait(self._workers, timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                self.log.warning('Cancelled %d handlers of %s still running at stop',
                                 len(late), self.name)
                await asyncio.gather(*late, return_exceptions=True)
        if self._acker is not None:
            self._acks_waiting.wake()
            _, late = await asyncio.wait({self._acker}, timeout=max(timeout, ACK_FLUSH_TIMEOUT))
            if late:
                self._acker.cancel()
                self.log.error('Acknowledging the last messages of %s timed out; they will be '
                               'delivered again', self.name)
                await asyncio.gather(self._acker, return_exceptions=True)
        self._watchdog.close()
        released.extend(self._to_release)
        self.released += len(released)
        if released:
            try:
                await self.broker.release(self.name, released)
            except Exception as exc:
                _log_failure(self.log, exc, 'Releasing %d messages of %s failed; the broker '
                             'will deliver them again', len(released), self.name)


def _original_body(body: Any) -> dict[str, str]:
    """A dead letter's copy of the message: ``body`` when it is UTF-8 text (a JSON
    body always is), else ``body_base64``, so the original bytes can be recovered."""
    if not isinstance(body, (bytes, bytearray, memoryview)):
        return {'body': str(body)}
    try:
        return {'body': bytes(body).decode('utf-8')}
    except UnicodeDecodeError:
        import base64

        return {'body_base64': base64.b64encode(body).decode('ascii')}


UNKNOWN_ENVELOPE = 'unknown envelope'  # the error of a dead letter that is not ours


class _Envelope(msgspec.Struct):
    """A dead letter as :meth:`ConsumerPool._dead_letter` writes it."""
    error: str
    attempts: int
    failed_at: float
    body: str | None = None
    body_base64: str | None = None
    consumer: str | None = None


def _read_dead_letter(letter_id: str, queue: str, raw: bytes, failed_at: float = 0.0
                      ) -> DeadLetter:
    """The :class:`DeadLetter` stored as ``raw``. A letter that is not an envelope of
    ours (a 1.x peer's, or written by hand) is what can be read of it: its raw bytes as
    the body, ``error`` :data:`UNKNOWN_ENVELOPE`, ``failed_at`` as the backend knows it."""
    import base64
    import binascii

    raw = bytes(raw)
    try:
        envelope = msgspec.json.decode(raw, type=_Envelope)
        if envelope.body is not None:
            body = envelope.body.encode()
        elif envelope.body_base64 is not None:
            body = base64.b64decode(envelope.body_base64, validate=True)
        else:
            raise ValueError('no body')
    except (msgspec.DecodeError, ValueError, binascii.Error):
        return DeadLetter(letter_id, queue, raw, UNKNOWN_ENVELOPE, 0, None, failed_at)
    return DeadLetter(letter_id, queue, body, envelope.error, envelope.attempts,
                      envelope.consumer, envelope.failed_at)


def _content_ids(letters: Iterable[bytes], seen: dict[str, int] | None = None) -> list[str]:
    """Ids of dead letters kept in a list without ids of their own (memory, Redis,
    RabbitMQ), read from the head: ``{digest}-{n}``, the first 16 hex digits of the SHA-1
    of the letter's bytes and how many identical letters come before it. An id stays
    the same while its letter is there, whatever is added behind it or removed (only
    removing an identical letter before it renumbers it: identical letters are
    interchangeable). ``seen`` carries the counts over from the pages read before."""
    import hashlib

    seen = {} if seen is None else seen
    ids = []
    for letter in letters:
        digest = hashlib.sha1(letter).hexdigest()[:16]
        occurrence = seen.get(digest, 0)
        seen[digest] = occurrence + 1
        ids.append(f'{digest}-{occurrence}')
    return ids


def _read_dead_letters(queue: str, letters: list[bytes], seen: dict[str, int] | None = None
                       ) -> list[DeadLetter]:
    """The letters of a list read from its head (``seen``: see :func:`_content_ids`)."""
    return [_read_dead_letter(letter_id, queue, letter)
            for letter_id, letter in zip(_content_ids(letters, seen), letters, strict=True)]


def _wanted_ids(ids: Iterable[str] | None) -> set[str] | None:
    """The ids given to ``replay`` or ``purge_dead`` as a set (a lone str is one id)."""
    if ids is None:
        return None
    return {ids} if isinstance(ids, str) else {str(i) for i in ids}


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 0):
        raise ValueError(f'limit must be an int >= 0 or None, not {limit!r}')


def _log_failure(log: logging.Logger, error: BaseException, message: str, *args: Any) -> None:
    """Log a failed broker operation: one warning line for a lost connection (the
    backend says how it recovers), the traceback only for an unexpected error."""
    if isinstance(error, ConnectionError):
        log.warning(message + ': %s', *args, error)
    else:
        log.error(message, *args, exc_info=error)


# =====================================================================================
# Timers: periodic and cron tasks
# =====================================================================================

class _Timer:
    """Runs a handler at the times :meth:`next_delay` gives, each run within its
    timeout; an exception is logged and the schedule goes on.

    A singleton timer (``singleton`` is its key) runs at the ticks :meth:`tick_after`
    gives on the wall clock (:meth:`clock`), each one only once it was claimed on the
    agent's bus (see :meth:`_singleton_tick`).
    """

    kind: ClassVar[str]  # 'periodic' or 'cron': the name of its spans and of its handler times

    def __init__(self, agent: MicroAgent, handler: Callable[..., Any], timeout: float,
                 singleton: bool | str = False) -> None:
        self.agent = agent
        self.handler = handler
        self.timeout = timeout
        self.singleton = _singleton_key(type(agent), handler.__name__, singleton)
        self._timer: asyncio.TimerHandle | None = None
        self._run: asyncio.Task[None] | None = None
        self._at = 0.0
        self._holder = os.urandom(8).hex()  # this timer's name in its claims
        self._tick_at = 0.0  # singleton: the Unix time of the next tick
        self._skipped = 0  # singleton: ticks skipped in a row because the bus failed
        self.last_run: float | None = None  # Unix time of the last run's start (marun's status)
        self.last_error: str | None = None  # how the last run failed; None if it did not
        self.timing = handler_timing()

    def __repr__(self) -> str:
        return f'<{type(self).__name__} {handler_key(type(self.agent), self.handler)}>'

    @property
    def next_run(self) -> float | None:
        """The Unix time of the next scheduled run; None while none is scheduled."""
        if self._timer is None:
            return None
        if self.singleton:
            return self._tick_at
        return time.time() + self._timer.when() - asyncio.get_running_loop().time()

    def first_delay(self) -> float:
        return self.next_delay()

    def next_delay(self) -> float:
        raise NotImplementedError

    def start(self) -> None:
        if self.singleton is not None:
            self._tick_at = self.tick_after(self.clock() + self.start_after())
            self._schedule_singleton()
            return
        loop = asyncio.get_running_loop()
        self._at = loop.time() + self.first_delay()
        self._timer = loop.call_at(self._at, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        self._at = self._schedule_after(self._at, loop.time())
        self._timer = loop.call_at(self._at, self._tick)
        if self._run is not None and not self._run.done():
            self.agent.log.warning('%r skipped a run: the previous one is still going', self)
            return
        self._run = loop.create_task(self._execute())

    def _schedule_after(self, previous: float, now: float) -> float:
        return now + self.next_delay()

    async def _execute(self) -> None:
        self.last_run, started = time.time(), time.perf_counter()
        try:
            if _tracing.on:
                with _tracing.timer_run(self.kind, type(self.agent), self.handler):
                    await _call(self.handler, self.timeout)
            else:
                await _call(self.handler, self.timeout)
            self.last_error = None
        except asyncio.TimeoutError:
            self.agent.log.error('%r timed out after %ss', self, self.timeout)
            self.last_error = f'timed out after {self.timeout}s'
        except Exception as exc:
            _log_failed(self.agent.log, exc, '%r failed', self)
            self.last_error = f'{type(exc).__name__}: {exc}'
        finally:
            if self.timing is not None:
                self.timing.observe(time.perf_counter() - started)

    async def drain(self, grace: float | None = None) -> None:
        """Wait for a running call (within its timeout, or ``grace``)."""
        if self._run is None or self._run.done():
            return
        done, _ = await asyncio.wait({self._run}, timeout=grace if grace is not None
                                     else self.timeout + 1)
        if not done:
            self._run.cancel()
            await asyncio.gather(self._run, return_exceptions=True)

    # -- singleton ticks: on the wall clock, each claimed on the bus ------------------------

    def clock(self) -> float:
        """The wall clock of the singleton ticks, in Unix seconds (tests shift it)."""
        return time.time()

    def start_after(self) -> float:
        """Seconds after the start before the first singleton tick may come."""
        return 0.0

    def tick_after(self, moment: float) -> float:
        """The Unix time of the first tick strictly after ``moment``."""
        raise NotImplementedError

    def _schedule_singleton(self) -> None:
        delay = max(0.0, self._tick_at - self.clock())
        self._timer = asyncio.get_running_loop().call_later(delay, self._singleton_tick)

    def _singleton_tick(self) -> None:
        """Run the tick that is due if this agent claims it first.

        A tick is named by its scheduled time, so agents whose clocks differ claim the
        same tick, and the bus grants it once. A tick noticed later than half the gap to
        the next one (the event loop was blocked, the process paused) is skipped: the
        other agents ran it, and its claim might have been forgotten already.
        """
        tick, now = self._tick_at, self.clock()
        if now < tick:  # the loop's monotonic clock ran ahead of the wall clock
            self._schedule_singleton()
            return
        gap = self.tick_after(tick) - tick
        self._tick_at = self.tick_after(now)
        self._schedule_singleton()
        if now - tick > gap / 2:
            self.agent.log.warning('%r skipped the tick of %s: it came %.3fs late',
                                   self, _utc(tick), now - tick)
            return
        if self._run is not None and not self._run.done():
            self.agent.log.warning('%r leaves the tick of %s to the other agents: its '
                                   'previous run is still going', self, _utc(tick))
            return
        self._run = asyncio.get_running_loop().create_task(self._claim_and_run(tick, gap))

    async def _claim_and_run(self, tick: float, gap: float) -> None:
        bus, key = self.agent.bus, self.singleton
        assert bus is not None and key is not None
        try:
            claimed = await bus.claim_tick(key, round(tick * 1000), self._holder,
                                           2 * gap + CLAIM_MARGIN)
        except Exception as exc:
            self._skipped += 1
            log = self.agent.log.warning if self._skipped == 1 else self.agent.log.debug
            log('%r skipped the tick of %s: claiming it on the bus failed (%s)',
                self, _utc(tick), exc)
            return
        if self._skipped:
            self.agent.log.info('%r claims ticks again, after %d skipped', self, self._skipped)
            self._skipped = 0
        if claimed:
            await self._execute()


class PeriodicTask(_Timer):
    """``@periodic``: every ``period`` seconds, after ``start_after``; missed ticks are
    skipped, so the schedule does not drift or burst."""

    kind = 'periodic'

    def __init__(self, agent: MicroAgent, handler: Callable[..., Any], args: PeriodicArgs) -> None:
        super().__init__(agent, handler, args.timeout, args.singleton)
        self.args = args

    def first_delay(self) -> float:
        return self.args.start_after

    def _schedule_after(self, previous: float, now: float) -> float:
        period = self.args.period
        at = previous + period
        if at <= now:
            at += (int((now - at) / period) + 1) * period
        return at

    def start_after(self) -> float:
        return self.args.start_after

    def tick_after(self, moment: float) -> float:
        """The next multiple of ``period`` on the Unix clock: the same ticks for every
        agent, whenever it started."""
        period = self.args.period
        number = math.floor(moment / period)  # the division may round: checked below
        while number * period > moment:
            number -= 1
        while number * period <= moment:
            number += 1
        return number * period


class CronTask(_Timer):
    """``@cron``: at the next time the spec gives, in UTC or the given zone."""

    kind = 'cron'

    def __init__(self, agent: MicroAgent, handler: Callable[..., Any], args: CronArgs) -> None:
        super().__init__(agent, handler, args.timeout, args.singleton)
        self.args = args
        self._croniter = _import_croniter()
        self._zone = _timezone(args.tz)

    def next_delay(self) -> float:
        import datetime
        now = datetime.datetime.now(self._zone)
        spec = self.args.spec.lower() if self.args.spec.startswith('@') else self.args.spec
        following = self._croniter(spec, now).get_next(datetime.datetime)
        return max(0.0, float((following - now).total_seconds()))

    def tick_after(self, moment: float) -> float:
        import datetime
        start = datetime.datetime.fromtimestamp(moment, self._zone)
        spec = self.args.spec.lower() if self.args.spec.startswith('@') else self.args.spec
        return float(self._croniter(spec, start).get_next(float))


CLAIM_MARGIN = 30.0
"""Seconds a tick claim outlives two gaps between ticks: room for a slow round trip."""


def _utc(moment: float) -> str:
    """A Unix time as ISO 8601 in UTC, to the millisecond, for logs."""
    import datetime
    return datetime.datetime.fromtimestamp(moment, datetime.timezone.utc).isoformat(
        timespec='milliseconds')


class LeasedServer:
    """A singleton server (``@on('server', singleton=True)``): it runs while its agent
    holds the lease of ``key`` on the bus.

    :meth:`run` takes the lease when it is free (trying every third of the bus's
    ``LEASE_TTL``), starts the server, and renews the lease every third of
    ``LEASE_TTL`` with a compare-and-set on its token. When renewing fails (the bus is
    unreachable, or someone else holds the lease) it retries until two thirds of the
    lease have passed since the last renewal that succeeded, then cancels the server and
    waits until it ended: at least a third of ``LEASE_TTL`` before the lease could
    expire. Then it tries to take the lease again. A graceful stop cancels the server
    and releases the lease at once.
    """

    def __init__(self, agent: MicroAgent, handler: Callable[..., Any], key: str) -> None:
        self.agent = agent
        self.handler = handler
        self.key = key
        self.holder = os.urandom(8).hex()  # this agent's name in the lease
        self.token: str | None = None  # '<fencing number>:<holder>' while running

    def __repr__(self) -> str:
        return f'<LeasedServer {type(self.agent).__name__}.{self.handler.__name__}>'

    @property
    def fence(self) -> int | None:
        """The fencing number of the lease held now, or None."""
        return int(self.token.partition(':')[0]) if self.token is not None else None

    async def run(self) -> Any:
        """Run the server whenever this agent holds the lease, until the server returns
        or raises by itself (the lease is then released, and the outcome is this
        coroutine's), or until cancelled (the agent stops)."""
        bus = self.agent.bus
        assert bus is not None
        ttl = float(bus.LEASE_TTL)
        server: asyncio.Task[Any] | None = None
        try:
            while True:
                expires = await self._acquire(bus, ttl)
                server = asyncio.get_running_loop().create_task(_call(self.handler, None))
                if await self._hold(bus, server, expires, ttl):
                    ended, server = server, None
                    await self._release(bus, ttl)
                    return ended.result()
                server = None
        finally:
            if server is not None:
                await self._cancel(server, None)
            await self._release(bus, ttl)

    async def _acquire(self, bus: AbstractSignalBus, ttl: float) -> float:
        """Take the lease, trying every third of ``ttl``; return when it expires (on the
        event loop's clock: ``ttl`` after the successful request was sent)."""
        loop = asyncio.get_running_loop()
        failing = False
        while True:
            sent = loop.time()
            try:
                self.token = await _with_timeout(
                    bus.acquire_lease(self.key, self.holder, ttl), ttl / 3)
            except Exception as exc:
                if not failing:
                    self.agent.log.warning('%r cannot take its lease: %s; trying again',
                                           self, error_text(exc))
                failing = True
            else:
                failing = False
                if self.token is not None:
                    self.agent.log.info('%r holds the lease of %s (fencing token %s)',
                                        self, self.key, self.fence)
                    return sent + ttl
            await asyncio.sleep(max(0.0, sent + ttl / 3 - loop.time()))

    async def _hold(self, bus: AbstractSignalBus, server: asyncio.Task[Any], expires: float,
                    ttl: float) -> bool:
        """Renew the lease while ``server`` runs: True when the server ended by itself;
        False when the lease was lost, after the server was cancelled and ended."""
        loop = asyncio.get_running_loop()
        assert self.token is not None
        renew_at = expires - ttl + ttl / 3
        failure: str | None = None
        while True:
            done, _ = await asyncio.wait({server}, timeout=max(0.0, renew_at - loop.time()))
            if done:
                return True
            sent, give_up_at = loop.time(), expires - ttl / 3
            if sent >= give_up_at:
                await self._cancel(server, 'its lease could not be renewed in time '
                                           f'({failure or "the event loop was blocked"})')
                return False
            try:
                kept = await _with_timeout(bus.renew_lease(self.key, self.token, ttl),
                                           give_up_at - sent)
            except Exception as exc:
                failure = error_text(exc)
                self.agent.log.debug('%r could not renew its lease: %s', self, failure)
                renew_at = min(loop.time() + ttl / 12, give_up_at)
                continue
            if not kept:
                await self._cancel(server, 'its lease was lost to another agent')
                return False
            expires, renew_at, failure = sent + ttl, sent + ttl / 3, None

    async def _cancel(self, server: asyncio.Task[Any], why: str | None) -> None:
        """Cancel the server and wait until it ended."""
        if why is not None:
            self.agent.log.warning('%r cancels its server: %s', self, why)
            self.token = None
        await cancel_and_wait(server)  # at once: the lease may end soon after
        if not server.cancelled() and server.exception() is not None:
            self.agent.log.error('Server %s failed as it was cancelled', self.handler.__name__,
                                 exc_info=server.exception())

    async def _release(self, bus: AbstractSignalBus, ttl: float) -> None:
        """Give the lease up at once (if it cannot be, it expires by itself)."""
        token, self.token = self.token, None
        if token is None:
            return
        try:
            await _with_timeout(bus.release_lease(self.key, token), ttl / 3)
        except Exception as exc:
            self.agent.log.warning('%r could not release its lease (%s): another agent '
                                   'takes over once it expired', self, exc)


# =====================================================================================
# Memory backends: in-process bus and broker with the semantics of the real ones
# =====================================================================================

def _memory_name(dsn: str) -> str:
    if not isinstance(dsn, str) or not dsn.startswith('memory://'):
        shown = redact_dsn(dsn) if isinstance(dsn, str) else dsn
        raise ValueError(f'a memory backend needs a memory://NAME DSN, not {shown!r}')
    return dsn[len('memory://'):] or 'default'


class _BusHub:
    """The channels of one ``memory://NAME`` bus, shared by the buses of a process, and
    the tick claims and leases of its singletons (expiring on the monotonic clock)."""

    hubs: ClassVar[dict[str, _BusHub]] = {}

    def __init__(self) -> None:
        self.subscriptions: dict[str, set[MemorySignalBus]] = {}
        self.claims: dict[tuple[str, int], tuple[str, float]] = {}  # -> holder, expiry
        self.leases: dict[str, tuple[str, float]] = {}  # key -> token, expiry
        self.fences: dict[str, int] = {}  # key -> last fencing number given
        self.pending = 0  # messages published and not yet handed to their buses

    @classmethod
    def named(cls, name: str) -> _BusHub:
        return cls.hubs.setdefault(name, cls())

    def publish(self, channel: str, message: bytes) -> None:
        loop = asyncio.get_running_loop()
        for pattern, buses in self.subscriptions.items():
            if channel.startswith(pattern[:-1]) if pattern.endswith('*') else channel == pattern:
                for bus in buses:
                    self.pending += 1
                    loop.call_soon(self._deliver, bus, channel, message)

    def _deliver(self, bus: MemorySignalBus, channel: str, message: bytes) -> None:
        self.pending -= 1
        bus.handle_message(channel, message)


MEMORY_SEND_BURST = 1000
"""Messages a memory bus sender publishes without yielding to their receivers."""


class MemorySignalBus(AbstractSignalBus):
    """An in-process signal bus, ``memory://NAME``: buses with the same name in one
    process share their channels. Same semantics as the Redis bus (RPC included)."""

    def __init__(self, dsn: str = 'memory://default', prefix: str = 'PUBSUB',
                 log: logging.Logger | None = None, **kwargs: Any) -> None:
        super().__init__(dsn, prefix, log, **kwargs)
        self._hub = _BusHub.named(_memory_name(dsn))
        self._patterns: set[str] = set()

    async def send(self, channel: str, message: bytes) -> None:
        """Publish ``message``; a sender that published :data:`MEMORY_SEND_BURST`
        messages not yet handed to their buses yields once, so that receivers take them
        as they come, within their ``RECEIVER_BACKLOG``, rather than all at once."""
        self._hub.publish(channel, bytes(message) if not isinstance(message, bytes)
                          else message)
        if self._hub.pending >= MEMORY_SEND_BURST:
            await asyncio.sleep(0)

    async def bind(self, channel: str) -> None:
        self._hub.subscriptions.setdefault(channel, set()).add(self)
        self._patterns.add(channel)

    async def unbind(self, channel: str) -> None:
        subscribers = self._hub.subscriptions.get(channel)
        if subscribers is not None:
            subscribers.discard(self)
            if not subscribers:
                del self._hub.subscriptions[channel]
        self._patterns.discard(channel)

    async def disconnect(self) -> None:
        for channel in list(self._patterns):
            await self.unbind(channel)

    # -- singletons: the hub's claims and leases, as the Redis bus keeps them -------------

    async def claim_tick(self, key: str, tick_ms: int, holder: str, ttl: float) -> bool:
        claims, now = self._hub.claims, time.monotonic()
        for name in [name for name, (_, expiry) in claims.items() if expiry <= now]:
            del claims[name]
        first, _ = claims.setdefault((key, tick_ms), (holder, now + ttl))
        return first == holder

    def _lease(self, key: str) -> str | None:
        """The token holding the lease of ``key`` now (an expired lease is dropped)."""
        held = self._hub.leases.get(key)
        if held is not None and held[1] <= time.monotonic():
            del self._hub.leases[key]
            held = None
        return held[0] if held is not None else None

    async def acquire_lease(self, key: str, holder: str, ttl: float) -> str | None:
        token = self._lease(key)
        if token is None:
            self._hub.fences[key] = fence = self._hub.fences.get(key, 0) + 1
            token = f'{fence}:{holder}'
        elif token.partition(':')[2] != holder:
            return None
        self._hub.leases[key] = (token, time.monotonic() + ttl)
        return token

    async def renew_lease(self, key: str, token: str, ttl: float) -> bool:
        if self._lease(key) != token:
            return False
        self._hub.leases[key] = (token, time.monotonic() + ttl)
        return True

    async def release_lease(self, key: str, token: str) -> bool:
        if self._lease(key) != token:
            return False
        del self._hub.leases[key]
        return True


class _MemoryQueue:
    def __init__(self) -> None:
        self.items: deque[bytes] = deque()
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.delayed: list[tuple[float, int, bytes]] = []  # a heap: (due, order, body)
        self.timer: asyncio.TimerHandle | None = None  # moves the next due message

    def delay(self, messages: list[bytes], due: float) -> None:
        """Keep messages until ``due`` (Unix time), then append them to the queue."""
        for message in messages:
            heapq.heappush(self.delayed, (due, next(_delay_order), message))
        self._arm()

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.delayed:
            wait = max(self.delayed[0][0] - time.time(), 0.0)
            self.timer = asyncio.get_running_loop().call_later(wait, self._move_due)

    def _move_due(self) -> None:
        self.timer = None
        now, delayed = time.time(), self.delayed
        while delayed and delayed[0][0] <= now:
            self.items.append(heapq.heappop(delayed)[2])
        self.wake()
        self._arm()

    def wake(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter in self.waiters:
                self.waiters.remove(waiter)
            elif waiter.done() and self.items:
                self.wake()  # pass the wake-up on to another consumer
            raise


_delay_order = itertools.count()  # keeps messages due at the same time in their order


class _BrokerHub:
    """The queues of one ``memory://NAME`` broker, shared by the brokers of a process."""

    hubs: ClassVar[dict[str, _BrokerHub]] = {}

    def __init__(self) -> None:
        self.queues: dict[str, _MemoryQueue] = {}

    @classmethod
    def named(cls, name: str) -> _BrokerHub:
        return cls.hubs.setdefault(name, cls())

    def queue(self, name: str) -> _MemoryQueue:
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = _MemoryQueue()
        return queue


class MemoryBroker(AbstractQueueBroker):
    """An in-process queue broker, ``memory://NAME``: brokers with the same name in one
    process share their queues (consumers of one queue compete for its messages).
    Same semantics as the real brokers: retries, dead letters, graceful stop. Send
    options of other backends (``topic=``) are accepted and ignored."""

    FETCH_BATCH: ClassVar[int] = 256

    def __init__(self, dsn: str = 'memory://default', log: logging.Logger | None = None,
                 **kwargs: Any) -> None:
        super().__init__(dsn, log, **kwargs)
        self._hub = _BrokerHub.named(_memory_name(dsn))
        self._fetchers: dict[str, asyncio.Task[None]] = {}

    async def send(self, name: str, message: bytes, **kwargs: Any) -> None:
        queue = self._hub.queue(name)
        queue.items.append(message)
        if queue.waiters:
            queue.wake()

    async def send_many(self, name: str, messages: list[bytes], **kwargs: Any) -> None:
        queue = self._hub.queue(name)
        queue.items.extend(messages)
        queue.wake()

    async def send_later(self, name: str, messages: list[bytes], due: float, **kwargs: Any
                         ) -> None:
        """Keep the messages in the process until due (on a timer of the event loop)."""
        self._hub.queue(name).delay(messages, due)

    async def delayed_count(self, queue: str) -> int:
        return len(self._hub.queue(queue).delayed)

    async def bind(self, name: str) -> None:
        pool = self.pools[name]
        self._fetchers[name] = asyncio.get_running_loop().create_task(self._consume(name, pool))

    async def _consume(self, name: str, pool: ConsumerPool) -> None:
        queue, size = self._hub.queue(name), self.FETCH_BATCH
        items = queue.items
        while True:
            if not items:
                await queue.wait()
                continue
            count = min(len(items), size)
            batch = [Delivery(items.popleft()) for _ in range(count)]
            if items and queue.waiters:
                queue.wake()
            await pool.feed(batch)

    async def unbind(self, name: str) -> None:
        fetcher = self._fetchers.pop(name, None)
        if fetcher is not None:
            fetcher.cancel()
            await asyncio.gather(fetcher, return_exceptions=True)

    async def release(self, name: str, deliveries: list[Delivery]) -> None:
        queue = self._hub.queue(name)
        queue.items.extendleft(d.body for d in reversed(deliveries))
        queue.wake()

    async def queue_length(self, name: str) -> int:
        return len(self._hub.queue(name).items)

    # -- dead letters: ids are content ids (see _content_ids), as on Redis ------------

    def _dead(self, queue: str) -> deque[bytes]:
        return self._hub.queue(f'{queue}.dead').items

    async def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        _check_limit(limit)
        letters = list(itertools.islice(self._dead(queue), limit))
        return _read_dead_letters(queue, letters)

    async def dead_count(self, queue: str) -> int:
        return len(self._dead(queue))

    def _chosen(self, queue: str, wanted: set[str] | None, limit: int | None
                ) -> list[int]:
        """Positions in ``{queue}.dead`` of the letters whose ids are ``wanted``, else
        the first ``limit``, else all."""
        dead = self._dead(queue)
        if wanted is None:
            return list(range(len(dead) if limit is None else min(limit, len(dead))))
        return [i for i, letter_id in enumerate(_content_ids(dead)) if letter_id in wanted]

    def _remove_dead(self, queue: str, positions: list[int]) -> None:
        dead, removed = self._dead(queue), set(positions)
        kept = [letter for i, letter in enumerate(dead) if i not in removed]
        dead.clear()
        dead.extend(kept)

    async def _take_dead(self, queue: str, wanted: set[str] | None, limit: int | None, *,
                         push: bool) -> int:
        positions = self._chosen(queue, wanted, limit)
        if push:
            dead = self._dead(queue)
            bodies = [_read_dead_letter('', queue, dead[i]).body for i in positions]
            if bodies:
                await self.send_many(queue, bodies)
        self._remove_dead(queue, positions)
        return len(positions)

    async def disconnect(self) -> None:
        for name in list(self._fetchers):
            await self.unbind(name)


# =====================================================================================
# Mocks: a bus and a broker for unit tests, strict about names
# =====================================================================================

def _strict_mock(spec: type, name: str) -> mock.MagicMock:
    from unittest import mock
    return mock.MagicMock(spec=spec, name=name)


def _checking(check: Callable[..., Any]) -> Callable[..., Any]:
    """A mock's ``side_effect`` that makes the checks of the real method (raising what it
    raises) and then lets the mock answer its ``return_value``."""
    from unittest import mock

    def side_effect(*args: Any, **kwargs: Any) -> Any:
        check(*args, **kwargs)
        return mock.DEFAULT
    return side_effect


class BusMock(AbstractSignalBus):
    """A signal bus for tests, built on ``unittest.mock``.

    ``bus.<signal>`` is a mock of :class:`BoundSignal` whose ``send``, ``call`` and
    ``waiter`` record their calls (``call`` answers ``{}``): assert on them with
    ``agent.bus.user_created.send.assert_called_once_with('me', user_id=1)``. They check
    and serialize exactly as a real bus does: a signal that is not declared raises
    :class:`SignalNotFound`, a payload that is not JSON or does not match a strict
    signal raises :class:`SerializingError`, one that does not match a typed signal is
    logged as the same warning. Nothing is delivered: no receiver runs.
    """

    def __init__(self, dsn: str = 'mock://', prefix: str = 'PUBSUB',
                 log: logging.Logger | None = None) -> None:
        from unittest import mock
        super().__init__(dsn, prefix, log)
        self._signal_mocks: dict[str, mock.MagicMock] = {}
        self.send = mock.AsyncMock(name='bus.send')  # type: ignore[method-assign]
        self.bind = mock.AsyncMock(name='bus.bind')  # type: ignore[method-assign]

    async def send(self, channel: str, message: bytes) -> None:  # replaced by a mock
        """Replaced by an ``AsyncMock`` on each instance."""

    async def bind(self, channel: str) -> None:  # replaced by a mock
        """Replaced by an ``AsyncMock`` on each instance."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith('_'):
            raise AttributeError(name)
        signal = Signal.get(name)
        bound = self._signal_mocks.get(name)
        if bound is None:
            bound = self._signal_mocks[name] = _strict_mock(BoundSignal, f'bus.{name}')
            bound.signal, bound.bus = signal, self
            real = BoundSignal(self, signal)

            def check_send(sender: str, **kwargs: Any) -> None:
                real._prepare(sender, kwargs)

            def check_call(sender: str, timeout: float = 60, **kwargs: Any) -> None:
                real._prepare(sender, kwargs)

            bound.send.side_effect = _checking(check_send)
            bound.call.side_effect = _checking(check_call)
            bound.waiter.side_effect = _checking(check_call)
            bound.call.return_value = {}
        return bound


class BrokerMock(AbstractQueueBroker):
    """A queue broker for tests, built on ``unittest.mock``.

    ``broker.<queue>`` is a mock of :class:`BoundQueue` whose ``send``, ``send_many`` and
    ``length`` record their calls (``length`` answers 0):
    ``agent.broker.mailer.send.assert_called()``. They check and serialize exactly as a
    real broker does: a queue that is not declared raises :class:`QueueNotFound`, a
    message that is not a dict of JSON values raises :class:`SerializingError`. Nothing
    is stored: no consumer runs.
    """

    def __init__(self, dsn: str = 'mock://', log: logging.Logger | None = None) -> None:
        from unittest import mock
        super().__init__(dsn, log)
        self._queue_mocks: dict[str, mock.MagicMock] = {}
        self.send = mock.AsyncMock(name='broker.send')  # type: ignore[method-assign]
        self.bind = mock.AsyncMock(name='broker.bind')  # type: ignore[method-assign]
        self.queue_length = mock.AsyncMock(  # type: ignore[method-assign]
            name='broker.queue_length', return_value=0)

    async def send(self, name: str, message: bytes, **kwargs: Any) -> None:
        """Replaced by an ``AsyncMock`` on each instance."""

    async def bind(self, name: str) -> None:
        """Replaced by an ``AsyncMock`` on each instance."""

    async def queue_length(self, name: str) -> int:
        """Replaced by an ``AsyncMock`` on each instance."""
        return 0

    def __getattr__(self, name: str) -> Any:
        if name.startswith('_'):
            raise AttributeError(name)
        queue = Queue.get(name)
        bound = self._queue_mocks.get(name)
        if bound is None:
            bound = self._queue_mocks[name] = _strict_mock(BoundQueue, f'broker.{name}')
            bound.queue, bound.broker = queue, self

            def check_send(message: Mapping[str, Any], *, delay: float | None = None,
                           at: Any = None, **options: Any) -> None:
                due_time(delay, at)
                queue.serialize(message)

            def check_send_many(messages: Iterable[Mapping[str, Any]], *,
                                delay: float | None = None, at: Any = None,
                                **options: Any) -> None:
                due_time(delay, at)
                for message in messages:
                    queue.serialize(message)

            bound.send.side_effect = _checking(check_send)
            bound.send_many.side_effect = _checking(check_send_many)
            bound.length.return_value = 0
        return bound


# =====================================================================================
# Launcher: settings modules, backends and the agents of a group
# =====================================================================================

DEFAULT_GRACE = 30.0
LEGACY_BACKENDS = {
    'RedisSignalBus': 'microagent_backends.RedisSignalBus',
    'AIORedisSignalBus': 'microagent_backends.RedisSignalBus',
    'RedisBroker': 'microagent_backends.RedisBroker',
    'AIORedisBroker': 'microagent_backends.RedisBroker',
    'AMQPBroker': 'microagent_backends.AMQPBroker',
    'KafkaBroker': 'microagent_backends.KafkaBroker',
}
run_log = logging.getLogger('microagent.run')

BackendConfig = tuple[str, dict[str, Any]]


class SettingsError(ValueError):
    """A launcher settings module that cannot be used; the message names module and key."""


def resolve_backend(path: str) -> str:
    """The import path of a backend, translating microagent 1.x paths
    (``microagent.tools.redis.RedisSignalBus``) to ``microagent_backends``."""
    if path.startswith('microagent.tools.'):
        return LEGACY_BACKENDS.get(path.rsplit('.', 1)[-1], path)
    return path


def import_backend(path: str) -> Any:
    """Import ``package.module.Name`` (1.x backend paths accepted)."""
    module_path, _, name = resolve_backend(path).rpartition('.')
    if not module_path:
        raise ImportError(f'{path!r} is not a dotted path to a class')
    module = importlib.import_module(module_path)
    try:
        return getattr(module, name)
    except AttributeError:
        raise ImportError(f'module {module_path!r} has no {name!r}') from None


def _section(module_path: str, module: Any, key: str) -> dict[str, dict[str, Any]]:
    section = getattr(module, key, {})
    if not isinstance(section, dict):
        raise SettingsError(f'{module_path}: {key} must be a dict')
    for name, entry in section.items():
        if not isinstance(entry, dict):
            raise SettingsError(f'{module_path}: {key}[{name!r}] must be a dict')
        if not isinstance(entry.get('backend'), str):
            raise SettingsError(f"{module_path}: {key}[{name!r}]: missing key 'backend'")
        try:
            import_backend(entry['backend'])
        except ImportError as exc:
            raise SettingsError(
                f"{module_path}: {key}[{name!r}]['backend']: cannot import "
                f'{entry["backend"]!r}: {exc}') from None
        except Exception as exc:
            raise SettingsError(
                f"{module_path}: {key}[{name!r}]['backend']: cannot import "
                f'{entry["backend"]!r}: {type(exc).__name__}: {exc}') from None
    return {name: dict(entry) for name, entry in section.items()}


def load_configuration(module_path: str) -> Iterator[tuple[str, BackendConfig]]:
    """Read a settings module: yield ``(agent_name, (backend, cfg))`` for each AGENT entry,
    with ``cfg['bus']`` / ``cfg['broker']`` unfolded to their ``(backend, params)``.

    A settings module has three dicts (BUS and BROKER are optional)::

        BUS = {'main': {'backend': 'microagent.MemorySignalBus', 'dsn': 'memory://app'}}
        BROKER = {'main': {'backend': 'microagent.MemoryBroker', 'dsn': 'memory://app'}}
        AGENT = {'user': {'backend': 'app.agents.UserAgent', 'bus': 'main',
                          'broker': 'main', 'settings': {'key': 'value'}}}

    An AGENT entry may also have ``replicas`` (processes of the agent, default 1) and
    ``restart`` (``'no'``, ``'on-failure'`` or ``'always'``): ``marun`` reads them,
    :func:`init_agent` does not pass them to the class (see :data:`RUN_KEYS`).

    A module that cannot be imported, an unknown backend or a missing key raises
    :class:`SettingsError` naming the module and the key.
    """
    try:
        module = importlib.import_module(module_path)
    except Exception as exc:
        raise SettingsError(f'{module_path}: cannot import: {type(exc).__name__}: {exc}'
                            ) from None
    _check_section_names(module_path, module)
    buses = _section(module_path, module, 'BUS')
    brokers = _section(module_path, module, 'BROKER')
    agents = _section(module_path, module, 'AGENT')
    if not agents:
        raise SettingsError(f'{module_path}: AGENT has no agents')
    configs = []
    for name, entry in agents.items():
        backend = entry.pop('backend')
        cls = import_backend(backend)
        if not (isinstance(cls, type) and issubclass(cls, MicroAgent)):
            raise SettingsError(f"{module_path}: AGENT[{name!r}]['backend']: {backend!r} is "
                                f'not a MicroAgent subclass')
        for key, section in (('bus', buses), ('broker', brokers)):
            ref = entry.get(key)
            if ref is None:
                continue
            if ref not in section:
                raise SettingsError(f'{module_path}: AGENT[{name!r}][{key!r}]: no '
                                    f'{key.upper()} entry named {ref!r}')
            params = dict(section[ref])
            entry[key] = (params.pop('backend'), params)
        needs = _needs(cls)
        for key in needs:
            if entry.get(key) is None:
                does = 'receives signals' if key == 'bus' else 'consumes queues'
                raise SettingsError(f'{module_path}: AGENT[{name!r}]: missing key {key!r} '
                                    f'({backend} {does})')
        where = f'{module_path}: AGENT[{name!r}]'
        _check_entry_keys(where, cls, entry)
        _check_run_keys(where, entry)
        if entry.get('broker') is not None:
            _check_consumer_options(where, cls, entry['broker'][0])
        configs.append((name, (backend, entry)))
    yield from configs


SECTIONS = ('BUS', 'BROKER', 'AGENT')


def _check_section_names(module_path: str, module: Any) -> None:
    """A dict of the settings module named like a section but misspelt (``AGENTS``)."""
    for name, value in vars(module).items():
        if name.isupper() and name not in SECTIONS and isinstance(value, dict):
            hint = _did_you_mean(name, SECTIONS)
            if hint:
                raise SettingsError(f'{module_path}: {name} is not a settings section{hint}')


# Keys of an AGENT entry that the launcher unfolds rather than pass as they are.
_ENTRY_KEYS = ('backend', 'bus', 'broker')


def _check_entry_keys(where: str, cls: type[MicroAgent], entry: dict[str, Any]) -> None:
    """Each key of an AGENT entry is ``marun``'s own (:data:`RUN_KEYS`) or an argument
    of the agent class's ``__init__`` (any key when it takes ``**kwargs``)."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters):
        return
    known = [*_ENTRY_KEYS, *RUN_KEYS, *(parameter.name for parameter in parameters
                                        if parameter.name != 'self')]
    for key in entry:
        if key not in known:
            raise SettingsError(f'{where}: unknown key {key!r}{_did_you_mean(key, known)}; '
                                f'{cls.__name__} takes {", ".join(known[len(_ENTRY_KEYS):])}')


def _check_consumer_options(where: str, cls: type[MicroAgent], broker_backend: str) -> None:
    """The options of each ``@consumer`` of ``cls``, as the broker class takes them."""
    broker_class = import_backend(broker_backend)
    options_class = getattr(broker_class, 'Options', ConsumerOptions)
    for method, declarations in cls.declarations.items():
        for declaration in declarations:
            if isinstance(declaration, ConsumerArgs):
                try:
                    options_class.checked(declaration.options, f'{cls.__name__}.{method}',
                                          broker_class.__name__)
                except QueueException as exc:
                    raise SettingsError(f'{where}: {exc}') from None


def check_transports(module_path: str) -> None:
    """Construct each BUS and BROKER entry of a settings module that an agent uses, as
    its process will (construction connects to nothing), so that an unknown keyword, a
    DSN of the wrong scheme or a missing client library is a :class:`SettingsError`
    naming the entry before any process starts. Call after :func:`load_configuration`."""
    module = importlib.import_module(module_path)
    agents = _section(module_path, module, 'AGENT')
    for key, kind in (('bus', AbstractSignalBus), ('broker', AbstractQueueBroker)):
        used = {entry.get(key) for entry in agents.values()}
        for name, entry in _section(module_path, module, key.upper()).items():
            if name not in used:
                continue
            params = dict(entry)
            backend = params.pop('backend')
            where = f'{module_path}: {key.upper()}[{name!r}]'
            try:
                transport = import_backend(backend)(**params)
            except Exception as exc:
                raise SettingsError(f'{where}: {exc}') from None
            if not isinstance(transport, kind):
                what = 'signal bus' if key == 'bus' else 'queue broker'
                raise SettingsError(f"{where}['backend']: {backend!r} is not a {what} "
                                    f'({kind.__name__} subclass)')


# Keys of an AGENT entry that ``marun`` reads and the agent class does not get.
RUN_KEYS = ('replicas', 'restart')
RESTART_POLICIES = ('no', 'on-failure', 'always')


def _check_run_keys(where: str, entry: dict[str, Any]) -> None:
    """``replicas`` and ``restart`` of an AGENT entry, or a :class:`SettingsError`."""
    replicas = entry.get('replicas', 1)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise SettingsError(f"{where}['replicas']: must be an int >= 1, not {replicas!r}")
    restart = entry.get('restart', 'no')
    if restart not in RESTART_POLICIES:
        raise SettingsError(f"{where}['restart']: must be 'no', 'on-failure' or 'always', "
                            f'not {restart!r}')
    memory = _memory_dsns(entry)
    if replicas > 1 and memory:
        raise SettingsError(
            f"{where}['replicas']: {replicas} replicas of an agent on a memory:// backend "
            f"({', '.join(memory)}) cannot work: memory reaches its own process only")


def _needs(cls: type[MicroAgent]) -> list[str]:
    kinds = {type(d) for ds in cls.declarations.values() for d in ds}
    return [key for key, kind in (('bus', ReceiverArgs), ('broker', ConsumerArgs))
            if kind in kinds]


def init_agent(backend: str, cfg: dict[str, Any]) -> MicroAgent:
    """Build the bus, the broker and the agent of one configuration (not started)."""
    cfg = {key: value for key, value in cfg.items() if key not in RUN_KEYS}
    bus_cfg: BackendConfig | None = cfg.pop('bus', None)
    broker_cfg: BackendConfig | None = cfg.pop('broker', None)
    bus = import_backend(bus_cfg[0])(**bus_cfg[1]) if bus_cfg else None
    broker = import_backend(broker_cfg[0])(**broker_cfg[1]) if broker_cfg else None
    agent: MicroAgent = import_backend(backend)(bus=bus, broker=broker, **cfg)
    return agent


def _memory_dsns(cfg: dict[str, Any]) -> list[str]:
    shared = []
    for key in ('bus', 'broker'):
        backend_cfg = cfg.get(key)
        if backend_cfg:
            cls = import_backend(backend_cfg[0])
            if issubclass(cls, (MemorySignalBus, MemoryBroker)):
                dsn = backend_cfg[1].get('dsn', 'memory://default')
                shared.append(f'{key}:{dsn}')
    return shared


def group_agents(configs: list[tuple[str, BackendConfig]]) -> list[list[str]]:
    """Agent names by process: agents sharing a ``memory://`` bus or broker run together
    (a memory backend only reaches its own process); every other agent runs alone."""
    groups: list[tuple[set[str], list[str]]] = []
    for name, (_, cfg) in configs:
        keys = set(_memory_dsns(cfg))
        joined = [g for g in groups if g[0] & keys]
        merged: tuple[set[str], list[str]] = (set(keys), [])
        for group in joined:
            merged[0].update(group[0])
            merged[1].extend(group[1])
            groups.remove(group)
        merged[1].append(name)
        groups.append(merged)
    return [names for _, names in groups]


# Loggers of the client libraries (and asyncio) that ``marun`` keeps at WARNING unless
# the settings give them a level: their INFO lines (a dozen per Kafka consumer start, two
# per subscription change) are noise in an agent's log.
QUIET_LOGGERS = ('aiokafka', 'aiormq', 'pamqp', 'redis', 'asyncio')


def _configure_logging() -> None:
    """The logging of ``marun``: INFO to standard output unless the root logger has
    handlers already; the :data:`QUIET_LOGGERS` at WARNING unless configured."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, stream=sys.stdout,
            format='%(asctime)s %(levelname)-7s [pid#%(process)d] %(name)s: %(message)s')
    for name in QUIET_LOGGERS:
        library = logging.getLogger(name)
        if library.level == logging.NOTSET:
            library.setLevel(logging.WARNING)


# =====================================================================================
# Launcher: agent processes, and what they report to the supervisor
# =====================================================================================
#
# Under ``marun`` every agent process runs a ProcessMonitor: it checks the consumers for
# a stall (exit STALLED_EXIT) and, when the supervisor serves ``--http``, writes a report
# of the process to a pipe every REPORT_INTERVAL (a length-prefixed msgpack ProcessReport:
# the state, each connection, each consumer's counters and last fetch, timers, signal
# counts and handler durations). The counters are plain integers that ConsumerPool,
# the timers and the buses keep anyway; the monitor reads them off the hot path.

REPORT_INTERVAL = 0.5  # seconds between two reports of an agent process
COUNT_INTERVAL = 5.0  # seconds between two readings of each consumed queue's counts
COUNT_TIMEOUT = 2.0  # a broker that does not answer a count in time cannot say
STALE_REPORT = 5.0  # a running process silent that long is not ready
STALLED_EXIT = 3  # the exit status of an agent process whose consumer stalled
SETTINGS_EXIT = 2  # of an agent process whose settings or credentials are refused: no restart


class LinkReport(msgspec.Struct, frozen=True):
    """One connection of a bus or broker: ``transport`` is its class and DSN (no
    password), ``name`` the link's (``pubsub``, ``consume orders``)."""
    transport: str
    name: str
    connected: bool
    last_error: str | None
    since: float | None = None  # Unix time it went up or down (Link.since)


class ConsumerReport(msgspec.Struct, frozen=True):
    """One consumer's counters since its process started."""
    queue: str
    handler: str
    handled: int
    retried: int
    dead_lettered: int
    released: int
    in_flight: int
    last_fetch_age: float | None  # seconds since it last took a message; None before
    waiting: int  # messages it could take, as last measured by the stall check
    stalled_for: float | None  # seconds it has been stalled (None: it is not)
    depth: int | None = None  # the queue's counts as last read (None: cannot say)
    delayed: int | None = None
    dead: int | None = None


class TimerReport(msgspec.Struct, frozen=True):
    kind: str  # periodic, cron
    name: str
    last_run: float | None  # Unix time
    last_error: str | None
    singleton: str | None = None  # its key, when it is a singleton
    next_run: float | None = None  # Unix time


class ServerReport(msgspec.Struct, frozen=True):
    name: str
    singleton: str | None  # its key, when it is a singleton
    holds: bool  # a singleton: this agent holds the lease (its server runs); else True


class TimingReport(msgspec.Struct, frozen=True):
    kind: str  # receiver, consumer, periodic, cron, rpc_call
    name: str
    counts: list[int]
    total: float


class AgentReport(msgspec.Struct, frozen=True):
    name: str  # the AGENT entry
    links: list[LinkReport]
    consumers: list[ConsumerReport]
    timers: list[TimerReport]
    timings: list[TimingReport]
    signals_sent: dict[str, int]
    signals_received: dict[str, int]
    servers: list[ServerReport] = msgspec.field(default_factory=list)
    signals_dropped: dict[str, int] = msgspec.field(default_factory=dict)


class ProcessReport(msgspec.Struct, frozen=True):
    state: str  # starting, running, stopping
    agents: list[AgentReport]


_report_encoder = msgspec.msgpack.Encoder()
_report_decoder = msgspec.msgpack.Decoder(ProcessReport)


class ReportPipe:
    """An agent process's end of its report pipe to the supervisor, written through
    asyncio so that reporting never blocks the agents' event loop: a report that finds
    a megabyte still unwritten (a supervisor that does not read) is dropped."""

    LIMIT = 1 << 20

    def __init__(self, transport: asyncio.WriteTransport, closed: asyncio.Future[None]
                 ) -> None:
        self._transport = transport
        self._closed = closed

    @classmethod
    async def open(cls, connection: Any) -> ReportPipe:
        """From the write end of a ``multiprocessing`` pipe (which it closes)."""
        pipe = os.fdopen(os.dup(connection.fileno()), 'wb', buffering=0)
        connection.close()
        loop = asyncio.get_running_loop()
        closed = loop.create_future()

        class Protocol(asyncio.Protocol):
            def connection_lost(self, exc: Exception | None) -> None:
                _resolve(closed)

        transport, _ = await loop.connect_write_pipe(Protocol, pipe)
        return cls(transport, closed)

    def send(self, report: ProcessReport) -> None:
        transport = self._transport
        if transport.is_closing() or transport.get_write_buffer_size() > self.LIMIT:
            return
        body = _report_encoder.encode(report)
        transport.write(len(body).to_bytes(4, 'big') + body)

    async def close(self, timeout: float = 2.0) -> None:
        """Close, once what is buffered is written (within ``timeout``)."""
        self._transport.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._closed), timeout)
        if not self._closed.done():
            self._transport.abort()


def _read_frames(buffer: bytearray) -> bytes | None:
    """Take the complete frames out of ``buffer``; return the body of the last one."""
    last = None
    while len(buffer) >= 4:
        size = int.from_bytes(buffer[:4], 'big')
        if len(buffer) < 4 + size:
            break
        last = bytes(buffer[4:4 + size])
        del buffer[:4 + size]
    return last


class _StallWatch:
    """The stall check of one consumer: since when messages it could take have been
    waiting while it was connected, had an idle worker and took none."""

    __slots__ = ('logged', 'next_check', 'since', 'waiting')

    def __init__(self) -> None:
        self.next_check = 0.0
        self.since: float | None = None
        self.waiting = 0
        self.logged = False


class ProcessMonitor:
    """Watches the agents of one process under ``marun``.

    A consumer is **stalled** when its broker is connected, it has room (a worker idle
    and nothing taken waiting for one), messages it could take wait in the queue
    (:meth:`AbstractQueueBroker.waiting`), and it took none for ``STALL_TIMEOUT``
    seconds (a broker setting): that is logged as an error and reported. Still stalled
    after twice as long, the process stops and exits with :data:`STALLED_EXIT`, for its
    restart policy (or the orchestrator) to replace it. A broker that is not connected
    is never stalled: it reconnects by itself.

    With a :class:`ReportPipe`, it also reports the process to the supervisor every
    :data:`REPORT_INTERVAL` seconds, and at once when its state changes.
    """

    def __init__(self, label: str, stop: asyncio.Future[None], pipe: ReportPipe | None
                 ) -> None:
        self.label = label
        self.stop = stop
        self.pipe = pipe
        self.agents: list[tuple[str, MicroAgent]] = []
        self.state = 'starting'
        self.stalled = False
        self._pools: dict[tuple[str, str], ConsumerPool] = {}  # kept after they close
        self._watches: dict[ConsumerPool, _StallWatch] = {}
        self._counts: dict[ConsumerPool, tuple[int | None, int | None, int | None]] = {}

    def running(self) -> None:
        """Every agent of the process has started."""
        self.state = 'running'
        self.report()

    def stopping(self) -> None:
        self.state = 'stopping'
        self.report()

    async def run(self) -> None:
        """Check for stalls, read the queues' counts and report, until cancelled."""
        tasks = [self._check_forever(), self._report_forever()]
        if self.pipe is not None:
            tasks.append(self._count_forever())
        await asyncio.gather(*tasks)

    async def close(self, task: asyncio.Task[None]) -> None:
        """Stop ``task`` (:meth:`run`), send the last report and close the pipe."""
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self.report()
        if self.pipe is not None:
            await self.pipe.close()

    async def _report_forever(self) -> None:
        while True:
            self.report()
            await asyncio.sleep(REPORT_INTERVAL)

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            if self.state != 'running':
                continue
            try:
                await self._check_stalls()
            except Exception:
                run_log.exception('AgentProc[%s]: the stall check failed', self.label)

    # -- queue counts ---------------------------------------------------------------

    async def _count_forever(self) -> None:
        """Every :data:`COUNT_INTERVAL`, read the depth, delayed and dead-letter counts
        of each consumed queue (off the hot path: one small request each)."""
        while True:
            if self.state != 'running':
                await asyncio.sleep(REPORT_INTERVAL)
                continue
            for _, agent in self.agents:
                for pool in list(agent.broker.pools.values()) if agent.broker else ():
                    self._counts[pool] = await _queue_counts(pool.broker, pool.name)
            await asyncio.sleep(COUNT_INTERVAL)

    # -- stalls ---------------------------------------------------------------------

    async def _check_stalls(self) -> None:
        for _, agent in self.agents:
            broker = agent.broker
            if broker is None:
                continue
            for pool in list(broker.pools.values()):
                await self._check(broker, pool)

    async def _check(self, broker: AbstractQueueBroker, pool: ConsumerPool) -> None:
        timeout = float(broker.STALL_TIMEOUT)
        if timeout <= 0:  # the check is off
            return
        watch = self._watches.setdefault(pool, _StallWatch())
        now = time.monotonic()
        interval = min(max(timeout / 10, REPORT_INTERVAL), 5.0)
        last_fetch = pool.last_fetch or 0.0
        took = last_fetch >= watch.since if watch.since is not None else \
            now - last_fetch < interval
        if pool.closing or not broker.connected or not pool.has_room or took:
            self._clear(pool, watch)
            return
        if now < watch.next_check:
            return
        watch.next_check = now + interval
        try:
            watch.waiting = await asyncio.wait_for(broker.waiting(pool.name),
                                                   max(timeout / 2, 1.0))
        except Exception:  # unreachable, or too slow to say: not a stall of its own
            watch.waiting = 0
        if not watch.waiting or not broker.connected:
            self._clear(pool, watch)
            return
        if watch.since is None:
            watch.since = now
        stalled_for = now - watch.since
        if stalled_for >= timeout and not watch.logged:
            watch.logged = True
            run_log.error('AgentProc[%s]: consumer %s of %s is stalled: connected, with '
                          'room, %d messages waiting and none taken for %.0fs',
                          self.label, pool.consumer.key, pool.name, watch.waiting,
                          stalled_for)
        if stalled_for >= 2 * timeout and not self.stalled:
            run_log.error('AgentProc[%s]: consumer %s of %s still stalled after %.0fs: '
                          'stopping the process (exit %d)', self.label, pool.consumer.key,
                          pool.name, stalled_for, STALLED_EXIT)
            self.stalled = True
            _resolve(self.stop)

    def _clear(self, pool: ConsumerPool, watch: _StallWatch) -> None:
        if watch.logged:
            run_log.info('AgentProc[%s]: consumer %s of %s takes messages again',
                         self.label, pool.consumer.key, pool.name)
        watch.since, watch.waiting, watch.logged = None, 0, False

    def _stalled_for(self, pool: ConsumerPool, now: float) -> float | None:
        watch = self._watches.get(pool)
        if watch is None or watch.since is None:
            return None
        stalled_for = now - watch.since
        return stalled_for if stalled_for >= pool.broker.STALL_TIMEOUT else None

    # -- reports --------------------------------------------------------------------

    def report(self) -> None:
        """Send the process's report now (when there is a pipe)."""
        if self.pipe is None:
            return
        try:
            now = time.monotonic()
            agents = [self._agent_report(name, agent, now) for name, agent in self.agents]
            self.pipe.send(ProcessReport(self.state, agents))
        except Exception:
            run_log.exception('AgentProc[%s]: reporting to the supervisor failed', self.label)

    def _agent_report(self, name: str, agent: MicroAgent, now: float) -> AgentReport:
        links = [LinkReport(f'{type(t).__name__} {redact_dsn(t.dsn)}', link.name,
                            link.connected, link.last_error, link.since)
                 for t in (agent.bus, agent.broker) if t is not None
                 for link in list(t.links.values())]
        if agent.broker is not None:
            for pool in list(agent.broker.pools.values()):
                if pool.consumer.agent is agent:
                    self._pools[(name, pool.name)] = pool
        pools = [pool for (owner, _), pool in self._pools.items() if owner == name]
        timings: dict[tuple[str, str], HandlerTimes] = {}

        def add(kind: str, key: str, timing: HandlerTimes | None) -> None:
            if timing is not None:
                timings.setdefault((kind, key), HandlerTimes()).add(timing.counts,
                                                                    timing.total)

        for pool in pools:
            add('consumer', pool.consumer.key, pool.timing)
        for receiver in agent.receivers:
            add('receiver', receiver.key, receiver.timing)
        timers = [(kind, timer) for kind, group in (('periodic', agent.periodic_tasks),
                                                    ('cron', agent.cron_tasks))
                  for timer in group]
        for kind, timer in timers:
            add(kind, handler_key(type(agent), timer.handler), timer.timing)
        bus = agent.bus
        for signal, timing in (bus.call_timings.items() if bus is not None else ()):
            add('rpc_call', signal, timing)
        return AgentReport(
            name=name, links=links,
            consumers=[self._consumer_report(pool, now) for pool in pools],
            timers=[TimerReport(kind, handler_key(type(agent), timer.handler), timer.last_run,
                                timer.last_error, timer.singleton, timer.next_run)
                    for kind, timer in timers],
            servers=[_server_report(agent, server) for server in agent.hooks['server']],
            timings=[TimingReport(kind, key, list(t.counts), t.total)
                     for (kind, key), t in timings.items()],
            signals_sent=dict(bus.signals_sent) if bus is not None else {},
            signals_received=dict(bus.signals_received) if bus is not None else {},
            signals_dropped=dict(bus.signals_dropped) if bus is not None else {})

    def _consumer_report(self, pool: ConsumerPool, now: float) -> ConsumerReport:
        watch = self._watches.get(pool)
        depth, delayed, dead = self._counts.get(pool, (None, None, None))
        return ConsumerReport(
            queue=pool.name, handler=pool.consumer.key, handled=pool.handled,
            retried=pool.retried, dead_lettered=pool.dead_lettered, released=pool.released,
            in_flight=pool.in_flight,
            last_fetch_age=None if pool.last_fetch is None else now - pool.last_fetch,
            waiting=watch.waiting if watch is not None else 0,
            stalled_for=self._stalled_for(pool, now), depth=depth, delayed=delayed, dead=dead)


async def _queue_counts(broker: AbstractQueueBroker, queue: str
                        ) -> tuple[int | None, int | None, int | None]:
    """(depth, delayed, dead) of ``queue``; None for a count the broker cannot give
    (not implemented, an error, or no answer within :data:`COUNT_TIMEOUT`)."""
    async def count(read: Callable[[str], Awaitable[int]]) -> int | None:
        try:
            return int(await asyncio.wait_for(read(queue), COUNT_TIMEOUT))
        except NotImplementedError:
            return None
        except Exception as exc:
            run_log.debug('Counting %s of %s failed: %s', read.__name__, queue, exc)
            return None

    return (await count(broker.queue_length), await count(broker.delayed_count),
            await count(broker.dead_count))


def _server_report(agent: MicroAgent, server: Callable[..., Any]) -> ServerReport:
    leased = agent.leased_servers.get(server.__name__)
    if leased is None:
        return ServerReport(handler_key(type(agent), server), None, True)
    return ServerReport(handler_key(type(agent), server), leased.key, leased.token is not None)


_EARLY_STOPS: list[int] = []
"""SIGTERM/SIGINT caught by an agent process before :func:`_serve` handles them."""


def _note_early_stop(signum: int, frame: object) -> None:
    _EARLY_STOPS.append(signum)


def run_group(modules: list[str], names: list[str], grace: float, label: str | None = None,
              report: Any = None) -> None:
    """A process of the group: run the named agents of the settings modules until
    SIGTERM/SIGINT or until one of them stops; exit 1 if one failed, 3 if a consumer
    stalled (see :class:`ProcessMonitor`). ``label`` names the process in the log
    (``worker[2]``); ``report`` is the write end of a pipe to the supervisor (a
    ``multiprocessing`` connection), given when ``marun --http`` serves its reports.

    A group stop that arrives while the process still loads its settings is kept, and
    done once the agents started: the process then stops as cleanly as any other."""
    import signal as signals
    for signum in (signals.SIGTERM, signals.SIGINT):
        signals.signal(signum, _note_early_stop)
    _configure_logging()
    if report is not None:
        enable_handler_timing()
    try:
        configs = dict(cfg for module in modules for cfg in load_configuration(module))
    except SettingsError as exc:  # the module changed since the supervisor read it
        run_log.error('AgentProc[%s]: cannot start: %s', label or ', '.join(names), exc)
        sys.exit(SETTINGS_EXIT)
    sys.exit(asyncio.run(_serve([(name, configs[name]) for name in names], grace, label,
                                report)))


async def _serve(configs: list[tuple[str, BackendConfig]], grace: float,
                 label: str | None = None, report: Any = None) -> int:
    import signal as signals

    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    label = label or ', '.join(name for name, _ in configs)
    monitor = ProcessMonitor(label, stop, await ReportPipe.open(report) if report else None)
    monitoring = loop.create_task(monitor.run())

    def request_stop(signum: int) -> None:
        run_log.info('AgentProc[%s]: caught %s, stopping', label, signals.Signals(signum).name)
        _resolve(stop)

    for signum in (signals.SIGTERM, signals.SIGINT):
        loop.add_signal_handler(signum, request_stop, signum)
    for early in _EARLY_STOPS[:1]:
        request_stop(early)
    parent = os.getppid()
    watcher = loop.create_task(_watch_parent(parent, stop))
    agents: list[MicroAgent] = []
    failed = refused = False
    try:
        for name, (backend, cfg) in configs:
            agent = init_agent(backend, cfg)
            agents.append(agent)
            monitor.agents.append((name, agent))
            await agent.start()
            run_log.info('AgentProc[%s]: started on pid#%d', label if len(configs) == 1 else name,
                         os.getpid())
        monitor.running()
        waits = [loop.create_task(agent.wait()) for agent in agents]
        await asyncio.wait([stop, *waits], return_when=asyncio.FIRST_COMPLETED)
    except CredentialsRefused as exc:  # not an outage: trying again would not help
        run_log.error('AgentProc[%s]: cannot start: %s', label, exc)
        run_log.debug('AgentProc[%s]: where it failed', label, exc_info=True)
        failed = refused = True
        waits = []
    except ConnectionError as exc:  # a server is unreachable: the message says which
        run_log.error('AgentProc[%s]: cannot start: %s', label, exc)
        run_log.debug('AgentProc[%s]: where it failed', label, exc_info=True)
        failed = True
        waits = []
    except Exception:
        run_log.exception('AgentProc[%s]: failed to start', label)
        failed = True
        waits = []
    monitor.stopping()
    stopping = asyncio.gather(*(agent.stop(grace) for agent in agents), return_exceptions=True)
    if monitor.stalled:  # a stalled fetch may never end: then the process goes anyway
        done, _ = await asyncio.wait([stopping], timeout=grace + 5)
        if not done:
            run_log.error('AgentProc[%s]: the stalled agent did not stop within %gs; exit '
                          '%d now', label, grace + 5, STALLED_EXIT)
            logging.shutdown()
            os._exit(STALLED_EXIT)
    await stopping
    for task in waits:
        try:
            await task
        except Exception:
            failed = True
    for transport in {id(t): t for a in agents for t in (a.bus, a.broker) if t}.values():
        try:
            await transport.close()
        except Exception:
            run_log.exception('AgentProc[%s]: closing %r failed', label, transport)
    watcher.cancel()
    await monitor.close(monitoring)
    if monitor.stalled:
        run_log.error('AgentProc[%s]: stopped: a consumer stalled (exit %d)', label,
                      STALLED_EXIT)
        return STALLED_EXIT
    run_log.info('AgentProc[%s]: stopped%s', label, ' after a failure' if failed else '')
    if refused:
        return SETTINGS_EXIT
    return 1 if failed else 0


async def _watch_parent(parent: int, stop: asyncio.Future[None]) -> None:
    while os.getppid() == parent:  # noqa: ASYNC110 - nothing to await: a parent's death is polled
        await asyncio.sleep(1)
    run_log.warning('AgentProc: the supervisor (pid#%d) is gone, stopping', parent)
    _resolve(stop)


# =====================================================================================
# Launcher: the supervisor (replicas, restarts, health, status and metrics)
# =====================================================================================
#
# The supervisor (AgentsManager) keeps the last report of each process and what its ended
# processes had counted (so a counter never goes down across a restart), restarts
# processes by their policy, and serves /livez, /readyz, /status and /metrics from a
# thread (``http.server``; ``prometheus_client`` writes the Prometheus text).

MESSAGE_OUTCOMES = ('acked', 'retried', 'dead_lettered', 'released')
RATE_WINDOW = 10.0  # seconds over which /status gives a rate


class _Rates:
    """Per-second rates of growing totals over the last :data:`RATE_WINDOW` seconds,
    from the samples of successive reports."""

    def __init__(self) -> None:
        self._samples: dict[tuple[str, ...], deque[tuple[float, int]]] = {}

    def add(self, key: tuple[str, ...], now: float, total: int) -> None:
        samples = self._samples.setdefault(key, deque())
        samples.append((now, total))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW:
            samples.popleft()

    def rate(self, key: tuple[str, ...], now: float) -> float:
        """The growth per second since the oldest sample of the window (0 without two)."""
        samples = [s for s in self._samples.get(key, ()) if now - s[0] <= RATE_WINDOW]
        if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
            return 0.0
        (start, first), (end, last) = samples[0], samples[-1]
        return round(max(0, last - first) / (end - start), 3)

class _Counts:
    """Counters of agent processes added up: those that the ended processes of one
    replica had counted, or the group's totals for ``/metrics``."""

    def __init__(self) -> None:
        self.messages: dict[tuple[str, str], list[int]] = {}  # (agent, queue): outcomes
        self.timings: dict[tuple[str, str, str], HandlerTimes] = {}  # (agent, kind, name)
        self.sent: dict[tuple[str, str], int] = {}  # (agent, signal)
        self.received: dict[tuple[str, str], int] = {}
        self.dropped: dict[tuple[str, str], int] = {}

    def add_report(self, report: ProcessReport) -> None:
        for agent in report.agents:
            for c in agent.consumers:
                self._add_messages((agent.name, c.queue),
                                   (c.handled, c.retried, c.dead_lettered, c.released))
            for t in agent.timings:
                self._timing((agent.name, t.kind, t.name)).add(t.counts, t.total)
            for table, counts in ((self.sent, agent.signals_sent),
                                  (self.received, agent.signals_received),
                                  (self.dropped, agent.signals_dropped)):
                for signal, count in counts.items():
                    table[(agent.name, signal)] = table.get((agent.name, signal), 0) + count

    def add(self, other: _Counts) -> None:
        for key, values in other.messages.items():
            self._add_messages(key, values)
        for key3, timing in other.timings.items():
            self._timing(key3).add(timing.counts, timing.total)
        for table, counts in ((self.sent, other.sent), (self.received, other.received),
                              (self.dropped, other.dropped)):
            for key, count in counts.items():
                table[key] = table.get(key, 0) + count

    def _add_messages(self, key: tuple[str, str], values: Iterable[int]) -> None:
        totals = self.messages.setdefault(key, [0] * len(MESSAGE_OUTCOMES))
        for index, value in enumerate(values):
            totals[index] += value

    def _timing(self, key: tuple[str, str, str]) -> HandlerTimes:
        timing = self.timings.get(key)
        if timing is None:
            timing = self.timings[key] = HandlerTimes()
        return timing


def _exit_text(code: int | None) -> str:
    """``exit 1``, ``exit 3, a consumer stalled``, ``killed by SIGKILL``."""
    import signal as signals
    if code is None:
        return 'still running'
    if code < 0:
        try:
            return f'killed by {signals.Signals(-code).name}'
        except ValueError:
            return f'killed by signal {-code}'
    return f'exit {code}' + (', a consumer stalled' if code == STALLED_EXIT else '')


class ManagedProcess:
    """One agent process of the group as the supervisor keeps it across restarts: its
    agents, replica number, restart policy and backoff, the last report of its current
    process and what its ended processes had counted.

    ``state``: ``starting`` (spawned; its agents are starting), ``running`` (every
    agent's ``start()`` returned), ``stopping``, ``restarting`` (ended, to be started
    again after ``delay``), ``stopped`` (ended cleanly, or stopped with the group),
    ``failed`` (ended with a failure and not started again).
    """

    def __init__(self, label: str, names: list[str], replica: int, replicas: int,
                 policy: str) -> None:
        self.label = label
        self.names = names
        self.replica = replica
        self.suffix = f'[{replica}]' if replicas > 1 else ''
        self.policy = policy
        self.process: Any = None  # the current (or last) multiprocessing.Process
        self.state = 'starting'
        self.restarts = 0
        self.restart_times: deque[float] = deque()  # monotonic times of recent restarts
        self.delay = 0.0  # before the next restart
        self.started = 0.0
        self.restart_at = 0.0
        self.exitcode: int | None = None
        self.report: ProcessReport | None = None  # the current process's last
        self.reported = 0.0  # monotonic time it came
        self.kept = _Counts()  # what the ended processes had counted
        self.rates = _Rates()  # of handled messages and signals, from the reports
        self._reader: Any = None
        self._buffer = bytearray()

    def __repr__(self) -> str:
        return f'<ManagedProcess {self.label} {self.state}>'

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.exitcode is None

    def attach(self, process: Any, reader: Any) -> None:
        """A new process of this replica was started (``reader``: its report pipe)."""
        self.process, self._reader = process, reader
        self._buffer.clear()
        self.report, self.exitcode, self.state = None, None, 'starting'
        self.started = self.reported = time.monotonic()

    def waitables(self) -> list[Any]:
        """What :func:`multiprocessing.connection.wait` should watch for it."""
        found = [self.process.sentinel] if self.alive else []
        return found + ([self._reader] if self._reader is not None else [])

    def read(self) -> None:
        """Take what the process reported since the last call (never blocks)."""
        if self._reader is None:
            return
        while True:
            try:
                chunk = os.read(self._reader.fileno(), 1 << 16)
            except BlockingIOError:
                break
            except OSError:
                chunk = b''
            if not chunk:
                self._reader.close()
                self._reader = None
                break
            self._buffer += chunk
        body = _read_frames(self._buffer)
        if body is None:
            return
        try:
            report = _report_decoder.decode(body)
        except msgspec.DecodeError as exc:
            run_log.warning('AgentsManager: unreadable report from %s: %s', self.label, exc)
            return
        self.report, self.reported = report, time.monotonic()
        self._sample(report)
        if self.state in ('starting', 'running') and report.state != 'starting':
            self.state = report.state

    def _sample(self, report: ProcessReport) -> None:
        """Feed the rates with the totals of a new report."""
        now, kept = self.reported, self.kept
        for agent in report.agents:
            for c in agent.consumers:
                handled = kept.messages.get((agent.name, c.queue), [0])[0] + c.handled
                self.rates.add(('queue', agent.name, c.queue), now, handled)
            for kind, table, counts in (('sent', kept.sent, agent.signals_sent),
                                        ('received', kept.received, agent.signals_received)):
                for signal, count in counts.items():
                    self.rates.add((kind, agent.name, signal), now,
                                   table.get((agent.name, signal), 0) + count)

    def ended(self) -> int | None:
        """The process ended: read its last report, keep what it counted."""
        self.read()
        if self.report is not None:
            self.kept.add_report(self.report)
        self.report = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self.exitcode = self.process.exitcode
        return self.exitcode

    def totals(self) -> _Counts:
        counts = _Counts()
        counts.add(self.kept)
        if self.report is not None:
            counts.add_report(self.report)
        return counts

    def current(self, name: str) -> AgentReport | None:
        """The last report of agent ``name`` by the current process, while it runs."""
        if self.report is None or not self.alive:
            return None
        return next((agent for agent in self.report.agents if agent.name == name), None)


class FleetView:
    """What ``marun --http`` serves, read from the supervisor's processes under its lock:
    ``/status``, the reasons of ``/readyz`` and the metric families of ``/metrics``."""

    def __init__(self, fleet: list[ManagedProcess], stopping: Callable[[], bool]) -> None:
        self.fleet = fleet
        self.stopping = stopping

    def status(self) -> JSONObject:
        now = time.monotonic()
        agents = [self._agent_status(managed, name, now)
                  for managed in self.fleet for name in managed.names]
        agents.sort(key=lambda agent: (agent['name'], agent['replica']))
        return {'agents': agents}

    def _agent_status(self, managed: ManagedProcess, name: str, now: float) -> JSONObject:
        current = managed.current(name)
        consumers: dict[str, JSONObject] = {}
        rates = managed.rates
        for (agent, queue), values in managed.kept.messages.items():
            if agent == name:
                consumers[queue] = _consumer_status(queue, values, 0, None)
                consumers[queue]['rate'] = rates.rate(('queue', name, queue), now)
        late = now - managed.reported
        for c in current.consumers if current is not None else ():
            kept = consumers.get(c.queue, {})
            consumers[c.queue] = _consumer_status(
                c.queue, [kept.get(key, 0) + value for key, value in zip(
                    ('handled', 'retried', 'dead_lettered', 'released'),
                    (c.handled, c.retried, c.dead_lettered, c.released), strict=True)],
                c.in_flight, None if c.last_fetch_age is None else c.last_fetch_age + late,
                (c.depth, c.delayed, c.dead))
            consumers[c.queue]['rate'] = rates.rate(('queue', name, c.queue), now)
        return {
            'name': name, 'replica': managed.replica,
            'pid': managed.process.pid if managed.alive else None,
            'state': managed.state, 'restarts': managed.restarts,
            'uptime': round(now - managed.started, 1) if managed.alive else None,
            'connected': current is not None and all(link.connected for link in current.links),
            'connections': [_link_status(link)
                            for link in (current.links if current is not None else ())],
            'consumers': [consumers[queue] for queue in sorted(consumers)],
            'signals': _signal_status(managed, name, current, now),
            'timers': [{'name': t.name, 'kind': t.kind, 'last_run': t.last_run,
                        'last_error': redact_dsn(t.last_error) if t.last_error else None,
                        'singleton': t.singleton, 'next_run': t.next_run}
                       for t in (current.timers if current is not None else ())],
            'servers': [{'name': s.name, 'singleton': s.singleton, 'holds': s.holds}
                        for s in (current.servers if current is not None else ())],
            'signals_dropped': _dropped_status(managed.kept, name, current),
        }

    def reasons(self) -> list[str]:
        """Why the group is not ready (empty when it is)."""
        now = time.monotonic()
        reasons = ['the group is stopping'] if self.stopping() else []
        for managed in self.fleet:
            if managed.state != 'running':
                reasons.append(f'{managed.label}: {managed.state}{_state_detail(managed, now)}')
                continue
            if now - managed.reported > STALE_REPORT:
                reasons.append(f'{managed.label}: no report for {now - managed.reported:.0f}s '
                               f'(is its event loop blocked?)')
            for agent in managed.report.agents if managed.report is not None else ():
                who = f'{agent.name}{managed.suffix}'
                for link in agent.links:
                    if not link.connected:
                        why = f' ({link.last_error})' if link.last_error else ''
                        reasons.append(redact_dsn(f'{who}: {link.transport}: connection '
                                              f'{link.name!r} is down{why}'))
                for c in agent.consumers:
                    if c.stalled_for is not None:
                        reasons.append(f'{who}: consumer {c.handler} of queue {c.queue!r} is '
                                       f'stalled: {c.waiting} messages waiting, none taken '
                                       f'for {c.stalled_for:.0f}s')
        return reasons

    def metric_families(self) -> list[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        totals = _Counts()
        in_flight: dict[tuple[str, str], int] = {}
        queue_counts: dict[str, tuple[int | None, int | None]] = {}  # queue: delayed, dead
        restarts: dict[str, int] = {}
        up = GaugeMetricFamily('microagent_up', '1 while the process of this replica runs '
                               '(its agents started), else 0', labels=['agent', 'replica'])
        connected = GaugeMetricFamily(
            'microagent_connected', '1 while every connection of this replica is up',
            labels=['agent', 'replica'])
        for managed in self.fleet:
            totals.add(managed.totals())
            for name in managed.names:
                current = managed.current(name)
                restarts[name] = restarts.get(name, 0) + managed.restarts
                labels = [name, str(managed.replica)]
                up.add_metric(labels, 1 if managed.state == 'running' else 0)
                connected.add_metric(labels, 1 if current is not None and all(
                    link.connected for link in current.links) else 0)
                for c in current.consumers if current is not None else ():
                    key = (name, c.queue)
                    in_flight[key] = in_flight.get(key, 0) + c.in_flight
                    if c.delayed is not None or c.dead is not None:
                        queue_counts[c.queue] = (c.delayed, c.dead)
        messages = CounterMetricFamily(
            'microagent_messages', 'Queue messages by outcome: acked (handled), retried (a '
            'failed attempt, tried again), dead_lettered, released (given back at a stop)',
            labels=['agent', 'queue', 'outcome'])
        gauge = GaugeMetricFamily('microagent_in_flight', 'Consumer handlers running now',
                                  labels=['agent', 'queue'])
        for (name, queue), values in sorted(totals.messages.items()):
            for outcome, value in zip(MESSAGE_OUTCOMES, values, strict=True):
                messages.add_metric([name, queue, outcome], value)
            gauge.add_metric([name, queue], in_flight.get((name, queue), 0))
        handler = HistogramMetricFamily(
            'microagent_handler_seconds', 'Duration of handler calls (kind: receiver, '
            'consumer, periodic, cron, rpc_call)', labels=['agent', 'kind', 'name'])
        for handler_labels, timing in sorted(totals.timings.items()):
            buckets, seen = [], 0
            for bound, count in zip((*HANDLER_BUCKETS, float('inf')), timing.counts,
                                    strict=True):
                seen += count
                buckets.append(('+Inf' if bound == float('inf') else repr(bound), seen))
            handler.add_metric(list(handler_labels), buckets, timing.total)
        families = [messages, handler]
        for metric, text, table in (
                ('microagent_signals_sent', 'Signals published (sends and RPC requests)',
                 totals.sent),
                ('microagent_signals_received', 'Signals received (with receivers here)',
                 totals.received),
                ('microagent_signals_dropped', 'Signals (and RPC requests) a full receiver '
                 'dropped (RECEIVER_BACKLOG)', totals.dropped)):
            family = CounterMetricFamily(metric, text, labels=['agent', 'signal'])
            for (name, signal), count in sorted(table.items()):
                family.add_metric([name, signal], count)
            families.append(family)
        restarted = CounterMetricFamily('microagent_restarts', 'Processes of the agent '
                                        'started again by the restart policy', labels=['agent'])
        for name, count in sorted(restarts.items()):
            restarted.add_metric([name], count)
        return [*families, gauge, restarted, up, connected, *_queue_gauges(queue_counts)]


def _queue_gauges(counts: dict[str, tuple[int | None, int | None]]) -> list[Any]:
    """The gauges of the queues' delayed messages and dead letters, as last read by an
    agent process (a queue whose broker cannot say has no sample)."""
    from prometheus_client.core import GaugeMetricFamily
    delayed = GaugeMetricFamily('microagent_delayed_messages', 'Messages sent to the '
                                'queue with a delay that are not due yet', labels=['queue'])
    dead = GaugeMetricFamily('microagent_dead_letters', 'Dead letters of the queue',
                             labels=['queue'])
    for queue, (delayed_count, dead_count) in sorted(counts.items()):
        if delayed_count is not None:
            delayed.add_metric([queue], delayed_count)
        if dead_count is not None:
            dead.add_metric([queue], dead_count)
    return [delayed, dead]


def _consumer_status(queue: str, counts: list[int], in_flight: int,
                     last_fetch_age: float | None,
                     queue_counts: tuple[int | None, int | None, int | None] = (None,) * 3
                     ) -> JSONObject:
    handled, retried, dead_lettered, _ = counts
    depth, delayed, dead = queue_counts
    return {'queue': queue, 'handled': handled, 'retried': retried,
            'dead_lettered': dead_lettered, 'in_flight': in_flight,
            'last_fetch_age': None if last_fetch_age is None else round(last_fetch_age, 3),
            'depth': depth, 'delayed': delayed, 'dead': dead}


def _link_status(link: LinkReport) -> JSONObject:
    """A connection of ``/status``: up or down since when (Unix time), its last error."""
    return {'transport': redact_dsn(link.transport), 'name': link.name,
            'connected': link.connected, 'since': link.since,
            'last_error': redact_dsn(link.last_error) if link.last_error else None}


def _signal_status(managed: ManagedProcess, name: str, current: AgentReport | None,
                   now: float) -> list[JSONObject]:
    """The signals an agent sent or received: totals over the restarts of the replica
    and per-second rates."""
    kept = managed.kept
    sent = {signal: count for (agent, signal), count in kept.sent.items() if agent == name}
    received = {signal: count for (agent, signal), count in kept.received.items()
                if agent == name}
    for table, counts in ((sent, current.signals_sent if current else {}),
                          (received, current.signals_received if current else {})):
        for signal, count in counts.items():
            table[signal] = table.get(signal, 0) + count
    return [{'signal': signal, 'sent': sent.get(signal, 0), 'received': received.get(signal, 0),
             'sent_rate': managed.rates.rate(('sent', name, signal), now),
             'received_rate': managed.rates.rate(('received', name, signal), now)}
            for signal in sorted({*sent, *received})]


def _dropped_status(kept: _Counts, name: str, current: AgentReport | None) -> dict[str, int]:
    """Signal -> how many a full receiver of agent ``name`` dropped, over its processes."""
    dropped = {signal: count for (agent, signal), count in kept.dropped.items()
               if agent == name}
    for signal, count in (current.signals_dropped if current is not None else {}).items():
        dropped[signal] = dropped.get(signal, 0) + count
    return dict(sorted(dropped.items()))


def _state_detail(managed: ManagedProcess, now: float) -> str:
    if managed.state == 'restarting':
        # rounded up, as the log's "restarting it in 1s" is said with 1s left
        return (f' ({_exit_text(managed.exitcode)}; starting again in '
                f'{math.ceil(max(0.0, managed.restart_at - now)):d}s)')
    if managed.state in ('stopped', 'failed'):
        return f' ({_exit_text(managed.exitcode)})'
    return ''


def _http_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9000`` for IPv6) of ``marun --http``."""
    import argparse
    host, _, port = text.rpartition(':')
    host = host.strip('[]') if host.startswith('[') else host
    if not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f'{text!r} is not HOST:PORT (e.g. 127.0.0.1:9000)')
    return host, int(port)


class _Page:
    """An HTML page served at ``GET /``, made by ``make`` the first time it is asked
    for (so that it costs nothing until then) and kept."""

    def __init__(self, make: Callable[[], bytes]) -> None:
        import threading
        self._make = make
        self._body: bytes | None = None
        self._lock = threading.Lock()

    def body(self) -> bytes:
        with self._lock:
            if self._body is None:
                self._body = self._make()
                run_log.info('AgentsManager: made the page of / (%d bytes)', len(self._body))
            return self._body


def _http_server(view: FleetView, lock: Any, host: str, port: int,
                 page: Callable[[], bytes] | None = None) -> Any:
    """Serve ``view`` on ``host:port`` from a thread of its own; the server object (its
    ``shutdown()`` stops it); ``page`` makes the HTML of ``GET /`` (called once, at
    the first request). Raises OSError when the address cannot be bound, and
    ImportError without prometheus_client."""
    import http.server
    import socket
    import socketserver
    import threading

    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.registry import Collector

    class FleetCollector(Collector):
        def collect(self) -> Iterable[Any]:
            with lock:
                return view.metric_families()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector())
    text, json_type = 'text/plain; charset=utf-8', 'application/json'
    served = _Page(page) if page is not None else None
    not_found = (f'not found: {"/, " if served else ""}/livez, /readyz, /status, '
                 '/metrics\n').encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = f'marun/{__version__}'

        def do_GET(self) -> None:
            path = self.path.partition('?')[0]
            if path == '/' and served is not None:
                try:
                    html = served.body()
                except Exception:
                    run_log.exception('AgentsManager: making the page of / failed')
                    self._reply(500, b'the page could not be made: see the log\n', text)
                    return
                self._reply(200, html, 'text/html; charset=utf-8')
            elif path == '/livez':
                self._reply(200, b'ok\n', text)
            elif path == '/readyz':
                with lock:
                    reasons = view.reasons()
                body = {'ready': False, 'reasons': reasons} if reasons else {'ready': True}
                self._reply(503 if reasons else 200, msgspec.json.encode(body), json_type)
            elif path == '/status':
                with lock:
                    status = view.status()
                self._reply(200, msgspec.json.encode(status), json_type)
            elif path == '/metrics':
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            else:
                self._reply(404, not_found, text)

        def _reply(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header('Content-Type', content_type)
            self.send_header('Content-Length', str(len(body)))
            self.send_header('Cache-Control', 'no-store')
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            run_log.debug('http: ' + format, *args)

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ':' in host else socket.AF_INET

        def server_bind(self) -> None:  # without HTTPServer's reverse DNS lookup
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = host, self.server_address[1]

    server = Server((host, port), Handler)
    threading.Thread(target=server.serve_forever, name='marun-http', daemon=True).start()
    return server


class AgentsManager:
    """The ``marun`` supervisor: starts the agents of the settings modules, each in its
    own process (agents sharing a memory backend in one; ``replicas: N`` processes of an
    agent), keeps the group together and restarts processes by their policy.

    ``restart`` is the policy of the AGENT entries without a ``restart`` key: ``'no'``
    (1.x: one process ending stops the group), ``'on-failure'`` (a process that failed
    or was killed is started again; one that exits 0 stays stopped) or ``'always'``.
    A restart waits :attr:`RESTART_DELAY` seconds, doubled after each restart up to
    :attr:`RESTART_DELAY_MAX`, back to the first once a process ran
    :attr:`RESTART_RESET` seconds; a process that would be restarted more than
    :attr:`RESTART_LIMIT` times within :attr:`RESTART_WINDOW` seconds is given up: the
    group stops and :meth:`start` returns 1.

    SIGTERM/SIGINT stop every agent gracefully and restart nothing (in-flight work
    finishes within ``grace`` seconds, then a process is killed). :meth:`start` returns
    the exit status: 0, or 1 if an agent failed. After :meth:`listen`, the supervisor
    serves ``/livez``, ``/readyz``, ``/status`` and ``/metrics`` over HTTP.
    """

    RESTART_DELAY: ClassVar[float] = 1.0
    RESTART_DELAY_MAX: ClassVar[float] = 30.0
    RESTART_RESET: ClassVar[float] = 60.0
    RESTART_LIMIT: ClassVar[int] = 5
    RESTART_WINDOW: ClassVar[float] = 60.0

    def __init__(self, cfg: list[tuple[str, BackendConfig]], grace: float = DEFAULT_GRACE,
                 modules: list[str] | None = None, restart: str = 'no') -> None:
        import threading

        if restart not in RESTART_POLICIES:
            raise ValueError(f"restart must be 'no', 'on-failure' or 'always', not {restart!r}")
        self.cfg = cfg
        self.grace = grace
        self.modules = modules or []
        self.restart = restart
        self.fleet = self._plan()
        self.processes: dict[str, Any] = {}  # label -> its current multiprocessing.Process
        self.view = FleetView(self.fleet, lambda: self._stop_requested)
        self._lock = threading.RLock()
        self._http: Any = None
        self._stop_requested = False
        self._gave_up = False
        self._unusable = False  # a process ended with SETTINGS_EXIT
        self._context: Any = None

    def _plan(self) -> list[ManagedProcess]:
        """The processes of the group: one per agent (``replicas`` of it), agents on a
        shared memory backend together (they must agree on their restart policy)."""
        entries = dict(self.cfg)
        fleet = []
        for names in group_agents(self.cfg):
            policies = {name: entries[name][1].get('restart', self.restart) for name in names}
            if len(set(policies.values())) > 1:
                given = ', '.join(f'{name}: {policy!r}' for name, policy in policies.items())
                raise SettingsError(f'agents sharing a memory:// process need one restart '
                                    f'policy, not {given}')
            policy = policies[names[0]]
            replicas = entries[names[0]][1].get('replicas', 1) if len(names) == 1 else 1
            for replica in range(1, replicas + 1):
                label = f'{names[0]}[{replica}]' if replicas > 1 else ', '.join(names)
                fleet.append(ManagedProcess(label, names, replica, replicas, policy))
        return fleet

    def listen(self, host: str, port: int, page: Callable[[], bytes] | None = None) -> None:
        """Serve ``/livez``, ``/readyz``, ``/status`` and ``/metrics`` on ``host:port``
        from now on (agent processes started afterwards report to the supervisor), and
        ``GET /`` with the HTML that ``page`` makes (called once, when first asked for).
        Raises OSError when the address is in use, ImportError without prometheus_client.
        """
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise ImportError('needs prometheus_client: pip install prometheus_client, or '
                              "the checkout's extra: pip install '.[metrics]'") from None
        self._http = _http_server(self.view, self._lock, host, port, page)
        bound = self._http.server_address
        run_log.info('AgentsManager: serving /livez /readyz /status /metrics on http://%s:%s',
                     f'[{bound[0]}]' if ':' in bound[0] else bound[0], bound[1])

    def _request_stop(self, signum: int, frame: Any) -> None:
        import signal as signals
        run_log.info('AgentsManager: caught %s, stopping the group',
                     signals.Signals(signum).name)
        self._stop_requested = True

    def start(self) -> int:
        import multiprocessing
        import signal as signals

        self._context = multiprocessing.get_context('spawn')
        for signum in (signals.SIGTERM, signals.SIGINT):
            signals.signal(signum, self._request_stop)
        for managed in self.fleet:
            if len(managed.names) > 1:
                run_log.info('AgentsManager: %s share a memory:// bus or broker and run in '
                             'one process', managed.label)
            managed.delay = self.RESTART_DELAY
            self._spawn(managed)
        self._supervise()
        return self.close()

    def _spawn(self, managed: ManagedProcess) -> None:
        reader = writer = None
        if self._http is not None:
            reader, writer = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=run_group, name=managed.label, daemon=False,
            args=(self.modules, managed.names, self.grace, managed.label, writer))
        process.start()
        if reader is not None and writer is not None:
            writer.close()
            os.set_blocking(reader.fileno(), False)
        with self._lock:
            managed.attach(process, reader)
        self.processes[managed.label] = process
        run_log.info('AgentsManager: %s %s on pid#%s',
                     'restarted' if managed.restarts else 'started', managed.label, process.pid)

    def _supervise(self) -> None:
        """Watch the processes until the group stops: a stop was requested, a process
        ended under policy ``no``, one was given up, or none is left."""
        import multiprocessing.connection

        while not self._stop_requested:
            waitables = [w for managed in self.fleet for w in managed.waitables()]
            multiprocessing.connection.wait(waitables, timeout=self._timeout())
            with self._lock:
                for managed in self.fleet:
                    managed.read()
                for managed in self.fleet:
                    if managed.process is not None and managed.exitcode is None \
                            and not managed.alive and self._ended(managed):
                        return
                if all(managed.state in ('stopped', 'failed') for managed in self.fleet):
                    run_log.info('AgentsManager: no process left to run')
                    return
            for managed in self.fleet:
                if managed.state == 'restarting' and time.monotonic() >= managed.restart_at \
                        and not self._stop_requested:
                    managed.restarts += 1
                    managed.restart_times.append(time.monotonic())
                    self._spawn(managed)

    def _timeout(self) -> float:
        due = [m.restart_at - time.monotonic() for m in self.fleet if m.state == 'restarting']
        return max(0.0, min([0.2, *due]))

    def _ended(self, managed: ManagedProcess) -> bool:
        """A process ended by itself: apply its policy; True when the group must stop."""
        code = managed.ended()
        how = _exit_text(code)
        if code == SETTINGS_EXIT:
            managed.state = 'failed'
            self._unusable = True
            run_log.error('AgentsManager: %s cannot run (exit %d: its settings or credentials '
                          'are refused, see above); no restart, stopping the group',
                          managed.label, code)
            return True
        if managed.policy == 'no':
            managed.state = 'stopped' if code == 0 else 'failed'
            run_log.info('AgentsManager: %s ended (exit %s), stopping the group',
                         managed.label, code)
            return True
        if code == 0 and managed.policy == 'on-failure':
            managed.state = 'stopped'
            run_log.info('AgentsManager: %s ended (exit 0); restart: on-failure leaves it '
                         'stopped', managed.label)
            return False
        now = time.monotonic()
        if now - managed.started >= self.RESTART_RESET:
            managed.delay = self.RESTART_DELAY
        while managed.restart_times and now - managed.restart_times[0] > self.RESTART_WINDOW:
            managed.restart_times.popleft()
        if len(managed.restart_times) >= self.RESTART_LIMIT:
            managed.state = 'failed'
            self._gave_up = True
            run_log.error('AgentsManager: giving up on %s: it ended again (%s) after %d '
                          'restarts within %gs (restart: %s); stopping the group',
                          managed.label, how, len(managed.restart_times), self.RESTART_WINDOW,
                          managed.policy)
            return True
        managed.state, managed.restart_at = 'restarting', now + managed.delay
        run_log.warning('AgentsManager: %s ended (%s); restarting it in %gs (restart: %s)',
                        managed.label, how, managed.delay, managed.policy)
        managed.delay = min(managed.delay * 2, self.RESTART_DELAY_MAX)
        return False

    def close(self) -> int:
        """Stop every process (SIGTERM, then SIGKILL after the grace period); the exit
        status: 1 when a process failed or was given up, else 0."""
        import multiprocessing.connection
        import signal as signals

        with self._lock:
            for managed in self.fleet:
                if managed.alive:
                    managed.state = 'stopping'
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(managed.process.pid, signals.SIGTERM)
        deadline = time.monotonic() + self.grace + 5
        while any(m.alive for m in self.fleet) and time.monotonic() < deadline:
            waitables = [w for managed in self.fleet for w in managed.waitables()]
            multiprocessing.connection.wait(
                waitables, timeout=min(0.2, max(0.0, deadline - time.monotonic())))
            with self._lock:
                for managed in self.fleet:
                    managed.read()
        for managed in self.fleet:
            if managed.alive:
                run_log.error('AgentsManager: %s did not stop in time, killing it',
                              managed.label)
                managed.process.kill()
                managed.process.join()
        clean = (0, -signals.SIGTERM, -signals.SIGINT) if self._stop_requested else (0,)
        failed = []
        with self._lock:
            for managed in self.fleet:
                if managed.process is not None and managed.exitcode is None:
                    managed.ended()
                if managed.exitcode not in clean and managed.process is not None:
                    failed.append(managed)
                    managed.state = 'failed'
                elif managed.state != 'failed':
                    managed.state = 'stopped'
        for managed in failed:
            run_log.error('AgentsManager: %s failed (%s)', managed.label,
                          _exit_text(managed.exitcode))
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        run_log.info('AgentsManager: stopped')
        if self._unusable:
            return SETTINGS_EXIT
        return 1 if failed or self._gave_up else 0


# =====================================================================================
# Graph: the topology of agents, signals and queues
# =====================================================================================

graph_log = logging.getLogger('microagent.graph')

SENT_KINDS = ('sends', 'calls', 'produces')
EDGE_KINDS = ('receives', 'consumes', 'sends', 'calls', 'produces')
GRAPH_FORMATS = ('dot', 'mermaid', 'json', 'asyncapi', 'svg', 'png')
RENDERED_FORMATS = ('svg', 'png')
BINARY_FORMATS = ('png',)

# What a call on ``self.bus.X`` / ``self.broker.X`` means for the graph.
_BUS_CALLS = {'send': 'sends', 'call': 'calls', 'waiter': 'calls'}
_BROKER_CALLS = {'send': 'produces', 'send_many': 'produces'}
_TRANSPORT_CALLS = {'bus': _BUS_CALLS, 'broker': _BROKER_CALLS}


class GraphRenderError(RuntimeError):
    """The graph could not be rendered to SVG or PNG (Graphviz's ``dot`` is missing or
    failed)."""


# -- static analysis of an agent class's source ---------------------------------------

# A reference found in the source: ('bus', None) is the bus itself, ('bus', 'x') is the
# bound signal ``bus.x``; the same for 'broker'.
_Reference = tuple[str, str | None]


class _ClassScan(msgspec.Struct, frozen=True):
    """What the source of one class sends, calls and produces (None: no source)."""
    found: frozenset[tuple[str, str]] | None


_scans: weakref.WeakKeyDictionary[type, _ClassScan] = weakref.WeakKeyDictionary()


def _reference(node: ast.expr, self_name: str, aliases: Mapping[str, _Reference]
               ) -> _Reference | None:
    """``self.bus`` / ``self.broker`` / ``<that>.X`` / ``getattr(<that>, 'X')`` / an alias."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.NamedExpr):
        return _reference(node.value, self_name, aliases)
    if isinstance(node, ast.Attribute):
        if (isinstance(node.value, ast.Name) and node.value.id == self_name
                and node.attr in _TRANSPORT_CALLS):
            return node.attr, None
        return _bound(_reference(node.value, self_name, aliases), node.attr)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == 'getattr' and len(node.args) == 2 and not node.keywords
            and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
        return _bound(_reference(node.args[0], self_name, aliases), node.args[1].value)
    return None


def _bound(transport: _Reference | None, name: str) -> _Reference | None:
    """``transport.name`` when ``transport`` is the bus or the broker itself."""
    if transport is None or transport[1] is not None:
        return None
    return transport[0], name


def _assignments(node: ast.AST) -> Iterator[tuple[str, ast.expr]]:
    """(name, value) of the simple assignments in ``node``: ``a = x``, ``a, b = x, y``,
    ``a: T = x``, ``(a := x)``."""
    if isinstance(node, ast.Assign):
        for target in node.targets:
            if isinstance(target, ast.Name):
                yield target.id, node.value
            elif (isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple)
                  and len(target.elts) == len(node.value.elts)):
                for element, value in zip(target.elts, node.value.elts, strict=True):
                    if isinstance(element, ast.Name):
                        yield element.id, value
    elif (isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and isinstance(node.target, ast.Name)
          and node.value is not None):
        yield node.target.id, node.value


def _scan_function(function: ast.FunctionDef | ast.AsyncFunctionDef
                   ) -> Iterator[tuple[str, str]]:
    """(kind, name) for each ``self.bus.X.send(...)`` and the like in one method
    (nested functions included), following local aliases of the bus, the broker and
    their bound signals and queues."""
    arguments = [*function.args.posonlyargs, *function.args.args]
    if not arguments:
        return
    self_name = arguments[0].arg
    nodes = list(ast.walk(function))
    assignments = [pair for node in nodes for pair in _assignments(node)]
    aliases: dict[str, _Reference] = {}
    for _ in assignments:  # until stable: an alias of an alias may come first in the walk
        known = dict(aliases)
        for name, value in assignments:
            reference = _reference(value, self_name, aliases)
            if reference is not None:
                aliases[name] = reference
        if aliases == known:
            break
    for node in nodes:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            reference = _reference(node.func.value, self_name, aliases)
            if reference is not None and reference[1] is not None:
                kind = _TRANSPORT_CALLS[reference[0]].get(node.func.attr)
                if kind is not None:
                    yield kind, reference[1]


def _parse_class(klass: type) -> ast.ClassDef:
    """The syntax tree of ``klass``; raise OSError, TypeError or SyntaxError."""
    source = inspect.getsource(klass)
    if source[:1].isspace():  # a class nested in a function or a class
        source = 'if True:\n' + source
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            return node
    raise OSError(f'no class definition in the source of {klass!r}')


def _scan_class(klass: type) -> _ClassScan:
    """What the methods of ``klass`` itself send, call and produce (cached per class)."""
    scan = _scans.get(klass)
    if scan is not None:
        return scan
    try:
        tree = _parse_class(klass)
    except (OSError, TypeError, SyntaxError) as exc:
        if klass.__module__.partition('.')[0] in sys.stdlib_module_names:
            scan = _ClassScan(frozenset())  # a base from the standard library sends nothing
        else:
            graph_log.warning(
                'The source of %s is not available (%s): the signals and queues it sends, '
                'calls and produces are not in the graph; declare them in its `topology` '
                'attribute', _class_path(klass), exc)
            scan = _ClassScan(None)
    else:
        functions = [node for node in tree.body
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        scan = _ClassScan(frozenset(pair for function in functions
                                    for pair in _scan_function(function)))
    _scans[klass] = scan
    return scan


def _analysed_classes(cls: type) -> list[type]:
    """The classes of ``cls``'s MRO whose methods may send: all but MicroAgent, its
    bases and the built-in types."""
    skipped = set(MicroAgent.__mro__)
    return [klass for klass in cls.__mro__
            if klass not in skipped and klass.__module__ != 'builtins']


def _declared_names(klass: type) -> Iterator[tuple[str, str]]:
    """(kind, name) of the ``topology`` class attribute defined on ``klass`` itself."""
    declared = vars(klass).get('topology')
    if not declared:
        return
    where = f'{_class_path(klass)}.topology'
    if not isinstance(declared, Mapping):
        raise TypeError(f'{where} must be a dict of {", ".join(SENT_KINDS)} -> names, '
                        f'not {declared!r}')
    for kind, names in declared.items():
        if kind not in SENT_KINDS:
            raise TypeError(f'{where}: unknown key {kind!r}; use {", ".join(SENT_KINDS)}')
        if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
            raise TypeError(f'{where}[{kind!r}] must be a list of names, not {names!r}')
        for item in names:
            name = item.name if isinstance(item, (Signal, Queue)) else item
            if not isinstance(name, str) or not name:
                raise TypeError(f'{where}[{kind!r}]: {item!r} is not a name')
            yield kind, name


def _unreadable_classes(cls: type) -> list[str]:
    """The classes of ``cls`` whose source could not be analysed."""
    return [_class_path(klass) for klass in _analysed_classes(cls)
            if _scan_class(klass).found is None]


def sent_by(cls: type) -> dict[str, list[str]]:
    """What an agent class sends, calls and produces: ``{'sends': [...], 'calls':
    [...], 'produces': [...]}``, sorted lists of signal and queue names.

    Found by reading the source of every method of the class and of its bases
    (``self.bus.X.send(...)``, ``self.bus.X.call(...)``, ``self.bus.X.waiter(...)``,
    ``self.broker.X.send(...)``, also through a local alias such as ``bus = self.bus``
    or ``getattr(self.broker, 'orders.v2')``), plus the names the classes declare in
    their ``topology`` attribute. A class whose source is not available is logged as a
    warning and contributes only its ``topology``.
    """
    found: dict[str, set[str]] = {kind: set() for kind in SENT_KINDS}
    for klass in _analysed_classes(cls):
        for kind, name in (*(_scan_class(klass).found or ()), *_declared_names(klass)):
            found[kind].add(name)
    return {kind: sorted(names) for kind, names in found.items()}


INFO_SOURCES.append(sent_by)  # agent.info() reports what the agent sends


# -- the graph ----------------------------------------------------------------------

def _class_path(cls: type) -> str:
    return f'{cls.__module__}.{cls.__qualname__}'


def _seconds_text(seconds: float) -> str:
    return f'{seconds:g} s'


# DSN schemes whose AsyncAPI protocol has another name.
_SERVER_PROTOCOLS = {'rediss': 'redis'}


class Transport(msgspec.Struct, frozen=True, order=True):
    """A BUS or BROKER entry of a settings module, as the AsyncAPI document shows it.

    Only the host, port and path of its DSN are kept (never a user or a password).
    ``protocol`` is empty for an in-process backend (``memory://``), which is no server.
    ``prefix`` is a bus's channel prefix (empty for a broker).
    """
    role: str
    key: str
    backend: str
    protocol: str
    host: str
    pathname: str = ''
    prefix: str = ''

    @classmethod
    def of(cls, role: str, key: str, backend: str, params: Mapping[str, Any]) -> Transport:
        """The ``role`` (``bus`` or ``broker``) entry ``key`` of a settings module, made
        by class ``backend`` from keyword arguments ``params``."""
        import urllib.parse
        backend_class = import_backend(backend)
        dsn = urllib.parse.urlsplit(str(params.get('dsn', '')))
        in_process = dsn.scheme == 'memory' or (
            isinstance(backend_class, type)
            and issubclass(backend_class, (MemorySignalBus, MemoryBroker)))
        prefix = ''
        if role == 'bus':
            prefix = str(params.get('prefix') or _default_prefix(backend_class))
        return cls(role=role, key=key, backend=resolve_backend(backend),
                   protocol='' if in_process else _SERVER_PROTOCOLS.get(dsn.scheme, dsn.scheme),
                   host=dsn.netloc.rpartition('@')[2],
                   pathname=dsn.path if dsn.path != '/' else '', prefix=prefix)

    @property
    def is_server(self) -> bool:
        """Whether it is a server other processes reach (not an in-process backend)."""
        return bool(self.protocol and self.host)


def _default_prefix(bus_class: Any = None) -> str:
    """The channel prefix a bus class uses when its settings give none."""
    try:
        parameter = inspect.signature(bus_class or AbstractSignalBus).parameters['prefix']
    except (TypeError, ValueError, KeyError):
        parameter = inspect.signature(AbstractSignalBus).parameters['prefix']
    return str(parameter.default)


def _singleton_text(declaration: PeriodicArgs | CronArgs | HookArgs, alone: bool = False
                    ) -> str:
    """How a schedule line of the graph marks a singleton handler (and its own key)."""
    if declaration.singleton is False:
        return ''
    key = '' if declaration.singleton is True else f' {declaration.singleton}'
    return f' (singleton{key})' if alone else f', singleton{key}'


class AgentNode(msgspec.Struct, frozen=True):
    """One agent of a :class:`Topology`: its name, its class and what it touches.

    ``receives``, ``consumes``, ``periodic``, ``cron`` and ``servers`` come from the
    class's declarations (``MicroAgent.declarations``, the structure that binds the
    handlers at run time); ``sends``, ``calls`` and ``produces`` from :func:`sent_by`.
    ``schedule`` holds the lines the diagrams show on the node (periodic, cron and
    server handlers); ``singletons`` the methods among them that run on one agent at a
    time (``singleton=True``); ``unreadable`` the classes whose source could not be
    analysed.
    For the AsyncAPI document: ``bus`` and ``broker`` (from the settings module, None
    for a class), ``answers`` the ``(signal, "Class.method")`` keys of its RPC answers
    and ``dtos`` the ``(queue, DTO class)`` of its consumers that have one.
    """
    name: str
    class_path: str
    receives: tuple[str, ...] = ()
    consumes: tuple[str, ...] = ()
    sends: tuple[str, ...] = ()
    calls: tuple[str, ...] = ()
    produces: tuple[str, ...] = ()
    periodic: tuple[str, ...] = ()
    cron: tuple[str, ...] = ()
    servers: tuple[str, ...] = ()
    schedule: tuple[str, ...] = ()
    unreadable: tuple[str, ...] = ()
    singletons: tuple[str, ...] = ()
    bus: Transport | None = None
    broker: Transport | None = None
    answers: tuple[tuple[str, str], ...] = ()
    dtos: tuple[tuple[str, type], ...] = ()

    @classmethod
    def of(cls, name: str, agent_class: type[MicroAgent]) -> AgentNode:
        """The node of ``agent_class`` named ``name``."""
        receives: set[str] = set()
        consumes: set[str] = set()
        timers: dict[str, dict[str, str]] = {'periodic': {}, 'cron': {}, 'servers': {}}
        singletons: set[str] = set()
        for method, declarations in agent_class.declarations.items():
            for declaration in declarations:
                if isinstance(declaration, ReceiverArgs):
                    receives.update(signal.name for signal in declaration.signals)
                elif isinstance(declaration, ConsumerArgs):
                    consumes.add(declaration.queue.name)
                elif isinstance(declaration, PeriodicArgs):
                    timers['periodic'][method] = (
                        f'periodic {method} (every {_seconds_text(declaration.period)}'
                        f'{_singleton_text(declaration)})')
                elif isinstance(declaration, CronArgs):
                    tz = f' {declaration.tz}' if declaration.tz else ''
                    timers['cron'][method] = (
                        f'cron {method} ({declaration.spec}{tz}{_singleton_text(declaration)})')
                elif isinstance(declaration, HookArgs) and declaration.label == 'server':
                    timers['servers'][method] = (
                        f'server {method}{_singleton_text(declaration, alone=True)}')
                else:
                    continue
                if getattr(declaration, 'singleton', False) is not False:
                    singletons.add(method)
        sent = sent_by(agent_class)
        return cls(
            name=name, class_path=_class_path(agent_class),
            receives=tuple(sorted(receives)), consumes=tuple(sorted(consumes)),
            sends=tuple(sent['sends']), calls=tuple(sent['calls']),
            produces=tuple(sent['produces']),
            periodic=tuple(sorted(timers['periodic'])), cron=tuple(sorted(timers['cron'])),
            servers=tuple(sorted(timers['servers'])),
            schedule=tuple(line for group in timers.values()
                           for _, line in sorted(group.items())),
            unreadable=tuple(_unreadable_classes(agent_class)),
            singletons=tuple(sorted(singletons)))

    def as_dict(self) -> dict[str, Any]:
        """The agent in the JSON form of the graph (``singletons`` only when it has)."""
        return {
            'name': self.name, 'class': self.class_path,
            'receives': list(self.receives), 'consumes': list(self.consumes),
            'sends': list(self.sends), 'calls': list(self.calls),
            'produces': list(self.produces), 'periodic': list(self.periodic),
            'cron': list(self.cron), 'servers': list(self.servers),
            **({'singletons': list(self.singletons)} if self.singletons else {}),
        }

    def edges(self) -> Iterator[Edge]:
        """The edges between this agent and its signals and queues."""
        me = f'agent:{self.name}'
        yield from (Edge(f'signal:{name}', me, 'receives') for name in self.receives)
        yield from (Edge(f'queue:{name}', me, 'consumes') for name in self.consumes)
        yield from (Edge(me, f'signal:{name}', 'sends') for name in self.sends)
        yield from (Edge(me, f'signal:{name}', 'calls') for name in self.calls)
        yield from (Edge(me, f'queue:{name}', 'produces') for name in self.produces)


class Edge(msgspec.Struct, frozen=True, order=True):
    """``source`` → ``target`` (``agent:NAME``, ``signal:NAME``, ``queue:NAME``), of
    ``kind`` receives, consumes, sends, calls or produces."""
    source: str
    target: str
    kind: str


class Topology(msgspec.Struct, frozen=True):
    """Agents, the signals and queues they touch, and the edges between them.

    Built by :func:`build_graph`; exported by :meth:`to_json`, :meth:`to_dot`,
    :meth:`to_mermaid`, :meth:`to_asyncapi` and :meth:`render`, or by :meth:`export`
    for any of ``GRAPH_FORMATS``. Everything is sorted: the same code gives the same
    bytes.
    """
    agents: tuple[AgentNode, ...]

    @property
    def signals(self) -> tuple[str, ...]:
        """The signals some agent receives, sends or calls, sorted."""
        return tuple(sorted({name for agent in self.agents
                             for name in (*agent.receives, *agent.sends, *agent.calls)}))

    @property
    def queues(self) -> tuple[str, ...]:
        """The queues some agent consumes or produces, sorted."""
        return tuple(sorted({name for agent in self.agents
                             for name in (*agent.consumes, *agent.produces)}))

    @property
    def edges(self) -> tuple[Edge, ...]:
        """Every edge, sorted by source, target and kind."""
        return tuple(sorted({edge for agent in self.agents for edge in agent.edges()}))

    def as_dict(self) -> dict[str, Any]:
        """The JSON form of the graph (its shape: the README, section Topology)."""
        return {
            'agents': [agent.as_dict() for agent in self.agents],
            'signals': list(self.signals),
            'queues': list(self.queues),
            'edges': [{'source': e.source, 'target': e.target, 'kind': e.kind}
                      for e in self.edges],
        }

    def to_json(self) -> str:
        """The graph as indented JSON text ending with a newline."""
        return msgspec.json.format(encode_json(self.as_dict()), indent=2).decode() + '\n'

    def to_dot(self) -> Any:
        """The graph as a ``graphviz.Digraph`` (its ``.source`` is the DOT text)."""
        return _dot_graph(self)

    def to_mermaid(self) -> str:
        """The graph as Mermaid flowchart text."""
        return _mermaid(self)

    def to_asyncapi(self, title: str = 'microagent', version: str = '0.0.0') -> JSONObject:
        """The AsyncAPI 3.0.0 document of the agents, as a dict (see :func:`asyncapi_json`
        for its bytes): the servers of their settings (no passwords), a channel and a
        message per signal and queue with its payload's JSON Schema, an operation per
        edge, RPC calls with their reply. ``title`` and ``version`` go to ``info``."""
        return _AsyncAPI(self).document(title, version)

    def render(self, fmt: str) -> bytes:
        """The graph drawn by Graphviz's ``dot`` program as ``svg`` or ``png``; raise
        :class:`GraphRenderError` when ``dot`` is not installed or fails."""
        if fmt not in RENDERED_FORMATS:
            raise ValueError(f'render() draws {" or ".join(RENDERED_FORMATS)}, not {fmt!r}')
        graphviz = _optional_dependency('graphviz', GRAPHVIZ_NEEDED_FOR)
        try:
            data: bytes = self.to_dot().pipe(format=fmt)
        except graphviz.ExecutableNotFound:
            raise GraphRenderError(
                f"drawing {fmt} needs Graphviz's dot program, which is not on PATH: install "
                'Graphviz (apt-get install graphviz, brew install graphviz, or '
                'https://graphviz.org/download/)') from None
        except graphviz.CalledProcessError as exc:
            raise GraphRenderError(f'Graphviz dot failed to draw {fmt}: {exc}') from None
        return data

    def export(self, fmt: str) -> bytes:
        """The graph in one of ``GRAPH_FORMATS``, as bytes (text is UTF-8)."""
        if fmt == 'json':
            return self.to_json().encode()
        if fmt == 'dot':
            return str(self.to_dot().source).encode()
        if fmt == 'mermaid':
            return self.to_mermaid().encode()
        if fmt == 'asyncapi':
            return asyncapi_json(self.to_asyncapi())
        if fmt in RENDERED_FORMATS:
            return self.render(fmt)
        raise ValueError(f'unknown graph format {fmt!r}; use one of {", ".join(GRAPH_FORMATS)}')


AgentSource = type[MicroAgent] | MicroAgent | str
# An agent as a settings module places it: name, class, bus, broker.
_Placement = tuple[str, type[MicroAgent], Transport | None, Transport | None]


def settings_agents(module_path: str) -> list[tuple[str, type[MicroAgent]]]:
    """(name, class) of each agent of a launcher settings module, without connecting to
    anything; raise :class:`SettingsError` when the module cannot be used."""
    return [(name, cls) for name, cls, _, _ in _settings_placements(module_path)]


def _settings_placements(module_path: str) -> list[_Placement]:
    """(name, class, bus, broker) of each agent of a launcher settings module, without
    connecting to anything; raise :class:`SettingsError` when the module cannot be used."""
    configs = list(load_configuration(module_path))
    entries = getattr(sys.modules[module_path], 'AGENT', {})
    placements: list[_Placement] = []
    for name, (backend, cfg) in configs:
        transports: dict[str, Transport | None] = {}
        for role in ('bus', 'broker'):
            unfolded = cfg.get(role)
            key = str(entries.get(name, {}).get(role) or role)
            try:
                transports[role] = None if unfolded is None else Transport.of(
                    role, key, *unfolded)
            except ValueError as exc:  # a DSN urllib cannot split
                raise SettingsError(f'{module_path}: {role.upper()}[{key!r}]["dsn"]: {exc}'
                                    ) from None
        placements.append((name, import_backend(backend), transports['bus'],
                           transports['broker']))
    return placements


def _named_agents(source: AgentSource) -> list[_Placement]:
    if isinstance(source, str):
        return _settings_placements(source)
    if isinstance(source, type) and issubclass(source, MicroAgent):
        return [(source.__name__, source, None, None)]
    if isinstance(source, MicroAgent):
        return [(type(source).__name__, type(source), None, None)]
    raise TypeError(f'a graph is built from MicroAgent classes, agents and settings module '
                    f'names, not {source!r}')


def build_graph(*sources: AgentSource) -> Topology:
    """The topology of agents, without connecting to anything.

    Each source is a :class:`MicroAgent` subclass (named by its class name), an agent
    (named by its class name), or the dotted name of a launcher settings module (its
    agents named by their ``AGENT`` keys; :class:`SettingsError` if it cannot be used).
    Two different classes under one name raise ``ValueError``::

        build_graph('examples.settings').to_mermaid()
        build_graph(UserAgent, CommentAgent).to_json()
    """
    return _topology(pair for source in sources for pair in _named_agents(source))


def _topology(placements: Iterable[_Placement]) -> Topology:
    chosen: dict[str, _Placement] = {}
    for placement in placements:
        name, cls = placement[0], placement[1]
        known = chosen.setdefault(name, placement)[1]
        if known is not cls:
            raise ValueError(f'agent name {name!r} is used by {_class_path(known)} and '
                             f'{_class_path(cls)}')
    return Topology(tuple(_placed_node(*chosen[name]) for name in sorted(chosen)))


def _placed_node(name: str, agent_class: type[MicroAgent], bus: Transport | None = None,
                broker: Transport | None = None) -> AgentNode:
    """The node of ``agent_class`` named ``name`` (:meth:`AgentNode.of`), with its bus
    and broker and the answer keys and DTOs of its handlers."""
    answers: set[tuple[str, str]] = set()
    dtos: dict[tuple[str, str], type] = {}
    for method, declarations in agent_class.declarations.items():
        function = getattr(agent_class, method, None)
        key = f'{agent_class.__name__}.{getattr(function, "__name__", method)}'
        for declaration in declarations:
            if isinstance(declaration, ReceiverArgs):
                answers.update((signal.name, key) for signal in declaration.signals)
            elif isinstance(declaration, ConsumerArgs) and declaration.dto_class is not None:
                queue, dto = declaration.queue.name, declaration.dto_class
                dtos[queue, _class_path(dto)] = dto
    return msgspec.structs.replace(
        AgentNode.of(name, agent_class), bus=bus, broker=broker,
        answers=tuple(sorted(answers)), dtos=tuple((queue, dtos[queue, path])
                                                   for queue, path in sorted(dtos)))


# -- node ids and labels, shared by DOT and Mermaid -----------------------------------------

_UNSAFE_ID_CHARS = re.compile(r'[^A-Za-z0-9_]+')
_CONTROL_CHARS = re.compile(r'[\x00-\x1f\x7f-\x9f\ud800-\udfff]')


def _printable(text: str) -> str:
    """``text`` with control characters (and lone surrogates) shown as escapes."""
    return _CONTROL_CHARS.sub(lambda m: m.group().encode('unicode_escape', 'backslashreplace')
                              .decode('ascii'), text)


def _node_ids(topology: Topology) -> dict[str, str]:
    """``agent:NAME``-style keys -> identifiers safe in DOT and Mermaid, stable for the
    same graph: the kind and the name with other characters turned into ``_``, with a
    number added when two names would collide."""
    keys = [*(f'agent:{a.name}' for a in topology.agents),
            *(f'signal:{name}' for name in topology.signals),
            *(f'queue:{name}' for name in topology.queues)]
    ids: dict[str, str] = {}
    used: set[str] = set()
    for key in keys:
        kind, _, name = key.partition(':')
        ids[key] = _unused(f'{kind}_{_UNSAFE_ID_CHARS.sub("_", name)}', used, '_')
    return ids


def _unused(base: str, used: set[str], separator: str) -> str:
    """``base``, or ``base`` numbered (``_2``, ``-3``...) when it is in ``used``
    already; the name returned is added to ``used``."""
    candidate, number = base, 2
    while candidate in used:
        candidate, number = f'{base}{separator}{number}', number + 1
    used.add(candidate)
    return candidate


# -- DOT (graphviz) ------------------------------------------------------------------

_FONT = 'Helvetica'
_NODE_STYLES: dict[str, dict[str, str]] = {
    'agent': {'shape': 'box', 'style': 'rounded,filled', 'fillcolor': '#e0e7ff',
              'color': '#3730a3'},
    'signal': {'shape': 'ellipse', 'style': 'filled', 'fillcolor': '#dcfce7',
               'color': '#15803d'},
    'queue': {'shape': 'cylinder', 'style': 'filled', 'fillcolor': '#ffedd5',
              'color': '#c2410c'},
}
_EDGE_STYLES: dict[str, dict[str, str]] = {
    'sends': {'color': '#15803d', 'style': 'solid', 'arrowhead': 'normal'},
    'receives': {'color': '#15803d', 'style': 'solid', 'arrowhead': 'empty'},
    'calls': {'color': '#7c3aed', 'style': 'dashed', 'arrowhead': 'vee', 'penwidth': '1.5'},
    'produces': {'color': '#c2410c', 'style': 'bold', 'arrowhead': 'normal'},
    'consumes': {'color': '#c2410c', 'style': 'bold', 'arrowhead': 'empty'},
}


def _html(text: str) -> str:
    """``text`` escaped for a Graphviz HTML-like label."""
    import html
    return html.escape(_printable(text), quote=True)


def _agent_label(agent: AgentNode) -> str:
    rows = [f'<TR><TD><B>{_html(agent.name)}</B></TD></TR>',
            f'<TR><TD><FONT POINT-SIZE="9" COLOR="#475569">{_html(agent.class_path)}'
            '</FONT></TD></TR>']
    rows += [f'<TR><TD ALIGN="LEFT"><FONT POINT-SIZE="10">{_html(line)}</FONT></TD></TR>'
             for line in agent.schedule]
    return f'<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0">{"".join(rows)}</TABLE>>'


def _dot_legend(graph: Any) -> None:
    """A small cluster showing the three node shapes; the edges carry their own labels."""
    with graph.subgraph(name='cluster_legend') as legend:
        legend.attr(label='Legend', style='rounded', color='#cbd5e1', fontsize='8',
                    fontcolor='#64748b', margin='4', rank='same')
        for kind in ('agent', 'signal', 'queue'):
            legend.node(f'legend_{kind}', label=kind, fontsize='8', height='0.2',
                        width='0.5', margin='0.04,0.02', **_NODE_STYLES[kind])


def _dot_graph(topology: Topology) -> Any:
    graphviz = _optional_dependency('graphviz', GRAPHVIZ_NEEDED_FOR)
    ids = _node_ids(topology)
    graph = graphviz.Digraph('topology', comment='microagent topology')
    graph.attr(rankdir='LR', bgcolor='white', fontname=_FONT, nodesep='0.3', ranksep='0.8')
    graph.attr('node', fontname=_FONT, fontsize='12')
    graph.attr('edge', fontname=_FONT, fontsize='9')
    for agent in topology.agents:
        graph.node(ids[f'agent:{agent.name}'], label=_agent_label(agent),
                   tooltip=_printable(agent.class_path), **_NODE_STYLES['agent'])
    for kind, names in (('signal', topology.signals), ('queue', topology.queues)):
        for name in names:
            graph.node(ids[f'{kind}:{name}'], label=f'<{_html(name)}>', **_NODE_STYLES[kind])
    for edge in topology.edges:
        style = _EDGE_STYLES[edge.kind]
        graph.edge(ids[edge.source], ids[edge.target], label=edge.kind,
                   fontcolor=style['color'], **style)
    _dot_legend(graph)
    return graph


# -- Mermaid -------------------------------------------------------------------------

# Characters a quoted Mermaid label cannot hold as they are: written as entity codes.
_MERMAID_ESCAPES = {char: f'#{ord(char)};' for char in '"#&<>`'}
_MERMAID_SHAPES = {'agent': ('["', '"]'), 'signal': ('(["', '"])'), 'queue': ('[("', '")]')}
_MERMAID_ARROWS = {'sends': '-->', 'receives': '-->', 'calls': '-.->', 'produces': '==>',
                   'consumes': '==>'}
_MERMAID_CLASSES = {kind: f'fill:{style["fillcolor"]},stroke:{style["color"]}'
                    for kind, style in _NODE_STYLES.items()}


def _mermaid_text(text: str) -> str:
    return ''.join(_MERMAID_ESCAPES.get(char, char) for char in _printable(text))


def _mermaid(topology: Topology) -> str:
    ids = _node_ids(topology)
    lines = ['flowchart LR']
    for agent in topology.agents:
        label = '<br/>'.join(_mermaid_text(line)
                             for line in (agent.name, agent.class_path, *agent.schedule))
        lines.append(f'    {ids["agent:" + agent.name]}["{label}"]')
    for kind, names in (('signal', topology.signals), ('queue', topology.queues)):
        opening, closing = _MERMAID_SHAPES[kind]
        lines += [f'    {ids[kind + ":" + name]}{opening}{_mermaid_text(name)}{closing}'
                  for name in names]
    edges = topology.edges
    lines += [f'    {ids[e.source]} {_MERMAID_ARROWS[e.kind]}|{e.kind}| {ids[e.target]}'
              for e in edges]
    for kind, style in _MERMAID_CLASSES.items():
        members = [node_id for key, node_id in ids.items() if key.startswith(kind + ':')]
        lines.append(f'    classDef {kind} {style}')
        if members:
            lines.append(f'    class {",".join(members)} {kind}')
    for kind in EDGE_KINDS:
        indexes = [str(i) for i, edge in enumerate(edges) if edge.kind == kind]
        if indexes:
            lines.append(f'    linkStyle {",".join(indexes)} '
                         f'stroke:{_EDGE_STYLES[kind]["color"]}')
    return '\n'.join(lines) + '\n'


# -- AsyncAPI 3 ----------------------------------------------------------------------

ASYNCAPI_VERSION = '3.0.0'
_ACTIONS = {'sends': 'send', 'calls': 'send', 'produces': 'send', 'receives': 'receive',
            'consumes': 'receive'}
_UNSAFE_KEY_CHARS = re.compile(r'[^A-Za-z0-9_.\-]+')
_SCHEMA_REF = '#/components/schemas/{name}'
_AMQP_BINDING_VERSION = '0.3.0'
# Keywords whose value is data, not a schema: a schema rewrite leaves them alone.
_SCHEMA_DATA_KEYWORDS = frozenset({'const', 'default', 'enum', 'examples', 'required'})

_Key = TypeVar('_Key')
# A channel: ('signal', prefix, name), ('reply', prefix) or ('queue', name).
_Channel = tuple[str, ...]


def _document_key(text: str) -> str:
    """``text`` as a key of the document that a ``$ref`` names without escapes."""
    return _UNSAFE_KEY_CHARS.sub('_', text) or '_'


def _unique_keys(wanted: Iterable[tuple[_Key, str]]) -> dict[_Key, str]:
    """A document key for each item, from the text it wants: made safe for a ``$ref``,
    and numbered (``-2``, ``-3``) after the first item that wants the same key."""
    keys: dict[_Key, str] = {}
    used: set[str] = set()
    for item, text in wanted:
        keys[item] = _unused(_document_key(text), used, '-')
    return keys


def _ref(*path: str) -> dict[str, str]:
    return {'$ref': '#/' + '/'.join(path)}


def _asyncapi_schema(node: Any) -> Any:
    """A JSON Schema made by msgspec (draft 2020-12) in the dialect of AsyncAPI's Schema
    Object (draft 07): ``prefixItems`` become ``items`` (the rest ``additionalItems``),
    and a ``discriminator`` object its property name."""
    if isinstance(node, list):
        return [_asyncapi_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    schema = {key: value if key in _SCHEMA_DATA_KEYWORDS else _asyncapi_schema(value)
              for key, value in node.items()}
    if 'prefixItems' in schema:
        schema['additionalItems'] = schema.pop('items', True)
        schema['items'] = schema.pop('prefixItems')
    discriminator = schema.get('discriminator')
    if isinstance(discriminator, dict):
        schema['discriminator'] = discriminator.get('propertyName')
    return schema


def _json_schemas(types: list[Any]) -> tuple[list[JSONObject | None], JSONObject]:
    """msgspec's JSON Schema of each of ``types`` (None, and a warning, for one it cannot
    describe) and the schemas they refer to, by name (``#/components/schemas/NAME``)."""
    described: list[tuple[int, Any]] = []
    for index, kind in enumerate(types):
        try:
            msgspec.json.schema(kind)
        except (TypeError, ValueError) as exc:
            graph_log.warning('AsyncAPI: %r has no JSON Schema (%s)', kind,
                              str(exc).splitlines()[-1].strip())
        else:
            described.append((index, kind))
    schemas, components = msgspec.json.schema_components(
        [kind for _, kind in described], ref_template=_SCHEMA_REF)
    found: list[JSONObject | None] = [None] * len(types)
    for (index, _), schema in zip(described, schemas, strict=True):
        found[index] = _asyncapi_schema(schema)
    return found, {name: _asyncapi_schema(schema) for name, schema in components.items()}


def _is_json_type_name(spec: Any) -> bool:
    """Whether a ``type_map`` value is a JSON type name or a list of them (a signal
    declared in a JSON file) rather than a Python type."""
    return isinstance(spec, str) or (
        isinstance(spec, list) and all(isinstance(name, str) for name in spec))


def _prefix_of(agent: AgentNode) -> str:
    return agent.bus.prefix if agent.bus is not None else _default_prefix()


class _AsyncAPI:
    """The AsyncAPI document of a topology, built in one pass (see
    :meth:`Topology.to_asyncapi`)."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.transports: dict[_Channel, set[Transport]] = {}
        self.answers: dict[tuple[str, str], set[str]] = {}
        self.called: set[tuple[str, str]] = set()
        self.dtos: dict[str, dict[str, type]] = {}
        for agent in topology.agents:
            self._place(agent)
        for prefix, name in self.called:  # the answers travel on the buses of the calls
            self.transports.setdefault(('reply', prefix), set()).update(
                self.transports['signal', prefix, name])
        self.channel_keys = _unique_keys((channel, _channel_text(channel))
                                         for channel in sorted(self.transports))
        self.message_keys = _unique_keys(
            (message, f'{message[0]}.{message[1]}')
            for message in sorted({(c[0], c[-1]) for c in self.transports if c[0] != 'reply'}))
        self.server_keys = _unique_keys(
            (transport, f'{transport.role}-{transport.key}')
            for transport in sorted({t for ts in self.transports.values() for t in ts
                                     if t.is_server}))
        self._schemas()

    def _place(self, agent: AgentNode) -> None:
        """Record the channels, servers, RPC answers and DTOs of one agent."""
        prefix = _prefix_of(agent)
        for edge in agent.edges():
            kind, _, name = (edge.target if edge.kind in SENT_KINDS else edge.source
                             ).partition(':')
            transport = agent.bus if kind == 'signal' else agent.broker
            channel = ('signal', prefix, name) if kind == 'signal' else ('queue', name)
            self.transports.setdefault(channel, set()).update(
                [transport] if transport else [])
            if edge.kind == 'calls':
                self.called.add((prefix, name))
        for signal, key in agent.answers:
            self.answers.setdefault((prefix, signal), set()).add(key)
        for queue, dto in agent.dtos:
            self.dtos.setdefault(queue, {})[_class_path(dto)] = dto

    def _schemas(self) -> None:
        """The JSON Schemas of the DTOs and of the Python types of signal arguments."""
        wanted: list[tuple[tuple[str, str, str], Any]] = []
        for name in sorted({c[2] for c in self.transports if c[0] == 'signal'}):
            signal = Signal._registry.get(name)
            for arg, spec in sorted((signal.type_map or {}).items() if signal else ()):
                if not _is_json_type_name(spec):
                    wanted.append((('signal', name, arg), _python_type(spec)))
        for queue, classes in sorted(self.dtos.items()):
            wanted += [(('queue', queue, path), dto) for path, dto in sorted(classes.items())]
        schemas, self.components = _json_schemas([kind for _, kind in wanted])
        self.schemas = {where: schema for (where, _), schema in zip(wanted, schemas,
                                                                     strict=True)}

    # -- the parts of the document ----------------------------------------------------

    def document(self, title: str, version: str) -> JSONObject:
        components: JSONObject = {'messages': self._messages()}
        if self.components:
            components['schemas'] = self.components
        agents = ', '.join(f'`{a.name}` ({a.class_path})' for a in self.topology.agents)
        return {
            'asyncapi': ASYNCAPI_VERSION,
            'info': {'title': title, 'version': version,
                     'description': f'The signals and queues of the agents {agents}.'
                     if agents else 'No agents.'},
            'defaultContentType': 'application/json',
            'servers': {key: _server(transport) for transport, key in self.server_keys.items()},
            'channels': {self.channel_keys[channel]: self._channel(channel)
                         for channel in self.channel_keys},
            'operations': self._operations(),
            'components': components,
        }

    def _servers_of(self, channel: _Channel) -> list[dict[str, str]]:
        return sorted((_ref('servers', self.server_keys[t])
                       for t in self.transports[channel] if t.is_server),
                      key=lambda ref: ref['$ref'])

    def _channel(self, channel: _Channel) -> JSONObject:
        if channel[0] == 'signal':
            data = self._signal_channel(channel[1], channel[2])
        elif channel[0] == 'reply':
            data = self._reply_channel(channel[1])
        else:
            data = self._queue_channel(channel[1])
        servers = self._servers_of(channel)
        if servers:
            data['servers'] = servers
        return data

    def _signal_channel(self, prefix: str, name: str) -> JSONObject:
        rpc = (' An RPC call adds `#{request_id}` to the address; the answers come back '
               'on the `response` channel of the prefix.' if (prefix, name) in self.called
               else '')
        return {
            'address': f'{prefix}:{name}:{{sender}}',
            'description': f'Signal `{name}` on the bus prefix `{prefix}`.{rpc}',
            'parameters': {'sender': {
                'description': 'The sender name the agent gives to `send`, `call` or '
                               '`waiter`.'}},
            'messages': {name: _ref('components', 'messages',
                                    self.message_keys['signal', name])},
        }

    def _reply_channel(self, prefix: str) -> JSONObject:
        called = sorted(name for p, name in self.called if p == prefix)
        return {
            'address': f'{prefix}:response:{{uid}}#{{id}}',
            'description': f'The answers to RPC calls on the bus prefix `{prefix}`: one '
                           'message per answering agent, keyed by its receivers '
                           '(`Class.method`).',
            'parameters': {
                'uid': {'description': 'The id of the calling bus (random, one per bus '
                                       'object).'},
                'id': {'description': 'The id of the request.'}},
            'messages': {name: self._answer_message(prefix, name) for name in called},
        }

    def _answer_message(self, prefix: str, name: str) -> JSONObject:
        keys = sorted(self.answers.get((prefix, name), ()))
        return {'name': f'{name}.answer', 'summary': f'Answer to the RPC call of `{name}`',
                'payload': {'type': 'object', 'properties': {key: {} for key in keys}}}

    def _queue_channel(self, name: str) -> JSONObject:
        queue = Queue._registry.get(name)
        description = f'Queue `{name}`.'
        if queue is not None and queue.exchange:
            topics = ', '.join(f'`{topic}`' for topic in queue.topics or (name,))
            description += (f' On AMQP it is bound to the topic exchange `{queue.exchange}` '
                            f'by the routing keys {topics}, and messages are published '
                            'through the exchange.')
        data: JSONObject = {
            'address': name, 'description': description,
            'messages': {_document_key(name): _ref('components', 'messages',
                                                   self.message_keys['queue', name])},
        }
        if any(t.protocol in ('amqp', 'amqps') for t in self.transports['queue', name]):
            data['bindings'] = {'amqp': {'is': 'queue', 'queue': {'name': name},
                                         'bindingVersion': _AMQP_BINDING_VERSION}}
        return data

    def _messages(self) -> JSONObject:
        messages: JSONObject = {}
        for (kind, name), key in self.message_keys.items():
            if kind == 'signal':
                messages[key] = {'name': name, 'summary': f'Signal `{name}`',
                                 'payload': self._signal_payload(name)}
            else:
                messages[key] = {'name': name, 'summary': f'A message of queue `{name}`',
                                 'payload': self._queue_payload(name)}
        return messages

    def _signal_payload(self, name: str) -> JSONObject:
        signal = Signal._registry.get(name)
        if signal is None:
            return {'type': 'object', 'description': f'Signal `{name}` is not declared.'}
        types = signal.type_map or {}
        properties: JSONObject = {}
        for arg in signal.providing_args:
            spec = types.get(arg)
            if spec is None:
                properties[arg] = {}
            elif _is_json_type_name(spec):
                properties[arg] = {'type': spec}
            else:
                properties[arg] = self.schemas['signal', name, arg] or {}
        payload: JSONObject = {'type': 'object', 'properties': properties}
        if properties:
            payload['required'] = sorted(properties)
        return payload

    def _queue_payload(self, name: str) -> JSONObject:
        schemas = []
        for path in sorted(self.dtos.get(name, ())):
            schema = self.schemas['queue', name, path]
            schemas.append(schema if schema is not None else {
                'type': 'object', 'description': f'`{path}`: msgspec has no JSON Schema '
                                                 'for this class.'})
        unique = sorted({encode_json(s): s for s in schemas}.items())
        if not unique:
            return {'type': 'object'}
        if len(unique) == 1:
            return unique[0][1]
        return {'allOf': [schema for _, schema in unique]}

    def _operations(self) -> JSONObject:
        wanted = []
        for agent in self.topology.agents:
            prefix = _prefix_of(agent)
            for edge in agent.edges():
                kind, _, name = (edge.target if edge.kind in SENT_KINDS else edge.source
                                 ).partition(':')
                channel = ('signal', prefix, name) if kind == 'signal' else ('queue', name)
                wanted.append(((agent, edge.kind, channel), f'{agent.name}.{edge.kind}.{name}'))
        keys = _unique_keys(sorted(wanted, key=lambda pair: (pair[1], pair[0][1:])))
        return {key: self._operation(*what) for what, key in keys.items()}

    def _operation(self, agent: AgentNode, kind: str, channel: _Channel) -> JSONObject:
        key = self.channel_keys[channel]
        message = channel[-1] if channel[0] == 'signal' else _document_key(channel[-1])
        operation: JSONObject = {
            'action': _ACTIONS[kind],
            'channel': _ref('channels', key),
            'messages': [_ref('channels', key, 'messages', message)],
            'summary': f'`{agent.name}` ({agent.class_path}) {kind} `{channel[-1]}`',
            'tags': [{'name': agent.name}],
        }
        if channel[0] == 'signal' and (channel[1], channel[2]) in self.called and kind in (
                'calls', 'receives'):
            reply = self.channel_keys['reply', channel[1]]
            operation['reply'] = {'channel': _ref('channels', reply),
                                  'messages': [_ref('channels', reply, 'messages', message)]}
        return operation


def _channel_text(channel: _Channel) -> str:
    """The key a channel wants in the document: ``PREFIX.signal``, ``PREFIX.response``,
    or the queue's name."""
    if channel[0] == 'signal':
        return f'{channel[1]}.{channel[2]}'
    if channel[0] == 'reply':
        return f'{channel[1]}.response'
    return channel[1]


def _server(transport: Transport) -> JSONObject:
    role = 'signal bus' if transport.role == 'bus' else 'queue broker'
    prefix = f', channel prefix `{transport.prefix}`' if transport.prefix else ''
    server: JSONObject = {
        'host': transport.host, 'protocol': transport.protocol,
        'title': f'{transport.role.upper()} {transport.key}',
        'description': f'The {role} `{transport.backend}`{prefix}.',
    }
    if transport.pathname:
        server['pathname'] = transport.pathname
    return server


def asyncapi_json(document: JSONObject) -> bytes:
    """An AsyncAPI document as indented UTF-8 JSON with sorted keys, ending with a
    newline: the same document always gives the same bytes."""
    return msgspec.json.format(msgspec.json.encode(document, order='sorted'), indent=2) + b'\n'


# -- marun --graph and marun --check ------------------------------------------------

def graph_command(modules: Iterable[str], fmt: str, output: str | None = None) -> int:
    """``marun --graph FORMAT [-o FILE] MODULE...``: write the graph of the settings
    modules to FILE or standard output. Returns the exit status: 0, 2 when a settings
    module cannot be used (or a binary format would go to a terminal), 1 when drawing
    fails."""
    if fmt in BINARY_FORMATS and not output and sys.stdout.isatty():
        print(f'marun: error: --graph {fmt} is binary and standard output is a terminal: '
              f'write it to a file with -o FILE (or redirect the output)', file=sys.stderr)
        return 2
    modules = list(modules)
    try:
        # What a settings module prints or logs while imported must not mix with a
        # graph written to standard output.
        with contextlib.redirect_stdout(sys.stderr):
            topology = build_graph(*modules)
            data = (asyncapi_json(topology.to_asyncapi(title=', '.join(modules)))
                    if fmt == 'asyncapi' else topology.export(fmt))
    except (SettingsError, ValueError, TypeError) as exc:
        print(f'marun: error: {exc}', file=sys.stderr)
        return 2
    except (GraphRenderError, ImportError) as exc:
        print(f'marun: error: {exc}', file=sys.stderr)
        return 1
    if output:
        try:
            with open(output, 'wb') as file:
                file.write(data)
        except OSError as exc:
            print(f'marun: error: cannot write {output}: {exc.strerror or exc}', file=sys.stderr)
            return 1
    else:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return 0


class Finding(msgspec.Struct, frozen=True, order=True):
    """One problem found by :func:`check_topology`: ``error`` or ``warning``."""
    severity: str
    message: str

    def __str__(self) -> str:
        return f'{self.severity}: {self.message}'


def _who(agents: Iterable[AgentNode]) -> str:
    return ', '.join(sorted(repr(agent.name) for agent in agents))


def _undeclared(topology: Topology) -> Iterator[Finding]:
    signals, queues = Signal.get_all(), Queue.get_all()
    for agent in topology.agents:
        for verb, names, declared, what in (('sends', agent.sends, signals, 'signal'),
                                            ('calls', agent.calls, signals, 'signal'),
                                            ('produces', agent.produces, queues, 'queue')):
            for name in names:
                if name not in declared:
                    yield Finding('error', f'agent {agent.name!r} ({agent.class_path}) {verb} '
                                           f'{what} {name!r}, which is not declared'
                                           f'{_did_you_mean(name, declared)}')


def _unpaired(topology: Topology) -> Iterator[Finding]:
    signals, queues = Signal.get_all(), Queue.get_all()
    senders: dict[str, list[AgentNode]] = {}
    receivers: dict[str, list[AgentNode]] = {}
    producers: dict[str, list[AgentNode]] = {}
    consumers: dict[str, list[AgentNode]] = {}
    for agent in topology.agents:
        for name in {*agent.sends, *agent.calls}:
            senders.setdefault(name, []).append(agent)
        for name in agent.receives:
            receivers.setdefault(name, []).append(agent)
        for name in agent.produces:
            producers.setdefault(name, []).append(agent)
        for name in agent.consumes:
            consumers.setdefault(name, []).append(agent)
    for name in sorted((senders.keys() - receivers.keys()) & signals.keys()):
        yield Finding('warning', f'signal {name!r} is {_senders_text(senders[name], name)} '
                                 f'but no agent receives it')
    for name in sorted(receivers.keys() - senders.keys()):
        yield Finding('warning', f'signal {name!r} is received by {_who(receivers[name])} '
                                 f'but no agent sends it')
    for name in sorted((producers.keys() - consumers.keys()) & queues.keys()):
        yield Finding('warning', f'queue {name!r} is produced by {_who(producers[name])} '
                                 f'but no agent consumes it')
    dead_letters = {f'{name}.dead' for name in consumers}
    for name in sorted(consumers.keys() - producers.keys() - dead_letters):
        yield Finding('warning', f'queue {name!r} is consumed by {_who(consumers[name])} '
                                 f'but no agent produces it')
    for name, agents in sorted(consumers.items()):
        classes = {agent.class_path for agent in agents}
        if len(classes) > 1:
            which = ', '.join(sorted(f'{a.name!r} ({a.class_path})' for a in agents))
            yield Finding('warning', f'queue {name!r} is consumed by agents of different '
                                     f'classes, which would split its messages: {which}')


def _senders_text(agents: list[AgentNode], signal: str) -> str:
    """``sent by 'a'``, ``called by 'b'`` or ``sent by 'a' and called by 'b'``."""
    sending = [agent for agent in agents if signal in agent.sends]
    calling = [agent for agent in agents if signal in agent.calls]
    return ' and '.join(f'{verb} by {_who(who)}' for verb, who in
                        (('sent', sending), ('called', calling)) if who)


def check_topology(topology: Topology) -> list[Finding]:
    """The problems of a topology: names sent, called or produced that are not declared
    (errors); signals sent but never received or received but never sent, queues
    produced but never consumed or consumed but never produced, a queue consumed by
    agents of different classes, classes whose source cannot be analysed (warnings)."""
    unreadable = [Finding('warning', f'agent {agent.name!r}: the source of {path} is not '
                                     'available, what it sends, calls and produces is unknown')
                  for agent in topology.agents for path in agent.unreadable]
    return [*_undeclared(topology), *_unpaired(topology), *unreadable]


def _load_for_check(modules: Iterable[str]) -> tuple[list[_Placement], list[Finding]]:
    """The agents of the settings modules that can be used, and the errors of the others
    (and of agent names used twice, which ``marun`` refuses)."""
    agents: list[_Placement] = []
    findings: list[Finding] = []
    seen: dict[str, str] = {}
    for module in modules:
        try:
            loaded = _settings_placements(module)
        except SettingsError as exc:
            findings.append(Finding('error', f'settings {exc}'))
            continue
        for placement in loaded:
            name = placement[0]
            if name in seen:
                findings.append(Finding('error', f'agent name {name!r} is used twice '
                                                 f'({seen[name]}, {module})'))
                continue
            seen[name] = module
            agents.append(placement)
    return agents, findings


def check_command(modules: Iterable[str], against: str | None = None) -> int:
    """``marun --check [--against FILE] MODULE...``: print one line per finding
    (``error: ...`` or ``warning: ...``) and return 1 if there is an error, else 0.

    With ``against``, an AsyncAPI document written by an earlier ``marun --graph
    asyncapi``, each change that breaks an agent deployed from it is an error too
    (``error: breaking: ...``, see :func:`breaking_changes`).
    """
    with contextlib.redirect_stdout(sys.stderr):
        agents, findings = _load_for_check(modules)
        nodes = []
        for placement in agents:
            try:
                nodes.append(_placed_node(*placement))
            except TypeError as exc:  # a wrong ``topology`` attribute
                findings.append(Finding('error', f'agent {placement[0]!r}: {exc}'))
        topology = Topology(tuple(nodes))
        findings += check_topology(topology)
        if against is not None:
            findings += _contract_findings(against, topology)
    for finding in findings:
        print(finding)
    errors = sum(finding.severity == 'error' for finding in findings)
    print(f'marun --check: {errors} error(s), {len(findings) - errors} warning(s) in '
          f'{len(agents)} agent(s)', file=sys.stderr)
    return 1 if errors else 0


# -- marun --check --against: what breaks the contract of an earlier AsyncAPI document --

# Schema keywords that document rather than constrain: a change of them breaks nobody.
_ANNOTATION_KEYWORDS = frozenset({'$comment', 'default', 'deprecated', 'description',
                                  'examples', 'externalDocs', 'readOnly', 'title',
                                  'writeOnly'})
# Schema keywords whose value maps names to schemas.
_SCHEMA_MAP_KEYWORDS = frozenset({'$defs', 'definitions', 'dependentSchemas', 'properties',
                                  'patternProperties'})
_SENDER_PARAMETER = ':{sender}'


class _Contract(msgspec.Struct, frozen=True):
    """What an AsyncAPI document of ``marun --graph asyncapi`` promises: the payload
    schema of each signal (by prefix and name) and of each queue, the signals that are
    called (RPC) and those that some agent receives."""
    signals: dict[tuple[str, str], Any]
    queues: dict[str, Any]
    called: frozenset[tuple[str, str]]
    received: frozenset[tuple[str, str]]


def _as_dict(value: Any) -> JSONObject:
    return value if isinstance(value, dict) else {}


def _pointed(document: JSONObject, ref: str) -> Any:
    """What a local ``$ref`` (``#/components/schemas/Order``) points to; raise
    ValueError."""
    import urllib.parse
    if not ref.startswith('#/'):
        raise ValueError(f'$ref {ref!r} does not point into the document')
    node: Any = document
    for part in ref[2:].split('/'):
        key = urllib.parse.unquote(part).replace('~1', '/').replace('~0', '~')
        if not isinstance(node, dict) or key not in node:
            raise ValueError(f'$ref {ref!r} points to nothing')
        node = node[key]
    return node


def _followed(document: JSONObject, node: Any) -> JSONObject:
    """``node``, or what its ``$ref`` (and theirs) point to."""
    seen: set[str] = set()
    while isinstance(node, dict) and isinstance(node.get('$ref'), str):
        if node['$ref'] in seen:
            raise ValueError(f'$ref {node["$ref"]!r} refers to itself')
        seen.add(node['$ref'])
        node = _pointed(document, node['$ref'])
    return _as_dict(node)


def _schema_type(document: JSONObject, schema: Any, inlining: frozenset[str] = frozenset()
                 ) -> Any:
    """``schema`` as two versions compare it: its ``$ref``s inlined (a recursive one is
    kept by name) and its annotations (titles, descriptions, defaults) left out."""
    if isinstance(schema, list):
        return [_schema_type(document, item, inlining) for item in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get('$ref')
    if isinstance(ref, str):
        if ref in inlining:
            return {'$ref': ref}
        return _schema_type(document, _pointed(document, ref), inlining | {ref})
    compared: JSONObject = {}
    for key, value in schema.items():
        if key in _ANNOTATION_KEYWORDS:
            continue
        if key in _SCHEMA_MAP_KEYWORDS and isinstance(value, dict):
            compared[key] = {name: _schema_type(document, item, inlining)
                             for name, item in value.items()}
        elif key in _SCHEMA_DATA_KEYWORDS:
            compared[key] = value
        else:
            compared[key] = _schema_type(document, value, inlining)
    return compared


def _channel_payload(document: JSONObject, channel: JSONObject) -> Any:
    """The payload schema of the (first) message of a channel, as compared."""
    messages = sorted(_as_dict(channel.get('messages')).items())
    if not messages:
        return {}
    return _schema_type(document, _followed(document, messages[0][1]).get('payload', {}))


def _contract(document: JSONObject) -> _Contract:
    """The contract of an AsyncAPI document written by ``marun --graph asyncapi``: a
    signal's channel has the address ``{prefix}:{name}:{sender}``, a queue's the queue
    name and no parameter; RPC answer channels are left out."""
    signals: dict[tuple[str, str], Any] = {}
    queues: dict[str, Any] = {}
    signal_channels: dict[str, tuple[str, str]] = {}
    for key, value in _as_dict(document.get('channels')).items():
        channel = _followed(document, value)
        address, parameters = channel.get('address'), _as_dict(channel.get('parameters'))
        if not isinstance(address, str):
            continue
        if 'sender' in parameters and address.endswith(_SENDER_PARAMETER):
            prefix, _, name = address[:-len(_SENDER_PARAMETER)].rpartition(':')
            signals[prefix, name] = _channel_payload(document, channel)
            signal_channels[f'#/channels/{key}'] = (prefix, name)
        elif not parameters:
            queues[address] = _channel_payload(document, channel)
    called, received = set(), set()
    for value in _as_dict(document.get('operations')).values():
        operation = _followed(document, value)
        signal = signal_channels.get(str(_as_dict(operation.get('channel')).get('$ref')))
        if signal is not None and operation.get('action') == 'receive':
            received.add(signal)
        elif signal is not None and operation.get('reply'):
            called.add(signal)
    return _Contract(signals, queues, frozenset(called), frozenset(received))


def _object_shape(schema: Any) -> tuple[JSONObject, set[str]]:
    """The properties of an object schema and the names of the required ones (over
    its ``allOf`` too)."""
    schema = _as_dict(schema)
    properties = dict(_as_dict(schema.get('properties')))
    required = {name for name in schema.get('required') or () if isinstance(name, str)}
    for part in schema.get('allOf') or ():
        more, needed = _object_shape(part)
        properties.update(more)
        required |= needed
    return properties, required


def _is_object_schema(schema: Any) -> bool:
    return isinstance(schema, dict) and ('properties' in schema or 'allOf' in schema)


def _compact(schema: Any) -> str:
    return msgspec.json.encode(schema, order='sorted').decode()


def _argument_changes(what: str, old: Any, new: Any) -> Iterator[str]:
    """A signal's arguments removed or retyped."""
    before, _ = _object_shape(old)
    after, _ = _object_shape(new)
    for arg in sorted(before):
        if arg not in after:
            yield f'{what} lost its argument {arg!r}'
        elif before[arg] != after[arg]:
            yield (f'{what}: argument {arg!r} changed type from {_compact(before[arg])} '
                   f'to {_compact(after[arg])}')


def _payload_changes(what: str, old: Any, new: Any, path: str = '') -> Iterator[str]:
    """A queue's payload gaining required properties or retyping properties (nested
    objects compared property by property)."""
    before, required_before = _object_shape(old)
    after, required_after = _object_shape(new)
    for name in sorted(required_after - required_before):
        yield f'{what}: its consumers now require the property {path + name!r}'
    for name in sorted(before.keys() & after.keys()):
        if before[name] == after[name]:
            continue
        if _is_object_schema(before[name]) and _is_object_schema(after[name]):
            yield from _payload_changes(what, before[name], after[name], f'{path}{name}.')
        else:
            yield (f'{what}: property {path + name!r} changed type from '
                   f'{_compact(before[name])} to {_compact(after[name])}')


def breaking_changes(old: JSONObject, new: JSONObject) -> list[str]:
    """What in the AsyncAPI document ``new`` breaks an agent deployed from ``old`` (both
    written by ``marun --graph asyncapi``), one sentence per change: a signal or queue
    removed, a signal argument removed or retyped, a queue's payload gaining a required
    property or retyping one, an RPC signal left without a receiver. Additions break
    nothing. Raise ValueError when a ``$ref`` of a document points to nothing."""
    before, after = _contract(old), _contract(new)
    changes: list[str] = []
    for prefix, name in sorted(before.signals):
        what = f'signal {name!r} on prefix {prefix!r}'
        if (prefix, name) not in after.signals:
            changes.append(f'{what} was removed: no agent sends or receives it any more')
            continue
        changes += _argument_changes(what, before.signals[prefix, name],
                                     after.signals[prefix, name])
        if ((prefix, name) in before.called | after.called
                and (prefix, name) in before.received - after.received):
            changes.append(f'{what} is called (RPC) but no agent receives it any more: '
                           'the calls get no answer')
    for name in sorted(before.queues):
        what = f'queue {name!r}'
        if name not in after.queues:
            changes.append(f'{what} was removed: no agent produces or consumes it any more')
            continue
        changes += _payload_changes(what, before.queues[name], after.queues[name])
    return changes


def _read_contract(path: str) -> JSONObject:
    """The AsyncAPI document in file ``path``; raise ValueError."""
    try:
        with open(path, 'rb') as file:
            raw = file.read()
    except OSError as exc:
        raise ValueError(f'cannot read: {exc.strerror or exc}') from None
    try:
        document = decode_object(raw)
    except SerializingError as exc:
        raise ValueError(str(exc)) from None
    if not str(document.get('asyncapi', '')).startswith('3.'):
        raise ValueError('not an AsyncAPI 3 document (write one with marun --graph asyncapi)')
    return document


def _contract_findings(path: str, topology: Topology) -> list[Finding]:
    """An error per change of ``topology`` that breaks the contract in file ``path``."""
    try:
        changes = breaking_changes(_read_contract(path), topology.to_asyncapi())
    except ValueError as exc:
        return [Finding('error', f'--against {path}: {exc}')]
    return [Finding('error', f'breaking: {change}') for change in changes]


# =====================================================================================
# Dead letters: marun SETTINGS --dead [QUEUE] [--replay | --purge --yes]
# =====================================================================================
# What an operator does with the dead letters of the settings' queues, through each
# queue's broker (the broker of the AGENT entries that consume it), without starting
# any agent.

DEAD_PREVIEW = 60  # characters of a body that a listing shows


class DeadTarget(msgspec.Struct, frozen=True):
    """A consumed queue of a settings module and the broker entry that holds it."""
    queue: str
    broker_key: str
    backend: str
    params: dict[str, Any]
    group_id: str | None = None  # the consumer's own ``group_id`` option (Kafka)

    @property
    def where(self) -> str:
        """The broker as a listing shows it: entry, class and DSN without password."""
        dsn = redact_dsn(str(self.params.get('dsn', '')))
        return f'{self.broker_key} ({self.backend.rpartition(".")[2]} {dsn})'

    def broker(self) -> AbstractQueueBroker:
        broker: AbstractQueueBroker = import_backend(self.backend)(**self.params)
        dead_group_ids = getattr(broker, 'dead_group_ids', None)  # a consumer group's
        if self.group_id and isinstance(dead_group_ids, dict):  # dead letters (Kafka)
            dead_group_ids[self.queue] = self.group_id
        return broker


def dead_targets(modules: Iterable[str]) -> list[DeadTarget]:
    """Every queue consumed by the agents of the settings modules, with its broker, in
    the order of the settings (a queue on two brokers is there twice)."""
    targets: dict[tuple[str, str], DeadTarget] = {}
    for module in modules:
        entries = getattr(importlib.import_module(module), 'AGENT', {})
        for name, (backend, cfg) in load_configuration(module):
            broker = cfg.get('broker')
            if broker is None:
                continue
            key = str(entries.get(name, {}).get('broker'))
            for declarations in import_backend(backend).declarations.values():
                for declaration in declarations:
                    if isinstance(declaration, ConsumerArgs):
                        queue = declaration.queue.name
                        targets.setdefault((queue, key), DeadTarget(
                            queue, key, resolve_backend(broker[0]), dict(broker[1]),
                            declaration.options.get('group_id')))
    return list(targets.values())


def _dead_json(letter: DeadLetter) -> str:
    """One JSON object a line: the body as text when it is UTF-8, else base64."""
    entry: JSONObject = {'id': letter.id, 'queue': letter.queue, 'failed_at': letter.failed_at,
                         'attempts': letter.attempts, 'consumer': letter.consumer,
                         'error': letter.error}
    entry.update(_original_body(letter.body))
    return encode_json(entry).decode()


def _dead_line(letter: DeadLetter) -> str:
    """A letter as a listing line: id, failed_at, attempts, consumer, error, body."""
    try:
        preview = letter.body.decode()
    except UnicodeDecodeError:
        preview = f'(binary, {len(letter.body)} bytes)'
    if len(preview) > DEAD_PREVIEW:
        preview = preview[:DEAD_PREVIEW - 1] + '…'
    failed = _utc(letter.failed_at) if letter.failed_at else '-'
    return '  '.join((letter.id, failed, str(letter.attempts), letter.consumer or '-',
                      _printable(letter.error), _printable(preview)))


async def _dead_overview(targets: list[DeadTarget]) -> int:
    width = max(len(t.queue) for t in targets)
    for target in targets:
        broker = target.broker()
        try:
            count = await broker.dead_count(target.queue)
        finally:
            await broker.close()
        print(f'{target.queue:<{width}}  {count:>6} dead  {target.where}')
    return 0


async def _dead_action(target: DeadTarget, action: str | None, ids: list[str] | None,
                       limit: int | None, as_json: bool) -> int:
    broker = target.broker()
    try:
        if action == 'replay':
            count = await broker.replay(target.queue, ids=ids, limit=limit)
            print(f'replayed {count} dead letter(s) of {target.queue} on {target.where}')
        elif action == 'purge':
            count = await broker.purge_dead(target.queue, ids=ids)
            print(f'purged {count} dead letter(s) of {target.queue} on {target.where}')
        else:
            letters = await broker.dead_letters(target.queue, 100 if limit is None else limit)
            for letter in letters:
                print(_dead_json(letter) if as_json else _dead_line(letter))
            if not as_json:
                total = await broker.dead_count(target.queue)
                print(f'{len(letters)} of {total} dead letter(s) of {target.queue} on '
                      f'{target.where}', file=sys.stderr)
    finally:
        await broker.close()
    return 0


def dead_command(modules: Iterable[str], queue: str | None, action: str | None = None, *,
                 ids: list[str] | None = None, limit: int | None = None,
                 as_json: bool = False) -> int:
    """``marun SETTINGS --dead [QUEUE] [--replay | --purge --yes] [--id ID ...] [--limit
    N] [--json]``: without ``queue``, each consumed queue's dead-letter count and broker;
    with it, list its letters (or replay or purge them). Exit 2 for settings that cannot
    be used or a queue they do not consume, 1 when a server cannot be reached."""
    logging.getLogger('microagent').addHandler(logging.NullHandler())  # errors: one line
    try:
        targets = dead_targets(modules)
    except SettingsError as exc:
        print(f'marun: error: {exc}', file=sys.stderr)
        return 2
    if not targets:
        print('marun: error: the agents of the settings consume no queue', file=sys.stderr)
        return 2
    chosen = [t for t in targets if queue is None or t.queue == queue]
    if not chosen:
        known = ', '.join(sorted({t.queue for t in targets}))
        print(f'marun: error: no agent of the settings consumes {queue!r}; the queues '
              f'are: {known}', file=sys.stderr)
        return 2
    try:
        if queue is None:
            return asyncio.run(_dead_overview(chosen))
        for target in chosen:
            asyncio.run(_dead_action(target, action, ids, limit, as_json))
    except (ConnectionError, QueueException, OSError) as exc:
        print(f'marun: error: {redact_dsn(str(exc))}', file=sys.stderr)
        return 1
    return 0


# =====================================================================================
# Fleet page: the live topology that ``marun --http`` serves at ``/``
# =====================================================================================
#
# One HTML document, its CSS and script inline (no request leaves the supervisor): the
# graph drawn by Graphviz as in ``--graph svg`` (or lists of agents and edges without
# it), brought to life by a script that reads ``/status`` and ``/readyz`` every
# PAGE_REFRESH milliseconds. Made once, the first time someone opens it.

PAGE_REFRESH = 800  # milliseconds between two reads of /status by the page

_FLEET_PAGE = r'''<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>marun: __TITLE__</title>
<meta name="viewport" content="width=device-width,initial-scale=1">
<link rel="icon" href="data:,">
<style>
body{font:13px Helvetica,Arial,sans-serif;margin:0;color:#0f172a;background:#f8fafc}
header{padding:8px 16px;background:#1e293b;color:#f8fafc;display:flex;gap:16px}
header b{margin-right:auto}.stale header{background:#b91c1c}
#ready{font-weight:bold}main{padding:8px 16px}
#graph svg{max-width:100%;height:auto;background:#fff;border:1px solid #cbd5e1}
.st{font-size:9px;fill:#0f172a}li .st{color:#334155;margin-left:8px}
.proc{display:inline-block;vertical-align:top;margin:8px 8px 0 0;padding:6px;
background:#fff;border:1px solid #cbd5e1;border-radius:6px}
table{border-collapse:collapse}td,th{padding:1px 6px;text-align:left;font-size:12px}
th{color:#475569;font-weight:normal}h3{margin:2px 0;font-size:14px}
.running{color:#15803d}.starting,.restarting,.stopping{color:#b45309}
.failed,.down{color:#b91c1c}.reasons{color:#b91c1c}
</style></head>
<body data-updated="">
<header><b>marun fleet: __TITLE__</b><span id="ready">…</span><span id="clock"></span></header>
<main><div id="graph">__GRAPH__</div><div id="reasons" class="reasons"></div>
<div id="procs"></div></main>
<script>
"use strict";
const NODES = __NODES__, REFRESH = __REFRESH__;
const FILL = {running: "#bbf7d0", starting: "#fde68a", restarting: "#fde68a",
  stopping: "#e2e8f0", stopped: "#e2e8f0", failed: "#fecaca"};
const WORST = ["failed", "restarting", "starting", "stopping", "stopped", "running"];
const SVG = "http://www.w3.org/2000/svg";
const els = {agent: {}, queue: {}, signal: {}}, svg = document.querySelector("#graph svg");
if (svg && svg.viewBox.baseVal) {  // room for the notes under the lowest nodes
  svg.viewBox.baseVal.height += 14; svg.removeAttribute("height");
}
for (const g of document.querySelectorAll("#graph g.node")) {
  const t = g.querySelector("title"), node = t && NODES[t.textContent];
  if (!node) continue;
  g.setAttribute("data-" + node[0], node[1]);
}
for (const kind of Object.keys(els))
  for (const el of document.querySelectorAll("[data-" + kind + "]"))
    els[kind][el.getAttribute("data-" + kind)] = el;
function note(el, text) {
  if (!el.st) {
    if (el instanceof SVGElement) {
      const box = el.getBBox();
      el.st = document.createElementNS(SVG, "text");
      el.st.setAttribute("x", box.x + box.width / 2);
      el.st.setAttribute("y", box.y + box.height + 9);
      el.st.setAttribute("text-anchor", "middle");
      el.appendChild(el.st);
    } else {
      el.st = document.createElement("span");
      el.appendChild(el.st);
    }
    el.st.setAttribute("class", "st");
  }
  el.st.textContent = text;
}
function set(el, attrs) {
  for (const [k, v] of Object.entries(attrs)) el.setAttribute("data-" + k, v == null ? "" : v);
}
const show = v => v == null ? "?" : String(v);
const until = t => t ? "in " + Math.max(0, Math.round(t - Date.now() / 1000)) + "s" : "-";
const age = t => t ? Math.max(0, Math.round(Date.now() / 1000 - t)) + "s ago" : "-";
function cell(row, text, cls) {
  const td = row.insertCell(); td.textContent = text == null ? "-" : text;
  if (cls) td.className = cls;
}
function make(tag, text) {
  const el = document.createElement(tag); el.textContent = text; return el;
}
function table(parent, head, rows) {
  if (!rows.length) return;
  const t = document.createElement("table"), h = t.createTHead().insertRow();
  for (const name of head) h.appendChild(make("th", name));
  for (const r of rows) { const row = t.insertRow(); for (const v of r) cell(row, v); }
  parent.appendChild(t);
}
function render(status, reasons) {
  const agents = {}, queues = {}, signals = {}, holders = {};
  for (const a of status.agents) {
    (agents[a.name] = agents[a.name] || []).push(a);
    for (const c of a.consumers) {
      const q = queues[c.queue] = queues[c.queue] ||
        {rate: 0, "in-flight": 0, depth: null, delayed: null, dead: null};
      q.rate += c.rate || 0; q["in-flight"] += c.in_flight;
      for (const k of ["depth", "delayed", "dead"])
        if (c[k] != null) q[k] = Math.max(q[k] || 0, c[k]);
    }
    for (const s of a.signals || []) {
      const g = signals[s.signal] = signals[s.signal] || {sent: 0, received: 0};
      g.sent += s.sent_rate; g.received = Math.max(g.received, s.received_rate);
    }
    for (const t of a.timers || []) if (t.singleton && t.last_run &&
        (!holders[t.singleton] || holders[t.singleton][0] < t.last_run))
      holders[t.singleton] = [t.last_run, a.name + "[" + a.replica + "]"];
  }
  for (const [name, el] of Object.entries(els.agent)) {
    const list = agents[name] || [];
    const states = list.map(a => a.state);
    const state = WORST.find(s => states.includes(s)) || "stopped";
    const up = states.filter(s => s === "running").length;
    set(el, {state: state, "replicas-up": up, replicas: list.length});
    note(el, state + " " + up + "/" + list.length);
    const shape = el.querySelector("path,polygon");
    if (shape) shape.setAttribute("fill", FILL[state] || "#fff");
  }
  for (const [name, el] of Object.entries(els.queue)) {
    const q = queues[name] || {rate: 0, "in-flight": 0};
    q.rate = Math.round(q.rate * 100) / 100;
    set(el, q);
    note(el, "depth " + show(q.depth) + " · in flight " + q["in-flight"] + " · " + q.rate +
      "/s · delayed " + show(q.delayed) + " · dead " + show(q.dead));
  }
  for (const [name, el] of Object.entries(els.signal)) {
    const g = signals[name] || {sent: 0, received: 0};
    const rate = Math.round((g.sent || g.received) * 100) / 100;
    set(el, {rate: rate}); note(el, rate + "/s");
  }
  const procs = document.getElementById("procs"); procs.textContent = "";
  for (const a of status.agents) {
    const box = document.createElement("div"); box.className = "proc";
    box.setAttribute("data-process", a.name + "[" + a.replica + "]");
    box.appendChild(make("h3", a.name + "[" + a.replica + "]"));
    const t = document.createElement("table"), row = t.insertRow();
    cell(row, "pid " + show(a.pid)); cell(row, a.state, a.state);
    cell(row, "up " + (a.uptime == null ? "-" : Math.round(a.uptime) + "s"));
    cell(row, "restarts " + a.restarts);
    box.appendChild(t);
    table(box, ["connection", "", "since", "last error"], (a.connections || []).map(c =>
      [c.transport + " " + c.name, c.connected ? "up" : "down", age(c.since), c.last_error]));
    table(box, ["queue", "handled", "retried", "dead-lettered", "in flight", "depth",
      "delayed", "dead", "rate/s", "last fetch"], a.consumers.map(c => [c.queue, c.handled,
      c.retried, c.dead_lettered, c.in_flight, show(c.depth), show(c.delayed), show(c.dead),
      c.rate, c.last_fetch_age == null ? "-" : c.last_fetch_age.toFixed(1) + "s"]));
    table(box, ["timer", "last run", "next run", "last error", "singleton holder"],
      (a.timers || []).map(t => [t.kind + " " + t.name, age(t.last_run), until(t.next_run),
        t.last_error, t.singleton ? (holders[t.singleton] || [0, "?"])[1] : ""]));
    table(box, ["server", "singleton", "holds"],
      (a.servers || []).map(s => [s.name, s.singleton, s.holds ? "yes" : "no"]));
    procs.appendChild(box);
  }
  const ready = document.getElementById("ready");
  ready.textContent = reasons.length ? "not ready" : "ready";
  ready.className = reasons.length ? "failed" : "running";
  const list = document.getElementById("reasons"); list.textContent = "";
  for (const r of reasons) list.appendChild(make("div", r));
}
async function read(path) {
  const response = await fetch(path, {cache: "no-store", signal: AbortSignal.timeout(REFRESH * 2)});
  if (path === "/status" && !response.ok) throw new Error(path + ": " + response.status);
  return response.json();
}
async function refresh() {
  try {
    const [status, ready] = await Promise.all([read("/status"), read("/readyz")]);
    render(status, ready.reasons || []);
    document.body.classList.remove("stale");
    document.body.setAttribute("data-stale", "false");
    document.body.setAttribute("data-updated", (Date.now() / 1000).toFixed(3));
    document.getElementById("clock").textContent = new Date().toLocaleTimeString();
  } catch (err) {
    document.body.classList.add("stale");
    document.body.setAttribute("data-stale", "true");
    document.getElementById("ready").textContent = "stale: the supervisor does not answer";
  }
  setTimeout(refresh, REFRESH);
}
refresh();
</script></body></html>
'''


def fleet_page(modules: list[str]) -> bytes:
    """The HTML of ``marun --http``'s ``GET /`` for the settings ``modules``: their
    topology drawn by Graphviz (as lists of agents and edges when Graphviz is missing)
    and the script that keeps it up to date from ``/status``."""
    import html
    import json
    topology = build_graph(*modules)
    ids = _node_ids(topology)
    try:
        svg = topology.render('svg').decode()
        graph = svg[svg.index('<svg'):]
    except (GraphRenderError, ImportError) as exc:
        graph_log.info('The fleet page shows the topology as lists: %s', exc)
        graph = _topology_lists(topology)
    nodes = {node_id: key.split(':', 1) for key, node_id in ids.items()}
    title = html.escape(' '.join(modules))
    return (_FLEET_PAGE.replace('__TITLE__', title).replace('__GRAPH__', graph)
            .replace('__NODES__', json.dumps(nodes).replace('</', '<\\/'))
            .replace('__REFRESH__', str(PAGE_REFRESH)).encode())


def _topology_lists(topology: Topology) -> str:
    """The topology as HTML lists (agents with their edges, queues, signals)."""
    import html

    def item(kind: str, name: str, edges: str = '') -> str:
        quoted = html.escape(name, quote=True)
        return f'<li data-{kind}="{quoted}"><b>{quoted}</b>{edges}</li>'

    def edges(agent: AgentNode) -> str:
        me = f'agent:{agent.name}'
        lines = [f'{edge.kind} {edge.target if edge.source == me else edge.source}'
                 for edge in agent.edges()]
        return '<ul>' + ''.join(f'<li>{html.escape(line)}</li>' for line in lines) + '</ul>'

    return ''.join([
        '<h3>Agents</h3><ul>', *(item('agent', a.name, edges(a)) for a in topology.agents),
        '</ul><h3>Queues</h3><ul>', *(item('queue', name) for name in topology.queues),
        '</ul><h3>Signals</h3><ul>', *(item('signal', name) for name in topology.signals),
        '</ul>'])


# =====================================================================================
# Command line: marun
# =====================================================================================

def main(argv: list[str] | None = None) -> int:
    """``marun``: run the agents of settings modules (see :class:`AgentsManager`)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog='marun', description='Run a group of microagents, each in its own process.')
    parser.add_argument('modules', metavar='MODULE', nargs='+',
                        help='settings module with BUS, BROKER and AGENT dicts')
    parser.add_argument('--grace', type=float, default=DEFAULT_GRACE,
                        help='seconds in-flight work may take to finish at stop '
                             f'(default {DEFAULT_GRACE:g})')
    parser.add_argument('--restart', choices=RESTART_POLICIES, default='no',
                        help="when an agent process ends by itself: 'no' stops the group "
                             "(default), 'on-failure' starts it again after a failure, "
                             "'always' after any end; an AGENT entry's 'restart' overrides it")
    parser.add_argument('--http', metavar='HOST:PORT', type=_http_address,
                        help='serve the fleet page (/), /livez, /readyz, /status and '
                             '/metrics (Prometheus) on HOST:PORT; no authentication: bind '
                             '127.0.0.1 or a private interface')
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument('--graph', choices=GRAPH_FORMATS, metavar='FORMAT',
                      help='write the topology graph of the modules instead of running them '
                           f'({", ".join(GRAPH_FORMATS)}); nothing is connected')
    mode.add_argument('--check', action='store_true',
                      help='check the topology of the modules instead of running them: one '
                           'line per finding; exit 1 on an error')
    mode.add_argument('--dead', nargs='?', const='', metavar='QUEUE',
                      help='dead letters instead of running the agents: alone, each '
                           "consumed queue's dead-letter count; with QUEUE, its letters "
                           '(or --replay, --purge --yes); nothing is started')
    dead_action = parser.add_mutually_exclusive_group()
    dead_action.add_argument('--replay', action='store_true',
                        help='with --dead QUEUE: send the dead letters back to the queue')
    dead_action.add_argument('--purge', action='store_true',
                        help='with --dead QUEUE and --yes: remove the dead letters')
    parser.add_argument('--yes', action='store_true', help='confirm --purge')
    parser.add_argument('--id', dest='ids', action='append', metavar='ID',
                        help='with --replay or --purge: only this letter (repeatable)')
    parser.add_argument('--limit', type=int, metavar='N',
                        help='with --dead QUEUE: list (default 100) or replay at most N')
    parser.add_argument('--json', action='store_true',
                        help='with --dead QUEUE: one JSON object a line')
    parser.add_argument('-o', '--output', metavar='FILE',
                        help='with --graph: write to FILE instead of standard output')
    parser.add_argument('--against', metavar='FILE',
                        help='with --check: also report each change that breaks the '
                             'contract FILE, an earlier --graph asyncapi output')
    args = parser.parse_args(argv)
    if args.output and not args.graph:
        parser.error('-o/--output goes with --graph')
    if args.against and not args.check:
        parser.error('--against goes with --check')
    if args.against and not os.path.isfile(args.against):
        parser.error(f'--against {args.against}: no such file')
    if (args.graph or args.check) and (args.http or args.restart != 'no'):
        parser.error('--http and --restart go with running agents, not --graph or --check')
    _check_dead_arguments(parser, args)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if args.graph:
        return graph_command(args.modules, args.graph, args.output)
    if args.check:
        return check_command(args.modules, args.against)
    if args.dead is not None:
        action = 'replay' if args.replay else 'purge' if args.purge else None
        return dead_command(args.modules, args.dead or None, action, ids=args.ids,
                            limit=args.limit, as_json=args.json)
    _configure_logging()
    try:
        configs = [cfg for module in args.modules for cfg in load_configuration(module)]
        for module in args.modules:
            check_transports(module)
    except SettingsError as exc:
        print(f'marun: error: {exc}', file=sys.stderr)
        return 2
    duplicates = sorted({n for n, _ in configs if [m for m, _ in configs].count(n) > 1})
    if duplicates:
        print(f'marun: error: agent names used twice: {", ".join(duplicates)}', file=sys.stderr)
        return 2
    try:
        manager = AgentsManager(configs, grace=args.grace, modules=args.modules,
                                restart=args.restart)
    except SettingsError as exc:
        print(f'marun: error: {exc}', file=sys.stderr)
        return 2
    if args.http:
        host, port = args.http
        try:
            manager.listen(host, port, functools.partial(fleet_page, args.modules))
        except (ImportError, OSError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            print(f'marun: error: --http {host}:{port}: {why}', file=sys.stderr)
            return 2
    return manager.start()


def _check_dead_arguments(parser: Any, args: Any) -> None:
    """The options of ``--dead`` go together as documented (else exit 2)."""
    dead = args.dead
    if dead is None:
        if args.replay or args.purge or args.yes or args.ids or args.limit is not None \
                or args.json:
            parser.error('--replay, --purge, --yes, --id, --limit and --json go with --dead')
        return
    if args.http or args.restart != 'no':
        parser.error('--http and --restart go with running agents, not --dead')
    if not dead and (args.replay or args.purge or args.ids or args.limit is not None
                     or args.json):
        parser.error('--replay, --purge, --id, --limit and --json need --dead QUEUE')
    if args.purge and not args.yes:
        parser.error('--purge removes dead letters for good: add --yes to confirm')
    if args.yes and not args.purge:
        parser.error('--yes goes with --purge')
    if args.ids and not (args.replay or args.purge):
        parser.error('--id goes with --replay or --purge')
    if args.json and (args.replay or args.purge):
        parser.error('--json goes with listing, not --replay or --purge')
    if args.limit is not None and (args.limit < 0 or args.purge):
        parser.error('--limit takes N >= 0, with listing or --replay')


def _importing_the_main_module_of_a_child() -> bool:
    """True while a process that ``marun`` spawned imports the parent's main module (a
    wrapper script that calls :func:`run` without an ``if __name__ == '__main__'``
    guard): then there is nothing to run, the child runs its agents afterwards."""
    import multiprocessing
    return bool(getattr(multiprocessing.current_process(), '_inheriting', False))


def run() -> None:
    """Console entry point of ``marun``; ``python -m microagent`` and a script calling
    ``microagent.run()`` (with or without a ``__main__`` guard) work the same."""
    if _importing_the_main_module_of_a_child():
        return
    sys.exit(main())


if __name__ == '__main__':  # pragma: no cover - tested through python -m microagent
    # ``python -m microagent`` runs this file as ``__main__``; the agents of the settings
    # import it again as ``microagent``. Run that module, so that the launcher and the
    # agents share one MicroAgent class (and the processes it spawns find ``run_group``).
    import microagent
    microagent.run()
