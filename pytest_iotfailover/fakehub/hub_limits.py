"""FakeHub's side of IoT Hub's limits that a test sets up or reads: the hub's shared access
policies (tokens with `skn=`) and the C2D feedback endpoint (`iothub-ack`). A mixin of FakeHub."""
from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import threading
from collections.abc import Callable, Iterable
from typing import Any

from ..checks import choice, positive_int, required_seconds, text
from ..iothub.c2d_lifecycle import FeedbackLog, FeedbackRecord
from ..iothub.limits import PERMISSIONS, AccessPolicy, default_policies
from ..iothub.registry import new_key
from ..waiting import WaitingEventLog

__all__ = ["LimitsFace"]


def _key(name: str, value: str | None) -> str:
    if value is None:
        return new_key()
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ValueError(f"{name} is not valid base64") from None
    return value


_STATE_LOCK = threading.Lock()


class _LimitsState:
    def __init__(self) -> None:
        # replaced whole, never changed in place: the hub thread reads whichever dict it sees
        self.policies: dict[str, AccessPolicy] = default_policies(new_key)
        self.feedback = FeedbackLog(threading.Lock())


class LimitsFace:
    """Policies and feedback; needs FakeHub's `_core`, `_running_core`, `_act` and `event_log`."""
    _core: Any
    event_log: WaitingEventLog
    _running_core: Callable[[], Any]

    @property
    def _limits_face_state(self) -> _LimitsState:
        # made on first use (FakeHub's constructor stays as it is), once even if threads race
        state = self.__dict__.get("_limits_state")
        if state is None:
            with _STATE_LOCK:
                state = self.__dict__.get("_limits_state")
                if state is None:
                    state = self.__dict__["_limits_state"] = _LimitsState()
        return state

    @property
    def _policies(self) -> dict[str, AccessPolicy]:
        return self._limits_face_state.policies

    @property
    def _feedback(self) -> FeedbackLog:
        return self._limits_face_state.feedback

    def _c2d_sender(self, ttl: Any, expiry_time: Any, ack: Any) -> Callable[..., Any]:
        """The core's send_c2d with a message's expiry and ack terms bound (FakeHub.send_c2d)."""
        return functools.partial(self._running_core().send_c2d, ttl=ttl, expiry_time=expiry_time, ack=ack)

    # --- shared access policies --------------------------------------------------------------

    @property
    def policies(self) -> dict[str, AccessPolicy]:
        """The hub's shared access policies by name: at first the ones a new IoT hub has
        (iothubowner, service, device, registryRead, registryReadWrite; D-SAS), with fresh keys."""
        return dict(self._policies)

    def policy(self, name: str) -> AccessPolicy:
        found = self._policies.get(name)
        if found is None:
            raise KeyError(f"no shared access policy {name!r}; the hub has {', '.join(sorted(self._policies))}")
        return found

    def add_policy(self, name: str, permissions: Iterable[str] = ("DeviceConnect",), *,
                   primary_key: str | None = None, secondary_key: str | None = None) -> AccessPolicy:
        """Define (or replace) a policy. Devices may sign SAS tokens with its keys and `skn=name`
        when it grants DeviceConnect; other tokens naming it get CONNACK 5."""
        name = text("name", name) or ""
        if not name:
            raise ValueError("a shared access policy needs a name")
        if isinstance(permissions, str):
            permissions = (permissions,)
        perms = frozenset(choice("permission", p, PERMISSIONS) for p in permissions)
        policy = AccessPolicy(name, _key("primary_key", primary_key), _key("secondary_key", secondary_key), perms)
        self._set_policies({**self._policies, name: policy})
        return policy

    def remove_policy(self, name: str) -> None:
        self.policy(name)
        self._set_policies({k: v for k, v in self._policies.items() if k != name})

    def _set_policies(self, policies: dict[str, AccessPolicy]) -> None:
        self._limits_face_state.policies = policies
        if self._core is not None:  # a started hub's core holds the dict it was given
            self._core.policies = policies

    # --- C2D feedback ------------------------------------------------------------------------

    def feedback(self, device_id: str | None = None, *, message_id: str | None = None) -> list[FeedbackRecord]:
        """The feedback records C2D messages sent with `ack=` produced so far, oldest first: what a
        service reads from the hub's feedback endpoint (`/messages/servicebound/feedback`)."""
        return self._feedback.records(device_id, message_id)

    def wait_for_feedback(self, message_id: str | None = None, *, device_id: str | None = None,
                          count: int = 1, timeout: float = 10.0) -> list[FeedbackRecord]:
        """Wait until `count` records (for `message_id` / `device_id`, if given) are there; wakes on
        each hub event. TimeoutError says how many arrived."""
        count = positive_int("count", count)
        timeout = required_seconds("timeout", timeout)
        if not self.event_log.pulse.wait_until(lambda: len(self.feedback(device_id, message_id=message_id)) >= count,
                                               timeout):
            what = f" for message {message_id!r}" if message_id else ""
            what += f" of device {device_id!r}" if device_id else ""
            got = self.feedback(device_id, message_id=message_id)
            raise TimeoutError(f"waited {timeout:g} s for {count} C2D feedback records{what}; "
                               f"{len(got)} arrived: {[r.status_code for r in got]}")
        return self.feedback(device_id, message_id=message_id)

    async def wait_for_feedback_async(self, message_id: str | None = None, **kwargs: Any) -> list[FeedbackRecord]:
        """`wait_for_feedback` for async tests, without blocking their event loop."""
        return await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self.wait_for_feedback, message_id, **kwargs))
