"""The real IoT Hub backend: registry, delivery ledger from the built-in endpoint, service calls,
fault injection and ARM manual failover."""
