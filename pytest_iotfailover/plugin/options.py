"""One frozen `Settings` from command line, environment and ini file, validated once.

Precedence: command line, then environment variable, then ini file, then the default — so a CI
job can override what a repository commits to its ini file without editing it.
"""
import base64
import binascii
import importlib.util
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import SettingsError


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
    flag_only: bool = False   # a switch: --flag on the command line, true/false elsewhere


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
    if not (value > 0 and math.isfinite(value)):
        raise SettingsError(f"{flag} must be a positive number of seconds, got {raw!r}")
    return value


def _nap(flag: str, raw: str) -> float:
    from ..fakehub.nap import MAX_NAP, resolve_nap  # the hub's own rule, in the option's words
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise SettingsError(f"{flag} must be a number of seconds, got {raw!r}") from None
    try:
        return resolve_nap(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{flag} must be 0 (off) to {MAX_NAP:g} seconds, got {raw!r}") from None


def _hub_name(flag: str, raw: str) -> str:
    from ..fakehub.rules import HUB_NAME
    value = str(raw).strip()
    if not HUB_NAME.match(value):
        raise SettingsError(f"{flag} must be 3-50 lower-case letters, digits and hyphens, got {value!r}")
    return value


# compiled (and cached by re) when a connection string is given: most runs have none
_HOSTNAME = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+"


def _connection_string(flag: str, raw: str) -> str | None:
    """Everything the real backend would only find out when the first test opens the hub.
    Messages name keys, never values, and never write a key name followed by '=' (redaction would
    take the rest of the sentence for a secret)."""
    from ..iothub.auth import parse_connection_string  # the SAS code, for runs against a real hub only
    value = str(raw).strip()
    if not value:
        return None
    try:
        parts = parse_connection_string(value)
    except ValueError as exc:
        raise SettingsError(f"{flag} is not an IoT Hub connection string: {exc}") from None
    shapes = ("give a service connection string (HostName, SharedAccessKeyName and SharedAccessKey) "
              "or a device one (HostName, DeviceId and SharedAccessKey)")
    host = parts.get("HostName", "").strip()
    if not host:
        raise SettingsError(f"{flag}: HostName is empty; {shapes}")
    if not re.fullmatch(_HOSTNAME, host):
        raise SettingsError(f"{flag}: HostName {host!r} is not a host name (like myhub.azure-devices.net)")
    if "ModuleId" in parts:
        raise SettingsError(f"{flag}: a module connection string (with ModuleId) is not supported; {shapes}")
    service, device = "SharedAccessKeyName" in parts, "DeviceId" in parts
    if service == device:
        which = "both SharedAccessKeyName and DeviceId" if service else "neither SharedAccessKeyName nor DeviceId"
        raise SettingsError(f"{flag} has {which}; {shapes}")
    if "SharedAccessKey" not in parts:
        raise SettingsError(f"{flag} has no SharedAccessKey (SAS-token and X.509 connection strings are not "
                            f"supported); {shapes}")
    key = parts["SharedAccessKey"].strip()
    try:
        if not key or not base64.b64decode(key, validate=True):
            raise ValueError
    except (ValueError, binascii.Error):
        raise SettingsError(f"{flag}: its SharedAccessKey is not valid base64; copy the key again from the "
                            "hub's shared access policy or the device's identity") from None
    missing = _missing_real_extra(service)
    if missing:
        raise SettingsError(f"{flag}: running against a real IoT Hub needs the 'real' extra: "
                            f"pip install 'pytest-iotfailover[real]' (missing: {', '.join(missing)})")
    return value


def _missing_real_extra(service: bool) -> list[str]:
    """Distributions of the 'real' extra this connection string needs that cannot be imported."""
    needed = [("azure.eventhub", "azure-eventhub")]
    if service:
        # azure-iot-hub imports six without declaring it
        needed += [("azure.iot.hub", "azure-iot-hub"), ("six", "six")]
    missing = []
    for module, dist in needed:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(dist)
    return missing


def _tier(flag: str, raw: str) -> str | None:
    from ..iothub.tiers import TIER_NAMES
    value = str(raw).strip()
    if value.lower() in ("none", "off"):
        return None
    canon = {n.lower(): n for n in TIER_NAMES}.get(value.lower())
    if canon is None:
        raise SettingsError(f"{flag} must be one of {', '.join(TIER_NAMES)} or none, got {value!r}")
    return canon


def _text(flag: str, raw: str) -> str | None:
    value = str(raw).strip()
    return value or None


def _azure_name(flag: str, raw: str) -> str | None:
    value = str(raw).strip()
    if value and not re.fullmatch(r"[A-Za-z0-9._()\-]{1,90}", value):
        raise SettingsError(f"{flag} is not a valid Azure name: {value!r}")
    return value or None


def _boolean(flag: str, raw) -> bool:
    if isinstance(raw, bool):
        return raw
    value = str(raw).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{flag} must be true or false, got {raw!r}")


def _objectives(flag: str, raw: str) -> Any:
    from ..testing.slo import SloSyntaxError, parse_objectives
    try:
        return parse_objectives(str(raw), flag) or None
    except SloSyntaxError as exc:
        raise SettingsError(str(exc)) from None


def _regression(flag: str, raw: str) -> float:
    from ..testing.baseline import BaselineError, parse_regression
    try:
        return parse_regression(str(raw), flag)
    except BaselineError as exc:
        raise SettingsError(str(exc)) from None


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
    Option("iothub_tier", "--iothub-tier", "IOTFAILOVER_TIER",
           "embedded hub: IoT Hub tier whose throttles it enforces (Free, B1-B3, S1-S3), or none for no "
           "throttling; default: S1", _tier, "S1", metavar="TIER"),
    Option("iothub_tier_units", "--iothub-tier-units", "IOTFAILOVER_TIER_UNITS",
           "embedded hub: number of units of --iothub-tier; default: 1", _int_between(1, 200), 1,
           metavar="UNITS"),
    Option("iothub_throttle_setup", "--iothub-throttle-setup", "IOTFAILOVER_THROTTLE_SETUP",
           "embedded hub: count the devices fixtures create and delete against the tier's registry "
           "operations throttle (100/min on S1 x 1); default: not counted, as an import job",
           _boolean, False, flag_only=True),
    Option("iothub_dns", "--iothub-dns", "IOTFAILOVER_DNS",
           "embedded hub: devices dial it by a host name resolved inside the test process, which "
           "failover(dns=True) moves; clients in other processes (iothub_fleet) cannot resolve it",
           _boolean, False, flag_only=True),
    Option("iothub_nap", "--iothub-nap", "IOTFAILOVER_NAP",
           "embedded hub: longest sleep after a busy wake-up while device data comes closely (all "
           "of it from 8 connections on), so that it handles several connections' messages at once "
           "(an answer can wait that long); "
           "0: off; default: 0.02", _nap, None, metavar="SECONDS"),
    Option("iothub_eventhub_connection", "--iothub-eventhub-connection", "IOTHUB_EVENTHUB_CONNECTION_STRING",
           "real hub: connection string of its built-in Event Hub-compatible endpoint, where delivered "
           "telemetry is read", _text, None, secret=True, metavar="CONNECTION_STRING"),
    Option("iothub_allow_failover", "--iothub-allow-failover", "IOTFAILOVER_ALLOW_FAILOVER",
           "real hub: allow failover() to start a real regional manual failover of the hub with this name "
           "(10 min to 2 h of disruption; at most 2 failovers and 2 failbacks a day, 1 h apart)",
           _azure_name, None, metavar="HUB_NAME"),
    Option("iothub_subscription", "--iothub-subscription", "AZURE_SUBSCRIPTION_ID",
           "real hub: Azure subscription id of the hub, for failover", _azure_name, None, metavar="ID"),
    Option("iothub_resource_group", "--iothub-resource-group", "IOTFAILOVER_RESOURCE_GROUP",
           "real hub: resource group of the hub, for failover", _azure_name, None, metavar="NAME"),
    Option("iothub_failback", "--iothub-failback", "IOTFAILOVER_FAILBACK",
           "real hub: fail back to the original region at the end of the session if the run failed over",
           _boolean, False, flag_only=True),
    Option("iothub_slo", "--iothub-slo", "IOTFAILOVER_SLO",
           "recovery objectives every test is judged on, e.g. 'recover<=30s, lost==0, duplicates<=1%%'; "
           "a test that breaks one fails", _objectives, None, metavar="OBJECTIVES"),
    Option("iothub_report", "--iothub-report", "IOTFAILOVER_REPORT",
           "write the run report (JSON, schema plugin/report_schema.json) to this file", _text, None,
           metavar="PATH"),
    Option("iothub_baseline", "--iothub-baseline", "IOTFAILOVER_BASELINE",
           "an earlier run report: a test whose recovery got slower than --iothub-max-regression allows fails",
           _text, None, metavar="PATH"),
    Option("iothub_max_regression", "--iothub-max-regression", "IOTFAILOVER_MAX_REGRESSION",
           "how much slower than its baseline a test may recover, as a percentage; default: 20%%",
           _regression, 0.2, metavar="PERCENT"),
    Option("iothub_html", "--iothub-html", "IOTFAILOVER_HTML",
           "write the run's timeline (one self-contained HTML file) to this file", _text, None, metavar="PATH"),
)


@dataclass(frozen=True)
class Settings:
    connection_string: str | None = field(default=None, repr=False)
    hub_name: str = "testhub"
    keep_alive: int = 5
    retry_interval: int = 1
    timeout: float | None = None
    outage: float = 2.0
    tier: str | None = "S1"
    tier_units: int = 1
    throttle_setup: bool = False
    dns: bool = False
    nap: float | None = None           # None: fakehub/nap.py's default
    eventhub_connection_string: str | None = field(default=None, repr=False)
    allow_failover: str | None = None
    subscription: str | None = None
    resource_group: str | None = None
    failback: bool = False
    slo: Any = None                    # testing.slo.Objectives, or None
    report: str | None = None
    baseline: str | None = None
    max_regression: float = 0.2
    html: str | None = None

    @property
    def backend(self) -> str:
        return "real" if self.connection_string else "fake"

    def failover_timeout(self, outage: float | None = None) -> float:
        """The default per-test timeout for a failover test: the option, else room for the outage,
        the SDK's reconnect and a margin for a loaded CI machine."""
        if self.timeout is not None:
            return self.timeout
        outage = self.outage if outage is None else outage
        return max(60.0, outage * 3 + 30.0)


_FIELDS = {"iothub_connection": "connection_string", "iothub_hub_name": "hub_name",
           "iothub_keep_alive": "keep_alive", "iothub_retry_interval": "retry_interval",
           "iothub_timeout": "timeout", "iothub_outage": "outage",
           "iothub_tier": "tier", "iothub_tier_units": "tier_units", "iothub_throttle_setup": "throttle_setup",
           "iothub_dns": "dns", "iothub_nap": "nap",
           "iothub_eventhub_connection": "eventhub_connection_string", "iothub_allow_failover": "allow_failover",
           "iothub_subscription": "subscription", "iothub_resource_group": "resource_group",
           "iothub_failback": "failback", "iothub_slo": "slo", "iothub_report": "report",
           "iothub_baseline": "baseline", "iothub_max_regression": "max_regression", "iothub_html": "html"}


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
    settings = Settings(**values)
    if settings.tier == "Free" and settings.tier_units != 1:
        raise SettingsError("--iothub-tier Free has exactly one unit: leave --iothub-tier-units out")
    if settings.allow_failover and not (settings.subscription and settings.resource_group):
        raise SettingsError("--iothub-allow-failover needs --iothub-subscription and --iothub-resource-group "
                            "(the failover goes through Azure Resource Manager)")
    if settings.backend == "fake" and (settings.allow_failover or settings.eventhub_connection_string):
        raise SettingsError("--iothub-allow-failover and --iothub-eventhub-connection apply to a real hub: "
                            "give --iothub-connection too")
    return settings
