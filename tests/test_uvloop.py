"""Choosing the hub's event loop: plain asyncio, or uvloop from the `[fast]` extra.

The real SDK client runs against a uvloop hub when uvloop is importable; without it those tests
are skipped and the rest check that asyncio is what runs.
"""
import asyncio
import importlib.util
import sys

import pytest
from azure.iot.device import Message
from sdk_support import Inbox, bounded, make_client

from pytest_iotfailover import FakeHub
from pytest_iotfailover.fakehub import cli
from pytest_iotfailover.fakehub.hub import LOOP_ENV

pytestmark = pytest.mark.timeout(45)

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None
needs_uvloop = pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed (pip install '.[fast]')")


def loop_class(hub):
    return hub._call(lambda: type(asyncio.get_running_loop()))


def test_asyncio_when_asked_even_with_the_env_var_saying_uvloop(monkeypatch):
    monkeypatch.setenv(LOOP_ENV, "uvloop")
    with FakeHub("loophub", loop="asyncio") as hub:
        assert hub.loop_name == "asyncio"
        assert loop_class(hub).__module__.startswith("asyncio")


def test_env_var_picks_the_loop(monkeypatch):
    monkeypatch.setenv(LOOP_ENV, "asyncio")
    with FakeHub("loophub") as hub:
        assert hub.loop_name == "asyncio"


def test_auto_takes_uvloop_only_when_installed(monkeypatch):
    monkeypatch.delenv(LOOP_ENV, raising=False)
    hub = FakeHub("loophub", loop="auto")
    assert hub.loop_name == ("uvloop" if HAVE_UVLOOP else "asyncio")


@pytest.mark.parametrize("where", ["argument", "env"])
def test_unknown_loop_is_refused_by_name(monkeypatch, where):
    if where == "env":
        monkeypatch.setenv(LOOP_ENV, "trio")
        with pytest.raises(ValueError, match=rf"{LOOP_ENV} 'trio'.*auto, asyncio, uvloop"):
            FakeHub("loophub")
    else:
        with pytest.raises(ValueError, match=r"loop 'trio'.*auto, asyncio, uvloop"):
            FakeHub("loophub", loop="trio")


def test_uvloop_asked_but_missing_is_a_clear_error(monkeypatch):
    # None in sys.modules makes `import uvloop` raise ImportError, as on a machine without it
    monkeypatch.setitem(sys.modules, "uvloop", None)
    with pytest.raises(ValueError, match=r"uvloop is not installed.*\[fast\]"):
        FakeHub("loophub", loop="uvloop")
    assert FakeHub("loophub", loop="auto").loop_name == "asyncio"


def test_cli_loop_option(capsys):
    assert cli.build_parser().parse_args(["--loop", "asyncio"]).loop == "asyncio"
    assert cli.build_parser().parse_args([]).loop is None
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["--loop", "trio"])
    assert exc.value.code == cli.EXIT_USAGE
    assert "--loop" in capsys.readouterr().err


@needs_uvloop
def test_sdk_client_against_a_uvloop_hub():
    import uvloop

    with FakeHub("uvloophub", loop="uvloop") as hub:
        assert hub.loop_name == "uvloop"
        assert issubclass(loop_class(hub), uvloop.Loop)
        device = hub.add_device("dev-uv")
        client = make_client(hub, device)
        try:
            bounded(client.connect)
            for i in range(20):
                bounded(client.send_message, Message(str(i), message_id=f"m{i}"))
            got = hub.wait_for_telemetry(20, device_id=device.device_id)
            assert [t.message_id for t in got] == [f"m{i}" for i in range(20)]

            inbox = Inbox()
            client.on_message_received = inbox
            hub.send_c2d(device.device_id, "hello", message_id="c-1")
            assert inbox.wait(1)[0].data == b"hello"

            bounded(client.patch_twin_reported_properties, {"fw": "2"})
            assert hub.get_twin(device.device_id)["reported"]["fw"] == "2"

            # a reset connection (SO_LINGER 0 on uvloop's socket) and the SDK's reconnect
            hub.faults.drop(device_id=device.device_id)
            lost = hub.wait_for_event("disconnect", device.device_id, timeout=15)
            hub.wait_for_event("connect", device.device_id, timeout=15, after=lost.at)
            bounded(client.send_message, Message("after", message_id="m-after"), timeout=15)
            hub.wait_for_telemetry(21, device_id=device.device_id, timeout=15)
        finally:
            bounded(client.shutdown)
        assert hub.errors == []
