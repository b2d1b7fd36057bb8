"""Launcher settings naming an agent whose module fails at import (undeclared signal)."""
BUS = {'memory': {'backend': 'microagent.MemorySignalBus', 'dsn': 'memory://graph-bad'}}
AGENT = {'misspelt': {'backend': 'tests_support.graph_bad_receiver_agent.Misspelt',
                      'bus': 'memory'}}
