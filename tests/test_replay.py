"""`Outbox(replay=)`'s choice of what to send again, on a clock of its own: which lanes' messages a
stall puts at risk, and that a second lane's stall over the same outage does not replay the replays."""
from dataclasses import dataclass

from pytest_iotfailover.devices.replay import Replay


@dataclass
class Entry:
    mid: str
    state: str = "acked"


def ack(replay, lane, mid, first_try, now):
    return [e.mid for e in replay.acked(lane, Entry(mid), first_try, now)]


def test_a_stall_replays_every_lane_up_to_its_end():
    r = Replay(seconds=10, outage=2, capacity=100)
    assert ack(r, "a", "a0", 0.0, 0.1) == []
    # lane a's next message goes out at 4.0 and waits; lane b still has one acknowledged at 4.5,
    # just before the failover hits at 5.0
    assert ack(r, "b", "b0", 4.4, 4.5) == []
    assert ack(r, "a", "a1", 4.0, 9.0) == ["a0", "b0"]


def test_a_second_lane_over_the_same_outage_does_not_replay_what_came_after():
    r = Replay(seconds=10, outage=2, capacity=100)
    ack(r, "a", "a0", 0.0, 0.1)
    ack(r, "b", "b0", 0.2, 0.3)
    assert ack(r, "a", "a1", 1.0, 9.0) == ["a0", "b0"]
    # the replayed copies are acknowledged again after the hub came back ...
    ack(r, "a", "a0", 9.0, 9.1)
    ack(r, "b", "b0", 9.0, 9.2)
    # ... and lane b's own late acknowledgement of the same outage replays nothing more
    assert ack(r, "b", "b1", 1.5, 9.5) == []


def test_no_stall_no_replay_and_replay_zero_is_off():
    r = Replay(seconds=10, outage=2, capacity=100)
    assert ack(r, "a", "a0", 0.0, 0.1) == []
    assert ack(r, "a", "a1", 0.5, 1.0) == []
    off = Replay(seconds=0, outage=2, capacity=100)
    ack(off, "a", "a0", 0.0, 0.1)
    assert ack(off, "a", "a1", 1.0, 9.0) == []
