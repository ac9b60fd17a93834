"""The chaos suite's bad input is bad: the decoder rejects every kind, each with its reason."""

from __future__ import annotations

from models.decode import Decoder
from models.records import Rejection
from tests.support.poison import KINDS, LIMIT, poison


def test_every_poison_message_is_rejected_with_a_reason() -> None:
    decoder = Decoder(max_message_bytes=LIMIT)  # the chaos worker's limit: production's default
    reasons: dict[str, set[str]] = {}
    messages = list(poison(3 * len(KINDS), seed=5))
    for key, value, kind in messages:
        result = decoder.decode(value, timestamp_ms=1_763_000_000_000, now_ms=1_763_000_000_000)
        if not isinstance(result, Rejection):
            # key_mismatch is decided by the pipeline (key against device_id), not the decoder.
            assert kind == "key_mismatch" and result[0].device_id.encode() != key, kind
            continue
        assert result.detail, kind
        reasons.setdefault(kind, set()).add(result.reason.value)
    assert set(reasons) == set(KINDS) - {"key_mismatch"}
    assert len({r for rs in reasons.values() for r in rs}) >= 10  # most reject reasons are exercised
