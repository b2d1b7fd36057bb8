"""Agents whose names need quoting in every graph format (dots, dashes, unicode, quotes)."""
from __future__ import annotations

from typing import Any

from microagent import MicroAgent, Queue, Signal, consumer, receiver

Signal('graph_names_signal', [])
Queue('graph.eu-1')
Queue('graph-eu.1')
Queue('graph:orders.v2-eu')


class Émetteur(MicroAgent):  # noqa: PLC2401 - a name that needs quoting
    """Sends a declared signal and, declared by hand, names no diagram can take raw."""

    topology = {'sends': ['we"ird<sig>#1&amp;`x`'], 'produces': ['back\\slash\\l']}

    async def emit(self) -> None:
        await self.bus.graph_names_signal.send('émetteur')  # type: ignore[union-attr]
        await getattr(self.broker, 'graph.eu-1').send({})
        await getattr(self.broker, 'graph-eu.1').send({})


class Récepteur(MicroAgent):  # noqa: PLC2401 - a name that needs quoting
    @receiver('graph_names_signal')
    async def on_signal(self, **kwargs: Any) -> None:
        pass

    @consumer('graph:orders.v2-eu')
    async def on_order(self, **kwargs: Any) -> None:
        pass
