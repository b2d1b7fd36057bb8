"""Launcher settings whose agent declares a wrong ``topology`` attribute."""
from microagent import MicroAgent


class Wrong(MicroAgent):
    topology = {'send': ['graph_notice']}


AGENT = {'wrong': {'backend': 'tests_support.graph_bad_topology_settings.Wrong'}}
