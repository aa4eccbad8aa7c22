"""Device-side helpers that work on SDK clients only: `DevicePool`, `Outbox`, backoff."""
