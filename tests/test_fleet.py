"""A fleet of real SDK clients in worker processes, against the standalone hub in its own process."""
import multiprocessing
import os
import signal

import pytest
from azure.iot.device import IoTHubDeviceClient, Message
from sdk_support import CLIENT_KWARGS, bounded

from pytest_iotfailover.devices.fleet import MAX_PER_PROCESS, FleetError, FleetRunner, fleet_device_ids
from pytest_iotfailover.fakehub.process import StandaloneHub

pytest_plugins = ["pytester"]

pytestmark = pytest.mark.timeout(180)

COUNT = 20
PER_PROCESS = 10


@pytest.fixture
def hub():
    with StandaloneHub(devices=fleet_device_ids(COUNT)) as h:
        yield h


@pytest.fixture
def fleet_info(hub):
    return hub.fleet_info()


def spawned_children():
    """Processes this one started through multiprocessing that still exist (zombies included).

    multiprocessing's resource tracker is left out: the spawn context starts one per interpreter,
    shared by every later spawn, and it ends with the interpreter."""
    me, found = str(os.getpid()), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                ppid = next(line.split()[1] for line in f if line.startswith("PPid:"))
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, StopIteration):
            continue
        if ppid == me and b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
            found.append(int(pid))
    return found


def test_fleet_and_my_device_come_back_after_a_region_failover(hub, fleet_info):
    mine = hub.add_devices(["my-device"])["my-device"]
    my_client = IoTHubDeviceClient.create_from_connection_string(
        mine, server_verification_cert=hub.ca_pem, **CLIENT_KWARGS)
    fleet = FleetRunner(fleet_info, COUNT, rate=2, per_process=PER_PROCESS, client_kwargs=CLIENT_KWARGS)
    try:
        fleet.start()
        assert len(fleet.pids) == COUNT // PER_PROCESS
        bounded(my_client.connect, timeout=30)
        fleet.wait_connected(timeout=60)
        bounded(my_client.send_message, Message("before", message_id="mine-before"), timeout=30)

        fault = hub.start_fault("region_failover", outage=2)
        done = hub.wait_fault(fault["id"], timeout=60)
        report = fleet.wait_recovered(done["started_at"], timeout=60)
        # my device, beside the fleet, gets its message through once the hub is back
        bounded(my_client.send_message, Message("after", message_id="mine-after"), timeout=60)
    finally:
        final = fleet.stop(timeout=30)
        bounded(my_client.shutdown, timeout=30)

    recovery = report.recovery(done["started_at"], done["ended_at"])
    assert all(back is not None for back in recovery.values()), recovery
    assert final is not None and final.wedged == report.wedged
    assert all(w.exitcode == 0 for w in final.workers), final.workers
    acknowledged = final.acknowledged_ids()
    assert acknowledged, "the fleet sent nothing"
    assert all(d.acknowledged > 0 for d in final.devices.values())
    ledger = hub.ledger_ids()
    assert acknowledged <= ledger, sorted(acknowledged - ledger)[:10]
    assert {("my-device", "mine-before"), ("my-device", "mine-after")} <= ledger
    assert multiprocessing.active_children() == [] and spawned_children() == []
    assert all(not os.path.exists(f"/proc/{pid}") for pid in fleet.pids)


def test_a_worker_killed_is_named_and_the_rest_still_stop(hub, fleet_info):
    fleet = FleetRunner(fleet_info, COUNT, rate=1, per_process=PER_PROCESS, client_kwargs=CLIENT_KWARGS)
    try:
        fleet.start()
        fleet.wait_connected(timeout=60)
        victim = fleet.pids[1]
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(FleetError, match=rf"fleet worker 1 \(pid {victim}, 10 clients\) ended unexpectedly"):
            fleet.wait_recovered(0, timeout=60)
    finally:
        final = fleet.stop(timeout=30)
    assert final is not None
    lost = [d for d in final.devices.values() if d.worker == 1]
    assert len(lost) == PER_PROCESS
    assert all(d.errors == ["its worker process ended unexpectedly"] and not d.acknowledged_ids for d in lost)
    assert all(d.connected_at is not None for d in final.devices.values() if d.worker == 0)
    assert multiprocessing.active_children() == [] and spawned_children() == []


@pytest.mark.parametrize("change,words", [
    ({"ca_pem": "not a certificate"}, "hub_info['ca_pem'] must be the hub's CA certificate"),
    ({"devices": {}}, "no connection string for 'fleet-0000' and 19 more"),
    ({"devices": "HostName=x"}, "must map device ids to connection strings"),
    ({"gateway_host": "127.9.9.9"}, "hub_info['gateway_host'] is '127.9.9.9' but a connection string names"),
], ids=["ca", "no-devices", "devices-not-a-mapping", "other-gateway"])
def test_bad_hub_info_is_named_before_any_process_starts(fleet_info, change, words):
    with pytest.raises((ValueError, TypeError), match=None) as err:
        FleetRunner(dict(fleet_info, **change), COUNT)
    assert words in str(err.value)
    assert "SharedAccessKey" not in str(err.value)
    assert spawned_children() == []


@pytest.mark.parametrize("kwargs,words", [
    ({"per_process": MAX_PER_PROCESS + 1}, f"per_process must be at most {MAX_PER_PROCESS}"),
    ({"rate": -1}, "rate must be a non-negative number"),
    ({"client_kwargs": {"server_verification_cert": "x"}}, "comes from hub_info['ca_pem']"),
], ids=["per-process", "rate", "owned-kwarg"])
def test_bad_arguments_are_named(fleet_info, kwargs, words):
    with pytest.raises((ValueError, TypeError)) as err:
        FleetRunner(fleet_info, COUNT, **kwargs)
    assert words in str(err.value)


def test_fleet_against_the_embedded_hub():
    # the embedded hub serves its sockets with asyncio (epoll): only the clients need spreading
    from pytest_iotfailover import FakeHub
    with FakeHub("testhub") as embedded:
        devices = {d: embedded.add_device(d).connection_string for d in fleet_device_ids(4)}
        info = {"hostname": embedded.hostname, "gateway_host": embedded.gateway_host,
                "ca_pem": embedded.ca_pem, "devices": devices}
        with FleetRunner(info, 4, rate=2, per_process=2, client_kwargs=CLIENT_KWARGS) as fleet:
            fleet.wait_connected(timeout=60)
            handle = embedded.faults.region_failover(outage=1)
            report = handle.wait(60).report()
            fleet.wait_recovered(report.started_at, timeout=60)
        final = fleet.report()
        ledger = {(t.device_id, t.message_id) for t in embedded.telemetry(include_lost=True)}
    assert final.acknowledged_ids() and final.acknowledged_ids() <= ledger
    assert all(back is not None for back in final.recovery(report.started_at, report.ended_at).values())
    assert multiprocessing.active_children() == [] and spawned_children() == []


def test_a_worker_that_cannot_create_its_clients_says_why(fleet_info):
    # the SDK refuses an unknown option; the worker's error reaches the caller, not just its stderr
    fleet = FleetRunner(fleet_info, COUNT, per_process=PER_PROCESS, client_kwargs={"no_such_option": 1})
    try:
        fleet.start()
        with pytest.raises(FleetError, match=r"ended unexpectedly with exit code 1: .*no_such_option"):
            fleet.wait_connected(timeout=60)
    finally:
        fleet.stop(timeout=30)
    assert multiprocessing.active_children() == [] and spawned_children() == []


def test_the_iothub_fleet_fixture_runs_beside_the_tests_own_device(pytester):
    # a fleet of real SDK clients storms the hub while the test's own client must recover too
    pytester.makepyfile("""
        from pytest_iotfailover import Outbox, assert_all_delivered

        def test_storm(iothub, device_client, failover, iothub_fleet):
            fleet = iothub_fleet(4, rate=2, per_process=2)
            outbox = Outbox(device_client)
            handle = failover.outage(1)
            for i in range(10):
                outbox.send({"reading": i})
            assert_all_delivered(iothub, outbox, timeout=60)
            handle.wait(60)
            fleet.wait_recovered(handle.started_at, timeout=60)
            assert fleet.acknowledged_ids()
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=1)
