"""The faust app millstream builds: the settings that exactness depends on."""

from __future__ import annotations

from pathlib import Path

from app.main import create_app
from app.settings import Settings


def test_tables_have_no_standby_replicas(tmp_path: Path) -> None:
    """A standby promoted on a takeover lacked a device's state in the rebalance chaos scenario
    (faust 0.15 trusts the standby's offsets and reads nothing more); every new owner restores
    from the changelog instead."""
    app = create_app(Settings(store="rocksdb", data_dir=tmp_path))
    assert app.conf.table_standby_replicas == 0
    assert app.conf.processing_guarantee.value == "at_least_once"


def test_the_producer_buffer_holds_two_batches_of_changelog_records(tmp_path: Path) -> None:
    from faust.transport.producer import ProducerBuffer

    original = ProducerBuffer.max_messages
    try:
        settings = Settings(store="rocksdb", data_dir=tmp_path)
        create_app(settings)
        assert ProducerBuffer.max_messages == 2 * settings.pipeline.batch_messages + 100
    finally:
        ProducerBuffer.max_messages = original
