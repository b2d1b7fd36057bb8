"""Launcher settings of the fleet tests on memory: a Ticker; with FLEET_BROKEN set, a
BrokenAtStart agent too (its restart policy FLEET_RESTART when given, else marun's).
With FLEET_SLOW_TICKER=SECONDS, the ticker's process takes that long to load these
settings (a group stop then reaches it before its agent started)."""
import multiprocessing
import os
import time

if os.environ.get('FLEET_SLOW_TICKER') and multiprocessing.current_process().name == 'ticker':
    time.sleep(float(os.environ['FLEET_SLOW_TICKER']))

BUS = {'main': {'backend': 'microagent.MemorySignalBus', 'dsn': 'memory://fleet'}}
AGENT = {
    'ticker': {'backend': 'tests_support.fleet_agents.Ticker', 'bus': 'main'},
}
if os.environ.get('FLEET_BROKEN'):
    AGENT['broken'] = {'backend': 'tests_support.fleet_agents.BrokenAtStart'}
    if os.environ.get('FLEET_RESTART'):
        AGENT['broken']['restart'] = os.environ['FLEET_RESTART']
