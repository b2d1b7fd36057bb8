"""Launcher settings of the fleet tests on memory: a Ticker; with FLEET_BROKEN set, a
BrokenAtStart agent too (its restart policy FLEET_RESTART when given, else marun's)."""
import os

BUS = {'main': {'backend': 'microagent.MemorySignalBus', 'dsn': 'memory://fleet'}}
AGENT = {
    'ticker': {'backend': 'tests_support.fleet_agents.Ticker', 'bus': 'main'},
}
if os.environ.get('FLEET_BROKEN'):
    AGENT['broken'] = {'backend': 'tests_support.fleet_agents.BrokenAtStart'}
    if os.environ.get('FLEET_RESTART'):
        AGENT['broken']['restart'] = os.environ['FLEET_RESTART']
