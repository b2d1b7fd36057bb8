"""Launcher settings whose agent names need quoting in every graph format."""
BUS = {'memory': {'backend': 'microagent.MemorySignalBus',
                   'dsn': 'memory://user:s3cret@graph-names'}}  # never shown in a graph
BROKER = {'memory': {'backend': 'microagent.MemoryBroker', 'dsn': 'memory://graph-names'}}
AGENT = {
    'billing.v2-eu': {
        'backend': 'tests_support.graph_names_agents.Émetteur',
        'bus': 'memory', 'broker': 'memory',
    },
    'агент "ß" <b>&#35;</b> \'q\'': {
        'backend': 'tests_support.graph_names_agents.Récepteur',
        'bus': 'memory', 'broker': 'memory',
    },
}
