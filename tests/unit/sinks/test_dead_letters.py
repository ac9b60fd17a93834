"""The DLQ writer: a rejected message is dead-lettered whatever its size, never dropped.

Regression: a reject larger than the producer's request limit (faust's default 1,000,000
bytes, below the decoder's 1 MiB) raised on the DLQ send, on every replay: the group
crash-looped on it.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError
from faust.exceptions import ProducerSendError

from models.records import Rejection, RejectReason, SourceMessage
from sinks.dead_letters import TRUNCATED_BYTES, KafkaDeadLetters, is_too_large

LIMIT = 1_000_000


class FakeTopic:
    """Behaves like a faust topic over aiokafka: refuses records above the request limit at
    send (as ProducerSendError from MessageSizeTooLargeError), and the broker refuses records
    above ``broker_limit`` on delivery."""

    def __init__(self, broker_limit: int = 10**9, deliver_error: Exception | None = None) -> None:
        self.broker_limit, self.deliver_error = broker_limit, deliver_error
        self.delivered: list[tuple[bytes | None, bytes, dict[str, bytes]]] = []

    async def send(self, *, key: bytes | None, value: bytes, headers: dict[str, bytes]) -> asyncio.Future[Any]:
        if len(value) > LIMIT:
            try:
                raise MessageSizeTooLargeError("larger than max_request_size")
            except MessageSizeTooLargeError as exc:
                raise ProducerSendError(f"Error while sending: {exc!r}") from exc
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.deliver_error is not None:
            future.set_exception(self.deliver_error)
        elif len(value) > self.broker_limit:
            future.set_exception(MessageSizeTooLargeError())
        else:
            self.delivered.append((key, value, headers))
            future.set_result(None)
        return future


def rejected(size: int, offset: int = 7) -> SourceMessage:
    message = SourceMessage("telemetry", 2, offset, b"sensor-1", b"x" * size, 0)
    message.rejection = Rejection(RejectReason.TOO_LARGE, f"{size} bytes")
    return message


async def test_a_small_reject_keeps_its_bytes_and_names_its_origin() -> None:
    topic = FakeTopic()
    await KafkaDeadLetters(topic, LIMIT).send([rejected(100)])
    ((key, value, headers),) = topic.delivered
    assert (key, value) == (b"sensor-1", b"x" * 100)
    assert headers["millstream.reason"] == b"too_large" and headers["millstream.source.offset"] == b"7"
    assert "millstream.truncated" not in headers


@pytest.mark.parametrize("size", [LIMIT - 10_000, LIMIT + 1, 1_048_577, 5_000_000])
async def test_a_reject_too_large_for_the_producer_goes_truncated(size: int) -> None:
    topic = FakeTopic()
    await KafkaDeadLetters(topic, LIMIT).send([rejected(size), rejected(10, offset=8)])
    (first, second) = topic.delivered
    assert len(first[1]) == TRUNCATED_BYTES and first[2]["millstream.truncated"] == str(size).encode()
    assert first[2]["millstream.sha256"] == hashlib.sha256(b"x" * size).hexdigest().encode()
    assert second[1] == b"x" * 10


async def test_a_producer_limit_above_the_value_still_falls_back_when_the_send_refuses() -> None:
    topic = FakeTopic()
    await KafkaDeadLetters(topic, 4 * LIMIT).send([rejected(LIMIT + 5)])  # our limit says fits; faust's does not
    assert topic.delivered[0][2]["millstream.truncated"] == str(LIMIT + 5).encode()


async def test_a_reject_the_broker_refuses_as_too_large_goes_truncated() -> None:
    topic = FakeTopic(broker_limit=200_000)
    await KafkaDeadLetters(topic, LIMIT).send([rejected(300_000)])
    ((_key, value, headers),) = topic.delivered
    assert len(value) == TRUNCATED_BYTES and headers["millstream.truncated"] == b"300000"


async def test_any_other_failure_is_raised() -> None:
    with pytest.raises(KafkaConnectionError):
        await KafkaDeadLetters(FakeTopic(deliver_error=KafkaConnectionError()), LIMIT).send([rejected(10)])


def test_size_errors_are_recognised_through_faust_wrapping() -> None:
    try:
        try:
            raise MessageSizeTooLargeError()
        except MessageSizeTooLargeError as inner:
            raise ProducerSendError("wrapped") from inner
    except ProducerSendError as outer:
        assert is_too_large(outer)
    assert not is_too_large(ProducerSendError("other")) and not is_too_large(None)
