"""Launcher settings of the examples, on the in-memory backends: ``marun examples.settings``.

The three agents share the ``memory://examples`` bus and broker, so ``marun`` runs them
in one process. ``settings_redis`` and ``settings_amqp`` run them on real servers, each
agent in its own process.
"""
import logging
import sys

logging.basicConfig(
    format='%(asctime)s %(levelname)-7s [pid#%(process)d] %(name)s: %(message)s',
    stream=sys.stdout, level=logging.INFO)

BUS = {
    'memory': {
        'backend': 'microagent.MemorySignalBus',
        'dsn': 'memory://examples',
        'prefix': 'EXAMPLES',
    },
}

BROKER = {
    'memory': {
        'backend': 'microagent.MemoryBroker',
        'dsn': 'memory://examples',
    },
}

AGENT = {
    'user_agent': {
        'backend': 'examples.user_agent.UserAgent',
        'bus': 'memory',
        'broker': 'memory',
    },
    'comment_agent': {
        'backend': 'examples.comment_agent.CommentAgent',
        'bus': 'memory',
        'broker': 'memory',
    },
    'email_agent': {
        'backend': 'examples.email_agent.EmailAgent',
        'broker': 'memory',
    },
}
