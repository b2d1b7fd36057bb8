"""Agents of the AsyncAPI tests: a shop whose fleet uses every feature the document
describes (typed and untyped signals, a Struct and a dataclass DTO, an RPC call, an AMQP
queue behind a topic exchange, Kafka queues, two bus prefixes)."""
from __future__ import annotations

import dataclasses
from typing import Any

import msgspec

from microagent import MicroAgent, Queue, Signal, consumer, periodic, receiver


class AuditEvent(msgspec.Struct):
    """What the audit trail records."""
    action: str
    order_id: int


class Line(msgspec.Struct):
    sku: str
    quantity: int = 1


class Card(msgspec.Struct, tag='card'):
    last4: str


class Transfer(msgspec.Struct, tag='transfer'):
    iban: str


class OrderDTO(msgspec.Struct):
    """An order the warehouse prepares."""
    order_id: int
    lines: list[Line]
    payment: Card | Transfer
    coupon: str | None = None


@dataclasses.dataclass
class Invoice:
    order_id: int
    amount: float
    currency: str = 'EUR'


order_placed = Signal('shop_order_placed', ['order_id', 'total', 'coupon', 'items'],
                      type_map={'order_id': int, 'total': (int, float),
                                'coupon': (str, type(None))})
ping = Signal('shop_ping', ['source'])
stock_level = Signal('shop_stock_level', ['sku'], type_map={'sku': str})
audit = Signal('shop_audit', ['event'], type_map={'event': AuditEvent})
orders = Queue('shop.orders', exchange='shop', topics=('order.created', 'order.paid'))
invoices = Queue('shop:invoices')
audit_log = Queue('shop.audit-log')


class Shop(MicroAgent):
    """Takes orders: announces them, asks for stock, queues them for the warehouse."""

    async def place(self, order_id: int, sku: str) -> None:
        stock = await self.bus.shop_stock_level.call('shop', sku=sku)  # type: ignore[union-attr]
        if stock:
            await self.bus.shop_order_placed.send(  # type: ignore[union-attr]
                'shop', order_id=order_id, total=10, coupon=None, items=[sku])
            await getattr(self.broker, 'shop.orders').send({'order_id': order_id},
                                                          topic='order.created')

    @periodic(period=60)
    async def heartbeat(self) -> None:
        await self.bus.shop_ping.send('shop', source='shop')  # type: ignore[union-attr]


class Warehouse(MicroAgent):
    """Answers stock levels and prepares orders."""

    @receiver(stock_level)
    def stock(self, sku: str, **kwargs: Any) -> int:
        return 3

    @receiver(ping)
    def pong(self, **kwargs: Any) -> None:
        pass

    @consumer(orders, dto_class=OrderDTO)
    async def prepare(self, dto: OrderDTO, **kwargs: Any) -> None:
        pass


class Invoicer(MicroAgent):
    """Invoices each order placed."""

    @receiver(order_placed)
    async def invoice(self, order_id: int, total: float, **kwargs: Any) -> None:
        await getattr(self.broker, 'shop:invoices').send({'order_id': order_id,
                                                          'amount': total})


class Billing(MicroAgent):
    """Bills invoices; audits on the AUDIT prefix."""

    @consumer(invoices, dto_class=Invoice)
    async def bill(self, dto: Invoice, **kwargs: Any) -> None:
        await self.bus.shop_audit.send('billing', event={  # type: ignore[union-attr]
            'action': 'billed', 'order_id': dto.order_id})
        await getattr(self.broker, 'shop.audit-log').send({'billed': dto.order_id})

    @periodic(period=60)
    async def heartbeat(self) -> None:
        await self.bus.shop_ping.send('billing', source='billing')  # type: ignore[union-attr]


class Auditor(MicroAgent):
    """Keeps the audit trail."""

    @receiver(audit, ping)
    def record(self, **kwargs: Any) -> None:
        pass

    @consumer(audit_log)
    def archive(self, **kwargs: Any) -> None:
        pass
