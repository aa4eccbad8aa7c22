"""A real IoT Hub regional failover, through Azure Resource Manager.

A manual failover is expensive: 10 minutes to 2 hours during which the hub is
unreachable, and IoT Hub allows only two failovers and two failbacks a day, at least
an hour apart. So it is opt-in per hub, and every operation is recorded in a state
store (pytest's cache survives between runs) to refuse one the hub would reject
anyway before anything is sent.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Self

from ...model import RecoveryReport
from ...redaction import redact

_log = logging.getLogger(__name__)

FAILOVER_KIND = "region_failover"
DAY = 24 * 3600.0
MIN_GAP = 3600.0
PER_DAY = 2  # of each kind: failovers and failbacks are counted separately
DEFAULT_TIMEOUT = 7200.0
_DEFAULT_TICK = 30.0  # ARM's own default polling interval for this operation
_COST = ("A manual failover makes the hub unreachable for 10 minutes to 2 hours; IoT "
         "Hub allows 2 failovers and 2 failbacks a day per hub, at least 1 h apart; "
         "every device must reconnect; and the built-in Event Hub-compatible endpoint "
         "changes, so its consumers must look it up again.")
_READY_STATES = {"active"}
_READY_PROVISIONING = {"succeeded"}


class FailoverNotAllowed(Exception):
    """This hub was not named in --iothub-allow-failover."""


class FailoverQuotaExceeded(Exception):
    """IoT Hub would reject the operation: too many in 24 h, or too soon after the
    previous one."""

    def __init__(self, message: str, *, limit: str, next_allowed: float):
        super().__init__(message)
        self.limit = limit
        self.next_allowed = next_allowed


class FailoverInProgress(Exception):
    """The hub is not in a state to start a failover (one is probably running)."""


class ArmFailoverError(RuntimeError):
    """ARM refused or failed the operation. `code`/`arm_message` are ARM's error,
    when it gave one."""

    def __init__(self, message: str, *, code: str | None = None,
                 arm_message: str | None = None, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.arm_message = arm_message
        self.status = status


def format_utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def format_duration(seconds: float) -> str:
    s = max(int(seconds), 0)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def _arm_error(what: str, err: BaseException) -> ArmFailoverError:
    """A readable error from an azure-core exception; the text goes through redact()
    because it quotes what ARM answered, and nothing from the request (never the
    Authorization header)."""
    odata = getattr(err, "error", None)
    code = getattr(odata, "code", None)
    message = getattr(odata, "message", None)
    status = getattr(err, "status_code", None)
    if code or message:
        detail = f"{code or 'error'}: {message or '(no message)'}"
    else:
        text = getattr(err, "message", None) or str(err) or type(err).__name__
        detail = text.splitlines()[0]
    if status and not (200 <= status < 300):
        detail = f"HTTP {status} {detail}"
    return ArmFailoverError(redact(f"{what}: {detail}"), code=code,
                            arm_message=redact(message) if message else None,
                            status=status)


class _MemoryStore:
    def __init__(self) -> None:
        self._data: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return copy.deepcopy(self._data.get(key, default))

    def set(self, key: str, value: Any) -> None:
        self._data[key] = copy.deepcopy(value)


class ArmFailover:
    """Manual failover and failback of one IoT hub through ARM (`azure-mgmt-iothub`).

    `state_store` needs `get(key, default)` and `set(key, value)` (pytest's
    `config.cache`) or is a dict; values are JSON. `client_options` go to
    `IotHubClient` (e.g. `connection_verify` for a TLS-inspecting proxy's CA).
    """

    def __init__(self, *, subscription_id: str, resource_group: str, hub_name: str,
                 allowed_hub: str | None = None, credential=None,
                 base_url: str | None = None, state_store=None,
                 progress: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time,
                 poll_interval: float | None = None,
                 client_options: dict[str, Any] | None = None):
        if not hub_name:
            raise ValueError("hub_name is required")
        if poll_interval is not None and not poll_interval > 0:
            raise ValueError("poll_interval must be a positive number of seconds, got "
                             f"{poll_interval!r}")
        self.subscription_id = subscription_id
        self.resource_group = resource_group
        self.hub_name = hub_name
        self.allowed_hub = allowed_hub
        self.base_url = base_url
        self.poll_interval = poll_interval
        self.clock = clock
        self._credential = credential
        # pytest's cache, a dict or a _MemoryStore: _save() handles each
        self._store: Any = _MemoryStore() if state_store is None else state_store
        self._progress = progress
        self._client_options = dict(client_options or {})
        self._client = None
        self._lock = threading.RLock()

    @property
    def state_key(self) -> str:
        return f"iotfailover/arm/{self.hub_name.lower()}"

    # --- the client -------------------------------------------------------------------

    def _arm(self):
        with self._lock:
            if self._client is None:
                from azure.mgmt.iothub import IotHubClient
                if self._credential is None:
                    # only now: it probes the environment, a managed identity endpoint,
                    # the CLI...
                    from azure.identity import DefaultAzureCredential
                    self._credential = DefaultAzureCredential()
                kwargs = dict(self._client_options)
                if self.base_url is not None:
                    kwargs["base_url"] = self.base_url
                self._client = IotHubClient(self._credential, self.subscription_id,
                                            **kwargs)
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _say(self, line: str) -> None:
        _log.info("%s", line)
        if self._progress is not None:
            try:
                self._progress(line)
            except Exception:  # a broken reporter must not abort a failover under way
                _log.exception("progress callback failed")

    # --- opt-in -----------------------------------------------------------------------

    def check_allowed(self) -> None:
        if self.allowed_hub and self.allowed_hub.lower() == self.hub_name.lower():
            return
        if self.allowed_hub:
            why = f"--iothub-allow-failover names {self.allowed_hub!r}, not this hub"
        else:
            why = "--iothub-allow-failover is not set"
        raise FailoverNotAllowed("Refusing a real regional failover of IoT hub "
                                 f"{self.hub_name!r}: {why}. Give "
                                 f"--iothub-allow-failover={self.hub_name} to allow "
                                 "failover() and failback() to fail this hub over to "
                                 "its secondary region and back through Azure "
                                 f"Resource Manager. {_COST}")

    # --- the hub resource -------------------------------------------------------------

    def _describe(self):
        try:
            return self._arm().iot_hub_resource.get(
                resource_group_name=self.resource_group, resource_name=self.hub_name)
        except Exception as err:
            if not _is_azure_error(err):
                raise
            raise _arm_error(f"cannot read IoT hub {self.hub_name!r} in resource group "
                             f"{self.resource_group!r} from ARM", err) from err

    def _locations(self, desc) -> tuple[str, str]:
        primary = secondary = None
        for loc in getattr(desc.properties, "locations", None) or []:
            role = (loc.role or "").lower()
            if role == "primary":
                primary = loc.location
            elif role == "secondary":
                secondary = loc.location
        if not primary or not secondary:
            raise ArmFailoverError(f"IoT hub {self.hub_name!r} reports no "
                                   f"{'primary' if not primary else 'secondary'} "
                                   "location in properties.locations; a manual "
                                   "failover needs a hub in a region with a paired "
                                   "region")
        return primary, secondary

    def locations(self) -> tuple[str, str]:
        """(primary, secondary) as the hub reports them now; they swap after each
        failover."""
        return self._locations(self._describe())

    def _check_ready(self, desc) -> None:
        props = desc.properties
        state = getattr(props, "state", None)
        provisioning = getattr(props, "provisioning_state", None)
        busy = []
        if state and state.lower() not in _READY_STATES:
            busy.append(f"state {state!r}")
        if provisioning and provisioning.lower() not in _READY_PROVISIONING:
            busy.append(f"provisioningState {provisioning!r}")
        if busy:
            raise FailoverInProgress(f"IoT hub {self.hub_name!r} is not ready for a "
                                     f"failover: {' and '.join(busy)}. A failover or "
                                     "failback is probably under way (they take 10 "
                                     "minutes to 2 hours); try again once the hub is "
                                     "Active.")

    # --- the record of past operations ------------------------------------------------

    def _load(self, now: float) -> dict[str, Any]:
        raw = self._store.get(self.state_key, None)
        record = copy.deepcopy(raw) if isinstance(raw, dict) else {}
        ops = [op for op in (record.get("ops") or []) if isinstance(op, dict)
               and isinstance(op.get("started_at"), (int, float))]
        record["ops"] = [op for op in ops if op["started_at"] > now - DAY]
        return record

    def _save(self, record: dict[str, Any]) -> None:
        if hasattr(self._store, "set"):
            self._store.set(self.state_key, record)
        else:
            self._store[self.state_key] = record

    @property
    def history(self) -> list[dict[str, Any]]:
        """This hub's operations in the last 24 h, oldest first, from the state
        store."""
        with self._lock:
            return sorted(self._load(self.clock())["ops"],
                          key=lambda op: op["started_at"])

    def _check_quota(self, record: dict[str, Any], kind: str, now: float) -> None:
        ops = record["ops"]
        refusals = []
        same = sorted(op["started_at"] for op in ops if op.get("kind") == kind)
        if len(same) >= PER_DAY:
            nth = len(same) + 1
            refusals.append(((f"this would be the {nth}{_ordinal(nth)} {kind} of IoT "
                              f"hub {self.hub_name!r} in 24 h, and IoT Hub allows "
                              f"{PER_DAY} failovers and {PER_DAY} failbacks a day"),
                             same[-PER_DAY] + DAY, f"{PER_DAY} {kind}s per day"))
        if ops:
            # counted from the end when known: a later reference than IoT Hub may use,
            # so a refusal here can come early but an operation sent is never one the
            # hub turns down for the gap
            previous = max(max(op["started_at"], op.get("ended_at") or 0) for op in ops)
            if now < previous + MIN_GAP:
                refusals.append(((f"the previous operation on IoT hub {self.hub_name!r} "
                                  f"was at {format_utc(previous)}, and IoT Hub needs at "
                                  "least 1 h between a failover and the next failover "
                                  "or failback"), previous + MIN_GAP,
                                 "1 h between operations"))
        if refusals:
            next_allowed = max(r[1] for r in refusals)
            raise FailoverQuotaExceeded(
                f"Refusing the {kind}: {'; and '.join(r[0] for r in refusals)}. The "
                f"next {kind} is allowed at {format_utc(next_allowed)}.",
                limit=", ".join(r[2] for r in refusals),
                next_allowed=next_allowed)

    # --- the operations ---------------------------------------------------------------

    def failover(self, timeout: float = DEFAULT_TIMEOUT) -> ArmFailoverHandle:
        """Start a failover to the secondary region and return at once; wait() on the
        handle."""
        return self._start("failover", timeout)

    def failback(self, timeout: float = DEFAULT_TIMEOUT) -> ArmFailoverHandle:
        """Start the failover back to the region the hub was in before failover()."""
        return self._start("failback", timeout)

    def _start(self, kind: str, timeout: float) -> ArmFailoverHandle:
        self.check_allowed()
        with self._lock:
            now = self.clock()
            record = self._load(now)
            # before any request: the local record alone can tell IoT Hub would refuse
            self._check_quota(record, kind, now)
            desc = self._describe()
            self._check_ready(desc)
            primary, secondary = self._locations(desc)
            target = _target_region(self.hub_name, kind, record.get("original_primary"),
                                    primary, secondary)
            polls = _PollCounter()
            poller = self._begin(kind, target, polls)
            started_at = self.clock()
            record["ops"].append({"kind": kind, "started_at": started_at,
                                  "ended_at": None, "hub": self.hub_name})
            if kind == "failover":
                record["original_primary"] = primary
            self._save(record)
        self._say(f"{kind} of {self.hub_name}: started, {primary} -> {target}")
        return ArmFailoverHandle(
            self, poller, kind,
            {"operation": kind, "hub": self.hub_name, "from": primary, "to": target},
            started_at, timeout, polls)

    def _begin(self, kind: str, target: str, polls: _PollCounter):
        from azure.mgmt.iothub.models import FailoverInput
        # azure-core hands per-operation options to every status request of the
        # poller too
        kwargs: dict[str, Any] = {"raw_response_hook": polls}
        if self.poll_interval is not None:
            kwargs["polling_interval"] = self.poll_interval
        try:
            return self._arm().iot_hub.begin_manual_failover(
                iot_hub_name=self.hub_name, resource_group_name=self.resource_group,
                failover_input=FailoverInput(failover_region=target), **kwargs)
        except Exception as err:
            if not _is_azure_error(err):
                raise
            raise _arm_error(f"ARM did not accept the {kind} of IoT hub "
                             f"{self.hub_name!r} to {target}", err) from err

    def _finished(self, kind: str, started_at: float, ended_at: float,
                  outcome: str) -> None:
        with self._lock:
            record = self._load(self.clock())
            for op in record["ops"]:
                if (op.get("kind") == kind and op["started_at"] == started_at
                        and op.get("ended_at") is None):
                    op["ended_at"] = ended_at
                    op["outcome"] = outcome
                    self._save(record)
                    break


def _target_region(hub: str, kind: str, original: str | None, primary: str,
                   secondary: str) -> str:
    """Where a failover or failback of `hub` goes, given the region it was in before
    the first failover on record; ArmFailoverError when there is nowhere to go."""
    if kind == "failover":
        if original and original.lower() != primary.lower():
            raise ArmFailoverError(f"IoT hub {hub!r} is already failed over: it runs "
                                   f"in {primary}, its original primary region was "
                                   f"{original}. Call failback() to return it.")
        return secondary
    if not original:
        raise ArmFailoverError(f"nothing to fail back: no failover of IoT hub {hub!r} "
                               "is on record in the state store, so its original "
                               f"region is unknown (it now runs in {primary}). A "
                               "failover made elsewhere is failed back there.")
    if original.lower() == primary.lower():
        raise ArmFailoverError(f"nothing to fail back: IoT hub {hub!r} already runs in "
                               f"its original primary region {primary}")
    if original.lower() != secondary.lower():
        raise ArmFailoverError(f"cannot fail IoT hub {hub!r} back to {original}: the "
                               f"hub's locations are now {primary} (primary) and "
                               f"{secondary} (secondary)")
    return original


class _PollCounter:
    """Counts ARM's answers, so that progress is reported only when there was a poll
    to report."""

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, _pipeline_response) -> None:
        with self._lock:
            self.count += 1


def _is_azure_error(err: BaseException) -> bool:
    from azure.core.exceptions import AzureError
    return isinstance(err, AzureError)


def _ordinal(n: int) -> str:
    if 10 <= n % 100 <= 20:
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


class ArmFailoverHandle:
    """A running ARM failover or failback, with the surface of the fake hub's
    FaultHandle.

    The operation runs on azure-core's poller thread; it cannot be cancelled, only
    waited for.
    """

    kind = FAILOVER_KIND
    device_id = None

    def __init__(self, owner: ArmFailover, poller, operation: str,
                 params: dict[str, Any], started_at: float, timeout: float,
                 polls: _PollCounter | None = None):
        self._owner = owner
        self._poller = poller
        self.operation = operation
        self._params = params
        self.started_at = started_at
        self.ended_at: float | None = None
        self._state = "active"
        self._timeout = timeout
        self._t0 = time.monotonic()
        self._polls = polls or _PollCounter()
        self._lock = threading.Lock()
        poller.add_done_callback(self._on_done)

    params = property(lambda self: dict(self._params))
    state = property(lambda self: self._state)
    active = property(lambda self: self._state == "active")

    def _label(self) -> str:
        return f"{self.operation} of {self._owner.hub_name}"

    def _status(self) -> str:
        try:
            return str(self._poller.status())
        except Exception:
            return "unknown"

    def _on_done(self, _polling_method) -> None:
        # on the poller's thread, and possibly twice (azure-core calls a late-added
        # callback at once too)
        try:
            with self._lock:
                if self._state != "active":
                    return
                self.ended_at = self._owner.clock()
                succeeded = self._status().lower() == "succeeded"
                self._state = "ended" if succeeded else "failed"
            self._owner._finished(self.operation, self.started_at, self.ended_at,
                                  self._state)
        except Exception:
            _log.exception("recording the end of %s failed", self._label())

    def wait_started(self, timeout: float | None = None) -> ArmFailoverHandle:
        return self  # ARM accepted it before the handle existed

    def wait(self, timeout: float | None = None) -> ArmFailoverHandle:
        """Block until ARM reports the operation over; TimeoutError if it is not by
        then, the ARM error (ArmFailoverError) if it failed."""
        timeout = self._timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        tick = self._owner.poll_interval or _DEFAULT_TICK
        reported = self._polls.count
        try:
            while not self._poller.done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{self._label()} still {self._status()} after "
                        f"{format_duration(timeout)} of waiting "
                        f"({format_duration(time.monotonic() - self._t0)} since it "
                        "started). ARM cannot cancel it: the hub completes it on its "
                        "own; wait() again or check the hub in the Azure portal.")
                self._poller.wait(min(tick, remaining))
                if not self._poller.done() and self._polls.count != reported:
                    reported = self._polls.count
                    self._owner._say(f"{self._label()}: "
                                     f"{format_duration(time.monotonic() - self._t0)} "
                                     f"elapsed, state {self._status()}")
            self._poller.result(0)
        except TimeoutError:
            raise  # ours: the operation goes on
        except Exception as err:
            # the poller's thread may not have marked itself done yet when its error reaches us
            # (seen with Python 3.13): an Azure error here is the operation's end all the same
            if not self._poller.done() and not _is_azure_error(err):
                raise
            self._on_done(None)
            if not _is_azure_error(err):
                raise
            raise _arm_error(f"{self._label()} failed after "
                             f"{format_duration(time.monotonic() - self._t0)}",
                             err) from err
        self._on_done(None)
        self._owner._say(f"{self._label()}: done after "
                         f"{format_duration(time.monotonic() - self._t0)}, state "
                         f"{self._status()}")
        return self

    def cancel(self) -> ArmFailoverHandle:
        raise RuntimeError(f"{self._label()} cannot be cancelled: ARM has no way to "
                           "stop a manual failover once accepted. It completes on its "
                           "own (10 minutes to 2 hours); wait() for it, then "
                           "failback() if needed.")

    def report(self) -> RecoveryReport:
        return RecoveryReport(fault=FAILOVER_KIND, target=None, params=self.params,
                              started_at=self.started_at, ended_at=self.ended_at)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        # nothing to undo: it cannot be cancelled, and waiting hours on an error would
        # hide it
        pass

    def __repr__(self):
        hub = self._owner.hub_name
        return f"<ArmFailoverHandle {self.operation} of {hub} {self._state}>"
