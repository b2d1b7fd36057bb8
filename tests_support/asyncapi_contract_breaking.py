"""``asyncapi_contract_v1`` broken in each way ``marun --check --against`` reports: a
signal (``obsolete``) and a queue (``legacy``) removed, a signal argument removed
(``order_placed.note``) and one retyped (``order_placed.total``), a consumer's payload
requiring a new property (``customer``, and ``shipping.country`` inside a nested
object) and retyping one (``invoices.amount``), an RPC signal (``stock_level``) that
no agent receives any more."""
from __future__ import annotations

import dataclasses
from typing import Any

import msgspec

from microagent import MicroAgent, Queue, Signal, consumer, receiver

order_placed = Signal('order_placed', ['order_id', 'total'],
                      type_map={'order_id': int, 'total': str})
stock_level = Signal('stock_level', ['sku'], type_map={'sku': str})
orders = Queue('orders')
invoices = Queue('invoices')


class Address(msgspec.Struct):
    city: str
    country: str


class Order(msgspec.Struct):
    order_id: int
    customer: str
    shipping: Address
    note: str = ''


@dataclasses.dataclass
class Invoice:
    order_id: int
    amount: str


class Shop(MicroAgent):
    async def place(self) -> None:
        await self.bus.stock_level.call('shop', sku='x')  # type: ignore[union-attr]
        await self.bus.order_placed.send(  # type: ignore[union-attr]
            'shop', order_id=1, total='2.5')
        await self.broker.orders.send({'order_id': 1})  # type: ignore[union-attr]
        await self.broker.invoices.send({'order_id': 1})  # type: ignore[union-attr]


class Warehouse(MicroAgent):
    @receiver(order_placed)
    def placed(self, **kwargs: Any) -> None:
        pass

    @consumer(orders, dto_class=Order)
    def prepare(self, **kwargs: Any) -> None:
        pass


class Billing(MicroAgent):
    @consumer(invoices, dto_class=Invoice)
    def bill(self, **kwargs: Any) -> None:
        pass


BUS = {'main': {'backend': 'microagent.MemorySignalBus', 'dsn': 'memory://contract',
                'prefix': 'SHOP'}}
BROKER = {'main': {'backend': 'microagent.MemoryBroker', 'dsn': 'memory://contract'}}
AGENT = {
    'shop': {'backend': f'{__name__}.Shop', 'bus': 'main', 'broker': 'main'},
    'warehouse': {'backend': f'{__name__}.Warehouse', 'bus': 'main', 'broker': 'main'},
    'billing': {'backend': f'{__name__}.Billing', 'broker': 'main'},
}
