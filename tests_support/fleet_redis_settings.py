"""Launcher settings of the fleet tests on Redis: a Worker of FLEET_QUEUE (see
fleet_agents) with FLEET_REPLICAS replicas and FLEET_RESTART as its policy, on a
RedisBroker at FLEET_REDIS_DSN (a fault proxy's, in the connection tests), or on
FLEET_BROKER with STALL_TIMEOUT=FLEET_STALL_TIMEOUT."""
import os

BROKER = {
    'redis': {'backend': os.environ.get('FLEET_BROKER', 'microagent_backends.RedisBroker'),
              'dsn': os.environ['FLEET_REDIS_DSN'], 'VISIBILITY_TIMEOUT': 2,
              'COMMAND_TIMEOUT': 1, 'WAIT_TIME': 0.5, 'FETCH_LIMIT': 100,
              'STALL_TIMEOUT': float(os.environ.get('FLEET_STALL_TIMEOUT', '60'))},
}
AGENT = {
    'worker': {'backend': 'tests_support.fleet_agents.Worker', 'broker': 'redis',
               'replicas': int(os.environ.get('FLEET_REPLICAS', '1')),
               'restart': os.environ.get('FLEET_RESTART', 'no')},
}
