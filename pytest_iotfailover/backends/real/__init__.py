"""The real IoT Hub backend, by concern: `registry` (the run's devices, leftover sweep),
`ledger` (the delivery ledger from the built-in endpoint, and its lookup), `service`
(C2D, methods, twins), `faults` and `clients` (fault injection through device clients),
`arm` (manual failover) and `backend` (`RealBackend`, joining them). Nothing here
imports the embedded fake hub."""
