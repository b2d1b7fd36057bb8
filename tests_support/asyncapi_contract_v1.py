"""The first version of a fleet whose AsyncAPI contract the ``--against`` tests keep
(agents and launcher settings in one module). ``asyncapi_contract_breaking`` breaks it
in every way ``marun --check --against`` reports; ``asyncapi_contract_additive`` only
adds to it. The three declare the same names differently: import each in its own
process (the tests run ``marun``)."""
from __future__ import annotations

import dataclasses
from typing import Any

import msgspec

from microagent import MicroAgent, Queue, Signal, consumer, receiver

order_placed = Signal('order_placed', ['order_id', 'total', 'note'],
                      type_map={'order_id': int, 'total': float})
stock_level = Signal('stock_level', ['sku'], type_map={'sku': str})
obsolete = Signal('obsolete', [])
orders = Queue('orders')
invoices = Queue('invoices')
legacy = Queue('legacy')


class Address(msgspec.Struct):
    city: str


class Order(msgspec.Struct):
    order_id: int
    shipping: Address
    note: str = ''


@dataclasses.dataclass
class Invoice:
    order_id: int
    amount: float


class Shop(MicroAgent):
    async def place(self) -> None:
        await self.bus.stock_level.call('shop', sku='x')  # type: ignore[union-attr]
        await self.bus.order_placed.send(  # type: ignore[union-attr]
            'shop', order_id=1, total=2.5, note='')
        await self.bus.obsolete.send('shop')  # type: ignore[union-attr]
        await self.broker.orders.send({'order_id': 1})  # type: ignore[union-attr]
        await self.broker.invoices.send({'order_id': 1})  # type: ignore[union-attr]
        await self.broker.legacy.send({})  # type: ignore[union-attr]


class Warehouse(MicroAgent):
    @receiver(order_placed, obsolete)
    def placed(self, **kwargs: Any) -> None:
        pass

    @receiver(stock_level)
    def stock(self, **kwargs: Any) -> int:
        return 1

    @consumer(orders, dto_class=Order)
    def prepare(self, **kwargs: Any) -> None:
        pass


class Billing(MicroAgent):
    @consumer(invoices, dto_class=Invoice)
    def bill(self, **kwargs: Any) -> None:
        pass

    @consumer(legacy)
    def archive(self, **kwargs: Any) -> None:
        pass


BUS = {'main': {'backend': 'microagent.MemorySignalBus', 'dsn': 'memory://contract',
                'prefix': 'SHOP'}}
BROKER = {'main': {'backend': 'microagent.MemoryBroker', 'dsn': 'memory://contract'}}
AGENT = {
    'shop': {'backend': f'{__name__}.Shop', 'bus': 'main', 'broker': 'main'},
    'warehouse': {'backend': f'{__name__}.Warehouse', 'bus': 'main', 'broker': 'main'},
    'billing': {'backend': f'{__name__}.Billing', 'broker': 'main'},
}
