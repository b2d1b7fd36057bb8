"""Launcher settings of the fleet page tests on Redis: a Worker of FLEET_QUEUE (two
replicas, restarted on failure) and a Ticker sending and calling ``fleet_tick`` every
0.2 s, on a bus and broker at FLEET_REDIS_DSN (bus prefix FLEET_PREFIX); the broker
is RedisBroker, or the class FLEET_PAGE_BROKER of this module when that is set."""
import os

import microagent_backends


class SpeechlessRedisBroker(microagent_backends.RedisBroker):
    """A Redis broker that cannot say its counts: the length fails, the others are not
    implemented (``/status`` then gives null)."""

    async def queue_length(self, name: str) -> int:
        raise ConnectionError('the length is unknown, on purpose')

    async def waiting(self, name: str) -> int:
        return 0

    async def dead_count(self, queue: str) -> int:
        raise NotImplementedError

    async def delayed_count(self, queue: str) -> int:
        raise NotImplementedError


DSN = os.environ['FLEET_REDIS_DSN']
BUS = {
    'redis': {'backend': 'microagent_backends.RedisSignalBus', 'dsn': DSN,
              'prefix': os.environ.get('FLEET_PREFIX', 'FLEETPAGE')},
}
BROKER = {
    'redis': {'backend': ('tests_support.fleet_page_settings.' + os.environ['FLEET_PAGE_BROKER']
                          if 'FLEET_PAGE_BROKER' in os.environ
                          else 'microagent_backends.RedisBroker'),
              'dsn': DSN, 'VISIBILITY_TIMEOUT': 2, 'WAIT_TIME': 0.5},
}
AGENT = {
    'worker': {'backend': 'tests_support.fleet_agents.Worker', 'broker': 'redis',
               'replicas': int(os.environ.get('FLEET_REPLICAS', '2')),
               'restart': 'on-failure'},
    'ticker': {'backend': 'tests_support.fleet_agents.Ticker', 'bus': 'redis',
               'restart': 'on-failure'},
}
