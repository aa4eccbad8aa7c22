"""The `iothub_fleet` fixture: real SDK clients in worker processes beside the test's own devices.

A factory, so a test chooses the size: `iothub_fleet(1000, rate=1)` registers the fleet's devices on
the test's hub, starts the clients, returns once all are connected, and stops them at teardown,
checking that every message the hub acknowledged to them is in its ledger.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

CONNECT_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0


@pytest.fixture
def iothub_fleet(iothub: Any) -> Iterator[Callable[..., Any]]:
    from ..devices.fleet import FleetRunner, fleet_device_ids

    fleets: list[Any] = []

    def start(count: int, *, rate: float = 1.0, per_process: int = 100,
              client_kwargs: Mapping[str, Any] | None = None, id_prefix: str = "fleet-",
              connect_timeout: float = CONNECT_TIMEOUT) -> Any:
        if iothub.fake is None:
            raise pytest.UsageError("iothub_fleet runs on the embedded hub only: a real hub's registry and "
                                    "throttles are not for load tests from a CI job")
        if iothub.fake.dns is not None:
            raise pytest.UsageError("iothub_fleet cannot run with --iothub-dns: its clients run in worker processes, "
                                    "which cannot resolve the host name the embedded hub resolves in this one")
        # distinct prefixes keep two fleets of one test, and tests running side by side, apart
        prefix = f"{id_prefix}{len(fleets)}-" if fleets else id_prefix
        # in bulk: with --iothub-throttle-setup one registry call per 100 devices, as the REST bulk API
        devices = {d.device_id: d.connection_string for d in iothub.add_devices(fleet_device_ids(count, prefix))}
        info = {"hostname": iothub.fake.hostname, "gateway_host": iothub.fake.gateway_host,
                "ca_pem": iothub.fake.ca_pem, "devices": devices}
        kwargs = {**iothub.client_defaults, **dict(client_kwargs or {})}
        kwargs.pop("server_verification_cert", None)  # the runner passes the CA itself
        fleet = FleetRunner(info, count, rate=rate, per_process=per_process, client_kwargs=kwargs,
                            id_prefix=prefix)
        fleets.append(fleet)
        fleet.start()
        fleet.wait_connected(timeout=connect_timeout)
        return fleet

    yield start
    problems = []
    for fleet in fleets:
        report = fleet.stop(timeout=STOP_TIMEOUT)
        if report is None:
            continue
        ledger = {(t.device_id, t.message_id) for t in iothub.telemetry(include_lost=True)}  # the ledger, failover losses included
        missing = sorted(report.acknowledged_ids() - ledger)
        if missing:
            problems.append(f"{len(missing)} messages the hub acknowledged to the fleet are not in its ledger, "
                            f"e.g. {missing[:3]}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)
