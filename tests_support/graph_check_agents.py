"""Agents with every problem ``marun --check`` reports."""
from __future__ import annotations

from typing import Any

from microagent import MicroAgent, Queue, Signal, consumer, receiver

Signal('graph_chk_lonely', [])  # sent, never received
Signal('graph_chk_unsent', [])  # received, never sent
Signal('graph_chk_paired', [])  # sent and received: no finding
Queue('graph_chk_outbox')  # produced, never consumed
INBOX = Queue('graph_chk_inbox')  # consumed, never produced
INBOX_DEAD_LETTERS = INBOX.dead_letter
Queue('graph_chk_shared')  # consumed by two classes


class Sender(MicroAgent):
    async def go(self) -> None:
        bus, broker = self.bus, self.broker
        await bus.graph_chk_lonely.send('sender')  # type: ignore[union-attr]
        await bus.graph_chk_paired.send('sender')  # type: ignore[union-attr]
        await bus.graph_chk_typo.send('sender')  # type: ignore[union-attr]
        await bus.graph_chk_missing_rpc.call('sender')  # type: ignore[union-attr]
        await broker.graph_chk_outbox.send({})  # type: ignore[union-attr]
        await broker.graph_chk_shared.send({})  # type: ignore[union-attr]
        await broker.graph_chk_nowhere.send({})  # type: ignore[union-attr]


class Receiver(MicroAgent):
    @receiver('graph_chk_unsent', 'graph_chk_paired')
    async def on_signal(self, **kwargs: Any) -> None:
        pass

    @consumer('graph_chk_inbox')
    async def on_inbox(self, **kwargs: Any) -> None:
        pass

    @consumer('graph_chk_inbox.dead')
    async def on_dead_letters(self, **kwargs: Any) -> None:
        """Dead letters are produced by the broker: no finding."""


class SharedA(MicroAgent):
    @consumer('graph_chk_shared')
    async def work(self, **kwargs: Any) -> None:
        pass


class SharedB(MicroAgent):
    @consumer('graph_chk_shared')
    async def work(self, **kwargs: Any) -> None:
        pass


# A class whose source cannot be read (made from a string): a warning.
exec(compile('''
class Generated(MicroAgent):
    async def go(self):
        await self.bus.graph_chk_lonely.send('generated')
''', '<generated>', 'exec'))
