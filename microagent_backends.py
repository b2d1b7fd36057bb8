"""Backends of microagent: the Redis signal bus and broker, the AMQP (RabbitMQ) broker
and the Kafka broker.

Each client library is imported when its backend is first constructed, so a machine
with only one of them installed can use that backend; using another raises an
ImportError that names the pip extra to install (``pip install 'microagent[redis]'``).

Sections: shared helpers, Redis signal bus, Redis broker, AMQP broker, Kafka broker.
"""
from __future__ import annotations

import importlib
import random
from collections.abc import Iterator
from typing import Any

__all__ = ['AMQPBroker', 'KafkaBroker', 'RedisBroker', 'RedisSignalBus']


# =====================================================================================
# Shared helpers
# =====================================================================================

def require(module: str, extra: str) -> Any:
    """Import a client library, or raise an ImportError that names the pip extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f'this backend needs the {module.split(".")[0]} package: '
            f"pip install 'microagent[{extra}]'") from exc


def reconnect_delays(first: float = 0.1, cap: float = 5.0) -> Iterator[float]:
    """Delays between reconnection attempts: doubling from ``first`` up to ``cap``, with
    jitter so that many clients do not reconnect in step; endless."""
    delay = first
    while True:
        yield delay * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not security
        delay = min(delay * 2, cap)
