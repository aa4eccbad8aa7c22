"""The state of one device in a DevicePool, and the only moves between states it may make.

    NEW --connect()--> CONNECTING --connected--> CONNECTED --lost or wedged--> RECREATING
    CONNECTING / RECREATING --not back within the deadline--> FAILED (still retried in the background)
    RECREATING / FAILED --connected--> CONNECTED;  FAILED --connect()--> CONNECTING (a fresh deadline)
    any state --close()--> CLOSED

Whether a recreation attempt is running right now is a separate flag (`busy`): a FAILED device keeps
being retried, and `send` to it must still fail at once while an attempt runs.
"""
from __future__ import annotations

import enum
import threading
from typing import Any


class SlotState(enum.Enum):
    NEW = "new"                # not asked to connect yet
    CONNECTING = "connecting"  # first connection (or connect() again after FAILED)
    CONNECTED = "connected"
    RECREATING = "recreating"  # its client was lost; a new one is on the way
    FAILED = "failed"          # not back within its deadline; retried every max_backoff
    CLOSED = "closed"


S = SlotState
TRANSITIONS: dict[SlotState, frozenset[SlotState]] = {
    S.NEW: frozenset({S.CONNECTING, S.CLOSED}),
    S.CONNECTING: frozenset({S.CONNECTED, S.FAILED, S.CLOSED}),
    S.CONNECTED: frozenset({S.RECREATING, S.CLOSED}),
    S.RECREATING: frozenset({S.CONNECTED, S.FAILED, S.CLOSED}),
    S.FAILED: frozenset({S.CONNECTED, S.CONNECTING, S.CLOSED}),
    S.CLOSED: frozenset(),
}
# the states in which the supervisor runs recreation attempts
RECOVERING = frozenset({S.CONNECTING, S.RECREATING, S.FAILED})


class Slot:
    """The pool's bookkeeping for one device. Guarded by the pool's condition, except
    `handler_lock`, which serialises handler (un)registration on this device's client."""

    def __init__(self, device_id: str, connection_string: str):
        self.device_id = device_id
        self.connection_string = connection_string
        self.client: Any = None
        self.fresh = False            # created but never asked to connect: reusable once
        self.generation = 0           # bumped whenever a client becomes current
        self.state = SlotState.NEW
        self.busy = False             # a recreation attempt is running
        self.force = False            # recreate even if the lost client claims to be back
        self.attempts = 0             # failed attempts since the loss
        self.next_at = 0.0            # monotonic time of the next attempt
        self.deadline = 0.0           # monotonic time at which the device counts as failed
        self.lost_at: float | None = None  # time.time() of the loss being recovered
        self.reason = ""
        self.last_error: str | None = None
        self.was_connected = False
        self.installed: set[str] = set()   # SDK handler properties set on `client`
        self.handler_lock = threading.Lock()

    def move(self, to: SlotState) -> None:
        """Change state; a move the table does not allow is a bug in the pool, raised at once."""
        if to not in TRANSITIONS[self.state]:
            raise RuntimeError(f"device {self.device_id!r}: no transition {self.state.name} -> {to.name}")
        self.state = to

    @property
    def failed(self) -> bool:
        return self.state is SlotState.FAILED
