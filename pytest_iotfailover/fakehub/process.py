"""The standalone hub (`iotfailover-hub`) in a child process, driven through its control API.

A fleet of a thousand SDK clients is more than one interpreter carries with the hub inside it
(paho's `select()` loop caps a process at about 340 clients, and hub and clients would compete for
one GIL). `StandaloneHub` starts the hub in its own process, so its CPU is measured apart from the
clients' and the test process stays light, and gives the few control API calls a fleet run needs:
register devices, start and await faults, read the ledger. It hands out plain data only (host
names, CA PEM, connection strings), which is what `devices.fleet.FleetRunner` takes.

The control token and device keys stay in memory: they are registered with the redaction module,
never printed, and the hub removes the files holding them when it stops.
"""
import http.client
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from .. import checks
from ..errors import HubOperationError
from ..procstat import process_cpu_seconds
from ..redaction import redact, remember, remember_keys_of
from .shaping import BULK_REGISTRY_LIMIT

__all__ = ["StandaloneHub", "hub_supports_option", "process_cpu_seconds"]

# The device SDKs only dial 8883 (README "The embedded hub"), so a fleet's hub listens there.
SDK_PORT = 8883


def _remember_keys(*connection_strings: str) -> None:
    remember_keys_of(*connection_strings)


def hub_supports_option(option: str, timeout: float = 30.0) -> bool:
    """Whether `iotfailover-hub --help` lists `option` (for example `--tier`)."""
    out = subprocess.run([sys.executable, "-m", "pytest_iotfailover.fakehub", "--help"], check=False,
                         capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return option in out.stdout.split()


class StandaloneHub:
    """`iotfailover-hub` in a child process: `start()` returns once it listens, `stop()` always
    ends it (SIGTERM, then SIGKILL after `stop_timeout`).

    `args` go to the command line unchanged (`--hub-name`, and options a later hub may have).
    `devices` are registered at start-up (`--device`), which is much faster for a thousand than
    `add_devices`: each control API request costs about 40 ms here (see `add_devices`).
    """

    def __init__(self, *args: str, devices: Iterable[str] = (), start_timeout: float = 30.0,
                 stop_timeout: float = 10.0, port: int = SDK_PORT):
        self._args = [str(a) for a in args]
        for device_id in devices:
            self._args += ["--device", device_id]
        self._start_timeout = checks.required_seconds("start_timeout", start_timeout, positive=True)
        self._stop_timeout = checks.required_seconds("stop_timeout", stop_timeout, positive=True)
        self._port = checks.integer("port", port, minimum=0, maximum=65535)
        self._proc: subprocess.Popen | None = None
        self._dir: str | None = None
        self._info: dict[str, Any] = {}
        self._ca_pem = ""
        self._conn: http.client.HTTPConnection | None = None

    # --- life cycle ----------------------------------------------------------------------------

    def start(self) -> "StandaloneHub":
        if self._proc is not None:
            raise RuntimeError("this StandaloneHub was already started")
        self._dir = tempfile.mkdtemp(prefix="iotfailover-fleet-hub-")
        with open(os.path.join(self._dir, "hub.err"), "wb") as stderr:
            # without --info-file the hub prints only its info file's path, once it listens
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "pytest_iotfailover.fakehub", "--port", str(self._port), *self._args],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
        try:
            info_path = self._read_info_path()
            with open(info_path, encoding="utf-8") as f:
                self._info = json.load(f)
            remember(self._info["control_token"])
            _remember_keys(*self._info["devices"].values())
            with open(self._info["ca_pem_path"], encoding="utf-8") as f:
                self._ca_pem = f.read()
        except BaseException:
            self.stop()
            raise
        return self

    def _read_info_path(self) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + self._start_timeout
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"iotfailover-hub did not start within {self._start_timeout:g} s; "
                                       f"stderr: {self.stderr()}")
                if sel.select(left):
                    chunk = os.read(self._proc.stdout.fileno(), 4096)
                    if not chunk:
                        code = self._proc.wait(5)
                        raise RuntimeError(f"iotfailover-hub exited with code {code} before listening: "
                                           f"{self.stderr()}")
                    line += chunk
        return line.decode().strip()

    def stderr(self) -> str:
        """What the hub wrote on stderr so far (redacted), for error messages."""
        if self._dir is None:
            return ""
        try:
            with open(os.path.join(self._dir, "hub.err"), "rb") as f:
                return redact(f.read().decode("utf-8", "replace").strip())
        except OSError:
            return ""

    def stop(self) -> int | None:
        """End the hub (idempotent); its exit code, negative for a signal."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self._stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(self._stop_timeout)
        if proc.stdout is not None:
            proc.stdout.close()
        if self._dir is not None:
            for name in os.listdir(self._dir):
                os.unlink(os.path.join(self._dir, name))
            os.rmdir(self._dir)
            self._dir = None
        return proc.returncode

    def __enter__(self) -> "StandaloneHub":  # noqa: PYI034 - the class is not meant for subclassing
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # --- where devices connect -------------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the hub is not started")
        return self._proc.pid

    hostname = property(lambda self: self._info["hostname"])
    gateway_host = property(lambda self: self._info["gateway_host"])
    ca_pem = property(lambda self: self._ca_pem)

    def cpu_seconds(self) -> float | None:
        return process_cpu_seconds(self.pid)

    @property
    def devices(self) -> dict[str, str]:
        """The devices registered at start-up: id -> connection string."""
        return dict(self._info.get("devices", {}))

    def fleet_info(self, devices: dict[str, str] | None = None) -> dict[str, Any]:
        """The plain data `FleetRunner` takes: host names, CA PEM and the devices' connection
        strings (by default those registered at start-up)."""
        return {"hostname": self.hostname, "gateway_host": self.gateway_host, "ca_pem": self.ca_pem,
                "devices": dict(self.devices if devices is None else devices)}

    # --- control API -----------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
        """One control API call; the decoded answer, or HubOperationError naming the status."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self._info['control_token']}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            conn = self._connection(timeout)
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (http.client.HTTPException, ConnectionError):
                # the API closes idle keep-alive connections after 60 s: one fresh try
                conn.close()
                self._conn = None
                if attempt == 2:
                    raise
        answer = json.loads(raw) if raw else None
        if resp.status >= 400:
            why = answer.get("error") if isinstance(answer, dict) else raw[:200].decode("utf-8", "replace")
            raise HubOperationError(redact(f"{method} {path}: HTTP {resp.status}: {why}"), resp.status)
        return answer

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._conn is None:
            url = urlsplit(self._info["control_url"])
            self._conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=timeout)
        self._conn.timeout = timeout
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        return self._conn

    def add_devices(self, device_ids: Iterable[str]) -> dict[str, str]:
        """Register the devices; id -> connection string.

        Bulk requests of at most 100 devices (`POST /devices` with `device_ids`), as IoT Hub's bulk
        registry API takes: each is one request and one wait in the tier's registry throttle. A
        request takes about 40 ms here: the control API answers in two TCP segments (headers, then
        body), and Nagle's algorithm with the client's delayed ACK holds the second back."""
        ids = list(device_ids)
        out = {}
        for start in range(0, len(ids), BULK_REGISTRY_LIMIT):
            answer = self.request("POST", "/devices", {"device_ids": ids[start:start + BULK_REGISTRY_LIMIT]})
            for device in answer["devices"]:
                _remember_keys(device["connection_string"])
                out[device["device_id"]] = device["connection_string"]
        return out

    def remove_device(self, device_id: str) -> None:
        """Delete the identity (`DELETE /devices/{id}`); a connected device is disconnected."""
        self.request("DELETE", f"/devices/{quote(device_id, safe='')}")

    def feedback(self, device_id: str | None = None, message_id: str | None = None) -> list[dict[str, Any]]:
        """The hub's C2D feedback records (`GET /feedback`), oldest first, as the control API gives them."""
        query = urlencode({k: v for k, v in (("device_id", device_id), ("message_id", message_id)) if v is not None})
        return self.request("GET", "/feedback" + (f"?{query}" if query else ""))

    def start_fault(self, kind: str, **kwargs: Any) -> dict[str, Any]:
        return self.request("POST", f"/faults/{quote(kind, safe='')}", kwargs)

    def wait_fault(self, fault_id: int, timeout: float = 60.0) -> dict[str, Any]:
        """The fault with its `report` once it is over (HubOperationError 504 after `timeout`)."""
        return self.request("POST", f"/faults/{fault_id}/wait", {"timeout": timeout}, timeout=timeout + 30)

    def telemetry(self, device_id: str | None = None) -> list[dict[str, Any]]:
        path = "/telemetry" if device_id is None else f"/telemetry?device_id={quote(device_id, safe='')}"
        return self.request("GET", path, timeout=120)

    def ledger_ids(self) -> set[tuple[str, str]]:
        """(device_id, message_id) of every message the hub accepted."""
        return {(t["device_id"], t["message_id"]) for t in self.telemetry()}

    def missing_from_ledger(self, acknowledged: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """The acknowledged (device_id, message_id) pairs the hub's ledger does not hold."""
        ledger = self.ledger_ids()
        return [pair for pair in acknowledged if pair not in ledger]
