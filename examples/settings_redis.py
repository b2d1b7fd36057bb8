"""Launcher settings of the examples on a real Redis: ``marun examples.settings_redis``.

Each agent runs in its own process; the bus and the queues are on Redis
(``MICROAGENT_REDIS_DSN``, default ``redis://127.0.0.1:6379/7``).
"""
import logging
import os
import sys

logging.basicConfig(
    format='%(asctime)s %(levelname)-7s [pid#%(process)d] %(name)s: %(message)s',
    stream=sys.stdout, level=logging.INFO)

REDIS_DSN = os.environ.get('MICROAGENT_REDIS_DSN', 'redis://127.0.0.1:6379/7')

BUS = {
    'redis': {
        'backend': 'microagent_backends.RedisSignalBus',
        'dsn': REDIS_DSN,
        'prefix': 'EXAMPLES',
    },
}

BROKER = {
    'redis': {
        'backend': 'microagent_backends.RedisBroker',
        'dsn': REDIS_DSN,
    },
}

AGENT = {
    'user_agent': {
        'backend': 'examples.user_agent.UserAgent',
        'bus': 'redis',
        'broker': 'redis',
    },
    'comment_agent': {
        'backend': 'examples.comment_agent.CommentAgent',
        'bus': 'redis',
        'broker': 'redis',
    },
    'email_agent': {
        'backend': 'examples.email_agent.EmailAgent',
        'broker': 'redis',
    },
}
