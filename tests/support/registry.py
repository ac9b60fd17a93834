"""A schema registry for the tests: the subset of Confluent's REST API millstream calls
(``GET /schemas/ids/{id}``), on loopback, with an outage switch and a request count.

Written here; no registry can be installed on this machine (DESIGN.md §5)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class TestRegistry:
    __test__ = False  # not a test class

    def __init__(self) -> None:
        self.schemas: dict[int, dict[str, Any]] = {}
        self.down = False  # answer 503, as a registry behind a failing load balancer would
        self.requests: list[int] = []
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = self.path.strip("/").split("/")
                if len(parts) != 3 or parts[:2] != ["schemas", "ids"] or not parts[2].isdigit():
                    return self._answer(404, {"error_code": 404, "message": "HTTP 404 Not Found"})
                registry.requests.append(int(parts[2]))
                if registry.down:
                    return self._answer(503, {"error_code": 50003, "message": "unavailable"})
                schema = registry.schemas.get(int(parts[2]))
                if schema is None:
                    return self._answer(404, {"error_code": 40403, "message": "Schema not found"})
                return self._answer(200, schema)

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="test-registry")
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def register(self, schema_id: int, schema: dict[str, Any] | str, kind: str = "AVRO") -> None:
        text = schema if isinstance(schema, str) else json.dumps(schema)
        entry: dict[str, Any] = {"schema": text}
        if kind != "AVRO":  # Confluent omits schemaType for Avro
            entry["schemaType"] = kind
        self.schemas[schema_id] = entry

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


BATCHED_AVRO = {
    "type": "record", "name": "Batch", "namespace": "factory.telemetry",
    "fields": [
        {"name": "device_id", "type": "string"},
        {"name": "factory", "type": "string"},
        {"name": "line", "type": "string"},
        {"name": "readings", "type": {"type": "array", "items": {
            "type": "record", "name": "Reading",
            "fields": [
                {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
                {"name": "metrics", "type": {"type": "map", "values": "double"}},
            ],
        }}},
    ],
}  # fmt: skip
NESTED_JSON_SCHEMA = {"type": "object", "required": ["device_id", "metrics"]}
AVRO_ID, JSON_ID = 1, 2


def frame(schema_id: int, payload: bytes) -> bytes:
    """Confluent's wire format: magic byte 0, the schema id, the payload."""
    return b"\x00" + schema_id.to_bytes(4, "big") + payload


def avro(schema: dict[str, Any], doc: dict[str, Any]) -> bytes:
    import io

    from fastavro import parse_schema, schemaless_writer

    out = io.BytesIO()
    schemaless_writer(out, parse_schema(schema), doc)
    return out.getvalue()


def reframe(traffic: list[Any]) -> tuple[list[Any], dict[str, int]]:
    """The simulator's traffic as upstream teams moving to a registry would send it: batched
    messages as Avro (schema AVRO_ID), nested ones as JSON framed (JSON_ID), flat ones and the
    malformed ones unchanged. Same readings, so the simulator's expectations still hold."""
    out: list[Any] = []
    kinds = {"avro": 0, "json": 0, "plain": 0}
    for key, value, *rest in traffic:
        try:
            doc = json.loads(value)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("readings"), list) and _avro_ready(doc):
            value, kind = frame(AVRO_ID, avro(BATCHED_AVRO, doc)), "avro"
        elif isinstance(doc, dict) and isinstance(doc.get("metrics"), dict) and "ts" in doc:
            value, kind = frame(JSON_ID, value), "json"
        else:
            kind = "plain"
        kinds[kind] += 1
        out.append((key, value, *rest))
    return out, kinds


def _avro_ready(doc: dict[str, Any]) -> bool:
    """A batched message the Avro schema can carry exactly (the simulator's well-formed ones)."""
    if not all(isinstance(doc.get(k), str) for k in ("device_id", "factory", "line")) or len(doc) != 4:
        return False
    return all(
        isinstance(r, dict) and set(r) == {"ts", "metrics"} and type(r["ts"]) is int
        and isinstance(r["metrics"], dict) and all(type(v) in (int, float) for v in r["metrics"].values())
        for r in doc["readings"]
    )  # fmt: skip
