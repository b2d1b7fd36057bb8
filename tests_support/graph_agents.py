"""Agents of the graph tests: each shows one way an agent sends, calls or produces."""
from __future__ import annotations

from typing import Any

from microagent import MicroAgent, Queue, Signal, consumer, cron, on, periodic, receiver

notice = Signal('graph_notice', ['text'])
alias_sent = Signal('graph_alias_sent', [])
bound_sent = Signal('graph_bound_sent', [])
walrus_sent = Signal('graph_walrus_sent', [])
deferred_sent = Signal('graph_deferred_sent', [])
walrus_called = Signal('graph_walrus_called', [])
mixin_sent = Signal('graph_mixin_sent', [])
rpc_called = Signal('graph_rpc_called', [])
rpc_waited = Signal('graph_rpc_waited', [])
dynamic = Signal('graph_dynamic', [])
jobs = Queue('graph_jobs')
orders = Queue('graph.orders-v2')
batch = Queue('graph_batch')


class NotifierBase(MicroAgent):
    """Sends from a helper method that no decorator marks."""

    @receiver(notice)
    async def on_notice(self, text: str, **kwargs: Any) -> None:
        pass

    async def _notify(self, text: str) -> None:
        await self.bus.graph_notice.send('notifier', text=text)  # type: ignore[union-attr]


class InheritingAgent(NotifierBase):
    """Adds a timer; what it sends is in its base class."""

    @periodic(period=30, timeout=5)
    async def tick(self) -> None:
        await self._notify('tick')


class AliasAgent(MicroAgent):
    """Reaches the bus and the broker through local names."""

    async def work(self) -> None:
        bus, broker = self.bus, self.broker
        await bus.graph_alias_sent.send('alias')  # type: ignore[union-attr]
        signal = bus.graph_bound_sent  # type: ignore[union-attr]
        await signal.send('alias')
        queue = getattr(broker, 'graph.orders-v2')
        await queue.send({'id': 1})
        await broker.graph_batch.send_many([{'id': 1}])  # type: ignore[union-attr]

        def later() -> Any:
            if (walrus := self.bus.graph_walrus_sent) is not None:  # type: ignore[union-attr]
                return walrus.send('alias')
            return (_called := self.bus.graph_walrus_called).call('alias')  # type: ignore[union-attr]
        await later()

    async def deferred(self) -> None:
        if self.settings:
            transport = self.bus  # assigned deeper than the alias made of it below
        signal = transport.graph_deferred_sent  # type: ignore[union-attr]
        await signal.send('alias')

    async def not_edges(self) -> None:
        """self.bus.graph_in_docstring.send('x') is text, not code."""
        await self.bus.send('channel', b'{}')  # type: ignore[union-attr]
        await self.broker.graph_jobs.length()  # type: ignore[union-attr]
        await self.settings['other'].graph_elsewhere.send('x')

    @on('server')
    async def serve(self) -> None:
        pass

    @cron('0 4 * * *', tz='Europe/Paris')
    async def nightly(self) -> None:
        pass


class AnnouncingMixin:
    """Not an agent: a mixin whose method agents run."""

    bus: Any

    async def announce(self) -> None:
        await self.bus.graph_mixin_sent.send('mixin')


class RpcAgent(MicroAgent):
    """Calls with ``call`` and with ``waiter``."""

    async def ask(self) -> None:
        await self.bus.graph_rpc_called.call('rpc', timeout=1)  # type: ignore[union-attr]
        async with self.bus.graph_rpc_waited.waiter('rpc', timeout=1) as answers:  # type: ignore[union-attr]
            async for _ in answers:
                pass


class DeclaredAgent(MicroAgent):
    """Sends to a name computed at run time: declared in ``topology``."""

    topology = {'sends': ['graph_dynamic'], 'produces': [jobs]}

    async def relay(self, name: str) -> None:
        await getattr(self.bus, name).send('declared')


class DeclaredChild(DeclaredAgent):
    """Its own ``topology`` adds to its base's."""

    topology = {'calls': ['graph_rpc_called']}


class JobsWorker(MicroAgent):
    """Consumes what DeclaredAgent produces."""

    @consumer(jobs)
    async def work(self, **kwargs: Any) -> None:
        pass
