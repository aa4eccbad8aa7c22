"""Spotting and reviving SDK clients that died silently.

azure-iot-device 2.14 runs each client's MQTT connection on paho-mqtt 1.6's network thread. paho
catches only `ConnectionError` around its socket writes; an `ssl.SSLEOFError` (what OpenSSL reports
when the peer resets or closes the TCP connection under TLS) escapes and ends the thread. That
happens reliably when a connection is reset right after CONNACK, while paho re-sends its
unacknowledged QoS 1 publishes from inside its CONNACK handler (paho/mqtt/client.py,
`_handle_connack` -> `loop_write` -> `_packet_write`). paho's disconnect callback never runs, so the
SDK never learns of the loss: `client.connected` stays True, `connection_retry` never starts, and
every later `send_message` waits for a PUBACK that cannot come. The failing path was read from the
installed paho and SDK sources and reproduced with a peer that sends CONNACK and resets at once
(tests/test_wedge.py); whether other exceptions end the thread the same way is not examined.

This module knows where the thread lives (the SDK's MQTT transport holds the paho client, whose
loop thread is `_thread`), records why a watched thread died, and can revive such a client by
running the SDK's own disconnect handler, so that the SDK's `connection_retry` reconnects it. The
process-wide list of findings, which the fixtures and the recovery report read to name the clients
concerned, lives in the leaf module `wedge_findings` (the hub's report reads it without importing
the device side).

Nothing here imports the SDK: the hub's report reads the findings without depending on a client.
"""
import functools
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from ..deadline import Call
from ..wedge_findings import Wedge, findings, note_once, record

__all__ = [
    "Wedge",
    "WedgeMonitor",
    "diagnose",
    "findings",
    "paho_of",
    "record",
    "release",
    "revive",
    "watch",
]

_DEATH = "_iotfailover_death"     # (time.time(), exception, thread) set by the wrapped thread target
_DEVICE = "_iotfailover_device"
_WRAPPED = "_iotfailover_wrapped"
# A thread can end cleanly an instant before the SDK marks the client disconnected (it stops
# paho's loop first, then updates its state); a dead thread with no recorded exception counts only
# once it has stayed so this long.
DEAD_THREAD_GRACE = 1.0
# paho 1.6 MQTT_ERR_CONN_LOST: the result code its own loop hands the disconnect callback on a loss
_MQTT_ERR_CONN_LOST = 7
_REVIVE_TIMEOUT = 10.0


_lock = threading.Lock()
_revived: "weakref.WeakSet" = weakref.WeakSet()    # dead threads already revived
_dead_since: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def paho_of(client: Any):
    """The paho client inside an azure-iot-device client (sync or aio), or None if not found."""
    pipeline = getattr(client, "_mqtt_pipeline", None)
    stage = getattr(pipeline, "_pipeline", None)
    for _ in range(64):  # the SDK's pipeline has about 15 stages; a bound guards against a cycle
        if stage is None:
            return None
        transport = getattr(stage, "transport", None)
        paho = getattr(transport, "_mqtt_client", None)
        if paho is not None and hasattr(paho, "_thread"):
            return paho
        stage = getattr(stage, "next", None)
    return None


def device_id_of(client: Any) -> str | None:
    paho = paho_of(client)
    if paho is not None and getattr(paho, _DEVICE, None):
        return getattr(paho, _DEVICE)
    config = getattr(getattr(client, "_mqtt_pipeline", None), "pipeline_configuration", None)
    return getattr(config, "device_id", None)


def watch(client: Any, device_id: str | None = None) -> bool:
    """Record the time and exception of any later death of `client`'s network thread.

    paho starts a new thread on every connect from its `_thread_main`, looked up on the instance,
    so wrapping it there covers every later connection. A thread already running is not covered;
    `diagnose` still spots it, after DEAD_THREAD_GRACE. Returns False if the SDK's paho client
    cannot be found (another SDK version)."""
    paho = paho_of(client)
    if paho is None:
        return False
    if device_id:
        setattr(paho, _DEVICE, device_id)
    if getattr(paho, _WRAPPED, False):
        return True
    original = paho._thread_main

    def thread_main():
        try:
            original()
        except BaseException as exc:
            setattr(paho, _DEATH, (time.time(), exc, threading.current_thread()))
            raise  # still reported by threading.excepthook, as before
    paho._thread_main = thread_main
    setattr(paho, _WRAPPED, True)
    return True


def diagnose(client: Any, grace: float = DEAD_THREAD_GRACE) -> Wedge | None:
    """A `Wedge` if `client` says it is connected but its network thread is dead, else None.

    The first call that sees it records the finding (see `findings`)."""
    paho = paho_of(client)
    if paho is None:
        return None
    thread = paho._thread
    try:
        connected = bool(client.connected)
    except Exception:
        return None
    if thread is None or thread.is_alive() or not connected:
        return None
    death = getattr(paho, _DEATH, None)
    if death is not None and death[2] is thread:
        died_at, exc = death[0], death[1]
        error = type(exc).__name__
        how = f"the SDK's network thread died at {_clock(died_at)} ({error})"
    else:
        now = time.monotonic()
        with _lock:
            first = _dead_since.setdefault(thread, now)
        if now - first < grace:
            return None
        died_at, error = None, None
        how = "the SDK's network thread has ended"
    device_id = getattr(paho, _DEVICE, None) or device_id_of(client) or "a device client"
    return note_once(thread, Wedge(device_id, time.time(), died_at, error,
                               f"{device_id}: {how}; it still reports connected"))


def hub_disagrees(client: Any, device_id: str, since: float) -> Wedge:
    """A finding for a client that says it is connected while the hub has had no connection from
    it since `since` (time.monotonic())."""
    gone = time.monotonic() - since
    paho = paho_of(client)
    key = paho._thread if paho is not None and paho._thread is not None else None
    wedge = Wedge(device_id, time.time(), None, None,
                  f"{device_id}: the hub has had no connection from it for {gone:.1f} s; "
                  "it still reports connected")
    return note_once(key, wedge) if key is not None else record(wedge)


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 10)}"


def revive(client: Any, timeout: float = _REVIVE_TIMEOUT) -> bool:
    """Make the SDK notice that a wedged client's connection is gone, so it reconnects.

    Runs the SDK's own paho disconnect handler, as paho would have on a loss: the SDK cleans the
    transport up, marks the client disconnected, fires `on_connection_state_change` and, with
    `connection_retry` on (its default), reconnects; paho then re-sends the unacknowledged
    publishes and the `send_message` calls waiting on them return. With `connection_retry=False`
    those calls fail with `OperationCancelled` instead and the next call reconnects (with
    `auto_connect`). The dead connection's socket and paho's wake-up socket pair are closed first.

    Runs on a daemon thread and waits at most `timeout` s for it. Returns False if `client` is not
    wedged (or was revived already)."""
    paho = paho_of(client)
    if paho is None:
        return False
    thread = paho._thread
    if thread is None or thread.is_alive():
        return False
    with _lock:
        if thread in _revived:
            return False
        _revived.add(thread)

    def run():
        try:
            paho._reset_sockets()
        except Exception:
            pass  # already closed
        handler = paho.on_disconnect
        if handler is None:
            return  # the client is being shut down: nothing left to revive
        handler(paho, getattr(paho, "_userdata", None), _MQTT_ERR_CONN_LOST)
    def quietly():
        try:
            run()
        except Exception:
            pass
    Call(quietly, "iotfailover:revive").wait(timeout)
    return True


def release(client: Any) -> None:
    """Close the sockets a wedged client keeps after `shutdown()` (its dead connection and paho's
    socket pair), which otherwise stay open until the process exits."""
    paho = paho_of(client)
    if paho is None or (paho._thread is not None and paho._thread.is_alive()):
        return
    try:
        paho._reset_sockets()
    except Exception:
        pass


class WedgeMonitor:
    """Watches device clients on one daemon thread; on finding one wedged it records the finding,
    calls `on_wedge(client, wedge)` and, if `heal`, revives the client.

    `liveness_probe()` may return the device ids the hub sees connected (None when unknown); a
    client that says it is connected while the hub has not seen it for `probe_grace` s counts as
    wedged too."""

    def __init__(self, *, interval: float = 0.25, heal: bool = True,
                 liveness_probe: Callable[[], Iterable[str] | None] | None = None,
                 probe_grace: float = 10.0, on_wedge: Callable[[Any, Wedge], None] | None = None):
        self.interval = interval
        self.heal = heal
        self.liveness_probe = liveness_probe
        self.probe_grace = probe_grace
        self.on_wedge = on_wedge
        # weak: a client shut down without `remove` (e.g. by a test itself) must not be kept alive
        self._clients: dict[int, weakref.ref] = {}
        self._device: dict[int, str] = {}
        self._absent_since: dict[int, float] = {}
        self._found: dict[int, list[Wedge]] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def add(self, client: Any, device_id: str) -> None:
        watch(client, device_id)
        with self._cond:
            key = id(client)
            self._clients[key] = weakref.ref(client, functools.partial(self._drop_ref, key))
            self._device[key] = device_id
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="iotfailover:wedge-monitor",
                                                daemon=True)
                self._thread.start()

    def _drop_ref(self, key: int, _ref: Any) -> None:
        self._forget(key)

    def _forget(self, key: int) -> None:
        with self._cond:
            self._clients.pop(key, None)
            self._device.pop(key, None)
            self._absent_since.pop(key, None)
            self._found.pop(key, None)

    def remove(self, client: Any) -> list[Wedge]:
        """Stop watching `client`; the wedges found on it."""
        with self._cond:
            self._clients.pop(id(client), None)
            self._device.pop(id(client), None)
            self._absent_since.pop(id(client), None)
            return self._found.pop(id(client), [])

    def found(self, client: Any) -> list[Wedge]:
        with self._cond:
            return list(self._found.get(id(client), []))

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def check(self) -> None:
        """One pass over the watched clients (the monitor thread calls this every `interval`)."""
        with self._cond:
            clients = [(k, r()) for k, r in self._clients.items()]
        clients = [(k, c) for k, c in clients if c is not None]
        if not clients:
            return
        connected_on_hub = None
        if self.liveness_probe is not None:
            try:
                ids = self.liveness_probe()
                connected_on_hub = None if ids is None else set(ids)
            except Exception:
                connected_on_hub = None  # the hub is gone or busy: no opinion
        now = time.monotonic()
        for key, client in clients:
            wedge = diagnose(client)
            device_id = self._device.get(key)
            if wedge is None and connected_on_hub is not None and device_id is not None:
                says_connected = bool(getattr(client, "connected", False))
                if says_connected and device_id not in connected_on_hub:
                    with self._cond:
                        since = self._absent_since.setdefault(key, now)
                    if now - since >= self.probe_grace:
                        wedge = hub_disagrees(client, device_id, since)
                        with self._cond:
                            self._absent_since.pop(key, None)
                else:
                    with self._cond:
                        self._absent_since.pop(key, None)
            if wedge is None:
                continue
            with self._cond:
                if key not in self._clients:
                    continue
                seen = self._found.setdefault(key, [])
                if any(w.text == wedge.text for w in seen):
                    continue
                seen.append(wedge)
            if self.on_wedge is not None:
                try:
                    self.on_wedge(client, wedge)
                except Exception:
                    pass  # a reporting hook must not stop the monitor
            if self.heal and not revive(client):
                _force_loss(client)

    def _run(self) -> None:
        while True:
            with self._cond:
                # with nothing to watch the thread ends (add() starts another): none lingers
                # after the tests' clients are shut down
                if self._stopped or not self._clients:
                    self._thread = None
                    return
                self._cond.wait(self.interval)
                if self._stopped:
                    self._thread = None
                    return
            try:
                self.check()
            except Exception:
                pass  # keep watching; one odd client must not blind the monitor to the others


def _force_loss(client: Any) -> None:
    """A client the hub has lost while its network thread still runs: have paho drop the socket,
    so that its own loop reports the loss to the SDK."""
    paho = paho_of(client)
    sock = getattr(paho, "_sock", None) if paho is not None else None
    if sock is None:
        return
    try:
        import socket
        sock.shutdown(socket.SHUT_RDWR)
    except Exception:
        pass
