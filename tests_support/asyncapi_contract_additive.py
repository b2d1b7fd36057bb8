"""``asyncapi_contract_v1`` with additions only, which break nothing: a signal
(``order_paid``), a queue (``refunds``), a signal argument (``order_placed.currency``),
an optional property of a consumer's payload (``Order.gift``) and an agent
(``refunder``)."""
from __future__ import annotations

import dataclasses
from typing import Any

import msgspec

from microagent import MicroAgent, Queue, Signal, consumer, receiver

order_placed = Signal('order_placed', ['order_id', 'total', 'note', 'currency'],
                      type_map={'order_id': int, 'total': float, 'currency': str})
order_paid = Signal('order_paid', ['order_id'], type_map={'order_id': int})
stock_level = Signal('stock_level', ['sku'], type_map={'sku': str})
obsolete = Signal('obsolete', [])
orders = Queue('orders')
invoices = Queue('invoices')
legacy = Queue('legacy')
refunds = Queue('refunds')


class Address(msgspec.Struct):
    city: str


class Order(msgspec.Struct):
    order_id: int
    shipping: Address
    note: str = ''
    gift: bool = False


@dataclasses.dataclass
class Invoice:
    order_id: int
    amount: float


class Shop(MicroAgent):
    async def place(self) -> None:
        await self.bus.stock_level.call('shop', sku='x')  # type: ignore[union-attr]
        await self.bus.order_placed.send(  # type: ignore[union-attr]
            'shop', order_id=1, total=2.5, note='', currency='EUR')
        await self.bus.order_paid.send('shop', order_id=1)  # type: ignore[union-attr]
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


class Refunder(MicroAgent):
    @receiver(order_paid)
    async def paid(self, **kwargs: Any) -> None:
        await self.broker.refunds.send({'order_id': 1})  # type: ignore[union-attr]

    @consumer(refunds)
    def refund(self, **kwargs: Any) -> None:
        pass


BUS = {'main': {'backend': 'microagent.MemorySignalBus', 'dsn': 'memory://contract',
                'prefix': 'SHOP'}}
BROKER = {'main': {'backend': 'microagent.MemoryBroker', 'dsn': 'memory://contract'}}
AGENT = {
    'shop': {'backend': f'{__name__}.Shop', 'bus': 'main', 'broker': 'main'},
    'warehouse': {'backend': f'{__name__}.Warehouse', 'bus': 'main', 'broker': 'main'},
    'billing': {'backend': f'{__name__}.Billing', 'broker': 'main'},
    'refunder': {'backend': f'{__name__}.Refunder', 'bus': 'main', 'broker': 'main'},
}
