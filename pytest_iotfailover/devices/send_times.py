"""When an Outbox started each send attempt of a message and when the device got its acknowledgement.

The Outbox can hold hundreds of thousands of messages and its send path is benchmarked, so the
times live in two columns of C doubles indexed by the message's place in the Outbox (16 bytes a
message): the first attempt's start and the first time a send of it returned successfully — the SDK
returns from `send_message` once the hub's PUBACK arrived, so that is the acknowledgement as the
device saw it. Only a message attempted more than once gets a small record of its later attempts,
and that record keeps the latest ATTEMPTS_KEPT - 1 of them besides the count, so a message retried
for a whole long outage costs a fixed amount.

Times are `time.time()`, as the hub's ledger and the Outbox's failures are. Callers hold the
Outbox's lock. Standard library only.
"""
from __future__ import annotations

import collections
from array import array
from collections.abc import Iterator
from math import isnan

__all__ = ["ATTEMPTS_KEPT", "SendTimes", "TimesOf", "merged"]

#: attempt start times kept per message: the first and the latest ATTEMPTS_KEPT - 1
ATTEMPTS_KEPT = 10

_UNSET = float("nan")


class _Retries:
    __slots__ = ("count", "latest")

    def __init__(self) -> None:
        self.count = 0  # attempts after the first
        self.latest: collections.deque[float] = collections.deque(maxlen=ATTEMPTS_KEPT - 1)

    def copy(self) -> _Retries:
        other = _Retries()
        other.count, other.latest = self.count, self.latest.copy()
        return other


class TimesOf:
    """One message's times, copied out (no reference into the live columns)."""
    __slots__ = ("acked_at", "attempt_count", "attempts")

    def __init__(self, attempts: tuple[float, ...], attempt_count: int, acked_at: float | None):
        self.attempts = attempts            # the first start and the latest ones, oldest first
        self.attempt_count = attempt_count  # every attempt started, also those not kept
        self.acked_at = acked_at


class SendTimes:
    """The columns of one Outbox; a message's index is its place in the Outbox's message_ids."""
    __slots__ = ("_acked", "_first", "_retries")

    def __init__(self) -> None:
        self._first = array("d")
        self._acked = array("d")
        self._retries: dict[int, _Retries] = {}

    def __len__(self) -> int:
        return len(self._first)

    def add(self) -> None:
        """A message was accepted; it takes the next index."""
        self._first.append(_UNSET)
        self._acked.append(_UNSET)

    def attempt(self, index: int, at: float) -> None:
        first = self._first[index]
        if isnan(first):  # not attempted yet
            self._first[index] = at
            return
        retries = self._retries.get(index)
        if retries is None:
            retries = self._retries[index] = _Retries()
        retries.count += 1
        retries.latest.append(at)

    def acked(self, index: int, at: float) -> None:
        """A send of the message returned successfully; the first such time is kept (a message
        sent again by replay= was acknowledged already, and an abandoned call may finish late)."""
        if isnan(self._acked[index]):
            self._acked[index] = at

    def copy(self) -> SendTimes:
        """A frozen copy, cheap enough to take under the Outbox's lock (the columns are copied as
        memory blocks); read it with `of` after letting the lock go."""
        other = SendTimes()
        other._first, other._acked = self._first[:], self._acked[:]
        other._retries = {i: r.copy() for i, r in self._retries.items()}
        return other

    def each(self) -> Iterator[tuple[tuple[float, ...], int, float | None]]:
        """(attempts, attempt_count, acked_at) of every message, by index: `of` for all, in one pass
        without an object per message (a report's snapshot reads every message)."""
        retries = self._retries
        for index, (first, acked) in enumerate(zip(self._first, self._acked, strict=True)):
            ack = None if isnan(acked) else acked
            if isnan(first):
                yield (), 0, ack
                continue
            r = retries.get(index)
            yield ((first,), 1, ack) if r is None else ((first, *r.latest), 1 + r.count, ack)

    def of(self, index: int) -> TimesOf:
        first, acked = self._first[index], self._acked[index]
        if isnan(first):
            return TimesOf((), 0, None if isnan(acked) else acked)
        retries = self._retries.get(index)
        later: tuple[float, ...] = tuple(retries.latest) if retries is not None else ()
        count = 1 + (retries.count if retries is not None else 0)
        return TimesOf((first, *later), count, None if isnan(acked) else acked)


def merged(times: list[TimesOf]) -> TimesOf:
    """The times of one message id accepted more than once (each acceptance is its own entry)."""
    if len(times) == 1:
        return times[0]
    starts = sorted(t for x in times for t in x.attempts)
    kept = tuple(starts[:1] + starts[1:][-(ATTEMPTS_KEPT - 1):]) if starts else ()
    acks = [x.acked_at for x in times if x.acked_at is not None]
    return TimesOf(kept, sum(x.attempt_count for x in times), min(acks) if acks else None)
