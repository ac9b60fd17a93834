"""Stream processors: ingest (decode, DLQ, raw rows), aggregate (windowed tables to Scylla)."""
