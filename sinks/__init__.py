"""Writers to ClickHouse and ScyllaDB: start(), write(batch) all-or-nothing and idempotent, close()."""
