"""Records and decoders of factory telemetry."""
