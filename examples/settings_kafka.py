"""Launcher settings of the examples with the queues on Kafka and the signal bus on
Redis: ``marun examples.settings_kafka``.

``MICROAGENT_KAFKA_DSN`` (default ``kafka://127.0.0.1:9092``) and
``MICROAGENT_REDIS_DSN`` (default ``redis://127.0.0.1:6379/7``). Each agent runs in its
own process; the email agent starts consuming once its consumer group is formed (a few
seconds).
"""
import logging
import os
import sys

logging.basicConfig(
    format='%(asctime)s %(levelname)-7s [pid#%(process)d] %(name)s: %(message)s',
    stream=sys.stdout, level=logging.INFO)

KAFKA_DSN = os.environ.get('MICROAGENT_KAFKA_DSN', 'kafka://127.0.0.1:9092')
REDIS_DSN = os.environ.get('MICROAGENT_REDIS_DSN', 'redis://127.0.0.1:6379/7')

BUS = {
    'redis': {
        'backend': 'microagent_backends.RedisSignalBus',
        'dsn': REDIS_DSN,
        'prefix': 'EXAMPLES',
    },
}

BROKER = {
    'kafka': {
        'backend': 'microagent_backends.KafkaBroker',
        'dsn': KAFKA_DSN,
    },
}

AGENT = {
    'user_agent': {
        'backend': 'examples.user_agent.UserAgent',
        'bus': 'redis',
        'broker': 'kafka',
    },
    'comment_agent': {
        'backend': 'examples.comment_agent.CommentAgent',
        'bus': 'redis',
        'broker': 'kafka',
    },
    'email_agent': {
        'backend': 'examples.email_agent.EmailAgent',
        'broker': 'kafka',
    },
}
