"""Bad input of every kind the decoder must turn away, generated deterministically.

Each message is (key, value, kind). Every one must end in the DLQ with a reason; a generator
that produced a valid message by accident would show as a DLQ count short of what was sent.
Sizes are against the production limit (1 MiB): the kinds of a megabyte or more (over the
limit, or under it but over faust's default producer request size) come in the first
:data:`BIG_ROUNDS` rounds only, to keep a run's volume sane.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import orjson

DEVICE = b"sensor-0001"
LIMIT = 1_048_576  # MILLSTREAM_LIMITS__MAX_MESSAGE_BYTES, default
BIG_ROUNDS = 3


def _valid_doc(rng: random.Random, device: str) -> dict[str, object]:
    return {"device_id": device, "ts": 1_763_000_000_000 - rng.randrange(10**6), "metrics": {"temperature": 21.5}}


def _kinds(rng: random.Random, big: bool) -> list[tuple[str, bytes | None, bytes]]:
    device = f"sensor-{rng.randrange(200):04d}"
    key = device.encode()
    good = orjson.dumps(_valid_doc(rng, device))
    cut = rng.randrange(1, len(good) - 1)
    huge = "x" * rng.randrange(200_000, 300_000)
    kinds = [
        ("truncated", key, good[:cut]),
        ("garbage", key, rng.randbytes(rng.randrange(1, 300))),
        ("empty", key, b""),
        ("invalid_utf8", key, b'{"device_id": "' + key + b'\xff\xfe", "metrics": {"t": 1.0}}'),
        ("json_null", key, b"null"),
        ("json_array", None, orjson.dumps([device, 1.0])),
        ("json_number", rng.randbytes(8), b"42"),
        ("no_device", key, orjson.dumps({"metrics": {"t": 1.0}})),
        ("device_not_string", key, orjson.dumps({"device_id": rng.randrange(10**6), "metrics": {"t": 1.0}})),
        ("device_control_chars", key, orjson.dumps({"device_id": device + "\n\x00", "metrics": {"t": 1.0}})),
        ("device_huge", key, orjson.dumps({"device_id": huge[:5000], "metrics": {"t": 1.0}})),
        ("metrics_string", key, orjson.dumps({"device_id": device, "metrics": "hot"})),
        ("metrics_list", key, orjson.dumps({"device_id": device, "metrics": [1, 2]})),
        ("metrics_empty", key, orjson.dumps({"device_id": device, "metrics": {}})),
        ("value_string", key, orjson.dumps({"device_id": device, "metrics": {"t": "21.5"}})),
        ("value_bool", key, orjson.dumps({"device_id": device, "metrics": {"t": True}})),
        ("value_null", key, orjson.dumps({"device_id": device, "metrics": {"t": None}})),
        ("value_nested", key, orjson.dumps({"device_id": device, "metrics": {"t": {"v": 1}}})),
        ("value_nan_literal", key, b'{"device_id": "' + key + b'", "metrics": {"t": NaN}}'),
        ("value_inf_literal", key, b'{"device_id": "' + key + b'", "metrics": {"t": Infinity}}'),
        ("value_overflow", key, b'{"device_id": "' + key + b'", "metrics": {"t": 1e999}}'),
        ("metric_name_bad", key, orjson.dumps({"device_id": device, "metrics": {"bad name!": 1.0}})),
        ("metric_name_huge", key, orjson.dumps({"device_id": device, "metrics": {"m" * 500: 1.0}})),
        ("flat_no_numbers", key, orjson.dumps({"device_id": device, "status": "ok", "location": "a"})),
        ("deep_nesting", key, b'{"device_id": "' + key + b'", "metrics": ' + b'{"a":' * 3000 + b"1" + b"}" * 3001),
        ("ts_words", key, orjson.dumps({"device_id": device, "ts": "yesterday", "metrics": {"t": 1.0}})),
        ("ts_negative", key, orjson.dumps({"device_id": device, "ts": -5, "metrics": {"t": 1.0}})),
        ("ts_before_2000", key, orjson.dumps({"device_id": device, "ts": 631_152_000, "metrics": {"t": 1.0}})),
        ("ts_far_future", key, orjson.dumps({"device_id": device, "ts": 4_102_444_800_000, "metrics": {"t": 1.0}})),
        ("ts_no_zone", key, orjson.dumps({"device_id": device, "ts": "2025-01-15T10:30:00", "metrics": {"t": 1.0}})),
        ("ts_bool", key, orjson.dumps({"device_id": device, "ts": True, "metrics": {"t": 1.0}})),
        ("readings_not_list", key, orjson.dumps({"device_id": device, "readings": {"ts": 1}})),
        ("readings_empty", key, orjson.dumps({"device_id": device, "readings": []})),
        ("readings_item_bad", key, orjson.dumps({"device_id": device, "readings": [1, 2, 3]})),
        (
            "readings_oversized",
            key,
            orjson.dumps({"device_id": device, "readings": [{"metrics": {"t": 1.0}}] * rng.randrange(1001, 1500)}),
        ),
        ("key_mismatch", b"sensor-9999", orjson.dumps(_valid_doc(rng, device))),
    ]
    if big:
        over = "x" * (LIMIT + rng.randrange(1, 64 * 1024))
        near = "x" * rng.randrange(1_000_000, LIMIT - 1000)  # bad, and above faust's 1,000,000-byte request
        kinds += [
            ("too_large", key, orjson.dumps({"device_id": device, "metrics": {"t": 1.0}, "note": over})),
            ("near_limit_bad_value", key, orjson.dumps({"device_id": device, "metrics": {"t": "x"}, "note": near})),
        ]
    return kinds


KINDS = [kind for kind, _key, _value in _kinds(random.Random(0), big=True)]


def poison(count: int, seed: int) -> Iterator[tuple[bytes | None, bytes, str]]:
    """``count`` bad messages, cycling through every kind with fresh random content."""
    rng = random.Random(seed)
    made = rounds = 0
    while made < count:
        rounds += 1
        for kind, key, value in _kinds(rng, big=rounds <= BIG_ROUNDS):
            if made == count:
                return
            yield key, value, kind
            made += 1
