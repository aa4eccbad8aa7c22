"""`iotfailover-hub` / `python -m pytest_iotfailover.hub`: a fake IoT Hub as a standalone process.

For device code that does not run inside pytest (the Node SDK, a firmware simulator, a shell
script): the hub listens like the embedded one, and once it is ready it writes an info file with
the connection strings, the CA certificate path and the control API's address and token. It runs
until SIGTERM or Ctrl-C, then removes the files it wrote.
"""
import argparse
import json
import logging
import os
import select
import signal
import socket
import sys
import tempfile
from typing import Dict, List, Optional

from .hub import FakeHub
from .hub import HubInternalError
from ..iothub.auth import redact
from .control_api import ControlServer
from ..iothub.registry import check_device_id

PROG = "iotfailover-hub"
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the command line: reported on one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # argparse's default adds a usage block; one line is easier to spot in a CI log
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port {text!r} is not an integer") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range 0-65535")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Run a fake Azure IoT Hub that unmodified device SDKs can connect to.",
                epilog="The info file holds device keys and the control token, so it is written with mode "
                       "0600, never printed, and removed with the CA file when the hub stops.")
    p.add_argument("--hub-name", default="testhub",
                   help="IoT Hub name; devices see <name>.azure-devices.net (default: %(default)s)")
    p.add_argument("--device", action="append", default=[], metavar="ID", dest="devices",
                   help="register a device at start-up (repeatable)")
    p.add_argument("--host", default=None,
                   help="loopback address to listen on (default: the first free one of 127.0.0.1, 127.0.0.2, ...)")
    p.add_argument("--port", type=_port, default=8883,
                   help="MQTT/TLS port; the device SDKs only dial 8883 (default: %(default)s)")
    p.add_argument("--control-port", type=_port, default=0,
                   help="port of the HTTP control API on the hub's address (default: any free port)")
    p.add_argument("--info-file", default=None, metavar="PATH",
                   help="write the hub's details here as JSON once it is listening "
                        "(default: a file in a new temporary directory, whose path is printed on stdout)")
    p.add_argument("-v", "--verbose", action="store_true", help="log control API requests to stderr")
    return p


def _write_private(path: str, text: str, mode: int = 0o600) -> None:
    """Write `text` so readers see either no file or the whole file, never a partial one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _check_args(args) -> None:
    seen = set()
    for device_id in args.devices:
        try:
            check_device_id(device_id)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if device_id in seen:
            raise UsageError(f"device {device_id!r} given twice")
        seen.add(device_id)
    if args.info_file is not None:
        info_dir = os.path.dirname(os.path.abspath(args.info_file))
        if not os.path.isdir(info_dir):
            raise UsageError(f"directory of --info-file {info_dir!r} does not exist")
        if os.path.isdir(args.info_file):
            raise UsageError(f"--info-file {args.info_file!r} is a directory")


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag the main thread waits on without races.

    The wake-up fd gets a byte from the C-level handler as soon as a signal lands, so a signal that
    arrives just before the main thread starts waiting still ends the wait at once.
    """

    def __init__(self):
        self.received: Optional[int] = None
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._old_fd = signal.set_wakeup_fd(self._writer.fileno())
        self._old_handlers = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum

    def wait(self) -> int:
        while self.received is None:
            select.select([self._reader], [], [], 1.0)
            try:
                while self._reader.recv(64):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
        return self.received

    def restore(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._old_fd)
        self._reader.close()
        self._writer.close()


def _info(hub: FakeHub, control: ControlServer, ca_path: str, devices: Dict[str, str]) -> dict:
    return {
        "hub_name": hub.hub_name,
        "hostname": hub.hostname,
        "gateway_host": hub.gateway_host,
        "port": hub.port,
        "ca_pem_path": ca_path,
        "devices": devices,
        "control_url": control.url,
        "control_token": control.token,
        "pid": os.getpid(),
    }


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {redact(message)}", file=sys.stderr, flush=True)
    return code


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format=f"{PROG}: %(levelname)s %(name)s: %(message)s")
    try:
        _check_args(args)
        hub = FakeHub(args.hub_name, host=args.host, port=args.port)
    except (UsageError, ValueError) as exc:
        return _fail(str(exc), EXIT_USAGE)

    if args.info_file is not None and os.path.isfile(args.info_file):
        # a leftover from an earlier run must not be mistaken for this hub's details
        os.unlink(args.info_file)
    # installed before anything starts, so a signal during start-up still leads to a clean stop
    stop = _StopSignal()
    control: Optional[ControlServer] = None
    created: List[str] = []
    temp_dir: Optional[str] = None
    code = 0
    try:
        try:
            hub.start()
        except OSError as exc:
            return _fail(exc.strerror or str(exc), EXIT_USAGE)
        devices = {d: hub.add_device(d).connection_string for d in args.devices}
        try:
            control = ControlServer(hub, hub.gateway_host, args.control_port).start()
        except (OSError, ValueError) as exc:
            return _fail(getattr(exc, "strerror", None) or str(exc), EXIT_USAGE)

        if args.info_file is not None:
            info_path = os.path.abspath(args.info_file)
            ca_path = os.path.splitext(info_path)[0] + "-ca.pem"
        else:
            # keys go to a private file, never to the terminal; stdout carries only its path
            temp_dir = tempfile.mkdtemp(prefix="iotfailover-hub-")
            info_path = os.path.join(temp_dir, "info.json")
            ca_path = os.path.join(temp_dir, "ca.pem")
        _write_private(ca_path, hub.ca_pem, 0o644)
        created.append(ca_path)
        info = _info(hub, control, ca_path, devices)
        _write_private(info_path, json.dumps(info, indent=2) + "\n")
        created.append(info_path)
        where = f"info in {info_path}"
        if args.info_file is None:
            print(info_path, flush=True)
        print(f"{PROG}: {hub.hostname} listening on {_hostport(hub.gateway_host, hub.port)}; "
              f"control API {control.url}; {where}", file=sys.stderr, flush=True)

        signum = stop.wait()
        logging.getLogger(__name__).debug("stopping on signal %d", signum)
    except Exception as exc:
        logging.getLogger(__name__).debug("start-up failed", exc_info=True)
        code = _fail(f"{type(exc).__name__}: {exc}", 1)
    finally:
        if control is not None:
            control.stop()
        try:
            hub.stop()
        except HubInternalError as exc:
            code = _fail(str(exc), 1)
        for path in created:
            try:
                os.unlink(path)
            except OSError:
                pass
        if temp_dir is not None:
            try:
                os.rmdir(temp_dir)
            except OSError:
                pass
        stop.restore()
    return code


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


if __name__ == "__main__":
    sys.exit(main())
