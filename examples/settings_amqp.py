"""Launcher settings of the examples with the queues on RabbitMQ and the signal bus on
Redis: ``marun examples.settings_amqp``.

``MICROAGENT_AMQP_DSN`` (default ``amqp://guest:guest@127.0.0.1:5672/``) and
``MICROAGENT_REDIS_DSN`` (default ``redis://127.0.0.1:6379/7``). Each agent runs in its
own process.
"""
import logging
import os
import sys

logging.basicConfig(
    format='%(asctime)s %(levelname)-7s [pid#%(process)d] %(name)s: %(message)s',
    stream=sys.stdout, level=logging.INFO)

AMQP_DSN = os.environ.get('MICROAGENT_AMQP_DSN', 'amqp://guest:guest@127.0.0.1:5672/')
REDIS_DSN = os.environ.get('MICROAGENT_REDIS_DSN', 'redis://127.0.0.1:6379/7')

BUS = {
    'redis': {
        'backend': 'microagent_backends.RedisSignalBus',
        'dsn': REDIS_DSN,
        'prefix': 'EXAMPLES',
    },
}

BROKER = {
    'amqp': {
        'backend': 'microagent_backends.AMQPBroker',
        'dsn': AMQP_DSN,
    },
}

AGENT = {
    'user_agent': {
        'backend': 'examples.user_agent.UserAgent',
        'bus': 'redis',
        'broker': 'amqp',
    },
    'comment_agent': {
        'backend': 'examples.comment_agent.CommentAgent',
        'bus': 'redis',
        'broker': 'amqp',
    },
    'email_agent': {
        'backend': 'examples.email_agent.EmailAgent',
        'broker': 'amqp',
    },
}
