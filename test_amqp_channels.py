"""AMQP channels after a dead-letter walk: a replay or purge that takes every letter it
was delivered must not make RabbitMQ close its channel (a nack of a tag already
acknowledged does), which raced with the walk's own channel.close into a
``CHANNEL_ERROR - expected 'channel.open'`` that closed the whole connection."""
from __future__ import annotations

from typing import Any

import pytest

from test_dead_letters import put_many
from test_microagent_backends import (  # noqa: F401  (fixtures)
    BROKER_KINDS,
    BrokerKind,
    closing,
    kafka_settings,
    memory_dsn,
    rabbit,
    raw_producer,
)


@pytest.fixture
def kind(request: pytest.FixtureRequest) -> BrokerKind:
    return BROKER_KINDS['amqp'](request)


@pytest.fixture
def channel_closes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The channels RabbitMQ closes ("<code> <text>"), as aiormq receives them (it logs
    a Channel.Close frame without its reason)."""
    from aiormq.channel import Channel

    closes: list[str] = []
    receive = Channel._on_close_frame

    async def recorded(self: Channel, frame: Any) -> None:
        closes.append(f'{frame.reply_code} {frame.reply_text}')
        await receive(self, frame)

    monkeypatch.setattr(Channel, '_on_close_frame', recorded)
    return closes


def refusals(closes: list[str]) -> list[str]:
    """The closes other than NOT_FOUND (a passive declare of a queue not made yet)."""
    return [close for close in closes if not close.startswith('404 ')]


@pytest.mark.parametrize('push', [True, False], ids=['replay', 'purge'])
async def test_amqp_walk_that_takes_every_letter_leaves_its_channel_open_until_it_closes_it(
        kind: BrokerKind, push: bool, channel_closes: list[str]) -> None:
    queue = kind.unique
    await put_many(kind, queue, 30)
    broker = kind.broker(REPLAY_BATCH=10)
    taken = await (broker.replay(queue) if push else broker.purge_dead(queue))
    assert taken == 30
    assert await broker.dead_count(queue) == 0
    assert refusals(channel_closes) == []
    assert broker.links['connection'].connected


async def test_amqp_replay_of_some_letters_gives_back_the_others_without_a_channel_error(
        kind: BrokerKind, channel_closes: list[str]) -> None:
    queue = kind.unique
    await put_many(kind, queue, 12)
    broker = kind.broker(REPLAY_BATCH=5)
    letters = await broker.dead_letters(queue, limit=12)
    wanted = [letter.id for letter in letters[1::2]]  # the last one too: the highest tag
    assert await broker.replay(queue, wanted) == 6
    assert [letter.id for letter in await broker.dead_letters(queue, limit=12)] == [
        letter.id for letter in letters[0::2]]
    assert refusals(channel_closes) == []
