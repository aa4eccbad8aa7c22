"""`iotfailover-hub` / `python -m pytest_iotfailover.hub`: a fake IoT Hub as a standalone process.

For device code that does not run inside pytest (the Node SDK, a firmware simulator, a shell
script): the hub listens like the embedded one, and once it is ready it writes an info file with
the connection strings, the CA certificate path and the control API's address and token. It runs
until SIGTERM or Ctrl-C, then removes the files it wrote. It never replaces or removes a file it
did not create: if the info file or its CA file already exists, it refuses to start.
"""
import argparse
import errno
import json
import logging
import os
import select
import signal
import socket
import sys
import tempfile

from ..iothub.auth import redact
from ..iothub.registry import check_device_id
from .control_api import REQUEST_TIMEOUT, ControlServer
from .descriptors import raise_fd_limit as _raise_fd_limit
from .hub import LOOP_CHOICES, LOOP_ENV, FakeHub, HubInternalError
from .nap import DEFAULT_NAP, MAX_NAP, NAP_ENV, resolve_nap

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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} s is out of range: more than 0 and at most 3600")
    return value


def _nap_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    try:
        return resolve_nap(value)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Run a fake Azure IoT Hub that unmodified device SDKs can connect to.",
                epilog="The info file holds device keys and the control token, so it is written with mode "
                       "0600, never printed, and removed with the CA file when the hub stops. The hub "
                       "refuses to start if either file already exists: it never replaces or removes a "
                       "file it did not create.")
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
    p.add_argument("--control-request-timeout", type=_seconds, default=REQUEST_TIMEOUT, metavar="SECONDS",
                   help="time a control API client has from a request's first byte to the end of its body "
                        "(default: %(default)g)")
    p.add_argument("--loop", choices=LOOP_CHOICES, default=None,
                   help=f"event loop of the hub: uvloop (installed by the [fast] extra) or plain asyncio; "
                        f"auto takes uvloop when it is installed (default: ${LOOP_ENV}, else auto)")
    p.add_argument("--nap", type=_nap_seconds, default=None, metavar="SECONDS",
                   help=f"longest sleep of the hub after a busy wake-up, so the next one handles several "
                        f"connections' messages at once (all of it from 8 connections on); 0 turns it off, at most {MAX_NAP:g} "
                        f"(default: ${NAP_ENV}, else {DEFAULT_NAP:g})")
    p.add_argument("--tier", default="S1", metavar="TIER",
                   help="IoT Hub tier whose throttles the hub enforces: Free, B1-B3, S1-S3, or none for no "
                        "throttling (default: %(default)s)")
    p.add_argument("--tier-units", type=int, default=1, metavar="UNITS",
                   help="units of --tier (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="log control API requests to stderr")
    return p


class FileExistsRefusal(Exception):
    """A file the hub would write is already there: somebody else's, so the hub leaves it alone."""

    def __init__(self, path: str):
        super().__init__(f"{path} already exists; the hub does not replace or remove files it did not create: "
                         "move it away or choose another --info-file")


# (path, (st_dev, st_ino)) of each file this process created, so that on exit it removes those
# files only, and not one that somebody put in their place meanwhile.
Created = tuple[str, tuple[int, int]]


def _write_new(path: str, text: str, mode: int = 0o600) -> tuple[int, int]:
    """Create `path` holding `text`; FileExistsRefusal if anything is at `path`, never replacing it.

    Readers see either no file or the whole file: the text goes to a temporary file first, which
    is then hard-linked to its name, as link(2), unlike rename(2), fails when the name is taken.
    Where hard links are not supported the file is created exclusively and written in place.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsRefusal(path) from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
            return _write_exclusive(path, text, mode)
        st = os.lstat(path)
        return st.st_dev, st.st_ino
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _write_exclusive(path: str, text: str, mode: int) -> tuple[int, int]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise FileExistsRefusal(path) from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
        st = os.fstat(f.fileno())
    return st.st_dev, st.st_ino


def _remove_created(created: list[Created]) -> None:
    for path, identity in reversed(created):
        try:
            st = os.lstat(path)
        except OSError:
            continue  # already gone
        if (st.st_dev, st.st_ino) != identity:
            print(f"{PROG}: left {path} in place: it was replaced while the hub ran", file=sys.stderr, flush=True)
            continue
        try:
            os.unlink(path)
        except OSError:
            pass


def _output_paths(info_file: str | None) -> tuple[str | None, str | None]:
    """(info file, CA file) for --info-file, or (None, None) when they go to a new temporary directory."""
    if info_file is None:
        return None, None
    info_path = os.path.abspath(info_file)
    return info_path, os.path.splitext(info_path)[0] + "-ca.pem"


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
        # checked before anything listens, so the usual case fails at once; writing the files
        # checks again, as something may appear in between
        for path in _output_paths(args.info_file):
            if path is not None and os.path.lexists(path):
                raise UsageError(str(FileExistsRefusal(path)))


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag the main thread waits on without races.

    The wake-up fd gets a byte from the C-level handler as soon as a signal lands, so a signal that
    arrives just before the main thread starts waiting still ends the wait at once.
    """

    def __init__(self):
        self.received: int | None = None
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


def _info(hub: FakeHub, control: ControlServer, ca_path: str, devices: dict[str, str]) -> dict:
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format=f"{PROG}: %(levelname)s %(name)s: %(message)s")
    try:
        _check_args(args)
        tier = None if args.tier.strip().lower() in ("none", "off") else args.tier
        hub = FakeHub(args.hub_name, host=args.host, port=args.port, loop=args.loop, tier=tier,
                      units=args.tier_units, nap=args.nap)
    except (UsageError, ValueError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    fd_limit = _raise_fd_limit()
    logging.getLogger(__name__).debug("open file limit: %s", fd_limit)

    # installed before anything starts, so a signal during start-up still leads to a clean stop
    stop = _StopSignal()
    run = _Run()
    try:
        code = _serve(args, hub, stop, run)
    except Exception as exc:
        logging.getLogger(__name__).debug("start-up failed", exc_info=True)
        code = _fail(f"{type(exc).__name__}: {exc}", 1)
    finally:
        code = _shut_down(hub, run, code)
        stop.restore()
    return code


class _Run:
    """What a run started and must undo: the control API, the files it created, a private folder."""

    def __init__(self) -> None:
        self.control: ControlServer | None = None
        self.created: list[Created] = []
        self.temp_dir: str | None = None


def _serve(args: argparse.Namespace, hub: FakeHub, stop: "_StopSignal", run: _Run) -> int:
    try:
        hub.start()
    except OSError as exc:
        return _fail(exc.strerror or str(exc), EXIT_USAGE)
    devices = {d: hub.add_device(d, throttle=False).connection_string for d in args.devices}  # set-up
    try:
        run.control = control = ControlServer(hub, str(hub.gateway_host), args.control_port,
                                              request_timeout=args.control_request_timeout).start()
    except (OSError, ValueError) as exc:
        return _fail(getattr(exc, "strerror", None) or str(exc), EXIT_USAGE)

    info_path, ca_path = _output_paths(args.info_file)
    if info_path is None or ca_path is None:
        # keys go to a private file, never to the terminal; stdout carries only its path
        run.temp_dir = tempfile.mkdtemp(prefix="iotfailover-hub-")
        info_path = os.path.join(run.temp_dir, "info.json")
        ca_path = os.path.join(run.temp_dir, "ca.pem")
    try:
        run.created.append((ca_path, _write_new(ca_path, str(hub.ca_pem), 0o644)))
        info = _info(hub, control, ca_path, devices)
        run.created.append((info_path, _write_new(info_path, json.dumps(info, indent=2) + "\n")))
    except FileExistsRefusal as exc:
        return _fail(str(exc), 1)
    if args.info_file is None:
        print(info_path, flush=True)
    print(f"{PROG}: {hub.hostname} listening on {_hostport(str(hub.gateway_host), int(hub.port or 0))}; "
          f"control API {control.url}; info in {info_path}; {hub.loop_name} loop", file=sys.stderr, flush=True)
    signum = stop.wait()
    logging.getLogger(__name__).debug("stopping on signal %d", signum)
    return 0


def _shut_down(hub: FakeHub, run: _Run, code: int) -> int:
    if run.control is not None:
        run.control.stop()
    try:
        hub.stop()
    except HubInternalError as exc:
        code = _fail(_head(str(exc)), 1)
    _remove_created(run.created)
    if run.temp_dir is not None:
        try:
            os.rmdir(run.temp_dir)
        except OSError:
            pass
    return code


def _head(text: str, lines: int = 60) -> str:
    """The start of a long report: a failure repeated thousands of times (a descriptor limit
    reached on every accept) would otherwise bury everything else on stderr."""
    all_lines = text.splitlines()
    if len(all_lines) <= lines:
        return text
    return "\n".join(all_lines[:lines] + [f"... and {len(all_lines) - lines} more lines"])


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


if __name__ == "__main__":
    sys.exit(main())
