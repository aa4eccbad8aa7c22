"""One frozen `Settings` from command line, environment and ini file, validated once.

Precedence: command line, then environment variable, then ini file, then the default — so a CI
job can override what a repository commits to its ini file without editing it.
"""
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .hub.auth import parse_connection_string


class SettingsError(ValueError):
    """A setting has an unusable value; the message names the option."""


@dataclass(frozen=True)
class Option:
    name: str            # dest, ini name
    flag: str            # command-line flag
    env: str             # environment variable
    help: str
    parse: Callable[[str, str], Any]
    default: Any = None
    secret: bool = False
    metavar: str = "VALUE"


def _int_between(lo: int, hi: int):
    def parse(flag: str, raw: str) -> int:
        try:
            value = int(str(raw).strip())
        except ValueError:
            raise SettingsError(f"{flag} must be a whole number of seconds, got {raw!r}") from None
        if not lo <= value <= hi:
            raise SettingsError(f"{flag} must be between {lo} and {hi}, got {value}")
        return value
    return parse


def _positive_seconds(flag: str, raw: str) -> float:
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise SettingsError(f"{flag} must be a number of seconds, got {raw!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise SettingsError(f"{flag} must be a positive number of seconds, got {raw!r}")
    return value


def _hub_name(flag: str, raw: str) -> str:
    from .hub import _HUB_NAME
    value = str(raw).strip()
    if not _HUB_NAME.match(value):
        raise SettingsError(f"{flag} must be 3-50 lower-case letters, digits and hyphens, got {value!r}")
    return value


def _connection_string(flag: str, raw: str) -> Optional[str]:
    value = str(raw).strip()
    if not value:
        return None
    try:
        parts = parse_connection_string(value)
    except ValueError as exc:
        # the parser's messages name keys, never values
        raise SettingsError(f"{flag} is not an IoT Hub connection string: {exc}") from None
    if "SharedAccessKey" not in parts and "SharedAccessSignature" not in parts:
        raise SettingsError(f"{flag} has no SharedAccessKey: give a service (SharedAccessKeyName=…) "
                            "or device (DeviceId=…) connection string")
    return value


OPTIONS = (
    Option("iothub_connection", "--iothub-connection", "IOTHUB_CONNECTION_STRING",
           "run against a real IoT Hub with this service or device connection string "
           "(default: the embedded fake hub). Prefer the environment variable: command lines are visible "
           "to other users of the machine.", _connection_string, None, secret=True, metavar="CONNECTION_STRING"),
    Option("iothub_hub_name", "--iothub-hub-name", "IOTFAILOVER_HUB_NAME",
           "name of the embedded hub (<name>.azure-devices.net); default: testhub", _hub_name, "testhub",
           metavar="NAME"),
    Option("iothub_keep_alive", "--iothub-keep-alive", "IOTFAILOVER_KEEP_ALIVE",
           "keep_alive of fixture device clients in seconds (1-1740); default: 5", _int_between(1, 1740), 5,
           metavar="SECONDS"),
    Option("iothub_retry_interval", "--iothub-retry-interval", "IOTFAILOVER_RETRY_INTERVAL",
           "connection_retry_interval of fixture device clients in seconds (>= 1); default: 1",
           _int_between(1, 3600), 1, metavar="SECONDS"),
    Option("iothub_timeout", "--iothub-timeout", "IOTFAILOVER_TIMEOUT",
           "pytest-timeout for tests that use the failover fixture or marker and set none of their own; "
           "default: 60, or more for long outages", _positive_seconds, None, metavar="SECONDS"),
    Option("iothub_outage", "--iothub-outage", "IOTFAILOVER_OUTAGE",
           "outage of failover() on the embedded hub, in seconds; default: 2", _positive_seconds, 2.0,
           metavar="SECONDS"),
)


@dataclass(frozen=True)
class Settings:
    connection_string: Optional[str] = field(default=None, repr=False)
    hub_name: str = "testhub"
    keep_alive: int = 5
    retry_interval: int = 1
    timeout: Optional[float] = None
    outage: float = 2.0

    @property
    def backend(self) -> str:
        return "real" if self.connection_string else "fake"

    def failover_timeout(self, outage: Optional[float] = None) -> float:
        """The default per-test timeout for a failover test: the option, else room for the outage,
        the SDK's reconnect and a margin for a loaded CI machine."""
        if self.timeout is not None:
            return self.timeout
        outage = self.outage if outage is None else outage
        return max(60.0, outage * 3 + 30.0)


_FIELDS = {"iothub_connection": "connection_string", "iothub_hub_name": "hub_name",
           "iothub_keep_alive": "keep_alive", "iothub_retry_interval": "retry_interval",
           "iothub_timeout": "timeout", "iothub_outage": "outage"}


def resolve(cli: Callable[[str], Any], ini: Callable[[str], Any], environ=None) -> Settings:
    """Build Settings from a command-line lookup and an ini lookup (each returns None when unset)."""
    environ = os.environ if environ is None else environ
    values = {}
    for opt in OPTIONS:
        raw, source = cli(opt.name), opt.flag
        if raw is None and environ.get(opt.env):
            raw, source = environ[opt.env], f"{opt.env} (environment)"
        if raw is None:
            ini_raw = ini(opt.name)
            if ini_raw not in (None, ""):
                raw, source = ini_raw, f"ini option {opt.name}"
        values[_FIELDS[opt.name]] = opt.default if raw is None else opt.parse(source, raw)
    return Settings(**values)
