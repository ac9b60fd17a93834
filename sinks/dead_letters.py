"""Rejected messages to the dead-letter topic: original bytes, reason and origin in headers.

Headers of every DLQ record: ``millstream.reason`` (a :class:`models.records.RejectReason`),
``millstream.detail``, ``millstream.source.{topic,partition,offset}``.

A message too large for the producer (or refused by the broker as too large) is still
dead-lettered, never dropped and never allowed to stop the worker: its first
:data:`TRUNCATED_BYTES` bytes go to the DLQ with ``millstream.truncated`` = its original size
and ``millstream.sha256`` of the original bytes; the source headers name where the whole
message still is (the source topic, while its retention lasts).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

from models.records import SourceMessage

log = logging.getLogger(__name__)

TRUNCATED_BYTES = 64 * 1024  # kept of a message too large for the DLQ
TRUNCATED_KEY_BYTES = 1024
HEADROOM_BYTES = 16 * 1024  # of a produce request, for key, headers and record overhead
DETAIL_BYTES = 1000


def is_too_large(exc: BaseException | None) -> bool:
    """Whether a send failed because the record is too large (client-side or broker-side)."""
    from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError

    seen = 0
    while exc is not None and seen < 5:  # faust wraps aiokafka's error in ProducerSendError
        if isinstance(exc, MessageSizeTooLargeError | RecordTooLargeError | RecordListTooLargeError):
            return True
        exc, seen = exc.__cause__, seen + 1
    return False


class KafkaDeadLetters:
    """Produces rejected messages to the DLQ topic (a faust topic) and waits for the broker."""

    def __init__(self, topic: Any, max_request_bytes: int) -> None:
        self.topic = topic
        self.max_value_bytes = max(TRUNCATED_BYTES, max_request_bytes - HEADROOM_BYTES)

    async def send(self, messages: list[SourceMessage]) -> None:
        """Returns when the broker has every one; raises for anything but a size refusal."""
        # A tombstone (value None) goes as it came: a record with a null value.
        pending = [(message, await self._send(message, len(message.value or b"") > self.max_value_bytes))
                   for message in messages]  # fmt: skip
        for message, delivery in pending:
            try:
                await delivery  # delivered, not just buffered: the acks come next
            except Exception as exc:
                if not is_too_large(exc):
                    raise
                log.warning("DLQ refused %d bytes from %s/%s@%s as too large; sending its first %d bytes",
                            len(message.value or b""), message.topic, message.partition, message.offset,
                            TRUNCATED_BYTES)  # fmt: skip
                await (await self._send(message, truncate=True))

    async def _send(self, message: SourceMessage, truncate: bool) -> asyncio.Future[Any]:
        assert message.rejection is not None
        headers = {
            "millstream.reason": message.rejection.reason.value.encode(),
            "millstream.detail": message.rejection.detail.encode(errors="replace")[:DETAIL_BYTES],
            "millstream.source.topic": message.topic.encode(),
            "millstream.source.partition": str(message.partition).encode(),
            "millstream.source.offset": str(message.offset).encode(),
        }
        key, value = message.key, message.value
        if truncate and value is not None:
            headers["millstream.truncated"] = str(len(value)).encode()
            headers["millstream.sha256"] = hashlib.sha256(value).hexdigest().encode()
            key, value = (key[:TRUNCATED_KEY_BYTES] if key is not None else None), value[:TRUNCATED_BYTES]
        try:
            future: asyncio.Future[Any] = await self.topic.send(key=key, value=value, headers=headers)
        except Exception as exc:
            if truncate or not is_too_large(exc):
                raise
            return await self._send(message, truncate=True)
        return future
