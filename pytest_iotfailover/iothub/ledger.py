"""The delivery ledger: every telemetry message the hub accepted, in acceptance order.

Stored compactly so a long session does not feed the garbage collector: a record is a tuple of
immutable scalars (which the collector untracks on its first pass and never scans again), the
property bags are one encoded bytes value each, and the times, marks and indices are flat arrays.
Records are grouped in chunks of `_CHUNK`: a full chunk becomes a tuple the collector untracks too, so
a full collection walks one pointer per chunk rather than one per message (a flat list of a million
untracked tuples still costs ~23 ms per full collection, every element visited).
`Telemetry` objects are built on read.
"""
from array import array
from bisect import bisect_left
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from heapq import merge
from typing import Any


@dataclass
class Telemetry:
    device_id: str
    message_id: str | None
    body: bytes
    properties: dict[str, str] = field(default_factory=dict)
    system_properties: dict[str, str] = field(default_factory=dict)
    enqueued_at: float = 0.0
    dup: bool = False          # the MQTT DUP flag: the client says it is re-sending
    duplicate: bool = False    # this device already delivered a message with this message id
    qos: int = 1
    lost_in_failover: bool = False  # acknowledged, then dropped by a region failover (its RPO)


_SEP = "\x00"
_DUP, _DUPLICATE, _MID, _CONN = 1, 2, 4, 8  # _MID/_CONN: system property equal to the record's field
_QOS_SHIFT = 4
_BLOB_CACHE_MAX = 4096
_SHIFT = 12
_CHUNK = 1 << _SHIFT
_MASK = _CHUNK - 1


def _encode(bag: dict[str, Any]) -> Any:
    """One value per property bag: None when empty, else NUL-joined UTF-8 when every key and value is
    a NUL-free string, else (rare: values from a real hub's endpoint) a tuple of pairs."""
    if not bag:
        return None
    parts = []
    for k, v in bag.items():
        if type(k) is not str or type(v) is not str or _SEP in k or _SEP in v:
            return tuple(bag.items())
        parts.append(k)
        parts.append(v)
    return _SEP.join(parts).encode("utf-8", "surrogatepass")


def _decode(blob: Any) -> dict[str, Any]:
    if blob is None:
        return {}
    if type(blob) is tuple:
        return dict(blob)
    parts = blob.decode("utf-8", "surrogatepass").split(_SEP)
    return dict(zip(parts[0::2], parts[1::2]))


class Ledger:
    """Append-only: nothing recorded is ever removed (a failover may only mark records lost).
    A plain store: one thread writes (the hub's); readers on other threads get fresh `Telemetry`
    copies. Waiting for records is the driver's business (waiting.py)."""

    def __init__(self) -> None:
        # chunks of rows (device_id, message_id, body, properties blob, system-properties blob, flags):
        # every chunk but the last is a tuple; the last is the list being filled
        self._chunk: list[Any] = []
        self._chunks: list[Any] = [self._chunk]
        self._n = 0
        self._at = array("d")
        # 1 for a record lost in a failover; only as long as the last record marked
        self._lost = bytearray()
        self._lost_total = 0
        self._by_device: dict[str, array] = {}
        self._lost_by_device: dict[str, int] = {}
        self._first: dict[str, dict[str, int]] = {}  # device -> message id -> first record number
        # items of a property bag -> its encoded form: equal bags (the same few per device)
        # share one object and are encoded once
        self._blobs: dict[Any, Any] = {}

    # --- writing ---------------------------------------------------------------------------------

    def _encoded(self, key: tuple[Any, ...], bag: dict[str, Any]) -> Any:
        """A bag whose items `key` are not cached yet: encoded, cached and returned."""
        if len(self._blobs) >= _BLOB_CACHE_MAX:
            self._blobs.clear()
        blob = self._blobs[key] = _encode(bag)
        return blob

    def record(self, t: Telemetry) -> Telemetry:
        """Store `t` (its `duplicate` flag is set here) and return it."""
        # Ledger's own method, not self's: a subclass's record_message may take the lock its record holds
        t.duplicate = Ledger.record_message(self, t.device_id, t.message_id, t.body, t.properties,
                                            t.system_properties, t.enqueued_at, t.dup, t.qos)
        if t.lost_in_failover:
            self._mark(self._n - 1)
        return t

    def record_message(self, device_id: str, message_id: str | None, body: bytes,
                       properties: dict[str, Any], system_properties: dict[str, Any],
                       enqueued_at: float, dup: bool = False, qos: int = 1) -> bool:
        """Store one message without building a `Telemetry`; True if it is a duplicate."""
        # once per telemetry message: no helper calls on the common path
        n = self._n
        duplicate = False
        if message_id is not None:
            first = self._first.get(device_id)
            if first is None:
                first = self._first[device_id] = {}
            if message_id in first:
                duplicate = True
            else:
                first[message_id] = n
        flags = (_DUP if dup else 0) | (_DUPLICATE if duplicate else 0) | (qos << _QOS_SHIFT)
        sysprops = system_properties
        # the two per-message system properties live in the record already: leaving them out
        # lets equal bags share one blob
        if message_id is not None and sysprops.get("message_id") == message_id:
            flags |= _MID
        if sysprops.get("connection_device_id") == device_id:
            flags |= _CONN
        if flags & (_MID | _CONN):
            # a copy less two keys is about half the cost of a filtering comprehension
            sysprops = sysprops.copy()
            if flags & _MID:
                del sysprops["message_id"]
            if flags & _CONN:
                del sysprops["connection_device_id"]
        # an equal bag (same items, same order) stored before: one tuple and one lookup
        blobs = self._blobs
        props_blob = sys_blob = None
        if properties:
            key = tuple(properties.items())
            props_blob = blobs.get(key)
            if props_blob is None:
                props_blob = self._encoded(key, properties)
        if sysprops:
            key = tuple(sysprops.items())
            sys_blob = blobs.get(key)
            if sys_blob is None:
                sys_blob = self._encoded(key, sysprops)
        if type(body) is not bytes:
            body = bytes(body)
        # columns and row first, the count after: a reader bounded by self._n sees whole rows
        self._at.append(enqueued_at)
        chunk = self._chunk
        chunk.append((device_id, message_id, body, props_blob, sys_blob, flags))
        if len(chunk) == _CHUNK:
            # a reader may hold the list or read the tuple: both have the same rows
            self._chunks[-1] = tuple(chunk)
            self._chunk = []
            self._chunks.append(self._chunk)
        self._n = n + 1
        index = self._by_device.get(device_id)
        if index is None:
            index = self._by_device[device_id] = array("q")
        index.append(n)
        return duplicate

    def _lost_at(self, i: int) -> bool:
        lost = self._lost
        return i < len(lost) and lost[i] == 1

    def _mark(self, i: int) -> None:
        lost = self._lost
        if i >= len(lost):
            # grown, never shrunk: a reader on another thread checks the length first
            lost.extend(bytes(i + 1 - len(lost)))
        if not lost[i]:
            lost[i] = 1
            self._lost_total += 1
            dev = self._row(i)[0]
            self._lost_by_device[dev] = self._lost_by_device.get(dev, 0) + 1

    def mark_lost_in_failover(self, since: float, until: float,
                              device_ids: Collection[str] | None = None) -> int:
        """Mark the records enqueued in [since, until) (of `device_ids`; all devices when None) as
        lost in a failover; returns how many were newly marked."""
        before = self._lost_total
        at = self._at
        if device_ids is None:
            candidates: Iterable[int] = range(self._n)
        else:
            candidates = (i for d in set(device_ids) for i in self._by_device.get(d, ()))
        for i in candidates:
            if since <= at[i] < until:
                self._mark(i)
        return self._lost_total - before

    # --- reading ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n

    def _row(self, i: int) -> tuple[Any, ...]:
        row: tuple[Any, ...] = self._chunks[i >> _SHIFT][i & _MASK]
        return row

    def count(self, device_id: str | None = None, include_lost: bool = True) -> int:
        if device_id is None:
            return self._n - (0 if include_lost else self._lost_total)
        n = len(self._by_device.get(device_id, ()))
        return n - (0 if include_lost else self._lost_by_device.get(device_id, 0))

    def first_index(self, device_id: str, message_id: str) -> int | None:
        """The record number of the first message `message_id` from `device_id`, if any."""
        return self._first.get(device_id, {}).get(message_id)

    def message_ids(self, device_id: str) -> Collection[str]:
        """The distinct message ids `device_id` delivered (a live view; copy before iterating
        on another thread than the writer's)."""
        return self._first.get(device_id, {}).keys()

    def _build(self, i: int) -> Telemetry:
        dev, mid, body, props, sysprops, flags = self._row(i)
        system = _decode(sysprops)
        if flags & _MID:
            system["message_id"] = mid
        if flags & _CONN:
            system["connection_device_id"] = dev
        return Telemetry(dev, mid, body, _decode(props), system, self._at[i],
                         bool(flags & _DUP), bool(flags & _DUPLICATE), flags >> _QOS_SHIFT,
                         self._lost_at(i))

    def _indices(self, device_ids: Collection[str] | None, since: int) -> Iterable[int]:
        if device_ids is None:
            return range(since, self._n)
        picked = []
        for d in dict.fromkeys(device_ids):
            index = self._by_device.get(d)
            if index is not None:
                # a slice is a copy: the writer may append meanwhile
                picked.append(index[bisect_left(index, since):] if since else index[:])
        if len(picked) == 1:
            return picked[0]
        return merge(*picked)

    def items(self, device_id: str | None = None, since: int = 0, include_lost: bool = True,
              device_ids: Collection[str] | None = None) -> list[Telemetry]:
        """Records from number `since` on, of `device_id` (or of any of `device_ids`), in order.
        Costs O(records returned) when a device is named."""
        if device_id is not None:
            device_ids = (device_id,)
        end = self._n
        lost_at = self._lost_at
        return [self._build(i) for i in self._indices(device_ids, since)
                if i < end and (include_lost or not lost_at(i))]
