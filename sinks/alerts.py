"""Alerts to the alerts topic: one JSON record per alert, keyed by device, acknowledged by the
broker before the batch's offsets can be committed. A replay after a crash may send an alert a
second time; its ``alert_id`` (and header ``millstream.alert.id``) is the same, so consumers
deduplicate by it, as the ScyllaDB table ``alerts_by_device`` does by its key."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from app import metrics
from models.times import iso_ms

AlertRows = list[tuple[str, str, str, str, str, float, float, int, int, int]]  # agents/alerts.py AlertRow


def alert_document(alert: tuple[Any, ...]) -> dict[str, Any]:
    alert_id, device, rule, metric, state, value, threshold, start_ms, end_ms, offset = alert
    return {
        "alert_id": alert_id, "device_id": device, "rule": rule, "metric": metric, "state": state,
        "value": value, "threshold": threshold, "window_start": iso_ms(start_ms), "window_end": iso_ms(end_ms),
        "event_time": iso_ms(end_ms), "source_offset": offset,
    }  # fmt: skip


class KafkaAlerts:
    """Produces alerts to the alerts topic (a faust topic) and waits for the broker."""

    name = "alerts"

    def __init__(self, topic: Any) -> None:
        self.topic = topic

    async def start(self) -> None:
        return None

    async def write(self, alerts: AlertRows) -> None:
        deliveries: list[asyncio.Future[Any]] = []
        for alert in alerts:
            headers = {"millstream.alert.id": alert[0].encode()}
            value = orjson.dumps(alert_document(alert))
            deliveries.append(await self.topic.send(key=alert[1].encode(), value=value, headers=headers))
        for delivery in deliveries:
            await delivery
        for alert in alerts:
            metrics.ALERTS.labels(rule=alert[2], state=alert[4]).inc()

    async def close(self) -> None:
        return None
