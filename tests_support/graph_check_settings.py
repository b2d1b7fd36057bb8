"""Launcher settings with every problem ``marun --check`` reports (see graph_check_agents)."""
BUS = {'memory': {'backend': 'microagent.MemorySignalBus', 'dsn': 'memory://graph-check'}}
BROKER = {'memory': {'backend': 'microagent.MemoryBroker', 'dsn': 'memory://graph-check'}}
AGENT = {
    'sender': {'backend': 'tests_support.graph_check_agents.Sender',
               'bus': 'memory', 'broker': 'memory'},
    'receiver': {'backend': 'tests_support.graph_check_agents.Receiver',
                 'bus': 'memory', 'broker': 'memory'},
    'shared_a': {'backend': 'tests_support.graph_check_agents.SharedA', 'broker': 'memory'},
    'shared_a_replica': {'backend': 'tests_support.graph_check_agents.SharedA',
                         'broker': 'memory'},
    'shared_b': {'backend': 'tests_support.graph_check_agents.SharedB', 'broker': 'memory'},
    'generated': {'backend': 'tests_support.graph_check_agents.Generated', 'bus': 'memory'},
}
